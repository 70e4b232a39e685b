"""A DLRM-shaped recommender: batches whose inputs do not all hold one sample per row.

DLRM's reference inputs are dense features (batch, 13), then per embedding table the flat indices of
every sample's bag (any count) and one offset per sample. Calibrating on the user's own batches must feed
them as they are: cutting the batch that crosses ``calib_samples`` (or the single batch a dynamic model is
run once on) row-wise would cut the indices at the batch size and break the model.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import inc_core as inc
from inc_core._registry import resolve_backend

TABLES = (100, 200, 50)
DIM = 16


class TinyDLRM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(nn.EmbeddingBag(rows, DIM, mode="sum") for rows in TABLES)
        self.bottom = nn.Sequential(nn.Linear(13, 64), nn.ReLU(), nn.Linear(64, DIM), nn.ReLU())
        features = len(TABLES) + 1
        self.top = nn.Sequential(nn.Linear(DIM + features * (features - 1) // 2, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, dense: torch.Tensor, indices: list[torch.Tensor], offsets: list[torch.Tensor]) -> torch.Tensor:
        x = self.bottom(dense)
        pooled = [table(indices[k], offsets[k]) for k, table in enumerate(self.embeddings)]  # (FX traces indexing)
        stacked = torch.stack([x, *pooled], 1)
        pairs = torch.bmm(stacked, stacked.transpose(1, 2))
        rows, cols = torch.tril_indices(stacked.shape[1], stacked.shape[1], -1)
        return torch.sigmoid(self.top(torch.cat([x, pairs[:, rows, cols]], 1)))


def _batches(count: int, size: int = 32) -> list[tuple]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        dense = torch.randn(size, 13, generator=generator)
        indices = [torch.randint(0, rows, (size * 3,), generator=generator) for rows in TABLES]  # 3 ids per bag
        offsets = [torch.arange(0, size * 3, 3) for _ in TABLES]
        batches.append((dense, indices, offsets))
    return batches


@pytest.mark.parametrize(
    "config",
    [inc.QuantConfig(), inc.QuantConfig(format="fx"), inc.QuantConfig(approach="dynamic")],
    ids=["pt2e", "fx", "dynamic"],
)
def test_a_dlrm_calibrates_on_its_own_batches_and_keeps_its_output(config):
    torch.manual_seed(0)
    model = TinyDLRM().eval()
    batches = _batches(4)  # 128 samples: the default 100 ends inside the fourth batch
    quantized = inc.quantize(model, config, dataset=inc.Dataset(batches))
    counts = resolve_backend(quantized).int8_op_counts(quantized)
    assert sum(counts.values()) >= 4, counts  # the four Linears at least
    for batch in [*_batches(2), *_batches(1, size=7)]:  # the serving batch size differs from calibration's
        expected, got = model(*batch), quantized(*batch)
        assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), 0) > 0.999


def _as_numpy(batch: tuple) -> tuple:
    dense, indices, offsets = batch
    return dense.numpy(), [i.numpy() for i in indices], [o.numpy() for o in offsets]


def test_numpy_batches_with_lists_inside_calibrate_and_benchmark_in_several_instances():
    torch.manual_seed(0)
    model = TinyDLRM().eval()
    quantized = inc.quantize(model, inc.QuantConfig(), dataset=inc.Dataset([_as_numpy(b) for b in _batches(2)]))
    batch = _batches(1, size=5)[0]
    assert torch.nn.functional.cosine_similarity(quantized(*batch).flatten(), model(*batch).flatten(), 0) > 0.999
    with pytest.raises(inc.errors.ConfigError, match="inputs is an inc.Dataset; give one batch"):
        inc.benchmark(quantized, inc.Dataset([batch]))
    result = inc.benchmark(quantized, _as_numpy(batch), instances=2, cores_per_instance=1, warmup=1, iterations=3)
    assert len(result.per_instance) == 2 and result.batch_size == 5


def test_a_dynamic_dlrm_torchscript_cannot_compile_saves_traced_on_the_batch_it_ran(tmp_path):
    # TinyDLRM unpacks tril_indices into two tensors, which torch.jit.script refuses ("cannot statically infer the
    # expected size of a list"): saving said "trace it yourself"; the batch the model ran on traces it now
    torch.manual_seed(0)
    model = TinyDLRM().eval()
    quantized = inc.quantize(model, inc.QuantConfig(approach="dynamic"), dataset=inc.Dataset(_batches(1)))
    inc.save(quantized, tmp_path / "dlrm.pt")
    loaded = inc.load(tmp_path / "dlrm.pt")
    for batch in [*_batches(1), *_batches(1, size=7)]:  # another batch size than the traced one
        torch.testing.assert_close(loaded(*batch), quantized(*batch))
    with pytest.raises(inc.errors.SaveError, match="Trace it yourself"):  # no data given: nothing to trace on
        inc.save(inc.quantize(model, inc.QuantConfig(approach="dynamic")), tmp_path / "no_data.pt")
