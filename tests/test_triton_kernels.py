"""Triton kernels checked on CPU with Triton's interpreter (TRITON_INTERPRET=1), in a subprocess so the
variable is set before triton is imported. bf16 is left to the GPU tests: the interpreter's bf16
matmul is wrong (a Triton limitation, seen with a plain 16x16 tl.dot)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

CHECK = textwrap.dedent("""
    import torch, attnkit
    from attnkit.testing import assert_close, make_qkv
    cases = [("causal_self", 70, 70, 4, 2, 24, 24), ("noncausal_cross", 33, 90, 4, 4, 16, 40),
             ("noncausal_self", 50, 50, 2, 1, 64, 64), ("causal_cross", 9, 20, 4, 2, 32, 32)]
    for pattern, tq, tk, hq, hkv, d, e in cases:
        for dtype, tol in ((torch.float32, 2e-5), (torch.float16, 5e-3)):
            q, k, v = make_qkv(2, tq, tk, hq, hkv, d, dv=e, dtype=dtype, requires_grad=True)
            kpm = torch.rand(2, tk, generator=torch.Generator().manual_seed(tq)) > 0.2
            kpm[1] = False  # a batch row with no real key: zeros
            for mask in (None, kpm):
                ref = attnkit.attend(q, k, v, "sigmoid", pattern=pattern, key_padding_mask=mask, path="reference")
                out = attnkit.attend(q, k, v, "sigmoid", pattern=pattern, key_padding_mask=mask, path="triton")
                assert attnkit.last_path() == "triton"
                assert_close(f"{pattern} {dtype} out", ref, out, tol)
                g = torch.randn_like(ref)
                for name, r, f in zip("qkv", torch.autograd.grad(ref, (q, k, v), g),
                                      torch.autograd.grad(out, (q, k, v), g)):
                    assert_close(f"{pattern} {dtype} d{name}", r, f, 2 * tol)
    # decoding with a KV cache: the kernel's causal offset
    q, k, v = make_qkv(1, 40, 40, 4, 2, 16)
    full = attnkit.attend(q, k, v, "sigmoid", pattern="causal_self", path="triton")
    _, st = attnkit.attend(q[:, :25], k[:, :25], v[:, :25], "sigmoid", pattern="causal_self", return_state=True)
    rest = attnkit.attend(q[:, 25:], k[:, 25:], v[:, 25:], "sigmoid", pattern="causal_self", state=st, path="triton")
    assert_close("after cache", full[:, 25:], rest, 2e-5)
    print("ok")
""")


def test_sigmoid_kernel_matches_the_reference_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout[-3000:] + res.stderr[-3000:]
