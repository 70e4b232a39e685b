"""Small Gluon models trained on scikit-learn's digits, shared by the inc-mxnet tests.

Each model is trained once per test process (a real Gluon training loop with ``gluon.Trainer``) and
every call returns a fresh block loaded with those weights, so a test that changed a model could
not leak into another.
"""

from __future__ import annotations

import functools

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from mxnet.gluon import nn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

__all__ = ["accuracy", "cnn", "digits", "predict", "resnet_block_net"]


@functools.lru_cache(maxsize=1)
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, x_test, y_train, y_test): 8x8 images as float32 NCHW in [0, 1], int labels."""
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None, :, :]
    y = data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    return x_train, x_test, y_train, y_test


def _cnn_layers() -> nn.HybridSequential:
    net = nn.HybridSequential(prefix="cnn_")
    with net.name_scope():
        net.add(
            nn.Conv2D(16, 3, padding=1, use_bias=False),
            nn.BatchNorm(),
            nn.Activation("relu"),
            nn.Conv2D(32, 3, padding=1, activation="relu"),
            nn.MaxPool2D(2),
            nn.Flatten(),
            nn.Dense(64, activation="relu"),
            nn.Dense(10),
        )
    return net


class ResidualNet(gluon.HybridBlock):
    """conv+bn+relu, a residual conv whose sum oneDNN fuses into the conv, then a classifier."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            self.stem = nn.Conv2D(16, 3, padding=1, use_bias=False)
            self.bn = nn.BatchNorm()
            self.body = nn.Conv2D(16, 3, padding=1)
            self.pool = nn.GlobalAvgPool2D()
            self.fc = nn.Dense(10)

    def hybrid_forward(self, F, x):  # noqa: ANN001, ANN201, N803 - Gluon's signature
        y = F.Activation(self.bn(self.stem(x)), act_type="relu")
        z = F.Activation(self.body(y) + y, act_type="relu")
        return self.fc(self.pool(z))


def _train(net: gluon.HybridBlock, epochs: int, seed: int) -> dict[str, np.ndarray]:
    mx.random.seed(seed)
    np.random.seed(seed)
    net.initialize(mx.init.Xavier(), ctx=mx.cpu())
    net.hybridize()
    x_train, _, y_train, _ = digits()
    loader = gluon.data.DataLoader(gluon.data.ArrayDataset(x_train, y_train.astype(np.float32)), batch_size=32, shuffle=True)
    trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": 3e-3})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for _ in range(epochs):
        for xb, yb in loader:
            with autograd.record():
                loss = loss_fn(net(xb), yb)
            loss.backward()
            trainer.step(xb.shape[0])
    return {name: p.data().asnumpy() for name, p in net.collect_params().items()}


@functools.cache
def _trained(kind: str) -> dict[str, np.ndarray]:
    return _train(_fresh(kind), epochs=12, seed=0)


def _fresh(kind: str) -> gluon.HybridBlock:
    return _cnn_layers() if kind == "cnn" else ResidualNet(prefix="res_")


def _load(kind: str) -> gluon.HybridBlock:
    net = _fresh(kind)
    weights = _trained(kind)
    net.initialize(ctx=mx.cpu())
    net(mx.nd.zeros((1, 1, 8, 8)))  # completes Gluon's deferred shape inference
    for name, p in net.collect_params().items():
        p.set_data(mx.nd.array(weights[name]))
    return net


def cnn() -> nn.HybridSequential:
    """A trained conv+bn+relu / conv+relu / pool / fc+relu / fc digits classifier (not hybridized)."""
    return _load("cnn")


def resnet_block_net() -> gluon.HybridBlock:
    """A trained digits classifier with a residual sum (conv + add fusion)."""
    return _load("res")


def predict(model: gluon.Block, x: np.ndarray) -> np.ndarray:
    """Logits of ``model`` on ``x`` (in batches of 128)."""
    outs = [model(mx.nd.array(x[i : i + 128])).asnumpy() for i in range(0, len(x), 128)]
    return np.concatenate(outs)


def accuracy(model: gluon.Block, x: np.ndarray, y: np.ndarray) -> float:
    return float((predict(model, x).argmax(axis=1) == y).mean())
