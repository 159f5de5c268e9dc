"""sliding_window: the window rule, its limits (softmax, identity) and the bounded cache."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit.testing import assert_close, make_qkv


def per_query_loop(q, k, v, window, causal):
    b, t, h, d = q.shape
    out = torch.zeros(b, t, h, v.shape[-1], dtype=torch.float64)
    for i in range(t):
        lo = max(0, i - window + 1)
        hi = i + 1 if causal else min(t, i + window)
        s = torch.einsum("bhd,bkhd->bhk", q[:, i].double(), k[:, lo:hi].double()) / math.sqrt(d)
        out[:, i] = torch.einsum("bhk,bkhd->bhd", s.softmax(-1), v[:, lo:hi].double())
    return out


@pytest.mark.parametrize("pattern", ["causal_self", "noncausal_self"])
@pytest.mark.parametrize("window", [1, 3, 8])
def test_reference_and_paths_follow_the_window_rule(pattern, window):
    q, k, v = make_qkv(2, 21, 21, 2, 2, 8, dtype=torch.float64)
    expected = per_query_loop(q, k, v, window, pattern == "causal_self")
    for path in ("reference", "dense", "blocked"):
        out = attnkit.attend(q, k, v, "sliding_window", pattern=pattern, window=window, path=path)
        assert_close(path, expected, out, 1e-10)


@pytest.mark.parametrize("pattern", ["causal_self", "noncausal_self"])
def test_window_covering_everything_is_softmax(pattern):
    q, k, v = make_qkv(2, 30, 30, 4, 2, 16)
    soft = attnkit.attend(q, k, v, pattern=pattern)
    for path in ("dense", "blocked", "reference"):
        out = attnkit.attend(q, k, v, "sliding_window", pattern=pattern, window=30, path=path)
        assert_close(path, soft, out, 1e-5)


def test_window_one_causal_returns_values():
    q, k, v = make_qkv(2, 12, 12, 4, 2, 16)
    out = attnkit.attend(q, k, v, "sliding_window", pattern="causal_self", window=1)
    assert_close("identity", v.repeat_interleave(2, 2), out, 1e-6)


def test_window_cache_is_bounded():
    q, k, v = make_qkv(1, 100, 100, 2, 2, 8)
    state, outs = None, []
    for i in range(100):
        o, state = attnkit.attend(
            q[:, i : i + 1],
            k[:, i : i + 1],
            v[:, i : i + 1],
            "sliding_window",
            pattern="causal_self",
            window=4,
            state=state,
            return_state=True,
        )
        outs.append(o)
        assert state.k.shape[1] == min(i + 1, 3)
    full = attnkit.attend(q, k, v, "sliding_window", pattern="causal_self", window=4)
    assert_close("decoded", full, torch.cat(outs, 1), 1e-5)


def test_decoding_holds_the_tokens_seen_not_the_window():
    """window = 2^20: after 16 decoded tokens the cache holds about 16 rows (it used to preallocate the
    window: 2 GiB after 16 tokens at window 2^17, out of memory at 2^20) and nbytes says what it holds."""
    q, k, v = make_qkv(1, 16, 16, 1, 1, 4)
    mech = attnkit.create("sliding_window", window=2**20)
    state, row = None, 2 * 4 * 4  # bytes of one key and one value
    with torch.no_grad():
        for i in range(16):
            _, state = mech(q[:, i : i + 1], k[:, i : i + 1], v[:, i : i + 1], pattern="causal_self",
                            state=state, return_state=True)  # fmt: skip
    assert state.length == 16
    assert state.nbytes == _held(state), "nbytes must count the buffer the cache keeps alive"
    assert state.nbytes <= 128 * row


def _held(state) -> int:
    """Bytes of every storage the state's tensors keep alive, each counted once."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state.tensors().values()}
    return sum(storages.values())


def test_long_prefill_keeps_only_the_window():
    """A chunk much longer than the window leaves a cache of window - 1 keys (plus room), not the chunk."""
    q, k, v = make_qkv(1, 500, 500, 1, 1, 4)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            _, state = attnkit.attend(q, k, v, "sliding_window", pattern="causal_self", window=4, return_state=True)
        assert state.length == 3 and _held(state) <= 3 * 2 * 4 * 4, f"grad={grad}: {_held(state)} bytes held"
