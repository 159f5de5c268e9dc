"""The conformance essentials again on a CUDA device (skipped without one).

Fast paths against the reference, chunked decoding and fully padded rows, with CUDA tensors in
fp32, bf16 and fp16: GPU kernels (SDPA's flash/efficient backends) differ from the CPU ones.
"""

from __future__ import annotations

import pytest
import torch

from attnkit import Pattern
from attnkit.testing import DTYPE_NAMES, assert_close, cases, make_qkv, pattern_path_grid, random_chunks

pytestmark = pytest.mark.gpu
# the paths that take CUDA tensors (Triton kernels included)
GRID = pattern_path_grid(cases(), device="cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("item", GRID, ids=lambda it: f"{it[0].label}-{it[1].value}-{it[2]}")
def test_fast_path_matches_reference_on_cuda(item, dtype):
    case, pattern, path = item
    mech = case.build(8, 64).cuda()
    tol = mech.tolerances[dtype]
    q, k, v = make_qkv(
        2, 300, 300 if pattern.is_self else 170, 8, 2, 64, dtype=dtype, device="cuda", requires_grad=True
    )
    kpm = torch.ones(2, k.shape[1], dtype=torch.bool, device="cuda")
    kpm[1, :5] = False
    kpm[1, -9:] = False
    ref = mech(q, k, v, pattern=pattern, key_padding_mask=kpm, path="reference")
    out = mech(q, k, v, pattern=pattern, key_padding_mask=kpm, path=path)
    assert out.device.type == "cuda" and out.dtype == dtype
    assert_close("out", ref, out, tol)
    g = torch.randn_like(ref)
    for name, r, f in zip(
        "qkv", torch.autograd.grad(ref, (q, k, v), g), torch.autograd.grad(out, (q, k, v), g), strict=True
    ):
        assert_close(f"d{name}", r, f, 2 * tol)


@pytest.mark.parametrize("item", [it for it in GRID if it[1] is Pattern.CAUSAL_SELF], ids=lambda it: it[0].label)
def test_chunked_decoding_on_cuda(item):
    case, _, path = item
    mech = case.build(4, 32).cuda()
    q, k, v = make_qkv(2, 90, 90, 4, 2, 32, device="cuda")
    full = mech(q, k, v, pattern="causal_self", path=path)
    state, outs, start = None, [], 0
    for n in random_chunks(90, seed=5):
        o, state = mech(
            q[:, start : start + n],
            k[:, start : start + n],
            v[:, start : start + n],
            pattern="causal_self",
            state=state,
            return_state=True,
            path=path,
        )
        outs.append(o)
        start += n
    assert_close("chunked", full, torch.cat(outs, 1), mech.tolerances[torch.float32])


@pytest.mark.parametrize("item", GRID, ids=lambda it: f"{it[0].label}-{it[1].value}-{it[2]}")
def test_fully_padded_rows_are_zero_on_cuda(item):
    case, pattern, path = item
    mech = case.build(4, 32).cuda()
    q, k, v = make_qkv(
        2, 40, 40 if pattern.is_self else 25, 4, 2, 32, dtype=torch.bfloat16, device="cuda", requires_grad=True
    )
    kpm = torch.ones(2, k.shape[1], dtype=torch.bool, device="cuda")
    kpm[0] = False
    out = mech(q, k, v, pattern=pattern, key_padding_mask=kpm, path=path)
    assert torch.isfinite(out).all() and out[0].abs().max() == 0
    grads = torch.autograd.grad(out.float().sum(), (q, k, v), allow_unused=True)
    assert all(gr is None or torch.isfinite(gr).all() for gr in grads)
