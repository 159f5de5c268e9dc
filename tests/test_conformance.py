"""The conformance suite (DESIGN §2.1), generated from the registry.

Every registered attention mechanism, with each of its example option sets, is checked here on every
pattern it declares and every fast path that takes the pattern. A new mechanism needs no new code
in this file.
"""

from __future__ import annotations

import pytest
import torch

from attnkit import Pattern
from attnkit.errors import UnsupportedPattern
from attnkit.mechanism import Shape
from attnkit.ops.gqa import repeat_kv
from attnkit.state import KVCache
from attnkit.testing import (
    DTYPE_NAMES,
    assert_close,
    cases,
    make_qkv,
    pattern_path_grid,
    random_chunks,
    rel_rmse,
)

CASES = cases()


GRID = pattern_path_grid(CASES)  # (case, pattern, fast path)
STATE_GRID = [
    (case, path)
    for case in CASES
    if case.decodes
    for path in ["reference"] + [p for c, pat, p in GRID if c == case and pat is Pattern.CAUSAL_SELF]
]
# every path, the reference included
PATH_GRID = [
    (case, pattern, "reference") for case in CASES for pattern in sorted(case.patterns, key=lambda p: p.value)
] + GRID
B, HQ, HKV = 2, 4, 2
# (Tq, Tk, D): odd lengths, two head dims; cross shapes have Tq != Tk in both directions
SELF_SHAPES = [(1, 1, 24), (7, 7, 64), (63, 63, 24), (200, 200, 64)]
CROSS_SHAPES = [(1, 7, 24), (7, 63, 64), (63, 200, 24), (200, 31, 64)]
GRAD_SLACK = 2.0  # gradients pass through one more reduction than outputs


def grid_id(item) -> str:
    case, pattern, path = item
    return f"{case.label}-{pattern.value}-{path}"


def sizes_id(i: int) -> str:
    return "T{}x{}-D{}".format(*SELF_SHAPES[i]) + "|T{}x{}".format(*CROSS_SHAPES[i][:2])


@pytest.mark.parametrize("shape_i", range(len(SELF_SHAPES)), ids=sizes_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("item", GRID, ids=grid_id)
def test_fast_path_matches_reference(item, dtype, shape_i):
    """Forward output and input gradients of each fast path against the reference."""
    case, pattern, path = item
    tq, tk, d = (SELF_SHAPES if pattern.is_self else CROSS_SHAPES)[shape_i]
    mech = case.build(HQ, d)
    tol = mech.tolerances[dtype]
    q, k, v = make_qkv(B, tq, tk, HQ, HKV, d, dtype=dtype, requires_grad=True)

    ref = mech(q, k, v, pattern=pattern, path="reference")
    assert mech.last_path == "reference"
    grad_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out, allow_unused=True)

    out = mech(q, k, v, pattern=pattern, path=path)
    assert mech.last_path == path
    assert out.dtype == dtype and out.shape == (B, tq, HQ, d)
    assert_close("out", ref, out, tol)
    grads = torch.autograd.grad(out, (q, k, v), grad_out, allow_unused=True)
    for name, r, f in zip(("dq", "dk", "dv"), ref_grads, grads, strict=True):
        if r is None:
            assert f is None, f"{name}: the path has a gradient where the reference has none"
            continue
        assert_close(name, r, f, tol * GRAD_SLACK)


@pytest.mark.parametrize("item", GRID, ids=grid_id)
def test_fp16_forward(item):
    case, pattern, path = item
    mech = case.build(HQ, 24)
    q, k, v = make_qkv(B, 33, 33 if pattern.is_self else 21, HQ, HKV, 24, dtype=torch.float16)
    ref = mech(q, k, v, pattern=pattern, path="reference")
    assert_close("out", ref, mech(q, k, v, pattern=pattern, path=path), mech.tolerances[torch.float16])


