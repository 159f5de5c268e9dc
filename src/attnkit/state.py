"""Decoding state: plain dataclasses of tensors.

Three kinds (DESIGN §1.4):
- ``KVCache``: every past key and value (softmax family); grows with the sequence.
- ``WindowCache``: the last ``window - 1`` keys and values (local attention); bounded.
- ``RecurrentState``: a fixed-size summary (linear and decay family).

Every state knows ``offset``, the number of tokens it has consumed, so a layer can place rotary
positions of the next chunk. States are values: a call returns a new state and never mutates the
one it was given.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class State:
    offset: int  # tokens consumed so far

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }

    @property
    def nbytes(self) -> int:
        """Memory held by the state's tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, *args, **kwargs) -> State:
        """Like ``Tensor.to``: move or cast every tensor field."""
        moved = {name: t.to(*args, **kwargs) for name, t in self.tensors().items()}
        return dataclasses.replace(self, **moved)

    def detach(self) -> State:
        return dataclasses.replace(self, **{n: t.detach() for n, t in self.tensors().items()})


def _cat_masks(
    old: torch.Tensor | None, new: torch.Tensor | None, old_len: int, new_len: int, batch: int, device
) -> torch.Tensor | None:
    """Concatenate key-padding masks along time; a missing mask means all keys are real."""
    if old is None and new is None:
        return None
    if old is None:
        old = torch.ones(batch, old_len, dtype=torch.bool, device=device)
    if new is None:
        new = torch.ones(batch, new_len, dtype=torch.bool, device=device)
    return torch.cat([old, new], dim=1)


@dataclass(frozen=True)
class KVCache(State):
    k: torch.Tensor  # [B, T, Hkv, Dk] past keys
    v: torch.Tensor  # [B, T, Hkv, Dv] past values
    key_mask: torch.Tensor | None = None  # [B, T] bool, True = real token; None = all real

    @classmethod
    def empty(cls, batch: int, kv_heads: int, dk: int, dv: int, *, device=None, dtype=torch.float32) -> KVCache:
        return cls(
            offset=0,
            k=torch.zeros(batch, 0, kv_heads, dk, device=device, dtype=dtype),
            v=torch.zeros(batch, 0, kv_heads, dv, device=device, dtype=dtype),
        )

    @property
    def length(self) -> int:
        return self.k.shape[1]

    def extend(
        self, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, keep: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, KVCache]:
        """Append new keys; return all keys, values, mask and the next cache (last ``keep`` keys)."""
        past = self.length
        k_all = torch.cat([self.k.to(k.dtype), k], dim=1)
        v_all = torch.cat([self.v.to(v.dtype), v], dim=1)
        mask_all = _cat_masks(self.key_mask, key_mask, past, k.shape[1], k.shape[0], k.device)
        kept = slice(None) if keep is None else slice(max(0, k_all.shape[1] - keep), None)
        nxt = dataclasses.replace(
            self,
            offset=self.offset + k.shape[1],
            k=k_all[:, kept],
            v=v_all[:, kept],
            key_mask=None if mask_all is None else mask_all[:, kept],
        )
        return k_all, v_all, mask_all, nxt


@dataclass(frozen=True)
class WindowCache(KVCache):
    """A KV cache that keeps only the keys a future query can still see."""

    window: int = 1  # the mechanism's window; the cache holds at most window - 1 keys

    @classmethod
    def empty(  # type: ignore[override]
        cls, batch: int, kv_heads: int, dk: int, dv: int, *, window: int, device=None, dtype=torch.float32
    ) -> WindowCache:
        base = KVCache.empty(batch, kv_heads, dk, dv, device=device, dtype=dtype)
        return cls(offset=0, k=base.k, v=base.v, window=window)


@dataclass(frozen=True)
class RecurrentState(State):
    """Constant-size state of linear attention: S = sum phi(k) v^T, z = sum phi(k) (fp32)."""

    S: torch.Tensor  # [B, Hkv, Dk', Dv] fp32
    z: torch.Tensor | None = None  # [B, Hkv, Dk'] fp32; None for mechanisms without a normaliser

    @classmethod
    def zeros(
        cls, batch: int, kv_heads: int, dk: int, dv: int, *, normalised: bool = True, device=None
    ) -> RecurrentState:
        return cls(
            offset=0,
            S=torch.zeros(batch, kv_heads, dk, dv, device=device, dtype=torch.float32),
            z=torch.zeros(batch, kv_heads, dk, device=device, dtype=torch.float32) if normalised else None,
        )
