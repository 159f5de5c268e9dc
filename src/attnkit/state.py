"""Decoding state: plain dataclasses of tensors.

Three kinds (DESIGN §1.4):
- ``KVCache``: every past key and value (softmax family); grows with the sequence.
- ``WindowCache``: the last ``window - 1`` keys and values (local attention); bounded.
- ``RecurrentState``: a fixed-size summary (linear and decay family).

Every state knows ``offset``, the number of tokens it has consumed, so a layer can place rotary
positions of the next chunk, and ``made_by``, the :class:`Provenance` of the calls that made it
(mechanism, options, sizes): a state continues only their sequence (checked in ``inputs.validate``).
States are values: a call returns a new state and never changes what the state it was given holds.
(Outside autograd, KV caches append into a shared preallocated buffer so that decoding a token does
not copy the whole cache; rows a state can see are never rewritten.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import InvalidOption, ShapeError

SIZE_NAMES = ("batch", "heads", "kv_heads", "dk", "dv")  # the sizes a Provenance records


@dataclass(frozen=True)
class Provenance:
    """What made a state: the mechanism's name, all its options (as the instance applies them, e.g. a
    seed drawn at create filled in) and the sizes ``(batch, heads, kv_heads, dk, dv)`` of the calls.

    Parameters of trainable mechanisms are not part of it: two instances with the same options are the
    same maker (which weights continue a sequence is the caller's business, as with any model state).
    A size of None is not known yet (``init_state`` does not see q's heads) and matches any call.
    """

    mechanism: str
    options: Any  # the mechanism's frozen options dataclass, compared by value
    sizes: tuple[int | None, ...]  # (batch, heads, kv_heads, dk, dv)

    def describe(self) -> str:
        """``name(option=value, ...)``."""
        return f"{self.mechanism}(" + ", ".join(f"{n}={v!r}" for n, v in _fields(self.options).items()) + ")"

    def check_continued_by(self, call: Provenance) -> None:
        """Raise InvalidOption (another mechanism or options) or ShapeError (other sizes) unless ``call``
        may continue the sequence this provenance describes."""
        if (self.mechanism, self.options) != (call.mechanism, call.options):
            differ = ""
            if self.mechanism == call.mechanism:
                mine, theirs = _fields(self.options), _fields(call.options)
                changed = [f"{n}={mine[n]!r} in the state, {n}={theirs[n]!r} in this call" for n in mine
                           if mine[n] != theirs.get(n)]  # fmt: skip
                differ = f" (options differ: {'; '.join(changed)})"
            raise InvalidOption(
                f"the state was made by {self.describe()} and cannot continue a sequence of "
                f"{call.describe()}{differ}; start from state=None (or mech.init_state(...)) for this mechanism"
            )
        if any(a is not None and b is not None and a != b for a, b in zip(self.sizes, call.sizes, strict=True)):
            names = ", ".join(SIZE_NAMES)
            shown = tuple("?" if s is None else s for s in self.sizes)
            raise ShapeError(
                f"state does not fit the inputs: it was made for ({names}) = ({', '.join(map(str, shown))}), "
                f"the call has {tuple(call.sizes)}"
            )


def _fields(options: Any) -> dict[str, Any]:
    if not dataclasses.is_dataclass(options):
        return {}
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}


@dataclass(frozen=True)
class State:
    offset: int  # tokens consumed so far
    made_by: Provenance | None = field(default=None, kw_only=True)  # set by the mechanism that returns it

    def check_continued_by(self, call: Provenance) -> None:
        """Raise unless this state may continue a sequence in the call described by ``call``."""
        if self.made_by is None:
            raise InvalidOption(
                f"this {type(self).__name__} records no maker (was it built by hand?), so it cannot be checked "
                f"against {call.describe()}; make states with mech.init_state(...) or return_state=True"
            )
        self.made_by.check_continued_by(call)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }

    @property
    def nbytes(self) -> int:
        """Memory the state holds: the storage of its tensors, each storage counted once (a KV cache's
        tensors are views into a buffer with room to grow: the whole buffer counts)."""
        held = {}
        for t in self.tensors().values():
            storage = t.untyped_storage()
            held[storage.data_ptr() or id(t)] = storage.nbytes()  # no data pointer (meta, empty): its own
        return sum(held.values())

    def as_returned(self, made_by: Provenance) -> State:
        """This state as a call returns it: stamped with its provenance, and with every tensor that is a
        view into a larger storage (the last row of a per-token tensor, say) copied out, so that the state
        keeps no memory alive beyond its own tensors."""
        groups: dict[int, list[str]] = {}
        for name, t in self.tensors().items():
            groups.setdefault(t.untyped_storage().data_ptr() or id(t), []).append(name)
        copies = {}
        for names in groups.values() if self._compactable() else ():
            views = [getattr(self, n) for n in names]
            if sum(t.nbytes for t in views) < views[0].untyped_storage().nbytes():
                copies.update({n: t.clone() for n, t in zip(names, views, strict=True)})
        return dataclasses.replace(self, made_by=made_by, **copies)

    def _compactable(self) -> bool:
        """Whether ``as_returned`` may copy tensors out of larger storage (not a KV cache's growing buffer)."""
        return True

    def check_fits(self, layout: str, got: tuple[int, ...], want: tuple[int, ...], device: torch.device) -> None:
        """Raise ShapeError unless the dims ``got`` this state holds (named by ``layout``, e.g. "batch, heads,
        dv") equal the ``want`` of the call, and its tensors are on the call's ``device``."""
        if tuple(got) != tuple(want):
            raise ShapeError(
                f"state does not fit the inputs: it holds ({layout}) = {tuple(got)}, the call has {tuple(want)}"
            )
        held = next(iter(self.tensors().values()), None)
        if held is not None and held.device != device:
            raise ShapeError(f"state is on {held.device} but k is on {device}")

    def to(self, *args, **kwargs) -> State:
        """Like ``Tensor.to``: move or cast every tensor field."""
        moved = {name: t.to(*args, **kwargs) for name, t in self.tensors().items()}
        return dataclasses.replace(self, **moved, **self._standalone())

    def detach(self) -> State:
        return dataclasses.replace(self, **{n: t.detach() for n, t in self.tensors().items()}, **self._standalone())

    def _standalone(self) -> dict:
        """Field changes that detach a copied state from any storage shared with this one."""
        return {}


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


class _KVBuffer:
    """Preallocated key/value rows shared by the successive caches of one sequence (decoding, no grad).

    ``fill`` is the end of the rows written so far; a cache may append in place only when its own
    rows end exactly there, so rows another cache can see are never overwritten.
    """

    def __init__(self, like_k: torch.Tensor, like_v: torch.Tensor, capacity: int, masked: bool):
        b, _, h, dk = like_k.shape
        self.k = torch.zeros(b, capacity, h, dk, dtype=like_k.dtype, device=like_k.device)
        self.v = torch.zeros(b, capacity, h, like_v.shape[3], dtype=like_v.dtype, device=like_v.device)
        self.mask = torch.ones(b, capacity, dtype=torch.bool, device=like_k.device) if masked else None
        self.fill = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def fits(self, k: torch.Tensor, v: torch.Tensor) -> bool:
        return (self.k.dtype, self.k.device, self.k.shape[2:], self.v.shape[3]) == (
            k.dtype,
            k.device,
            k.shape[2:],
            v.shape[3],
        )


@dataclass(frozen=True)
class KVCache(State):
    k: torch.Tensor  # [B, T, Hkv, Dk] past keys
    v: torch.Tensor  # [B, T, Hkv, Dv] past values
    key_mask: torch.Tensor | None = None  # [B, T] bool, True = real token; None = all real
    _buffer: _KVBuffer | None = field(default=None, repr=False, compare=False)  # storage k, v are views of
    _start: int = field(default=0, repr=False, compare=False)  # first row of k, v in that storage

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

    def _standalone(self) -> dict:
        return {"_buffer": None, "_start": 0}

    def _compactable(self) -> bool:
        return self._buffer is None

    def extend(
        self, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, keep: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, KVCache]:
        """Append new keys; return all keys, values, mask and the next cache (last ``keep`` keys)."""
        tracked = torch.is_grad_enabled() and any(t.requires_grad for t in (k, v, self.k, self.v))
        past, n = self.length, k.shape[1]
        # autograd must see a fresh tensor; a chunk longer than a bounded cache keeps would leave a buffer
        # of the whole chunk behind: concatenate (the caller copies the kept rows out, State.as_returned)
        if tracked or (keep is not None and n > keep):
            return self._extend_by_copy(k, v, key_mask, keep)
        buf, end = self._buffer, self._start + self.length
        if buf is None or buf.fill != end or end + n > buf.capacity or not buf.fits(k, v):
            # fresh storage with room to grow: the live rows are copied once, later steps append in place.
            # The room follows the rows actually held (a quarter more, at least 64: a copy of the live rows
            # every >= 64 steps), never the window of a bounded cache, which may be far larger than the text.
            live = past if keep is None else min(past, keep)
            room = live + n + max(64, (live + n) // 4)
            masked = self.key_mask is not None or key_mask is not None
            buf = _KVBuffer(k, v, room, masked)
            buf.k[:, :live] = self.k[:, past - live :]
            buf.v[:, :live] = self.v[:, past - live :]
            if masked and self.key_mask is not None:
                buf.mask[:, :live] = self.key_mask[:, past - live :]
            buf.fill, start, end = live, 0, live
        else:
            start = self._start
        buf.k[:, end : end + n] = k
        buf.v[:, end : end + n] = v
        if key_mask is not None and buf.mask is None:
            buf.mask = torch.ones(buf.k.shape[:2], dtype=torch.bool, device=k.device)  # earlier rows: real
        if buf.mask is not None:
            buf.mask[:, end : end + n] = True if key_mask is None else key_mask
        buf.fill = end + n
        rows = slice(start, end + n)
        kept = slice(start if keep is None else max(start, end + n - keep), end + n)
        mask_all = None if buf.mask is None else buf.mask[:, rows]
        nxt = dataclasses.replace(
            self,
            offset=self.offset + n,
            k=buf.k[:, kept],
            v=buf.v[:, kept],
            key_mask=None if buf.mask is None else buf.mask[:, kept],
            _buffer=buf,
            _start=kept.start,
        )
        return buf.k[:, rows], buf.v[:, rows], mask_all, nxt

    def _extend_by_copy(
        self, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, keep: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, KVCache]:
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
            **self._standalone(),
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
