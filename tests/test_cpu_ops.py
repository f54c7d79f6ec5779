import os

import pytest
import torch
from torchvision.ops import roi_align as torchvision_roi_align

from softteacher.cpu_ops import MIN_BOXES, roi_align


def _rois(n: int, images: int, width: float, height: float, g: torch.Generator) -> torch.Tensor:
    """Boxes of all kinds: inside, across the border, outside, inverted, of zero size."""
    xy = torch.rand(n, 2, generator=g) * torch.tensor([width, height]) * 1.2 - 8
    wh = torch.rand(n, 2, generator=g) * 60 + 1
    boxes = torch.cat([xy, xy + wh], dim=1)
    boxes[0] = torch.tensor([10.0, 10.0, 4.0, 30.0])  # inverted in x
    boxes[1] = torch.tensor([20.0, 20.0, 20.0, 20.0])  # a point
    boxes[2] = torch.tensor([-50.0, -50.0, -20.0, -30.0])  # outside
    owner = torch.randint(0, images, (n, 1), generator=g).float()
    return torch.cat([owner, boxes], dim=1)


def _ours(pooled: torch.Tensor) -> bool:
    return type(pooled.grad_fn).__name__ == "_ThreadedRoIAlignBackward"


def _sparse(pooled: torch.Tensor) -> bool:
    return type(pooled.grad_fn).__name__ == "_SparseRoIAlignBackward"


@pytest.mark.parametrize("size, scale, sampling, aligned", [
    (7, 0.25, 2, False), ((5, 3), 0.5, 1, True), (7, 0.25, 3, True), (4, 1.0, 2, False)])
def test_sparse_roi_align_is_torchvisions_to_float_rounding(size, scale, sampling, aligned):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 7, 24, 20, generator=g, requires_grad=True)
    rois = _rois(50, 3, 80, 96, g)  # inverted, a point, outside, across the border
    ours = roi_align(feats, rois, size, scale, sampling, aligned=aligned)
    theirs = torchvision_roi_align(feats, rois, size, scale, sampling, aligned=aligned)
    assert _sparse(ours) and ours.shape == theirs.shape and ours.is_contiguous()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    weights = torch.randn(ours.shape, generator=g)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), feats)
    (grad_theirs,) = torch.autograd.grad((theirs * weights).sum(), feats)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=0, atol=1e-5)


def test_sparse_roi_align_leaves_an_adaptive_sampling_ratio_to_the_threads():
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 4, 16, 16, generator=g, requires_grad=True)
    rois = _rois(MIN_BOXES, 2, 64, 64, g)
    assert _ours(roi_align(feats, rois, 7, 0.25, 0, threads=2))  # a grid per box: threaded
    assert not _sparse(roi_align(feats, rois[:MIN_BOXES - 1], 7, 0.25, 2))  # few boxes: torchvision's
    assert roi_align(feats, torch.zeros(0, 5), 7, 0.25, 2).shape == (0, 4, 7, 7)


@pytest.mark.parametrize("threads", [2, 3])
def test_threaded_roi_align_is_torchvisions_bit_for_bit(threads):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 7, 24, 20, generator=g, requires_grad=True)
    rois = _rois(50, 3, 80, 96, g)
    ours = roi_align(feats, rois, 7, 0.25, 2, threads=threads, sparse=False)
    theirs = torchvision_roi_align(feats, rois, 7, 0.25, 2)
    assert _ours(ours) and not _ours(theirs)
    assert torch.equal(ours, theirs)
    weights = torch.randn(ours.shape, generator=g)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), feats)
    (grad_theirs,) = torch.autograd.grad((theirs * weights).sum(), feats)
    assert torch.equal(grad_ours, grad_theirs)
    aligned = roi_align(feats, rois, (5, 3), 0.5, 1, aligned=True, threads=threads, sparse=False)
    assert _ours(aligned)
    assert torch.equal(aligned, torchvision_roi_align(feats, rois, (5, 3), 0.5, 1, aligned=True))


