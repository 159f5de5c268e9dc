"""The base class every mechanism derives from, its registry, and path dispatch.

A mechanism is one file in ``attnkit/mechanisms/`` holding one subclass of :class:`Mechanism`
decorated with ``@register_mechanism("name")``. It declares what it is (class attributes that form its
:class:`MechanismInfo`), writes ``reference`` (the specification) and any number of fast paths
decorated with ``@fast_path("algorithm")``, each saying which inputs it cannot take.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from .describe import Complexity, MechanismInfo, Paper, Shape  # noqa: F401 - part of this module's API
from .errors import AttnkitError, InvalidOption, ReferenceFallbackWarning, ShapeError, did_you_mean
from .inputs import AttentionInputs, validate
from .ops.amp import autocast_dtype, cast_floating
from .options import MAX_HEAD_DIM, MAX_HEADS, NoOptions, check_size, parse_options
from .patterns import Pattern
from .registry import Registry
from .state import KVCache, Provenance, RecurrentState, State, WindowCache

log = logging.getLogger(__name__)

REGISTRY: Registry[type[Mechanism]] = Registry("mechanism", "attnkit.mechanisms")
PATH_ENV = "ATTNKIT_PATH"  # ATTNKIT_PATH=reference forces the reference path everywhere
_last = threading.local()

PathFn = Callable[["Mechanism", AttentionInputs], "tuple[torch.Tensor, State | None]"]


class FastPath:
    """A named fast path of a mechanism; ``@path.unsupported`` adds its refusal reasons.

    ``priority`` ranks the paths ``auto`` may choose among; it is a number or a function of the
    mechanism and inputs (a dispatch heuristic, e.g. "dense is faster while T <= 2 * window").
    """

    def __init__(
        self,
        fn: PathFn,
        name: str,
        priority: int | Callable[[Mechanism, AttentionInputs], int],
        when: Callable[[type[Mechanism]], bool] | None = None,
    ):
        self.fn = fn
        self.name = name
        self.priority = priority
        self.when = when  # which subclasses have this path at all (a base class may offer it to some)
        self._reasons: Callable[[Mechanism, AttentionInputs], list[str]] | None = None

    def unsupported(self, fn: Callable[[Mechanism, AttentionInputs], list[str]]) -> FastPath:
        """Decorator: a method returning why this path cannot take the inputs (empty: it can)."""
        self._reasons = fn
        return self

    def not_supported_reasons(self, mech: Mechanism, x: AttentionInputs) -> list[str]:
        return list(self._reasons(mech, x)) if self._reasons else []

    def rank(self, mech: Mechanism, x: AttentionInputs) -> int:
        return self.priority(mech, x) if callable(self.priority) else self.priority

    def __call__(self, mech: Mechanism, x: AttentionInputs):
        return self.fn(mech, x)


def fast_path(
    name: str, *, priority: int | Callable[..., int] = 0, when: Callable[[type], bool] | None = None
) -> Callable[[PathFn], FastPath]:
    """Mark a method as a fast path named by its algorithm (``sdpa``, ``chunk``, ``blocked``...).

    ``when(cls)`` limits a path defined on a base class to the subclasses it makes sense for.
    """
    return lambda fn: FastPath(fn, name, priority, when)


def register_mechanism(name: str) -> Callable[[type[Mechanism]], type[Mechanism]]:
    """Class decorator: register a Mechanism subclass under ``name``. It must define its own
    ``reference`` and ``flops`` (the benchmark reports utilisation from flops; a base-class stub
    would only show up there as a stored NotImplementedError)."""

    def deco(cls: type[Mechanism]) -> type[Mechanism]:
        missing = [m for m in ("reference", "flops") if getattr(cls, m) is getattr(Mechanism, m)]
        if missing:
            raise AttnkitError(f"mechanism {name!r} ({cls.__qualname__}) must define {' and '.join(missing)}()")
        cls.name = name
        return REGISTRY.register(name)(cls)

    return deco


_fallbacks_warned: set[tuple[str, tuple[str, ...]]] = set()


def _warn_fallback(name: str, refusals: tuple[str, ...]) -> None:
    """Warn that path="auto" runs the reference, once per (mechanism, reasons): a silent fallback makes a
    benchmark or a model slow for no visible reason, and one warning per call would flood a training loop."""
    if (name, refusals) in _fallbacks_warned:
        return
    _fallbacks_warned.add((name, refusals))
    warnings.warn(
        f"{name}: no fast path takes these inputs ({' | '.join(refusals)}), so path='auto' runs the reference,"
        " which is slower. Pass path='reference' to choose it (and silence this warning).",
        ReferenceFallbackWarning,
        stacklevel=3,  # the line in Mechanism.forward that chose the path
    )


def last_path() -> str | None:
    """The path the most recent attention call in this thread ran (``"sdpa"``, ``"reference"``...)."""
    return getattr(_last, "path", None)


class Mechanism(nn.Module):
    """Base of all attention mechanisms. Subclasses fill in the class attributes below."""

    name: ClassVar[str] = "?"
    kind: ClassVar[str] = "attention"
    family: ClassVar[str]
    paper: ClassVar[Paper]
    patterns: ClassVar[frozenset[Pattern]]
    exact: ClassVar[bool]
    trainable: ClassVar[bool] = False
    # each head is computed from its own q, k, v heads alone, by the same function: running a subset of the heads
    # gives those heads' outputs (no per-head parameters, options, decays or draws, no routing across heads).
    # Context parallelism's ulysses strategy (heads split over the ranks) runs only such mechanisms.
    heads_independent: ClassVar[bool] = False
    spatial: ClassVar[bool] = False
    # spatial mechanisms: the grid ranks (1-D, 2-D, 3-D) the conformance suite exercises
    spatial_dims: ClassVar[tuple[int, ...]] = (2,)
    # sequence mechanisms with a grid form (2-D regions, pooled 2-D agents, Manhattan decay): the grid ranks
    # whose ``spatial_shape`` switches it on, and the patterns that form is defined for. A call with another
    # rank above 1, or a grid in another pattern, is refused (ShapeError / UnsupportedPattern) before compute.
    grid_dims: ClassVar[tuple[int, ...]] = ()
    grid_patterns: ClassVar[frozenset[Pattern]] = frozenset()
    uses_scale: ClassVar[bool] = True  # takes the softmax-style score scale (default 1/sqrt(Dk))
    state_kind: ClassVar[type[State] | None] = None
    complexity: ClassVar[Complexity]
    Options: ClassVar[type] = NoOptions
    # relative RMSE allowed between a fast path and the reference, per dtype
    tolerances: ClassVar[dict[torch.dtype, float]] = {
        torch.float64: 1e-9,
        torch.float32: 2e-5,
        torch.float16: 5e-3,
        torch.bfloat16: 2e-2,
    }
    # option sets the conformance suite exercises
    example_options: ClassVar[tuple[dict[str, Any], ...]] = ({},)
    # the option the fidelity benchmark sweeps (features, landmarks, window...) and its values
    fidelity_knob: ClassVar[tuple[str, tuple[Any, ...]] | None] = None
    _fast_paths: ClassVar[tuple[FastPath, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        found: dict[str, FastPath] = {}
        for klass in reversed(cls.__mro__):
            for value in vars(klass).values():
                if isinstance(value, FastPath):
                    found[value.name] = value
        # in order of definition, without the paths this class does not have
        cls._fast_paths = tuple(p for p in found.values() if p.when is None or p.when(cls))

    def __init__(self, heads: int | None = None, head_dim: int | None = None, **options: Any):
        super().__init__()
        for label, value, top in (("heads", heads, MAX_HEADS), ("head_dim", head_dim, MAX_HEAD_DIM)):
            if value is not None:
                check_size(f"{self.name}: {label}", value, top)
        if self.trainable and (heads is None or head_dim is None):
            raise InvalidOption(
                f"{self.name} has trainable parameters sized by the heads; pass heads= and head_dim= "
                f"(got heads={heads}, head_dim={head_dim})"
            )
        self.heads = heads
        self.head_dim = head_dim
        self.options = parse_options(self.Options, options, mechanism=self.name)
        self.last_path: str | None = None

    # ---- description ------------------------------------------------------------------------------

    @classmethod
    def info(cls) -> MechanismInfo:
        return MechanismInfo(
            name=cls.name,
            kind=cls.kind,
            family=cls.family,
            paper=cls.paper,
            patterns=frozenset(cls.patterns),
            exact=cls.exact,
            trainable=cls.trainable,
            supports_state=cls.state_kind is not None,
            spatial=cls.spatial,
            complexity=cls.complexity,
            options=cls.Options,
            paths=tuple(p.name for p in cls._fast_paths),
            state_kind=cls.state_kind.__name__ if cls.state_kind else None,
            grid_dims=cls.grid_dims,
            grid_patterns=frozenset(cls.grid_patterns),
        )

    def extra_repr(self) -> str:
        return f"{self.name}, {self.options}"

    # ---- the call ---------------------------------------------------------------------------------

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        pattern: Pattern | str,
        key_padding_mask: torch.Tensor | None = None,
        state: State | None = None,
        return_state: bool = False,
        path: str = "auto",
        spatial_shape: tuple[int, ...] | None = None,
        scale: float | None = None,
    ):
        """Attend ``q [B,Tq,Hq,Dk]`` to ``k [B,Tk,Hkv,Dk]``, ``v [B,Tk,Hkv,Dv]``; returns ``[B,Tq,Hq,Dv]``.

        With ``return_state=True`` returns ``(out, state)``; pass that state to the next call to
        continue the sequence (causal_self only). Under ``torch.autocast`` q, k, v are cast to the
        autocast dtype, which is the output's, as for ``F.scaled_dot_product_attention`` (``ops/amp.py``).
        """
        self._check_path(path)
        call = dict(pattern=pattern, key_padding_mask=key_padding_mask, state=state, return_state=return_state,
                    path=path, spatial_shape=spatial_shape, scale=scale)  # fmt: skip
        amp = autocast_dtype(q)
        if amp is None:
            return self._attend(q, k, v, **call)
        q, k, v = cast_floating(amp, q, k, v)
        with torch.autocast(q.device.type, enabled=False):  # the mechanism runs as on inputs of that dtype
            return self._attend(q, k, v, **call)

    def _attend(self, q, k, v, *, pattern, key_padding_mask, state, return_state, path, spatial_shape, scale):
        x = validate(
            self,
            q,
            k,
            v,
            pattern=pattern,
            scale=scale,
            key_padding_mask=key_padding_mask,
            state=state,
            return_state=return_state,
            spatial_shape=spatial_shape,
        )
        self.check_call(x)
        made_by = self.provenance(x.batch, x.heads, x.kv_heads, x.k.shape[-1], x.v.shape[-1]) if return_state else None
        x, cache = self.join_cache(x)
        run = self._choose_path(path, x)
        out, new_state = run(self, x) if x.batch else self._empty_batch(x)
        self.last_path = _last.path = run.name if isinstance(run, FastPath) else "reference"
        if not return_state:
            return out
        return out, (new_state if cache is None else cache).as_returned(made_by)

    def _empty_batch(self, x: AttentionInputs) -> tuple[torch.Tensor, State | None]:
        """B = 0: the empty ``[0, Tq, Hq, Dv]`` output (as SDPA gives) without running a path, and the state
        of batch 0 advanced by the call's tokens. Joined to q, k, v so that a backward pass works."""
        out = x.q.new_zeros(0, x.tq, x.heads, x.v.shape[-1])
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x.q, x.k, x.v)):
            out = out + (x.q.sum() + x.k.sum() + x.v.sum()) * 0  # empty sums: a 0 in the graph
        if not x.want_state:
            return out, None
        state = x.state or self.init_state(
            0, x.kv_heads, x.k.shape[-1], x.v.shape[-1], device=x.k.device, dtype=x.k.dtype
        )
        return out, dataclasses.replace(state, offset=state.offset + x.tq)

    def check_call(self, x: AttentionInputs) -> None:
        """Mechanism-specific checks of validated inputs (e.g. head counts of trainable ones)."""
        if self.heads is not None and self.trainable and x.heads != self.heads:
            raise ShapeError(f"{self.name} was created for {self.heads} heads; got q with {x.heads}")

    def _check_path(self, path: str) -> None:
        """Raise InvalidOption unless ``path`` names a path of this mechanism (checked before any compute)."""
        valid = ["auto", "reference", *(p.name for p in self._fast_paths)]
        if isinstance(path, str) and path in valid:
            return
        hint = did_you_mean(path, valid) if isinstance(path, str) else ""
        what = f"no path {path!r}" if isinstance(path, str) else f"a path that is not a string: {path!r}"
        raise InvalidOption(f"{self.name} has {what}.{hint} Valid paths: {', '.join(valid)}")

    def _choose_path(self, path: str, x: AttentionInputs):
        forced = os.environ.get(PATH_ENV)
        if forced:
            if forced != "reference":
                raise InvalidOption(f"{PATH_ENV}={forced!r} is not understood; the only value is 'reference'")
            return type(self).reference
        if path == "reference":
            return type(self).reference
        if path == "auto":
            refusals = []
            for p in sorted(self._fast_paths, key=lambda p: -p.rank(self, x)):
                reasons = p.not_supported_reasons(self, x)
                if not reasons:
                    return p
                log.debug("%s: path %s skipped: %s", self.name, p.name, "; ".join(reasons))
                refusals.append(f"{p.name}: {'; '.join(reasons)}")
            if refusals:  # a mechanism with fast paths, none of which takes these inputs
                _warn_fallback(self.name, tuple(refusals))
            return type(self).reference
        for p in self._fast_paths:
            if p.name == path:
                reasons = p.not_supported_reasons(self, x)
                if reasons:
                    raise InvalidOption(f"{self.name} path {path!r} cannot take these inputs: {'; '.join(reasons)}")
                return p
        self._check_path(path)  # raises: forward checked it already
        raise AssertionError(path)

    def reference(self, x: AttentionInputs) -> tuple[torch.Tensor, State | None]:
        """The specification: plain PyTorch that reads like the paper."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called by a training loop after each optimizer step (for every Mechanism module of the model).
        A no-op here; a mechanism with state learned outside gradients (routing's k-means centroids) updates it."""

    # ---- state --------------------------------------------------------------------------------------

    def provenance(self, batch: int, heads: int | None, kv_heads: int, dk: int, dv: int) -> Provenance:
        """The record of what makes a state in a call of these sizes (``heads`` None: not known yet)."""
        return Provenance(self.name, self.state_options(), (batch, heads, kv_heads, dk, dv))

    def state_options(self) -> Any:
        """The options as this instance applies them; a mechanism that resolves an option at create (a
        random seed drawn when none was given) returns them resolved, so its states name what made them."""
        return self.options

    def init_state(self, batch: int, kv_heads: int, dk: int, dv: int, *, device=None, dtype=torch.float32) -> State:
        """The empty state a sequence starts from, recording this mechanism as its maker (q's heads are
        not known here: the first call fills them in). Mechanisms override ``empty_state``."""
        state = self.empty_state(batch, kv_heads, dk, dv, device=device, dtype=dtype)
        return dataclasses.replace(state, made_by=self.provenance(batch, None, kv_heads, dk, dv))

    def empty_state(self, batch: int, kv_heads: int, dk: int, dv: int, *, device=None, dtype=torch.float32) -> State:
        """The empty state of this mechanism (``init_state`` adds its provenance)."""
        kind = self.state_kind
        if kind is None:
            raise AttnkitError(f"{self.name} has no decoding state")
        if kind is WindowCache:
            return WindowCache.empty(batch, kv_heads, dk, dv, window=self.window_size(), device=device, dtype=dtype)
        if kind is KVCache:
            return KVCache.empty(batch, kv_heads, dk, dv, device=device, dtype=dtype)
        return RecurrentState.zeros(batch, kv_heads, self.state_dk(dk), dv, device=device)

    def state_dk(self, dk: int) -> int:
        """Key dimension of a recurrent state (the feature dimension of a kernel mechanism)."""
        return dk

    def window_size(self) -> int:
        """Keys a window cache must keep (+1); only for WindowCache mechanisms."""
        raise NotImplementedError

    def check_state(self, state: State, k: torch.Tensor, v: torch.Tensor) -> None:
        """Raise ShapeError when a given state cannot continue a sequence with these k, v."""
        b, _, hkv, dk = k.shape
        dv = v.shape[-1]
        if isinstance(state, KVCache):
            want, got = (
                (b, hkv, dk, dv),
                (state.k.shape[0], state.k.shape[2], state.k.shape[3], state.v.shape[3]),
            )
        else:
            assert isinstance(state, RecurrentState)
            want = (b, hkv, self.state_dk(dk), dv)
            got = tuple(state.S.shape)
        state.check_fits("batch, kv_heads, dk, dv", got, want, k.device)

    def join_cache(self, x: AttentionInputs) -> tuple[AttentionInputs, State | None]:
        """Runs before dispatch: returns the inputs every path sees, and the next state if this hook
        already made it (else None and the path returns it).

        KV-cache mechanisms: prepend the cached keys (query i then sits at key position i + q_offset)
        and make the next cache. A mechanism overrides this when its paths need other inputs, e.g. a
        cache of transformed keys, or k, v repeated to the query heads (one state per query head).
        """
        kind = self.state_kind
        if kind is None or not issubclass(kind, KVCache) or (x.state is None and not x.want_state):
            return x, None
        cache = x.state or self.init_state(
            x.batch, x.kv_heads, x.k.shape[-1], x.v.shape[-1], device=x.k.device, dtype=x.k.dtype
        )
        assert isinstance(cache, KVCache)
        keep = cache.window - 1 if isinstance(cache, WindowCache) else None
        k, v, mask, nxt = cache.extend(x.k, x.v, x.key_padding_mask, keep=keep)
        return x.replace(k=k, v=v, key_padding_mask=mask, q_offset=cache.length, state=None), nxt

    # ---- cost formulas (used by the benchmark) -----------------------------------------------------

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        """Useful forward FLOPs of one call (FlashAttention convention: 2 per multiply-add)."""
        raise NotImplementedError

    def state_bytes(self, shape: Shape, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of the decoding state's tensors after ``shape.tk`` tokens (0 for mechanisms without state);
        a KV cache's ``nbytes`` adds the room to grow of the buffer they are views of."""
        kind = self.state_kind
        if kind is None:
            return 0
        if issubclass(kind, KVCache):
            kept = min(shape.tk, self.window_size() - 1) if kind is WindowCache else shape.tk
            elt = torch.empty(0, dtype=dtype).element_size()
            return shape.batch * kept * shape.kv_heads * (shape.dk + shape.dv) * elt
        return self.init_state(shape.batch, shape.kv_heads, shape.dk, shape.dv, device="meta").nbytes
