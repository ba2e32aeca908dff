"""Int8 quantization on real kernels, against fp32 and the other int8 paths, in one run.

For each model: fp32 PyTorch eager, fp32 on ONNX Runtime (so the runtime's own gain shows apart
from quantization's), torchslim int8 (static and/or dynamic, executed by onnxruntime's integer
kernels), and the alternatives a user would reach for: `torch.ao` `quantize_dynamic`
(deprecated), onnxruntime's quantizers with their default settings, and torchao int8 dynamic
(`pip install torchao`, optional). Latency: medians over repeats at 2 threads and 1 thread,
ratios against fp32 eager measured in the same run. Accuracy on the test split (CNNs), UCI
probe and embedding cosine (MiniLM), top-1 agreement / SQNR / KL on crops of the two photos
scikit-learn ships (MobileNetV2; no ImageNet images exist here). Calibration uses training data
only (MobileNetV2: crops disjoint from the evaluation crops).

Run: `python bench/quantization.py --out runs/bench-quantization [--only lenet5 resnet minilm mobilenet]`
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
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
from torchslim.quantization.runtime import OrtModule, export_onnx, quantize_onnx

Candidate = tuple[str, Callable[[], nn.Module]]


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

    def quality(candidate: nn.Module) -> dict[str, Any]:
        embeddings = embed_texts(candidate, texts)
        cosine = torch.nn.functional.cosine_similarity(embeddings, reference).mean()
        return {"probe_accuracy": round(probe_accuracy(embeddings, torch.from_numpy(labels)), 4),
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


def lowbit_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Binary / ternary LeNet-300-100 on MNIST, fine-tuned from the fp32 model with distillation."""
    from torchslim.distillation import DistillationLoss
    from torchslim.quantization import LowBit, finalize_lowbit_
    from torchslim.training import Trainer, make_train_config

    teacher = ts.load(args.lenet300).eval()
    data = load_dataset("mnist", seed=0)
    train = TensorLoader(data.train, batch_size=128, shuffle=True, seed=0)
    val, test = TensorLoader(data.val, batch_size=1000), TensorLoader(data.test, batch_size=1000)
    rows = [{"section": "lowbit", "model": "lenet300 fp32",
             "test_accuracy": evaluate(teacher, test)["accuracy"],
             "val_accuracy": evaluate(teacher, val)["accuracy"],
             "bytes": ts.save(teacher, args.out / "lenet300-fp32.slim").stat().st_size}]
    print(json.dumps(rows[-1]), flush=True)
    variants = [("binary weights, all layers", "binary", False, ()),
                ("binary weights, fc3 kept fp32", "binary", False, ("fc3",)),
                ("ternary weights, all layers", "ternary", False, ()),
                ("ternary weights, fc3 kept fp32", "ternary", False, ("fc3",)),
                ("XNOR: binary weights and hidden activations (hardtanh)", "binary", True, ())]
    for name, mode, activations, keep in variants:
        torch.manual_seed(0)
        student = copy.deepcopy(teacher)
        layers = tuple(n for n in ("fc1", "fc2", "fc3") if n not in keep)
        if activations:  # hidden activations (the inputs of fc2 and fc3) binarized too
            # sign() of a ReLU output is always +1: a 1W1A net needs signed hidden units, so
            # the ReLU becomes a hardtanh, as in BinaryNet (Courbariaux et al. 2016).
            student.relu = nn.Hardtanh()
            ts.apply_(student, LowBit(mode=mode), targets=ts.Select(names=("fc1",)))
            ts.apply_(student, LowBit(mode=mode, activations=True),
                      targets=ts.Select(names=("fc2", "fc3")))
        else:
            ts.apply_(student, LowBit(mode=mode), targets=ts.Select(names=layers))
        config = make_train_config(epochs=args.lowbit_epochs, batch_size=128, optimizer="adam",
                                   lr=1e-3, schedule="cosine", weight_decay=0.0, seed=0)
        start = time.perf_counter()
        Trainer(student, train, config=config, val_loader=val, progress=False,
                loss=DistillationLoss(teacher, temperature=4.0, alpha=0.5)).fit()
        finalize_lowbit_(student)
        path = ts.save(student, args.out / f"lenet300-{mode}{'-xnor' if activations else ''}"
                       f"{'-' + '-'.join(keep) if keep else ''}.slim", encoding=ts.Encoding())
        rows.append({"section": "lowbit", "model": name,
                     "test_accuracy": evaluate(student, test)["accuracy"],
                     "val_accuracy": evaluate(student, val)["accuracy"], "bytes": path.stat().st_size,
                     "bytes_ratio": round(rows[0]["bytes"] / path.stat().st_size, 1),
                     "train_minutes": round((time.perf_counter() - start) / 60, 2)})
        print(json.dumps(rows[-1]), flush=True)
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
    parser.add_argument("--lowbit-epochs", type=int, default=15)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for name in args.only or list(SECTIONS):
        rows += SECTIONS[name](args)
        (args.out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
