"""Dynamic INT8 of transformers models on the torch backend: HF Conv1D quantized as a Linear, and
inc.save/inc.load of dynamic transformers models (rebuilt as the same class, same outputs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch_hf_helpers import cosine_metric, small_model, token_batches

import inc_core as inc
import inc_torch

GPT2_PROJECTIONS = {f"h.{i}.{name}" for i in range(2) for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
GPT2_TABLES = {"wte", "wpe"}  # token and position embeddings: 8 bits per row


def test_describe_lists_gpt2_conv1d_layers_for_pt2e_and_dynamic() -> None:
    model = small_model("gpt2")
    for config in (inc.QuantConfig(), inc.QuantConfig(approach="dynamic")):
        ops = inc.describe(model, config).ops
        assert {op.name for op in ops if op.op_type == "Conv1D"} == GPT2_PROJECTIONS


def test_dynamic_gpt2_quantizes_its_conv1d_layers() -> None:
    model = small_model("gpt2")
    quantized = inc.quantize(model, inc.QuantConfig(approach="dynamic"))
    assert set(inc_torch.quantized_ops(quantized)) == GPT2_PROJECTIONS | GPT2_TABLES
    assert all(type(model.get_submodule(name)).__name__ == "Conv1D" for name in GPT2_PROJECTIONS)  # user's model as it was
    score = cosine_metric(model, token_batches(2, seed=1))(quantized)
    assert score >= 0.99, score


def test_dynamic_gpt2_excluded_conv1d_stays_float() -> None:
    model = small_model("gpt2")
    config = inc.QuantConfig(approach="dynamic", exclude=inc.LayerFilter(names=("h.0.attn.c_attn",)))
    quantized = inc.quantize(model, config)
    assert set(inc_torch.quantized_ops(quantized)) == (GPT2_PROJECTIONS | GPT2_TABLES) - {"h.0.attn.c_attn"}


def test_dynamic_bert_quantizes_its_tables_and_saves_them(tmp_path: Path) -> None:
    # BERT looks its token types up through an expanded buffer: torch.ao's own quantized lookup refuses such indices.
    model = small_model("bert")
    quantized = inc.quantize(model, inc.QuantConfig(approach="dynamic"))
    tables = {f"embeddings.{kind}_embeddings" for kind in ("word", "position", "token_type")}
    assert tables <= set(inc_torch.quantized_ops(quantized))
    score = cosine_metric(model, token_batches(2, seed=1))(quantized)
    assert score >= 0.99, score
    inc.save(quantized, tmp_path / "bert.pt")
    assert tables <= set(inc_torch.quantized_ops(inc.load(tmp_path / "bert.pt")))


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_dynamic_model_save_load_round_trip(kind: str, tmp_path: Path) -> None:
    model = small_model(kind)
    quantized = inc.quantize(model, inc.QuantConfig(approach="dynamic"))
    path = tmp_path / f"{kind}.pt"
    inc.save(quantized, path)
    loaded = inc.load(path)
    assert type(loaded) is type(model)  # the transformers class itself, with its ModelOutput
    assert inc_torch.quantized_ops(loaded) == inc_torch.quantized_ops(quantized)
    inputs = {k: torch.from_numpy(v) for k, v in token_batches(1, seed=2)[0].items()}
    with torch.no_grad():
        expected = quantized(**inputs).last_hidden_state
        got = loaded(**inputs).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    inc.save(loaded, tmp_path / "again.pt")  # a loaded model saves again
    assert inc_torch.quantized_ops(inc.load(tmp_path / "again.pt")) == inc_torch.quantized_ops(quantized)


def test_a_file_that_is_not_an_inc_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": small_model("bert").state_dict()}, path)
    with pytest.raises(inc.errors.ModelLoadError, match="not a model saved by inc"):
        inc.load(path)


def test_a_dynamic_int8_causal_lm_keeps_its_class_cache_and_generate() -> None:
    """The path the PT2E error points language-model users to: generation works on the INT8 model."""
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )).eval()
    quantized = inc.quantize(model, inc.QuantConfig(approach="dynamic"))
    assert type(quantized) is type(model)
    assert {f"model.layers.{i}.mlp.down_proj" for i in range(2)} <= set(inc_torch.quantized_ops(quantized))
    prompt = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(1))
    generated = quantized.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False)
    assert generated.shape == (2, 11) and torch.equal(generated[:, :6], prompt)
    step = quantized(input_ids=prompt, use_cache=True)
    assert step.past_key_values is not None  # the cache generate() reuses


def test_dynamic_t5_keeps_one_shared_table_through_save_and_load(tmp_path: Path) -> None:
    import transformers

    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=500, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    model = transformers.T5ForConditionalGeneration(config).eval()
    assert model.encoder.embed_tokens.weight is model.shared.weight  # three lookups of one tied table
    quantized = inc.quantize(model, inc.QuantConfig(approach="dynamic"))
    assert quantized.encoder.embed_tokens is quantized.shared is quantized.decoder.embed_tokens
    inc.save(quantized, tmp_path / "t5.pt")
    loaded = inc.load(tmp_path / "t5.pt")
    assert loaded.encoder.embed_tokens is loaded.shared is loaded.decoder.embed_tokens
    ids = torch.randint(2, 500, (2, 9))
    with torch.no_grad():
        expected, got = quantized(input_ids=ids, decoder_input_ids=ids[:, :4]).logits, loaded(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
        fp32 = model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert torch.nn.functional.cosine_similarity(expected.flatten(), fp32.flatten(), 0) > 0.999
