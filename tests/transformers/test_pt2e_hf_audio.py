"""Speech models on PT2E: Conv1d front ends and transposed up-samplings run in INT8 (as conv2d, see
inc_torch.ptq._conv1d and _conv_transpose).

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
from inc_torch.ptq._grouped_conv import miscomputed_grouped_convs


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
    # wav2vec2's positional conv (64 channels in 4 groups, kernel 16) stays FP32 where the CPU's INT8 kernel computes
    # it wrongly (Intel Xeon with AMX; see inc_torch.ptq._grouped_conv), and runs INT8 elsewhere (AMD EPYC)
    wrong = miscomputed_grouped_convs(model)
    assert set(wrong) <= {"encoder.pos_conv_embed.conv"}
    conv1d_layers = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Conv1d)]
    assert len(conv1d_layers) == convs
    listed = [op.name for op in inc.describe(model, inc.QuantConfig()).ops if op.op_type == "Conv1d"]
    assert listed == [name for name in conv1d_layers if name not in wrong]
    calibration = inc.Dataset([_inputs(kind, 2, seed) for seed in range(4)])
    quantized = inc.quantize(model, inc.QuantConfig(), dataset=calibration)
    assert set(listed) <= set(inc_torch.quantized_ops(quantized))
    counts = inc.get_backend("torch").int8_op_counts(quantized)
    assert counts["conv2d"] == len(listed), counts
    for batch in (3, 1):  # compiled once for a dynamic batch
        x = torch.from_numpy(_inputs(kind, batch, 10 + batch))
        with torch.no_grad():
            reference, got = model(x).last_hidden_state, quantized(x)[0]
        assert torch.nn.functional.cosine_similarity(reference.flatten(), got.flatten(), 0) >= 0.99


def test_hifigan_vocoder_upsamplings_run_int8() -> None:
    # SpeechT5's HiFi-GAN: ConvTranspose1d up-samplings (kernel 8, stride 4) between dilated Conv1d residual
    # blocks; the transposed ones run as sub-pixel conv2d (see inc_torch.ptq._conv_transpose)
    torch.manual_seed(0)
    config = transformers.SpeechT5HifiGanConfig(
        model_in_dim=16, upsample_initial_channel=32, upsample_rates=[4, 4], upsample_kernel_sizes=[8, 8],
        resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]],
    )
    model = transformers.SpeechT5HifiGan(config).eval()
    ops = inc.describe(model, inc.QuantConfig()).ops
    upsamplers = [op.name for op in ops if op.op_type == "ConvTranspose1d"]
    assert upsamplers == ["upsampler.0", "upsampler.1"]
    calibration = inc.Dataset([np.random.default_rng(seed).standard_normal((1, 20, 16)).astype(np.float32) for seed in range(4)])
    quantized = inc.quantize(model, inc.QuantConfig(), dataset=calibration)
    assert sorted(inc_torch.quantized_ops(quantized)) == sorted(op.name for op in ops)
    assert inc.get_backend("torch").int8_op_counts(quantized) == {"conv2d": len(ops)}
    for batch in (2, 1):
        x = torch.from_numpy(np.random.default_rng(10 + batch).standard_normal((batch, 20, 16)).astype(np.float32))
        with torch.no_grad():
            reference, got = model(x), quantized(x)
        assert got.shape == reference.shape == (batch, 20 * 16)
        assert torch.nn.functional.cosine_similarity(reference.flatten(), got.flatten(), 0) >= 0.99
