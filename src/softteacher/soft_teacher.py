"""One Soft Teacher training step (SPEC §1-4) over torchvision's detector parts.

The teacher (EMA of the student, eval mode, no gradients) labels the weak views; its
pseudo boxes are mapped into the student's strong views through the views' matrices;
the student learns from them with soft background weights (classification) and from
the box-jittering reliable boxes (regression). The arithmetic lives in ``method/``;
this module only runs the models and moves tensors between frames.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import accumulate

import torch
from torch import Tensor
from torchvision.models.detection.image_list import ImageList

from softteacher.config import Config, MethodConfig
from softteacher.data.loading import MixedBatch
from softteacher.detection import fastrcnn_losses, rows_of_images
from softteacher.ema import unwrap
from softteacher.geometry import clip_boxes, filter_boxes, keep_mask, relative_matrix, transform_boxes
from softteacher.method.box_jitter import box_jitter_reliability
from softteacher.method.pseudo_labels import (
    PseudoLabels,
    PseudoLabelSets,
    candidate_pseudo_labels_batch,
    pseudo_label_quality,
    pseudo_label_sets_batch,
    same_class_iou,
)
from softteacher.method.selection import kept_rows, to_device
from softteacher.method.soft_teacher import background_weights, combine_losses, soft_weighted_cls_loss
from softteacher.model import Detector, score_threshold

UNSUP_TERMS = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg")
#: where the pseudo boxes come from: the teacher (the method), or, as diagnostics, the unlabeled
#: images' hidden ground truth, all of it or the objects the teacher found, or the teacher's own
#: boxes less the false ones
PSEUDO_SOURCES = ("teacher", "ground_truth", "found_ground_truth", "true_teacher")


@dataclass
class TeacherPseudoLabels:
    """What the teacher says about one weak view (teacher frame)."""

    candidates: PseudoLabels  # detections with score > pseudo_threshold
    sets: PseudoLabelSets  # cls / rpn / reg subsets of the candidates
    reliability: Tensor  # (N,) box-jitter reliability of the candidates; NaN without jittering


def roi_outputs(model: Detector, features: dict[str, Tensor], boxes: list[Tensor],
                image_sizes: list[tuple[int, int]], owners: list[int] | None = None
                ) -> tuple[Tensor, Tensor]:
    """The RoI head on given boxes. Returns (class_logits (R, C+1), box_regression (R, (C+1)*4)),
    rows in the order of the concatenated ``boxes``; ``owners`` names the image of each box set
    (default: set k is image k)."""
    heads = model.roi_heads
    pooled = heads.box_roi_pool(features, boxes, image_sizes, owners)
    return heads.box_predictor(heads.box_head(pooled))


def refine_boxes(model: Detector, features: dict[str, Tensor], image_sizes: list[tuple[int, int]],
                 boxes: list[Tensor], labels: list[Tensor]) -> list[Tensor]:
    """Class-specific regression of ``model``'s RoI head applied to ``boxes`` (per image,
    (N_i, 4), in the features' frame) for their ``labels`` (N_i,). Returns refined (N_i, 4),
    clipped to each image's ``image_sizes`` (H, W) as the reference decodes them."""
    counts = [len(b) for b in boxes]
    if sum(counts) == 0:
        return [b.clone() for b in boxes]
    _, regression = roi_outputs(model, features, boxes, image_sizes)
    decoded = model.roi_heads.box_coder.decode(regression, boxes)  # (R, C+1, 4)
    flat_labels = torch.cat(labels)
    refined = decoded[torch.arange(len(flat_labels), device=decoded.device), flat_labels]
    limits = to_device(torch.tensor([[w, h, w, h] for h, w in image_sizes], dtype=refined.dtype),
                       refined.device)[rows_of_images(counts, refined.device)]
    return list(torch.minimum(refined.clamp(min=0.0), limits).split(counts))


