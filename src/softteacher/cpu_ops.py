"""torchvision's RoIAlign on the CPU, spread over the intra-op threads.

torchvision's CPU kernels of ``roi_align`` and its backward run on one thread, whatever
``torch.get_num_threads()`` says. In a CPU training step they are the largest part that is not
a convolution: the student's two RoI samplings and the teacher's three RoI passes pool about
2,000 boxes a Soft Teacher step (``benchmarks/speed.md``). Both kernels release the GIL, so a
few Python threads run them side by side:

- forward: the boxes are split into consecutive blocks, one call per block; every output row
  depends on its box alone, so the result is the single call's, bit for bit;
- backward: the channels are split; each channel's gradient adds up the same boxes in the same
  order as the single call, so it too is the single call's, bit for bit.

Elsewhere (a GPU, one thread, a small call, a tensor that needs no threads) the call is
torchvision's own.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor
from torchvision.ops import roi_align as tv_roi_align

#: fewer boxes than this in a call: one thread (a pool hand-off costs about 50 microseconds)
MIN_BOXES = 16

_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    with _pools_lock:
        pool = _pools.get(workers)
        if pool is None:
            pool = _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="softteacher-roi")
        return pool


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

        def pool(block: tuple[int, int]) -> Tensor:
            with torch.no_grad():  # grad mode is per thread: the pool's threads record nothing
                return torch.ops.torchvision.roi_align(features, rois[block[0]:block[1]], spatial_scale,
                                                   pooled_h, pooled_w, sampling_ratio, aligned)

        return torch.cat(list(_pool(threads).map(pool, _blocks(len(rois), threads))))

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (rois,) = ctx.saved_tensors
        (b, c, h, w), spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned, threads = ctx.args

        def grad(block: tuple[int, int]) -> Tensor:
            part = grad_output[:, block[0]:block[1]].contiguous()
            with torch.no_grad():
                return torch.ops.torchvision._roi_align_backward(
                    part, rois, spatial_scale, pooled_h, pooled_w, b, block[1] - block[0], h, w,
                    sampling_ratio, aligned)

        grad_features = torch.cat(list(_pool(threads).map(grad, _blocks(c, threads))), dim=1)
        return grad_features, None, None, None, None, None, None, None


def roi_align(features: Tensor, rois: Tensor, output_size: int | tuple[int, int], spatial_scale: float,
              sampling_ratio: int, aligned: bool = False, threads: int | None = None) -> Tensor:
    """``torchvision.ops.roi_align`` (the same values, bit for bit), on the CPU over ``threads``
    threads (default: ``torch.get_num_threads()``).

    Args:
        features: (B, C, H, W) feature map, any float dtype (pooled in float32, as torchvision's
            autocast rule does; the result has ``features``' dtype).
        rois: (R, 5) float, (image index, x1, y1, x2, y2) in image pixels.
        output_size: pooled (height, width), or one int for both.
        spatial_scale, sampling_ratio, aligned: as torchvision's.
    Returns:
        (R, C, pooled_h, pooled_w). R == 0 gives (0, C, pooled_h, pooled_w).
    """
    threads = torch.get_num_threads() if threads is None else threads
    if (features.device.type != "cpu" or threads < 2 or len(rois) < MIN_BOXES
            or features.shape[1] < threads or features.is_quantized):
        return tv_roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
    pooled_h, pooled_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    dtype = features.dtype
    pooled = _ThreadedRoIAlign.apply(features.float(), rois.float(), float(spatial_scale), int(pooled_h),
                                     int(pooled_w), int(sampling_ratio), bool(aligned), int(threads))
    return pooled.to(dtype)
