"""The training loop, evaluation and prediction.

One flat, iteration-based loop serves the supervised baseline and Soft Teacher: each
iteration draws a ``MixedBatch``, calls a step function that returns the total loss and
its terms, then makes plain calls to the optimizer, the EMA teacher, the logger, the
evaluator and the checkpointer.
"""

from __future__ import annotations

import copy
import errno
import inspect
import json
import logging
import math
import os
import random
import re
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from softteacher import checkpoint as ckpt
from softteacher import cpu_ops, distributed, versions
from softteacher.config import Config, DataConfig, check_config, config_from_dict, with_absolute_paths
from softteacher.data.datasets import (
    IMAGE_SUFFIXES,
    check_files_exist,
    check_record_files,
    image_files,
    is_voc_root,
    load_dataset,
    read_image,
)
from softteacher.data.loading import MixedBatch, MixedDataset, test_loader, train_loader
from softteacher.data.records import CategoryMap, DetectionSet, category_difference
from softteacher.data.samplers import MixedBatchSampler, aspect_groups
from softteacher.ema import CopiedBuffers, ema_momentum, ema_update, unwrap
from softteacher.evaluation import detections_to_results, evaluate_detections, format_metrics
from softteacher.geometry import clip_boxes, transform_boxes
from softteacher.io import finite, save_image, write_json, write_text
from softteacher.model import (
    Detector,
    build_detector,
    check_score_threshold,
    resolve_channels_last,
    resolve_norm,
    score_threshold,
)
from softteacher.visualize import draw_boxes, side_by_side, titled

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed non-finite)."""


# ----------------------------------------------------------------------------- runtime

def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else the CPU) or a torch device name (cpu, cuda, cuda:N, ...).

    Raises:
        ValueError: a name torch does not know, or CUDA asked for without it.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r}: expected auto, cpu, cuda or cuda:N (or another torch "
                         f"device, e.g. mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ValueError(f"device {name!r}: {count} GPU(s) visible, cuda:0 to cuda:{count - 1}"
                         + (" (CUDA_VISIBLE_DEVICES numbers the GPUs it lists from 0)"
                            if os.environ.get("CUDA_VISIBLE_DEVICES") else ""))
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for float32.

    On CUDA ``auto`` is bf16 where the device supports it, else fp16. On the CPU ``auto`` and
    ``off`` are float32; ``bf16`` asks for the CPU's bf16 autocast (fast where the CPU has bf16
    instructions, such as AVX-512 BF16 or AMX); ``fp16`` is refused there."""
    mode = cfg.solver.amp
    if mode not in ("auto", "bf16", "fp16", "off"):
        raise ValueError(f"solver.amp {mode!r}: expected auto, bf16, fp16 or off")
    if mode == "off":
        return None
    if device.type != "cuda":
        if mode == "fp16":
            raise ValueError(f"solver.amp fp16 needs a CUDA device (this run is on {device.type}); "
                             f"use bf16 or off")
        return torch.bfloat16 if mode == "bf16" else None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mode == "bf16" else torch.float16


def _cpu_has(*probes: str) -> bool | None:
    """Whether any of torch's CPU feature probes ``torch.cpu.<name>()`` answers yes; None where
    this torch lacks one of them."""
    found = [getattr(torch.cpu, name, None) for name in probes]
    if not all(callable(p) for p in found):
        return None
    return any(p() for p in found)


def cpu_has_bf16() -> bool | None:
    """Whether this CPU computes in bf16 natively (AVX-512 BF16 or AMX); None where this torch
    cannot tell."""
    return _cpu_has("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def cpu_has_amx() -> bool | None:
    """Whether this CPU has AMX tiles; None where this torch cannot tell. Benchmark records carry
    it: a Xeon with AVX-512 BF16 and no AMX ran bf16 steps slower than float32 (``speed.md``)."""
    return _cpu_has("_is_amx_tile_supported")


# ----------------------------------------------------------------------------- data

@dataclass
class Data:
    labeled: DetectionSet
    val: DetectionSet | None
    unlabeled: DetectionSet | None
    unlabeled_gt: DetectionSet | None

    @property
    def categories(self) -> CategoryMap:
        return self.labeled.categories


def _check_hidden_ground_truth(gt: DetectionSet, unlabeled: DetectionSet, labeled: DetectionSet,
                               d: DataConfig) -> None:
    """The diagnostics pair an unlabeled image with the ground truth of its image id: each id
    they share must name the same file and size, and the classes must be the training set's."""
    if gt.categories != labeled.categories:
        raise ValueError(f"{d.unlabeled_gt}: categories differ from {d.train}'s: "
                         f"{category_difference(gt.categories, labeled.categories)}")
    by_id = {r.image_id: r for r in gt.records}
    for r in unlabeled.records:
        g = by_id.get(r.image_id)
        if g is not None and (Path(g.path).resolve() != Path(r.path).resolve()
                              or (g.width, g.height) != (r.width, r.height)):
            raise ValueError(f"{d.unlabeled_gt}: image {r.image_id} is {g.path} ({g.width}x{g.height}), "
                             f"in {d.unlabeled} image {r.image_id} is {r.path} ({r.width}x{r.height}): "
                             f"the hidden ground truth must list the unlabeled images under their ids")


def load_data(cfg: Config) -> Data:
    d = cfg.data
    if not d.train:
        raise ValueError("no training data: set data.train (or --train / --shapes; "
                         "`train --resume --out RUN` takes RUN/config.yaml's)")
    labeled = load_dataset(d.train, images=d.train_images, split=d.train_split, labeled=True,
                           class_names=list(d.class_names) or None)
    if not any(len(r.boxes) for r in labeled.records):
        raise ValueError(f"{d.train}: the labeled set has no boxes to learn from")
    check_files_exist(labeled, "--train-images DIR")
    if d.class_names and Path(d.train).is_file() and list(d.class_names) != labeled.categories.names:
        log.warning("data.class_names %s: not used; a COCO json's categories are its classes (%s), "
                    "data.class_names orders a VOC set's", list(d.class_names),
                    ", ".join(labeled.categories.names))
    val = None  # a VOC val set takes the training set's classes
    if d.val:
        val = load_dataset(d.val, images=d.val_images, split=d.val_split, labeled=True,
                           categories=labeled.categories)
        if val.categories != labeled.categories:
            raise ValueError(f"{d.val}: categories differ from {d.train}'s: "
                             f"{category_difference(val.categories, labeled.categories)}")
        check_files_exist(val, "--val-images DIR")  # a wrong folder: where the images are
        check_record_files(val)  # refused now rather than at the first evaluation, hours in
    unlabeled = gt = None
    if cfg.method.enabled:
        if not d.unlabeled:
            raise ValueError("Soft Teacher needs unlabeled data: set data.unlabeled "
                             "(or train with --supervised)")
        if cfg.method.sample_ratio[1] < 1:
            raise ValueError(f"method.sample_ratio {tuple(cfg.method.sample_ratio)}: Soft Teacher needs "
                             "unlabeled images in every batch (or train with --supervised)")
        folder = Path(d.unlabeled).resolve()
        out = Path(cfg.train.output_dir).resolve()
        if folder.is_dir() and not is_voc_root(folder) and out.is_relative_to(folder):
            # a folder is read whole: this run's pictures would be unlabeled images of the next
            raise ValueError(f"train: the output folder {cfg.train.output_dir} is in the unlabeled "
                             f"image folder {d.unlabeled}; the pictures it writes would be read as "
                             f"unlabeled images next time: choose another --out")
        unlabeled = load_dataset(d.unlabeled, images=d.unlabeled_images, labeled=False)
        check_files_exist(unlabeled, "--unlabeled-images DIR")
        source = cfg.method.pseudo_source
        if source != "teacher" and not d.unlabeled_gt:
            raise ValueError(f"method.pseudo_source={source} takes its pseudo boxes from the unlabeled "
                             f"pool's hidden ground truth: set data.unlabeled_gt")
        if d.unlabeled_gt:
            gt = load_dataset(d.unlabeled_gt, images=d.unlabeled_images, labeled=True,
                              categories=labeled.categories)
            _check_hidden_ground_truth(gt, unlabeled, labeled, d)
            held = {r.image_id for r in gt.records}
            lacking = [r for r in unlabeled.records if r.image_id not in held]
            if lacking and source != "teacher":  # found now, not when a batch first draws one
                raise ValueError(f"method.pseudo_source={source}: {d.unlabeled_gt} lacks {len(lacking)} of "
                                 f"the {len(unlabeled)} unlabeled images (image {lacking[0].image_id}, "
                                 f"{lacking[0].path}); it needs the ground truth of every one")
            if lacking:
                log.info("%s: no ground truth of %d of the %d unlabeled images; the pseudo boxes' "
                         "precision and recall are measured on the others", d.unlabeled_gt,
                         len(lacking), len(unlabeled))
    _name_shared_images(labeled, val, unlabeled)
    for name, ds, split in (("train", labeled, d.train_split), ("val", val, d.val_split)):
        if ds is not None:  # a VOC root's images are those of one image set
            image_set = f" (image set {split})" if is_voc_root(ds.source) else ""
            log.info("%s: %d images from %s%s", name, len(ds), ds.source, image_set)
    if unlabeled is not None:
        log.info("unlabeled: %d images from %s", len(unlabeled), unlabeled.source)
    return Data(labeled, val, unlabeled, gt)


def _name_shared_images(labeled: DetectionSet, val: DetectionSet | None,
                        unlabeled: DetectionSet | None) -> None:
    """Say so of image files that two of the sets share: val images trained on, or an unlabeled
    set with nothing the labeled set lacks (both usually a wrong file given)."""
    def files(ds: DetectionSet) -> set[str]:
        return {os.path.normcase(os.path.normpath(os.path.abspath(r.path))) for r in ds.records}

    train_files = files(labeled)
    if val is not None and (n := len(files(val) & train_files)):
        log.warning("%d of the %d val images are training images too (%s and %s name the same "
                    "files): the val mAP of the run overstates what it detects on new images",
                    n, len(val), val.source, labeled.source)
    if unlabeled is not None:
        shared = len(files(unlabeled) & train_files)
        if shared == len(unlabeled):
            log.warning("every unlabeled image (%d, %s) is a labeled one too: Soft Teacher has no "
                        "image to learn from that the labeled set lacks", shared, unlabeled.source)
        elif shared:
            log.info("unlabeled: %d of %d images are labeled ones too", shared, len(unlabeled))


# ----------------------------------------------------------------------------- optimisation

def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    s = cfg.solver
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)


