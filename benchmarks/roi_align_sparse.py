"""RoIAlign as a sparse interpolation matrix (``softteacher.cpu_ops.interpolation_matrix``, what
``cpu_ops.roi_align`` pools with on the CPU), timed against torchvision's CPU kernels:

    python benchmarks/roi_align_sparse.py --rois 1152 --threads 2

Every pooled value of ``roi_align`` (``aligned=False``, a fixed ``sampling_ratio``) is a fixed
weighted sum of at most ``4 * sampling_ratio**2`` feature pixels, the same for every channel. So
with W, a (rois x 49, B x H x W) sparse matrix of those weights, the forward is ``W @ F`` and the
backward ``W.T @ G`` for F and G laid out (pixels, channels): two sparse-dense products, in place
of kernels that recompute the weights for every channel, on one thread. One FPN level of the
`shapes-cpu` step's size (5 x 128 x 80 x 88), random boxes; prints one JSON line per timing
(milliseconds, medians of 5 after one untimed call) and the largest differences from
torchvision's output and input gradient.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torchvision.ops import roi_align

from softteacher.cpu_ops import interpolation_matrix, keep_freed_memory, transposed


def median_ms(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rois", type=int, default=1152)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--malloc", choices=("keep", "system"), default="keep",
                   help="keep freed memory for the next tensors, as training on the CPU does "
                        "(cpu_ops.keep_freed_memory), or glibc malloc's own behaviour (system)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    kept = args.malloc == "keep" and keep_freed_memory()
    b, c, h, w, scale = 5, 128, 80, 88, 0.25
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(b, c, h, w, generator=g)
    xy = torch.rand(args.rois, 2, generator=g) * torch.tensor([w / scale, h / scale])
    boxes = torch.cat([xy, xy + torch.rand(args.rois, 2, generator=g) * 80 + 2], 1)
    rois = torch.cat([torch.randint(0, b, (args.rois, 1), generator=g).float(), boxes], 1)
    grad = torch.randn(args.rois, c, 7, 7, generator=g)

    leaf = feats.clone().requires_grad_()

    def torchvision_both():
        leaf.grad = None
        roi_align(leaf, rois, 7, scale, 2).backward(grad)

    matrix = interpolation_matrix(rois, b, h, w, scale, 7, 7, 2, False)
    matrix_t = transposed(matrix)  # W.T as CSR
    pixels = feats.permute(0, 2, 3, 1).reshape(b * h * w, c)
    grad_rows = grad.permute(0, 2, 3, 1).reshape(-1, c)
    torchvision_both()
    ours = (matrix @ pixels).reshape(args.rois, 7, 7, c).permute(0, 3, 1, 2)
    ours_grad = (matrix_t @ grad_rows).reshape(b, h, w, c).permute(0, 3, 1, 2)
    common = {"rois": args.rois, "threads": args.threads, "level": [b, c, h, w], "freed_memory_kept": kept}
    print(json.dumps({"measure": "max_abs_difference", **common,
                      "forward": (ours - roi_align(feats, rois, 7, scale, 2)).abs().max().item(),
                      "backward": (ours_grad - leaf.grad).abs().max().item(),
                      "largest_gradient": leaf.grad.abs().max().item()}))
    timings = {
        "torchvision_forward": lambda: roi_align(feats, rois, 7, scale, 2),
        "torchvision_forward_backward": torchvision_both,
        "sparse_build": lambda: interpolation_matrix(rois, b, h, w, scale, 7, 7, 2, False),
        "sparse_transpose": lambda: transposed(matrix),
        "sparse_transpose_by_csc": lambda: matrix.to_sparse_csc().t(),
        "sparse_forward_product": lambda: matrix @ pixels,
        "sparse_backward_product": lambda: matrix_t @ grad_rows,
        "layout_copies": lambda: (feats.permute(0, 2, 3, 1).reshape(b * h * w, c),
                                  grad.permute(0, 2, 3, 1).reshape(-1, c)),
    }
    for name, fn in timings.items():
        print(json.dumps({"measure": name, "ms": median_ms(fn), **common}))


if __name__ == "__main__":
    main()
