"""linformer: the projections written out, identity projections give softmax, max_len, padding as removal,
causal_cross, sharing variants, init, option checks, and linear memory in the fast path."""

from __future__ import annotations

import pytest
import torch
from largest_tensor import largest_tensor

import attnkit
from attnkit.errors import InvalidOption, ShapeError, UnsupportedPattern
from attnkit.testing import assert_close, make_qkv


def literal(q, k, v, e, f, scale):
    """out_h = softmax(scale Q_h (E_h K_h)^T) (F_h V_h), one head at a time; e, f [H|1, k, >= Tk]."""
    outs = []
    for h in range(q.shape[2]):
        eh, fh = e[h % e.shape[0], :, : k.shape[1]], f[h % f.shape[0], :, : k.shape[1]]
        kh, vh = eh @ k[:, :, h], fh @ v[:, :, h]  # [B, k, D]
        outs.append(torch.softmax(scale * q[:, :, h] @ kh.transpose(1, 2), -1) @ vh)
    return torch.stack(outs, dim=2)


@pytest.mark.parametrize("sharing", ["none", "headwise", "key_value"])
@pytest.mark.parametrize("path", ["reference", "sdpa"])
def test_paths_equal_the_written_out_formula(sharing, path):
    mech = attnkit.create("linformer", heads=3, head_dim=8, proj_len=5, max_len=40, sharing=sharing).double()
    q, k, v = make_qkv(2, 11, 13, 3, 3, 8, dtype=torch.float64)
    f = mech.proj_k if mech.proj_v is None else mech.proj_v
    want = literal(q, k, v, mech.proj_k.detach(), f.detach(), 8**-0.5)  # first Tk = 13 columns of E, F
    assert_close(path, want, mech(q, k, v, pattern="noncausal_cross", path=path), 1e-9)


@pytest.mark.parametrize("path", ["reference", "sdpa"])
def test_identity_projections_give_softmax_attention(path):
    t = 7
    mech = attnkit.create("linformer", heads=2, head_dim=8, proj_len=t, max_len=t)
    with torch.no_grad():
        mech.proj_k.copy_(torch.eye(t)[None])
        mech.proj_v.copy_(torch.eye(t)[None])
    q, k, v = make_qkv(1, t, t, 2, 2, 8)
    want = attnkit.attend(q, k, v, "softmax", pattern="noncausal_self")
    assert_close("identity", want, mech(q, k, v, pattern="noncausal_self", path=path), 2e-5)


def test_longer_than_max_len_raises_before_compute():
    mech = attnkit.create("linformer", heads=2, head_dim=8, proj_len=4, max_len=16)
    q, k, v = make_qkv(1, 3, 17, 2, 2, 8)
    with pytest.raises(ShapeError, match="max_len=16"):
        mech(q, k, v, pattern="noncausal_cross")
    mech(q, k[:, :16], v[:, :16], pattern="noncausal_cross")  # 16 is fine


@pytest.mark.parametrize("path", ["reference", "sdpa"])
def test_padding_anywhere_is_as_if_removed(path):
    mech = attnkit.create("linformer", heads=2, head_dim=8, proj_len=6, max_len=64)
    q, k, v = make_qkv(2, 9, 30, 2, 2, 8)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[:, 3:8] = False
    mask[1, 20:] = False
    out = mech(q, k, v, pattern="noncausal_cross", key_padding_mask=mask, path=path)
    for b in range(2):
        keep = mask[b]
        want = mech(q[b : b + 1], k[b : b + 1, keep], v[b : b + 1, keep], pattern="noncausal_cross", path=path)
        assert_close(f"row {b}", want, out[b : b + 1], 2e-5)


def test_causal_cross_is_noncausal_cross_and_causal_self_raises():
    mech = attnkit.create("linformer", heads=2, head_dim=8, proj_len=4, max_len=32)
    q, k, v = make_qkv(1, 9, 12, 2, 2, 8)
    assert torch.equal(mech(q, k, v, pattern="causal_cross"), mech(q, k, v, pattern="noncausal_cross"))
    with pytest.raises(UnsupportedPattern, match="causal_self"):
        mech(q, k[:, :9], v[:, :9], pattern="causal_self")


def test_parameters_per_sharing_and_their_init():
    shapes = {
        s: [tuple(p.shape) for p in attnkit.create("linformer", heads=4, head_dim=8, proj_len=64, max_len=512,
                                                   sharing=s).parameters()]
        for s in ("none", "headwise", "key_value")
    }  # fmt: skip
    assert shapes == {"none": [(4, 64, 512)] * 2, "headwise": [(1, 64, 512)] * 2, "key_value": [(1, 64, 512)]}
    e = attnkit.create("linformer", heads=4, head_dim=8, proj_len=64, max_len=4096).proj_k
    assert abs(e.std().item() - 64**-0.5) < 0.01  # N(0, 1/proj_len)


def test_gradients_reach_the_projections():
    mech = attnkit.create("linformer", heads=2, head_dim=8, proj_len=4, max_len=32)
    q, k, v = make_qkv(1, 10, 10, 2, 2, 8)
    mech(q, k, v, pattern="noncausal_self").sum().backward()
    assert mech.proj_k.grad[..., :10].abs().sum() > 0 and mech.proj_v.grad[..., :10].abs().sum() > 0
    assert mech.proj_k.grad[..., 10:].abs().sum() == 0  # columns beyond T are not used


@pytest.mark.parametrize(
    ("option", "value"),
    [("proj_len", 0), ("proj_len", 2**70), ("max_len", -1), ("max_len", 2**70), ("sharing", "layerwise"),
     ("sharing", 1), ("proj_len", 4.0)],
)  # fmt: skip
def test_options_are_checked(option, value):
    with pytest.raises(InvalidOption, match=option):
        attnkit.create("linformer", heads=2, head_dim=8, **{option: value})


def test_needs_heads_and_head_dim():
    with pytest.raises(InvalidOption, match="heads"):
        attnkit.create("linformer")


def test_fast_path_never_makes_a_quadratic_tensor():
    t = 1024
    mech = attnkit.create("linformer", heads=2, head_dim=16, proj_len=16, max_len=t)
    q, k, v = make_qkv(1, t, t, 2, 2, 16)
    mask = torch.ones(1, t, dtype=torch.bool)
    mask[0, :5] = False
    numel, shape = largest_tensor(lambda: mech(q, k, v, pattern="noncausal_self", key_padding_mask=mask, path="sdpa"))
    assert numel <= t * 2 * 16, shape  # q's size: no [T, T] scores
