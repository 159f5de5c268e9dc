"""The pieces of the sequence a rank holds: the layout's chunks, one (contiguous) or two (zigzag), each a run of
consecutive global positions. The strategies that
work on runs of consecutive global positions (LASP-2's chunk states, the sigmoid partial sums) cut a rank's tokens
into these pieces; every rank knows every rank's pieces from the layout alone."""

from __future__ import annotations

from dataclasses import dataclass

from .layout import pieces, positions


@dataclass(frozen=True)
class Piece:
    """Tokens ``local[lo:lo + length]`` of a rank hold global positions ``start .. start + length - 1``."""

    lo: int
    start: int
    length: int

    @property
    def end(self) -> int:  # the last global position
        return self.start + self.length - 1

    @property
    def local(self) -> slice:
        return slice(self.lo, self.lo + self.length)


def rank_pieces(total: int, world: int, rank: int, layout: str) -> list[Piece]:
    """The layout's chunks ``rank`` holds, in local order: one of T/W tokens (contiguous) or two of T/(2W) (zigzag;
    on rank W-1 they happen to be adjacent, kept apart so that every rank has as many pieces)."""
    pos = positions(total, world, rank, layout).tolist()
    size = total // pieces(world, layout)  # tokens per chunk
    return [Piece(lo=lo, start=pos[lo], length=size) for lo in range(0, len(pos), size)]


def world_pieces(total: int, world: int, layout: str) -> list[list[Piece]]:
    """``[rank][piece]``: every rank's pieces (the same count on every rank)."""
    return [rank_pieces(total, world, r, layout) for r in range(world)]
