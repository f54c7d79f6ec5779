"""Selection of the teacher's detections into pseudo-label sets (SPEC §2, §4) and their quality.

All thresholds are strict: a score is kept when ``score > threshold`` (a score of exactly 0.9 is
*not* a classification pseudo box at ``cls_pseudo_threshold = 0.9``), a reliability when
``reliability < reg_pseudo_threshold``. NaN scores or reliabilities are never kept.

The three sets per image, all subsets of the candidates and all in the teacher (weak) frame:

- candidates: ``score > pseudo_threshold`` (0.5), the boxes that are jittered;
- classification (and RPN) pseudo boxes: ``score > cls_pseudo_threshold`` (0.9) and
  ``score > rpn_pseudo_threshold`` (0.9);
- regression pseudo boxes: ``jitter reliability < reg_pseudo_threshold`` (0.02); with jittering
  off (``--no-jitter``) the rule is ``score > cls_pseudo_threshold`` instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import box_iou

from softteacher.method.selection import kept_rows


@dataclass
class PseudoLabels:
    """Teacher detections of one image.

    Attributes:
        boxes: (N, 4) float, xyxy absolute pixels, teacher (weak) frame.
        scores: (N,) float, the teacher's class scores.
        labels: (N,) int64, classes 1..C (0 is background in torchvision).
    N == 0 is valid (tensors of shape (0, 4) and (0,)).
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.boxes.dim() != 2 or self.boxes.shape[-1] != 4:
            raise ValueError(f"PseudoLabels: boxes must be (N, 4), got {tuple(self.boxes.shape)}")
        n = self.boxes.shape[0]
        if self.scores.shape != (n,) or self.labels.shape != (n,):
            raise ValueError(f"PseudoLabels: scores {tuple(self.scores.shape)} and labels "
                             f"{tuple(self.labels.shape)} must both be ({n},)")

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def select(self, keep: Tensor) -> PseudoLabels:
        """The subset given by a (N,) bool mask or an int64 index tensor."""
        return PseudoLabels(self.boxes[keep], self.scores[keep], self.labels[keep])

    def to(self, device: torch.device | str) -> PseudoLabels:
        return PseudoLabels(self.boxes.to(device), self.scores.to(device), self.labels.to(device))


class PseudoLabelSets(NamedTuple):
    """The pseudo-label sets of one image drawn from its candidates (teacher frame)."""

    cls: PseudoLabels  # RoI classification targets: score > cls_pseudo_threshold
    rpn: PseudoLabels  # RPN targets: score > rpn_pseudo_threshold
    reg: PseudoLabels  # RoI regression targets: reliability < reg_pseudo_threshold (or score)


def score_mask(scores: Tensor, threshold: float) -> Tensor:
    """``scores > threshold`` (strict). scores: (N,) float. Returns (N,) bool; (0,) for N == 0.

    The comparison runs in the scores' dtype, so a float32 score of 0.9 is not kept at 0.9.
    """
    return scores > threshold


def select_by_score(boxes: Tensor, scores: Tensor, labels: Tensor,
                    threshold: float) -> PseudoLabels:
    """The detections with ``score > threshold`` (strict).

    Args:
        boxes: (N, 4) float xyxy; scores: (N,) float; labels: (N,) int64. Any frame, any device.
        threshold: score threshold.
    Returns:
        PseudoLabels with the kept rows, order preserved. N == 0 gives an empty PseudoLabels.
    """
    return PseudoLabels(boxes, scores, labels).select(score_mask(scores, threshold))


def candidate_pseudo_labels(boxes: Tensor, scores: Tensor, labels: Tensor,
                            pseudo_threshold: float = 0.5) -> PseudoLabels:
    """Candidates: the teacher's detections (after NMS) with score > ``pseudo_threshold``."""
    return select_by_score(boxes, scores, labels, pseudo_threshold)


