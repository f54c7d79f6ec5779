"""How well a box mapped through rotate or shear fits the object it holds.

A detector trained on tight boxes (a supervised checkpoint) looks at val images rotated or
sheared as the strong views are; its detections stand for the tight boxes of the objects there.
Each ground-truth box is mapped into the view by ``augment.box_mapping``'s rules (``corners``,
the reference's, and ``ellipse``) and compared with the detection that overlaps it most
(IoU > 0.3, score > 0.5): the median area ratio detection / mapped box and the mean IoU. With
no geometric op both rules are exact, so that row measures the detector itself.

    python benchmarks/box_mapping.py runs/bench/gain/shapes-cpu/supervised-p10-f1/model_0002000.pt
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from common import command_line, commit
from torchvision.ops import box_iou

from softteacher.checkpoint import load_checkpoint
from softteacher.config import load_config
from softteacher.data import shapes
from softteacher.data.datasets import load_dataset, read_image
from softteacher.data.transforms import rotate, shear, test_view
from softteacher.geometry import BOX_MAPPINGS, clip_boxes, identity_matrix, transform_boxes
from softteacher.model import build_detector

OPS = {
    "none": lambda im: (im, identity_matrix()),
    "rotate 15": lambda im: rotate(im, 15.0),
    "rotate 30": lambda im: rotate(im, 30.0),
    "shear_x 30": lambda im: shear(im, 30.0, 0.0),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--preset", default="shapes-cpu")
    p.add_argument("--images", type=int, default=80, help="first N val images")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    state = load_checkpoint(args.checkpoint)
    paths = shapes.generate_shapes(shapes.default_root())
    cfg = load_config(args.preset)
    val = load_dataset(paths.val_json, images=paths.val_images)
    model = build_detector(cfg.model, val.num_classes)
    model.load_state_dict(state["student"])
    model.eval()
    started_at = commit()
    stats = {(op, mode): ([], []) for op in OPS for mode in BOX_MAPPINGS}
    with torch.no_grad():
        for rec in val.records[: args.images]:
            view = test_view(read_image(rec.path, rec), cfg.augment)
            gt = torch.as_tensor(rec.boxes, dtype=torch.float32).reshape(-1, 4)
            if not len(gt):
                continue
            for op, fn in OPS.items():
                image, m = fn(view.image)
                det = model([image])[0]
                keep = det.scores > 0.5
                if not keep.any():
                    continue
                boxes = det.boxes[keep]
                for mode in BOX_MAPPINGS:
                    mapped = clip_boxes(transform_boxes(gt, m @ view.matrix, mode), tuple(image.shape[-2:]))
                    iou = box_iou(mapped, boxes)
                    best, j = iou.max(1)
                    ratios, ious = stats[(op, mode)]
                    for g, d, b in zip(mapped, boxes[j], best):
                        if b > 0.3:
                            area = (g[2] - g[0]) * (g[3] - g[1])
                            ratios.append(float((d[2] - d[0]) * (d[3] - d[1]) / area))
                            ious.append(float(b))
    for (op, mode), (ratios, ious) in stats.items():
        print(json.dumps({"op": op, "mapping": mode, "matched": len(ious),
               "median_area_ratio": round(statistics.median(ratios), 3),
               "mean_iou": round(statistics.fmean(ious), 3),
               "frac_iou_over_0.75": round(sum(i > 0.75 for i in ious) / len(ious), 3),
               "images": args.images, "checkpoint": args.checkpoint, "commit": started_at,
               "command": command_line()}), flush=True)


if __name__ == "__main__":
    main()