def lr_factor(iteration: int, cfg: Config) -> float:
    """Linear warm-up from ``warmup_factor`` then ×gamma at each of ``steps``."""
    s = cfg.solver
    factor = s.gamma ** sum(iteration >= m for m in s.steps)
    if iteration < s.warmup_iters:
        alpha = iteration / s.warmup_iters
        factor *= s.warmup_factor * (1 - alpha) + alpha
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg))


# ----------------------------------------------------------------------------- steps

StepFn = Callable[..., tuple[Tensor, dict[str, Tensor]]]


def supervised_step(student: nn.Module, batch: MixedBatch, **_) -> tuple[Tensor, dict[str, Tensor]]:
    """Faster R-CNN losses on the labeled part. Returns (total, {"sup/loss_*": ...})."""
    lab = batch.labeled
    losses = student(lab.images, lab.targets)
    logs = {f"sup/{k}": v.detach() for k, v in losses.items()}
    return sum(losses.values()), logs


# ----------------------------------------------------------------------------- logging

class MetricLogger:
    """JSON lines file, TensorBoard scalars and a progress bar; rank 0 only."""

    def __init__(self, out_dir: Path, start: int, total: int, progress: bool, enabled: bool = True):
        self.enabled = enabled
        self.jsonl = out_dir / "metrics.jsonl"
        self.tb = None
        self.bar = None
        if not enabled:
            return
        self._keep_rows_to(start)
        try:
            from torch.utils.tensorboard import SummaryWriter

            # events after the checkpoint's iteration go, as the rows of metrics.jsonl do
            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start + 1 if start else 0)
        except ImportError:  # tensorboard missing: keep going without it
            log.warning("tensorboard not installed; scalars go to metrics.jsonl only")
        if progress and sys.stderr.isatty():  # else a line per logged step, as in a log file
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, dynamic_ncols=True, desc="train",
                            unit="it", smoothing=0.1)

    def _keep_rows_to(self, start: int) -> None:
        """Drop the rows that this run logs again: those after ``start``, the iteration it resumes
        from (all of them for a run from the beginning in a used folder), as TensorBoard's
        ``purge_step`` does. One row per iteration then, and evaluations of an abandoned run are
        not read back as this run's."""
        if not self.jsonl.exists():
            return
        kept = []
        for line in self.jsonl.read_text().splitlines():
            try:
                iteration = json.loads(line)["iteration"]
            except (ValueError, TypeError, KeyError):  # a line cut short by a crash
                continue
            if start and iteration <= start:
                kept.append(line + "\n")
        write_text(self.jsonl, "".join(kept))

    def scalars(self, iteration: int, values: dict[str, float], kind: str = "train") -> None:
        if not self.enabled:
            return
        with open(self.jsonl, "a") as f:
            # strict JSON, as other tools read it: an undefined value (NaN) is null
            f.write(json.dumps(finite({"iteration": iteration, "kind": kind, **values}),
                               allow_nan=False) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, iteration)

    def image(self, tag: str, image, iteration: int) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_image(tag, np.asarray(image), iteration, dataformats="HWC")

    def progress(self, n: int, postfix: dict[str, str], done: int, total: int) -> None:
        if self.bar is not None:  # the numbers of this step with it, not after the next one
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
        elif self.enabled:
            log.info("iteration %d/%d %s", done, total, " ".join(f"{k} {v}" for k, v in postfix.items()))

    def write(self, text: str, level: int = logging.INFO) -> None:
        if self.bar is not None:
            # where the bar and the log are: stderr (tqdm writes to stdout unless told)
            self.bar.write(("warning: " if level >= logging.WARNING else "") + text, file=sys.stderr)
        elif self.enabled:
            log.log(level, text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------- evaluation

def eval_batch_size(cfg: Config) -> int:
    """``train.eval_batch_size``, refused unless at least 1."""
    if cfg.train.eval_batch_size < 1:
        raise ValueError(f"train.eval_batch_size must be at least 1, got {cfg.train.eval_batch_size}")
    return cfg.train.eval_batch_size


def progress_bar(total: int, desc: str, enabled: bool = True, leave: bool = True):
    """A tqdm bar of ``total`` images on stderr, or None: where ``enabled`` is false, stderr is
    not a terminal (a log file gets no bar) or this is not rank 0."""
    if not (enabled and sys.stderr.isatty() and distributed.env_info().is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, leave=leave, file=sys.stderr)


def reading_workers(cfg: Config, device: torch.device, workers: int | None = None) -> int:
    """The loader processes that read images for detection: ``workers`` where given, else
    ``data.num_workers`` on a GPU, which computes while they decode, and none on the CPU, where
    the model's threads take every core (on 2 cores one such process made a detection no
    faster, ``benchmarks/speed.md``)."""
    if workers is None:
        workers = cfg.data.num_workers if device.type == "cuda" else 0
    if workers < 0:
        raise ValueError(f"workers must be 0 or more, got {workers}")
    return workers


@torch.no_grad()
def inference(model: Detector, dset: DetectionSet, cfg: Config, device: torch.device,
              score_thresh: float | None = None, progress: str | None = None,
              leave: bool = True, workers: int | None = None) -> list[dict]:
    """COCO results (original frame, original category ids) for every image of ``dset``, in
    batches of ``cfg.train.eval_batch_size`` images, read and turned into test views by
    ``reading_workers(cfg, device, workers)`` loader processes while the model runs (0: in this
    process; the results are the same). Under torchrun each rank runs a shard of the images and
    rank 0 gets them all; the other ranks get an empty list. ``progress``: the description of a
    bar over the images on a terminal (rank 0's shard), kept after the end unless ``leave`` is
    false."""
    batch_size = eval_batch_size(cfg)
    workers = reading_workers(cfg, device, workers)
    model = unwrap(model)
    was_training = model.training
    model.eval()
    results: list[dict] = []
    info = distributed.env_info() if torch.distributed.is_initialized() else distributed.DistInfo()
    shard = list(range(info.rank, len(dset), info.world_size)) if info.enabled else None
    bar = progress_bar(len(dset) if shard is None else len(shard), progress,
                       enabled=progress is not None, leave=leave)
    pin = device.type == "cuda"
    try:
        with score_threshold(model, score_thresh):
            for batch in test_loader(dset, cfg.augment, batch_size=batch_size, indices=shard,
                                     num_workers=workers, pin_memory=pin):
                outs = model([im.to(device, non_blocking=pin) for im in batch.images])
                for out, m, size, image_id in zip(outs, batch.matrices, batch.orig_sizes, batch.image_ids):
                    boxes = to_original(out.boxes.float().cpu(), m, size)
                    results += detections_to_results(image_id, boxes, out.scores.float().cpu(),
                                                     out.labels.cpu(), dset.categories)
                if bar is not None:
                    bar.update(len(batch.images))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    if info.enabled:
        parts = distributed.gather_objects(results)
        results = [r for part in parts for r in part] if parts is not None else []
    return results


def to_original(boxes_view: Tensor, matrix: Tensor, size: tuple[int, int]) -> Tensor:
    """Boxes from a view back to the original image (inverse of the view's matrix), clipped."""
    return clip_boxes(transform_boxes(boxes_view, torch.linalg.inv(matrix.double())), size)


_MAX_DETS_WARNED: set[int] = set()


def evaluate(model: Detector, dset: DetectionSet, cfg: Config, device: torch.device,
             score_thresh: float | None = None, progress: str | None = None,
             leave: bool = True, workers: int | None = None) -> tuple[dict[str, float], list[dict]]:
    """COCO metrics (rank 0's, given to every rank) and results of ``model`` on ``dset``;
    ``inference`` runs it (``progress``, ``leave``: its bar; ``workers``: its readers)."""
    if score_thresh is not None:
        check_score_threshold(score_thresh)
    per_image = unwrap(model).roi_heads.detections_per_img
    if per_image > 100 and per_image not in _MAX_DETS_WARNED:
        _MAX_DETS_WARNED.add(per_image)
        log.warning("model.box_detections_per_img=%d: COCO's AP counts up to 100 detections per "
                    "image and class, so more than 100 per image score above COCO's rule of 100 "
                    "per image", per_image)
    results = inference(model, dset, cfg, device, score_thresh=score_thresh, progress=progress,
                        leave=leave, workers=workers)
    metrics = evaluate_detections(dset, results) if distributed.env_info().is_main else None
    return distributed.broadcast_object(metrics), results


# ----------------------------------------------------------------------------- training

@dataclass
class TrainResult:
    output_dir: Path
    iteration: int
    metrics: dict[str, float]
    last_losses: dict[str, float]
    skipped_steps: int
    student: nn.Module
    teacher: nn.Module | None
    started_at: int = 0  # the iteration it resumed from


def _final_metrics(out_dir: Path, iteration: int) -> dict[str, float]:
    """The metrics ``final_metrics.json`` holds for ``iteration`` (a finished run's), else none."""
    try:
        saved = json.loads((out_dir / "final_metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(saved, dict) or saved.get("iteration") != iteration:
        return {}
    return {k: v for k, v in saved.items() if "/" in k}


def _is_period(done: int, period: int) -> bool:
    return period > 0 and done % period == 0


def smoothed_time(average: float, value: float, steps: int) -> float:
    """The logged seconds per step (and waiting for data), after ``steps`` steps of this run: the
    first two steps' own times, then an exponential average that gives the newest step a weight
    of 0.1, started from the second step: the first, which also builds kernels and starts the
    loader's workers, would otherwise linger in it (and in the ETA) for dozens of steps."""
    return value if steps <= 2 else 0.9 * average + 0.1 * value


def _is_log_step(done: int, log_period: int, max_iter: int) -> bool:
    """Whether the logs of the step that completes iteration ``done`` are written."""
    return _is_period(done, log_period) or done == max_iter


def pseudo_label_picture(visuals: dict, names: list[str]):
    """Weak view with the teacher's candidates | strong view with the classification pseudo boxes
    mapped into it (as filled in by the step function's ``visuals``)."""
    weak = draw_boxes(visuals["weak"], visuals["weak_boxes"], visuals["weak_labels"].tolist(),
                      visuals["weak_scores"].tolist(), names)
    strong = draw_boxes(visuals["strong"], visuals["strong_boxes"], visuals["strong_labels"].tolist(),
                        None, names)
    return side_by_side([weak, strong])


VAL_PICTURE_SCORE = 0.3  # the detections a val picture shows: predict's default threshold


def val_prediction_picture(dset: DetectionSet, results_of: dict[str, list[dict]]):
    """The first image of ``dset`` with each model's detections in COCO ``results`` scoring at
    least ``VAL_PICTURE_SCORE``, one copy per model (side by side, in the order given), each
    under its model's name."""
    rec = dset.records[0]
    image = read_image(rec.path, rec, dset.source)
    pictures = []
    for name, results in results_of.items():
        mine = [r for r in results if r["image_id"] == rec.image_id and r["score"] >= VAL_PICTURE_SCORE]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in mine)],
                             dtype=torch.float64).reshape(-1, 4)
        labels = [dset.categories.label(r["category_id"]) for r in mine]
        drawn = draw_boxes(image, boxes, labels, [r["score"] for r in mine], dset.categories.names)
        what = f"{len(mine)} detection{'' if len(mine) == 1 else 's'}"
        pictures.append(titled(drawn, f"{name}: {what} scoring {VAL_PICTURE_SCORE} or more"))
    return side_by_side(pictures)


