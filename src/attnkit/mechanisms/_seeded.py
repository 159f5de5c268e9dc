"""Random choices drawn once per module: the seed they come from, ``redraw()``, and saving it.

Mechanisms with random parts (random features, LSH rotations, random blocks, sampled keys) derive
every draw from one integer seed, never from the call: repeated calls agree, a causal output never
depends on later tokens, chunked decoding equals a full call, and two modules built with the same
``seed`` option are identical. ``seed=None`` draws the seed at create from torch's global generator
(reproducible under ``torch.manual_seed``, different per layer). The seed is saved in ``state_dict``
and recorded in the options a state is stamped with, so a state cannot continue under another draw.

A mechanism mixes this in before :class:`Mechanism`, declares ``seed: int | None = None`` in its
options, and gets its tensors from ``self.drawn(key, make)``: ``make(generator)`` runs once per
key (sizes, device, dtype), with a CPU ``torch.Generator`` seeded from the seed, and is cached until
``redraw()``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from typing import Any

import torch

SEED_RANGE = 2**31  # seeds drawn at create lie in [0, 2^31): any torch.Generator accepts them


class SeededDraws:
    """Mixin for a Mechanism whose options have a ``seed`` field."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.draw_seed = self._resolve(self.options.seed)
        self._drawn: dict[Hashable, torch.Tensor] = {}

    @staticmethod
    def _resolve(seed: int | None) -> int:
        return int(torch.randint(SEED_RANGE, ())) if seed is None else int(seed)

    def redraw(self, seed: int | None = None) -> None:
        """Draw new random choices: from ``seed``, or from a seed drawn from torch's global generator."""
        self.options = dataclasses.replace(self.options, seed=seed)  # checks the value
        self.draw_seed = self._resolve(seed)
        self._drawn.clear()

    def generator(self, salt: int = 0) -> torch.Generator:
        """A CPU generator seeded from the draw seed (``salt`` separates independent draws)."""
        return torch.Generator().manual_seed((self.draw_seed + salt * 1_000_003) % 2**63)

    def drawn(self, key: Hashable, make: Callable[[torch.Generator], torch.Tensor]) -> torch.Tensor:
        """The tensor ``make(generator)`` for this key, made once per seed (draw on the CPU, then move it,
        so that every device gets the same numbers)."""
        if key not in self._drawn:
            self._drawn[key] = make(self.generator())
        return self._drawn[key]

    def state_options(self) -> Any:
        """The options with the seed the draws came from (drawn at create when none was given)."""
        return dataclasses.replace(self.options, seed=self.draw_seed)

    def get_extra_state(self) -> dict[str, int]:
        return {"draw_seed": self.draw_seed}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.draw_seed = int(state.get("draw_seed", state.get("feature_seed")))  # older name
        self._drawn.clear()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, draw_seed={self.draw_seed}"
