"""Cost of a Soft Teacher step against a supervised step on the same images, in one run.

    python benchmarks/speed.py                         # CPU preset (shapes-cpu) on this machine
    python benchmarks/speed.py --preset default --device cuda --amp bf16 --size 800 1333

(a) supervised step on 5 labeled images; (b) Soft Teacher step on 1 labeled + 4 unlabeled
images (teacher on the weak views, box jittering, student on labeled + strong views). Both
take their images from the same five training images, views made beforehand, so data
loading is not timed; (c) the data pipeline alone (views of a 1 + 4 batch, one process).
Prints one JSON line per measurement and the ratio b / a.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import time

import numpy as np
import torch

from softteacher.config import load_config
from softteacher.data import shapes
from softteacher.data.datasets import load_dataset
from softteacher.data.loading import (
    LABELED,
    UNLABELED,
    MixedBatch,
    MixedDataset,
    collate_labeled,
    collate_unlabeled,
)
from softteacher.ema import ema_update
from softteacher.engine import amp_dtype, build_optimizer, supervised_step
from softteacher.model import build_detector
from softteacher.soft_teacher import soft_teacher_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time_steps(step, n: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="shapes-cpu")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--amp", default="off", help="off | bf16 | fp16 (CUDA only)")
    p.add_argument("--size", type=int, nargs=2, metavar=("SHORT", "MAX"),
                   help="fixed training short side and max size (default: the preset's range)")
    p.add_argument("--pseudo-per-image", type=int, default=10,
                   help="pseudo boxes the teacher hands the student per unlabeled image (all "
                        "thresholds opened, its detections capped at this count): a freshly "
                        "initialised teacher is confident about nothing, which would time a step "
                        "without unsupervised losses; 0 keeps the config's thresholds")
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_config(args.preset, overrides=args.set)
    cfg.solver.amp = args.amp
    # lr 0: every timed step does the same work (forward, backward, SGD update, EMA) on the same
    # weights, so a from-scratch model cannot drift or diverge between the two measurements
    cfg.solver.lr = 0.0
    if args.pseudo_per_image > 0:
        m = cfg.method
        m.pseudo_threshold = m.cls_pseudo_threshold = m.rpn_pseudo_threshold = 0.0
        m.reg_pseudo_threshold = float("inf")
        cfg.model.box_score_thresh = 0.0
        cfg.model.box_detections_per_img = args.pseudo_per_image
    if args.size:
        cfg.augment.train_short_side = (args.size[0], args.size[0])
        cfg.augment.train_max_size = args.size[1]
    paths = shapes.generate_shapes(shapes.default_root())
    train = load_dataset(paths.train_json, images=paths.train_images)
    ds = MixedDataset(train, train, cfg.augment)
    rng = np.random.default_rng(0)
    seeds = [int(s) for s in rng.integers(0, 2**62, size=5)]

    t0 = time.perf_counter()
    labeled5 = collate_labeled([ds[(LABELED, i, seeds[i])] for i in range(5)])
    t_lab = time.perf_counter() - t0
    t0 = time.perf_counter()
    mixed = MixedBatch(collate_labeled([ds[(LABELED, 0, seeds[0])]]),
                       collate_unlabeled([ds[(UNLABELED, i, seeds[i])] for i in range(1, 5)]))
    t_mix = time.perf_counter() - t0
    sup_batch = MixedBatch(labeled5, collate_unlabeled([])).to(device)
    mixed = mixed.to(device)
    dtype = amp_dtype(cfg, device)

    torch.manual_seed(0)
    student = build_detector(cfg.model, train.num_classes).to(device).train()
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    optimizer = build_optimizer(student, cfg)
    it = {"n": 0}
    last_logs: dict = {}
    last_loss: dict = {}

    def run(step_fn, batch, with_teacher: bool):
        def step():
            ctx = torch.autocast(device.type, dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
            with ctx:
                loss, logs = step_fn(student=student, teacher=teacher, batch=batch, cfg=cfg,
                                     iteration=it["n"])
            last_logs.update(logs)
            last_loss["v"] = loss.detach()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if with_teacher:
                ema_update(teacher, student, cfg.method.ema_momentum)
            it["n"] += 1
        return step

    common = {"device": str(device), "preset": args.preset, "threads": args.threads,
              "amp": args.amp, "torch": torch.__version__,
              "sizes": [list(im.shape[-2:]) for im in labeled5.images]}
    out = {}
    for name, fn, batch, with_teacher in (("supervised_5", supervised_step, sup_batch, False),
                                          ("soft_teacher_1+4", soft_teacher_step, mixed, True)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = _time_steps(run(fn, batch, with_teacher), args.steps, args.warmup, device)
        pseudo = {k.split("/")[1] + "_per_image": round(float(last_logs[k]), 2) for k in
                  ("unsup/num_pseudo_cls", "unsup/num_pseudo_reg") if with_teacher and k in last_logs}
        med = float(np.median(times))
        out[name] = med
        print(json.dumps({"measure": name, "s_per_iter_median": round(med, 4),
                          "s_per_iter_mean": round(float(np.mean(times)), 4),
                          "images_per_s": round(5 / med, 2), "peak_mib": round(_peak_mib(device), 1),
                          "steps": args.steps, "loss_finite": bool(torch.isfinite(last_loss["v"])),
                          **pseudo, **common}))
    print(json.dumps({"measure": "ratio_soft_teacher_over_supervised",
                      "value": round(out["soft_teacher_1+4"] / out["supervised_5"], 3), **common}))
    print(json.dumps({"measure": "data_pipeline_one_process",
                      "labeled_5_views_s": round(t_lab, 4), "mixed_1+4_views_s": round(t_mix, 4),
                      **common}))


if __name__ == "__main__":
    main()
