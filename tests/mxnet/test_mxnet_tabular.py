"""A Gluon tabular net whose first layer is a BatchNorm over raw features (scikit-learn's breast-cancer data).

The features' scales run from 0.001 to 4,000. MXNet's pass quantized the BatchNorm, whose INT8 kernel reads them
through one per-tensor scale and rounds the small ones to zero (accuracy 0.953 -> 0.643, output cosine 0.25). A
BatchNorm that reads a model input stays FP32; the Dense layers after it run INT8.
"""

from __future__ import annotations

import functools

import mxnet as mx
import numpy as np
from conftest import graph_nodes
from mxnet import autograd, gluon, nd
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

import inc_core as inc
from inc_core.testing import cosine


@functools.cache
def _data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_breast_cancer(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x.astype(np.float32), y, test_size=0.3, random_state=0, stratify=y)
    return x_train, x_test, y_train, y_test


@functools.cache
def _trained() -> gluon.HybridBlock:
    mx.random.seed(0)
    np.random.seed(0)
    x_train, _, y_train, _ = _data()
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.BatchNorm(), gluon.nn.Dense(64, activation="relu"), gluon.nn.Dense(2))
    net.initialize(mx.init.Xavier())
    net.hybridize()
    trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": 3e-3})
    loss = gluon.loss.SoftmaxCrossEntropyLoss()
    for _ in range(60):
        for i in range(0, len(x_train), 32):
            with autograd.record():
                batch_loss = loss(net(nd.array(x_train[i : i + 32])), nd.array(y_train[i : i + 32]))
            batch_loss.backward()
            trainer.step(len(x_train[i : i + 32]))
    return net


def test_batch_norm_on_raw_features_stays_fp32_and_accuracy_holds() -> None:
    net = _trained()
    x_train, x_test, _, y_test = _data()
    fp32 = net(nd.array(x_test)).asnumpy()
    quantized = inc.quantize(net, inc.QuantConfig(), dataset=inc.Dataset(x_train[:256], batch_size=32))
    outputs = quantized(nd.array(x_test)).asnumpy()
    ops = [node["op"] for node in graph_nodes(quantized)]
    assert "BatchNorm" in ops and not any("quantized_batch_norm" in op for op in ops), ops
    assert any(op.startswith("_sg_mkldnn_fully_connected") for op in ops), ops
    assert cosine(fp32, outputs) >= 0.99
    assert np.mean(outputs.argmax(1) == y_test) >= np.mean(fp32.argmax(1) == y_test) - 0.01
