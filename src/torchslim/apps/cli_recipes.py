"""Recipes that the one-shot CLI commands (`factorize`, `quantize --method qat|binary|ternary`)
stand for: each command is a recipe run, and the recipe is written next to the result so the
run can be repeated with `torchslim compress`.
"""

from __future__ import annotations

import argparse
from typing import Any

from torchslim.errors import ConfigError

__all__ = ["factorize_recipe", "prune_recipe", "structured_options", "training_quantize_recipe"]


def factorize_recipe(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe a `torchslim factorize` call stands for (written to OUT/recipe.yaml)."""

    targets = {key: value for key, value in (("patterns", args.targets),
                                              ("exclude", args.exclude)) if value}
    stages: list[dict[str, Any]] = []
    linear = {key: value for key, value in (("param_ratio", args.linear_param_ratio),
                                            ("energy", args.linear_energy),
                                            ("rank", args.linear_rank)) if value is not None}
    conv = {key: value for key, value in (("param_ratio", args.conv_param_ratio),
                                          ("energy", args.conv_energy),
                                          ("rank", args.conv_rank)) if value is not None}
    if not linear and not conv and args.conv_method is None:
        linear = {"param_ratio": 0.5}
    if linear:
        stages.append({"low_rank": {**linear, "targets": {**targets, "types": ["Linear"]}}})
    if conv or args.conv_method is not None:
        method = args.conv_method or "tucker"
        if method != "depthwise" and not conv:
            conv = {"param_ratio": 0.5}
        stages.append({"decompose_conv": {"method": method, **conv,
                                          "targets": {**targets, "types": ["Conv2d"]}}})
    if args.epochs > 0:
        stages.append({"fine_tune": fine_tune_options(args, temperature=args.temperature, alpha=args.alpha)})
    return {"version": 1, "dataset": args.dataset, "seed": args.seed, "stages": stages}


def _registered_name(args: argparse.Namespace) -> str | None:
    """The command's model's registered name (None for a model of the user's own)."""
    from torchslim.apps.workflows import load_model_or_artifact

    model = load_model_or_artifact(args.model, factory=getattr(args, "factory", None))[0]
    spec = getattr(model, "torchslim_spec", None)
    return spec.name if spec is not None else None


def fine_tune_options(args: argparse.Namespace, *, temperature: float = 4.0,
                      alpha: float = 0.5) -> dict[str, Any]:
    """The model's tuned training options at a tenth of its LR (or `--lr`) for `--epochs`,
    distilled from the original model unless `--no-distill`."""
    from torchslim.apps.workflows import train_config_for

    name = _registered_name(args)
    defaults = train_config_for(name)
    train = train_config_for(name, epochs=args.epochs, lr=args.lr or defaults.lr / 10,
                             seed=args.seed).to_dict()
    if not args.no_distill:
        train["distill"] = {"teacher": "original", "temperature": temperature, "alpha": alpha}
    return train


def training_quantize_recipe(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe a `torchslim quantize --method qat|binary|ternary` call stands for."""
    from torchslim.apps.workflows import train_config_for

    name = _registered_name(args)
    defaults = train_config_for(name)
    train = train_config_for(name, epochs=args.epochs, lr=args.lr or defaults.lr / 10).to_dict()
    if not args.no_distill:
        train["distill"] = {"teacher": "original", "temperature": 4.0, "alpha": 0.5}
    if args.method == "qat":
        stages: list[dict[str, Any]] = [{"qat": {**train, "learn_scale": args.learn_scale}}]
    else:  # binary / ternary weights, stored as entropy-coded codes
        stages = [{"lowbit": {**train, "mode": args.method, "activations": args.binary_activations}},
                  {"encode": {}}]
    return {"version": 1, "dataset": args.calibration, "seed": 0, "stages": stages}


def structured_options(args: argparse.Namespace, *, share: float) -> dict[str, Any]:
    """ChannelPruning options of a `prune --structured` round removing `share` of what is left."""
    def per_round(ratio: float) -> float:  # the same fraction of what is left, each round
        return round(1 - (1 - ratio) ** (1 / args.steps), 6)

    try:
        per_layer = {key: per_round(float(value)) for key, value in
                     (item.split("=", 1) for item in args.per_layer or [])}
    except ValueError:
        raise ConfigError(f"--per-layer takes LAYER=RATIO pairs, got {args.per_layer}") from None
    return {"ratio": round(share, 6), "target": args.target, "importance": args.importance,
            "scope": args.scope, "round_to": args.round_to, "rounding": args.rounding,
            "per_layer": per_layer}


def prune_recipe(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe a `torchslim prune` call stands for: `steps` rounds of prune -> fine-tune.

    Each round removes the same fraction of what is left, so after `steps` rounds the model has
    lost `ratio` of its channels (or MACs, or weights): iterative pruning to a target.
    """
    train = fine_tune_options(args) if args.epochs > 0 else {}
    targets = {"exclude": list(args.exclude)} if args.exclude else {}
    stages: list[dict[str, Any]] = []
    for step in range(1, args.steps + 1):
        if args.structured:
            share = 1 - (1 - args.ratio) ** (1 / args.steps)  # of what is left, each round
            stage = structured_options(args, share=share)
            stages.append({"structured_prune": {**stage, **({"targets": targets} if targets else {})}})
        else:  # masks stay: the sparsity is of the original weights, reached after `step` rounds
            sparsity = 1 - (1 - args.ratio) ** (step / args.steps)
            prune = {"sparsity": round(sparsity, 6), **({"targets": targets} if targets else {})}
            stages.append({"prune": prune})
        if args.epochs > 0:
            stages.append({"fine_tune": dict(train)})
    return {"version": 1, "dataset": args.dataset, "seed": args.seed, "stages": stages}
