"""A transformers model the user exported with torch.export (keyword inputs, a free batch size) quantizes like the
module it came from: the real all-MiniLM-L6-v2, on real sentences."""

from __future__ import annotations

import pytest
import torch
from torch_hf_helpers import SENTENCES, mean_pooled, minilm, sentence_batches

import inc_core as inc
import inc_torch


def test_exported_minilm_program_quantizes_like_its_module() -> None:
    model, tokenizer = minilm()
    calibration = sentence_batches(tokenizer, SENTENCES[:20], batch=4, seq=32)
    scored = sentence_batches(tokenizer, SENTENCES[20:], batch=4, seq=32)
    example = {name: torch.from_numpy(array) for name, array in calibration[0].items()}
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (), example, dynamic_shapes={name: {0: batch} for name in example})

    assert inc.describe(program).ops == inc.describe(model).ops
    from_program = inc.quantize(program, inc.QuantConfig(), dataset=inc.Dataset(calibration))
    from_module = inc.quantize(model, inc.QuantConfig(), dataset=inc.Dataset(calibration))
    assert len(inc_torch.quantized_ops(from_program)) == 40  # 37 Linear (six layers, the pooler), 3 embedding tables
    assert inc_torch.quantized_ops(from_program) == inc_torch.quantized_ops(from_module)

    expected = mean_pooled(model, scored)
    got = mean_pooled(from_program, scored)
    assert float(torch.nn.functional.cosine_similarity(got, expected).mean()) >= 0.99
    same = torch.nn.functional.cosine_similarity(got, mean_pooled(from_module, scored))
    assert float(same.min()) > 0.9999


def test_exported_gpt2_program_quantizes_its_conv1d_projections() -> None:
    """GPT-2's projections are transformers Conv1D layers, an addmm in the program: inc's own export swaps them for
    Linear modules; in a program they are rewritten as linear calls (before: 2 INT8 ops of 11, wpe and lm_head)."""
    import numpy as np
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=200, n_embd=64, n_layer=2, n_head=4, n_positions=64, use_cache=False)
    model = transformers.GPT2LMHeadModel(config).eval()
    rng = np.random.default_rng(0)
    data = inc.Dataset({"input_ids": rng.integers(0, 200, (16, 16))}, batch_size=4)
    example = {"input_ids": torch.from_numpy(rng.integers(0, 200, (4, 16)))}
    program = torch.export.export(model, (), example, dynamic_shapes={"input_ids": {0: torch.export.Dim("batch", min=1, max=64)}})

    assert inc.describe(program).ops == inc.describe(model).ops
    assert sum(op.op_type == "Conv1D" for op in inc.describe(program).ops) == 8
    from_program = inc.quantize(program, inc.QuantConfig(), dataset=data)
    from_module = inc.quantize(model, inc.QuantConfig(), dataset=data)
    assert inc_torch.quantized_ops(from_program) == inc_torch.quantized_ops(from_module)
    assert len(inc_torch.quantized_ops(from_program)) == 11
    with torch.no_grad():
        got, expected = from_program(**example).logits, from_module(**example).logits
    assert float(torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0)) > 0.9999

    # the mse strategy's per-op errors, measured on the program's graph (keyword inputs in its order)
    backend = inc_torch.TorchBackend()
    config = inc.QuantConfig()
    errors = [backend.op_errors(m, config, calibration=backend.calibrate(m, data, config), dataset=data) for m in (program, model)]
    assert errors[0]["transformer.h.0.attn.c_attn"] > 0
    assert errors[0] == pytest.approx(errors[1], rel=1e-5)