@pytest.mark.parametrize("item", GRID, ids=grid_id)
def test_pattern_contract(item):
    """CAB's truncation checks: causal patterns never let a later query or key change an earlier output."""
    case, pattern, path = item
    t, d = 40, 24
    mech = case.build(HQ, d)
    tol = mech.tolerances[torch.float32]
    q, k, v = make_qkv(B, t, t if pattern.is_self else 29, HQ, HKV, d)
    full = mech(q, k, v, pattern=pattern, path=path)
    assert torch.isfinite(full).all()
    if pattern is Pattern.CAUSAL_SELF and case.spatial_dims:
        # a grid is causal along its leading axis (frames, rows): whole leading slices are the prefixes
        grid = case.grid(t)
        row = t // grid[0]
        for rows in sorted({1, 2, grid[0] - 1} - {0}):
            n = rows * row
            short = mech(q[:, :n], k[:, :n], v[:, :n], pattern=pattern, path=path, spatial_shape=(rows, *grid[1:]))
            assert_close(f"first {rows} of {grid}", full[:, :n], short, tol)
    elif pattern is Pattern.CAUSAL_SELF:
        for i in (0, 1, 20, t - 1):
            short = mech(q[:, : i + 1], k[:, : i + 1], v[:, : i + 1], pattern=pattern, path=path)
            assert_close(f"prefix {i + 1}", full[:, i], short[:, i], tol)
    elif pattern is Pattern.CAUSAL_CROSS:
        for i in (0, 1, 20, t - 1):
            short = mech(q[:, : i + 1], k, v, pattern=pattern, path=path)
            assert_close(f"queries {i + 1}", full[:, i], short[:, i], tol)
    else:
        # noncausal: the first query must see past itself (the later keys change its output)
        k2, v2 = k.clone(), v.clone()
        k2[:, 1:] += torch.randn_like(k2[:, 1:])
        v2[:, 1:] += torch.randn_like(v2[:, 1:])
        moved = mech(q, k2, v2, pattern=pattern, path=path)
        assert rel_rmse(full[:, 0], moved[:, 0]) > 1e-3, "output ignores every key after the first"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_unsupported_patterns_raise(case):
    mech = case.build(HQ, 16)
    missing = [p for p in Pattern if p not in case.patterns]
    for pattern in missing:
        q, k, v = make_qkv(1, 8, 8, HQ, HKV, 16)
        for path in ["auto", "reference"]:
            with pytest.raises(UnsupportedPattern) as err:
                mech(q, k, v, pattern=pattern, path=path)
            msg = str(err.value)
            assert case.mechanism in msg and pattern.value in msg
            assert all(p.value in msg for p in case.patterns), msg