@torch.no_grad()
def teacher_pseudo_boxes(teacher: Detector, weak: list[Tensor], method: MethodConfig,
                         generator: torch.Generator | None
                         ) -> tuple[list[TeacherPseudoLabels], ImageList, dict[str, Tensor]]:
    """Run the teacher on the weak views (its test-time NMS) and select pseudo boxes.

    Returns the pseudo boxes per image plus the teacher's batched images and features,
    reused to score the student's background proposals.
    """
    images = teacher.preprocess(weak)
    features = teacher.features(images)
    proposals, _ = teacher.rpn(images, features)
    # Only boxes that can become candidates go through the NMS: a box is suppressed by higher
    # scored boxes alone, so the survivors above the threshold are the same, for less work.
    floor = max(teacher.roi_heads.score_thresh, method.pseudo_threshold)
    with score_threshold(teacher, floor):
        detections, _ = teacher.roi_heads(features, proposals, images.image_sizes)
    cands = candidate_pseudo_labels_batch(detections, method.pseudo_threshold)
    if method.use_jitter:
        def refine(bxs: list[Tensor], lbls: list[Tensor]) -> list[Tensor]:
            return refine_boxes(teacher, features, images.image_sizes, bxs, lbls)

        reliabilities = box_jitter_reliability([c.boxes for c in cands], [c.labels for c in cands],
                                               refine, times=method.jitter_times,
                                               scale=method.jitter_scale, noise=method.jitter_noise,
                                               generator=generator)
    else:
        reliabilities = [torch.full_like(c.scores, float("nan")) for c in cands]
    sets = pseudo_label_sets_batch(cands, [r if method.use_jitter else None for r in reliabilities],
                                   cls_pseudo_threshold=method.cls_pseudo_threshold,
                                   rpn_pseudo_threshold=method.rpn_pseudo_threshold,
                                   reg_pseudo_threshold=method.reg_pseudo_threshold,
                                   reg_score_threshold=method.reg_score_threshold)
    out = [TeacherPseudoLabels(c, s, rel) for c, s, rel in zip(cands, sets, reliabilities)]
    return out, images, features


def view_matrices(weak_m: list[Tensor], strong_m: list[Tensor], device: torch.device
                  ) -> tuple[Tensor, Tensor]:
    """``(weak_to_strong, strong_to_weak)``: (B, 3, 3) float64 on ``device``.

    The B (3, 3) matrices original -> weak view and original -> strong view are inverted on
    the host (they are made there) and sent to the device in one copy that does not wait.
    """
    if not weak_m:
        empty = torch.zeros((0, 3, 3), dtype=torch.float64, device=device)
        return empty, empty
    weak = torch.stack([m.detach().cpu().to(torch.float64) for m in weak_m])
    strong = torch.stack([m.detach().cpu().to(torch.float64) for m in strong_m])
    both = to_device(torch.stack([relative_matrix(weak, strong), relative_matrix(strong, weak)]), device)
    return both[0], both[1]


def boxes_in_views(boxes: list[Tensor], matrices: Tensor, sizes: list[tuple[int, int]],
                   mode: str = "corners", owners: list[int] | None = None) -> Tensor:
    """Sets of boxes, each through its image's matrix and clipped to its image's view, in one
    pass over all of them (a fixed number of operations, whatever the number of images).

    Args:
        boxes: S tensors (N_s, 4) xyxy on one device, each in its image's source frame.
        matrices: (B, 3, 3) source -> target view of each image, on the boxes' device.
        sizes: (H, W) of each image's target view; boxes are clipped to ``[0, W] x [0, H]``.
        mode: how boxes move through rotate and shear (``geometry.transform_boxes``).
        owners: the image of each set (default: set s belongs to image s).
    Returns:
        (sum N_s, 4): the mapped boxes, the sets' rows one after the other.
    """
    owners = list(range(len(boxes))) if owners is None else owners
    counts = torch.tensor([len(b) for b in boxes], dtype=torch.int64)
    owner = torch.repeat_interleave(torch.tensor(owners, dtype=torch.int64), counts)
    bounds = torch.tensor([[w, h, w, h] for h, w in sizes], dtype=torch.float64).reshape(-1, 4)[owner]
    flat = torch.cat(boxes)
    # owner and bounds on the device in one copy that does not wait
    table = to_device(torch.cat([owner[:, None].to(torch.float64), bounds], dim=1), flat.device)
    mapped = transform_boxes(flat, matrices[table[:, 0].long()], mode)
    return torch.minimum(mapped.clamp(min=0), table[:, 1:].to(mapped.dtype))


