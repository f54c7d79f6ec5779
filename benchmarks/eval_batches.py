"""COCO mAP of checkpoints evaluated with several evaluation batch sizes (``train.eval_batch_size``).

An image evaluated in a batch of several is padded to the batch's largest image; the padding
enters its features (with GroupNorm, every normalisation of the image), so its detections, and
the mAP, depend on the batch. This evaluates each checkpoint's reported model (or ``--model``)
on the embedded ``shapes`` val set (or ``--data``) once per batch size:

    python benchmarks/eval_batches.py runs/bench/gain/TAG/*/model_final.pt --batch-sizes 4 1 \\
        --threads 2 --out runs/bench/eval_batches.jsonl

One JSON line per checkpoint and batch size (AP, AP50, seconds, the checkpoint's SHA-256, the
commit and software) appended to ``--out``; on the terminal, a line per evaluation and a
markdown table at the end.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import append_jsonl, commit, sha256_file, software

from softteacher.data import shapes
from softteacher.data.datasets import load_dataset
from softteacher.engine import evaluate, model_from_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 1])
    p.add_argument("--model", choices=("teacher", "student"), default=None,
                   help="default: the model each checkpoint reports")
    p.add_argument("--data", default="", help="a labeled COCO json (default: shapes val)")
    p.add_argument("--images", default="", help="its image folder (default: beside the json)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="runs/bench/eval_batches.jsonl")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data:
        data, images = args.data, args.images
    else:
        paths = shapes.generate_shapes(shapes.default_root())
        data, images = paths.val_json, paths.val_images
    dset = load_dataset(data, images=images, labeled=True)
    device = torch.device("cpu")
    rows = []
    for path in args.checkpoints:
        model, cfg, _, which = model_from_checkpoint(path, args.model, device)
        digest = sha256_file(path)
        for size in args.batch_sizes:
            cfg.train.eval_batch_size = size
            t0 = time.perf_counter()
            metrics, _ = evaluate(model, dset, cfg, device)
            record = {"checkpoint": str(path), "sha256": digest, "model": which, "batch_size": size,
                      "AP": metrics["bbox_AP"], "AP50": metrics["bbox_AP50"],
                      "seconds": round(time.perf_counter() - t0, 1), "data": str(data),
                      "images": len(dset), "threads": torch.get_num_threads(),
                      "commit": commit(), "software": software()}
            append_jsonl(Path(args.out), record)
            rows.append(record)
            print(f"{path} {which} batch {size}: AP {100 * record['AP']:.2f} "
                  f"AP50 {100 * record['AP50']:.2f} ({record['seconds']} s)", flush=True)
    sizes = list(dict.fromkeys(args.batch_sizes))
    print("\n| checkpoint | model | " + " | ".join(f"AP, batches of {s}" for s in sizes) + " |")
    print("|---|---|" + "---|" * len(sizes))
    for path in dict.fromkeys(r["checkpoint"] for r in rows):
        by_size = {r["batch_size"]: r for r in rows if r["checkpoint"] == path}
        cells = " | ".join(f"{100 * by_size[s]['AP']:.2f}" for s in sizes)
        print(f"| {path} | {by_size[sizes[0]]['model']} | {cells} |")


if __name__ == "__main__":
    main()