@pytest.mark.parametrize("sparse", [False, True])
def test_roi_align_pools_a_linear_map_to_its_bin_means(sparse):
    # f(y, x) = x + 10 y is linear, so bilinear sampling is exact: box (0, 0, 3, 3) in 2 x 2 bins
    # of 2 x 2 samples at 0.375, 1.125 | 1.875, 2.625 gives bin means x, y in {0.75, 2.25}
    ys, xs = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    feats = (xs + 10 * ys).expand(1, 2, 4, 4).clone().requires_grad_(True)
    rois = torch.tensor([[0.0, 0.0, 0.0, 3.0, 3.0]]).repeat(MIN_BOXES, 1)
    pooled = roi_align(feats, rois, 2, 1.0, 2, threads=2, sparse=sparse)
    assert _sparse(pooled) if sparse else _ours(pooled)
    want = torch.tensor([[8.25, 9.75], [23.25, 24.75]])
    torch.testing.assert_close(pooled, want.expand(MIN_BOXES, 2, 2, 2), rtol=0, atol=1e-6)
    # every output spreads a gradient of 1 over its samples' corners, whose weights sum to 1
    pooled.sum().backward()
    torch.testing.assert_close(feats.grad.sum(), torch.tensor(MIN_BOXES * 2 * 2 * 2.0))
    # the corner pixel (0, 0) is read only by bin (0, 0)'s first sample: (1 - .375)^2 / 4 per box
    torch.testing.assert_close(feats.grad[0, :, 0, 0], torch.full((2,), MIN_BOXES * 0.625 ** 2 / 4))


def test_the_level_matrix_reads_each_box_from_its_own_map():
    from softteacher.cpu_ops import level_matrix

    # map 0: 1 image of 4 x 4 at scale 1; map 1: 1 image of 2 x 2 at scale 0.5, columns 16..19.
    # Box (0, 0, 2, 2) on map 1 is (0, 0, 1, 1) there: one bin, one sample at (0.5, 0.5), a quarter
    # on each of the map's four pixels. The same box on map 0: its sample at (1, 1) is pixel 5.
    # A box of level 2 names no map: a row of zero weights.
    rois = torch.tensor([[0.0, 0.0, 0.0, 2.0, 2.0]] * 3)
    matrix = level_matrix(rois, torch.tensor([1, 0, 2]), [(1, 4, 4), (1, 2, 2)], [1.0, 0.5], 1, 1, 1, False)
    dense = matrix.to_dense()
    assert dense.shape == (3, 20)
    want = torch.zeros(3, 20)
    want[0, 16:20] = 0.25
    want[1, 5] = 1.0
    torch.testing.assert_close(dense, want, rtol=0, atol=0)


def test_transposed_is_the_transpose_with_each_rows_entries_in_row_order():
    from softteacher.cpu_ops import transposed

    crow = torch.tensor([0, 2, 3, 5])
    columns = torch.tensor([2, 0, 2, 0, 2])  # row 0 lists column 2 before column 0
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    matrix = torch.sparse_csr_tensor(crow, columns, values, (3, 4), check_invariants=False)  # unsorted rows
    t = transposed(matrix)
    assert t.shape == (4, 3)
    torch.testing.assert_close(t.to_dense(), matrix.to_dense().t(), rtol=0, atol=0)
    assert t.crow_indices().tolist() == [0, 2, 2, 5, 5]
    assert t.col_indices().tolist() == [0, 2, 0, 1, 2]  # column 2 of rows 0, 1, 2 in that order
    assert t.values().tolist() == [2.0, 4.0, 1.0, 3.0, 5.0]