def targets_in_strong(sets: list[list[PseudoLabels]], weak_to_strong: Tensor, sizes: list[tuple[int, int]],
                      min_size: float, mode: str = "corners") -> list[list[dict[str, Tensor]]]:
    """Pseudo boxes as detection targets in the strong views, with one wait for the device.

    Args:
        sets: per image, any number of pseudo-label sets (teacher frame).
        weak_to_strong: (B, 3, 3) weak view -> strong view of each image.
        sizes: (H, W) of each strong view; boxes are clipped to it and those narrower or lower
            than ``min_size`` afterwards (they left the view) are dropped with their labels.
        mode: how boxes move through rotate and shear (``geometry.transform_boxes``).
    Returns:
        ``targets[i][k] = {"boxes": (K, 4), "labels": (K,)}`` for set k of image i.
    """
    flat_sets = [p for image_sets in sets for p in image_sets]
    if not flat_sets:
        return [[] for _ in sets]
    owners = [i for i, image_sets in enumerate(sets) for _ in image_sets]
    counts = [len(p) for p in flat_sets]
    boxes = boxes_in_views([p.boxes for p in flat_sets], weak_to_strong, sizes, mode, owners)
    rows, kept = kept_rows(keep_mask(boxes, min_size), counts)
    labels = torch.cat([p.labels for p in flat_sets])[rows].split(kept)
    targets = iter([{"boxes": b, "labels": lab} for b, lab in zip(boxes[rows].split(kept), labels)])
    return [[next(targets) for _ in image_sets] for image_sets in sets]


def _zero(ref: Tensor) -> Tensor:
    return ref.sum() * 0.0


def _split_sets(values: list, sizes: list[int]) -> list[list]:
    """Consecutive runs of ``values``: ``sizes[k]`` of them for set k."""
    starts = list(accumulate(sizes, initial=0))
    return [values[a:b] for a, b in zip(starts, starts[1:])]


