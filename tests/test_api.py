"""The public API: attend, create, mechanisms, info, paths, errors, options."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attnkit
from attnkit import AttnkitError, InvalidOption, Pattern, UnknownMechanism
from attnkit.mechanism import REGISTRY, Complexity, Mechanism, Paper, register_mechanism
from attnkit.testing import make_qkv


def test_public_names():
    for name in [
        "attend",
        "create",
        "Attention",
        "mechanisms",
        "info",
        "Pattern",
        "last_path",
        "AttnkitError",
        "ShapeError",
        "UnsupportedPattern",
        "UnknownMechanism",
        "InvalidOption",
        "KVCache",
        "WindowCache",
        "RecurrentState",
    ]:
        assert hasattr(attnkit, name), name


def test_errors_are_value_errors():
    for cls in (attnkit.ShapeError, attnkit.UnsupportedPattern, UnknownMechanism, InvalidOption, attnkit.DTypeError):
        assert issubclass(cls, AttnkitError) and issubclass(cls, ValueError)
    assert issubclass(attnkit.DTypeError, TypeError)


def test_pattern_accepts_strings_and_enum():
    q, k, v = make_qkv(1, 5, 5, 2, 2, 8)
    a = attnkit.attend(q, k, v, pattern="causal_self")
    b = attnkit.attend(q, k, v, pattern=Pattern.CAUSAL_SELF)
    assert torch.equal(a, b)
    assert Pattern("noncausal_cross") is Pattern.NONCAUSAL_CROSS and str(Pattern.CAUSAL_CROSS) == "causal_cross"


def test_pattern_is_required():
    q, k, v = make_qkv(1, 5, 5, 2, 2, 8)
    with pytest.raises(TypeError, match="pattern"):
        attnkit.attend(q, k, v)


def test_mechanisms_listing_and_wildcards():
    names = [m.name for m in attnkit.mechanisms()]
    assert {"softmax", "sigmoid", "linear", "sliding_window"} <= set(names)
    assert names == sorted(names)
    assert [m.name for m in attnkit.mechanisms("s*")] == [n for n in names if n.startswith("s")]
    assert [m.name for m in attnkit.mechanisms("lin*")] == ["linear", "linformer"]
    cross = {m.name for m in attnkit.mechanisms(pattern="noncausal_cross")}
    assert "softmax" in cross and "sliding_window" not in cross


def test_info_fields():
    i = attnkit.info("sliding_window")
    assert i.name == "sliding_window" and i.kind == "attention" and i.exact and not i.trainable
    assert i.patterns == frozenset({Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF})
    assert i.supports_state and i.state_kind == "WindowCache" and not i.spatial
    assert "blocked" in i.paths and i.paper.year == 2020 and i.paper.arxiv == "2004.05150"
    assert [f.name for f in dataclasses.fields(i.options)] == ["window"]
    assert "window" in i.complexity.time


def test_unknown_mechanism_suggests():
    with pytest.raises(UnknownMechanism, match="Did you mean 'softmax'") as err:
        attnkit.info("sofmax")
    assert "Available:" in str(err.value) and "linear" in str(err.value)
    q, k, v = make_qkv(1, 4, 4, 2, 2, 8)
    with pytest.raises(UnknownMechanism, match="sliding_window"):
        attnkit.attend(q, k, v, "sliding_windows", pattern="causal_self")


def test_unknown_option_lists_valid_ones():
    q, k, v = make_qkv(1, 4, 4, 2, 2, 8)
    with pytest.raises(InvalidOption) as err:
        attnkit.attend(q, k, v, "sliding_window", pattern="causal_self", windw=3)
    msg = str(err.value)
    assert "'windw'" in msg and "Did you mean 'window'" in msg and "Valid options: window" in msg
    with pytest.raises(InvalidOption, match="softmax has no option 'window'.*Valid options: none"):
        attnkit.attend(q, k, v, "softmax", pattern="causal_self", window=3)


@pytest.mark.parametrize(
    ("name", "options", "words"),
    [
        ("sliding_window", {"window": 0}, ["window=0", "integer >= 1"]),
        ("sliding_window", {"window": 2.5}, ["window=2.5"]),
        ("linear", {"feature_map": "elu"}, ["feature_map='elu'", "elu1, relu, identity", "Did you mean"]),
        ("linear", {"eps": float("nan")}, ["eps=nan", "finite"]),
        ("linear", {"chunk_size": -4}, ["chunk_size=-4"]),
        ("sigmoid", {"bias": "low"}, ["bias='low'"]),
    ],
)
def test_bad_option_values(name, options, words):
    with pytest.raises(InvalidOption) as err:
        attnkit.create(name, **options)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_none_option_means_default():
    m = attnkit.create("sliding_window", window=None)
    assert m.options.window == 256


def test_path_selection_and_last_path(monkeypatch):
    q, k, v = make_qkv(1, 300, 300, 2, 2, 8)
    attnkit.attend(q, k, v, "linear", pattern="causal_self")
    assert attnkit.last_path() == "chunk"
    attnkit.attend(q, k, v, "linear", pattern="noncausal_self")
    assert attnkit.last_path() == "associative"
    attnkit.attend(q, k, v, "linear", pattern="noncausal_self", path="reference")
    assert attnkit.last_path() == "reference"
    # dispatch heuristic: sliding_window uses dense SDPA while the band covers most of the matrix
    attnkit.attend(q, k, v, "sliding_window", pattern="causal_self", window=256)
    assert attnkit.last_path() == "dense"
    attnkit.attend(q, k, v, "sliding_window", pattern="causal_self", window=16)
    assert attnkit.last_path() == "blocked"

    monkeypatch.setenv("ATTNKIT_PATH", "reference")
    attnkit.attend(q, k, v, "linear", pattern="causal_self")
    assert attnkit.last_path() == "reference"
    attnkit.attend(q, k, v, "softmax", pattern="causal_self", path="sdpa")
    assert attnkit.last_path() == "reference"
    monkeypatch.setenv("ATTNKIT_PATH", "fast")
    with pytest.raises(InvalidOption, match="ATTNKIT_PATH='fast'"):
        attnkit.attend(q, k, v, "softmax", pattern="causal_self")


def test_explicit_path_that_cannot_take_the_inputs():
    q, k, v = make_qkv(1, 6, 6, 2, 2, 8)
    with pytest.raises(InvalidOption, match="path 'chunk' cannot take these inputs: chunk is for causal_self"):
        attnkit.attend(q, k, v, "linear", pattern="noncausal_self", path="chunk")
    with pytest.raises(InvalidOption, match="Valid paths: auto, reference, associative, chunk, recurrent"):
        attnkit.attend(q, k, v, "linear", pattern="noncausal_self", path="chunked")


def test_scale_is_used_and_linear_refuses_it():
    q, k, v = make_qkv(1, 6, 6, 2, 2, 8)
    a = attnkit.attend(q, k, v, pattern="noncausal_self", scale=0.1)
    b = attnkit.attend(q * 0.1, k, v, pattern="noncausal_self", scale=1.0)
    torch.testing.assert_close(a, b)
    with pytest.raises(InvalidOption, match="linear does not use a score scale"):
        attnkit.attend(q, k, v, "linear", pattern="noncausal_self", scale=0.1)


def test_output_dtype_device_and_layout():
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        q, k, v = make_qkv(2, 9, 9, 4, 2, 16, dtype=dtype)
        for name in ("softmax", "sigmoid", "linear", "sliding_window"):
            out = attnkit.attend(q, k, v, name, pattern="causal_self")
            assert out.dtype == dtype and out.shape == (2, 9, 4, 16) and out.is_contiguous(), (name, dtype)


def test_value_dim_may_differ():
    q, k, v = make_qkv(2, 9, 13, 4, 2, 16, dv=24)
    for name in ("softmax", "sigmoid", "linear"):
        fast = attnkit.attend(q, k, v, name, pattern="noncausal_cross")
        ref = attnkit.attend(q, k, v, name, pattern="noncausal_cross", path="reference")
        assert fast.shape == (2, 9, 4, 24)
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


@pytest.fixture
def trainable_mechanism():
    """A throwaway trainable mechanism, removed from the registry afterwards."""

    class Scaled(Mechanism):
        family = "test"
        paper = Paper("none", 2026)
        patterns = frozenset(Pattern)
        exact = False
        trainable = True
        complexity = Complexity("O(1)", "O(1)")

        def __init__(self, heads=None, head_dim=None, **options):
            super().__init__(heads, head_dim, **options)
            self.gain = torch.nn.Parameter(torch.ones(heads))

        def reference(self, x):
            return x.v.repeat_interleave(x.groups, 2)[:, : x.tq] * self.gain[:, None], None

        def flops(self, shape, pattern):
            return 0.0

    register_mechanism("_test_scaled")(Scaled)
    yield "_test_scaled"
    REGISTRY._entries.pop("_test_scaled")


def test_attend_refuses_trainable_mechanisms(trainable_mechanism):
    q, k, v = make_qkv(1, 4, 4, 2, 2, 8)
    with pytest.raises(AttnkitError, match=r"use m = attnkit.create\('_test_scaled'"):
        attnkit.attend(q, k, v, trainable_mechanism, pattern="noncausal_self")
    m = attnkit.create(trainable_mechanism, heads=2, head_dim=8)
    assert m(q, k, v, pattern="noncausal_self").shape == (1, 4, 2, 8)
    assert attnkit.last_path() == "reference"
    with pytest.raises(attnkit.ShapeError, match="created for 2 heads; got q with 4"):
        q4, k4, v4 = make_qkv(1, 4, 4, 4, 2, 8)
        m(q4, k4, v4, pattern="noncausal_self")


def test_module_and_functional_agree():
    q, k, v = make_qkv(2, 11, 11, 4, 2, 16)
    mech = attnkit.create("sliding_window", window=3)
    assert isinstance(mech, torch.nn.Module)
    assert torch.equal(
        mech(q, k, v, pattern="causal_self"), attnkit.attend(q, k, v, "sliding_window", pattern="causal_self", window=3)
    )


def test_state_objects():
    q, k, v = make_qkv(2, 10, 10, 4, 2, 16)
    _, st = attnkit.attend(q, k, v, "linear", pattern="causal_self", return_state=True)
    assert isinstance(st, attnkit.RecurrentState) and st.offset == 10
    assert st.S.shape == (2, 2, 16, 16) and st.z.shape == (2, 2, 16) and st.S.dtype == torch.float32
    assert st.nbytes == (2 * 2 * 16 * 16 + 2 * 2 * 16) * 4
    moved = st.to(torch.float64)
    assert moved.S.dtype == torch.float64 and st.S.dtype == torch.float32  # a new state; the old one is unchanged
    _, wc = attnkit.attend(q, k, v, "sliding_window", pattern="causal_self", window=4, return_state=True)
    assert isinstance(wc, attnkit.WindowCache) and wc.k.shape[1] == 3 and wc.offset == 10
    torch.testing.assert_close(wc.k, k[:, -3:])
    _, kv = attnkit.attend(q, k, v, "softmax", pattern="causal_self", return_state=True)
    assert isinstance(kv, attnkit.KVCache) and kv.length == 10 and kv.k.nbytes + kv.v.nbytes == 2 * 10 * 2 * 32 * 4
    assert kv.nbytes >= 2 * 10 * 2 * 32 * 4  # and the room to grow of the buffer k, v are views of


def test_mechanisms_function_survives_submodule_imports():
    import importlib

    importlib.import_module("attnkit.mechanisms.softmax")
    assert callable(attnkit.mechanisms) and attnkit.mechanisms("softmax")[0].name == "softmax"


def test_kv_cache_buffer_never_rewrites_rows_another_state_sees():
    """Decoding without grad appends in place; extending an older state again must not corrupt the newer one."""
    q, k, v = make_qkv(1, 12, 12, 2, 2, 8)
    with torch.no_grad():
        _, s8 = attnkit.attend(q[:, :8], k[:, :8], v[:, :8], pattern="causal_self", return_state=True)
        out_a, s9a = attnkit.attend(q[:, 8:9], k[:, 8:9], v[:, 8:9], pattern="causal_self", state=s8, return_state=True)
        assert s9a._buffer is s8._buffer  # appended in place
        other = torch.randn_like(k[:, 8:9])
        _, s9b = attnkit.attend(q[:, 8:9], other, other, pattern="causal_self", state=s8, return_state=True)
        assert s9b._buffer is not s9a._buffer  # a branch gets its own storage
        torch.testing.assert_close(s9a.k, k[:, :9])  # the first branch still sees its own keys
        torch.testing.assert_close(s9b.k[:, 8:], other)
        full = attnkit.attend(q[:, :10], k[:, :10], v[:, :10], pattern="causal_self")
        step, _ = attnkit.attend(
            q[:, 9:10], k[:, 9:10], v[:, 9:10], pattern="causal_self", state=s9a, return_state=True
        )
    torch.testing.assert_close(step[:, 0], full[:, 9])
    moved = s9a.to(torch.float64)
    assert moved._buffer is None and moved.k.dtype == torch.float64
