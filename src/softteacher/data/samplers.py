"""Infinite, seeded, rank-aware sampling of labeled and unlabeled images (SPEC §1).

Each source (labeled, unlabeled) is one global infinite stream of indices: permutations of
``range(size)`` laid end to end. The streams are cut into per-rank batches ("slots"): slot
``k`` holds positions ``[k*n, (k+1)*n)`` of a stream (``n`` items of that source per rank).
Iteration ``t`` of a run with ``W`` ranks uses slots ``[t*W, (t+1)*W)`` and rank ``r`` takes
slot ``t*W + r``, so ranks draw disjoint positions and the ratio holds on every rank. Nothing
depends on an epoch length: any dataset size, ratio and world size works.

Resume: a sampler started at ``start_iter`` reproduces the rest of the run exactly. After a
change of world size, pass ``consumed_batches`` (slots used before ``start_iter``; store
``sampler.consumed_batches_at(iteration)`` in checkpoints) and the run continues the same
global sequence where it stopped.

Seeding:
    * permutation ``e`` of a stream with seed ``s`` is drawn by
      ``Generator(PCG64(SeedSequence(s, spawn_key=(e,))))``, i.e. the ``e``-th child
      ``SeedSequence(s).spawn(...)[e]``;
    * the labeled and unlabeled streams use the seeds ``hash64(seed, "stream", source)``;
    * every item carries ``draw_seed = hash64(seed, "draw", source, position)`` (63 bits),
      for the dataset to seed that item's augmentation: a view depends on (seed, source,
      stream position) only, never on workers or ranks.
    ``hash64`` chains the splitmix64 finaliser (a bijection of 64-bit words) over the words.

Grouping by aspect (``groups``): every image belongs to a group (:func:`aspect_groups`:
wider than tall, or not), each (source, group) has a stream of its own, and every slot draws
all its images, labeled and unlabeled, from one group, so that a rank's batch pads to less.
Which group slot ``k`` draws is :class:`SlotGroups`' business: in each block of 1,024 slots,
every group holds a fixed number of slots in proportion to its images, at places a seeded
permutation picks. A slot reads its group's stream at ``(slots of that group before k) * n``,
and its draw seeds stay those of the global positions above, so resume and a change of world
size work as without groups. Where the labeled and the unlabeled set hold the groups in other
proportions, the slots' shares favour one group's images of a source over another's; past
``MAX_GROUP_SKEW`` (an image of one group drawn more than twice as often as one of another, in
one source) the sampler does not group.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

LABELED, UNLABELED = 0, 1

_MASK64 = (1 << 64) - 1
_TAG_STREAM = 0x53545245414D # arbitrary domain tags keep the hash uses apart
_TAG_DRAW = 0x44524157
_TAG_GROUP = 0x47524F5550
SLOT_BLOCK = 1024


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def hash_seed(*words: int) -> int:
    """A 63-bit non-negative int from non-negative int words (deterministic, platform-free)."""
    h = 0
    for w in words:
        if w < 0:
            raise ValueError(f"hash_seed words must be >= 0, got {w}")
        h = _splitmix64(h ^ (w & _MASK64))
    return h >> 1


def draw_seed(seed: int, source: int, position: int) -> int:
    """The augmentation seed of stream ``source``'s item at global ``position`` (63 bits)."""
    return hash_seed(seed, _TAG_DRAW, source, position)


class InfiniteIndices:
    """A deterministic infinite stream of indices into ``range(size)``.

    Positions ``[e*size, (e+1)*size)`` hold permutation ``e`` (or ``arange(size)`` when
    ``shuffle`` is False), so every index appears exactly once per block of ``size``.

    Args:
        size: number of items, >= 1.
        seed: non-negative int.
        shuffle: False gives 0, 1, ..., size-1, 0, 1, ...
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        if int(size) < 1:
            raise ValueError(f"InfiniteIndices needs size >= 1, got {size}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.size = int(size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self._cached: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        """(size,) int64: the indices at positions ``[epoch*size, (epoch+1)*size)``."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        if self.shuffle:
            ss = np.random.SeedSequence(self.seed, spawn_key=(epoch,))
            perm = np.random.Generator(np.random.PCG64(ss)).permutation(self.size)
        else:
            perm = np.arange(self.size)
        perm = perm.astype(np.int64)
        perm.setflags(write=False)
        self._cached = (epoch, perm)
        return perm

    def take(self, start: int, count: int) -> np.ndarray:
        """(count,) int64: the indices at global positions ``start .. start+count-1``."""
        if start < 0 or count < 0:
            raise ValueError(f"take needs start >= 0 and count >= 0, got {start}, {count}")
        out = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            epoch, offset = divmod(start + done, self.size)
            n = min(self.size - offset, count - done)
            out[done:done + n] = self.permutation(epoch)[offset:offset + n]
            done += n
        return out