def classification_pseudo_labels(candidates: PseudoLabels,
                                 cls_pseudo_threshold: float = 0.9) -> PseudoLabels:
    """Classification pseudo boxes: candidates with score > ``cls_pseudo_threshold``."""
    return candidates.select(score_mask(candidates.scores, cls_pseudo_threshold))


def rpn_pseudo_labels(candidates: PseudoLabels, rpn_pseudo_threshold: float = 0.9) -> PseudoLabels:
    """RPN pseudo boxes: candidates with score > ``rpn_pseudo_threshold``."""
    return candidates.select(score_mask(candidates.scores, rpn_pseudo_threshold))


def regression_mask(scores: Tensor, reliability: Tensor | None, reg_pseudo_threshold: float = 0.02,
                    cls_pseudo_threshold: float = 0.9, reg_score_threshold: float = 0.0) -> Tensor:
    """Which candidates are regression pseudo boxes.

    Args:
        scores: (N,) float candidate scores.
        reliability: (N,) float box-jitter reliability (see ``box_jitter.jitter_reliability``,
            lower is more reliable), or None when jittering is off.
        reg_pseudo_threshold: kept when ``reliability < reg_pseudo_threshold`` (strict).
        cls_pseudo_threshold: without jittering, kept when ``score > cls_pseudo_threshold``.
        reg_score_threshold: with jittering, kept only when ``score > reg_score_threshold`` as
            well. 0, the reference's rule, adds no floor to the candidates' own (SPEC §4); a
            diagnostic knob that keeps steady boxes of a doubtful class out of the set.
    Returns:
        (N,) bool. NaN reliabilities are not kept. N == 0 gives (0,).
    """
    if reliability is None:
        return score_mask(scores, cls_pseudo_threshold)
    if reliability.shape != scores.shape:
        raise ValueError(f"regression_mask: reliability {tuple(reliability.shape)} and scores "
                         f"{tuple(scores.shape)} must have the same shape")
    steady = reliability < reg_pseudo_threshold
    return steady & score_mask(scores, reg_score_threshold) if reg_score_threshold > 0 else steady


def regression_pseudo_labels(candidates: PseudoLabels, reliability: Tensor | None,
                             reg_pseudo_threshold: float = 0.02, cls_pseudo_threshold: float = 0.9,
                             reg_score_threshold: float = 0.0) -> PseudoLabels:
    """Regression pseudo boxes: candidates with reliability < ``reg_pseudo_threshold`` (and
    score > ``reg_score_threshold``), or with score > ``cls_pseudo_threshold`` when
    ``reliability`` is None (jittering off)."""
    return candidates.select(regression_mask(candidates.scores, reliability, reg_pseudo_threshold,
                                             cls_pseudo_threshold, reg_score_threshold))


