"""Int8 quantization on real kernels, against fp32 and the other int8 paths, in one run.

For each model: fp32 PyTorch eager, fp32 on ONNX Runtime (so the runtime's own gain shows apart
from quantization's), torchslim int8 (static and/or dynamic, executed by onnxruntime's integer
kernels), and the alternatives a user would reach for: `torch.ao` `quantize_dynamic`
(deprecated), onnxruntime's quantizers with their default settings, and torchao int8 dynamic
(`pip install torchao`, optional). Latency: medians over repeats at 2 threads and 1 thread,
ratios against fp32 eager measured in the same run. Accuracy on the test split (CNNs), UCI
probe and embedding cosine (MiniLM: the probe's accuracy on the first split into 5 folds, its
mean over 10 splits, and the loss against fp32 split by split, mean and min-max), top-1
agreement / SQNR / KL on crops of the two photos scikit-learn ships (MobileNetV2; no ImageNet
images exist here). Calibration uses training data only (MobileNetV2: crops disjoint from the
evaluation crops).

Binary / ternary LeNet-300-100 (`--only lowbit`): each mode is trained with every setting of a
small grid (random shifts x distillation weight); the validation split carved from the training
set picks the setting and the epoch, and only the chosen model is evaluated on the test split.

Run: `python bench/quantization.py --out runs/bench-quantization
     [--only lenet5 resnet minilm mobilenet lowbit]`
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import torchslim as ts
from torchslim.data import TensorLoader, load_dataset
from torchslim.measure import evaluate, measure_latency
from torchslim.quantization import Quantization, quantize_model, sqnr_db
from torchslim.quantization.ptq import float_program
from torchslim.runtime.onnx_program import OrtModule, export_onnx, quantize_onnx

Candidate = tuple[str, Callable[[], nn.Module]]
PROBE_SPLITS = 10  # MiniLM's probe: mean over this many splits into 5 folds (one split's luck
# moves the accuracy as much as int8 does; see `probe_accuracy`)


def torch_ao_dynamic(model: nn.Module) -> nn.Module:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear},
                                                      dtype=torch.qint8)


def torchao_dynamic(model: nn.Module) -> nn.Module:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    clone = copy.deepcopy(model)
    quantize_(clone, Int8DynamicActivationInt8WeightConfig())
    return clone


def ort_defaults(model: nn.Module, example: torch.Tensor, method: str,
                 calibration: list[torch.Tensor] | None) -> nn.Module:
    program, _ = quantize_onnx(export_onnx(model, example), method=method, calibration=calibration,
                               per_channel=False)
    return OrtModule(program)


def candidates(model: nn.Module, example: torch.Tensor, calibration: list[torch.Tensor] | None,
               methods: tuple[str, ...], calibrates: tuple[str, ...] = ()) -> list[Candidate]:
    items: list[Candidate] = [
        ("fp32 eager (torch)", lambda: model),
        ("fp32 onnxruntime (same graph optimisations as int8)", lambda: float_program(model, example)),
    ]
    for method in methods:
        items.append((f"torchslim int8 {method} (onnxruntime, per-channel)",
                      lambda m=method: quantize_model(model, Quantization(method=m),
                                                      example_inputs=example,
                                                      calibration=calibration)))
        items.append((f"onnxruntime quantize_{method}, default settings",
                      lambda m=method: ort_defaults(model, example, m, calibration)))
    for calibrate in calibrates:  # other activation-range choices for static
        items.append((f"torchslim int8 static calibrate={calibrate}",
                      lambda c=calibrate: quantize_model(
                          model, Quantization(method="static", calibrate=c),
                          example_inputs=example, calibration=calibration)))
    if "dynamic" in methods:
        items.append(("torchslim int8 dynamic (torch._int_mm backend)",
                      lambda: quantize_model(model, Quantization(backend="torch"),
                                             example_inputs=example)))
    items.append(("torch.ao quantize_dynamic (deprecated)", lambda: torch_ao_dynamic(model)))
    items.append(("torchao Int8DynamicActivationInt8Weight", lambda: torchao_dynamic(model)))
    return items


def timings(model: nn.Module, inputs: dict[str, torch.Tensor], repeats: int) -> dict[str, float]:
    result = {}
    for threads in (2, 1):
        for label, x in inputs.items():
            result[f"{label}_t{threads}_ms"] = measure_latency(
                model, x, threads=threads, repeats=repeats, warmup=3).median_ms
    return result


def run_section(section: str, model: nn.Module, example: torch.Tensor,
                calibration: list[torch.Tensor] | None, methods: tuple[str, ...],
                inputs: dict[str, torch.Tensor], quality: Callable[[nn.Module], dict[str, Any]],
                out: Path, repeats: int, calibrates: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    baseline: dict[str, float] = {}
    for name, build in candidates(model, example, calibration, methods, calibrates):
        try:
            start = time.perf_counter()
            built = build()
            seconds = time.perf_counter() - start
            row: dict[str, Any] = {"section": section, "model": name,
                                   "convert_s": round(seconds, 1), **quality(built)}
            times = timings(built, inputs, repeats)
        except Exception as exc:  # a competitor failing is a result, not a crash
            rows.append({"section": section, "model": name, "error": f"{type(exc).__name__}: "
                         f"{str(exc)[:160]}"})
            print(json.dumps(rows[-1]), flush=True)
            continue
        if not baseline:
            baseline = times
        for key, value in times.items():
            row[key] = round(value, 2)
            row[key.replace("_ms", "_speedup")] = round(baseline[key] / value, 2)
        if name.startswith("torchslim"):
            tag = name.split()[2] + ("-torch" if "torch._int_mm" in name else "") + (
                "-" + name.split("=")[1] if "calibrate=" in name else "")
            path = ts.save(built, out / f"{section}-{tag}.slim")
            row["bytes"] = path.stat().st_size
            row["int8_ops"] = built.report["int8_ops"]
            row["float_ops"] = len(built.report["float_ops"])
        elif name.startswith("fp32 eager"):
            row["bytes"] = ts.save(model, out / f"{section}-fp32.slim").stat().st_size
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# ---------------------------------------------------------------------------- sections
def cnn_section(name: str, artifact: str, dataset: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    model = ts.load(artifact)
    data = load_dataset(dataset, seed=0)
    loader = TensorLoader(data.train, batch_size=64, shuffle=True, seed=0)
    calibration = [x for _, (x, _) in zip(range(8), loader, strict=False)]
    test = TensorLoader(data.test, batch_size=500)

    def quality(candidate: nn.Module) -> dict[str, Any]:
        return {"test_accuracy": round(evaluate(candidate, test)["accuracy"], 4)}

    inputs = {"b1": data.test.images[:1], "b64": data.test.images[:64]}
    return run_section(name, model, data.test.images[:2], calibration, ("static",), inputs,
                       quality, args.out, args.repeats)


def minilm_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    from torchslim.data.sentences import read_uci_sentences
    from torchslim.measure import probe_accuracy
    from torchslim.models import create_model, example_inputs, spec_of
    from torchslim.models.minilm import embed_texts

    model = create_model("minilm").eval()
    texts, labels = read_uci_sentences()
    reference = embed_texts(model, texts)

    targets = torch.from_numpy(labels)
    float_splits = [probe_accuracy(reference, targets, seed=s) for s in range(PROBE_SPLITS)]

    def quality(candidate: nn.Module) -> dict[str, Any]:
        embeddings = embed_texts(candidate, texts)
        cosine = torch.nn.functional.cosine_similarity(embeddings, reference).mean()
        splits = [probe_accuracy(embeddings, targets, seed=s) for s in range(PROBE_SPLITS)]
        losses = [100 * (f - c) for f, c in zip(float_splits, splits, strict=True)]
        return {"probe_accuracy": round(splits[0], 4),  # the first split, as reported before
                f"probe_accuracy_{PROBE_SPLITS}_splits": round(sum(splits) / PROBE_SPLITS, 4),
                "probe_loss_pt": round(sum(losses) / PROBE_SPLITS, 2),
                "probe_loss_pt_range": [round(min(losses), 2), round(max(losses), 2)],
                "cosine_to_fp32": round(float(cosine), 4)}

    spec = spec_of(model)
    inputs = {"b1_seq128": example_inputs(spec, 1), "b32_seq128": example_inputs(spec, 32)}
    return run_section("minilm", model, example_inputs(spec, 2), None, ("dynamic",), inputs,
                       quality, args.out, max(5, args.repeats // 4))


def photo_crops(count: int, seed: int) -> torch.Tensor:
    """Random 224x224 crops (with flips) of scikit-learn's two sample photos, ImageNet-normalised."""
    from sklearn.datasets import load_sample_images

    photos = [torch.from_numpy(np.asarray(img)).permute(2, 0, 1).float() / 255
              for img in load_sample_images().images]  # (3, 427, 640)
    generator = torch.Generator().manual_seed(seed)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    crops = []
    for _ in range(count):
        photo = photos[int(torch.randint(0, len(photos), (1,), generator=generator))]
        size = int(torch.randint(224, 400, (1,), generator=generator))
        top = int(torch.randint(0, photo.shape[1] - size + 1, (1,), generator=generator))
        left = int(torch.randint(0, photo.shape[2] - size + 1, (1,), generator=generator))
        crop = torch.nn.functional.interpolate(photo[None, :, top:top + size, left:left + size],
                                               size=(224, 224), mode="bilinear", antialias=True)[0]
        if bool(torch.rand(1, generator=generator) < 0.5):
            crop = crop.flip(-1)
        crops.append((crop - mean) / std)
    return torch.stack(crops)


