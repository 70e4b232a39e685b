"""Speech encoders on PT2E: their Conv1d front ends run in INT8 (as conv2d, see inc_torch.ptq._conv1d).

wav2vec2's feature encoder is where inductor's own INT8 conv1d failed (a group norm reading its output got a
buffer of the wrong length); Whisper's encoder opens with two Conv1d + GELU. Small configs, random weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import inc_core as inc
import inc_torch


def _wav2vec2() -> tuple[torch.nn.Module, int]:
    config = transformers.Wav2Vec2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        conv_dim=(32, 32, 32), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, feat_extract_norm="group",
    )
    return transformers.Wav2Vec2Model(config).eval(), 4


def _whisper() -> tuple[torch.nn.Module, int]:
    config = transformers.WhisperConfig(
        d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=50, vocab_size=100,
        pad_token_id=1, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2,
    )
    return transformers.WhisperModel(config).get_encoder().eval(), 2


def _inputs(kind: str, batch: int, seed: int) -> np.ndarray:
    shape = (batch, 4000) if kind == "wav2vec2" else (batch, 16, 100)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("kind", ["wav2vec2", "whisper"])
def test_speech_encoder_conv1d_layers_run_int8(kind: str) -> None:
    torch.manual_seed(0)
    model, convs = _wav2vec2() if kind == "wav2vec2" else _whisper()
    listed = [op.name for op in inc.describe(model, inc.QuantConfig()).ops if op.op_type == "Conv1d"]
    assert len(listed) == convs
    calibration = inc.Dataset([_inputs(kind, 2, seed) for seed in range(4)])
    quantized = inc.quantize(model, inc.QuantConfig(), dataset=calibration)
    assert set(listed) <= set(inc_torch.quantized_ops(quantized))
    counts = inc.get_backend("torch").int8_op_counts(quantized)
    assert counts["conv2d"] == convs, counts
    for batch in (3, 1):  # compiled once for a dynamic batch
        x = torch.from_numpy(_inputs(kind, batch, 10 + batch))
        with torch.no_grad():
            reference, got = model(x).last_hidden_state, quantized(x)[0]
        assert torch.nn.functional.cosine_similarity(reference.flatten(), got.flatten(), 0) >= 0.99