def student_losses(model: Detector, images: list[Tensor], targets: list[dict[str, Tensor]], *,
                   pseudo: list[TeacherPseudoLabels], teacher: Detector, teacher_images: ImageList,
                   teacher_features: dict[str, Tensor], weak_to_strong: Tensor, strong_to_weak: Tensor,
                   cfg: Config) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """The student's pass over the labeled images and the strong views, each head called once.

    The backbone, the RPN and the RoI head each run once over all images: the RPN's losses come
    per group (labeled images, strong views), and the RoIs of the ground truth and of the
    classification and regression pseudo boxes are sampled in one call and pooled in one pass,
    each set from its own image's proposals. Every term is the one the set alone would give.

    Args:
        images: the ``len(targets)`` labeled images followed by the strong views.
        targets: ground truth of the labeled images (view frame).
    Returns:
        (supervised terms, unsupervised terms before alpha, logs). A strong view without
        pseudo boxes is all background to the RPN's and the RoI classifier's unsupervised
        terms, even when no view of the batch has one (as in the reference); the regression
        term is exactly zero (with a graph) without regression pseudo boxes.
    """
    m, min_size, mode = cfg.method, cfg.augment.min_box_size, cfg.augment.box_mapping
    nl, nu = len(targets), len(pseudo)
    batch = model.preprocess(images)
    features = model.features(batch)
    strong_sizes = batch.image_sizes[nl:]
    mapped = targets_in_strong([[p.sets.rpn, p.sets.cls, p.sets.reg] for p in pseudo], weak_to_strong,
                               strong_sizes, min_size, mode)
    rpn_t, cls_t, reg_t = ([t[k] for t in mapped] for k in range(3))
    num_rpn, num_cls, num_reg = (sum(len(t["boxes"]) for t in ts) for ts in (rpn_t, cls_t, reg_t))
    anchor_ref = next(iter(features.values()))
    unsup = {k: _zero(anchor_ref) for k in UNSUP_TERMS}
    logs: dict[str, Tensor] = {}

    # RPN: group 0 the labeled images, group 1 the strong views; strong views without RPN pseudo
    # boxes are all background to it
    proposals, objectness, rpn_box = model.rpn.forward_grouped(
        batch, features, list(targets) + rpn_t, [0] * nl + [1] * nu)
    sup = {"loss_objectness": objectness[0], "loss_rpn_box_reg": rpn_box[0]}
    if nu > 0:
        unsup["loss_objectness"], unsup["loss_rpn_box_reg"] = objectness[1], rpn_box[1]

    # RoI sets: the labeled images' ground truth, then the classification and the regression
    # pseudo boxes of the strong views, each sampled from its own image's proposals (the
    # classification set also without pseudo boxes: its RoIs are then all background)
    strong = list(range(nl, nl + nu))
    sets = [(images_of_set, set_targets) for images_of_set, set_targets, n in (
        (list(range(nl)), list(targets), nl), (strong, cls_t, nu), (strong, reg_t, num_reg)) if n > 0]
    sup["loss_classifier"] = sup["loss_box_reg"] = _zero(anchor_ref)  # without labeled images
    if sets:
        owners = [i for images_of_set, _ in sets for i in images_of_set]
        boxes, _, labels, reg_targets, counts = model.roi_heads.sample_rois(
            [proposals[i] for i in owners], [t for _, set_targets in sets for t in set_targets])
        logits, regression = roi_outputs(model, features, list(boxes.split(counts)), batch.image_sizes,
                                         owners)
        counts_of_set = _split_sets(counts, [len(i) for i, _ in sets])  # rows of each image, set by set
        rows = [sum(c) for c in counts_of_set]
        boxes, labels, reg_targets, logits, regression = (
            x.split(rows) for x in (boxes, labels, reg_targets, logits, regression))
    k = 0
    if nl > 0:
        sup["loss_classifier"], sup["loss_box_reg"] = fastrcnn_losses(logits[0], regression[0], labels[0],
                                                                      reg_targets[0])
        k += 1
    if nu > 0:
        labels_c, logits_c = labels[k], logits[k]
        bg, bg_counts = kept_rows(labels_c == 0, counts_of_set[k])  # rows of the background RoIs
        bg_weights = torch.ones_like(labels_c, dtype=torch.float32)  # not rounded to bf16 under autocast
        if sum(bg_counts) and m.reliability != "none":
            weights = _background_weights(m.reliability, teacher, teacher_images, teacher_features,
                                          list(boxes[k][bg].split(bg_counts)), logits_c[bg].detach(),
                                          cls_t, strong_to_weak, mode)
            bg_weights = bg_weights.index_copy(0, bg, weights.float())
        unsup["loss_classifier"] = soft_weighted_cls_loss(logits_c, labels_c, bg_weights)
        logs["unsup/bg_weight_mean"] = bg_weights[bg].mean().detach() if sum(bg_counts) else \
            torch.tensor(float("nan"))
        k += 1
    if num_reg > 0:
        _, unsup["loss_box_reg"] = fastrcnn_losses(logits[k], regression[k], labels[k], reg_targets[k])

    n = max(nu, 1)
    # counts known on the host stay there: a copy to the device would wait for it
    logs["unsup/num_pseudo_cls"] = torch.tensor(num_cls / n)
    logs["unsup/num_pseudo_reg"] = torch.tensor(num_reg / n)
    logs["unsup/num_pseudo_rpn"] = torch.tensor(num_rpn / n)
    logs["unsup/empty_batch"] = torch.tensor(float(num_cls == 0))
    return sup, unsup, logs


def _background_weights(kind: str, teacher: Detector, teacher_images: ImageList,
                        teacher_features: dict[str, Tensor], bg_props: list[Tensor],
                        student_bg_logits: Tensor, cls_t: list[dict], strong_to_weak: Tensor,
                        mode: str = "corners") -> Tensor:
    """Weights of the background RoIs ``bg_props`` (per image, strong frame; their student
    logits ``student_bg_logits`` in concatenated order) for ``kind``."""
    teacher_logits = None
    if kind in ("bg_teacher", "pred_diff"):
        with torch.no_grad():
            in_teacher = list(boxes_in_views(bg_props, strong_to_weak, teacher_images.image_sizes,
                                             mode).split([len(b) for b in bg_props]))
            teacher_logits, _ = roi_outputs(teacher, teacher_features, in_teacher,
                                            teacher_images.image_sizes)
    pseudo_boxes = [t["boxes"] for t in cls_t]
    counts = [len(b) for b in bg_props]
    return background_weights(kind, teacher_logits=teacher_logits, student_logits=student_bg_logits,
                              proposals=bg_props, pseudo_boxes=pseudo_boxes, counts=counts)


