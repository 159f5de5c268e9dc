"""Shared pieces: banded attention, the chunked scan, masks, options, the registry."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit.errors import AttnkitError, UnknownMechanism
from attnkit.ops.banded import band_pairs, banded_attention
from attnkit.ops.chunked import bidirectional_linear_scan, causal_linear_scan
from attnkit.options import option_docs
from attnkit.patterns import and_masks, causal, dense_mask, or_masks, window
from attnkit.registry import Registry
from attnkit.testing import assert_close, make_qkv


def test_band_pairs_counts_exactly():
    for t in (1, 2, 5, 17, 40):
        for before in (0, 1, 3, 20, 50):
            for after in (0, 2, 19, 60):
                brute = sum(1 for i in range(t) for j in range(t) if i - before <= j <= i + after)
                assert band_pairs(t, before, after) == brute


def dense_band(q, k, v, before, after, q_offset, kpm, scale):
    mask = dense_mask(
        lambda b, h, i, j: (j >= i - before) & (j <= i + after), q.shape[1], k.shape[1], q_offset=q_offset
    )[0, 0]
    mask = mask[None, None] & (kpm[:, None, None, :] if kpm is not None else True)
    g = q.shape[2] // k.shape[2]
    s = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(g, 2)) * scale
    p = torch.where(mask.any(-1, keepdim=True), s.masked_fill(~mask, float("-inf")).softmax(-1), 0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v.repeat_interleave(g, 2))


@pytest.mark.parametrize(
    ("tq", "tk", "before", "after", "offset", "block"),
    [
        (37, 37, 5, 0, 0, 8),
        (37, 37, 4, 4, 0, 16),
        (10, 25, 6, 0, 15, 4),
        (10, 25, 2, 0, 15, 64),
        (9, 9, 20, 20, 0, 3),
        (1, 30, 7, 0, 29, 64),
        (50, 50, 0, 0, 0, 7),
    ],
)
def test_banded_attention_matches_dense_mask(tq, tk, before, after, offset, block):
    q, k, v = make_qkv(2, tq, tk, 4, 2, 8)
    kpm = torch.rand(2, tk, generator=torch.Generator().manual_seed(0)) > 0.3
    for mask in (None, kpm):
        out = banded_attention(
            q, k, v, before=before, after=after, scale=0.3, q_offset=offset, key_padding_mask=mask, block=block
        )
        assert_close("band", dense_band(q, k, v, before, after, offset, mask, 0.3), out, 1e-5)


def naive_scan(q, k, v, s0, log_decay=None):
    """S_t = g S_{t-1} + k_t v_t^T, out_t = q_t S_t, token by token."""
    g = q.shape[2] // k.shape[2]
    S = s0.repeat_interleave(g, 1).clone()
    k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    decay = 1.0 if log_decay is None else log_decay.exp().repeat_interleave(g)[None, :, None, None]
    outs = []
    for t in range(q.shape[1]):
        S = decay * S + torch.einsum("bhd,bhe->bhde", k[:, t], v[:, t])
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, t], S))
    return torch.stack(outs, 1), S


@pytest.mark.parametrize(("t", "chunk"), [(1, 4), (13, 4), (64, 64), (70, 16)])
def test_causal_linear_scan_matches_the_recurrence(t, chunk):
    q, k, v = make_qkv(2, t, t, 4, 2, 8, dv=5, dtype=torch.float64)
    s0 = torch.randn(2, 2, 8, 5, dtype=torch.float64)
    out, final = causal_linear_scan(q, k, v, s0, chunk=chunk)
    ref, ref_final = naive_scan(q, k, v, s0)
    assert_close("out", ref, out, 1e-12)
    assert_close("state", ref_final[:, ::2], final, 1e-12)


def test_mask_predicates_compose():
    m = dense_mask(and_masks(causal, window(3, causal=True)), 5, 5)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    assert torch.equal(m, expected.bool())
    assert dense_mask(None, 3, 3) is None and and_masks(None, None) is None
    shifted = dense_mask(causal, 2, 5, q_offset=3)  # two queries after three cached keys
    assert shifted.tolist() == [[[[True] * 4 + [False], [True] * 5]]]


def test_mask_predicates_see_batch_and_head():
    # a head-dependent stride: head h sees keys j with j % 2 == h; batch row 1 also sees key 0
    def stride(b, h, q_idx, kv_idx):
        return (kv_idx % 2 == h) | ((b == 1) & (kv_idx == 0))

    m = dense_mask(or_masks(stride, window(1, causal=True)), 3, 4, batch=2, heads=2)
    assert m.shape == (2, 2, 3, 4)
    assert m[0, 0].tolist() == [[True, False, True, False], [True, True, True, False], [True, False, True, False]]
    assert m[1, 1, 2].tolist() == [True, True, True, True]
    assert m[0, 1, 0].tolist() == [True, True, False, True]


def test_option_docs_reads_field_comments():
    @dataclasses.dataclass(frozen=True)
    class Opts:
        size: int = 3  # how big it is
        name: str = "x"  # what it is called, with: punctuation

    assert option_docs(Opts) == {"size": "how big it is", "name": "what it is called, with: punctuation"}


def test_registry_is_loud():
    reg: Registry[int] = Registry("widget", "attnkit.mechanisms")
    reg._discovered = True  # no discovery: just this test's entries
    reg.register("alpha")(1)
    reg.register("alphabet")(2)
    assert reg.names("alpha*") == ["alpha", "alphabet"] and "alpha" in reg
    with pytest.raises(UnknownMechanism, match="unknown widget 'alpah'. Did you mean 'alpha'"):
        reg.get("alpah")
    with pytest.raises(AttnkitError, match="registered twice"):
        reg.register("alpha")(3)


@settings(max_examples=40, deadline=None)
@given(
    tq=st.integers(1, 40),
    extra_keys=st.integers(0, 30),
    before=st.integers(0, 45),
    after=st.integers(0, 45),
    block=st.integers(1, 70),
    padded=st.booleans(),
)
def test_banded_attention_property(tq, extra_keys, before, after, block, padded):
    """Any band, offset and block size: the blocked computation equals the dense masked softmax."""
    tk = tq + extra_keys
    offset = extra_keys  # queries are the last tq positions, as after a cache
    q, k, v = make_qkv(1, tq, tk, 2, 1, 4, dtype=torch.float64)
    kpm = (torch.rand(1, tk, generator=torch.Generator().manual_seed(tq)) > 0.4) if padded else None
    out = banded_attention(
        q, k, v, before=before, after=after, scale=0.5, q_offset=offset, key_padding_mask=kpm, block=block
    )
    assert_close("band", dense_band(q, k, v, before, after, offset, kpm, 0.5), out, 1e-10)


@settings(max_examples=40, deadline=None)
@given(t=st.integers(1, 50), chunk=st.integers(1, 64), groups=st.sampled_from([1, 2, 4]), decay=st.booleans())
def test_causal_linear_scan_property(t, chunk, groups, decay):
    q, k, v = make_qkv(1, t, t, 4, 4 // groups, 4, dv=3, dtype=torch.float64)
    s0 = torch.randn(1, 4 // groups, 4, 3, dtype=torch.float64)
    log_decay = torch.log(torch.linspace(0.5, 0.99, 4 // groups, dtype=torch.float64)) if decay else None
    out, final = causal_linear_scan(q, k, v, s0, chunk=chunk, log_decay=log_decay)
    ref, ref_final = naive_scan(q, k, v, s0, log_decay)
    assert_close("out", ref, out, 1e-12)
    assert_close("state", ref_final[:, ::groups], final, 1e-12)


@pytest.mark.parametrize("chunk", [3, 64])
def test_bidirectional_scan_matches_the_dense_form(chunk):
    q, k, v = make_qkv(2, 37, 37, 4, 2, 8, dv=5, dtype=torch.float64)
    log_decay = torch.log(torch.tensor([0.9, 0.6], dtype=torch.float64))
    out = bidirectional_linear_scan(q, k, v, chunk=chunk, log_decay=log_decay)
    i = torch.arange(37, dtype=torch.float64)
    dist = (i[:, None] - i[None, :]).abs()
    decay = log_decay.repeat_interleave(2)[:, None, None].exp() ** dist  # [H, T, T]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(2, 2)) * decay
    assert_close("bidirectional", torch.einsum("bhqk,bkhe->bqhe", scores, v.repeat_interleave(2, 2)), out, 1e-12)


def test_option_docs_survives_statements_over_several_lines():
    @dataclasses.dataclass(frozen=True)
    class Opts:
        size: int = 3  # how big it is

        def __post_init__(self):
            if self.size < 0:
                raise ValueError(
                    f"a message long enough to be split over several lines by the formatter, got {self.size}"
                )

    assert option_docs(Opts) == {"size": "how big it is"}


def test_step_outputs_stack_with_and_without_autograd():
    from attnkit.ops.steps import StepOutputs

    ys = [torch.randn(2, 3, 4) for _ in range(5)]
    plain = StepOutputs(5)
    for t, y in enumerate(ys):
        plain.add(t, y)
    torch.testing.assert_close(plain.stacked(), torch.stack(ys, 1), rtol=0, atol=0)

    w = torch.randn(4, requires_grad=True)
    tracked = StepOutputs(5)
    for t, y in enumerate(ys):
        tracked.add(t, y * w)
    tracked.stacked().sum().backward()
    torch.testing.assert_close(w.grad, sum(y.sum((0, 1)) for y in ys))
    with pytest.raises(ValueError, match="before any add"):
        StepOutputs(3).stacked()


def test_spatial_grid_helpers():
    from attnkit.ops.spatial import from_grid, grid_coords, pad_grid, to_grid

    t = torch.arange(2 * 12 * 3 * 1, dtype=torch.float32).view(2, 12, 3, 1)
    g = to_grid(t, (3, 4))
    assert g.shape == (2, 3, 4, 3, 1) and torch.equal(from_grid(g), t)
    assert torch.equal(g[0, 1, 2], t[0, 1 * 4 + 2])  # row-major: token i = row * w + column
    assert grid_coords((3, 4))[6].tolist() == [1, 2] and grid_coords((2, 2, 2))[5].tolist() == [1, 0, 1]
    padded, extra = pad_grid(g, (2, 3))
    assert padded.shape == (2, 4, 6, 3, 1) and extra == (1, 2)
    assert torch.equal(padded[:, :3, :4], g) and padded[:, 3].abs().sum() == 0 and padded[:, :, 4:].abs().sum() == 0
    with pytest.raises(ValueError, match="positions"):
        to_grid(t, (5, 5))
