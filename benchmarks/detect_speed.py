"""Milliseconds per image that ``Detector.detect`` takes on the CPU, one image at a time (as
``predict`` and evaluation run), with the CPU paths of ``softteacher.cpu_ops`` on or off:

    python benchmarks/detect_speed.py CHECKPOINT --images 120 --threads 2 \\
        --variant all|no_threaded_roi_align|no_channels_last_pool|neither

``no_threaded_roi_align`` pools every RoIAlign call with torchvision's own (one-thread) kernel,
``no_channels_last_pool`` runs the stem's max pooling as ``nn.MaxPool2d`` does; one variant per
process, so that alternating runs compare them. ``--channels-last true|false`` lays the model
out in NHWC memory or not, whatever its checkpoint says. The images are the first ``--images``
of the embedded ``shapes`` val set; the first 5 warm up untimed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torchvision.io import read_image

import softteacher.cpu_ops as cpu_ops
from softteacher.data import shapes
from softteacher.detector import Detector

VARIANTS = ("all", "no_threaded_roi_align", "no_channels_last_pool", "neither")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--images", type=int, default=120)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variant", choices=VARIANTS, default="all")
    p.add_argument("--channels-last", choices=("checkpoint", "true", "false"), default="checkpoint",
                   help="the model in NHWC memory or not, whatever the checkpoint's model.channels_last")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.variant in ("no_threaded_roi_align", "neither"):
        cpu_ops.MIN_BOXES = float("inf")  # every call below the bar: torchvision's own
    if args.variant in ("no_channels_last_pool", "neither"):
        cpu_ops.MaxPool2d.forward = torch.nn.MaxPool2d.forward
    detector = Detector.load(args.checkpoint, device="cpu", score_thresh=0.05)
    if args.channels_last != "checkpoint":  # as build_detector lays the model out
        detector.model.channels_last = args.channels_last == "true"
        detector.model.to(memory_format=torch.channels_last if detector.model.channels_last
                          else torch.contiguous_format)
    folder = Path(shapes.generate_shapes(shapes.default_root()).val_images)  # made once, then found
    files = sorted(f for f in folder.iterdir() if f.suffix == ".jpg")
    images = [read_image(str(f)) for f in files[:args.images]]
    for image in images[:5]:
        detector.detect(image)
    start = time.perf_counter()
    for image in images:
        detector.detect(image)
    ms = (time.perf_counter() - start) / len(images) * 1000
    print(json.dumps({"variant": args.variant, "ms_per_image": round(ms, 1), "images": len(images),
                      "threads": args.threads, "checkpoint": args.checkpoint,
                      "channels_last": detector.model.channels_last}))


if __name__ == "__main__":
    main()
