"""Bad calls raise typed errors before any compute, the same way for every mechanism (DESIGN §1.6).

Names and paths of the wrong type, empty sizes, head counts, and every option of every registered
mechanism at and beyond its declared bounds. Generated from the registry: a new mechanism is checked
without new code here.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attnkit
from attnkit import InvalidOption, ShapeError, UnknownMechanism
from attnkit.mechanism import REGISTRY
from attnkit.options import MAX_HEAD_DIM, MAX_HEADS, int_limit, is_int_field
from attnkit.patterns import Pattern
from attnkit.testing import cases, make_qkv, pattern_path_grid

CASES = cases()
# cases that decode: a mechanism with state, in a case that runs causal_self (a grid form may have neither)
STATEFUL = [c for c in CASES if c.cls.state_kind is not None and Pattern.CAUSAL_SELF in c.patterns]
HQ, HKV, D = 4, 2, 8

# ---- names and paths of the wrong type ------------------------------------------------------------


@pytest.mark.parametrize("name", [3, None, 2.5, ("softmax",), b"softmax"], ids=repr)
def test_non_string_mechanism_names_raise_unknown_mechanism(name):
    q, k, v = make_qkv(1, 4, 4, 2, 2, 8)
    for call in (
        lambda: attnkit.attend(q, k, v, mechanism=name, pattern="causal_self"),
        lambda: attnkit.create(name),
        lambda: attnkit.info(name),
        lambda: attnkit.mechanisms(name),
        lambda: attnkit.Attention(16, heads=2, mechanism=name),
    ):
        with pytest.raises(UnknownMechanism) as err:
            call()
        msg = str(err.value)
        assert repr(name) in msg and "string" in msg and "softmax" in msg, msg


@pytest.mark.parametrize("path", [3, None, b"sdpa", ["sdpa"]], ids=repr)
def test_non_string_path_raises_invalid_option(path, monkeypatch):
    q, k, v = make_qkv(1, 4, 4, 2, 2, 8)
    with pytest.raises(InvalidOption) as err:
        attnkit.attend(q, k, v, "softmax", pattern="causal_self", path=path)
    msg = str(err.value)
    assert repr(path) in msg and "auto, reference, sdpa" in msg, msg
    monkeypatch.setenv("ATTNKIT_PATH", "reference")  # the environment does not hide a malformed argument
    with pytest.raises(InvalidOption):
        attnkit.attend(q, k, v, "softmax", pattern="causal_self", path=path)


# ---- empty sizes -----------------------------------------------------------------------------------


def _grid_items():
    """(case, pattern, path) for every supported pattern, with the reference and every fast path."""
    items = []
    for case in CASES:
        for pattern in sorted(case.patterns, key=lambda p: p.value):
            items.append((case, pattern, "reference"))
    return items + pattern_path_grid(CASES)


GRID = _grid_items()


def _id(item) -> str:
    case, pattern, path = item
    return f"{case.label}-{pattern.value}-{path}"


@pytest.mark.parametrize("item", GRID, ids=_id)
def test_empty_batch_gives_an_empty_output(item):
    """B = 0 returns an empty ``[0, Tq, Hq, Dv]`` output (as SDPA does), on every path, and gradients flow."""
    case, pattern, path = item
    mech = case.build(HQ, D)
    q, k, v = make_qkv(0, 5, 5 if pattern.is_self else 7, HQ, HKV, D, requires_grad=True)
    out = mech(q, k, v, pattern=pattern, path=path)
    assert out.shape == (0, 5, HQ, D) and out.dtype == q.dtype
    assert mech.last_path == path
    out.sum().backward()  # an empty batch is a valid (if useless) training step


@pytest.mark.parametrize("case", STATEFUL, ids=lambda c: c.label)
def test_empty_batch_with_state(case):
    """B = 0 with decoding state: an empty output and a state of batch 0 that counts the tokens."""
    mech = case.build(HQ, D)
    q, k, v = make_qkv(0, 5, 5, HQ, HKV, D)
    out, state = mech(q, k, v, pattern="causal_self", return_state=True)
    assert out.shape == (0, 5, HQ, D) and state.offset == 5
    out, state = mech(q[:, :1], k[:, :1], v[:, :1], pattern="causal_self", state=state, return_state=True)
    assert out.shape == (0, 1, HQ, D) and state.offset == 6


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_zero_sized_heads_and_head_dims_raise(case):
    """Dk = 0, Dv = 0 and Hq = 0 have no meaning (scale 1/sqrt(Dk), empty heads): ShapeError naming them."""
    mech = case.build(HQ, D)
    pattern = sorted(case.patterns, key=lambda p: not p.is_self)[0]
    tk = 6 if pattern.is_self else 7
    q, k, v = make_qkv(2, 6, tk, HQ, HKV, D)
    for label, kwargs, words in [
        ("Dk = 0", {"q": q[..., :0], "k": k[..., :0], "v": v}, ["head dim", "Dk=0"]),
        ("Dv = 0", {"q": q, "k": k, "v": v[..., :0]}, ["value head dim", "Dv=0"]),
        ("Hq = 0", {"q": q[:, :, :0], "k": k, "v": v}, ["0 heads"]),
    ]:
        with pytest.raises(ShapeError) as err:
            mech(pattern=pattern, **kwargs)
        assert all(w in str(err.value) for w in words), f"{label}: {err.value}"


# ---- create(): head counts -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["softmax", "gaussian"])
@pytest.mark.parametrize(
    ("key", "value"),
    [("heads", 0), ("heads", -2), ("heads", 2.5), ("heads", "8"), ("heads", True), ("heads", 2**70)]
    + [("head_dim", 0), ("head_dim", 2.0), ("head_dim", "64"), ("head_dim", False), ("head_dim", 2**70)],
    ids=repr,
)
def test_create_refuses_bad_head_counts(name, key, value):
    sizes = {"heads": 2, "head_dim": 8, key: value}
    with pytest.raises(InvalidOption) as err:
        attnkit.create(name, **sizes)
    msg = str(err.value)
    top = MAX_HEADS if key == "heads" else MAX_HEAD_DIM
    assert f"{key}={value!r}" in msg and f"[1, {top}]" in msg, msg


# ---- options: every int within declared bounds, every float finite ----------------------------------


def _fields():
    for name in REGISTRY.names():
        cls = REGISTRY.get(name)
        for f in dataclasses.fields(cls.Options):
            yield name, f


INT_FIELDS = [(n, f) for n, f in _fields() if is_int_field(f)]
FLOAT_FIELDS = [(n, f) for n, f in _fields() if "float" in str(f.type) and "tuple" not in str(f.type)]
TUPLE_FIELDS = [(n, f) for n, f in _fields() if "tuple[float" in str(f.type)]


def test_every_int_option_is_found():
    """Guard the generated tests below against an empty selection."""
    names = {f.name for _, f in INT_FIELDS}
    assert {"window", "chunk_size", "max_len", "features", "landmarks", "newton_iters", "seed"} <= names


@pytest.mark.parametrize(("name", "f"), INT_FIELDS, ids=lambda x: getattr(x, "name", x))
def test_int_options_have_an_upper_bound(name, f):
    """Beyond 64 bits, and one past the declared bound: InvalidOption naming the value and the range."""
    top = int_limit(f)
    assert top <= 2**63 - 1
    for value in (2**70, -(2**70), top + 1):
        with pytest.raises(InvalidOption) as err:
            attnkit.create(name, heads=HQ, head_dim=D, **{f.name: value})
        msg = str(err.value)
        assert f"{f.name}={value!r}" in msg and str(top) in msg, msg
    with pytest.raises(InvalidOption, match=f"{f.name}=True"):
        attnkit.create(name, heads=HQ, head_dim=D, **{f.name: True})


def test_window_beyond_64_bits_is_refused_at_attend():
    q, k, v = make_qkv(1, 4, 4, 2, 2, 8)
    with pytest.raises(InvalidOption, match=r"window=1180591620717411303424 .*<= \d+"):
        attnkit.attend(q, k, v, "sliding_window", pattern="causal_self", window=2**70)


@pytest.mark.parametrize(("name", "f"), FLOAT_FIELDS, ids=lambda x: getattr(x, "name", x))
def test_float_options_must_be_finite(name, f):
    for value in (float("nan"), float("inf"), float("-inf"), 2**1100):
        with pytest.raises(InvalidOption) as err:
            attnkit.create(name, heads=HQ, head_dim=D, **{f.name: value})
        assert f"{f.name}=" in str(err.value) and "finite" in str(err.value), str(err.value)


@pytest.mark.parametrize(("name", "f"), TUPLE_FIELDS, ids=lambda x: getattr(x, "name", x))
def test_per_head_float_options_must_be_finite(name, f):
    for value in ((float("nan"),), (0.5, float("inf"))):
        with pytest.raises(InvalidOption, match=f.name):
            attnkit.create(name, heads=HQ, head_dim=D, **{f.name: value})


@pytest.mark.parametrize("eps", [0.0, -1e-6, 0])
def test_linear_eps_must_be_positive(eps):
    with pytest.raises(InvalidOption) as err:
        attnkit.create("linear", eps=eps)
    assert f"eps={eps!r}" in str(err.value) and "positive" in str(err.value)


# ---- gaussian: options that would make every output NaN -------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"init_scale": 1e20},  # xi = c^2 overflows fp32: the blocked path's 1/r is inf
        {"init_scale": 1e-23},  # xi = c^2 underflows to 0: every log-weight is -inf
        {"init_offset": 1e20},  # (s - mu - delta)^2 overflows: every weight -inf
        {"init_offset": -1e20},
        {"eps": 1e38},  # var + eps times xi overflows in the blocked path
    ],
    ids=repr,
)
def test_gaussian_refuses_options_that_give_nan(options):
    ((key, value),) = options.items()
    with pytest.raises(InvalidOption) as err:
        attnkit.create("gaussian", heads=2, head_dim=8, **options)
    assert f"{key}={value!r}" in str(err.value) and "[" in str(err.value), str(err.value)


@pytest.mark.parametrize("options", [{}, {"init_scale": 1e-6}, {"init_scale": 1e6}, {"init_offset": 1e4},
                                     {"init_offset": -1e4}, {"eps": 1e-12}, {"eps": 1e4},
                                     {"init_scale": 1e-6, "init_offset": 1e4, "eps": 1e-12},
                                     {"init_scale": 1e6, "init_offset": -1e4, "eps": 1e4}], ids=repr)  # fmt: skip
def test_gaussian_options_at_their_bounds_give_finite_outputs(options):
    mech = attnkit.create("gaussian", heads=2, head_dim=8, **options)
    q, k, v = make_qkv(2, 40, 40, 2, 2, 8)
    for pattern in ("causal_self", "noncausal_self"):
        for path in ("reference", "blocked"):
            out = mech(q, k, v, pattern=pattern, path=path)
            assert torch.isfinite(out).all(), (options, pattern, path)