def aspect_groups(widths: Sequence[int], heights: Sequence[int]) -> np.ndarray:
    """(N,) int64 group per image: 1 when wider than tall, 0 otherwise (taller, or square)."""
    w, h = np.asarray(widths, dtype=np.int64), np.asarray(heights, dtype=np.int64)
    if w.shape != h.shape:
        raise ValueError(f"{w.shape[0]} widths for {h.shape[0]} heights")
    return (w > h).astype(np.int64)


def slot_counts(sizes: Sequence[int], block: int = SLOT_BLOCK) -> np.ndarray:
    """(G,) slots of every block of ``block`` that groups of ``sizes`` images hold (see
    :class:`SlotGroups`)."""
    sizes = [int(x) for x in sizes]
    total = sum(sizes)
    quotas = [block * x / total for x in sizes]
    counts = [max(1, int(q)) for q in quotas]
    while sum(counts) < block:  # largest remainder first
        g = max(range(len(sizes)), key=lambda i: (quotas[i] - counts[i], -i))
        counts[g] += 1
    while sum(counts) > block:  # only when the minimum of 1 overshot: take from the largest
        g = max(range(len(sizes)), key=lambda i: (counts[i], -i))
        counts[g] -= 1
    return np.asarray(counts, dtype=np.int64)


class SlotGroups:
    """Which of ``G`` groups each slot ``0, 1, 2, ...`` draws from.

    Slots come in blocks of ``block``. Group ``g`` holds ``counts[g]`` slots of every block:
    ``block * sizes[g] / sum(sizes)`` rounded by largest remainder, at least 1 for a non-empty
    group (so that none is starved). Block ``b``'s places are ``repeat(range(G), counts)``
    permuted by ``Generator(PCG64(SeedSequence(seed, spawn_key=(b,))))``.

    Args:
        sizes: (G,) images per group (all sources together), each >= 1.
        seed: non-negative int.
        block: slots per block, >= G.
    """

    def __init__(self, sizes: Sequence[int], seed: int, block: int = SLOT_BLOCK):
        sizes = [int(x) for x in sizes]
        if not sizes or min(sizes) < 1:
            raise ValueError(f"SlotGroups needs non-empty groups, got sizes {sizes}")
        if block < len(sizes):
            raise ValueError(f"a block of {block} slots cannot hold {len(sizes)} groups")
        self.block = int(block)
        self.seed = int(seed)
        self.counts = slot_counts(sizes, block)
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Block ``b``: (block,) group per place, and (block,) slots of the same group before it."""
        if self._cached is None or self._cached[0] != b:
            gen = np.random.Generator(np.random.PCG64(np.random.SeedSequence(self.seed, spawn_key=(b,))))
            places = np.repeat(np.arange(len(self.counts)), self.counts)[gen.permutation(self.block)]
            before = np.empty(self.block, dtype=np.int64)
            seen = np.zeros(len(self.counts), dtype=np.int64)
            for j, g in enumerate(places):
                before[j] = seen[g]
                seen[g] += 1
            self._cached = (b, places, before)
        return self._cached[1], self._cached[2]

    def locate(self, slot: int) -> tuple[int, int]:
        """(group of ``slot``, how many slots before it drew that group)."""
        if slot < 0:
            raise ValueError(f"slot must be >= 0, got {slot}")
        b, j = divmod(int(slot), self.block)
        places, before = self._block(b)
        g = int(places[j])
        return g, b * int(self.counts[g]) + int(before[j])


MAX_GROUP_SKEW = 2.0


def group_skew(ids: list[np.ndarray | None]) -> float:
    """How unevenly grouped slots draw a source's images: per drawn source, how many times as
    often an image of its most-drawn group is drawn as one of its least-drawn, the largest over
    the sources. A group's slots are its share of all the sources' images together as
    :func:`slot_counts` rounds it to whole slots of a block (at least one: a group of a few
    images among many is drawn more often than its share), while a source's image of that group
    is drawn at that share over the source's own share of it."""
    drawn = [g for g in ids if g is not None]
    num_groups = int(max(g.max() for g in drawn)) + 1
    counts = np.array([np.bincount(g, minlength=num_groups) for g in drawn], dtype=np.float64)
    slots = slot_counts(counts.sum(axis=0).astype(np.int64)) / SLOT_BLOCK
    rates = slots / (counts / counts.sum(axis=1, keepdims=True))
    return float((rates.max(axis=1) / rates.min(axis=1)).max())


