"""Embedding tables become 8 bits per row: torch.ao's quantized lookups with format='fx' and approach='dynamic',
inc's own 8-bit row lookups in the PT2E graph (nn.Embedding; bags stay FP32 there).

The model is trained on scikit-learn's digits as a bag of tokens: each pixel's (position, ink level) pair (five
levels) is one row of an EmbeddingBag (or an Embedding summed over the pixels, for PT2E), as a recommender looks up
its sparse features. Most of its size is the table.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import inc_core as inc
import inc_torch
from inc_core._registry import resolve_backend

LEVELS = 5  # digits' ink levels 0..16, rounded to five
PIXELS = 64
DIM = 64
CONFIGS = [inc.QuantConfig(format="fx"), inc.QuantConfig(approach="dynamic")]
IDS = ["fx", "dynamic"]


class BagOfPixels(nn.Module):
    def __init__(self, *, bag: bool = True) -> None:
        super().__init__()
        self.bag = bag
        self.pixels = nn.EmbeddingBag(PIXELS * LEVELS, DIM, mode="sum") if bag else nn.Embedding(PIXELS * LEVELS, DIM)
        self.classify = nn.Sequential(nn.Linear(DIM, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.classify(self.pixels(tokens) if self.bag else self.pixels(tokens).sum(1))


def _tokens(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.arange(PIXELS) * LEVELS + (images * (LEVELS - 1) / 16).round().astype(np.int64))


def _train(*, bag: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    digits = load_digits()
    order = np.random.RandomState(0).permutation(len(digits.target))  # the file is ordered by writer
    tokens, labels = _tokens(digits.data[order]), torch.from_numpy(digits.target[order])
    train, test = slice(0, 1400), slice(1400, None)
    torch.manual_seed(0)
    model = BagOfPixels(bag=bag)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(15):
        for start in range(0, 1400, 64):
            batch = slice(start, min(start + 64, 1400))
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(tokens[train][batch]), labels[train][batch]).backward()
            optimizer.step()
    return model.eval(), tokens[train], tokens[test], labels[test]


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _train(bag=True)


@pytest.fixture(scope="module")
def trained_embedding() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _train(bag=False)


def _accuracy(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(tokens).argmax(1) == labels).float().mean())


@pytest.mark.parametrize("config", [*CONFIGS, inc.QuantConfig()], ids=[*IDS, "pt2e"])
def test_a_trained_bag_model_keeps_its_accuracy_with_an_int8_table_in_a_smaller_file(
    trained, trained_embedding, config, tmp_path: Path
):
    pt2e = config.format == "default" and config.approach == "static"
    model, train, test, labels = trained_embedding if pt2e else trained
    fp32 = _accuracy(model, test, labels)
    assert fp32 > 0.9
    quantized = inc.quantize(model, config, dataset=inc.Dataset([train[:100]]))
    assert "pixels" in inc_torch.quantized_ops(quantized)
    counts = resolve_backend(quantized).int8_op_counts(quantized)
    assert counts["embedding" if pt2e else "QuantizedEmbeddingBag"] == 1, counts
    assert _accuracy(quantized, test, labels) >= fp32 - 0.01
    suffix = ".pt2" if pt2e else ".pt"
    inc.save(quantized, tmp_path / f"int8{suffix}")
    tables_fp32 = dataclasses.replace(config, exclude=inc.LayerFilter(names=("pixels",)))
    inc.save(inc.quantize(model, tables_fp32, dataset=inc.Dataset([train[:100]])), tmp_path / f"fp32_table{suffix}")
    # the table is 82 KB in FP32, 20 KB (and its row scales) in 8 bits
    assert (tmp_path / f"int8{suffix}").stat().st_size < (tmp_path / f"fp32_table{suffix}").stat().st_size - 45_000
    loaded = inc.load(tmp_path / f"int8{suffix}")
    assert "pixels" in inc_torch.quantized_ops(loaded)
    assert _accuracy(loaded, test, labels) == _accuracy(quantized, test, labels)


LENGTH = 12


class Lookups(nn.Module):
    """BERT looks its token types up through an expanded buffer: indices whose stride is 0, as here."""

    def __init__(self) -> None:
        super().__init__()
        self.words = nn.Embedding(50, 16)
        self.types = nn.Embedding(2, 16)
        self.bags = nn.EmbeddingBag(50, 16, mode="sum")
        self.head = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        types = (ids * 0)[:, :1].expand_as(ids)  # all type 0
        columns = ids.t().t()  # a transposed view: not contiguous either
        pooled = self.bags(columns[:, ::2])
        return self.head((self.words(ids) + self.types(types)).mean(1) + pooled)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_lookups_take_indices_that_are_not_contiguous(config):
    torch.manual_seed(0)
    model = Lookups().eval()
    ids = torch.randint(0, 50, (LENGTH, 4)).t()  # itself a transposed view
    quantized = inc.quantize(model, config, dataset=inc.Dataset([ids]))
    assert {"words", "types", "bags"} <= set(inc_torch.quantized_ops(quantized))
    got, expected = quantized(ids), model(ids)
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), 0) > 0.999


def _padded_bag(row_value: float) -> nn.EmbeddingBag:
    bag = nn.EmbeddingBag(20, 8, mode="sum", padding_idx=0)
    with torch.no_grad():
        bag.weight[0] = row_value
    return bag


@pytest.mark.parametrize(
    ("layer", "reason"),
    [
        (nn.EmbeddingBag(20, 8, mode="mean"), "mode='mean'; torch.ao's quantized bag kernel only sums"),
        (nn.EmbeddingBag(20, 8, mode="max"), "mode='max'"),
        (nn.Embedding(20, 8, max_norm=1.0), "renormalises the rows it looks up \\(max_norm\\)"),
        (_padded_bag(0.5), "leaves its padding_idx out of each bag"),
    ],
    ids=["mean", "max", "max_norm", "padding_row"],
)
def test_lookups_torch_ao_would_compute_differently_stay_float_saying_why(layer, reason, caplog):
    model = nn.Sequential(layer, nn.Flatten(), nn.LazyLinear(2)).eval()
    ids = torch.randint(0, 20, (4, 3))
    model(ids)  # materialise the lazy layer
    for config in CONFIGS:
        assert "0" not in {op.name for op in inc.describe(model, config).ops}
    with caplog.at_level(logging.INFO, logger="inc"):
        quantized = inc.quantize(model, inc.QuantConfig(approach="dynamic"))
    assert inc_torch.quantized_ops(quantized) == ["2"]
    assert any("(0): each " in r.message and re.search(reason, r.message) for r in caplog.records), [
        r.message for r in caplog.records
    ]
    torch.testing.assert_close(quantized[0](ids), layer(ids))


def test_a_padding_row_of_zeros_sums_the_same_and_is_quantized():
    model = nn.Sequential(_padded_bag(0.0), nn.Linear(8, 2)).eval()
    ids = torch.tensor([[0, 0, 3], [5, 0, 1]])
    quantized = inc.quantize(model, inc.QuantConfig(approach="dynamic"))
    assert inc_torch.quantized_ops(quantized) == ["0", "1"]
    assert torch.nn.functional.cosine_similarity(quantized(ids).flatten(), model(ids).flatten(), 0) > 0.999


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_an_excluded_table_stays_float_and_tables_take_no_settings(config):
    torch.manual_seed(0)
    model = Lookups().eval()
    ids = torch.randint(0, 50, (4, LENGTH))
    excluded = inc.quantize(
        model, dataclasses.replace(config, exclude=inc.LayerFilter(names=("words",))), dataset=inc.Dataset([ids])
    )
    ops = set(inc_torch.quantized_ops(excluded))
    assert "words" not in ops and {"types", "bags"} <= ops
    with pytest.raises(inc.errors.ConfigError, match="sets 'granularity', which Embedding ops do not have"):
        inc.quantize(model, dataclasses.replace(config, overrides={"Embedding": {"granularity": "per_tensor"}}), dataset=inc.Dataset([ids]))


def test_pt2e_stores_tables_and_bags_8_bits_per_row_without_a_warning(caplog, tmp_path: Path):
    torch.manual_seed(0)
    model = Lookups().eval()
    assert {op.name for op in inc.describe(model, inc.QuantConfig()).ops} == {"words", "types", "bags", "head"}
    with caplog.at_level(logging.WARNING, logger="inc"):
        quantized = inc.quantize(model, inc.QuantConfig(), dataset=inc.Dataset([torch.randint(0, 50, (4, LENGTH))]))
    assert not [r for r in caplog.records if "Embedding" in r.message]
    assert set(inc_torch.quantized_ops(quantized)) == {"words", "types", "bags", "head"}
    ids = torch.randint(0, 50, (LENGTH, 6)).t()  # another batch size, not contiguous
    assert torch.nn.functional.cosine_similarity(quantized(ids).flatten(), model(ids).flatten(), 0) > 0.999
    inc.save(quantized, tmp_path / "int8.pt2")
    loaded = inc.load(tmp_path / "int8.pt2")
    assert set(inc_torch.quantized_ops(loaded)) == {"words", "types", "bags", "head"}
    torch.testing.assert_close(loaded(ids), quantized(ids))


class Bags(nn.Module):
    """Each bag mode, with offsets, per-sample weights and a last offset, as recommenders call them."""

    def __init__(self) -> None:
        super().__init__()
        self.summed = nn.EmbeddingBag(60, 8, mode="sum", include_last_offset=True)
        self.averaged = nn.EmbeddingBag(60, 8, mode="mean")
        self.largest = nn.EmbeddingBag(60, 8, mode="max")
        self.padded = nn.EmbeddingBag(60, 8, mode="sum", padding_idx=0)
        self.head = nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        bags = offsets[:-1]
        pooled = [
            self.summed(ids, offsets, per_sample_weights=weights), self.averaged(ids, bags), self.largest(ids, bags),
            self.padded(ids, bags),
        ]
        return torch.cat([*pooled, self.head(pooled[0])], 1)


def test_pt2e_bags_of_every_mode_compute_as_before_and_a_padded_bag_stays_float():
    torch.manual_seed(0)
    model = Bags().eval()
    generator = torch.Generator().manual_seed(0)

    def batch(bags: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.randint(0, 60, (bags * 3,), generator=generator)
        return ids, torch.arange(0, bags * 3 + 1, 3), torch.rand(bags * 3, generator=generator)

    assert "padded" not in {op.name for op in inc.describe(model, inc.QuantConfig()).ops}
    quantized = inc.quantize(model, inc.QuantConfig(), dataset=inc.Dataset([batch(8)]))
    assert set(inc_torch.quantized_ops(quantized)) == {"summed", "averaged", "largest", "head"}
    inputs = batch(5)  # another number of bags
    got, expected = quantized(*inputs), model(*inputs)
    for index, name in enumerate(("summed", "averaged", "largest", "padded")):  # each bag's own columns
        columns = slice(8 * index, 8 * index + 8)
        cosine = torch.nn.functional.cosine_similarity(got[:, columns].flatten(), expected[:, columns].flatten(), 0)
        assert cosine > 0.9999, (name, cosine)


def test_pt2e_quantizes_a_tied_table_once():
    torch.manual_seed(0)
    model = TiedTables().eval()
    quantized = inc.quantize(model, inc.QuantConfig(), dataset=inc.Dataset([torch.randint(0, 1000, (4, 7))]))
    assert {"shared", "decoder_tokens"} <= set(inc_torch.quantized_ops(quantized))
    tables = [name for name, _ in quantized.graph_module.named_buffers() if name.endswith("_codes")]
    assert len(tables) == 1, tables
    assert not any(p.dim() == 2 and p.shape[0] == 1000 for p in quantized.graph_module.parameters())  # float one gone


class TiedOutput(nn.Module):
    """A language model whose output projection computes with its token table."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(100, 16)
        self.mix = nn.Linear(16, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mix(self.tokens(ids)) @ self.tokens.weight.t()


def test_pt2e_keeps_a_table_the_output_projection_reads_float(caplog):
    torch.manual_seed(0)
    model = TiedOutput().eval()
    ids = torch.randint(0, 100, (2, 9))
    with caplog.at_level(logging.INFO, logger="inc"):
        quantized = inc.quantize(model, inc.QuantConfig(), dataset=inc.Dataset([ids]))
    assert inc_torch.quantized_ops(quantized) == ["mix"]
    assert any("1 embedding table(s) stay FP32 (tokens)" in r.message for r in caplog.records)
    assert torch.nn.functional.cosine_similarity(quantized(ids).flatten(), model(ids).flatten(), 0) > 0.999


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_tuning_measures_each_table_error(trained, config):
    model, train, _, _ = trained
    backend = inc_torch.TorchBackend()
    data = inc.Dataset([train[:64]])
    calibration = backend.calibrate(model, data, config) if config.approach == "static" else None
    errors = backend.op_errors(model, config, calibration=calibration, dataset=data)
    with torch.no_grad():
        power = float(model.pixels(train[:64]).pow(2).mean())
    assert 0 < errors["pixels"] < 1e-4 * power, (errors, power)  # rounding of 8-bit rows, not a missing scale


class ShiftedIds(nn.Module):
    """Index arithmetic before a lookup (per-table offsets into one shared table, as torchrec lays tables out)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(100, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.table(ids + 10).mean(1))


def test_fx_keeps_integer_arithmetic_out_of_int8(caplog):
    torch.manual_seed(0)
    model = ShiftedIds().eval()
    ids = torch.randint(0, 90, (4, 6))
    assert "add" in {op.name for op in inc.describe(model, CONFIGS[0]).ops}  # listed: tracing sees no dtypes
    with caplog.at_level(logging.INFO, logger="inc"):
        quantized = inc.quantize(model, CONFIGS[0], dataset=inc.Dataset([ids]))
    assert any("1 op(s) compute on integer tensors and stay FP32: add" in r.message for r in caplog.records)
    assert set(inc_torch.quantized_ops(quantized)) == {"table", "head"}
    assert torch.nn.functional.cosine_similarity(quantized(ids).flatten(), model(ids).flatten(), 0) > 0.999


def test_fx_qat_trains_a_model_with_integer_arithmetic():
    torch.manual_seed(0)
    ids = torch.randint(0, 90, (4, 6))
    prepared = inc_torch.prepare_qat(ShiftedIds(), inc.QATConfig(format="fx"), example_inputs=(ids,))
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        prepared(ids).sum().backward()
        optimizer.step()
    assert inc_torch.quantized_ops(inc_torch.convert(prepared)) == ["head"]


class TiedTables(nn.Module):
    """Two lookups of one table (T5's shared, encoder and decoder embeddings)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Embedding(1000, 64)
        self.decoder_tokens = nn.Embedding(1000, 64)
        self.decoder_tokens.weight = self.shared.weight
        self.head = nn.Linear(64, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.shared(ids).mean(1) - self.decoder_tokens(ids[:, 1:]).mean(1))


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_a_tied_table_is_quantized_once(config, tmp_path: Path):
    torch.manual_seed(0)
    model = TiedTables().eval()
    quantized = inc.quantize(model, config, dataset=inc.Dataset([torch.randint(0, 1000, (4, 7))]))
    assert quantized.shared is quantized.decoder_tokens
    assert model.shared is not model.decoder_tokens  # the user's model as it was
    inc.save(quantized, tmp_path / "int8.pt")
    torch.jit.save(torch.jit.script(model), tmp_path / "fp32.pt")
    assert (tmp_path / "int8.pt").stat().st_size < 0.4 * (tmp_path / "fp32.pt").stat().st_size  # one table, not two
    ids = torch.randint(0, 1000, (3, 7))
    torch.testing.assert_close(inc.load(tmp_path / "int8.pt")(ids), quantized(ids))
    assert torch.nn.functional.cosine_similarity(quantized(ids).flatten(), model(ids).flatten(), 0) > 0.999


def test_pt2e_qat_trains_tables_in_float_and_converts_them_to_8_bits():
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (4, LENGTH))
    prepared = inc_torch.prepare_qat(Lookups(), inc.QATConfig(exclude=inc.LayerFilter(names=("types",))), example_inputs=(ids,))
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        prepared(ids).sum().backward()
        optimizer.step()
    prepared.eval()
    converted = inc_torch.convert(prepared)
    assert set(inc_torch.quantized_ops(converted)) == {"words", "bags", "head"}
    # 0.9988 with both tables excluded as with one: the head's fake quantization after three steps, not the table
    assert torch.nn.functional.cosine_similarity(converted(ids).flatten(), prepared(ids).flatten(), 0) > 0.995


class ScaledEmbedding(nn.Embedding):
    """As transformers' BART/Gemma scaled word embeddings: a subclass whose forward scales the rows it looks up."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * 8.0


class ScaledWords(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.words = ScaledEmbedding(50, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.words(ids).mean(1))


def test_a_table_subclass_is_stored_in_8_bits_on_pt2e_only():
    # torch.ao swaps exact classes only (FX, dynamic); PT2E rewrites the lookup in the graph, whatever the class
    torch.manual_seed(0)
    model = ScaledWords().eval()
    ids = torch.randint(0, 50, (4, LENGTH))
    assert [(op.name, op.op_type) for op in inc.describe(model, inc.QuantConfig()).ops] == [
        ("words", "Embedding"), ("head", "Linear"),
    ]
    for config in CONFIGS:
        assert "words" not in {op.name for op in inc.describe(model, config).ops}
    quantized = inc.quantize(model, inc.QuantConfig(), dataset=inc.Dataset([ids]))
    assert set(inc_torch.quantized_ops(quantized)) == {"words", "head"}
    assert torch.nn.functional.cosine_similarity(quantized(ids).flatten(), model(ids).flatten(), 0) > 0.999


def test_pt2e_tuning_measures_a_mean_bag_as_pt2e_computes_it():
    # op errors ran torch.ao's quantized bag, which always sums: a mean bag measured as if it summed (an error
    # the size of its output) and would have been the first op tuning put back in FP32
    torch.manual_seed(0)
    model = Bags().eval()
    ids, offsets, weights = torch.randint(0, 60, (24,)), torch.arange(0, 25, 3), torch.rand(24)
    backend = inc_torch.TorchBackend()
    data = inc.Dataset([(ids, offsets, weights)])
    config = inc.QuantConfig()
    errors = backend.op_errors(model, config, calibration=backend.calibrate(model, data, config), dataset=data)
    with torch.no_grad():
        power = float(model.averaged(ids, offsets[:-1]).pow(2).mean())
    assert 0 < errors["averaged"] < 1e-3 * power, (errors, power)
    assert 0 < errors["largest"] < 1e-3 * float(model.largest(ids, offsets[:-1]).pow(2).mean()), errors
