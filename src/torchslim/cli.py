"""`torchslim` command line: a thin shell over `torchslim.apps.workflows` and `torchslim.measure`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torchslim.errors import ConfigError, SlimError
from torchslim.names import DATASET_NAMES, MODEL_NAMES

__all__ = ["main"]

EPILOG_MODELS = "models: " + ", ".join(MODEL_NAMES)


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training (defaults: the model's tuned settings)")
    group.add_argument("--epochs", type=int, help="passes over the training split")
    group.add_argument("--batch-size", type=int)
    group.add_argument("--optimizer", choices=["sgd", "adam", "adamw", "rmsprop"])
    group.add_argument("--lr", type=float, help="peak learning rate")
    group.add_argument("--momentum", type=float)
    group.add_argument("--nesterov", action="store_true", default=None)
    group.add_argument("--weight-decay", type=float, help="L2 penalty")
    group.add_argument("--l1", type=float, help="L1 penalty on weights")
    group.add_argument("--dropout", type=float, help="rate of the model's dropout layers")
    group.add_argument("--schedule",
                       choices=["constant", "step", "multistep", "exponential", "cosine"])
    group.add_argument("--step-epochs", type=int, help="epochs between decays (step)")
    group.add_argument("--milestones", type=int, nargs="+", help="decay epochs (multistep)")
    group.add_argument("--gamma", type=float, help="decay factor (step, multistep, exponential)")
    group.add_argument("--warmup-epochs", type=float, help="linear LR warm-up length")
    group.add_argument("--grad-clip", type=float, help="max global gradient norm")
    group.add_argument("--early-stopping", type=int, dest="early_stopping_patience",
                       metavar="PATIENCE", help="stop after PATIENCE epochs without val gain")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/checkpoints/last.ckpt if it exists")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--threads", type=int, help="intra-op threads for latency (default: all)")


TRAIN_KEYS = ("epochs", "batch_size", "optimizer", "lr", "momentum", "nesterov", "weight_decay",
              "l1", "dropout", "schedule", "step_epochs", "milestones", "gamma", "warmup_epochs",
              "grad_clip", "early_stopping_patience", "seed", "device")


def _train_config(args: argparse.Namespace, model: str) -> Any:
    """The CLI's training options over the model's tuned defaults (generic ones for a model of
    the user's own)."""
    from torchslim.apps.workflows import train_config_for

    values = {key: getattr(args, key) for key in TRAIN_KEYS}
    if values["milestones"] is not None:
        values["milestones"] = tuple(values["milestones"])
    return train_config_for(model if model in MODEL_NAMES else None, **values)


def _print_table(report: dict[str, Any]) -> None:
    from torchslim.report import format_table

    print(format_table(report["rows"]))


def cmd_train(args: argparse.Namespace) -> int:
    from torchslim.apps.workflows import train_model

    config = _train_config(args, args.model)
    report = train_model(args.model, dataset=args.dataset, out=args.out, config=config,
                         pretrained=args.pretrained, resume=args.resume,
                         progress=not args.no_progress, threads=args.threads, factory=args.factory)
    _print_table(report)
    print(f"\ntest accuracy {100 * report['test_accuracy']:.2f}%  ->  {args.out}/model.slim, "
          f"{args.out}/report.json, {args.out}/report.md")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from importlib.resources import files

    print("torchslim demo: Deep Compression of LeNet-300-100 on MNIST: train the baseline, "
          "prune, fine-tune, share weights, fine-tune, entropy-code")
    args.recipe = str(files("torchslim.recipes") / "lenet300_deep_compression.yaml")
    args.model = None
    if not args.overwrite and (Path(args.out) / "recipe.lock").is_file() and not args.resume:
        # The demo's own folder: finishing or re-showing the same run is what a second call means
        # (another recipe's run there is still refused).
        print(f"{args.out} holds an earlier demo run: reusing its finished stages (--overwrite to "
              "start over)")
        args.resume = True
    return cmd_compress(args)


def _run_recipe(recipe: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Run a recipe on `args.model` into `args.out`; prints the stage table (under torchrun:
    every process runs the recipe, rank 0 prints)."""
    from torchslim.apps.compress import CompressionRun
    from torchslim.training import distributed

    run = CompressionRun(recipe, args.out, model_source=args.model, resume=args.resume,
                         overwrite=getattr(args, "overwrite", False), progress=not args.no_progress,
                         factory=getattr(args, "factory", None))
    report = run.run()
    if distributed.is_main_process():
        _print_table(report)
    return report


def _run_generated_recipe(data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Validate a recipe a command stands for, keep it as OUT/recipe.yaml, and run it."""
    import yaml

    from torchslim.apps.recipe import parse_recipe
    from torchslim.apps.run_folder import RunFolder, check_writable_folder
    from torchslim.safefile import write_atomic

    recipe = parse_recipe(data)
    check_writable_folder(Path(args.out))
    if RunFolder(args.out).holds_a_run() and not (args.resume or getattr(args, "overwrite", False)):
        raise ConfigError(f"{args.out} already holds a run; pass --resume to continue it, --overwrite "
                          "to delete it and start over, or choose another --out")
    text = yaml.safe_dump(data, sort_keys=False)
    write_atomic(Path(args.out) / "recipe.yaml", lambda tmp: tmp.write_text(text))
    return _run_recipe(recipe, args)


def cmd_compress(args: argparse.Namespace) -> int:
    from torchslim.apps.recipe import load_recipe
    from torchslim.training import distributed

    report = _run_recipe(load_recipe(args.recipe), args)
    distributed.shutdown()  # under torchrun: leave the process group before exiting
    if not distributed.is_main_process():
        return 0
    ratios, final, baseline = report["comparison"], report["final"], report["baseline"]
    quality = (f"perplexity {final['perplexity']:.2f} (baseline {baseline['perplexity']:.2f}), "
               f"{final['bits_per_weight']:.2f} bits per weight" if final.get("perplexity") else
               f"test accuracy {100 * final['test_accuracy']:.2f}% (baseline "
               f"{100 * baseline['test_accuracy']:.2f}%)")
    print(f"\n{ratios.get('bytes_ratio', 0):.1f}x smaller on disk than the dense fp32 baseline, "
          f"{quality}, {report['seconds']:.0f} s  ->  {args.out}/model.slim, {args.out}/report.md")
    return 0


def cmd_factorize(args: argparse.Namespace) -> int:
    from torchslim.apps.cli_recipes import factorize_recipe

    args.model = _model_source(args)
    _print_summary(_run_generated_recipe(factorize_recipe(args), args), args, latency=False)
    return 0


def _print_summary(report: dict[str, Any], args: argparse.Namespace, *, latency: bool) -> None:
    """One line: parameter and FLOP ratios, (batched speedup,) accuracy before/after, files."""
    ratios, final = report["comparison"], report["final"]
    speed = (f"{ratios.get('latency_batch_ms_ratio', 0):.2f}x faster at batch "
             f"{final.get('latency_batch')}, " if latency else "")
    print(f"\n{ratios.get('params_ratio', 0):.2f}x fewer parameters, "
          f"{ratios.get('flops_ratio', 0):.2f}x fewer FLOPs, {speed}test accuracy "
          f"{100 * final['test_accuracy']:.2f}% (before "
          f"{100 * report['baseline']['test_accuracy']:.2f}%)  ->  {args.out}/model.slim, "
          f"{args.out}/report.md, {args.out}/recipe.yaml")


LANGUAGE_METHODS = ("wanda", "sparsegpt", "gptq", "awq", "rtn", "smoothquant")


def _language_job(args: argparse.Namespace, config: Any) -> int:
    from torchslim.apps.language import compress_language_model

    then = []
    if getattr(args, "int4_kernel", False):
        from torchslim.quantization import Int4Kernel

        then.append(Int4Kernel())
    dataset = getattr(args, "dataset", None) or getattr(args, "calibration", None) or "python-docs"
    report = compress_language_model(args.model, config, out=args.out, dataset=dataset,
                                     sequences=args.calibration_sequences, length=args.sequence_length,
                                     eval_tokens=args.eval_tokens or None, seed=args.seed, then=then)
    print(f"{args.method}: perplexity {report['perplexity_before']:.3f} -> {report['perplexity_after']:.3f} "
          f"({report['perplexity_ratio']:.3f}x, {report['perplexity_tokens']:,} held-out tokens), "
          f"{report['changed']} layers changed, {len(report['skipped'])} skipped, calibration "
          f"{report['calibration']['seconds']:.0f} s  ->  {args.out}/model.slim, {args.out}/report.json")
    return 0


def _add_language_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("language models (wanda, sparsegpt, gptq, awq, rtn, smoothquant)")
    group.add_argument("--calibration-sequences", type=int, default=128,
                       help="calibration windows drawn from the dataset's calibration split")
    group.add_argument("--sequence-length", type=int, default=512, help="tokens per window")
    group.add_argument("--eval-tokens", type=int, default=16384,
                       help="held-out tokens scored before and after (0: the whole split)")


def cmd_prune(args: argparse.Namespace) -> int:
    from torchslim.apps.cli_recipes import prune_recipe

    args.model = _model_source(args)
    if args.method in LANGUAGE_METHODS:
        from torchslim.config import build_config
        from torchslim.pruning import SparseGPT, Wanda

        kind = Wanda if args.method == "wanda" else SparseGPT
        return _language_job(args, build_config(kind, {
            "sparsity": args.sparsity, "pattern": args.pattern,
            "calibration_batches": -(-args.calibration_sequences // 8)}))
    if args.ratio is None:
        raise SystemExit("torchslim prune: --ratio is required (the fraction removed)")
    if not 0 <= args.ratio < 1:
        raise SystemExit(f"torchslim prune: --ratio {args.ratio} must be in [0, 1) (the fraction removed)")
    if args.structured and args.epochs == 0 and args.steps == 1:  # one shot: also models without data
        return _prune_once(args)
    _print_summary(_run_generated_recipe(prune_recipe(args), args), args, latency=True)
    return 0


def _prune_once(args: argparse.Namespace) -> int:
    from torchslim.apps.cli_recipes import structured_options
    from torchslim.apps.workflows import structured_prune_job
    from torchslim.config import build_config
    from torchslim.pruning import ChannelPruning
    from torchslim.select import Select

    config = build_config(ChannelPruning, structured_options(args, share=args.ratio))
    report = structured_prune_job(args.model, config, out=args.out, dataset=args.dataset,
                                  targets=Select(exclude=tuple(args.exclude or ())), seed=args.seed)
    _print_table(report)
    ratios = report["comparison"]
    print(f"\n{ratios.get('params_ratio', 0):.2f}x fewer parameters, "
          f"{ratios.get('flops_ratio', 0):.2f}x fewer FLOPs, {ratios.get('latency_b1_ms_ratio', 0):.2f}x / "
          f"{ratios.get('latency_batch_ms_ratio', 0):.2f}x faster at batch 1 / "
          f"{report['after'].get('latency_batch')}  ->  {args.out}/model.slim, {args.out}/report.md")
    return 0


QUIET_HELP = ("no progress bars, and no progress lines (printed to stderr, with elapsed time and "
              "ETA, when it is not a terminal)")
MODEL_HELP = ("a registered model name, a .slim artifact, or FILE.py:FUNCTION / "
              "package.module:FUNCTION returning your nn.Module with its weights loaded")


def _add_factory_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--factory", metavar="FILE.py:FUNCTION",
                        help="builds the (uncompressed) model an artifact of your own model was made "
                             "from; the artifact's edits are replayed on it (artifacts never import code)")


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    """The model as a positional argument or `--model SPEC`, plus `--factory` for artifacts of
    models that are not torchslim reference models."""
    parser.add_argument("model", nargs="?", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("--model", dest="model_option", metavar="SPEC", help="the same, as an option")
    _add_factory_option(parser)


def _model_source(args: argparse.Namespace) -> str:
    source = args.model or args.model_option
    if not source:
        raise ConfigError(f"no model given; pass MODEL or --model SPEC ({MODEL_HELP})")
    return str(source)


def _dataset(name: str | None) -> Any:
    """A built-in dataset by name, or the user's loaders from a data factory."""
    from torchslim.factories import is_factory, load_data_factory

    if name is None:
        return None
    if name in DATASET_NAMES:
        from torchslim.data import load_dataset

        return load_dataset(name)
    if is_factory(name):
        return load_data_factory(name)
    raise ConfigError(f"unknown dataset {name!r}; valid: {', '.join(DATASET_NAMES)}, or "
                      "FILE.py:FUNCTION / package.module:FUNCTION returning your DataLoaders")


def _add_run_folder_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in OUT: finished stages are reused, training resumes "
                             "from its last epoch checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the run OUT already holds and start over (without --resume or "
                             "--overwrite, a folder holding a run is refused)")


def _round_to(text: str) -> int | str:
    """`--round-to`: a positive integer or `auto`."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer or 'auto'")
    return int(text)


def _add_prune_parser(commands: Any) -> None:
    prune = commands.add_parser(
        "prune", help="remove channels/neurons/heads (--structured) or weights, then fine-tune",
        description="--structured: trace the model's coupled channels and physically remove the "
        "least important ones (a smaller dense model that runs faster); otherwise zero the "
        "smallest weights. Then fine-tune (distilling from the original by default); --steps N "
        "repeats prune -> fine-tune N times to reach the same final ratio. Writes OUT/model.slim, "
        "OUT/report.md and OUT/recipe.yaml.")
    _add_model_argument(prune)
    prune.add_argument("--out", required=True, help="output folder")
    prune.add_argument("--structured", action="store_true", help="remove whole channels (default: weights)")
    prune.add_argument("--ratio", type=float,
                       help="fraction removed, in [0, 1): of channels, MACs (--target) or weights")
    prune.add_argument("--method", default="magnitude", choices=["magnitude", "wanda", "sparsegpt"],
                       help="wanda / sparsegpt: one-shot pruning of a language model from "
                            "calibration text (with --sparsity, --pattern, --dataset)")
    prune.add_argument("--sparsity", type=float, default=0.5, help="wanda/sparsegpt: fraction removed")
    prune.add_argument("--pattern", metavar="N:M", help="wanda/sparsegpt: remove N of every M weights (2:4)")
    prune.add_argument("--target", default="channels", choices=["channels", "macs"])
    prune.add_argument("--importance", default="l2",
                       choices=["l1", "l2", "random", "taylor", "activation", "apoz", "bn_scale"],
                       help="how units are ranked (taylor/activation/apoz use training batches)")
    prune.add_argument("--scope", default="uniform", choices=["uniform", "global"])
    prune.add_argument("--round-to", type=_round_to, default="auto", metavar="N|auto",
                       help="keep channel counts multiples of N (see --rounding). auto (default): "
                            "with --target macs, multiples of this CPU's fp32 vector width (16 with "
                            "AVX-512), since its kernels pad other widths up to one; with --target "
                            "channels, the exact ratio. 1: exact widths always")
    prune.add_argument("--rounding", default="up", choices=["up", "down", "nearest"],
                       help="with --round-to: keep the multiple above the ratio's width (up: never "
                            "more removed than asked), below it (down: at least the ratio, as "
                            "Torch-Pruning does) or the nearest")
    prune.add_argument("--per-layer", nargs="+", metavar="LAYER=RATIO", help="ratio overrides (globs ok)")
    prune.add_argument("--exclude", nargs="+", metavar="PATTERN", help="layers to leave untouched")
    prune.add_argument("--steps", type=int, default=1, help="prune -> fine-tune rounds")
    prune.add_argument("--dataset", metavar="DATASET",
                       help=f"default: the model's own; {', '.join(DATASET_NAMES)}, or FILE.py:FUNCTION "
                            "returning {'train': loader, 'val': loader, 'test': loader}")
    tune = prune.add_argument_group("fine-tuning after each round")
    tune.add_argument("--epochs", type=int, default=1, help="epochs per round (0: none)")
    tune.add_argument("--lr", type=float, help="default: a tenth of the model's training LR")
    tune.add_argument("--no-distill", action="store_true", help="fine-tune on labels only")
    tune.add_argument("--seed", type=int, default=0)
    _add_run_folder_options(prune)
    prune.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_language_options(prune)
    prune.set_defaults(func=cmd_prune)


def cmd_quantize(args: argparse.Namespace) -> int:
    from torchslim.apps.workflows import quantize_job

    args.model = _model_source(args)
    static_only = [flag for flag, used in (("--adaround", args.adaround),
                                           ("--bias-correction", args.bias_correction),
                                           ("--equalize", args.equalize),
                                           ("--range-search", args.range_search),
                                           ("--sensitivity", args.sensitivity is not None)) if used]
    if static_only and args.method != "static":
        raise ConfigError(f"{', '.join(static_only)}: options of --method static (they fit the model "
                          f"to calibrated int8 activations), not of {args.method}")
    if args.adaround_iterations != 300 and not args.adaround:
        raise ConfigError("--adaround-iterations is used by --adaround only; add --adaround or drop it")
    if args.method in LANGUAGE_METHODS:
        from torchslim.config import build_config
        from torchslim.quantization import AWQ, GPTQ, SmoothQuant, WeightOnly

        if args.method == "smoothquant":
            return _language_job(args, build_config(SmoothQuant, {
                "alpha": args.alpha, "calibration_batches": -(-args.calibration_sequences // 8)}))
        options = {"bits": args.bits or 4, "group_size": args.group_size, "symmetric": not args.asymmetric}
        batches = -(-args.calibration_sequences // 8)
        if args.method == "gptq":
            options.update(act_order=args.act_order, clip=not args.no_clip, calibration_batches=batches)
        if args.method == "awq":
            options.update(clip=not args.no_clip, calibration_batches=batches)
        if args.no_clip and args.method not in ("gptq", "awq"):
            raise ConfigError(f"--no-clip is a gptq / awq option; {args.method} has no clipping "
                              "search to turn off")
        if args.embeddings and args.method != "rtn":
            raise ConfigError(f"--embeddings is a round-to-nearest option (--method rtn), not "
                              f"{args.method}'s; quantize the embedding with a weight_only stage "
                              "after it in a recipe")
        if args.method == "rtn":
            options.update(embeddings=args.embeddings, embedding_bits=args.embedding_bits)
        kind = {"gptq": GPTQ, "awq": AWQ}.get(args.method, WeightOnly)
        return _language_job(args, build_config(kind, options))
    args.bits = args.bits or 8
    if args.method in ("qat", "binary", "ternary"):
        from torchslim.apps.cli_recipes import training_quantize_recipe

        report = _run_generated_recipe(training_quantize_recipe(args), args)
        final = report["stages"][0]
        if args.method == "qat":
            print(f"\nint8 ops: {final['int8_ops']}; left in float: {final['float_ops'] or 'none'}")
        else:
            print(f"\n{args.method} layers: {', '.join(final['layers'])}; "
                  f"{report['comparison'].get('bytes_ratio', 0):.1f}x smaller on disk")
        print(f"test accuracy {100 * report['final']['test_accuracy']:.2f}% (fp32 "
              f"{100 * report['baseline']['test_accuracy']:.2f}%)  ->  {args.out}/model.slim")
        return 0

    report = quantize_job(args.model, method=args.method, out=args.out, dataset=args.calibration,
                          bits=args.bits, calibrate=args.calibrate, percentile=args.percentile,
                          per_channel=not args.per_tensor, calibration_batches=args.batches,
                          threads=args.threads, backend=args.backend, factory=args.factory,
                          exclude=tuple(args.exclude), fp16=tuple(args.fp16),
                          adaround=args.adaround, bias_correction=args.bias_correction,
                          adaround_iterations=args.adaround_iterations, equalize=args.equalize,
                          range_search=args.range_search,
                          sensitivity=args.sensitivity)
    _print_table(report)
    quant = report["quantization"]
    print(f"\nint8 ops: {quant['int8_ops']}; left in float: {quant['float_ops'] or 'none'}")
    ratios = report["comparison"]
    print(f"{ratios.get('bytes_ratio', 0):.2f}x smaller on disk, "
          f"{ratios.get('latency_b1_ms_ratio', 0):.2f}x / {ratios.get('latency_batch_ms_ratio', 0):.2f}x "
          f"faster at batch 1 / {report['after'].get('latency_batch')}  ->  {args.out}/model.slim, "
          f"{args.out}/report.md")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from torchslim.inspect import inspect_artifact

    args.artifact = args.artifact or args.model_option
    if not args.artifact:
        raise ConfigError("inspect needs an artifact: torchslim inspect FILE.slim")
    result = inspect_artifact(args.artifact)
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return 0
    print(f"{args.artifact}: {result['model']}, format version {result['version']}, "
          f"{result['bytes']:,} bytes")
    print("| tensor | shape | sparsity | bits | layout | coders | bytes by stream | total |")
    print("|---|---|---|---|---|---|---|---|")
    for row in result["tensors"]:
        streams = ", ".join(f"{k} {v:,}" for k, v in row["streams"].items())
        print(f"| {row['name']} | {'x'.join(map(str, row['shape']))} | {100 * row['sparsity']:.1f}% "
              f"| {row['bits'] or '–'} | {row['layout']} | {row['coders'] or '–'} | {streams} "
              f"| {row['bytes']:,} |")
    print(f"header (JSON spec, checksum, safetensors framing): {result['header_bytes']:,} bytes")
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from torchslim.apps.sensitivity import run_sensitivity

    result = run_sensitivity(args.model, dataset=args.dataset, out=args.out,
                             sparsities=tuple(args.sparsities), max_drop=args.max_drop,
                             progress=not args.no_progress, workers=args.workers,
                             ray_address=args.ray_address, factory=args.factory)
    print(result["table"])
    print(f"\nper-layer sparsities for a drop <= {args.max_drop}: {result['suggested']}")
    run = result["execution"]
    where = "in-process" if run["backend"] == "in-process" else (
        f"on Ray, {run['workers'] or 'one per cluster CPU'} tasks in flight")
    print(f"scan: {run['seconds']:.1f} s wall-clock, {where}")
    return 0


def cmd_auto(args: argparse.Namespace) -> int:
    from torchslim.apps.auto import Target, auto_compress

    report = auto_compress(args.model, target=Target.parse(args.target), max_drop=args.max_drop / 100,
                           out=args.out, dataset=args.data, trials=args.trials, epochs=args.epochs,
                           final_epochs=args.final_epochs, workers=args.workers,
                           ray_address=args.ray_address, progress=not args.no_progress,
                           factory=args.factory)
    final, kind = report["final"], report["target"]["kind"]
    print(f"chosen: trial {report['chosen']} of {len(report['trials'])} (front: {report['front']})")
    print(f"final: {kind} {final['ratios'][kind]:.2f}x (target {report['target']['ratio']:g}x), "
          f"validation drop {final['val_drop_points']:.2f} pt, test drop {final['test_drop_points']:.2f} "
          f"pt (max {report['max_drop_points']:g}); search {report['total_seconds']:.0f} s")
    print(f"wrote {args.out}/recipe.yaml, model.slim, auto.json, auto.md, front.png")
    return 0 if final["meets_target"] and final["meets_max_drop"] else 1


def _evaluate_language_model(source: str, args: argparse.Namespace) -> int:
    from torchslim.apps.language import language_perplexity, load_language_source
    from torchslim.decoder_export import is_genai_folder
    from torchslim.measure import count_params

    if is_genai_folder(source):  # `export --format genai`: its program
        from torchslim.apps.language import genai_perplexity

        result = {"model": source, "dataset": args.dataset,
                  **genai_perplexity(source, args.dataset, max_tokens=args.max_tokens or None)}
    else:
        model, _ = load_language_source(source)
        total, nonzero = count_params(model)
        result = {"model": source, "dataset": args.dataset, "params": total, "nonzero_params": nonzero,
                  **language_perplexity(model, args.dataset, max_tokens=args.max_tokens or None)}
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        for key, value in result.items():
            print(f"{key:>16}: {value}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from torchslim.apps.workflows import load_model_or_artifact, measure_model

    source = _model_source(args)
    from torchslim.apps.language import TEXT_DATASETS

    if args.dataset in TEXT_DATASETS:
        return _evaluate_language_model(source, args)
    from torchslim.decoder_export import is_genai_folder

    if is_genai_folder(source):
        raise ConfigError(f"{source} is an exported decoder: evaluate it on a text dataset "
                          f"({', '.join(TEXT_DATASETS)})")
    data = _dataset(args.dataset)
    model, path = load_model_or_artifact(source, factory=args.factory)
    result = measure_model(model, path=path, data=data, split=args.split,
                           batch_size=args.batch_size, timing=False)
    result["model"] = source
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        for key, value in result.items():
            print(f"{key:>16}: {value}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from torchslim.apps.language import decode_speed, is_causal_lm, load_language_source
    from torchslim.apps.workflows import backend_of, inputs_for, load_model_or_artifact
    from torchslim.measure import measure_latency, num_threads

    source = _model_source(args)
    from torchslim.decoder_export import is_genai_folder

    if is_genai_folder(source):  # `export --format genai`: its own runtime
        import torch

        from torchslim.apps.language import genai_decode_speed

        threads = args.threads or torch.get_num_threads()
        speed = genai_decode_speed(source, repeats=max(1, min(args.repeats, 5)), threads=threads)
        result_genai = {"model": source, "backend": "onnxruntime-genai", "tokens_per_s": speed,
                        "batch_size": 1, "threads": threads}
        print(json.dumps(result_genai, sort_keys=True) if args.json else
              f"{source}: greedy decoding at batch 1 in onnxruntime-genai, {threads} threads: "
              f"{speed:.1f} tokens/s")
        return 0
    model, _ = load_language_source(source) if not args.factory else \
        load_model_or_artifact(source, factory=args.factory)
    if is_causal_lm(model):  # language models: decoding speed, batch 1, with the cache
        with num_threads(args.threads) as threads:
            speed = decode_speed(model, repeats=max(1, min(args.repeats, 5)))
        result: dict[str, Any] = {"model": source, "backend": backend_of(model), "tokens_per_s": speed,
                                  "batch_size": 1, "threads": threads}
        print(json.dumps(result, sort_keys=True) if args.json else
              f"{source}: greedy decoding at batch 1, {threads} threads: {speed:.1f} tokens/s")
        return 0
    inputs = inputs_for(model, args.batch)
    if args.onnxruntime and backend_of(model) == "torch":
        from torchslim.runtime.onnx_program import OrtModule, export_onnx

        model = OrtModule(export_onnx(model, inputs[:1]))
    latency = measure_latency(model, inputs, threads=args.threads, warmup=args.warmup,
                              repeats=args.repeats)
    result = {"model": source, "backend": backend_of(model), **latency.to_dict()}
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(f"{args.model}: batch {latency.batch_size}, {latency.threads} threads, "
              f"median {latency.median_ms:.3f} ms, p90 {latency.p90_ms:.3f} ms, "
              f"{latency.throughput:,.0f} samples/s over {latency.repeats} runs")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from torchslim.apps.workflows import inputs_for, load_model_or_artifact
    from torchslim.export import export_model

    model, _ = load_model_or_artifact(_model_source(args), factory=args.factory)
    tokenizer = args.tokenizer or (_known_tokenizer(model) if args.format == "genai" else None)
    inputs = None if args.format == "genai" else inputs_for(model, 2)  # genai: token ids of its own
    result = export_model(model, args.out, format=args.format, example_inputs=inputs, tokenizer=tokenizer)
    print(f"{result['format']}: {result['path']} ({result['bytes']:,} bytes), outputs match the "
          f"module (largest relative difference {result['max_relative_difference']:.2g})")
    if "int4_nodes" in result:
        print(f"{len(result['int4_nodes'])} matmuls run their codes on MatMulNBits")
        for node, reason in {**result["float_matmuls"], **result["skipped"]}.items():
            print(f"  float: {node}: {reason}")
    return 0


def _known_tokenizer(model: Any) -> Any:
    """The tokenizer of a language model loaded by name here, else None (--tokenizer names one)."""
    from torchslim.models.language import tokenizer_for

    try:
        return tokenizer_for(model)
    except ConfigError:
        return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchslim", description="Make trained PyTorch models smaller and faster.",
        epilog=EPILOG_MODELS + "; datasets: " + ", ".join(DATASET_NAMES))
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="Deep Compression of LeNet-300-100 on MNIST",
                               description="Train LeNet-300-100 on real MNIST, run the built-in "
                               "Deep Compression recipe, print the before/after table and write "
                               "model.slim + a report folder.")
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    _add_run_folder_options(demo)
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(func=cmd_demo)

    compress = commands.add_parser(
        "compress", help="run a compression recipe (YAML)",
        description="Run the stages of a recipe (prune, fine_tune, cluster, encode, ...), "
        "checkpointing each; writes OUT/model.slim and OUT/report.json/.md. A causal language model "
        "with a text dataset (python-docs) runs the one-shot stages (sparsegpt, gptq, ...) and "
        "fine_tune / distill on the text, and reports perplexity and bits per weight. Data-parallel: "
        "`torchrun --nproc_per_node=N -m torchslim compress ...` (training batches split "
        "over the N processes; rank 0 writes and prints).")
    compress.add_argument("recipe", help="a recipe file, e.g. examples/recipes/*.yaml")
    compress.add_argument("--model", help="artifact, registered name, language model (smollm2-135m) or "
                          "FILE.py:FUNCTION to compress instead of the recipe's model (its `baseline:` "
                          "block is then not used)")
    _add_factory_option(compress)
    compress.add_argument("--out", required=True, help="output folder")
    _add_run_folder_options(compress)
    compress.add_argument("--no-progress", action="store_true", help="hide progress bars")
    compress.set_defaults(func=cmd_compress)

    factorize = commands.add_parser(
        "factorize", help="low-rank Linear layers / decompose convs, then distil",
        description="Split Linear layers by truncated SVD and/or decompose k x k convs "
        "(Tucker-2, spatial separable, depthwise separable), then fine-tune with distillation "
        "from the original model; writes OUT/model.slim, OUT/report.md and OUT/recipe.yaml. "
        "Default: Linear layers at half their weights.")
    _add_model_argument(factorize)
    factorize.add_argument("--out", required=True, help="output folder")
    factorize.add_argument("--dataset", metavar="DATASET",
                           help="default: the model's own; a built-in name or FILE.py:FUNCTION")
    lin = factorize.add_argument_group("Linear layers (give one)")
    lin.add_argument("--linear-param-ratio", type=float, metavar="R",
                     help="keep at most this fraction of each layer's weights, in (0, 1)")
    lin.add_argument("--linear-energy", type=float, metavar="E",
                     help="smallest rank keeping this fraction of sum(sigma^2), in (0, 1]")
    lin.add_argument("--linear-rank", type=int, metavar="N", help="the same rank everywhere")
    cv = factorize.add_argument_group("convolutions (give --conv-method and one of the others)")
    cv.add_argument("--conv-method", choices=["tucker", "spatial", "depthwise"])
    cv.add_argument("--conv-param-ratio", type=float, metavar="R")
    cv.add_argument("--conv-energy", type=float, metavar="E")
    cv.add_argument("--conv-rank", type=int, metavar="N")
    factorize.add_argument("--targets", nargs="+", metavar="PATTERN", help="layer name patterns")
    factorize.add_argument("--exclude", nargs="+", metavar="PATTERN", help="layers to leave")
    tune = factorize.add_argument_group("fine-tuning")
    tune.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs (0: none)")
    tune.add_argument("--lr", type=float, help="default: a tenth of the model's training LR")
    tune.add_argument("--no-distill", action="store_true", help="fine-tune on labels only")
    tune.add_argument("--temperature", type=float, default=4.0)
    tune.add_argument("--alpha", type=float, default=0.5, help="weight of the hard-label loss")
    tune.add_argument("--seed", type=int, default=0)
    _add_run_folder_options(factorize)
    factorize.add_argument("--no-progress", action="store_true", help="hide progress bars")
    factorize.set_defaults(func=cmd_factorize)

    _add_prune_parser(commands)
    quantize = commands.add_parser(
        "quantize", help="int8 post-training quantization executed by onnxruntime",
        description="Convert a model to int8 (dynamic: int8 weights, activations quantized at "
        "run time; static: calibrated int8 activations too, per-channel weights) and write "
        "OUT/model.slim, which evaluate and bench run on onnxruntime's int8 kernels.")
    _add_model_argument(quantize)
    quantize.add_argument("--method", default="dynamic",
                          choices=["dynamic", "static", "qat", "binary", "ternary", "gptq", "awq",
                                   "rtn", "smoothquant"],
                          help="gptq / awq / rtn: weight-only codes of a language model's Linears "
                               "(GPTQ's error correction, AWQ's activation-aware scales, or "
                               "round-to-nearest); smoothquant: W8A8 "
                               "with activation outliers migrated into the weights")
    quantize.add_argument("--alpha", type=float, default=0.5, help="smoothquant: migration strength")
    quantize.add_argument("--int4-kernel", action="store_true",
                          help="gptq/awq/rtn with 4 bits: run the codes on onnxruntime's MatMulNBits "
                               "int4 kernel (faster decoding) instead of dequantizing to float")
    quantize.add_argument("--bits", type=int, help="8 (the int8 kernels' width); gptq/rtn: 2..8, default 4")
    quantize.add_argument("--group-size", type=int, default=64, help="gptq/rtn: inputs per scale")
    quantize.add_argument("--asymmetric", action="store_true", help="gptq/rtn: zero point per group")
    quantize.add_argument("--embeddings", action="store_true",
                          help="rtn: the embedding tables too; a tied lm_head and its embedding "
                               "become one table of codes (else the tied head stays float)")
    quantize.add_argument("--embedding-bits", type=int,
                          help="rtn --embeddings: bits of the embedding codes (default: --bits; 8 "
                               "keeps a tied head's accuracy)")
    quantize.add_argument("--act-order", action="store_true",
                          help="gptq: quantize the inputs with the largest Hessian diagonal first")
    quantize.add_argument("--no-clip", action="store_true",
                          help="gptq/awq: grids over each group's full range, without the search for "
                               "the clipped range that changes the output least")
    quantize.add_argument("--seed", type=int, default=0, help="gptq: calibration windows drawn")
    quantize.add_argument("--calibration", "--dataset", dest="calibration", metavar="DATASET",
                          help="dataset whose training split calibrates (default: the model's): "
                               f"{', '.join(DATASET_NAMES)}, or FILE.py:FUNCTION returning loaders")
    quantize.add_argument("--exclude", nargs="+", metavar="MODULE", default=[],
                          help="modules (names or globs) kept in float, e.g. a sensitive first layer")
    quantize.add_argument("--fp16", nargs="+", metavar="MODULE", default=[],
                          help="modules kept out of int8 with their weights stored as float16")
    quantize.add_argument("--calibrate", default="minmax", choices=["minmax", "entropy", "percentile"],
                          help="static activation ranges: observed min/max, KL divergence (2048 "
                               "histogram bins), or a percentile of the values (--percentile)")
    quantize.add_argument("--percentile", type=float,
                          help="with --calibrate percentile: the percentile kept (default 99.999)")
    quantize.add_argument("--adaround", action="store_true",
                          help="static: learn each weight's rounding so that every layer reproduces "
                               "the float model's output on the calibration data (AdaRound)")
    quantize.add_argument("--adaround-iterations", type=int, default=300,
                          help="static --adaround: optimisation steps per layer")
    quantize.add_argument("--bias-correction", action="store_true",
                          help="static: subtract the mean error each layer's int8 weights add, "
                               "per output channel, through its bias")
    quantize.add_argument("--equalize", action="store_true",
                          help="static: rescale the channels between consecutive layers so that each "
                               "activation fills its int8 grid (cross-layer equalization); the model "
                               "computes the same")
    quantize.add_argument("--range-search", action="store_true",
                          help="static: choose each Conv/Linear input's int8 range by its error weighted "
                               "by how much the model's output moves with it (output gradients on the "
                               "calibration data), in place of the calibrated range")
    quantize.add_argument("--sensitivity", type=float, metavar="BUDGET",
                          help="static: measure each layer's int8 cost and keep the worst in float "
                               "while their multiply-adds fit BUDGET, a share of the model's (e.g. 0.05)")
    quantize.add_argument("--batches", type=int, default=8, help="calibration batches of 64")
    quantize.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor")
    quantize.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"],
                          help="torch: dynamic int8 Linear on torch._int_mm, stays a PyTorch model")
    quantize.add_argument("--threads", type=int, help="threads for the latency measurement")
    qat = quantize.add_argument_group("training methods (qat, binary, ternary)")
    qat.add_argument("--epochs", type=int, default=1, help="QAT epochs")
    qat.add_argument("--lr", type=float, help="default: a tenth of the model's training LR")
    qat.add_argument("--learn-scale", action="store_true", help="qat: LSQ, learned activation scales")
    qat.add_argument("--binary-activations", action="store_true",
                     help="binary/ternary: binarize layer inputs too (XNOR-Net)")
    qat.add_argument("--no-distill", action="store_true",
                     help="train on labels only (default: distil from the float model)")
    qat.add_argument("--no-progress", action="store_true", help="hide progress bars")
    quantize.add_argument("--out", required=True, help="output folder")
    _add_language_options(quantize)
    _add_run_folder_options(quantize)
    quantize.set_defaults(func=cmd_quantize)

    inspect = commands.add_parser("inspect", help="per-layer sparsity, bits and bytes of a file",
                                  description="Show how an artifact stores each tensor.")
    inspect.add_argument("artifact", nargs="?", help="a .slim file")
    inspect.add_argument("--model", dest="model_option", metavar="ARTIFACT", help="the same, as an option")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(func=cmd_inspect)

    sensitivity = commands.add_parser(
        "sensitivity", help="per-layer accuracy vs sparsity (validation split)",
        description="Prune one layer at a time by magnitude and measure validation accuracy; "
        "writes OUT/sensitivity.json, .md and .png.")
    sensitivity.add_argument("--model", required=True, help=MODEL_HELP)
    _add_factory_option(sensitivity)
    sensitivity.add_argument("--dataset", metavar="DATASET",
                             help="a built-in name or FILE.py:FUNCTION returning loaders (its 'val' "
                                  "is scanned)")
    sensitivity.add_argument("--sparsities", type=float, nargs="+",
                             default=[0.5, 0.7, 0.8, 0.9, 0.95, 0.98])
    sensitivity.add_argument("--max-drop", type=float, default=0.005,
                             help="accuracy budget (fraction) for the suggested sparsities")
    sensitivity.add_argument("--out", required=True)
    sensitivity.add_argument("--no-progress", action="store_true")
    sensitivity.add_argument("--workers", type=int, default=None, metavar="N",
                             help="run the trials as N parallel Ray tasks on a local Ray "
                             "(pip install 'torchslim[ray]'); default: in-process, same numbers")
    sensitivity.add_argument("--ray-address", default=None, metavar="ADDR",
                             help="run the trials on an existing Ray cluster ('auto', "
                             "'ray://host:10001'); --workers then caps the tasks in flight")
    sensitivity.set_defaults(func=cmd_sensitivity)

    auto = commands.add_parser(
        "auto", help="find a compression policy for a target and an accuracy budget",
        description="Score candidate policies (per-layer sparsity and bits from the sensitivity "
        "scan for a size target; global structured pruning for macs/latency) with short "
        "fine-tunes, pick on validation, rerun the chosen one with --final-epochs. Writes "
        "OUT/recipe.yaml (rerun it with `torchslim compress`), OUT/model.slim, OUT/auto.json, "
        "OUT/auto.md and OUT/front.png. Exit status 1 when the final model misses a goal.")
    auto.add_argument("--model", required=True, help=MODEL_HELP)
    _add_factory_option(auto)
    auto.add_argument("--data", "--dataset", dest="data", metavar="DATASET",
                      help=f"default: the model's own; {', '.join(DATASET_NAMES)}, or FILE.py:FUNCTION "
                           "returning {'train': loader, 'val': loader, 'test': loader}")
    auto.add_argument("--target", required=True, metavar="KIND=RATIO",
                      help="size=50 (50x smaller file), macs=2 or latency=1.5")
    auto.add_argument("--max-drop", type=float, required=True, metavar="PTS",
                      help="allowed accuracy drop in percentage points (validation)")
    auto.add_argument("--out", required=True,
                      help="output folder; a rerun reuses finished trials of the same recipes")
    auto.add_argument("--trials", type=int, default=4, help="candidate policies to score")
    auto.add_argument("--epochs", type=int, default=2, help="training epochs per trial")
    auto.add_argument("--final-epochs", type=int, default=None,
                      help="epochs for the chosen policy's final run (default: --epochs)")
    auto.add_argument("--workers", type=int, default=None, metavar="N",
                      help="score N trials at once as Ray tasks (pip install 'torchslim[ray]')")
    auto.add_argument("--ray-address", default=None, metavar="ADDR",
                      help="run the scan and the trials on an existing Ray cluster")
    auto.add_argument("--no-progress", action="store_true")
    auto.set_defaults(func=cmd_auto)

    train = commands.add_parser("train", help="train a registered model on a dataset",
                                description="Train a model; writes OUT/model.slim, "
                                "OUT/report.json (test_accuracy, ...), report.md and plots.",
                                epilog=EPILOG_MODELS)
    train.add_argument("--model", required=True, metavar="SPEC",
                       help=f"a registered model ({', '.join(MODEL_NAMES)}) or your own: "
                            "FILE.py:FUNCTION / package.module:FUNCTION / an artifact")
    _add_factory_option(train)
    train.add_argument("--dataset", metavar="DATASET",
                       help=f"default: the model's own; {', '.join(DATASET_NAMES)}, or FILE.py:FUNCTION "
                            "returning {'train': loader, 'val': loader, 'test': loader}")
    train.add_argument("--pretrained", action="store_true", help="start from shipped weights")
    train.add_argument("--out", required=True, help="output folder")
    _add_train_options(train)
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser(
        "evaluate", help="accuracy, params, bytes and FLOPs of a model",
        description="Measure an artifact (or a registered model's shipped weights); a language model, "
        "or a folder written by `export --format genai`, on a text dataset: perplexity.")
    _add_model_argument(evaluate)
    evaluate.add_argument("--dataset", metavar="DATASET",
                          help=f"dataset for accuracy: {', '.join(DATASET_NAMES)}, or FILE.py:FUNCTION "
                               "/ package.module:FUNCTION returning {'train': loader, 'val': loader, "
                               "'test': loader}")
    evaluate.add_argument("--split", default="test", choices=["train", "val", "test"])
    evaluate.add_argument("--max-tokens", type=int, default=0,
                          help="text datasets: score only the first N held-out tokens (0: all)")
    evaluate.add_argument("--batch-size", type=int, default=500)
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(func=cmd_evaluate)

    bench = commands.add_parser("bench", help="latency and throughput of a model",
                                description="Time the forward pass on the model's own input "
                                "shape: warm-up, repeated runs, median and p90. A language model (or a "
                                "folder written by `export --format genai`, decoded by onnxruntime-genai): "
                                "greedy decoding at batch 1, tokens/s.")
    _add_model_argument(bench)
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--threads", type=int, help="intra-op threads (default: all)")
    bench.add_argument("--warmup", type=int, default=10)
    bench.add_argument("--repeats", type=int, default=50)
    bench.add_argument("--onnxruntime", action="store_true",
                       help="run a float model as its ONNX program on onnxruntime, the CPU runtime "
                            "it may be deployed with (int8 artifacts always run there)")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.set_defaults(func=cmd_bench)

    export = commands.add_parser(
        "export", help="write a model as ONNX or a torch.export program (.pt2)",
        description="Export a float result (pruned, factorized, clustered) to ONNX or torch.export, "
        "checked against the module on its recorded inputs; an int8 model's ONNX program is written "
        "as is.")
    _add_model_argument(export)
    export.add_argument("--format", default="onnx", choices=["onnx", "pt2", "hf", "genai"],
                        help="onnx (one tensor input), pt2 (torch.export), hf (a save_pretrained "
                             "folder; Hugging Face models), genai (an onnxruntime-genai folder: a causal "
                             "LM's whole decoding step, int4 codes on MatMulNBits)")
    export.add_argument("--tokenizer", default=None,
                        help="genai: the model's tokenizer folder (default: the tokenizer of a model "
                             "loaded by name, e.g. smollm2-135m)")
    export.add_argument("--out", required=True, help="the file or folder to write")
    export.set_defaults(func=cmd_export, out_is_file=True)
    for command in commands.choices.values():  # `torchslim demo --quiet` as well as `torchslim -q demo`
        command.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                             help=QUIET_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `torchslim` command."""
    for stream in (sys.stdout, sys.stderr):  # paths that are not UTF-8 must not crash a print
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:
        args.no_progress = True
    import torchslim  # help and argument errors above never import torch; the commands do
    from torchslim.progress import set_quiet

    torchslim.load_public_surface()
    set_quiet(args.quiet)  # for this command only: main() may be called again in the same process
    try:
        if getattr(args, "out", None):
            from torchslim.apps.run_folder import check_writable_folder

            out = Path(args.out)
            check_writable_folder(out.parent if getattr(args, "out_is_file", False) else out)
        code: int = args.func(args)
        return code
    except SlimError as exc:
        print(f"torchslim: error: {exc}", file=sys.stderr)
        return 2
    finally:
        set_quiet(False)


if __name__ == "__main__":
    sys.exit(main())