class MixedBatchSampler:
    """Yields, for iterations ``start_iter, start_iter+1, ...`` forever, this rank's items.

    Each batch is a list of ``(source, index, draw_seed)``: ``ratio[0]`` labeled items
    (source 0) then ``ratio[1]`` unlabeled items (source 1). Use it as a DataLoader
    ``batch_sampler``; it has no ``len`` (infinite). Iterating again restarts at ``start_iter``.

    Args:
        labeled_size: images in the labeled set (>= 1 unless ``ratio[0] == 0``).
        unlabeled_size: images in the unlabeled set (>= 1 unless ``ratio[1] == 0``).
        ratio: (labeled, unlabeled) images per rank per iteration; (L, 0) is supervised only.
        seed: non-negative int; the same seed gives the same global streams.
        rank, world_size: this process and the number of processes.
        start_iter: first iteration to yield (resume: the checkpoint's iteration).
        consumed_batches: per-rank batches (slots) the whole run drew before ``start_iter``,
            i.e. the sum of the world sizes of its past iterations. None means
            ``start_iter * world_size`` (the world size never changed).
        groups: optional (labeled, unlabeled) group ids per image (e.g. :func:`aspect_groups`;
            None for a source the ratio does not draw from): each slot then draws all its
            items from one group. When a group that one drawn source has is missing from
            another, there is nothing to pair it with, and the sampler does not group
            (``grouped`` is False); nor where grouping would draw a source's images of one
            group more than ``MAX_GROUP_SKEW`` times as often as another's (``skew``, the
            largest such factor over the drawn sources, says how uneven; 1.0: even); with one
            group it draws exactly as without ``groups``.
        grouped: the decision of a run this one resumes (True, False), kept whatever the
            skew says now, so that the batches continue as they were drawn; None decides by
            the skew. True where nothing can be grouped (one group) draws ungrouped.
    """

    def __init__(self, labeled_size: int, unlabeled_size: int, ratio: tuple[int, int] = (1, 4),
                 seed: int = 0, rank: int = 0, world_size: int = 1, start_iter: int = 0,
                 consumed_batches: int | None = None,
                 groups: tuple[Sequence[int] | None, Sequence[int] | None] | None = None,
                 grouped: bool | None = None):
        if len(ratio) != 2 or any(int(r) != r or r < 0 for r in ratio) or sum(ratio) == 0:
            raise ValueError(f"ratio must be two non-negative ints, not both 0; got {ratio}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, "
                             f"world_size {world_size}")
        if start_iter < 0:
            raise ValueError(f"start_iter must be >= 0, got {start_iter}")
        if consumed_batches is not None and consumed_batches < 0:
            raise ValueError(f"consumed_batches must be >= 0, got {consumed_batches}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.ratio = (int(ratio[0]), int(ratio[1]))
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.start_iter = int(start_iter)
        self.start_batches = (self.start_iter * self.world_size if consumed_batches is None
                              else int(consumed_batches))
        self.sizes = (int(labeled_size), int(unlabeled_size))
        for source, (n, size) in enumerate(zip(self.ratio, self.sizes)):
            if n > 0 and size < 1:
                name = ("labeled", "unlabeled")[source]
                raise ValueError(f"ratio {self.ratio} draws {n} {name} images per iteration "
                                 f"but the {name} set is empty")
        ids = self._group_ids(groups)
        self.skew = 1.0 if ids is None else group_skew(ids)
        if grouped is False or (grouped is None and self.skew > MAX_GROUP_SKEW):
            ids = None
        self.grouped = ids is not None
        # per source: None (not drawn), or per group (stream, the images it indexes or None for all)
        self._streams: list[list[tuple[InfiniteIndices, np.ndarray | None]] | None] = []
        self._slots: SlotGroups | None = None
        if ids is None:
            for source, (n, size) in enumerate(zip(self.ratio, self.sizes)):
                seed = hash_seed(self.seed, _TAG_STREAM, source)
                self._streams.append(None if n == 0 else [(InfiniteIndices(size, seed), None)])
            return
        num_groups = len(np.unique(np.concatenate([i for i in ids if i is not None])))
        for source, source_ids in enumerate(ids):
            if source_ids is None:
                self._streams.append(None)
                continue
            members = [np.flatnonzero(source_ids == g) for g in range(num_groups)]
            self._streams.append([(InfiniteIndices(len(m), hash_seed(self.seed, _TAG_STREAM, source, g + 1)),
                                   m) for g, m in enumerate(members)])
        sizes = [sum(len(s[g][1]) for s in self._streams if s is not None) for g in range(num_groups)]
        self._slots = SlotGroups(sizes, hash_seed(self.seed, _TAG_GROUP))

    def _group_ids(self, groups) -> list[np.ndarray | None] | None:
        """Per source, its group ids renumbered 0..G-1 across sources (None where not drawn);
        None when there is nothing to group: one group only, or a group some drawn source lacks."""
        if groups is None:
            return None
        if len(groups) != 2:
            raise ValueError(f"groups must be (labeled, unlabeled), got {len(groups)} entries")
        ids: list[np.ndarray | None] = []
        for source, (n, size, g) in enumerate(zip(self.ratio, self.sizes, groups)):
            if n == 0:
                ids.append(None)
                continue
            name = ("labeled", "unlabeled")[source]
            if g is None:
                raise ValueError(f"groups: the {name} images need group ids")
            g = np.asarray(g, dtype=np.int64)
            if g.shape != (size,):
                raise ValueError(f"groups: {g.shape[0] if g.ndim else 0} {name} group ids for {size} images")
            ids.append(g)
        present = [set(np.unique(g).tolist()) for g in ids if g is not None]
        union = sorted(set().union(*present))
        if len(union) < 2 or any(p != set(union) for p in present):
            return None
        return [None if g is None else np.searchsorted(union, g) for g in ids]

    @property
    def batch_size(self) -> int:
        """Items per rank per iteration."""
        return sum(self.ratio)

    def consumed_batches_at(self, iteration: int) -> int:
        """Slots the run has drawn before ``iteration`` (>= start_iter): the value to checkpoint."""
        if iteration < self.start_iter:
            raise ValueError(f"iteration {iteration} is before start_iter {self.start_iter}")
        return self.start_batches + (iteration - self.start_iter) * self.world_size

    def positions(self, iteration: int, source: int) -> range:
        """Global stream positions of ``source`` that this rank draws at ``iteration``."""
        n = self.ratio[source]
        start = (self.consumed_batches_at(iteration) + self.rank) * n
        return range(start, start + n)

    def group(self, iteration: int) -> tuple[int, int]:
        """(group, slots of that group before this one) of this rank's slot at ``iteration``;
        (0, slot) without grouping."""
        slot = self.consumed_batches_at(iteration) + self.rank
        return self._slots.locate(slot) if self._slots is not None else (0, slot)

    def batch(self, iteration: int) -> list[tuple[int, int, int]]:
        """This rank's items ``(source, index, draw_seed)`` at ``iteration``."""
        items = []
        group, earlier = self.group(iteration)
        for source, streams in enumerate(self._streams):
            if streams is None:
                continue
            pos = self.positions(iteration, source)
            stream, members = streams[group]
            indices = stream.take(earlier * len(pos), len(pos))
            if members is not None:
                indices = members[indices]
            items += [(source, int(i), draw_seed(self.seed, source, p))
                      for i, p in zip(indices, pos)]
        return items

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        t = self.start_iter
        while True:
            yield self.batch(t)
            t += 1
