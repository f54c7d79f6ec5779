"""Cost of a Soft Teacher step against a supervised step on the same images, in one run.

    python benchmarks/speed.py                         # CPU preset (shapes-cpu) on this machine
    python benchmarks/speed.py --preset default --device cuda --amp bf16 --size 800 1333

(a) supervised step on 5 labeled images; (b) Soft Teacher step on 1 labeled + 4 unlabeled
images (teacher on the weak views, box jittering, student on labeled + strong views). Both
take their images from the same five training images, views made beforehand, so data
loading is not timed; (c) the data pipeline alone (views of a 1 + 4 batch, one process).
Prints one JSON line per measurement and the ratio b / a. ``--sampled-steps N`` also times
both kinds of step on new batches from the training sampler every step, with and without
grouping by orientation (what a training run's steps cost: its batches pad to more pixels
than the five fixed images); ``--padding-batches N`` counts those batches' padded pixels.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from common import software
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import boxes as box_ops

import softteacher.model as model_module
from softteacher import cpu_ops
from softteacher.config import load_config
from softteacher.cpu_ops import keep_freed_memory
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
from softteacher.data.samplers import MixedBatchSampler, aspect_groups
from softteacher.ema import CopiedBuffers, ema_update
from softteacher.engine import amp_dtype, build_optimizer, supervised_step
from softteacher.model import build_detector, padded_size
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


def _sync_sites(step, device: torch.device) -> Counter:
    """Host-device synchronisations of one CUDA step, counted by the innermost project frame
    (``softteacher``) and the innermost frame overall that asked for them."""
    sites: Counter = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
        ours = [f for f in frames if "softteacher" in f.filename and "speed.py" not in f.filename]
        at = ours[-1] if ours else frames[-1]
        sites[f"{Path(at.filename).name}:{at.lineno} ({at.name}) <- "
              f"{Path(frames[-1].filename).name}:{frames[-1].lineno}"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        old, warnings.showwarning = warnings.showwarning, record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = old
    _sync(device)
    return sites


class _OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched inside it, by the innermost ``softteacher`` or
    ``torchvision`` function that called each (``other``: neither did, as in the backward pass
    and the optimizer).

    Every operator, views included, costs the host a dispatch; on a GPU most also launch a
    kernel. The count does not depend on the device except where the code branches on it
    (torchvision's batched NMS loops over classes on the CPU, not on CUDA).
    """

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter = Counter()
        self.casts: Counter = Counter()  # the sites' ``aten._to_copy`` (autocast's casts among them)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        frame, site = sys._getframe(1), "other"
        while frame is not None:
            name = frame.f_code.co_filename
            for package in ("softteacher", "torchvision"):
                if f"{package}/" in name:
                    site = f"{package}/{name.rsplit(f'{package}/', 1)[1]}:{frame.f_code.co_name}"
                    break
            else:
                frame = frame.f_back
                continue
            break
        self.sites[site] += 1
        if func is torch.ops.aten._to_copy.default:
            self.casts[site] += 1
        return func(*args, **(kwargs or {}))


def _count_ops(step) -> _OpCounter:
    """Operators one step dispatches (after one uncounted step), by call site."""
    step()
    counter = _OpCounter()
    with counter:
        step()
    return counter


def _take_cuda_branches(optimizer: torch.optim.Optimizer) -> None:
    """On the CPU, the code paths a CUDA device takes (for ``--ops-as-cuda``)."""
    vanilla, offsets = box_ops._batched_nms_vanilla, box_ops._batched_nms_coordinate_trick

    def batched_nms(boxes, scores, idxs, iou_threshold):  # torchvision's rule for CUDA tensors
        nms = vanilla if boxes.numel() > 100_000 else offsets
        return nms(boxes, scores, idxs, iou_threshold)

    box_ops.batched_nms = batched_nms
    for group in optimizer.param_groups:
        group["foreach"] = True
    # RoIAlign by torchvision's kernel, one call per FPN level, and max pooling in the layout it
    # gets: the sparse RoIAlign product and the NHWC copies around max pooling are CPU-only
    model_module.pools_sparse = cpu_ops.pools_sparse = lambda *args, **kwargs: False
    cpu_ops.MaxPool2d.forward = torch.nn.MaxPool2d.forward