def _step_function(cfg: Config) -> StepFn:
    if not cfg.method.enabled:
        return supervised_step
    from softteacher.soft_teacher import soft_teacher_step

    return soft_teacher_step


def _checkpoint_state(cfg: Config, data: Data, student, teacher, optimizer, scheduler, scaler,
                      iteration: int, skipped: int, best: float, sampler: MixedBatchSampler,
                      rngs: list[dict], bad_in_row: int, empty_streak: int = 0) -> dict:
    return {
        "format": ckpt.FORMAT,
        "iteration": iteration,
        "sampler_consumed_batches": sampler.consumed_batches_at(iteration),
        "sampler_group_by_aspect": cfg.data.group_by_aspect,
        "sampler_grouped": sampler.grouped,  # what the sampler made of it (the sets' skew)
        "config": json.loads(json.dumps(cfg.to_dict())),
        "fingerprint": cfg.fingerprint(),
        "categories": data.categories.to_coco(),
        "report": cfg.method.report if cfg.method.enabled else "student",
        "student": unwrap(student).state_dict(),
        "teacher": teacher.state_dict() if teacher is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng_per_rank": rngs,  # each process draws its own RoI samples and jitter
        "skipped_steps": skipped,
        "bad_steps_in_row": bad_in_row,
        "empty_pseudo_streak": empty_streak,  # iterations in a row without a pseudo box, so far
        "best_metric": best,
    }


