"""CPU paths of operators whose CPU kernels are slow: RoIAlign, the stem's max pooling, NMS.

**RoIAlign.** torchvision's CPU kernels of ``roi_align`` and its backward run on one thread,
whatever ``torch.get_num_threads()`` says. In a CPU training step they are the largest part
that is not a convolution: the student's two RoI samplings and the teacher's three RoI passes
pool about 2,000 boxes a Soft Teacher step (``benchmarks/speed.md``). They also recompute every
sample's bilinear weights for every channel. With a fixed sampling ratio (the models' 2),
``roi_align`` computes the weights once, as a sparse (boxes x bins, pixels) matrix W, and pools
by sparse-dense products: ``W @ F`` forward, ``W.T @ G`` backward (``_SparseRoIAlign``; the same
values to float rounding). ``sparse_roi_align`` does it for several maps at once, each box
from its own: the FPN levels' pixels are the columns of one matrix (``level_matrix``), so a
multi-scale RoIAlign is one pair of products. Otherwise (an adaptive sampling ratio, or
``sparse=False``) both kernels, which release the GIL, run side by side on a few Python
threads (``on_threads``):

- forward: the boxes are split into consecutive blocks, one call per block; every output row
  depends on its box alone, so the result is the single call's, bit for bit;
- backward: the channels are split; each channel's gradient adds up the same boxes in the same
  order as the single call, so it too is the single call's, bit for bit.

Elsewhere (a GPU, one thread, a small call) the call is torchvision's own.

**Max pooling.** torch's CPU max pooling of a (B, C, H, W) tensor in the default memory layout
takes about 35 ms on a ResNet stem's output of five 300 px images (2 threads), 2 ms in the
channels-last layout: ``MaxPool2d`` pools in that layout and hands back the default one.

**NMS.** torchvision's CPU ``nms`` is a one-thread kernel too; ``detection.nms_per_image``
sends the images of a batch over ``on_threads``.

**Memory.** glibc's ``malloc`` maps a large block fresh from the system and unmaps it when it
is freed, so each new tensor of a few MB is written into pages the kernel must first fault in
and zero. A CPU step makes hundreds of such tensors (activations, their gradients, the pooled
RoIs). ``keep_freed_memory`` has blocks up to 32 MiB taken from the heap and freed memory kept
there for the next ones (``mallopt``; what ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` set), as the allocators that torch's CPU performance guide
recommends do. What grows over a run is oneDNN's caches of operators compiled for each input
shape: ``bound_operator_caches`` gives them 256 entries each instead of 1,024.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align as tv_roi_align

#: fewer boxes than this in a call: one thread (a pool hand-off costs about 50 microseconds)
MIN_BOXES = 16

T = TypeVar("T")
R = TypeVar("R")

_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


#: glibc ``mallopt`` parameters and the values ``keep_freed_memory`` sets
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest on 64-bit systems
TRIM_THRESHOLD = -1  # never give the heap's free top back (mallopt(3))
#: environment variables by which a user chooses glibc malloc's behaviour: then it is left alone
MALLOC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_")
_kept: bool | None = None
#: oneDNN's two caches of operators compiled for one input shape (torch's ideep layer's and
#: oneDNN's own), read from the environment when oneDNN first runs; 1,024 entries each unless set
OPERATOR_CACHES = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")
OPERATOR_CACHE_CAPACITY = 256


def keep_freed_memory() -> bool:
    """Have glibc's ``malloc`` serve blocks up to 32 MiB from the heap and keep freed memory
    for later blocks instead of giving it back to the system (see the module's notes), for the
    rest of the process. Left alone where the environment sets malloc's behaviour
    (``MALLOC_SETTINGS``, or ``glibc.malloc`` tunables in ``GLIBC_TUNABLES``) and off glibc.
    Returns whether the setting is on; the first call decides."""
    global _kept
    if _kept is None:
        chosen = any(os.environ.get(k) for k in MALLOC_SETTINGS) or "glibc.malloc" in os.environ.get(
            "GLIBC_TUNABLES", "")
        _kept = False
        libc_name = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else None
        if not chosen and libc_name and libc_name.startswith("glibc"):
            try:
                libc = ctypes.CDLL("libc.so.6")
                _kept = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                             and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
            except (OSError, AttributeError):
                _kept = False
    return _kept


def bound_operator_caches(capacity: int = OPERATOR_CACHE_CAPACITY) -> dict[str, str]:
    """Give each of oneDNN's caches of compiled operators ``capacity`` entries where the
    environment names no size of its own. Images of changing sizes give convolutions new shapes,
    and each shape compiles operators that the caches keep: 256 entries each instead of 1,024
    kept a CPU training run 18-21 % smaller, with no consistent change in speed
    (``benchmarks/speed.md``).
    oneDNN reads the sizes when it first runs in the process: a call after that changes nothing.
    Returns the sizes now in the environment."""
    if capacity < 1:
        raise ValueError(f"capacity {capacity}: oneDNN's caches need at least 1 entry")
    for name in OPERATOR_CACHES:
        if not os.environ.get(name):
            os.environ[name] = str(capacity)
    return {name: os.environ[name] for name in OPERATOR_CACHES}


def cpu_autocast_enabled() -> bool:
    """Whether CPU autocast is on in this thread (torch < 2.4 has no device argument)."""
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:
        return torch.is_autocast_cpu_enabled()


def _forget_pools() -> None:
    _pools.clear()  # a forked child has none of its parent's threads: it starts its own pools


os.register_at_fork(after_in_child=_forget_pools)


def _one_thread_each() -> None:
    """A worker's start: its own operators on one thread. Otherwise each worker's first
    multi-threaded operator (the output's fill, a copy) opens an OpenMP team of its own, as
    large as the process's, whose threads then spin beside the calling thread's convolutions."""
    torch.get_num_threads()  # this thread's count taken from the process's first, then set:
    torch.set_num_threads(1)  # set alone, the first operator would take the process's back


def _pool(workers: int) -> ThreadPoolExecutor:
    with _pools_lock:
        pool = _pools.get(workers)
        if pool is None:
            threads = torch.get_num_threads()
            pool = _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="softteacher-cpu",
                                                        initializer=_one_thread_each)
            started = threading.Barrier(workers)  # every worker started (and set to one thread) ...
            list(pool.map(lambda _: started.wait(), range(workers)))
            torch.set_num_threads(threads)  # ... before the process's count is set back for threads to come
        return pool


def on_threads(fn: Callable[[T], R], items: Sequence[T], threads: int) -> list[R]:
    """``[fn(item) for item in items]``, the calls spread over ``threads`` threads (one thread:
    in this one). Each call runs without autograd (grad mode belongs to a thread) and without
    autocast: ``fn`` gets what it needs to run anywhere. Only worth it for calls into kernels
    that release the GIL and use one thread each."""
    def call(item: T) -> R:
        with torch.no_grad():
            return fn(item)

    if threads < 2 or len(items) < 2:
        return [call(item) for item in items]
    return list(_pool(threads).map(call, items))


def _blocks(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` consecutive (start, stop) ranges covering ``range(n)``, sizes differing by <= 1."""
    bounds = [n * k // parts for k in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


class _ThreadedRoIAlign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features: Tensor, rois: Tensor, spatial_scale: float, pooled_h: int, pooled_w: int,
                sampling_ratio: int, aligned: bool, threads: int) -> Tensor:
        ctx.save_for_backward(rois)
        ctx.args = (features.shape, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned, threads)
        features = features.contiguous()
        pooled = features.new_empty((len(rois), features.shape[1], pooled_h, pooled_w))

        def pool(block: tuple[int, int]) -> None:  # each thread writes its rows
            pooled[block[0]:block[1]] = torch.ops.torchvision.roi_align(
                features, rois[block[0]:block[1]], spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned)

        on_threads(pool, _blocks(len(rois), threads), threads)
        return pooled

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (rois,) = ctx.saved_tensors
        (b, c, h, w), spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned, threads = ctx.args
        grad_features = grad_output.new_empty((b, c, h, w))

        def grad(block: tuple[int, int]) -> None:  # each thread writes its channels
            part = grad_output[:, block[0]:block[1]].contiguous()
            grad_features[:, block[0]:block[1]] = torch.ops.torchvision._roi_align_backward(
                part, rois, spatial_scale, pooled_h, pooled_w, b, block[1] - block[0], h, w,
                sampling_ratio, aligned)

        on_threads(grad, _blocks(c, threads), threads)
        return grad_features, None, None, None, None, None, None, None


@contextlib.contextmanager
def _quiet_sparse():
    """Without torch's warning that its sparse CSR support is in beta."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        yield


def interpolation_matrix(rois: Tensor, batch: int, height: int, width: int, spatial_scale: float,
                         pooled_h: int, pooled_w: int, sampling_ratio: int, aligned: bool) -> Tensor:
    """RoIAlign as a matrix: (R * pooled_h * pooled_w, batch * height * width) in CSR, row
    ``(r * pooled_h + i) * pooled_w + j`` holding the weights of bin (i, j) of box r over the
    pixels (``4 * sampling_ratio ** 2`` entries, a pixel met twice kept twice), by torchvision's
    CPU rules: samples at the bins' regular grid, bilinear weights, a sample more than one pixel
    outside the map weighing nothing, the mean over a bin's samples. A fixed ``sampling_ratio``
    (> 0) only."""
    levels = torch.zeros(len(rois), dtype=torch.long, device=rois.device)
    return level_matrix(rois, levels, [(batch, height, width)], [spatial_scale], pooled_h, pooled_w,
                        sampling_ratio, aligned)


def level_matrix(rois: Tensor, levels: Tensor, shapes: Sequence[tuple[int, int, int]],
                 scales: Sequence[float], pooled_h: int, pooled_w: int, sampling_ratio: int,
                 aligned: bool) -> Tensor:
    """``interpolation_matrix`` over several maps (FPN levels) at once: box r is pooled from map
    ``levels[r]`` (of (batch, height, width) ``shapes[k]`` and scale ``scales[k]``); the columns
    hold map 0's pixels, then map 1's, ...; a box whose level names no map gets a row of zero
    weights (it pools zeros, as in torchvision's ``MultiScaleRoIAlign``)."""
    device = rois.device
    valid = (levels >= 0) & (levels < len(shapes))
    level = levels.clamp(0, len(shapes) - 1)
    heights = torch.tensor([s[1] for s in shapes], device=device)[level]
    widths = torch.tensor([s[2] for s in shapes], device=device)[level]
    first = torch.tensor([0] + [b * h * w for b, h, w in shapes], device=device).cumsum(0)
    scale = torch.tensor([float(s) for s in scales], dtype=rois.dtype, device=device)[level]
    offset = 0.5 if aligned else 0.0
    x1, y1 = rois[:, 1] * scale - offset, rois[:, 2] * scale - offset
    roi_w, roi_h = rois[:, 3] * scale - offset - x1, rois[:, 4] * scale - offset - y1
    if not aligned:  # torchvision's rule: boxes at least one pixel wide
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    sample = torch.arange(sampling_ratio, dtype=rois.dtype, device=device) + 0.5

    def axis(start, length, bins, sizes):
        size = sizes[:, None, None]
        step = (length / bins)[:, None, None]
        cell = torch.arange(bins, dtype=rois.dtype, device=device)[:, None]
        v = start[:, None, None] + cell * step + sample * step / sampling_ratio  # (R, bins, samples)
        inside = (v >= -1.0) & (v <= size)
        v = v.clamp(min=0)
        low = torch.minimum(v.long().clamp(min=0), size - 1)  # in the map whatever v is, a NaN too
        last = low >= size - 1
        frac = torch.where(last, torch.zeros_like(v), v - low)
        weights = torch.stack([1 - frac, frac], -1) * inside[..., None]
        return weights, torch.stack([low, torch.where(last, low, low + 1)], -1)

    wy, iy = axis(y1, roi_h, pooled_h, heights)  # (R, pooled_h, samples, 2)
    wx, ix = axis(x1, roi_w, pooled_w, widths)
    # (R, pooled_h, pooled_w, sample y, sample x, corner y, corner x)
    values = wy[:, :, None, :, None, :, None] * wx[:, None, :, None, :, None, :] / sampling_ratio ** 2
    values = torch.where(valid[:, None, None, None, None, None, None], values, 0.0)

    def per_box(t: Tensor) -> Tensor:
        return t[:, None, None, None, None, None, None]

    image = rois[:, 0].long()
    columns = (per_box(first[level]) + (per_box(image * heights) + iy[:, :, None, :, None, :, None])
               * per_box(widths) + ix[:, None, :, None, :, None, :])
    per_row = 4 * sampling_ratio ** 2
    rows = len(rois) * pooled_h * pooled_w
    crow = torch.arange(0, rows * per_row + 1, per_row, device=device)
    with _quiet_sparse():
        return torch.sparse_csr_tensor(crow, columns.reshape(-1), values.reshape(-1),
                                       (rows, int(first[-1])), check_invariants=False)


def transposed(matrix: Tensor) -> Tensor:
    """The transpose of a CSR matrix, in CSR, each row's entries in the order of the matrix's
    rows (what ``to_sparse_csc().t()`` gives, in a third of its time: the stable sort of the
    column indices runs on 32-bit keys)."""
    n_rows, n_cols = matrix.shape
    columns = matrix.col_indices()
    keys = columns.to(torch.int32) if n_cols < 2**31 else columns
    order = torch.sort(keys, stable=True).indices
    rows = torch.repeat_interleave(torch.arange(n_rows, device=matrix.device), matrix.crow_indices().diff())
    crow = torch.zeros(n_cols + 1, dtype=columns.dtype, device=matrix.device)
    crow[1:] = torch.bincount(columns, minlength=n_cols).cumsum(0)
    with _quiet_sparse():
        return torch.sparse_csr_tensor(crow, rows[order], matrix.values()[order], (n_cols, n_rows),
                                       check_invariants=False)


class _SparseRoIAlign(torch.autograd.Function):
    """RoIAlign over one or more maps as sparse-dense products: the forward ``W @ F``, the
    backward ``W.T @ G``, F holding the maps' pixels as rows (pixels, channels) in float32, one
    map after another. The weights are computed once for all channels, where torchvision's
    kernels recompute them for each (``benchmarks/speed.md``). The result has ``out_dtype``;
    each map's gradient its map's dtype."""

    @staticmethod
    def forward(ctx, rois: Tensor, levels: Tensor, scales: tuple[float, ...], pooled_h: int, pooled_w: int,
                sampling_ratio: int, aligned: bool, out_dtype: torch.dtype, *maps: Tensor) -> Tensor:
        shapes = [(m.shape[0], m.shape[2], m.shape[3]) for m in maps]
        c = maps[0].shape[1]
        matrix = level_matrix(rois, levels, shapes, scales, pooled_h, pooled_w, sampling_ratio, aligned)
        pixels = maps[0].new_empty((matrix.shape[1], c), dtype=torch.float32)
        start = 0
        for m, (b, h, w) in zip(maps, shapes):  # one copy a map: its layout and dtype at once
            pixels[start:start + b * h * w].view(b, h, w, c).copy_(m.permute(0, 2, 3, 1))
            start += b * h * w
        pooled = torch.empty((len(rois), c, pooled_h, pooled_w), dtype=out_dtype, device=rois.device)
        pooled.copy_((matrix @ pixels).view(len(rois), pooled_h, pooled_w, c).permute(0, 3, 1, 2))
        ctx.matrix, ctx.shapes, ctx.dtypes = matrix, shapes, [m.dtype for m in maps]
        return pooled

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        r, c, pooled_h, pooled_w = grad_output.shape
        rows = grad_output.new_empty((r * pooled_h * pooled_w, c), dtype=torch.float32)
        rows.view(r, pooled_h, pooled_w, c).copy_(grad_output.permute(0, 2, 3, 1))
        grad = transposed(ctx.matrix) @ rows
        grads, start = [], 0
        for (b, h, w), dtype in zip(ctx.shapes, ctx.dtypes):
            grads.append(grad[start:start + b * h * w].view(b, h, w, c).permute(0, 3, 1, 2).to(dtype))
            start += b * h * w
        return (None,) * 8 + tuple(grads)


def _pooled_as_float(features: Tensor) -> bool:
    """float32, or half precision that CPU autocast pools in float32 (torchvision's autocast
    rule); any other dtype is pooled as it is, by torchvision."""
    return features.dtype == torch.float32 or (
        features.dtype in (torch.bfloat16, torch.float16) and cpu_autocast_enabled())


def pools_sparse(maps: Sequence[Tensor], boxes: int, sampling_ratio: int) -> bool:
    """Whether ``sparse_roi_align`` pools ``boxes`` boxes from ``maps``: CPU maps pooled as
    float, a fixed sampling ratio, at least ``MIN_BOXES`` boxes (fewer go to torchvision's
    kernels, whose call costs less than the maps' copy)."""
    return (sampling_ratio > 0 and boxes >= MIN_BOXES
            and all(m.device.type == "cpu" and _pooled_as_float(m) for m in maps))


def sparse_roi_align(maps: Sequence[Tensor], rois: Tensor, levels: Tensor, scales: Sequence[float],
                     output_size: tuple[int, int], sampling_ratio: int, aligned: bool = False) -> Tensor:
    """RoIAlign of each box from the map its level names (``MultiScaleRoIAlign``'s pooling), all
    maps in one pair of sparse products (``_SparseRoIAlign``). CPU maps of one channel count;
    a fixed ``sampling_ratio`` (> 0). Float32 maps pool in float32; half-precision ones (CPU
    autocast) in float32 too, the result in their dtype. Returns (R, C, *output_size)."""
    dtype = maps[0].dtype
    with torch.autocast("cpu", enabled=False):
        return _SparseRoIAlign.apply(rois.float(), levels, tuple(float(s) for s in scales),
                                     int(output_size[0]), int(output_size[1]), int(sampling_ratio),
                                     bool(aligned), dtype, *maps)


def roi_align(features: Tensor, rois: Tensor, output_size: int | tuple[int, int], spatial_scale: float,
              sampling_ratio: int, aligned: bool = False, threads: int | None = None,
              sparse: bool = True) -> Tensor:
    """``torchvision.ops.roi_align`` on the CPU: with a fixed ``sampling_ratio`` (> 0) and
    ``sparse``, as sparse matrix products (``_SparseRoIAlign``: the same values to float
    rounding, a few times faster); otherwise torchvision's kernels over ``threads`` threads
    (default: ``torch.get_num_threads()``; the same values, bit for bit).

    Args:
        features: (B, C, H, W) feature map. float32, or bf16 / float16 under CPU autocast
            (pooled in float32, as torchvision's autocast rule does; the result has
            ``features``' dtype), go over the threads; any other dtype to torchvision's call.
        rois: (R, 5) float, (image index, x1, y1, x2, y2) in image pixels.
        output_size: pooled (height, width), or one int for both.
        spatial_scale, sampling_ratio, aligned: as torchvision's.
    Returns:
        (R, C, pooled_h, pooled_w). R == 0 gives (0, C, pooled_h, pooled_w).
    """
    threads = torch.get_num_threads() if threads is None else threads
    pooled_as_float = _pooled_as_float(features)
    pooled_h, pooled_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    dtype = features.dtype
    if sparse and pools_sparse([features], len(rois), sampling_ratio):
        levels = torch.zeros(len(rois), dtype=torch.long)
        return sparse_roi_align([features], rois, levels, [spatial_scale], (pooled_h, pooled_w),
                                sampling_ratio, aligned)
    if (features.device.type != "cpu" or threads < 2 or len(rois) < MIN_BOXES
            or features.shape[1] < threads or not pooled_as_float):
        return tv_roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
    pooled = _ThreadedRoIAlign.apply(features.float(), rois.float(), float(spatial_scale), int(pooled_h),
                                     int(pooled_w), int(sampling_ratio), bool(aligned), int(threads))
    return pooled.to(dtype)


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that pools a CPU tensor in the channels-last layout (the same values
    and, barring ties among positive maxima, the same gradients) and returns it in the layout
    it came in."""

    def forward(self, x: Tensor) -> Tensor:
        if (x.device.type != "cpu" or x.dim() != 4 or self.return_indices
                or x.is_contiguous(memory_format=torch.channels_last)):
            return super().forward(x)
        return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()
