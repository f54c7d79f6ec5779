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
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

LABELED, UNLABELED = 0, 1

_MASK64 = (1 << 64) - 1
_TAG_STREAM = 0x53545245414D # arbitrary domain tags keep the two hash uses apart
_TAG_DRAW = 0x44524157


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
    """

    def __init__(self, labeled_size: int, unlabeled_size: int, ratio: tuple[int, int] = (1, 4),
                 seed: int = 0, rank: int = 0, world_size: int = 1, start_iter: int = 0,
                 consumed_batches: int | None = None):
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
        self._streams: list[InfiniteIndices | None] = []
        for source, (n, size) in enumerate(zip(self.ratio, self.sizes)):
            if n == 0:
                self._streams.append(None)
                continue
            if size < 1:
                name = ("labeled", "unlabeled")[source]
                raise ValueError(f"ratio {self.ratio} draws {n} {name} images per iteration "
                                 f"but the {name} set is empty")
            self._streams.append(InfiniteIndices(size, hash_seed(self.seed, _TAG_STREAM, source)))

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

    def batch(self, iteration: int) -> list[tuple[int, int, int]]:
        """This rank's items ``(source, index, draw_seed)`` at ``iteration``."""
        items = []
        for source, stream in enumerate(self._streams):
            if stream is None:
                continue
            pos = self.positions(iteration, source)
            indices = stream.take(pos.start, len(pos))
            items += [(source, int(i), draw_seed(self.seed, source, p))
                      for i, p in zip(indices, pos)]
        return items

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        t = self.start_iter
        while True:
            yield self.batch(t)
            t += 1
