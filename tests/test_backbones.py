"""attnkit.nn backbones: CausalLM, EncoderClassifier, EncoderDecoder with any registered mechanism."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import InvalidOption, Pattern, UnsupportedPattern
from attnkit.nn import CausalLM, Encoder, EncoderClassifier, EncoderDecoder
from attnkit.testing import assert_close

FAMILIES = ["softmax", "linear", "sliding_window", "retention", "hedgehog"]  # exact, kernel, local, decay, trainable
CROSS = ["softmax", "linear", "hedgehog", "rala", "cosformer"]  # a few mechanisms with both cross patterns
V, D, H = 13, 16, 2


def _tokens(b: int = 2, t: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def _decode_in_chunks(step, seq: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Feed ``seq`` in chunks of ``sizes`` through ``step(chunk, state) -> (out, state)``; concatenate."""
    state, outs, start = None, [], 0
    for n in sizes:
        out, state = step(seq[:, start : start + n], state)
        outs.append(out)
        start += n
    assert state.offset == seq.shape[1]
    return torch.cat(outs, dim=1)


def _grads_flow(model: torch.nn.Module, loss: torch.Tensor) -> None:
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reached {missing}"


@pytest.mark.parametrize("mechanism", FAMILIES)
def test_backbones_forward_backward(mechanism):
    lm = CausalLM(vocab=V, dim=D, depth=2, heads=H, mechanism=mechanism, conv_kernel=3)
    logits = lm(_tokens())
    assert logits.shape == (2, 10, V)
    _grads_flow(lm, logits.logsumexp(-1).mean())

    clf = EncoderClassifier(5, vocab=V, dim=D, depth=2, heads=H, mechanism=mechanism)
    logits = clf(_tokens(), key_padding_mask=torch.ones(2, 10, dtype=torch.bool))
    assert logits.shape == (2, 5)
    _grads_flow(clf, logits.square().mean())

    if Pattern.CAUSAL_CROSS not in attnkit.info(mechanism).patterns:
        with pytest.raises(UnsupportedPattern, match=f"EncoderDecoder.*{mechanism}"):
            EncoderDecoder(1, in_dim=2, dim=D, heads=H, mechanism=mechanism)
        return
    seq2seq = EncoderDecoder(1, in_dim=2, dim=D, depth=2, heads=H, mechanism=mechanism)
    pred = seq2seq(torch.randn(2, 9, 2), torch.randn(2, 6, 2))
    assert pred.shape == (2, 6, 1)
    _grads_flow(seq2seq, pred.square().mean())


@pytest.mark.parametrize("mechanism", [m.name for m in attnkit.mechanisms()])
def test_causal_lm_over_the_registry(mechanism):
    """Every mechanism with causal_self trains a step; the others are refused at construction by name."""
    if Pattern.CAUSAL_SELF not in attnkit.info(mechanism).patterns:
        with pytest.raises(UnsupportedPattern, match=f"CausalLM needs pattern causal_self.*{mechanism}"):
            CausalLM(vocab=V, dim=D, depth=1, heads=H, mechanism=mechanism)
        return
    if attnkit.info(mechanism).spatial:  # a grid mechanism: the sequence model refuses it and points to the ViT
        with pytest.raises(InvalidOption, match=f"CausalLM feeds token sequences.*{mechanism}.*ViT"):
            CausalLM(vocab=V, dim=D, depth=1, heads=H, mechanism=mechanism)
        return
    model = CausalLM(vocab=V, dim=D, depth=1, heads=H, mechanism=mechanism, conv_kernel=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = _tokens(t=12)
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1))
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("conv_kernel", [None, 4])
@pytest.mark.parametrize("mechanism", ["softmax", "linear", "retention", "hedgehog"])
def test_causal_lm_does_not_leak_the_future(mechanism, conv_kernel):
    model = CausalLM(vocab=V, dim=D, depth=2, heads=H, mechanism=mechanism, conv_kernel=conv_kernel)
    tokens, t = _tokens(), 6
    changed = tokens.clone()
    changed[:, t] = (changed[:, t] + 1) % V
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t], b[:, t])


@pytest.mark.parametrize("positions", ["learned", "rope"])
@pytest.mark.parametrize("conv_kernel", [None, 3])
@pytest.mark.parametrize("mechanism", ["softmax", "linear", "sliding_window", "retention"])
def test_causal_lm_chunked_decoding_equals_full_call(mechanism, conv_kernel, positions):
    options = {"window": 4} if mechanism == "sliding_window" else {}
    model = CausalLM(
        vocab=V, dim=D, depth=2, heads=H, mechanism=mechanism, conv_kernel=conv_kernel, positions=positions, **options
    )
    tokens = _tokens(t=11)
    with torch.no_grad():
        full = model(tokens)
        chunked = _decode_in_chunks(lambda x, s: model(x, state=s, return_state=True), tokens, [3, 1, 1, 4, 1, 1])
    assert_close("decoded logits", full, chunked, 1e-5)