def mobilenet_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    from torchslim.models import create_model

    model = create_model("mobilenet-v2").eval()
    calibration = list(photo_crops(64, seed=0).split(16))
    evaluation = photo_crops(64, seed=1)
    with torch.no_grad():
        reference = model(evaluation)

    def quality(candidate: nn.Module) -> dict[str, Any]:
        with torch.no_grad():
            logits = torch.cat([candidate(x) for x in evaluation.split(16)])
        kl = torch.nn.functional.kl_div(logits.log_softmax(1), reference.log_softmax(1),
                                        log_target=True, reduction="batchmean")
        return {"top1_agreement": round(float((logits.argmax(1) == reference.argmax(1)).float().mean()), 4),
                "sqnr_db": round(sqnr_db(reference, logits), 1), "kl_to_fp32": round(float(kl), 4)}

    inputs = {"b1": evaluation[:1], "b16": evaluation[:16]}
    return run_section("mobilenet-v2", model, evaluation[:2], calibration, ("static",), inputs,
                       quality, args.out, max(5, args.repeats // 2),
                       calibrates=("entropy", "percentile"))


# ---------------------------------------------------------------------------- low-bit LeNet-300-100
LOWBIT_LAYERS = ("fc1", "fc2", "fc3")


def shift_images(images: torch.Tensor, shift: int, background: float,
                 generator: torch.Generator) -> torch.Tensor:
    """Each image moved by its own random (dy, dx) in [-shift, shift], uncovered pixels filled
    with the background value."""
    if shift == 0:
        return images
    batch, _, height, width = images.shape  # (B, 1, H, W)
    padded = nn.functional.pad(images[:, 0], (shift,) * 4, value=background)  # (B, H+2s, W+2s)
    dy, dx = (torch.randint(0, 2 * shift + 1, (batch,), generator=generator) for _ in range(2))
    rows = dy[:, None, None] + torch.arange(height)[None, :, None]  # (B, H, 1)
    cols = dx[:, None, None] + torch.arange(width)[None, None, :]  # (B, 1, W)
    return padded[torch.arange(batch)[:, None, None], rows, cols][:, None]  # (B, 1, H, W)


class ShiftedLoader(TensorLoader):
    """Shuffled training batches whose images are moved by up to `shift` pixels.

    Why: LeNet-300-100 is fully connected, so nothing in it is translation invariant; the fp32
    model fits its training split to 100% and falls to 83% on validation digits moved by 2
    pixels. Random moves are the usual remedy. The moves of epoch e depend only on (seed, e),
    like the shuffle order, so runs are reproducible.
    """

    def __init__(self, split: Any, *, shift: int, background: float, batch_size: int,
                 seed: int) -> None:
        super().__init__(split, batch_size=batch_size, shuffle=True, seed=seed)
        self.shift, self.background = shift, background

    def __iter__(self) -> Any:
        generator = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        for images, labels in super().__iter__():
            yield shift_images(images, self.shift, self.background, generator), labels


@dataclass(frozen=True)
class LowBitSetting:
    """One candidate training recipe of a low-bit student; the validation split picks one."""

    shift: int  # pixels of random translation of the training images (0: none)
    alpha: float  # weight of the hard-label loss; 1.0 is plain cross-entropy, no teacher

    def label(self) -> str:
        teacher = "no distillation" if self.alpha == 1.0 else f"distillation T=4 alpha={self.alpha}"
        return f"shift={self.shift}px, {teacher}"


@dataclass(frozen=True)
class Trained:
    student: nn.Module
    setting: LowBitSetting
    best: Any  # the EpochRecord of the restored (best validation) epoch
    minutes: float


def train_lowbit(teacher: nn.Module, data: Any, *, mode: str, activations: bool,
                 setting: LowBitSetting, epochs: int) -> Trained:
    """Fine-tune a copy of the fp32 teacher with binary/ternary weights on every layer; keep
    the epoch with the best validation accuracy (the test split is not looked at here)."""
    from torchslim.distillation import DistillationLoss
    from torchslim.quantization import LowBit
    from torchslim.training import CrossEntropy, Trainer, make_train_config

    torch.manual_seed(0)
    student = copy.deepcopy(teacher)
    if activations:  # hidden activations (the inputs of fc2 and fc3) binarized too
        # sign() of a ReLU output is always +1: a 1W1A net needs signed hidden units, so
        # the ReLU becomes a hardtanh, as in BinaryNet (Courbariaux et al. 2016).
        student.relu = nn.Hardtanh()
        ts.apply_(student, LowBit(mode=mode), targets=ts.Select(names=LOWBIT_LAYERS[:1]))
        ts.apply_(student, LowBit(mode=mode, activations=True),
                  targets=ts.Select(names=LOWBIT_LAYERS[1:]))
    else:
        ts.apply_(student, LowBit(mode=mode), targets=ts.Select(names=LOWBIT_LAYERS))
    train = ShiftedLoader(data.train, shift=setting.shift, background=-data.mean / data.std,
                          batch_size=128, seed=0)
    # patience = epochs: never stops early, but restores the best-validation epoch at the end.
    config = make_train_config(epochs=epochs, batch_size=128, optimizer="adam", lr=1e-3,
                               schedule="cosine", weight_decay=0.0, seed=0,
                               early_stopping_patience=epochs)
    loss = CrossEntropy() if setting.alpha == 1.0 else DistillationLoss(
        teacher, temperature=4.0, alpha=setting.alpha)
    start = time.perf_counter()
    history = Trainer(student, train, config=config, val_loader=TensorLoader(data.val, batch_size=1000),
                      progress=False, loss=loss).fit()
    best = max(history, key=lambda record: record.val_accuracy or 0.0)  # first of equals, as restored
    return Trained(student, setting, best, (time.perf_counter() - start) / 60)


def lowbit_row(trained: Trained, name: str, file: str, test: TensorLoader, fp32_bytes: int,
               out: Path, choice: str) -> dict[str, Any]:
    """Finalize (codes + scales), save packed, and evaluate on the test split: once, for the
    configuration the validation split chose."""
    from torchslim.quantization import finalize_lowbit_

    finalize_lowbit_(trained.student)
    size = ts.save(trained.student, out / file, encoding=ts.Encoding()).stat().st_size
    row = {"section": "lowbit", "model": name, "setting": trained.setting.label(), "chosen_by": choice,
           "val_accuracy": trained.best.val_accuracy, "best_epoch": trained.best.epoch + 1,
           "test_accuracy": evaluate(trained.student, test)["accuracy"], "bytes": size,
           "bytes_ratio": round(fp32_bytes / size, 1), "train_minutes": round(trained.minutes, 2)}
    print(json.dumps(row), flush=True)
    return row


def select_lowbit(teacher: nn.Module, data: Any, mode: str, grid: list[LowBitSetting],
                  epochs: int, rows: list[dict[str, Any]]) -> Trained:
    """Train one student per setting; the best validation accuracy wins (ties: the earlier)."""
    trials = []
    for setting in grid:
        trials.append(train_lowbit(teacher, data, mode=mode, activations=False, setting=setting,
                                   epochs=epochs))
        rows.append({"section": "lowbit-selection", "model": f"{mode} weights, all layers",
                     "setting": setting.label(), "val_accuracy": trials[-1].best.val_accuracy,
                     "best_epoch": trials[-1].best.epoch + 1,
                     "train_minutes": round(trials[-1].minutes, 2)})
        print(json.dumps(rows[-1]), flush=True)
    chosen = max(trials, key=lambda trial: trial.best.val_accuracy or 0.0)
    print(f"lowbit {mode}: chose [{chosen.setting.label()}] with val accuracy "
          f"{chosen.best.val_accuracy:.4f} (best of {len(grid)} settings, epoch "
          f"{chosen.best.epoch + 1}/{epochs}); its test accuracy follows", flush=True)
    return chosen


def lowbit_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Binary / ternary LeNet-300-100 on MNIST, fine-tuned from the fp32 model.

    Every choice (training recipe from the grid, epoch) is made on the validation split carved
    from the training set; the test split is evaluated once per reported model, at the end.
    """
    # Measured on the 2-core machine, seconds per epoch: one thread 3.3 whether or not another
    # process is busy; two threads 2.3 when idle but 50-77 when the other core is taken.
    torch.set_num_threads(args.lowbit_threads)
    teacher = ts.load(args.lenet300).eval()
    data = load_dataset("mnist", seed=0)
    val, test = TensorLoader(data.val, batch_size=1000), TensorLoader(data.test, batch_size=1000)
    rows = [{"section": "lowbit", "model": "lenet300 fp32 (teacher)",
             "test_accuracy": evaluate(teacher, test)["accuracy"],
             "val_accuracy": evaluate(teacher, val)["accuracy"],
             "bytes": ts.save(teacher, args.out / "lenet300-fp32.slim").stat().st_size}]
    print(json.dumps(rows[-1]), flush=True)
    grid = [LowBitSetting(shift=s, alpha=a) for s in args.lowbit_shifts for a in args.lowbit_alphas]
    choice = f"validation accuracy, best of {len(grid)} settings x {args.lowbit_epochs} epochs"
    chosen = {}
    for mode in ("binary", "ternary"):
        chosen[mode] = select_lowbit(teacher, data, mode, grid, args.lowbit_epochs, rows)
        rows.append(lowbit_row(chosen[mode], f"{mode} weights, all layers", f"lenet300-{mode}.slim",
                               test, rows[0]["bytes"], args.out, choice))
    xnor = train_lowbit(teacher, data, mode="binary", activations=True,
                        setting=chosen["binary"].setting, epochs=args.lowbit_epochs)
    rows.append(lowbit_row(xnor, "XNOR: binary weights and hidden activations (hardtanh)",
                           "lenet300-binary-xnor.slim", test, rows[0]["bytes"], args.out,
                           f"the binary-weight choice; best of {args.lowbit_epochs} epochs on validation"))
    return rows


SECTIONS: dict[str, Callable[[argparse.Namespace], list[dict[str, Any]]]] = {
    "lenet5": lambda a: cnn_section("lenet5", a.lenet5, "mnist", a),
    "resnet": lambda a: cnn_section("resnet-small", a.resnet, "fashion-mnist", a),
    "minilm": minilm_section,
    "mobilenet": mobilenet_section,
    "lowbit": lowbit_section,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-quantization"))
    parser.add_argument("--only", nargs="*", choices=sorted(SECTIONS))
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--lenet5", default="runs/bench-foundation/lenet5/model.slim")
    parser.add_argument("--resnet", default="runs/bench-foundation/resnet-small/model.slim")
    parser.add_argument("--lenet300", default="runs/bench-foundation/lenet300/model.slim")
    parser.add_argument("--lowbit-epochs", type=int, default=30)
    parser.add_argument("--lowbit-threads", type=int, default=1, help="threads for low-bit training")
    parser.add_argument("--lowbit-shifts", type=int, nargs="+", default=[0, 2],
                        help="random-shift pixels tried for the low-bit students (chosen on val)")
    parser.add_argument("--lowbit-alphas", type=float, nargs="+", default=[0.5, 1.0],
                        help="hard-label weights tried (1.0: no distillation; chosen on val)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for name in args.only or list(SECTIONS):
        rows += SECTIONS[name](args)
        (args.out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
