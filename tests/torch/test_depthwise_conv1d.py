"""A Conformer convolution module (pointwise Conv1d, GLU, depthwise Conv1d of kernel 15, BatchNorm1d, SiLU, pointwise
Conv1d): oneDNN's INT8 depthwise convolution never returned on it with 2 threads (FX: 30 frames at batch 5, through
torch.ao's quantized conv1d; PT2E: 30 frames at batch 1, through inductor's qconv), so depthwise Conv1d layers stay
FP32 where oneDNN would run them (FX: up to 100 channels, more go to FBGEMM; PT2E: all), saying so in the log.

The model runs in a child process with a time limit: a regression stalls there, not the test session.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import json, logging, sys
    import torch
    from torch import nn
    import inc_core as inc
    import inc_torch

    torch.set_num_threads(2)

    class ConformerConv(nn.Module):
        def __init__(self, d=32):
            super().__init__()
            self.pw1 = nn.Conv1d(d, 2 * d, 1)
            self.dw = nn.Conv1d(d, d, 15, padding=7, groups=d)
            self.bn = nn.BatchNorm1d(d)
            self.pw2 = nn.Conv1d(d, d, 1)

        def forward(self, x):
            y = nn.functional.glu(self.pw1(x.transpose(1, 2)), dim=1)
            return x + self.pw2(nn.functional.silu(self.bn(self.dw(y)))).transpose(1, 2)

    torch.manual_seed(0)
    model = ConformerConv().eval()
    data = inc.Dataset([torch.randn(5, 30, 32).numpy() for _ in range(4)])
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("inc").addHandler(handler)
    logging.getLogger("inc").setLevel(logging.INFO)
    found = {}
    for fmt in ("fx", "pt2e"):
        quantized = inc.quantize(model, inc.QuantConfig(format=fmt), dataset=data)
        cosines = []
        for batch in (5, 1):
            x = torch.randn(batch, 30, 32)
            with torch.no_grad():
                cosines.append(nn.functional.cosine_similarity(model(x).flatten(), quantized(x).flatten(), 0).item())
        found[fmt] = {"ops": inc_torch.quantized_ops(quantized), "cosine": min(cosines)}
    # a pointwise then a depthwise Conv1d of kernel 21 over 42 frames: oneDNN's kernel stalled there on PT2E
    stack = nn.Sequential(nn.Conv1d(32, 32, 1), nn.Conv1d(32, 32, 21, padding=10, groups=32)).eval()
    frames = inc.Dataset([torch.randn(5, 32, 42).numpy() for _ in range(2)])
    for fmt in ("fx", "pt2e"):
        quantized = inc.quantize(stack, inc.QuantConfig(format=fmt), dataset=frames)
        with torch.no_grad():
            quantized(torch.randn(5, 32, 42))
        found["stack_" + fmt] = inc_torch.quantized_ops(quantized)
    found["log"] = messages
    print(json.dumps(found))
    """
)


def test_depthwise_conv1d_stays_float_where_onednn_would_run_it_and_nothing_stalls() -> None:
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["fx"]["ops"] == ["pw1", "pw2"]
    assert found["pt2e"]["ops"] == ["pw1", "pw2"]
    assert found["stack_fx"] == found["stack_pt2e"] == ["0"]
    assert found["fx"]["cosine"] >= 0.99 and found["pt2e"]["cosine"] >= 0.99
    assert any(
        "1 depthwise Conv1d layer(s) stay FP32 on format='fx' (torch's oneDNN INT8 depthwise conv1d can stall with "
        "several threads; those of more than 100 channels run on FBGEMM, in INT8): dw" in line
        for line in found["log"]
    ), found["log"]
    assert (
        "Conv1d 'dw' stays FP32 on format='pt2e': oneDNN's INT8 depthwise convolution can stall on 1-D inputs with "
        "several threads"
    ) in found["log"]


def test_a_depthwise_conv1d_kept_in_float_is_not_offered() -> None:
    """describe lists what inc quantizes: a depthwise Conv1d that stays FP32 was listed (and tuned, and excludable)
    though no setting made it INT8 (a ConvBERT: 26 ops listed, 24 quantized)."""
    import torch
    from torch import nn

    import inc_core as inc

    model = nn.Sequential(nn.Conv1d(32, 32, 1), nn.Conv1d(32, 32, 15, padding=7, groups=32), nn.Conv1d(32, 32, 1)).eval()
    program = torch.export.export(model, (torch.randn(2, 32, 30),))
    assert inc.describe(model, inc.QuantConfig()).names == ("0", "2")
    assert inc.describe(program, inc.QuantConfig()).names == ("0", "2")
    assert inc.describe(model, inc.QuantConfig(format="fx")).names == ("0", "2")
    # more than 100 channels: FX runs it on FBGEMM's kernel, in INT8, and offers it; PT2E keeps it FP32
    wide = nn.Sequential(nn.Conv1d(128, 128, 1), nn.Conv1d(128, 128, 5, padding=2, groups=128)).eval()
    assert inc.describe(wide, inc.QuantConfig(format="fx")).names == ("0", "1")
    assert inc.describe(wide, inc.QuantConfig()).names == ("0",)