def test_weight_tying_shares_the_parameter():
    tied = CausalLM(vocab=V, dim=D, depth=1, heads=H)
    assert tied.head.weight is tied.inputs.embed.weight
    untied = CausalLM(vocab=V, dim=D, depth=1, heads=H, tie_weights=False)
    assert untied.head.weight is not untied.inputs.embed.weight
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(untied) - count(tied) == V * D


def test_lightning_blocks_know_their_depth():
    model = CausalLM(vocab=V, dim=D, depth=3, heads=H, mechanism="lightning")
    layers = [(b.attn.mechanism.options.layer, b.attn.mechanism.options.layers) for b in model.blocks]
    assert layers == [(0, 3), (1, 3), (2, 3)]


@pytest.mark.parametrize("cross_pattern", ["causal_cross", "noncausal_cross"])
@pytest.mark.parametrize("mechanism", CROSS)
def test_encoder_decoder_decoding_equals_teacher_forcing(mechanism, cross_pattern):
    """Token-by-token decoding (self attention with state, cross attention through causal_cross) equals the
    teacher-forced call; with noncausal_cross only for mechanisms whose outputs are per query."""
    model = EncoderDecoder(2, in_dim=3, dim=D, depth=2, heads=H, mechanism=mechanism, cross_pattern=cross_pattern)
    src, tgt = torch.randn(2, 9, 3), torch.randn(2, 7, 3)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    with torch.no_grad():
        full = model(src, tgt, src_padding_mask=mask)
        memory = model.encode(src, src_padding_mask=mask)
        step = lambda x, s: model.decode(x, memory, memory_padding_mask=mask, state=s, return_state=True)  # noqa: E731
        decoded = _decode_in_chunks(step, tgt, [1, 2, 1, 3])
    if mechanism == "rala" and cross_pattern == "noncausal_cross":  # pools all queries: position i sees later ones
        assert not torch.allclose(full, decoded, atol=1e-5)
    else:
        assert_close("decoded", full, decoded, 1e-5)


def test_encoder_decoder_token_logits():
    model = EncoderDecoder(vocab=V, dim=D, depth=1, heads=H, mechanism="linear")
    logits = model(_tokens(t=8), _tokens(t=5, seed=1))
    assert logits.shape == (2, 5, V)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("mechanism", ["softmax", "linear", "sliding_window", "hedgehog"])
def test_encoder_padding_changes_nothing(mechanism, pooling):
    model = EncoderClassifier(4, vocab=V, dim=D, depth=2, heads=H, mechanism=mechanism, pooling=pooling)
    tokens = _tokens()
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 7:], mask[1, 4:] = False, False
    altered = torch.where(mask, tokens, (tokens + 5) % V)
    with torch.no_grad():
        a = model(tokens, key_padding_mask=mask)
        b = model(altered, key_padding_mask=mask)
        unmasked = model(altered)
    assert_close("pooled logits", a, b, 1e-5)
    assert not torch.allclose(a, unmasked)


def test_backbone_argument_errors():
    with pytest.raises(InvalidOption, match="positions"):
        CausalLM(vocab=V, dim=D, heads=H, positions="sinusoidal")
    with pytest.raises(InvalidOption, match="max_positions"):
        CausalLM(vocab=V, dim=D, heads=H, max_positions=4)(_tokens(t=6))
    with pytest.raises(InvalidOption, match="exactly one of vocab"):
        EncoderClassifier(3, dim=D, heads=H)
    with pytest.raises(InvalidOption, match="pooling"):
        EncoderClassifier(3, vocab=V, dim=D, heads=H, pooling="max")
    for bad in (0, -1.0, float("nan"), float("inf"), "1"):
        with pytest.raises(InvalidOption, match="embed_std"):
            CausalLM(vocab=V, dim=D, heads=H, embed_std=bad)
    assert CausalLM(vocab=V, dim=D, heads=H, embed_std=1.0).inputs.embed.weight.std() > 0.5
    with pytest.raises(attnkit.UnknownMechanism):
        CausalLM(vocab=V, dim=D, heads=H, mechanism="softmaxx")
    layer = attnkit.Attention(D, H, pattern="noncausal_cross")
    with pytest.raises(InvalidOption, match="cannot override"):
        layer(torch.randn(1, 3, D), torch.randn(1, 4, D), pattern="causal_self")


def test_built_in_three_lines():
    model = attnkit.nn.CausalLM(vocab=128, dim=64, depth=2, heads=4, mechanism="linear")
    assert model(torch.randint(0, 128, (1, 16))).shape == (1, 16, 128)


def test_sequence_backbones_refuse_a_spatial_mechanism():
    with pytest.raises(InvalidOption, match="EncoderClassifier feeds token sequences.*'window'.*ViT"):
        EncoderClassifier(5, vocab=V, dim=D, depth=1, heads=H, mechanism="window")
    with pytest.raises(InvalidOption, match="Encoder feeds token sequences.*'axial'"):
        Encoder(vocab=V, dim=D, depth=1, heads=H, mechanism="axial")
