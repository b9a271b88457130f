"""The global order of work in one pass over a shard set: pieces, their permutation, their owners.

A pass covers the shards of a set once. Each shard is cut into ``split`` pieces (contiguous ranges of
its samples), so that a set with fewer shards than readers x shuffle window still gives every reader
distinct work: a piece is read by exactly one consumer, once per pass, and no two pieces overlap.
Pass p's pieces are visited in a seeded permutation that depends on (seed, p, the pass's shards,
split) only. Consumers (rank x worker) take positions round-robin from the pass's first global slot,
so which consumer gets one extra piece rotates from pass to pass instead of always being consumer 0.

Everything here is pure arithmetic over the index's sample counts: a whole pass's assignment can be
computed for a million shards and thousands of consumers without opening a tar.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

# A piece shorter than this costs more in tar members skipped to reach it than it adds in mixing.
MIN_PIECE_SAMPLES = 16


@dataclass(frozen=True)
class PassLayout:
    """Which shards a pass covers and how finely it cuts them.

    start: the pass's first global slot (passes follow each other in one slot sequence);
    gens: the pass covers the shards of index generations < gens (a set grown by ``--incremental``
    adds a generation; its shards join at the next pass); n: how many shards that is (a check);
    split: pieces per shard.
    """

    start: int
    gens: int
    n: int
    split: int

    @property
    def pieces(self) -> int:
        return self.n * self.split

    def to_list(self) -> list[int]:
        return [self.start, self.gens, self.n, self.split]

    @classmethod
    def from_list(cls, v: list[int]) -> "PassLayout":
        return cls(*(int(x) for x in v))

    def first_position(self, consumer: int, consumers: int) -> int:
        """The first position of this pass that `consumer` of `consumers` owns."""
        return (consumer - self.start) % consumers

    def positions(self, consumer: int, consumers: int) -> range:
        return range(self.first_position(consumer, consumers), self.pieces, consumers)


def choose_split(counts: np.ndarray, consumers: int, window: int) -> int:
    """Pieces per shard: enough for every consumer's window to hold distinct pieces, never tiny.

    At least two pieces per consumer whenever the shards are big enough to cut, so that the pass's
    work divides evenly; no piece shorter than MIN_PIECE_SAMPLES beyond that.
    """
    n = len(counts)
    if n == 0:
        return 1
    typical = int(np.median(counts))
    split = min(math.ceil(consumers * window / n), max(1, typical // MIN_PIECE_SAMPLES))
    if n * split < 2 * consumers:
        split = min(max(1, typical), math.ceil(2 * consumers / n))
    return max(1, split)


def piece_range(count: int, split: int, part: int) -> tuple[int, int | None]:
    """Samples [start, end) of a shard's piece; the last piece is open-ended (an index of tars another
    tool wrote may under-count them, and nothing past the count may be lost)."""
    start = part * count // split
    end = None if part == split - 1 else (part + 1) * count // split
    return start, end


class PassOrder:
    """Pass layouts resolved against one index: piece -> (shard, sample range), position -> piece."""

    def __init__(self, seed: int, counts: np.ndarray, generations: np.ndarray):
        self.seed = seed
        self.counts = counts
        self.generations = generations
        self._members: dict[int, np.ndarray | None] = {}
        self._perms: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def current_gens(self) -> int:
        return int(self.generations.max()) + 1 if len(self.generations) else 1

    def members(self, gens: int) -> np.ndarray | None:
        """Index positions of the shards of generations < gens (None: every shard, in index order)."""
        if gens not in self._members:
            keep = self.generations < gens
            self._members[gens] = None if keep.all() else np.flatnonzero(keep)
        return self._members[gens]

    def shard_count(self, gens: int) -> int:
        m = self.members(gens)
        return len(self.counts) if m is None else len(m)

    def fresh(self, start: int, consumers: int, window: int) -> PassLayout:
        """The layout of a pass that no consumer has entered yet: every shard of the index as it is now."""
        gens = self.current_gens()
        m = self.members(gens)
        counts = self.counts if m is None else self.counts[m]
        return PassLayout(start, gens, len(counts), choose_split(counts, consumers, window))

    def check(self, layout: PassLayout) -> bool:
        """Whether this index still holds exactly the shards the layout was made for."""
        return self.shard_count(layout.gens) == layout.n

    def perm(self, pass_index: int, layout: PassLayout) -> np.ndarray:
        key = (pass_index, layout.n, layout.split)
        p = self._perms.get(key)
        if p is None:
            rng = np.random.Generator(np.random.PCG64([self.seed, pass_index, 0x5EED]))
            p = rng.permutation(layout.pieces).astype(np.int64)
            self._perms[key] = p
            while len(self._perms) > 2:
                self._perms.popitem(last=False)
        return p

    def piece_at(self, pass_index: int, layout: PassLayout, position: int) -> tuple[int, int, int | None]:
        """(shard index position, first sample, end sample or None) of a position in a pass."""
        q = int(self.perm(pass_index, layout)[position])
        local, part = divmod(q, layout.split)
        m = self.members(layout.gens)
        shard = local if m is None else int(m[local])
        start, end = piece_range(int(self.counts[shard]), layout.split, part)
        return shard, start, end


def pass_assignment(order: PassOrder, pass_index: int, layout: PassLayout, consumers: int) -> dict[str, np.ndarray]:
    """A whole pass's work, without reading a tar: for every position, its shard, sample range
    [start, end) (end: the shard's indexed count for its last piece) and the consumer that owns it."""
    q = order.perm(pass_index, layout)
    local, part = np.divmod(q, layout.split)
    m = order.members(layout.gens)
    shard = local if m is None else m[local]
    count = order.counts[shard]
    start = part * count // layout.split
    end = (part + 1) * count // layout.split
    owner = (np.arange(layout.pieces, dtype=np.int64) + layout.start) % consumers
    return {"shard": shard, "start": start, "end": end, "consumer": owner}
