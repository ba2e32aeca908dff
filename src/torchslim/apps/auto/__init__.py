"""Automatic compression to a target: sensitivity-guided candidates scored by short trials."""

from torchslim.apps.auto.allocation import SizeModel, SizePolicy, greedy_path, measure_size_model
from torchslim.apps.auto.search import Target, auto_compress, pareto_front, run_candidate

__all__ = ["SizeModel", "SizePolicy", "Target", "auto_compress", "greedy_path", "measure_size_model",
           "pareto_front", "run_candidate"]