@pytest.mark.parametrize("autograd", [True, False], ids=["grad", "nograd"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("item", STATE_GRID, ids=lambda it: f"{it[0].label}-{it[1]}")
def test_chunked_state_equals_full_call(item, masked, autograd):
    """Random chunk sizes (several of 1) with state reproduce one full causal call: outputs, grads, state.

    Without autograd, KV caches append into a shared buffer instead of concatenating: both ways run.
    """
    case, path = item
    t, d = 50, 24
    mech = case.build(HQ, d)
    tol = mech.tolerances[torch.float32]
    q, k, v = make_qkv(B, t, t, HQ, HKV, d, requires_grad=autograd)
    kpm = None
    if masked:
        kpm = torch.rand(B, t, generator=torch.Generator().manual_seed(3)) > 0.3
        kpm[0, :4] = False  # the first queries of row 0 see no real key at all
    full = mech(q, k, v, pattern=Pattern.CAUSAL_SELF, key_padding_mask=kpm, path=path)

    # a grid is fed in whole leading slices (rows, frames): chunk sizes are counted in slices
    grid = case.grid(t) if case.spatial_dims else None
    row = t // grid[0] if grid else 1
    state, outs, start = None, [], 0
    with torch.set_grad_enabled(autograd):
        for n in (rows * row for rows in random_chunks(t // row, seed=7)):
            sl = slice(start, start + n)
            mask = None if kpm is None else kpm[:, sl]
            where = {"spatial_shape": (n // row, *grid[1:])} if grid else {}
            o, state = mech(
                q[:, sl],
                k[:, sl],
                v[:, sl],
                pattern="causal_self",
                key_padding_mask=mask,
                state=state,
                return_state=True,
                path=path,
                **where,
            )
            assert mech.last_path == path
            outs.append(o)
            start += n
    chunked = torch.cat(outs, dim=1)
    assert_close("chunked out", full, chunked, tol)
    if autograd:
        g = torch.randn_like(full)
        full_grads = torch.autograd.grad(full, (q, k, v), g, allow_unused=True)
        chunk_grads = torch.autograd.grad(chunked, (q, k, v), g, allow_unused=True)
        for name, r, f in zip(("dq", "dk", "dv"), full_grads, chunk_grads, strict=True):
            if r is None:  # an input the mechanism does not use (aaren's learned query replaces q)
                assert f is None, f"chunked {name}: a gradient where the full call has none"
                continue
            assert_close(f"chunked {name}", r, f, tol * GRAD_SLACK)

    assert state.offset == t
    _, ref_state = mech(q, k, v, pattern="causal_self", key_padding_mask=kpm, return_state=True, path="reference")
    assert type(state) is type(ref_state)
    for name, ref_t in ref_state.tensors().items():
        assert_close(f"state.{name}", ref_t.detach(), state.tensors()[name].detach(), tol)
    if not masked:  # the formula counts the state's tensors; nbytes adds a KV cache's room to grow
        shape = Shape(B, t, t, HQ, HKV, d, d)
        assert sum(x.nbytes for x in state.tensors().values()) == mech.state_bytes(shape, q.dtype)
        assert state.nbytes >= mech.state_bytes(shape, q.dtype)


@pytest.mark.parametrize("autograd", [True, False], ids=["grad", "nograd"])
@pytest.mark.parametrize("case", [c for c in CASES if c.decodes], ids=lambda c: c.label)
def test_state_nbytes_is_the_memory_it_holds(case, autograd):
    """``nbytes`` counts every storage the state's tensors keep alive (a KV cache's room to grow included),
    and a state keeps no per-token tensor of the calls that made it alive: only its own tensors, plus, for a
    KV cache, room that grows with the tokens seen (at most a quarter more rows, or 64)."""
    t, d = 60, 16
    mech = case.build(HQ, d)
    step = 1  # a grid steps by one leading slice (a row, a frame)
    where: dict = {}
    if case.spatial_dims:
        grid = case.grid(120)  # a grid with several leading slices
        step = 120 // grid[0]
        t = 120 - step
        where = {"spatial_shape": (grid[0] - 1, *grid[1:])}, {"spatial_shape": (1, *grid[1:])}
    q, k, v = make_qkv(B, t + step, t + step, HQ, HKV, d, requires_grad=autograd)
    first, then = where or ({}, {})
    with torch.set_grad_enabled(autograd):
        _, prefilled = mech(q[:, :t], k[:, :t], v[:, :t], pattern="causal_self", return_state=True, **first)
        _, stepped = mech(q[:, t:], k[:, t:], v[:, t:], pattern="causal_self", state=prefilled, return_state=True,
                          **then)  # fmt: skip
    for when, st in (("prefill", prefilled), ("step", stepped)):
        storages = {x.untyped_storage().data_ptr(): x.untyped_storage().nbytes() for x in st.tensors().values()}
        held, own = sum(storages.values()), sum(x.nbytes for x in st.tensors().values())
        assert st.nbytes == held, f"{when}: nbytes {st.nbytes}, but the state keeps {held} bytes alive"
        if isinstance(st, KVCache):
            row = own / st.length
            assert held <= 1.25 * (st.length + 1) * row + 64 * row, f"{when}: {held / row:.0f} rows for {st.length}"
        else:
            assert held == own, f"{when}: the state keeps {held} bytes alive for {own} bytes of its own"


@pytest.mark.parametrize("item", GRID, ids=grid_id)
def test_key_padding(item):
    """Padded keys change nothing; a row whose keys are all padded gives zeros, never NaN."""
    case, pattern, path = item
    if case.spatial_dims:
        return _key_padding_on_a_grid(case, pattern, path)
    t, tk, d, left, right = 20, 17, 24, 3, 4
    mech = case.build(HQ, d)
    tol = mech.tolerances[torch.float32]
    q, k, v = make_qkv(B, t, t if pattern.is_self else tk, HQ, HKV, d)
    real = mech(q, k, v, pattern=pattern, path=path)

    def pad(x):  # random garbage at both ends along time
        return torch.cat([torch.randn_like(x[:, :left]) * 5, x, torch.randn_like(x[:, :right]) * 5], dim=1)

    kp, vp = pad(k), pad(v)
    qp = pad(q) if pattern.is_self else q
    kpm = torch.zeros(B, kp.shape[1], dtype=torch.bool)
    kpm[:, left : left + k.shape[1]] = True
    out = mech(qp, kp, vp, pattern=pattern, key_padding_mask=kpm, path=path)
    got = out[:, left : left + t] if pattern.is_self else out
    assert_close("padded", real, got, tol)

    qp.requires_grad_(True), kp.requires_grad_(True), vp.requires_grad_(True)
    kpm[1] = False  # every key of batch row 1 is padding
    out = mech(qp, kp, vp, pattern=pattern, key_padding_mask=kpm, path=path)
    assert torch.isfinite(out).all(), "NaN/inf where all keys are padded"
    assert out[1].abs().max() == 0, "a query that sees no real key must output zeros"
    grads = torch.autograd.grad(out.sum(), (qp, kp, vp), allow_unused=True)
    assert all(gr is None or torch.isfinite(gr).all() for gr in grads), "non-finite gradients"


def _key_padding_on_a_grid(case, pattern, path):
    """On a grid, padding cannot be appended (it would change the grid): keys are masked where they stand.
    The path agrees with the reference under the mask, and a row whose keys are all padded gives zeros."""
    t, d = 20, 24
    mech = case.build(HQ, d)
    tol = mech.tolerances[torch.float32]
    q, k, v = make_qkv(B, t, t if pattern.is_self else 17, HQ, HKV, d, requires_grad=True)
    kpm = torch.rand(B, k.shape[1], generator=torch.Generator().manual_seed(4)) > 0.3
    ref = mech(q, k, v, pattern=pattern, key_padding_mask=kpm, path="reference")
    out = mech(q, k, v, pattern=pattern, key_padding_mask=kpm, path=path)
    assert_close("padded", ref, out, tol)
    kpm[1] = False  # every key of batch row 1 is padding
    out = mech(q, k, v, pattern=pattern, key_padding_mask=kpm, path=path)
    assert torch.isfinite(out).all(), "NaN/inf where all keys are padded"
    assert out[1].abs().max() == 0, "a query that sees no real key must output zeros"
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    assert all(gr is None or torch.isfinite(gr).all() for gr in grads), "non-finite gradients"


@pytest.mark.parametrize("case", [c for c in CASES if c.spatial_dims], ids=lambda c: c.label)
def test_spatial_shape_must_hold_the_tokens(case):
    """A spatial_shape whose product is not T, or that is missing, is refused before compute."""
    from attnkit.errors import ShapeError

    mech = case.build(HQ, 16)
    pattern = sorted(case.patterns, key=lambda p: not p.is_self)[0]
    q, k, v = make_qkv(1, 12, 12, HQ, HKV, 16)
    for bad in [(5, 3), (12, 2), (0, 12)] + ([None] if case.cls.spatial else []):  # no grid: a grid form's 1-D form
        with pytest.raises(ShapeError, match="spatial_shape"):
            mech(q, k, v, pattern=pattern, spatial_shape=bad)


@pytest.mark.parametrize("item", PATH_GRID, ids=grid_id)
def test_every_key_padded_gives_zeros_and_a_backward_pass(item):
    """A batch row whose keys are all padding sees nothing: its output is 0, and a training step still runs
    (the zeros are joined to the inputs, with finite gradients), whichever path takes the call."""
    case, pattern, path = item
    tq, tk, d = 12, 12 if pattern.is_self else 9, 16
    mech = case.build(HQ, d)
    q, k, v = make_qkv(B, tq, tk, HQ, HKV, d, requires_grad=True)
    kpm = torch.zeros(B, tk, dtype=torch.bool)
    out = mech(q, k, v, pattern=pattern, key_padding_mask=kpm, path=path)
    assert (out == 0).all(), "a query with no visible key must output 0"
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads), "non-finite gradients"


@pytest.mark.parametrize("item", PATH_GRID, ids=grid_id)
def test_non_finite_padded_keys_change_nothing(item):
    """NaN and Inf in padded key and value rows give the output (and input gradients) that zeros there give:
    a padded position contributes nothing, whatever it holds (0 * NaN is NaN: masking must select, not
    multiply). Queries are not masked by the contract, so q stays finite."""
    case, pattern, path = item
    tq, tk, d = 12, 12 if pattern.is_self else 9, 16
    mech = case.build(HQ, d)
    q, k, v = make_qkv(B, tq, tk, HQ, HKV, d)
    kpm = torch.ones(B, tk, dtype=torch.bool)
    kpm[0, 2], kpm[0, 5], kpm[1, -3:] = False, False, False
    pad = ~kpm[:, :, None, None]
    zero_k, zero_v = k.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)
    poison = torch.tensor([float("nan"), float("inf"), float("-inf")]).repeat(d)[:d]  # per row: NaN, inf, -inf, ...
    bad_k = torch.where(pad, poison, k).requires_grad_(True)
    bad_v = torch.where(pad, poison.flip(0), v).requires_grad_(True)
    q.requires_grad_(True)

    expected = mech(q, zero_k, zero_v, pattern=pattern, key_padding_mask=kpm, path=path)
    got = mech(q, bad_k, bad_v, pattern=pattern, key_padding_mask=kpm, path=path)
    assert_close("out", expected, got, 1e-6)
    grads = torch.autograd.grad(got.sum(), (q, bad_k, bad_v), allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads), "non-finite gradients"


@pytest.mark.parametrize("item", PATH_GRID, ids=grid_id)
def test_cpu_autocast_bf16(item):
    """Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` every mechanism and path runs forward and backward,
    and attention behaves like the ops of autocast's lower-precision list, ``F.scaled_dot_product_attention``
    among them: q, k, v are cast to the autocast dtype and the output is in that dtype (not q's fp32: DESIGN
    §1.1's "the dtype of q" is the dtype attention runs in, which autocast chooses). Output and input gradients
    are exactly those of the same call on bf16 inputs outside autocast (the gradients arrive in the inputs'
    fp32). A backward pass run inside the autocast region runs too (PyTorch advises against it: autocast then
    also lowers the fp32 matmuls of the backward, which e.g. softmax_free's Newton iterations amplify to ~0.3
    relative error, so only finite fp32 gradients are asked of it; custom autograd functions, which crashed
    there, run their backward with autocast off).
    """
    case, pattern, path = item
    tq, tk, d = 8, 8 if pattern.is_self else 11, 16
    mech = case.build(HQ, d)
    q, k, v = make_qkv(B, tq, tk, HQ, HKV, d, requires_grad=True)
    g = torch.randn(B, tq, HQ, d, generator=torch.Generator().manual_seed(5)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mech(q, k, v, pattern=pattern, path=path)
        inside = torch.autograd.grad(out, (q, k, v), g, allow_unused=True, retain_graph=True)
    assert out.dtype == torch.bfloat16, f"output is {out.dtype} under bf16 autocast"
    grads = torch.autograd.grad(out, (q, k, v), g, allow_unused=True)

    low = [t.detach().bfloat16().requires_grad_(True) for t in (q, k, v)]
    expected = mech(*low, pattern=pattern, path=path)
    expected_grads = torch.autograd.grad(expected, low, g, allow_unused=True)
    assert_close("out", expected, out, 1e-6)
    for name, want, got in zip(("dq", "dk", "dv"), expected_grads, grads, strict=True):
        assert (want is None) == (got is None), f"{name}: a gradient on one side only"
        if want is not None:
            assert got.dtype == torch.float32, f"{name} is {got.dtype}; the input is fp32"
            assert_close(name, want.float(), got, 1e-6)

    for name, want, got in zip(("dq", "dk", "dv"), expected_grads, inside, strict=True):
        assert (want is None) == (got is None), f"{name} (backward under autocast): a gradient on one side only"
        if want is not None:
            assert got.dtype == torch.float32 and torch.isfinite(got).all(), f"{name} (backward under autocast)"


@pytest.mark.parametrize("item", GRID, ids=grid_id)
def test_gqa_equals_repeated_kv(item):
    """Hq = 4 * Hkv gives what repeating each key/value head 4 times gives."""
    case, pattern, path = item
    hq, hkv, d = 4, 1, 24
    mech = case.build(hq, d)
    q, k, v = make_qkv(B, 19, 19 if pattern.is_self else 23, hq, hkv, d)
    grouped = mech(q, k, v, pattern=pattern, path=path)
    repeated = mech(q, repeat_kv(k, hq // hkv), repeat_kv(v, hq // hkv), pattern=pattern, path=path)
    assert_close("gqa", repeated, grouped, mech.tolerances[torch.float32])


def test_every_mechanism_is_exercised():
    """Guard against an empty grid: every mechanism contributes at least one (pattern, path) case."""
    covered = {c.mechanism for c, _, _ in GRID}
    assert covered == {c.mechanism for c in CASES}


def _bad_calls(pattern: Pattern):
    """(label, kwargs for mech(...), error class, words the message must contain)."""
    from attnkit.errors import DTypeError, InvalidOption, ShapeError

    tk = 8 if pattern.is_self else 11
    q, k, v = make_qkv(2, 8, tk, 4, 2, 16)
    ok = dict(q=q, k=k, v=v, pattern=pattern)
    return [
        ("q is 3-D", {**ok, "q": q[0]}, ShapeError, ["q", "4-D", "(8, 4, 16)"]),
        ("batch sizes differ", {**ok, "k": k[:1], "v": v[:1]}, ShapeError, ["batch", "2, 1"]),
        (
            "heads not a multiple",
            {**ok, "k": k[:, :, :1].expand(-1, -1, 3, -1), "v": v[:, :, :1].expand(-1, -1, 3, -1)},
            ShapeError,
            ["4 heads", "3", "multiple"],
        ),
        ("head dims differ", {**ok, "k": k[..., :8]}, ShapeError, ["head dim", "16", "8"]),
        ("k, v lengths differ", {**ok, "v": v[:, :5]}, ShapeError, ["same length", f"{tk}", "5"]),
        ("int dtype", {**ok, "q": q.long()}, DTypeError, ["int64", "float32"]),
        ("mixed dtypes", {**ok, "k": k.double()}, DTypeError, ["float64", "float32"]),
        (
            "mask shape",
            {**ok, "key_padding_mask": torch.ones(2, tk + 1, dtype=torch.bool)},
            ShapeError,
            ["key_padding_mask", f"(2, {tk})", f"(2, {tk + 1})"],
        ),
        ("mask dtype", {**ok, "key_padding_mask": torch.ones(2, tk)}, DTypeError, ["bool", "float32"]),
        ("unknown pattern", {**ok, "pattern": "causal"}, InvalidOption, ["'causal'", "causal_self"]),
        ("unknown path", {**ok, "path": "fastest"}, InvalidOption, ["'fastest'", "reference"]),
        ("negative scale", {**ok, "scale": -1.0}, InvalidOption, ["scale", "-1.0"]),
        (
            "empty sequence",
            {**ok, "q": q[:, :0], **({"k": k[:, :0], "v": v[:, :0]} if pattern.is_self else {})},
            ShapeError,
            ["Tq=0"],
        ),
    ]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_bad_inputs_raise_clear_errors(case):
    from attnkit.errors import InvalidOption, ShapeError

    mech = case.build(4, 16)
    pattern = sorted(case.patterns, key=lambda p: not p.is_self)[0]
    for label, kwargs, error, words in _bad_calls(pattern):
        if label == "negative scale" and not case.cls.uses_scale:
            words = ["does not use a score scale"]
        with pytest.raises(error) as err:
            mech(**kwargs)
        msg = str(err.value)
        assert all(w in msg for w in words), f"{label}: message {msg!r} lacks {words}"
    if pattern.is_self:  # a self pattern with a separate context length
        q, k, v = make_qkv(2, 8, 9, 4, 2, 16)
        with pytest.raises(ShapeError, match="Tq=8, Tk=9"):
            mech(q, k, v, pattern=pattern)
    # decoding state outside causal_self, and a state of the wrong kind
    q, k, v = make_qkv(2, 8, 8, 4, 2, 16)
    other = [p for p in case.patterns if p is not Pattern.CAUSAL_SELF]
    if other:
        expected = "causal_self" if case.cls.state_kind else "no decoding state"
        with pytest.raises(InvalidOption, match=expected):
            mech(q, k, v, pattern=other[0], return_state=True)
    if Pattern.CAUSAL_SELF in case.patterns and case.cls.state_kind is not None:
        wrong = KVCache.empty(2, 2, 16, 16) if case.cls.state_kind is not KVCache else _recurrent_state()
        with pytest.raises(InvalidOption, match=case.cls.state_kind.__name__):
            mech(q, k, v, pattern="causal_self", state=wrong)
        _, st = mech(q, k, v, pattern="causal_self", return_state=True)
        q3, k3, v3 = make_qkv(3, 2, 2, 4, 2, 16)
        with pytest.raises(ShapeError, match="state does not fit"):
            mech(q3, k3, v3, pattern="causal_self", state=st)


def _recurrent_state():
    from attnkit.state import RecurrentState

    return RecurrentState.zeros(2, 2, 16, 16)
