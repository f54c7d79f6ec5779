"""Infinite, seeded, rank-aware sampling: determinism, disjoint ranks, exact resume."""

import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from softteacher.data.samplers import (
    InfiniteIndices,
    MixedBatchSampler,
    SlotGroups,
    aspect_groups,
    draw_seed,
)


def first(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def positions(batches, source):
    """Multiset of (index, draw_seed) pairs of ``source`` in ``batches``."""
    return sorted((i, s) for b in batches for src, i, s in b if src == source)


# ----------------------------------------------------------------------------- InfiniteIndices

def test_infinite_indices_blocks_are_permutations():
    stream = InfiniteIndices(7, seed=3)
    x = stream.take(0, 7 * 4)
    blocks = x.reshape(4, 7)
    for b in blocks:
        assert sorted(b) == list(range(7))
    assert len({tuple(b) for b in blocks}) > 1  # reshuffled every block
    assert x.dtype == np.int64


def test_infinite_indices_take_is_positional_and_deterministic():
    a, b = InfiniteIndices(5, seed=1), InfiniteIndices(5, seed=1)
    whole = a.take(0, 40)
    # any split into pieces, in any order, reads the same global stream
    assert np.array_equal(np.concatenate([b.take(0, 3), b.take(3, 9), b.take(12, 28)]), whole)
    assert np.array_equal(b.take(17, 11), whole[17:28])
    assert np.array_equal(b.take(2, 0), np.zeros(0, np.int64))
    assert not np.array_equal(InfiniteIndices(5, seed=2).take(0, 40), whole)


def test_infinite_indices_unshuffled_and_size_one():
    assert InfiniteIndices(3, seed=0, shuffle=False).take(2, 5).tolist() == [2, 0, 1, 2, 0]
    assert InfiniteIndices(1, seed=9).take(5, 4).tolist() == [0, 0, 0, 0]
    for size in (0, -1):
        with pytest.raises(ValueError, match="size >= 1"):
            InfiniteIndices(size, seed=0)


# ----------------------------------------------------------------------------- MixedBatchSampler

def test_batches_follow_the_ratio_and_are_deterministic():
    s = MixedBatchSampler(10, 30, ratio=(1, 4), seed=5)
    batches = first(s, 20)
    assert batches == first(MixedBatchSampler(10, 30, ratio=(1, 4), seed=5), 20)
    assert batches == first(s, 20)  # iterating again restarts at start_iter
    assert batches != first(MixedBatchSampler(10, 30, ratio=(1, 4), seed=6), 20)
    for b in batches:
        assert [src for src, _, _ in b] == [0, 1, 1, 1, 1]
        assert all(0 <= i < 10 for src, i, _ in b if src == 0)
        assert all(0 <= i < 30 for src, i, _ in b if src == 1)
        assert all(isinstance(x, int) for item in b for x in item)
        assert all(0 <= seed < 2 ** 63 for _, _, seed in b)


def test_ranks_draw_disjoint_positions_whose_union_is_the_single_rank_stream():
    kw = dict(labeled_size=6, unlabeled_size=9, ratio=(2, 3), seed=1)
    ranks = [MixedBatchSampler(rank=r, world_size=2, **kw) for r in range(2)]
    single = MixedBatchSampler(**kw)
    for t in range(8):
        pos = [set(s.positions(t, src)) for s in ranks for src in (0, 1)]
        assert not pos[0] & pos[2] and not pos[1] & pos[3]  # labeled, unlabeled
        b0, b1 = ranks[0].batch(t), ranks[1].batch(t)
        assert [src for src, _, _ in b0] == [0, 0, 1, 1, 1] == [src for src, _, _ in b1]
        # W=2 iteration t consumes the global block of W=1 iterations 2t and 2t+1
        assert sorted(b0 + b1) == sorted(single.batch(2 * t) + single.batch(2 * t + 1))


def test_one_pass_covers_every_labeled_index_once():
    size, n = 11, 3
    s = MixedBatchSampler(size, 4, ratio=(n, 1), seed=2)
    batches = first(s, -(-size // n))  # ceil(size / n) iterations
    labeled = [i for b in batches for src, i, _ in b if src == 0]
    assert sorted(labeled[:size]) == list(range(size))  # the first permutation block
    assert len(labeled) == 12  # and the start of the next block


def test_start_iter_resumes_exactly():
    kw = dict(labeled_size=7, unlabeled_size=13, ratio=(1, 4), seed=4)
    fresh = first(MixedBatchSampler(**kw), 25)
    assert first(MixedBatchSampler(start_iter=10, **kw), 15) == fresh[10:]


def test_resume_with_a_different_world_size_continues_the_global_stream():
    kw = dict(labeled_size=5, unlabeled_size=8, ratio=(1, 2), seed=0)
    k = 6
    # 2 ranks for iterations 0..k-1 draw the first 2k per-rank batches of the global stream
    two = [MixedBatchSampler(rank=r, world_size=2, **kw) for r in range(2)]
    drawn = [b for s in two for b in first(s, k)]
    consumed = two[0].consumed_batches_at(k)
    assert consumed == two[1].consumed_batches_at(k) == 2 * k
    # 1 rank resuming at iteration k continues exactly where they stopped
    one = MixedBatchSampler(start_iter=k, consumed_batches=consumed, **kw)
    fresh = first(MixedBatchSampler(**kw), 2 * k + 4)
    assert sorted(sum(drawn, [])) == sorted(sum(fresh[:2 * k], []))
    assert first(one, 4) == fresh[2 * k:]
    # then 3 ranks from iteration k + 4: still the same global sequence
    c = one.consumed_batches_at(k + 4)
    three = [MixedBatchSampler(rank=r, world_size=3, start_iter=k + 4, consumed_batches=c, **kw)
             for r in range(3)]
    fresh = first(MixedBatchSampler(**kw), c + 6)
    assert [s.batch(k + 5) for s in three] == fresh[c + 3:c + 6]


def test_draw_seeds_identify_positions():
    s = MixedBatchSampler(3, 3, ratio=(2, 2), seed=7)
    seeds = [seed for b in first(s, 50) for _, _, seed in b]
    assert len(set(seeds)) == len(seeds) == 200  # distinct over positions and sources
    b = s.batch(4)
    assert b == MixedBatchSampler(3, 3, ratio=(2, 2), seed=7, start_iter=4).batch(4)
    assert b[0][2] == draw_seed(7, 0, 8) and b[2][2] == draw_seed(7, 1, 8)
    assert draw_seed(7, 0, 8) != draw_seed(8, 0, 8)


@pytest.mark.parametrize("labeled,unlabeled,ratio", [
    (1, 1, (1, 4)),  # size 1 datasets
    (2, 50, (5, 1)),  # labeled set smaller than the batch
    (3, 0, (4, 0)),  # supervised only: no unlabeled set needed
    (4, 4, (1, 1)),  # batch size 2
    (1, 1, (1, 0)),  # batch size 1
])
def test_small_and_odd_shapes(labeled, unlabeled, ratio):
    s = MixedBatchSampler(labeled, unlabeled, ratio=ratio, seed=0, rank=1, world_size=3)
    for b in first(s, 5):
        assert len(b) == sum(ratio)
        assert sum(src == 0 for src, _, _ in b) == ratio[0]
        assert all(0 <= i < (labeled, unlabeled)[src] for src, i, _ in b)


def test_no_len_and_bad_arguments():
    s = MixedBatchSampler(3, 3)
    with pytest.raises(TypeError):
        len(s)
    with pytest.raises(ValueError, match="unlabeled set is empty"):
        MixedBatchSampler(3, 0, ratio=(1, 4))
    with pytest.raises(ValueError, match="labeled set is empty"):
        MixedBatchSampler(0, 3, ratio=(1, 4))
    with pytest.raises(ValueError, match="ratio"):
        MixedBatchSampler(3, 3, ratio=(0, 0))
    with pytest.raises(ValueError, match="rank"):
        MixedBatchSampler(3, 3, rank=2, world_size=2)
    with pytest.raises(ValueError, match="before start_iter"):
        MixedBatchSampler(3, 3, start_iter=4).batch(3)


class Echo(Dataset):
    def __getitem__(self, item):
        source, index, seed = item
        return torch.tensor([source, index, seed], dtype=torch.int64)


def test_dataloader_batches_are_identical_with_and_without_workers():
    s = MixedBatchSampler(5, 7, ratio=(1, 2), seed=3, start_iter=2)
    expected = [torch.tensor(b, dtype=torch.int64) for b in first(s, 6)]
    for workers in (0, 2):
        loader = DataLoader(Echo(), batch_sampler=s, num_workers=workers)
        got = list(itertools.islice(iter(loader), 6))
        assert len(got) == 6
        for g, e in zip(got, expected):
            assert torch.equal(g, e), workers


# ----------------------------------------------------------------------------- grouping by aspect

def test_aspect_groups_by_hand():
    assert aspect_groups([640, 480, 500, 501], [480, 640, 500, 500]).tolist() == [1, 0, 0, 1]
    with pytest.raises(ValueError, match="2 widths for 3 heights"):
        aspect_groups([1, 2], [1, 2, 3])


@pytest.mark.parametrize("sizes,block,counts", [
    ([3, 1], 8, [6, 2]),  # exact shares
    ([1000, 1], 1024, [1023, 1]),  # quotas 1022.98 / 1.02: the remainder goes to group 0
    ([1, 10000], 8, [1, 7]),  # quota 0.0008, but a non-empty group keeps one slot per block
    ([1, 1, 1], 8, [3, 3, 2]),  # ties broken towards the lower group
])
def test_slot_groups_counts_by_hand(sizes, block, counts):
    assert SlotGroups(sizes, seed=0, block=block).counts.tolist() == counts


def test_slot_groups_blocks_hold_their_counts_and_count_earlier_slots():
    slots = SlotGroups([5, 3], seed=11, block=16)  # counts 10 and 6
    located = [slots.locate(k) for k in range(16 * 5)]
    groups = [g for g, _ in located]
    for b in range(5):
        assert sorted(groups[16 * b:16 * (b + 1)]) == [0] * 10 + [1] * 6
    assert len({tuple(groups[16 * b:16 * (b + 1)]) for b in range(5)}) > 1  # re-placed per block
    for k, (g, earlier) in enumerate(located):
        assert earlier == groups[:k].count(g)
    # any order of queries gives the same answers
    assert [SlotGroups([5, 3], seed=11, block=16).locate(k) for k in (70, 3, 40, 3)] == \
        [located[70], located[3], located[40], located[3]]
    assert [SlotGroups([5, 3], seed=12, block=16).locate(k)[0] for k in range(16)] != groups[:16]


GROUPED = dict(labeled_size=6, unlabeled_size=10, ratio=(1, 2), seed=3,
               groups=([0, 1, 1, 0, 1, 1], [1, 0, 0, 0, 1, 1, 1, 0, 1, 1]))


def test_grouped_batches_draw_one_group_each_and_cover_every_image():
    s = MixedBatchSampler(**GROUPED)
    assert s.grouped
    ids = GROUPED["groups"]
    batches = first(s, 300)
    per_group = {0: {0: [], 1: []}, 1: {0: [], 1: []}}  # group -> source -> indices in order
    for t, b in enumerate(batches):
        g = {ids[src][i] for src, i, _ in b}
        assert len(g) == 1 and g == {s.group(t)[0]}  # labeled and unlabeled alike
        for src, i, _ in b:
            per_group[ids[src][i]][src].append(i)
    for g in (0, 1):
        for src in (0, 1):
            members = [i for i, x in enumerate(ids[src]) if x == g]
            drawn = per_group[g][src]
            # each group's stream is permutations of its members laid end to end
            for k in range(len(drawn) // len(members)):
                assert sorted(drawn[k * len(members):(k + 1) * len(members)]) == members
    # slots in proportion to the groups' images over both sources: group 0 has 2 + 4 of the
    # 16, so exactly 1,024 * 6 / 16 = 384 of the first 1,024 slots
    assert sum(s.group(t)[0] == 0 for t in range(1024)) == 384
    # the draw seeds are those of the ungrouped global positions
    plain = first(MixedBatchSampler(**{**GROUPED, "groups": None}), 300)
    assert [[seed for _, _, seed in b] for b in batches] == [[seed for _, _, seed in b] for b in plain]
    assert [[i for _, i, _ in b] for b in batches] != [[i for _, i, _ in b] for b in plain]


def test_grouped_resume_and_world_size_change_continue_the_global_stream():
    fresh = first(MixedBatchSampler(**GROUPED), 40)
    assert first(MixedBatchSampler(start_iter=15, **GROUPED), 25) == fresh[15:]
    two = [MixedBatchSampler(rank=r, world_size=2, **GROUPED) for r in range(2)]
    for t in range(6):  # W=2 iteration t is the W=1 iterations 2t and 2t+1
        assert [s.batch(t) for s in two] == fresh[2 * t:2 * t + 2]
    three = [MixedBatchSampler(rank=r, world_size=3, start_iter=6, consumed_batches=12, **GROUPED)
             for r in range(3)]
    assert [s.batch(7) for s in three] == fresh[15:18]


def test_grouping_falls_back_to_the_plain_streams():
    plain = first(MixedBatchSampler(**{**GROUPED, "groups": None}), 30)
    # one orientation everywhere: nothing to group
    one = MixedBatchSampler(**{**GROUPED, "groups": ([1] * 6, [1] * 10)})
    # the labeled set has no group 0 to pair with the unlabeled group-0 images
    lacking = MixedBatchSampler(**{**GROUPED, "groups": ([1] * 6, GROUPED["groups"][1])})
    for s in (one, lacking):
        assert not s.grouped and first(s, 30) == plain
    # the sets' proportions far apart: 1 wide + 5 tall labeled, 9 wide + 1 tall unlabeled. Grouped,
    # the wide slots (10 of 16 images) would draw the wide labeled image 10/16 / (1/6) = 3.75
    # times as often as uniform and a tall one 6/16 / (5/6) = 0.45: 8.3 times apart
    skewed = MixedBatchSampler(**{**GROUPED, "groups": ([0, 1, 1, 1, 1, 1], [0] * 9 + [1])})
    assert not skewed.grouped and first(skewed, 30) == plain
    assert skewed.skew == pytest.approx((10 / 16 / (1 / 6)) / (6 / 16 / (5 / 6)))
    # GROUPED's: labeled 2/6 in group 0, unlabeled 4/10; slots 6/16: labeled 1.125 / 0.9375
    assert MixedBatchSampler(**GROUPED).skew == pytest.approx((6 / 16 / (2 / 6)) / (10 / 16 / (4 / 6)))
    # a resumed run's decision stands whatever the skew says now
    kept = MixedBatchSampler(**{**GROUPED, "groups": ([0, 1, 1, 1, 1, 1], [0] * 9 + [1]), "grouped": True})
    assert kept.grouped and kept.skew == skewed.skew
    assert not MixedBatchSampler(**{**GROUPED, "grouped": False}).grouped
    assert first(MixedBatchSampler(**{**GROUPED, "grouped": False}), 30) == plain
    assert not MixedBatchSampler(**{**GROUPED, "groups": ([1] * 6, [1] * 10), "grouped": True}).grouped
    # one tall image among 20,000: its group holds 1 slot of every 1,024 (none would starve it),
    # 19.5 times its share of 1 in 20,000; the others' 1,023 slots a little under theirs
    odd = MixedBatchSampler(20_000, 0, ratio=(1, 0), groups=([0] + [1] * 19_999, None))
    assert odd.skew == pytest.approx((1 / 1024 / (1 / 20_000)) / (1023 / 1024 / (19_999 / 20_000)))
    assert not odd.grouped
    # a source the ratio does not draw from needs no ids
    sup = MixedBatchSampler(6, 0, ratio=(2, 0), seed=3, groups=(GROUPED["groups"][0], None))
    assert sup.grouped and all(len({GROUPED["groups"][0][i] for _, i, _ in b}) == 1 for b in first(sup, 20))
    with pytest.raises(ValueError, match="5 labeled group ids for 6 images"):
        MixedBatchSampler(**{**GROUPED, "groups": ([0] * 5, GROUPED["groups"][1])})
    with pytest.raises(ValueError, match="unlabeled images need group ids"):
        MixedBatchSampler(**{**GROUPED, "groups": (GROUPED["groups"][0], None)})