def _ground_truth_in_weak_views(batch: MixedBatch, device: torch.device
                                ) -> list[tuple[Tensor, Tensor] | None]:
    """(boxes, labels) of the unlabeled pool's hidden ground truth in each weak view, clipped;
    None for an image it does not hold (every image without ``data.unlabeled_gt``)."""
    unl = batch.unlabeled
    gt_boxes = unl.gt_boxes or [None] * len(unl.weak)
    return [None if b is None else
            (clip_boxes(transform_boxes(b.to(device), wm.to(device)), tuple(weak.shape[-2:])), lab.to(device))
            for b, lab, wm, weak in zip(gt_boxes, unl.gt_labels or [None] * len(unl.weak),
                                        unl.weak_matrices, unl.weak)]


def ground_truth_pseudo_labels(batch: MixedBatch, device: torch.device,
                               source: str = "ground_truth") -> list[TeacherPseudoLabels]:
    """The unlabeled images' hidden ground truth in their weak views, as pseudo boxes that pass
    every threshold (score 1, reliability 0): the oracle of ``method.pseudo_source``."""
    gt = _ground_truth_in_weak_views(batch, device)
    if any(g is None for g in gt):  # load_data refuses such a set: a batch made without it
        raise ValueError(f"method.pseudo_source={source} needs the unlabeled pool's ground truth "
                         f"(data.unlabeled_gt) for every unlabeled image")
    out = []
    for boxes, labels in gt:
        boxes, keep = filter_boxes(boxes, 1.0)
        p = PseudoLabels(boxes, torch.ones(len(boxes), device=device), labels[keep])
        out.append(TeacherPseudoLabels(p, PseudoLabelSets(p, p, p), torch.zeros(len(boxes), device=device)))
    return out


def found_ground_truth(pseudo: list[TeacherPseudoLabels], oracle: list[TeacherPseudoLabels],
                       iou_threshold: float = 0.5) -> list[TeacherPseudoLabels]:
    """The ground-truth pseudo labels (``oracle``) of the objects the teacher found: those that
    one of the teacher's classification pseudo boxes of the same class overlaps with IoU >=
    ``iou_threshold``. The teacher's recall with exact boxes and no false ones: a diagnostic
    (``method.pseudo_source=found_ground_truth``) that separates what missed objects cost from
    what false and loose boxes cost. One teacher box may find several objects here, where
    ``pseudo_label_quality`` matches one to one; the two differ only where a box overlaps two
    objects of its class that much."""
    out = []
    for t, o in zip(pseudo, oracle):
        gt = o.sets.cls
        keep = _overlapping(gt, t.sets.cls, iou_threshold)
        p = PseudoLabels(gt.boxes[keep], gt.scores[keep], gt.labels[keep])
        out.append(TeacherPseudoLabels(p, PseudoLabelSets(p, p, p), o.reliability[keep]))
    return out


def true_teacher_boxes(pseudo: list[TeacherPseudoLabels], oracle: list[TeacherPseudoLabels],
                       iou_threshold: float = 0.5) -> list[TeacherPseudoLabels]:
    """The teacher's own pseudo labels less its false ones: among the candidates and in each
    set, the boxes that overlap an object of the hidden ground truth (``oracle``) of their class
    with IoU >= ``iou_threshold``, with the teacher's coordinates, scores and reliabilities. The
    counterpart of ``found_ground_truth`` with the teacher's loose boxes in place of exact ones
    (``method.pseudo_source=true_teacher``): between the two, what false boxes cost and what
    loose ones cost. A box counts as true when it overlaps any such object, by the same rule."""
    out = []
    for t, o in zip(pseudo, oracle):
        gt = o.sets.cls
        keep = _overlapping(t.candidates, gt, iou_threshold)
        sets = PseudoLabelSets(*(s.select(_overlapping(s, gt, iou_threshold)) for s in t.sets))
        out.append(TeacherPseudoLabels(t.candidates.select(keep), sets, t.reliability[keep]))
    return out


def _overlapping(boxes: PseudoLabels, others: PseudoLabels, iou_threshold: float) -> Tensor:
    """(N,) bool: which of ``boxes`` overlap one of ``others`` of their class with IoU >=
    ``iou_threshold``."""
    ious = same_class_iou(boxes.boxes, boxes.labels, others.boxes, others.labels)
    return (ious >= iou_threshold).any(1)


