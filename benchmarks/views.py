"""Throughput of the views on one CPU core; prints one JSON line per case.

    .venv/bin/python benchmarks/views.py [--seconds 8]

Cases: the strong pipeline (``unlabeled_views``: weak + strong view) with the CPU preset's
magnitudes on a 480x360 input and with the default (paper) magnitudes on a 1333x800 input
(short side 400-1200, long side <= 1333); ``labeled_view`` and ``test_view`` at the same sizes.
The input is a smooth random picture (noise would make no difference to the ops' cost).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
import torch.nn.functional as nnf

from softteacher.config import AugmentConfig, preset_shapes_cpu
from softteacher.data.transforms import labeled_view, test_view, unlabeled_views


def _picture(width: int, height: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, max(2, height // 32), max(2, width // 32), generator=g)
    img = nnf.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)[0]
    return (img * 255).round().to(torch.uint8)


def _time(fn, seconds: float, min_iters: int = 5) -> tuple[int, float]:
    fn(0)  # warm-up
    n, start = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - start < seconds:
        fn(n + 1)
        n += 1
    return n, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="time per case")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = [("cpu-preset", preset_shapes_cpu().augment, (480, 360)),
             ("default", AugmentConfig(), (1333, 800))]
    for name, aug, (w, h) in cases:
        img = _picture(w, h)
        boxes = torch.tensor([[10.0, 20.0, w / 2, h / 2], [w / 3, h / 4, w - 5.0, h - 5.0]])
        pipelines = {
            "unlabeled_views": lambda i: unlabeled_views(img, np.random.default_rng(i), aug),
            "labeled_view": lambda i: labeled_view(img, boxes, np.random.default_rng(i), aug),
            "test_view": lambda i: test_view(img, aug),
        }
        budget = {"unlabeled_views": args.seconds, "labeled_view": args.seconds / 2,
                  "test_view": args.seconds / 4}
        for pipeline, fn in pipelines.items():
            n, elapsed = _time(fn, budget[pipeline])
            print(json.dumps({
                "bench": "views", "pipeline": pipeline, "config": name, "input": f"{w}x{h}",
                "train_short_side": list(aug.train_short_side),
                "train_max_size": aug.train_max_size,
                "test_size": [aug.test_short_side, aug.test_max_size], "threads": 1,
                "iters": n, "images_per_s": round(n / elapsed, 2),
                "ms_per_image": round(1000 * elapsed / n, 2),
                "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            }), flush=True)


if __name__ == "__main__":
    main()