def pseudo_label_masks(candidates: PseudoLabels, reliability: Tensor | None = None, *,
                       cls_pseudo_threshold: float = 0.9, rpn_pseudo_threshold: float = 0.9,
                       reg_pseudo_threshold: float = 0.02,
                       reg_score_threshold: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Which candidates of one image enter the classification, RPN and regression sets.

    Returns:
        Three (N,) bool masks (cls, rpn, reg) over the candidates; see :func:`pseudo_label_sets`.
    """
    return (score_mask(candidates.scores, cls_pseudo_threshold),
            score_mask(candidates.scores, rpn_pseudo_threshold),
            regression_mask(candidates.scores, reliability, reg_pseudo_threshold, cls_pseudo_threshold,
                            reg_score_threshold))


def pseudo_label_sets(candidates: PseudoLabels, reliability: Tensor | None = None, *,
                      cls_pseudo_threshold: float = 0.9, rpn_pseudo_threshold: float = 0.9,
                      reg_pseudo_threshold: float = 0.02,
                      reg_score_threshold: float = 0.0) -> PseudoLabelSets:
    """The classification, RPN and regression sets of one image's candidates.

    Args:
        candidates: the image's candidates (score > pseudo_threshold), teacher frame.
        reliability: (N,) jitter reliability of the candidates, or None without jittering.
    Returns:
        PseudoLabelSets(cls, rpn, reg), each possibly empty.
    """
    return pseudo_label_sets_batch([candidates], [reliability], cls_pseudo_threshold=cls_pseudo_threshold,
                                   rpn_pseudo_threshold=rpn_pseudo_threshold,
                                   reg_pseudo_threshold=reg_pseudo_threshold,
                                   reg_score_threshold=reg_score_threshold)[0]


def _concat(images: Sequence[PseudoLabels]) -> PseudoLabels:
    return PseudoLabels(torch.cat([p.boxes for p in images]), torch.cat([p.scores for p in images]),
                        torch.cat([p.labels for p in images]))


def _select_per_image(flat: PseudoLabels, masks: Sequence[Tensor], counts: list[int]
                      ) -> list[list[PseudoLabels]]:
    """For each mask over ``flat`` (the rows of B images laid end to end, ``counts[i]`` rows
    for image i), the kept rows of every image: ``out[k][i]``. One wait for the device and a
    fixed number of operators, whatever the number of images."""
    b, n = len(counts), len(flat)
    rows, kept = kept_rows(torch.cat(list(masks)), counts * len(masks))
    out = []
    for k, r in enumerate(rows.split([sum(kept[j * b:(j + 1) * b]) for j in range(len(masks))])):
        chosen = flat.select(r - k * n if k else r)
        sizes = kept[k * b:(k + 1) * b]
        out.append([PseudoLabels(*t) for t in zip(chosen.boxes.split(sizes), chosen.scores.split(sizes),
                                                  chosen.labels.split(sizes))])
    return out


def pseudo_label_sets_batch(candidates: Sequence[PseudoLabels], reliabilities: Sequence[Tensor | None],
                            **thresholds: float) -> list[PseudoLabelSets]:
    """:func:`pseudo_label_sets` of every image of a batch, reading the device once.

    Args:
        candidates: B images' candidates; reliabilities: B (N_i,) tensors or None.
        thresholds: ``cls_pseudo_threshold``, ``rpn_pseudo_threshold``, ``reg_pseudo_threshold``
            and optionally ``reg_score_threshold``.
    Returns:
        B PseudoLabelSets, in order.
    """
    if len(candidates) != len(reliabilities):
        raise ValueError(f"pseudo_label_sets_batch: {len(candidates)} candidate sets but "
                         f"{len(reliabilities)} reliabilities")
    if not candidates:
        return []
    flat = _concat(candidates)
    if all(r is None for r in reliabilities):
        masks = pseudo_label_masks(flat, None, **thresholds)
    elif all(r is not None for r in reliabilities):
        masks = pseudo_label_masks(flat, torch.cat(list(reliabilities)), **thresholds)
    else:  # some images jittered, some not: each by its own rule
        per_image = [pseudo_label_masks(c, r, **thresholds) for c, r in zip(candidates, reliabilities)]
        masks = tuple(torch.cat(list(m)) for m in zip(*per_image))
    sets = _select_per_image(flat, masks, [len(c) for c in candidates])
    return [PseudoLabelSets(*image_sets) for image_sets in zip(*sets)]


def candidate_pseudo_labels_batch(detections: Sequence[dict[str, Tensor]],
                                  pseudo_threshold: float = 0.5) -> list[PseudoLabels]:
    """:func:`candidate_pseudo_labels` of every image's detections (torchvision's ``boxes``,
    ``scores``, ``labels``), reading the device once."""
    if not detections:
        return []
    flat = _concat([PseudoLabels(d["boxes"], d["scores"], d["labels"]) for d in detections])
    return _select_per_image(flat, [score_mask(flat.scores, pseudo_threshold)],
                             [len(d["scores"]) for d in detections])[0]


def same_class_iou(boxes: Tensor, labels: Tensor, other_boxes: Tensor, other_labels: Tensor) -> Tensor:
    """(N, M) IoU of N boxes with M others (float32, on the first boxes' device), -1 where their
    classes differ: what matching by IoU within a class compares."""
    ious = box_iou(boxes.float(), other_boxes.float().to(boxes.device))
    same = labels[:, None] == other_labels.to(labels.device)[None, :]
    return torch.where(same, ious, torch.full_like(ious, -1.0))


def match_to_ground_truth(pred_boxes: Tensor, pred_labels: Tensor, gt_boxes: Tensor,
                          gt_labels: Tensor, iou: float = 0.5,
                          pred_scores: Tensor | None = None) -> Tensor:
    """Greedy class-aware matching of pseudo boxes to ground truth, as in COCO evaluation.

    Predictions are visited in order of decreasing ``pred_scores`` (in the given order when None,
    e.g. the teacher's score-sorted output); each takes the still-unmatched ground-truth box of
    the same class with the highest IoU, provided that IoU is >= ``iou`` (COCO's inclusive
    convention). Each ground-truth box is matched at most once.

    Args:
        pred_boxes: (P, 4) float xyxy; pred_labels: (P,) int64.
        gt_boxes: (G, 4) float xyxy in the same frame; gt_labels: (G,) int64.
        iou: IoU threshold (0.5).
        pred_scores: optional (P,) float used to order the predictions.
    Returns:
        (P,) int64 on the CPU, in the predictions' input order: the index of the ground-truth
        box each prediction matches, -1 for none.
    """
    return _greedy_match(same_class_iou(pred_boxes, pred_labels, gt_boxes, gt_labels).cpu(), iou,
                         pred_scores)


def _greedy_match(ious: Tensor, iou: float, pred_scores: Tensor | None) -> Tensor:
    """:func:`match_to_ground_truth` on its (P, G) same-class IoU matrix (CPU, -1 across classes)."""
    num_pred, num_gt = ious.shape
    matches = torch.full((num_pred,), -1, dtype=torch.long)
    if num_pred == 0 or num_gt == 0:
        return matches
    order = (torch.argsort(pred_scores, descending=True, stable=True).cpu() if pred_scores is not None
             else torch.arange(num_pred))
    taken = torch.zeros(num_gt, dtype=torch.bool)
    for k in order.tolist():  # P is small (tens of pseudo boxes per image)
        row = ious[k].masked_fill(taken, -1.0)
        best = int(row.argmax())
        if row[best] >= iou:
            taken[best] = True
            matches[k] = best
    return matches


def pseudo_label_quality(pred_boxes: Tensor, pred_labels: Tensor, gt_boxes: Tensor,
                         gt_labels: Tensor, iou: float = 0.5,
                         pred_scores: Tensor | None = None) -> tuple[int, int, int]:
    """True positives of pseudo boxes against ground truth, for precision and recall.

    The matching is :func:`match_to_ground_truth`'s; each ground-truth box is matched at most
    once, so duplicates count as false positives.

    Returns:
        ``(tp, num_pred, num_gt)`` as Python ints; precision = tp / num_pred,
        recall = tp / num_gt. Empty predictions or ground truth give tp = 0.
    """
    matches = match_to_ground_truth(pred_boxes, pred_labels, gt_boxes, gt_labels, iou, pred_scores)
    return int((matches >= 0).sum()), int(pred_boxes.shape[0]), int(gt_boxes.shape[0])


FALSE_BOX_KINDS = ("duplicate", "wrong_class", "loose", "background")


def false_box_kinds(pred_boxes: Tensor, pred_labels: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
                    iou: float = 0.5, pred_scores: Tensor | None = None,
                    low: float = 0.1) -> tuple[list[str], Tensor]:
    """What each pseudo box is, after :func:`match_to_ground_truth`: the error kinds of the
    COCO detection analysis, checked in this order for a box that matched nothing:

    - ``duplicate``: IoU >= ``iou`` with an object of its class that a higher-scored box took;
    - ``wrong_class``: IoU >= ``iou`` with an object of another class;
    - ``loose``: IoU >= ``low`` (0.1) with an object of its class (badly placed);
    - ``wrong_class`` too: IoU >= ``low`` with an object of another class only;
    - ``background``: IoU < ``low`` with every object (clutter, texture).

    Args as :func:`match_to_ground_truth`.
    Returns:
        (kinds, other_labels): per prediction, in input order, ``"true"`` or one of
        ``FALSE_BOX_KINDS``; and (P,) int64 on the CPU, the class of the other-class object a
        ``wrong_class`` box overlaps most (0 for the other kinds).
    """
    num_pred = int(pred_boxes.shape[0])
    other_labels = torch.zeros(num_pred, dtype=torch.long)
    if num_pred == 0:
        return [], other_labels
    if gt_boxes.shape[0] == 0:
        return ["background"] * num_pred, other_labels
    ious = box_iou(pred_boxes.float(), gt_boxes.float().to(pred_boxes.device)).cpu()  # (P, G)
    same = pred_labels.cpu()[:, None] == gt_labels.cpu()[None, :]
    ious_same = ious.masked_fill(~same, -1.0)
    matches = _greedy_match(ious_same, iou, pred_scores)
    best_same = ious_same.max(dim=1).values
    best_other, which_other = ious.masked_fill(same, -1.0).max(dim=1)
    kinds = []
    for k in range(num_pred):
        if matches[k] >= 0:
            kind = "true"
        elif best_same[k] >= iou:
            kind = "duplicate"
        elif best_other[k] >= iou:
            kind = "wrong_class"
        elif best_same[k] >= low:
            kind = "loose"
        elif best_other[k] >= low:
            kind = "wrong_class"
        else:
            kind = "background"
        if kind == "wrong_class":
            other_labels[k] = gt_labels.cpu()[which_other[k]]
        kinds.append(kind)
    return kinds, other_labels


MISSED_OBJECT_KINDS = ("low_score", "wrong_class", "loose", "not_detected")


def missed_object_kinds(cand_boxes: Tensor, cand_labels: Tensor, cand_scores: Tensor, keep: Tensor,
                        gt_boxes: Tensor, gt_labels: Tensor, iou: float = 0.5,
                        low: float = 0.1) -> list[str]:
    """Why the pseudo boxes miss an object: for each ground-truth box that the kept candidates
    (the pseudo boxes) do not match (:func:`match_to_ground_truth`), the first that holds of

    - ``low_score``: a candidate of its class that was not kept overlaps it with IoU >= ``iou``
      (the teacher has it, below the threshold);
    - ``wrong_class``: a kept candidate of another class overlaps it with IoU >= ``iou``;
    - ``loose``: a kept candidate of its class overlaps it with IoU >= ``low`` (0.1);
    - ``not_detected``: none of these.

    Args:
        cand_boxes: (C, 4) float xyxy; cand_labels: (C,) int64; cand_scores: (C,) float.
        keep: (C,) bool, the candidates that are pseudo boxes.
        gt_boxes: (G, 4) float xyxy in the same frame; gt_labels: (G,) int64.
    Returns:
        per ground-truth box, ``"found"`` or one of ``MISSED_OBJECT_KINDS``.
    """
    num_gt = int(gt_boxes.shape[0])
    if num_gt == 0:
        return []
    keep = keep.cpu()
    ious = box_iou(gt_boxes.float(), cand_boxes.float().to(gt_boxes.device)).cpu()  # (G, C)
    same = gt_labels.cpu()[:, None] == cand_labels.cpu()[None, :]
    matches = _greedy_match(ious.masked_fill(~same, -1.0)[:, keep].T, iou, cand_scores.cpu()[keep])
    found = torch.zeros(num_gt, dtype=torch.bool)
    found[matches[matches >= 0]] = True
    low_score = ((ious >= iou) & same & ~keep).any(1)
    wrong_class = ((ious >= iou) & ~same & keep).any(1)
    loose = ((ious >= low) & same & keep).any(1)
    kinds = []
    for g in range(num_gt):
        kinds.append("found" if found[g] else "low_score" if low_score[g] else
                     "wrong_class" if wrong_class[g] else "loose" if loose[g] else "not_detected")
    return kinds