def _quality_logs(pseudo: list[TeacherPseudoLabels], batch: MixedBatch, device: torch.device
                  ) -> dict[str, Tensor]:
    """Precision and recall (IoU 0.5) of the classification pseudo boxes against the
    unlabeled pool's hidden ground truth, over the batch's images it holds (none: no logs)."""
    gt = _ground_truth_in_weak_views(batch, device)
    if all(g is None for g in gt):
        return {}
    tp = num_pred = num_gt = 0
    for p, known in zip(pseudo, gt):
        if known is None:
            continue
        gt_boxes, gt_labels = known
        t, n_p, n_g = pseudo_label_quality(p.sets.cls.boxes, p.sets.cls.labels, gt_boxes, gt_labels,
                                           pred_scores=p.sets.cls.scores)
        tp, num_pred, num_gt = tp + int(t), num_pred + int(n_p), num_gt + int(n_g)
    nan = float("nan")
    return {"pseudo/precision": torch.tensor(tp / num_pred if num_pred else nan),
            "pseudo/recall": torch.tensor(tp / num_gt if num_gt else nan)}


def soft_teacher_step(student, teacher: Detector, batch: MixedBatch, cfg: Config, iteration: int,
                      visuals: dict | None = None, log: bool = True, **_
                      ) -> tuple[Tensor, dict[str, Tensor]]:
    """Total loss ``L_sup + alpha * L_unsup`` for one mixed batch, and its logged terms.

    ``log=False`` (a step whose logs nobody reads) leaves out the diagnostics that need the
    host: the mean jitter reliability and the pseudo-label precision and recall. When
    ``visuals`` is a dict it receives the first unlabeled image's weak and strong views with
    the teacher's candidates (weak frame) and classification pseudo boxes (strong frame), for
    pictures.
    """
    lab, unl = batch.labeled, batch.unlabeled
    device = unwrap(student).pixel_mean.device
    generator = torch.Generator(device=device)
    # each process its own jitter noise (rank 0's as one process's); any seed in range
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    generator.manual_seed((cfg.train.seed * 1_000_003 + iteration + rank * 2**40) % 2**63)
    source = cfg.method.pseudo_source
    if source not in PSEUDO_SOURCES:
        raise ValueError(f"method.pseudo_source: {source!r} is not one of {', '.join(PSEUDO_SOURCES)}")
    # the ground-truth sources keep the teacher's features (soft weights) but not its boxes: no
    # jittering; true_teacher keeps the teacher's boxes, jittered as usual
    exact = source in ("ground_truth", "found_ground_truth")
    method = replace(cfg.method, use_jitter=False) if exact else cfg.method
    pseudo, t_images, t_features = teacher_pseudo_boxes(teacher, unl.weak, method, generator)
    if source == "ground_truth":
        pseudo = ground_truth_pseudo_labels(batch, device, source)
    elif source == "found_ground_truth":
        pseudo = found_ground_truth(pseudo, ground_truth_pseudo_labels(batch, device, source))
    elif source == "true_teacher":
        pseudo = true_teacher_boxes(pseudo, ground_truth_pseudo_labels(batch, device, source))
    weak_to_strong, strong_to_weak = view_matrices(unl.weak_matrices, unl.strong_matrices, device)
    sup, unsup, logs = student(lab.images + unl.strong, lab.targets, compute=student_losses,
                               pseudo=pseudo, teacher=teacher, teacher_images=t_images,
                               teacher_features=t_features, weak_to_strong=weak_to_strong,
                               strong_to_weak=strong_to_weak, cfg=cfg)
    total, terms = combine_losses(sup, unsup, cfg.method.unsup_weight)
    logs.update(terms)
    if log:
        rel = torch.cat([p.reliability for p in pseudo]) if pseudo else torch.zeros(0)
        rel = rel[torch.isfinite(rel)]
        logs["unsup/reliability_mean"] = rel.mean() if len(rel) else torch.tensor(float("nan"))
        logs.update(_quality_logs(pseudo, batch, device))
    if visuals is not None and len(unl):
        p = pseudo[0]
        strong = targets_in_strong([[p.sets.cls]], weak_to_strong[:1], [tuple(unl.strong[0].shape[-2:])],
                                   cfg.augment.min_box_size, cfg.augment.box_mapping)[0][0]
        visuals.update(weak=unl.weak[0].cpu(), strong=unl.strong[0].cpu(),
                       weak_boxes=p.candidates.boxes.cpu(), weak_labels=p.candidates.labels.cpu(),
                       weak_scores=p.candidates.scores.cpu(), strong_boxes=strong["boxes"].cpu(),
                       strong_labels=strong["labels"].cpu())
    return total, logs