def _resume_path(resume: str, out_dir: Path, manager: ckpt.CheckpointManager) -> Path | None:
    if resume != "auto":
        return Path(resume)
    latest = manager.latest()
    if latest is None:
        log.info("no checkpoint in %s: starting from scratch", out_dir)
    return latest


def _agreed_resume_path(path: Path | None, device: torch.device) -> Path | None:
    """Rank 0's checkpoint to resume from, on every rank. Each process listing its own output
    folder could pick another one (a folder not shared between nodes, or a stale listing), and
    processes that start at different iterations would wait on each other forever.

    Raises:
        CheckpointError: on every rank, when some process cannot read rank 0's choice.
    """
    path = distributed.broadcast_object(path)
    if not distributed.all_true(path is None or os.access(path, os.R_OK), device):
        raise ckpt.CheckpointError(f"{path}: rank 0 resumes from it, but another process cannot "
                                   "read it; every node must see the same output folder")
    return path


def _built_as_its_start(cfg: Config) -> Config:
    """A run that starts from a checkpoint of this project (``model.weights``) whose backbone
    started pretrained builds its model alike (``norm: auto`` and the trainable layers follow
    that), though this run names no backbone file: it takes the checkpoint's name for it, which
    is never read (the checkpoint holds every weight)."""
    m = cfg.model
    if not m.weights or m.backbone_weights or m.torchvision_weights:
        return cfg
    try:
        saved = ckpt.load_checkpoint(m.weights, mmap=True)  # its config only: no tensor is read
        theirs = (saved.get("config") or {}).get("model") or {}
    except ckpt.CheckpointError:  # a plain state dict: the detector's own settings hold
        return cfg
    key = next((k for k in ("backbone_weights", "torchvision_weights") if theirs.get(k)), None)
    if key is None:
        return cfg
    cfg = copy.deepcopy(cfg)
    setattr(cfg.model, key, str(theirs[key]))
    log.info("%s started from a pretrained backbone (%s): this model is built alike (norm %s, "
             "model.trainable_layers %d); that file is not read", m.weights, theirs[key],
             resolve_norm(cfg.model), cfg.model.trainable_layers)
    return cfg


def check_launch(cfg: Config, processes: int) -> None:
    """What refuses a run of ``processes`` processes on this node before they start: the
    device, a GPU for each, SyncBatchNorm on the CPU."""
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and processes > torch.cuda.device_count():
        raise ValueError(f"--devices {processes}: {torch.cuda.device_count()} GPU(s) visible, one "
                         f"needed per process")
    _check_sync_bn(cfg, device, warn=False)


def _check_sync_bn(cfg: Config, device: torch.device, warn: bool = True) -> None:
    """SyncBatchNorm synchronises plain BatchNorm layers, and runs on CUDA devices only."""
    if not cfg.model.sync_bn:
        return
    if device.type != "cuda":
        raise ValueError(f"model.sync_bn needs CUDA devices (SyncBatchNorm does not run on "
                         f"{device.type}); set model.sync_bn=false")
    if warn and resolve_norm(cfg.model) != "bn":
        log.warning("model.sync_bn applies to model.norm=bn; the model has %s, nothing to synchronise",
                    resolve_norm(cfg.model))


def _eval_models(student, teacher, cfg: Config) -> dict[str, nn.Module]:
    if teacher is None:
        return {"student": unwrap(student)}
    return {"teacher": teacher, "student": unwrap(student)}