def test_sparse_roi_align_of_several_maps_under_bf16_autocast():
    from softteacher.cpu_ops import sparse_roi_align

    g = torch.Generator().manual_seed(2)
    maps = [torch.randn(2, 4, 32, 32, generator=g).bfloat16().requires_grad_(True),
            torch.randn(2, 4, 16, 16, generator=g).bfloat16().requires_grad_(True)]
    rois = _rois(40, 2, 128, 128, g)
    levels = torch.randint(0, 2, (40,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = sparse_roi_align(maps, rois, levels, [0.25, 0.125], (7, 7), 2)
    assert ours.dtype == torch.bfloat16 and ours.shape == (40, 4, 7, 7)
    for k, scale in enumerate([0.25, 0.125]):
        theirs = torchvision_roi_align(maps[k].float(), rois[levels == k], 7, scale, 2)
        torch.testing.assert_close(ours[levels == k].float(), theirs, rtol=1e-2, atol=1e-2)
    grads = torch.autograd.grad(ours.float().sum(), maps)
    assert [gr.dtype for gr in grads] == [torch.bfloat16] * 2
    for k, scale in enumerate([0.25, 0.125]):
        leaf = maps[k].detach().float().requires_grad_(True)
        (want,) = torch.autograd.grad(torchvision_roi_align(leaf, rois[levels == k], 7, scale, 2).sum(), leaf)
        torch.testing.assert_close(grads[k].float(), want, rtol=1e-2, atol=2e-2)


def test_threaded_roi_align_under_bf16_autocast_keeps_the_feature_dtype():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 4, 16, 16, generator=g).bfloat16().requires_grad_(True)
    rois = _rois(40, 2, 64, 64, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = roi_align(feats, rois, 7, 0.25, 2, threads=2, sparse=False)
        theirs = torchvision_roi_align(feats, rois, 7, 0.25, 2)
        sparse = roi_align(feats, rois, 7, 0.25, 2)
    assert ours.dtype == theirs.dtype == sparse.dtype == torch.bfloat16
    assert torch.equal(ours, theirs)
    torch.testing.assert_close(sparse, theirs, rtol=1e-2, atol=1e-2)  # one bf16 rounding apart
    (grad,) = torch.autograd.grad(ours.float().sum(), feats)
    assert grad.dtype == torch.bfloat16 and grad.abs().sum() > 0


def test_small_or_single_thread_calls_are_torchvisions_own():
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(2, 4, 16, 16, generator=g, requires_grad=True)
    rois = _rois(MIN_BOXES, 2, 64, 64, g)
    assert not _ours(roi_align(feats, rois, 7, 0.25, 2, threads=1, sparse=False))
    assert not _ours(roi_align(feats, rois[:MIN_BOXES - 1], 7, 0.25, 2, threads=2, sparse=False))
    # fewer channels than threads
    assert not _ours(roi_align(feats[:, :1], rois, 7, 0.25, 2, threads=2, sparse=False))
    assert _ours(roi_align(feats, rois, 7, 0.25, 2, threads=2, sparse=False))
    double = feats.detach().double()  # kept in float64, as torchvision keeps it
    pooled = roi_align(double, rois.double(), 7, 0.25, 2, threads=2, sparse=False)
    assert pooled.dtype == torch.float64
    assert torch.equal(pooled, torchvision_roi_align(double, rois.double(), 7, 0.25, 2))
    empty = roi_align(feats, torch.zeros(0, 5), 7, 0.25, 2, threads=2, sparse=False)
    assert empty.shape == (0, 4, 7, 7)
    with torch.no_grad():  # as the teacher pools: the threaded path, torchvision's values
        assert torch.equal(roi_align(feats, rois, 7, 0.25, 2, threads=2, sparse=False),
                           torchvision_roi_align(feats, rois, 7, 0.25, 2))


def test_max_pool_in_the_channels_last_layout_is_the_same_pooling():
    from softteacher.cpu_ops import MaxPool2d

    g = torch.Generator().manual_seed(3)
    x = torch.relu(torch.randn(2, 6, 23, 30, generator=g)).requires_grad_(True)  # zeros tie
    ours, theirs = MaxPool2d(3, 2, 1), torch.nn.MaxPool2d(3, 2, 1)
    got, want = ours(x), theirs(x)
    assert got.is_contiguous() and torch.equal(got, want)
    weights = torch.randn(got.shape, generator=g)
    (grad_got,) = torch.autograd.grad((got * weights).sum(), x)
    (grad_want,) = torch.autograd.grad((want * weights).sum(), x)
    # a zero maximum's gradient goes to one of its tied zeros, which a ReLU before it drops
    positive = x > 0
    assert torch.equal(grad_got[positive], grad_want[positive])
    # a hand-made map: the 3 x 3 / stride 2 / pad 1 windows of a 4 x 4 ramp take their lower right
    ramp = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(ours(ramp), torch.tensor([[[[5.0, 7.0], [13.0, 15.0]]]]))
    layout = x.detach().contiguous(memory_format=torch.channels_last)
    assert torch.equal(ours(layout), theirs(layout))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(ours(x.bfloat16()), theirs(x.bfloat16()))


def _pool_in_child(queue) -> None:
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(2, 4, 16, 16, generator=g)
    rois = _rois(MIN_BOXES, 2, 64, 64, g)
    queue.put(torch.equal(roi_align(feats, rois, 7, 0.25, 2, threads=2, sparse=False),
                          torchvision_roi_align(feats, rois, 7, 0.25, 2)))


def test_a_forked_child_pools_over_threads_of_its_own():
    import multiprocessing

    g = torch.Generator().manual_seed(5)
    roi_align(torch.randn(2, 4, 16, 16, generator=g), _rois(MIN_BOXES, 2, 64, 64, g), 7, 0.25, 2,
              threads=2, sparse=False)  # the parent's pool exists; its threads do not in a child
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_pool_in_child, args=(queue,))
    child.start()
    child.join(60)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive and child.exitcode == 0 and queue.get(timeout=5)


def test_workers_run_their_operators_on_one_thread_and_leave_the_process_count_alone():
    import threading

    from softteacher.cpu_ops import on_threads

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        counts = on_threads(lambda _: torch.get_num_threads(), range(6), threads=5)  # a new pool
        assert counts == [1] * 6
        assert torch.get_num_threads() == 3  # the caller's count
        seen = []
        thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert seen == [3]  # a thread started later takes the process's count, not the workers'
    finally:
        torch.set_num_threads(before)


_HEAP_PROBE = """
import ctypes, sys, torch
from softteacher.cpu_ops import keep_freed_memory

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                    "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
before = libc.mallinfo2().hblks
block = torch.empty(6 * 2**20)  # 24 MiB, above glibc's first mmap threshold (128 KiB)
print(kept, libc.mallinfo2().hblks - before)
"""


_GLIBC = hasattr(os, "confstr") and (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")


@pytest.mark.skipif(not _GLIBC, reason="glibc's malloc only")
def test_kept_freed_memory_serves_a_24_mib_tensor_from_the_heap():
    import ctypes
    import subprocess
    import sys

    if not hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2"):
        pytest.skip("glibc < 2.33 has no mallinfo2")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def mapped_blocks(mode):  # [what keep_freed_memory returned, blocks mapped for the tensor]
        return subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], env=env, capture_output=True,
                              text=True, timeout=120, check=True).stdout.split()

    assert mapped_blocks("system") == ["None", "1"]  # glibc's own: a block mapped for the tensor
    assert mapped_blocks("keep") == ["True", "0"]  # from the heap


