"""Triton kernels (CUDA; on CPU tensors only under TRITON_INTERPRET=1, for tests)."""

from __future__ import annotations

import importlib.util
import os

import torch


def triton_reasons(t: torch.Tensor) -> list[str]:
    """Why a Triton path cannot run on this tensor (empty: it can)."""
    if importlib.util.find_spec("triton") is None:
        return ["triton is not installed"]
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return [f"needs a CUDA tensor (got {t.device}); set TRITON_INTERPRET=1 to run the kernel on CPU"]
    return []