class EvaluatedModel:
    """A model's metrics with the tensors they were measured on, so that a model nothing wrote
    to since is not evaluated again (a frozen teacher: ``method.ema_momentum=1``): its
    parameters and buffers the same tensors at the same versions (:mod:`softteacher.versions`).
    A model with an inference tensor is never taken as unchanged. ``drawn``: its results on the
    image the val pictures show, drawn again while it stays unchanged."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] | None = None
        self.drawn: list[dict] = []
        self.iteration = -1
        self._seen: versions.Snapshot | None = None

    @staticmethod
    def _tensors(model: nn.Module) -> list[Tensor]:
        return [*model.parameters(), *model.buffers()]

    def record(self, model: nn.Module, metrics: dict[str, float], iteration: int,
               drawn: list[dict] | None = None) -> None:
        self.metrics, self.iteration, self.drawn = metrics, iteration, drawn or []
        self._seen = versions.snapshot(self._tensors(model))

    def unchanged(self, model: nn.Module) -> bool:
        return self.metrics is not None and versions.unchanged(self._seen, self._tensors(model))


def gradient_norm(model: nn.Module, clip: float) -> Tensor:
    """The 2-norm of all of ``model``'s gradients together, as a tensor (no host sync); the
    gradients clipped to ``clip`` first where it is above 0 (``clip_grad_norm_``, whose norm is
    that before clipping)."""
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def train(cfg: Config, resume: str | None = None, progress: bool = True,
          data: Data | None = None) -> TrainResult:
    """Train ``cfg``'s detector to ``solver.max_iter``; resume from a checkpoint if asked."""
    device = resolve_device(cfg.train.device)
    dinfo = distributed.init(device.type)
    if device.type == "cuda" and dinfo.enabled:
        if device.index not in (None, dinfo.local_rank):
            log.warning("train.device %s: under torchrun each process takes the GPU of its local "
                        "rank (cuda:%d here)", cfg.train.device, dinfo.local_rank)
        device = torch.device("cuda", dinfo.local_rank)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    if device.type == "cpu":
        cpu_ops.keep_freed_memory()  # large tensors without fresh pages at every step
        cpu_ops.bound_operator_caches()  # before oneDNN's first operator, which reads the sizes
    seed_everything(cfg.train.seed)
    out_dir = Path(cfg.train.output_dir)
    check_config(cfg)
    _check_sync_bn(cfg, device)
    data = data or load_data(cfg)
    late = [m for m in cfg.solver.steps if m >= cfg.solver.max_iter]
    if late:  # once the data is accepted: not above the error of a run that does not start
        log.warning("solver.steps %s: at or past solver.max_iter %d, never reached; the learning "
                    "rate does not decay there", ", ".join(map(str, late)), cfg.solver.max_iter)
    elif cfg.solver.steps and max(cfg.solver.steps) < cfg.solver.max_iter / 2:
        # a preset's steps kept under a longer solver.max_iter: most of the run at a decayed rate
        log.warning("solver.steps %s: all in the first half of solver.max_iter %d; the learning rate "
                    "is decayed for most of the run (steps are iterations: set solver.steps with "
                    "solver.max_iter)", ", ".join(map(str, cfg.solver.steps)), cfg.solver.max_iter)
    if data.val is not None:
        eval_batch_size(cfg)  # refused now rather than at the first evaluation
    categories = data.categories.to_coco()

    manager = ckpt.CheckpointManager(out_dir, cfg.train.keep_last)
    path = _resume_path(resume, out_dir, manager) if resume else None
    if resume and dinfo.enabled:
        path = _agreed_resume_path(path, device)
    if path is None and cfg.solver.max_iter == 0:
        raise ValueError("solver.max_iter is 0: a new run has nothing to train (set it to 1 or more)")
    if path is None:
        cfg = _built_as_its_start(cfg)
    # a resumed run reads no weight file: the checkpoint holds every weight
    model = build_detector(cfg.model, data.labeled.num_classes, data.categories.names,
                           load_weights=path is None).to(device)
    if cfg.model.sync_bn and dinfo.enabled:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    student: nn.Module = model
    if dinfo.enabled:
        # Every rank seeded and built the same model, and DDP broadcasts rank 0's weights here,
        # so the teacher copied below is the same on every rank. Only BatchNorm's running
        # statistics change afterwards; without
        # them, broadcasting the buffers again before every forward would copy constants (and
        # make frozen BatchNorm recompute its scale and shift every step). Newer torch names the
        # per-forward copy forward_sync_buffers (and syncs buffers at init with either value).
        ddp = torch.nn.parallel.DistributedDataParallel
        sync = resolve_norm(cfg.model) == "bn"
        buffers = ({"forward_sync_buffers": sync} if "forward_sync_buffers" in
                   inspect.signature(ddp).parameters else {"broadcast_buffers": sync})
        student = ddp(model, device_ids=[device.index] if device.type == "cuda" else None, **buffers,
                      find_unused_parameters=cfg.train.exact_resume)
    seed_everything(cfg.train.seed + dinfo.rank)
    teacher = None
    if cfg.method.enabled:
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
    copied_buffers = CopiedBuffers()
    optimizer = build_optimizer(student, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    dtype = amp_dtype(cfg, device)
    if dtype is not None and device.type == "cpu" and cpu_has_bf16() is False and dinfo.is_main:
        log.warning("solver.amp=bf16 on a CPU without bf16 instructions (AVX-512 BF16 or AMX): "
                    "its bf16 arithmetic is emulated and usually slower than float32 "
                    "(solver.amp=off)")
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    start, skipped, best, consumed, bad_in_row, empty_streak = 0, 0, -1.0, None, 0, 0
    was_grouped: bool | None = None
    teacher_evaluated = EvaluatedModel()
    # what a resumed run keeps of its start whatever the config says now: (section, key) ->
    # (value, what the run did with it)
    kept: dict[tuple[str, str], tuple[object, str]] = {}
    if path is not None:
        state = ckpt.load_checkpoint(path)
        ckpt.check_resumable(state, path)
        ckpt.check_compatible(state, cfg.fingerprint(), categories, path)
        if teacher is not None and state.get("teacher") is None:
            raise ckpt.CheckpointError(f"{path}: a supervised checkpoint has no teacher to resume; "
                                       f"start Soft Teacher from it with --weights instead")
        try:
            model.load_state_dict(state["student"])
            if teacher is not None:
                teacher.load_state_dict(state["teacher"])
        except (KeyError, RuntimeError) as e:
            raise ckpt.CheckpointError(f"{path}: weights do not fit this model: {e}") from None
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start, skipped = int(state["iteration"]), int(state.get("skipped_steps", 0))
        bad_in_row = int(state.get("bad_steps_in_row", 0))
        empty_streak = int(state.get("empty_pseudo_streak", 0))
        rngs = state.get("rng_per_rank") or [state["rng"]]  # one state ("rng") before several
        if len(rngs) == dinfo.world_size:
            ckpt.set_rng_state(rngs[dinfo.rank])
        else:  # another number of processes: each its own stream, the same for the same run
            seed = np.random.SeedSequence([cfg.train.seed, dinfo.rank, start]).generate_state(1)[0]
            seed_everything(int(seed))
        best = float(state.get("best_metric", -1.0))
        consumed = state.get("sampler_consumed_batches")
        # grouped or not as the run was, whatever the rules of another version make of its sets
        was_grouped = state.get("sampler_grouped")
        # the batches continue as the run drew them (checkpoints written before
        # data.group_by_aspect existed did not group), and evaluations as it made them, so that
        # its best checkpoint is chosen alike (in batches of 4 before train.eval_batch_size)
        kept = {("data", "group_by_aspect"): (bool(state.get("sampler_group_by_aspect", False)), "trained"),
                ("train", "eval_batch_size"):
                    (int(state.get("config", {}).get("train", {}).get("eval_batch_size", 4)), "evaluated")}
        # the optimizer's groups and the schedule's base rates come back as trained, and the
        # sampler's position counts batches of the run's size and ratio in its seed's order:
        # a new value of these would be written to config.yaml and not used, or skip samples
        for section, key in (("solver", "lr"), ("solver", "momentum"), ("solver", "weight_decay"),
                             ("train", "batch_size"), ("method", "sample_ratio"), ("train", "seed")):
            value = state.get("config", {}).get(section, {}).get(key)
            if value is not None:  # a key the checkpoint's config lacks: the current value
                kept[(section, key)] = (tuple(value) if isinstance(value, list) else value, "trained")
        log.info("resumed from %s at iteration %d (world size %d)", path, start, dinfo.world_size)

    max_iter = cfg.solver.max_iter
    if start > max_iter:
        other = (" (or move it away: a checkpoint of an earlier run in this folder, which --resume "
                 "takes as the newest)") if resume == "auto" else ""
        raise ckpt.CheckpointError(f"{path} is at iteration {start}, past solver.max_iter={max_iter}: "
                                   f"set solver.max_iter to more than {start} to train on from it{other}")
    if path is not None and start == max_iter:
        log.warning("%s is at solver.max_iter (%d): nothing to train (set solver.max_iter higher to "
                    "train on)", path, start)
        if dinfo.is_main:  # what a process stopped before its end left undone
            for p in manager.remove_partial():
                log.info("removed %s, a checkpoint left half-written", p)
            if not (out_dir / "model_final.pt").is_file():
                manager.copy_as(path, "model_final.pt")
        return TrainResult(out_dir, start, _final_metrics(out_dir, start), {}, skipped, model, teacher,
                           started_at=start)
    changed = {k: v for k, v in kept.items() if getattr(getattr(cfg, k[0]), k[1]) != v[0]}
    if changed:
        cfg = copy.deepcopy(cfg)
        for (section, key), (value, done_with) in changed.items():
            log.warning("%s was %s with %s.%s=%s; the resumed run keeps it", path, done_with,
                        section, key, value)
            setattr(getattr(cfg, section), key, value)
    if dinfo.is_main:  # once the data, the config and a resumed checkpoint are accepted
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(out_dir / "config.yaml", with_absolute_paths(cfg).to_yaml())
        for p in manager.remove_partial():
            log.info("removed %s, a checkpoint left half-written", p)
        later = manager.later(start)
        if later and resume not in (None, "auto"):  # an earlier checkpoint of the run, on purpose
            log.warning("%s: %d checkpoint(s) past iteration %d (%s) are replaced as this run reaches "
                        "their iterations; until then --resume without a path picks the newest of them",
                        out_dir, len(later), start, ", ".join(p.name for p in later[-3:]))
        elif later:  # kept, and replaced as this run reaches their iterations
            log.warning("%s: %d checkpoint(s) past iteration %d, of another run in this folder (%s); "
                        "--resume picks the newest checkpoint, so this run's own would be passed over "
                        "until it reaches them: move them away to keep them apart", out_dir, len(later),
                        start, ", ".join(p.name for p in later[-3:]))
        earlier = [n for n in ("model_final.pt", "model_best.pt", "final_metrics.json")
                   if path is None and (out_dir / n).is_file()]
        if earlier:
            log.warning("%s: %s of an earlier run in this folder stay until this run writes its own%s",
                        out_dir, ", ".join(earlier),
                        "" if data.val is not None else " (without a val set it writes model_final.pt only)")
    ratio = tuple(cfg.method.sample_ratio) if cfg.method.enabled else (cfg.train.batch_size, 0)
    groups = None
    if cfg.data.group_by_aspect:
        groups = tuple(None if ds is None else aspect_groups([r.width for r in ds.records],
                                                             [r.height for r in ds.records])
                       for ds in (data.labeled, data.unlabeled))
    sampler = MixedBatchSampler(len(data.labeled), len(data.unlabeled) if data.unlabeled else 0,
                                ratio=ratio, seed=cfg.train.seed, rank=dinfo.rank,
                                world_size=dinfo.world_size, start_iter=start, consumed_batches=consumed,
                                groups=groups, grouped=was_grouped if groups is not None else None)
    if was_grouped and not sampler.grouped and dinfo.is_main:
        log.warning("%s drew batches grouped by orientation; its sets now have one orientation (or "
                    "one a set lacks): the batches go on ungrouped, not as the run would have drawn "
                    "them", path)
    if cfg.data.group_by_aspect and not sampler.grouped:
        uneven = (f"the labeled and the unlabeled set hold wide and tall images in proportions so "
                  f"different that grouped batches would draw one orientation's images of a set "
                  f"{sampler.skew:.1f} times as often as the other's")
        log.info("data.group_by_aspect: batches are not grouped (%s)",
                 "as the run it resumes drew them" if was_grouped is False else uneven if sampler.skew > 1.0
                 else "the images have one orientation, or one that the labeled or the unlabeled set lacks")
    elif sampler.grouped and sampler.skew > 1.05:
        log.info("data.group_by_aspect: grouped batches draw one orientation's images of a set up to "
                 "%.2f times as often as the other's (the two sets' proportions differ)", sampler.skew)
    dataset = MixedDataset(data.labeled, data.unlabeled, cfg.augment, data.unlabeled_gt)
    loader = train_loader(dataset, sampler, cfg.data.num_workers, pin_memory=device.type == "cuda")
    step_fn = _step_function(cfg)
    logger = MetricLogger(out_dir, start, max_iter, progress, enabled=dinfo.is_main)
    report = cfg.method.report if teacher is not None else "student"
    logger.write(f"training {'Soft Teacher' if teacher is not None else 'supervised'} "
                 f"iterations {start}..{max_iter} on {device}"
                 f"{f' x {dinfo.world_size} processes' if dinfo.enabled else ''}; reported model: {report}; "
                 f"batches {'grouped' if sampler.grouped else 'not grouped'} by orientation"
                 f"{'' if data.val is not None else '; no val set (data.val), so no evaluation'}")
    m = cfg.model
    if path is not None:
        start_from = f"resumed from {path.name}"
    elif m.weights:
        start_from = f"from {m.weights}"
    elif m.backbone_weights or m.torchvision_weights:
        start_from = f"pretrained backbone {m.backbone_weights or m.torchvision_weights}"
    else:
        start_from = "from scratch"
    nhwc = ", NHWC memory" if resolve_channels_last(m) else ""
    logger.write(f"model: {m.backbone} FPN, norm {resolve_norm(m)}{nhwc}, "
                 f"{data.labeled.num_classes} classes, {start_from}; batch per process: {ratio[0]} labeled"
                 f"{f' + {ratio[1]} unlabeled' if teacher is not None else ''} images; output: {out_dir}")

    def state_at(done: int) -> dict | None:
        """The checkpoint on rank 0 (None elsewhere); every rank calls it, for its random state."""
        rngs = distributed.gather_objects(ckpt.rng_state())
        if rngs is None:
            return None
        return _checkpoint_state(cfg, data, student, teacher, optimizer, scheduler, scaler, done,
                                 skipped, best, sampler, rngs, bad_in_row, empty_streak)

    metrics: dict[str, float] = {}
    last: dict[str, float] = {}
    step_time = data_time = 0.0  # moving averages (weight 0.1) of the step and of its wait for data
    last_log = start
    # a resumed streak past the warning's length was warned of before the checkpoint
    empty_in_window, warned_empty = 0.0, 0 < cfg.train.warn_empty_iters <= empty_streak
    warned_nan_ap = False
    # labeled boxes the views kept and dropped (smaller than augment.min_box_size in the view)
    boxes_kept = boxes_dropped = 0
    warned_dropped = False
    # plain BatchNorm across processes keeps statistics of each rank's own images, which the EMA
    # would carry into the teachers; they stay one model, rank 0's statistics
    rank_bn = dinfo.enabled and resolve_norm(cfg.model) == "bn" and not cfg.model.sync_bn
    rank_statistics = teacher is not None and rank_bn
    student.train()
    batches = iter(loader)
    try:
        for iteration in range(start, max_iter):
            t0 = time.perf_counter()
            batch = next(batches)
            waited = time.perf_counter() - t0  # for the data loader: 0 when it keeps up
            boxes_kept += sum(len(t["boxes"]) for t in batch.labeled.targets)  # host tensors: no sync
            boxes_dropped += batch.labeled.dropped
            batch = batch.to(device)
            autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
            visuals: dict | None = {} if _is_period(iteration + 1, cfg.train.vis_period) and \
                teacher is not None and dinfo.is_main else None  # rank 0 draws them
            with autocast:
                loss, logs = step_fn(student=student, teacher=teacher, batch=batch, cfg=cfg,
                                     iteration=iteration, visuals=visuals,
                                     log=_is_log_step(iteration + 1, cfg.train.log_period, max_iter))
            if "unsup/empty_batch" in logs:
                empty_in_window = logs["unsup/empty_batch"] + empty_in_window
            if visuals and dinfo.is_main:
                picture = pseudo_label_picture(visuals, data.categories.names)
                save_image(out_dir / "pseudo_labels" / f"iter_{iteration + 1:07d}.jpg", picture,
                           quality=90)
                logger.image("pseudo_labels", picture, iteration + 1)
            optimizer.zero_grad(set_to_none=True)
            # backward is queued before the one host sync of the step (is the loss finite?), so an
            # accelerator runs it while the host waits; a non-finite step drops its gradients
            (scaler.scale(loss) if scaler is not None else loss).backward()
            finite = torch.isfinite(loss.detach())
            grad_norm = None
            if scaler is None:  # a finite loss may still give a non-finite gradient, which would
                # make every weight (and, through the EMA, the teacher's) NaN; a grad scaler skips
                # such steps itself, lowering its scale
                grad_norm = gradient_norm(student, cfg.solver.clip_grad_norm)
                finite = finite & torch.isfinite(grad_norm)
            if not distributed.all_true(finite, device):
                skipped += 1
                bad_in_row += 1
                values = {k: float(v) for k, v in logs.items()}
                # every rank skips; the log names the loss of each (rank 0 writes it)
                losses = distributed.gather_objects(float(loss.detach())) or []
                where = "" if len(losses) <= 1 else " (by rank: " + ", ".join(
                    f"{r}: {v:.4g}" for r, v in enumerate(losses)) + "; terms of rank 0)"
                value = float(loss.detach())
                norm = float("nan") if grad_norm is None else float(grad_norm)
                if not math.isfinite(value):
                    what = f"non-finite loss {value}"
                elif grad_norm is not None and not math.isfinite(norm):
                    what = f"non-finite gradient (norm {norm}) of the loss {value:.4g}"
                else:  # finite here: another process's loss or gradient was not
                    what = f"non-finite loss or gradient in another process (this one's loss {value:.4g})"
                logger.write(f"iteration {iteration}: {what}, step skipped "
                             f"({bad_in_row} in a row){where}: {values}", level=logging.WARNING)
                optimizer.zero_grad(set_to_none=True)
                if bad_in_row >= cfg.solver.max_bad_steps:
                    raise TrainingError(f"loss or its gradient non-finite for {bad_in_row} iterations in a "
                                        f"row at iteration {iteration}; last terms: {values}")
            else:
                bad_in_row = 0
                if scaler is not None:
                    scaler.unscale_(optimizer)
                    if cfg.solver.clip_grad_norm > 0:  # clipped as without a scaler, once unscaled
                        gradient_norm(student, cfg.solver.clip_grad_norm)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                if teacher is not None:
                    if cfg.method.use_ema:
                        # the student has taken iteration + 1 steps: the reference's update before
                        # its next iteration, whose ramp makes the teacher the mean of all so far
                        m = ema_momentum(iteration + 1, cfg.method.ema_momentum, cfg.method.ema_schedule,
                                         cfg.method.teacher_refresh)
                    else:
                        m = 0.0
                    ema_update(teacher, student, m, copy_buffers=cfg.method.ema_buffers == "copy",
                               copied=copied_buffers)
                    if rank_statistics:  # each rank's BatchNorm statistics: the teacher takes rank 0's
                        distributed.broadcast_buffers(teacher)
            lr_done = optimizer.param_groups[0]["lr"]  # this iteration's, logged
            with warnings.catch_warnings():
                # a skipped first step makes torch warn that the scheduler stepped before the optimizer
                warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
                scheduler.step()
            done = iteration + 1
            step_time = smoothed_time(step_time, time.perf_counter() - t0, done - start)
            data_time = smoothed_time(data_time, waited, done - start)

            if _is_log_step(done, cfg.train.log_period, max_iter):
                last = {k: float(v) for k, v in logs.items()}
                last["loss"] = float(loss.detach())
                last["lr"] = lr_done
                last["time/step_s"] = step_time
                last["time/data_s"] = data_time
                last["skipped_steps"] = skipped
                window = done - last_log
                last_log = done
                if boxes_kept + boxes_dropped:
                    last["data/dropped_box_fraction"] = boxes_dropped / (boxes_kept + boxes_dropped)
                if boxes_dropped and not boxes_kept and not warned_dropped:
                    warned_dropped = True
                    logger.write(f"iterations {done - window + 1}-{done}: every labeled box "
                                 f"({boxes_dropped}) was dropped from the training views, smaller than "
                                 f"augment.min_box_size={cfg.augment.min_box_size} px once resized: the "
                                 f"student learns background alone (lower augment.min_box_size, or "
                                 f"resize less: augment.train_short_side)", level=logging.WARNING)
                boxes_kept = boxes_dropped = 0
                if teacher is not None:
                    empty = float(empty_in_window)
                    last["unsup/empty_fraction"] = empty / window
                    empty_streak = empty_streak + window if empty == window else 0
                    empty_in_window = 0.0
                    if 0 < cfg.train.warn_empty_iters <= empty_streak and not warned_empty:
                        warned_empty = True
                        logger.write(f"no pseudo box above cls_pseudo_threshold="
                                     f"{cfg.method.cls_pseudo_threshold} for {empty_streak} iterations: "
                                     f"the strong views are all background to the student (the teacher is "
                                     f"not confident yet, or the threshold is too high)",
                                     level=logging.WARNING)
                    elif empty_streak == 0:
                        warned_empty = False
                logger.scalars(done, last)
                eta = step_time * (max_iter - done)
                logger.progress(window, {"loss": f"{last['loss']:.3f}", "lr": f"{last['lr']:.2g}",
                                         "s/it": f"{step_time:.2f}", "data": f"{data_time:.2f}",
                                         "eta": f"{eta / 60:.0f}min"},
                                done, max_iter)

            periodic_eval = _is_period(done, cfg.train.eval_period)
            if data.val is not None and (periodic_eval or done == max_iter):
                if rank_bn:  # every rank evaluates the student rank 0 saves, not its own statistics
                    distributed.broadcast_buffers(unwrap(student))
                metrics, times = {}, {}  # times: this rank's own, logged beside rank 0's metrics
                drawn: dict[str, list[dict]] = {}  # each model's results on the pictured image
                try:
                    for name, model in _eval_models(student, teacher, cfg).items():
                        # a teacher no step has written to since its last evaluation (frozen, or
                        # between refreshes) scores what it scored then; every rank agrees
                        if name == "teacher" and distributed.all_true(
                                teacher_evaluated.unchanged(model), device):
                            metrics.update({f"{name}/{k}": v for k, v in teacher_evaluated.metrics.items()})
                            logger.write(f"iteration {done}, {name}: unchanged since its evaluation at "
                                         f"iteration {teacher_evaluated.iteration}, whose metrics it keeps")
                            drawn[f"{name} (as at iteration {teacher_evaluated.iteration})"] = \
                                teacher_evaluated.drawn
                            continue
                        t_eval = time.perf_counter()
                        # a bar under the training one, gone when done
                        m_, results = evaluate(model, data.val, cfg, device, leave=False,
                                               progress=f"eval {name}" if logger.bar else None)
                        # the first image's alone: all of a large val set's would stay in memory
                        drawn[name] = [r for r in results if r["image_id"] == data.val.records[0].image_id]
                        t_eval = time.perf_counter() - t_eval  # inference and COCO scoring
                        metrics.update({f"{name}/{k}": v for k, v in m_.items()})
                        times[f"time/eval_{name}_s"] = t_eval
                        logger.write(f"iteration {done}, {name} ({len(data.val)} images in "
                                     f"{t_eval:.1f} s):\n{format_metrics(m_)}")
                        if name == "teacher":
                            teacher_evaluated.record(model, m_, done, drawn[name])
                except (Exception, KeyboardInterrupt):
                    # a val image that fails to decode (read only in part before the run) or a
                    # stop: keep what was trained, under a name --resume does not take (it
                    # would skip the evaluation that did not finish). One process only: the
                    # others' collectives could not be joined from here
                    if not dinfo.enabled:
                        kept = (out_dir / "model_final.pt" if done == max_iter
                                else manager.unevaluated(done))
                        try:
                            ckpt.save_checkpoint(kept, state_at(done))
                            log.warning("evaluation at iteration %d did not finish; the model trained "
                                        "so far is saved as %s (`softteacher eval` evaluates it; "
                                        "--resume continues from the newest checkpoint before it)",
                                        done, kept)
                        except Exception as e:
                            log.warning("evaluation at iteration %d did not finish, and the model "
                                        "trained so far could not be saved: %s", done, e)
                    raise
                logger.scalars(done, {**metrics, **times}, kind="eval")
                if dinfo.is_main and cfg.train.vis_period > 0 and drawn:
                    picture = val_prediction_picture(data.val, drawn)
                    save_image(out_dir / "val_predictions" / f"iter_{done:07d}.jpg", picture, quality=90)
                    logger.image("val_predictions", picture, done)
                if dinfo.is_main:
                    for p in manager.remove_unevaluated(upto=done):
                        log.info("removed %s: evaluated at iteration %d now", p, done)
                score = metrics.get(f"{report}/bbox_AP", -1.0)
                if score != score and not warned_nan_ap:  # NaN: a val set without one box
                    warned_nan_ap = True
                    logger.write(f"iteration {done}: the {report}'s AP on val is undefined (no box in "
                                 f"the val set to score against), so no model_best.pt is chosen; "
                                 f"model_final.pt is the run's model", level=logging.WARNING)
                if score > best:  # the same on every rank: the metrics are rank 0's, broadcast
                    best = score
                    saved = state_at(done)
                    if saved is not None:
                        ckpt.save_checkpoint(out_dir / "model_best.pt", saved)
                student.train()

            periodic_ckpt = _is_period(done, cfg.train.checkpoint_period)
            if periodic_ckpt or done == max_iter:
                saved = state_at(done)
                if saved is not None:
                    p = manager.save(done, saved)
                    if done == max_iter:
                        manager.copy_as(p, "model_final.pt")
    finally:
        logger.close()
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:  # persistent loader processes, held by the loader: end them now
            shutdown()
        del batches
    distributed.barrier()
    if metrics and dinfo.is_main:
        write_json(out_dir / "final_metrics.json", {"iteration": max_iter, "reported_model": report,
                                                     **metrics}, indent=2)
    return TrainResult(out_dir, max_iter, metrics, last, skipped, model, teacher, started_at=start)


# ----------------------------------------------------------------------------- checkpoints as models

def model_from_checkpoint(path: str | Path, which: str | None, device: torch.device,
                          state: dict | None = None) -> tuple[Detector, Config, CategoryMap, str]:
    """Build the detector stored in a checkpoint. ``which``: teacher | student | None (the
    model the checkpoint's config reports); ``state``: the checkpoint as already read from
    ``path``. On the CPU a ResNet under ``model.channels_last: auto`` detects in NHWC memory,
    whatever its normalisation. Returns (model in eval mode, config, classes, which)."""
    state = ckpt.load_checkpoint(path) if state is None else state
    for key, kind in (("config", dict), ("categories", list)):
        if not isinstance(state.get(key), kind):
            raise ckpt.CheckpointError(f"{path}: no {key!r} {kind.__name__} in the checkpoint, so no "
                                       f"model can be built from it")
    try:
        cfg = config_from_dict(state["config"])
        cats = CategoryMap.from_coco(state["categories"])
    except (KeyError, TypeError, ValueError) as e:
        raise ckpt.CheckpointError(f"{path}: unusable stored config or categories: {e}") from None
    which = which or state.get("report", "student")
    weights = state.get(which)
    if weights is None:
        why = (" (an exported model holds one model: its " + str(state.get("report")) + ")"
               if state.get("exported") else
               " (supervised checkpoints hold the student only)" if which == "teacher" else "")
        raise ckpt.CheckpointError(f"{path}: has no {which} weights{why}")
    # built as trained, without reading the files it started from: a pretrained backbone's
    # normalisation (norm auto) stays what it was trained with
    cfg.model.norm = resolve_norm(cfg.model)
    cfg.model.weights = cfg.model.backbone_weights = cfg.model.torchvision_weights = ""
    cfg.model.compile_backbone = ""  # a speed setting of the training machine's
    if (torch.device(device).type == "cpu" and cfg.model.channels_last == "auto"
            and cfg.model.backbone.startswith("resnet")):
        cfg.model.channels_last = "true"  # detecting, with no backward, NHWC is faster with GroupNorm too
    if torch.device(device).type == "cpu":
        cpu_ops.keep_freed_memory()
        cpu_ops.bound_operator_caches()
    model = build_detector(cfg.model, len(cats))
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ckpt.CheckpointError(f"{path}: weights do not fit the stored config: {e}") from None
    return model.to(device).eval(), cfg, cats, which


def export_model(src: str | Path, dst: str | Path, which: str | None = None,
                 replace: bool = False) -> dict[str, Any]:
    """Write the one model of checkpoint ``src`` that ``which`` names (default: the one its
    config reports) to ``dst`` with its config and classes, for ``eval``, ``predict`` and
    ``train --weights``: no other model, optimizer or random states. An existing ``dst`` is
    replaced only where ``replace`` says so.

    Returns what was written: model, iteration, bytes of ``src`` and ``dst``.
    Raises:
        CheckpointError: ``src`` unusable, or without that model; ``dst`` is ``src``.
        OSError: ``dst`` a folder, in a folder that is a file, or there (without ``replace``).
    """
    if Path(src).is_dir():
        raise ckpt.CheckpointError(f"{src}: a folder; export takes a checkpoint file (a run's "
                                   f"model_final.pt or model_best.pt, say)")
    if Path(dst).exists() and os.path.samefile(src, dst):
        raise ckpt.CheckpointError(f"{dst}: the checkpoint itself (or another name of it); export "
                                   f"writes another file")
    # refused before the checkpoint is read, and in the words of export
    if Path(dst).is_dir() or str(dst).endswith(("/", os.sep)):
        raise IsADirectoryError(errno.EISDIR, "a folder: --out names the file to write", str(dst))
    folder = next((p for p in Path(dst).absolute().parents if p.exists()), None)
    if folder is not None and not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{folder} is a file, not a folder", str(dst))
    if Path(dst).exists() and not replace:
        raise FileExistsError(errno.EEXIST, "there already (--force replaces it)", str(dst))
    state = ckpt.load_checkpoint(src)
    _, _, _, which = model_from_checkpoint(src, which, torch.device("cpu"), state)  # refused if no model
    keep = ("format", "iteration", "config", "fingerprint", "categories")
    exported = {**{k: state[k] for k in keep if k in state}, "exported": True, "report": which,
                which: state[which]}
    ckpt.save_checkpoint(dst, exported)
    return {"model": which, "iteration": state.get("iteration"),
            "bytes": (Path(src).stat().st_size, Path(dst).stat().st_size)}


def expand_images(items: list[str]) -> list[Path]:
    """Files, folders and globs -> unique image paths, absolute (links kept: a linked file is
    named as given, not after its target), in the order given.

    A folder gives what an unlabeled folder gives (``datasets.image_files``: regular files with
    an image suffix, recursive, hidden names skipped, sorted by relative path); a glob, the
    regular image files it matches (``*`` and ``**`` skip hidden names); a file, itself, and
    a path that is no glob, itself even where nothing is there (the caller reads each file and
    names the missing ones).
    """
    import glob

    found: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found += image_files(p)
        elif p.is_file() or not glob.has_magic(item):
            found.append(p)
        else:
            matches = [Path(m) for m in sorted(glob.glob(item, recursive=True))]
            if not matches:
                raise FileNotFoundError(f"{item}: no such image, folder or matching glob")
            found += [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES]
    seen: dict[Path, None] = {}
    for p in found:
        seen.setdefault(Path(os.path.abspath(p)), None)
    if not seen:
        raise FileNotFoundError(f"no images found in {items}")
    return list(seen)