def test_malloc_settings_of_the_environment_are_left_alone(monkeypatch):
    from softteacher import cpu_ops

    calls = []
    monkeypatch.setattr(cpu_ops, "_kept", None)
    monkeypatch.setattr(cpu_ops.ctypes, "CDLL", lambda *a: calls.append(a))
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert cpu_ops.keep_freed_memory() is False and calls == []
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    assert cpu_ops.keep_freed_memory() is False and calls == []  # the first call decides


def test_operator_caches_get_256_entries_where_the_environment_names_no_size(monkeypatch):
    from softteacher import cpu_ops

    monkeypatch.delenv("LRU_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")  # the user's own size stays
    assert cpu_ops.bound_operator_caches() == {"LRU_CACHE_CAPACITY": "256",
                                               "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"}
    assert os.environ["LRU_CACHE_CAPACITY"] == "256"
    with pytest.raises(ValueError, match="at least 1"):
        cpu_ops.bound_operator_caches(0)  # oneDNN crashes on an empty cache


_CACHE_PROBE = """
import sys, torch
from softteacher.cpu_ops import bound_operator_caches

if sys.argv[1] == "bound":
    bound_operator_caches(2)  # after torch's import, before oneDNN's first operator
torch.set_num_threads(1)
conv = torch.nn.Conv2d(8, 8, 3).eval().to(memory_format=torch.channels_last)
verbose = torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON_CREATION)
with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), verbose:  # bf16: oneDNN's
    for _ in range(2):  # four shapes twice: the second round finds them in a cache of 4 or more
        for side in (12, 14, 16, 18):
            conv(torch.randn(1, 8, side, side).to(memory_format=torch.channels_last))
"""


def test_bounded_operator_caches_forget_the_oldest_shapes():
    import subprocess
    import sys

    from softteacher import cpu_ops

    env = {k: v for k, v in os.environ.items() if k not in cpu_ops.OPERATOR_CACHES}

    def compiled(mode):  # convolutions that oneDNN compiled anew rather than took from its cache
        out = subprocess.run([sys.executable, "-c", _CACHE_PROBE, mode], env=env, capture_output=True,
                             text=True, timeout=120, check=True)
        lines = (out.stdout + out.stderr).splitlines()
        return [sum(f"create:cache_{kind},cpu,convolution" in line for line in lines)
                for kind in ("miss", "hit")]

    default = compiled("default")
    if default == [0, 0]:
        pytest.skip("oneDNN does not run this convolution on this machine")
    assert default[0] == 4  # each shape compiled once, then taken from a cache
    assert compiled("bound") == [8, 0]  # 2 entries: every shape is compiled again in the second round