def _profile(step, name: str, steps: int, device: torch.device, out: Path) -> None:
    """torch.profiler tables of ``steps`` steps (after one untimed step) into ``out``."""
    from torch.profiler import ProfilerActivity, profile

    out.mkdir(parents=True, exist_ok=True)
    step()
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, with_stack=True) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    avg = prof.key_averages()
    text = [f"# {name}: {steps} steps on {device}\n"]
    keys = ["self_cpu_time_total"] + (["self_cuda_time_total"] if device.type == "cuda" else [])
    for key in keys:
        text += [f"## sorted by {key}\n", avg.table(sort_by=key, row_limit=40), "\n"]
    text += ["## by Python stack (5 frames), sorted by self_cpu_time_total\n",
             prof.key_averages(group_by_stack_n=5).table(sort_by="self_cpu_time_total", row_limit=30)]
    if device.type == "cuda":
        sites = _sync_sites(step, device)
        text += [f"\n## host-device synchronisations in one step: {sum(sites.values())}\n"]
        text += [f"{n:5d}  {site}" for site, n in sites.most_common()]
    (out / f"profile_{name.replace('+', '_')}.txt").write_text("\n".join(text) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="shapes-cpu")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--amp", default="off", help="off | bf16 | fp16 (fp16 on CUDA only)")
    p.add_argument("--size", type=int, nargs=2, metavar=("SHORT", "MAX"),
                   help="fixed training short side and max size (default: the preset's range)")
    p.add_argument("--pseudo-per-image", type=int, default=10,
                   help="pseudo boxes the teacher hands the student per unlabeled image (all "
                        "thresholds opened, its detections capped at this count): a freshly "
                        "initialised teacher is confident about nothing, which would time a step "
                        "without unsupervised losses; 0 keeps the config's thresholds")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="after timing, profile --profile-steps steps of each measurement with "
                        "torch.profiler and write its tables to DIR; on CUDA also count the steps' "
                        "host-device synchronisations by source line")
    p.add_argument("--syncs", action="store_true",
                   help="on CUDA, count one step's host-device synchronisations (after timing)")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--ops", action="store_true",
                   help="count the operators one step of each measurement dispatches, by call site")
    p.add_argument("--ops-as-cuda", action="store_true",
                   help="with --ops on the CPU, take the branches a CUDA device takes where the code "
                        "depends on the device: torchvision's batched NMS by offset boxes up to "
                        "100,000 coordinates (on the CPU it loops over the groups above 4,000) and "
                        "SGD's foreach update; RoIAlign by torchvision's kernel per FPN level "
                        "instead of the CPU's sparse product, max pooling without the CPU's NHWC "
                        "copies; counts what the host issues for a GPU step")
    p.add_argument("--anchor-batches", type=int, default=0, metavar="N",
                   help="draw N more 1 + 4 batches as training does and report how often the "
                        "anchor cache hits over their RPN calls (teacher, student's labeled and "
                        "strong rows); with --steps 0, only that")
    p.add_argument("--padding-batches", type=int, default=0, metavar="N",
                   help="draw N 1 + 4 batches and N 5-image batches with the training sampler, "
                        "with and without data.group_by_aspect, and report the pixels each "
                        "padded batch holds per image (student rows, teacher rows); with "
                        "--steps 0, only that")
    p.add_argument("--sampled-steps", type=int, default=0, metavar="N",
                   help="also time N steps of each kind on batches the training sampler draws "
                        "(new images every step, as in training), grouped by orientation and "
                        "not, alternating step by step; views made beforehand")
    p.add_argument("--sampled-seed", type=int, default=1, help="the sampler's seed for --sampled-steps")
    p.add_argument("--malloc", choices=("keep", "system"), default="keep",
                   help="on the CPU: keep (as training does: cpu_ops.keep_freed_memory) or leave "
                        "glibc malloc's own behaviour (system)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    kept = device.type == "cpu" and args.malloc == "keep" and keep_freed_memory()
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
    if args.ops_as_cuda:
        _take_cuda_branches(optimizer)
    machine = software()  # the CPU and its vector instructions decide CPU times as much as the code
    common = {"device": str(device), "preset": args.preset, "threads": args.threads,
              "amp": args.amp, "torch": torch.__version__, "freed_memory_kept": kept,
              "cpu": machine["cpu"], "cpu_capability": machine["cpu_capability"],
              "cpu_bf16": machine["cpu_bf16"], "cpu_amx": machine["cpu_amx"],
              **({"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {}),
              "sizes": [list(im.shape[-2:]) for im in labeled5.images]}
    if args.anchor_batches:
        print(json.dumps({"measure": "anchor_cache", **_anchor_cache(student, ds, len(train),
                                                                     args.anchor_batches), **common}))
    if args.padding_batches:
        for row in _padding(ds, train, args.padding_batches, student.size_divisible):
            print(json.dumps({"measure": "padding", **row, **common}))
    if (args.anchor_batches or args.padding_batches) and args.steps == 0:
        return
    it = {"n": 0}
    last_logs: dict = {}
    last_loss: dict = {}

    copied = CopiedBuffers()

    def run(step_fn, batch, with_teacher: bool):
        def step():
            ctx = torch.autocast(device.type, dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
            with ctx:
                # a step whose logs nobody reads, as most training steps are
                loss, logs = step_fn(student=student, teacher=teacher, batch=batch, cfg=cfg,
                                     iteration=it["n"], log=False)
            last_logs.update(logs)
            last_loss["v"] = loss.detach()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if with_teacher:
                ema_update(teacher, student, cfg.method.ema_momentum, copied=copied)
            it["n"] += 1
        return step

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
        if device.type == "cuda" and (args.syncs or args.profile):
            sites = _sync_sites(run(fn, batch, with_teacher), device)
            print(json.dumps({"measure": f"syncs_{name}", "count": sum(sites.values()),
                              "sites": sites.most_common()}))
        if args.ops:
            counted = _count_ops(run(fn, batch, with_teacher))
            print(json.dumps({"measure": f"ops_{name}", "count": sum(counted.sites.values()),
                              "as_cuda": args.ops_as_cuda, "sites": counted.sites.most_common(25),
                              "casts": sum(counted.casts.values()),
                              "cast_sites": counted.casts.most_common(12)}))
        if args.profile:
            _profile(run(fn, batch, with_teacher), name, args.profile_steps, device, args.profile)
    print(json.dumps({"measure": "ratio_soft_teacher_over_supervised",
                      "value": round(out["soft_teacher_1+4"] / out["supervised_5"], 3), **common}))
    print(json.dumps({"measure": "data_pipeline_one_process",
                      "labeled_5_views_s": round(t_lab, 4), "mixed_1+4_views_s": round(t_mix, 4),
                      **common}))
    if args.sampled_steps:
        ids = aspect_groups([r.width for r in train.records], [r.height for r in train.records])
        for name, fn, ratio, with_teacher in (("supervised_5", supervised_step, (5, 0), False),
                                              ("soft_teacher_1+4", soft_teacher_step, (1, 4), True)):
            drawn = {}
            for grouped in (False, True):
                sampler = MixedBatchSampler(len(train), len(train), ratio=ratio, seed=args.sampled_seed,
                                            groups=(ids, ids) if grouped else None)
                drawn[grouped] = [_collate([(item[0], ds[item]) for item in sampler.batch(t)], device)
                                  for t in range(args.warmup + args.sampled_steps)]
            times: dict = {False: [], True: []}
            for t in range(args.warmup + args.sampled_steps):
                for grouped in (False, True):  # alternating, so that a drift of the machine hits both
                    step = run(fn, drawn[grouped][t], with_teacher)
                    _sync(device)
                    t0 = time.perf_counter()
                    step()
                    _sync(device)
                    if t >= args.warmup:
                        times[grouped].append(time.perf_counter() - t0)
            for grouped, ts in times.items():
                rows = [b.labeled.images + b.unlabeled.strong for b in drawn[grouped][args.warmup:]]
                padded = [padded_size([tuple(im.shape[-2:]) for im in r], student.size_divisible)
                          for r in rows]
                print(json.dumps({"measure": f"sampled_{name}", "group_by_aspect": grouped,
                                  "sampler_seed": args.sampled_seed,
                                  "student_padded_px_per_image": round(float(np.mean(
                                      [h * w for h, w in padded]))),
                                  "s_per_iter_mean": round(float(np.mean(ts)), 4),
                                  "s_per_iter_median": round(float(np.median(ts)), 4),
                                  "steps": len(ts), **common}))
            print(json.dumps({"measure": f"sampled_{name}_grouped_over_not",
                              "value": round(float(np.mean(times[True]) / np.mean(times[False])), 3),
                              **common}))


def _anchor_cache(student, ds: MixedDataset, n_images: int, batches: int) -> dict:
    """The RPN calls of ``batches`` training steps (teacher on the 4 weak views, student on
    the labeled and the strong rows of its 5-image batch) through a fresh anchor cache of the
    student's kind: how many build anchors. The feature map sizes come from the student's
    backbone on the meta device (shapes, no arithmetic), the anchors are built on the CPU."""
    gen = student.rpn.anchor_generator
    cache = type(gen)(gen.sizes, gen.aspect_ratios)
    shapes_only = copy.deepcopy(student.backbone).to("meta")  # sizes without arithmetic
    rng = np.random.default_rng(1)
    grids: dict = {}

    def call(images: list[torch.Tensor]) -> None:
        h, w = padded_size([tuple(im.shape[-2:]) for im in images], student.size_divisible)
        if (h, w) not in grids:
            with torch.no_grad():
                sizes = [f.shape[-2:] for f in shapes_only(torch.zeros(1, 3, h, w, device="meta")).values()]
            grids[h, w] = [torch.zeros(1, 1, *hw) for hw in sizes]
        cache(ImageList(torch.zeros(1, 1, h, w), [(h, w)] * len(images)), grids[h, w])

    for _ in range(batches):
        index, seeds = rng.integers(0, n_images, size=5), rng.integers(0, 2**62, size=5)
        lab = ds[(LABELED, int(index[0]), int(seeds[0]))]
        unl = [ds[(UNLABELED, int(i), int(s))] for i, s in zip(index[1:], seeds[1:])]
        call([u.weak for u in unl])
        student_rows = [lab.image] + [u.strong for u in unl]
        call(student_rows)
        call(student_rows)
    calls = cache.hits + cache.misses
    return {"batches": batches, "rpn_calls": calls, "builds": cache.misses,
            "builds_per_step": round(cache.misses / batches, 3), "padded_sizes": len(grids),
            "hit_rate": round(cache.hits / calls, 3)}


def _collate(samples: list, device: torch.device) -> MixedBatch:
    """A training batch of ``(source, sample)`` pairs, on ``device``."""
    return MixedBatch(collate_labeled([x for src, x in samples if src == LABELED]),
                      collate_unlabeled([x for src, x in samples if src == UNLABELED])).to(device)


def _padding(ds: MixedDataset, train, batches: int, divisible: int) -> list[dict]:
    """Pixels per image of the padded batches the training sampler draws (the train set as
    both sources, as the timed steps), grouped by orientation and not: supervised batches of 5,
    and the 1 + 4 batch's student rows (labeled + strong views) and teacher rows (weak views)."""
    ids = aspect_groups([r.width for r in train.records], [r.height for r in train.records])
    rows = []
    for ratio in ((5, 0), (1, 4)):
        for grouped in (False, True):
            sampler = MixedBatchSampler(len(train), len(train), ratio=ratio, seed=0,
                                        groups=(ids, ids) if grouped else None)
            sums = {"student": [0, 0], "teacher": [0, 0]}  # padded, image pixels
            for t in range(batches):
                items = sampler.batch(t)
                samples = [(item[0], ds[item]) for item in items]
                views = {"student": [x.image if src == LABELED else x.strong for src, x in samples],
                         "teacher": [x.weak for src, x in samples if src == UNLABELED]}
                for who, images in views.items():
                    if images:
                        h, w = padded_size([tuple(im.shape[-2:]) for im in images], divisible)
                        sums[who][0] += h * w * len(images)
                        sums[who][1] += sum(im.shape[-2] * im.shape[-1] for im in images)
            for who, (padded, pixels) in sums.items():
                images = batches * (sum(ratio) if who == "student" else ratio[1])
                if images:
                    rows.append({"batch": f"{ratio[0]}+{ratio[1]}", "rows": who,
                                 "group_by_aspect": grouped, "batches": batches,
                                 "padded_px_per_image": round(padded / images),
                                 "image_px_per_image": round(pixels / images),
                                 "padded_over_image": round(padded / pixels, 3)})
    return rows


if __name__ == "__main__":
    main()
