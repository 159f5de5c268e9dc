"""Bad calls raise typed errors before any compute, the same way for every mechanism (DESIGN §1.6).

Names and paths of the wrong type, empty sizes, head counts, and every option of every registered
mechanism at and beyond its declared bounds. Generated from the registry: a new mechanism is checked
without new code here.
"""

from __future__ import annotations

import pytest

import attnkit
from attnkit import InvalidOption, ShapeError, UnknownMechanism
from attnkit.testing import cases, make_qkv, pattern_path_grid

CASES = cases()
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
        for pattern in sorted(case.cls.patterns, key=lambda p: p.value):
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


@pytest.mark.parametrize("case", [c for c in CASES if c.cls.state_kind is not None], ids=lambda c: c.label)
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
    pattern = sorted(case.cls.patterns, key=lambda p: not p.is_self)[0]
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
