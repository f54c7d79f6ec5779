"""Soft Teacher's classification loss on unlabeled images and its reliability weights (SPEC §3).

The student's sampled RoIs (assigned against the classification pseudo boxes) get a
cross-entropy each; foreground RoIs weigh 1, background RoI j weighs a reliability ``r_j`` in
[0, 1], and the loss is ``sum_i w_i CE_i / max(sum_i w_i, 1)`` (SPEC §10).

Class layout: torchvision's box predictor puts **background in column 0** of the
(R, C+1) logits (label 0), foreground classes in columns 1..C. SPEC's "last softmax column" is
mmdetection's layout (background = column C); here the background probability is
``softmax(logits)[:, 0]``.

Reliability indicators (paper Table 8), one weight per background RoI, all in [0, 1]:

- ``bg_teacher`` (default): the teacher's background probability for the RoI mapped into the
  teacher's view, ``softmax(teacher_logits)[:, 0]``.
- ``bg_student``: the same from the student's own (detached) logits.
- ``pred_diff``: agreement of the two on background, ``1 - |p_teacher_bg - p_student_bg|``.
- ``iou``: ``1 - max_k IoU(RoI, pseudo_k)`` over the image's classification pseudo boxes: a
  "background" RoI overlapping a pseudo box is less reliable background (1 without pseudo box).
- ``reverse_iou``: ``1 - max_k area(RoI ∩ pseudo_k) / area(pseudo_k)``, i.e. one minus how much
  of a pseudo box lies inside the RoI (intersection over the pseudo box's area).
- ``none``: all weights 1 (hard pseudo labels).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_area, box_iou

INDICATORS = ("bg_teacher", "bg_student", "pred_diff", "iou", "reverse_iou", "none")


def soft_weighted_cls_loss(logits: Tensor, targets: Tensor,
                           bg_weights: Tensor | None = None) -> Tensor:
    """Soft-weighted RoI classification loss ``sum w CE / max(sum w, 1)``.

    Args:
        logits: (R, C+1) float, the student's class logits of its sampled RoIs (column 0 =
            background).
        targets: (R,) int64 in 0..C, 0 = background.
        bg_weights: (R,) float; only the entries of background RoIs are used (foreground RoIs
            weigh 1 whatever is there). Detached. None means all 1 (hard labels).
    Returns:
        Scalar in logits' dtype (float32 under autocast, as cross-entropy). R == 0 gives an exact
        0 that still belongs to logits' graph (backward gives zero gradients).
    """
    if logits.dim() != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(f"soft_weighted_cls_loss: logits must be (R, C+1) and targets (R,), got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    if bg_weights is not None and bg_weights.shape != targets.shape:
        raise ValueError(f"soft_weighted_cls_loss: bg_weights {tuple(bg_weights.shape)} must be "
                         f"{tuple(targets.shape)}")
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits, targets, reduction="none")  # (R,)
    weights = torch.ones_like(ce)
    if bg_weights is not None:
        bg = targets == 0
        weights = torch.where(bg, bg_weights.detach().to(ce.dtype), weights)
    return (weights * ce).sum() / weights.sum().clamp(min=1.0)


def background_probability(logits: Tensor) -> Tensor:
    """Softmax probability of the background class (column 0, torchvision layout).

    Args:
        logits: (R, C+1) float class logits.
    Returns:
        (R,) float32, detached, in [0, 1]. R == 0 gives (0,).
    """
    if logits.dim() != 2:
        raise ValueError(f"background_probability: logits must be (R, C+1), got "
                         f"{tuple(logits.shape)}")
    return logits.detach().float().softmax(dim=-1)[:, 0]


def prediction_difference_weights(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """``1 - |p_teacher_bg - p_student_bg|`` per RoI.

    Args:
        teacher_logits, student_logits: (R, C+1) float, same RoIs in the same order.
    Returns:
        (R,) float32 in [0, 1], detached; 1 where the two agree on background.
    """
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"prediction_difference_weights: teacher logits "
                         f"{tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} differ")
    p_t = background_probability(teacher_logits)
    p_s = background_probability(student_logits).to(p_t.device)
    return 1.0 - (p_t - p_s).abs()


def _intersection(a: Tensor, b: Tensor) -> Tensor:
    """(A, 4), (B, 4) xyxy -> (A, B) intersection areas."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def overlap_weights(proposals: Sequence[Tensor], pseudo_boxes: Sequence[Tensor],
                    mode: str = "iou") -> Tensor:
    """``1 - max_k overlap(RoI, pseudo_k)`` per background RoI, image by image.

    Args:
        proposals: B tensors (N_i, 4) float xyxy, the background RoIs of each image.
        pseudo_boxes: B tensors (K_i, 4) float xyxy, each image's classification pseudo boxes,
            in the same frame as its proposals.
        mode: ``"iou"`` (intersection over union) or ``"reverse_iou"`` (intersection over the
            pseudo box's area, clamped > 0).
    Returns:
        (sum N_i,) float32 in [0, 1], the images' RoIs concatenated in order, detached; weight 1
        for the RoIs of an image without pseudo boxes; (0,) when there is no RoI.
    """
    if len(proposals) != len(pseudo_boxes):
        raise ValueError(f"overlap_weights: {len(proposals)} proposal tensors but "
                         f"{len(pseudo_boxes)} pseudo box tensors")
    if mode not in ("iou", "reverse_iou"):
        raise ValueError(f"overlap_weights: unknown mode {mode!r}; known: iou, reverse_iou")
    out = []
    with torch.no_grad():
        for props, pseudo in zip(proposals, pseudo_boxes):
            props = props.detach().float()
            pseudo = pseudo.detach().float().to(props.device)
            if props.shape[0] == 0 or pseudo.shape[0] == 0:
                out.append(props.new_ones(props.shape[0]))
                continue
            if mode == "iou":
                overlap = box_iou(props, pseudo)
            else:
                overlap = _intersection(props, pseudo) / box_area(pseudo).clamp(min=1e-6)[None]
            out.append(1.0 - overlap.max(dim=1).values.clamp(0.0, 1.0))
    if not out:
        return torch.zeros(0)
    return torch.cat(out)


def background_weights(kind: str, *, teacher_logits: Tensor | None = None,
                       student_logits: Tensor | None = None,
                       proposals: Sequence[Tensor] | None = None,
                       pseudo_boxes: Sequence[Tensor] | None = None,
                       counts: Sequence[int] | None = None) -> Tensor:
    """Per-background-RoI weights r_j for the reliability indicator ``kind``.

    All row-wise inputs describe the same background RoIs in the same order (images
    concatenated in order).

    Args:
        kind: one of ``INDICATORS`` (see the module docstring for each definition).
        teacher_logits: (R, C+1) teacher class logits of the RoIs mapped into the teacher's view;
            needed by ``bg_teacher`` and ``pred_diff``.
        student_logits: (R, C+1) student class logits of the RoIs (detached here); needed by
            ``bg_student`` and ``pred_diff``.
        proposals: B tensors (N_i, 4), the RoIs per image; needed by ``iou``/``reverse_iou``.
        pseudo_boxes: B tensors (K_i, 4) classification pseudo boxes per image, same frame as
            ``proposals``; needed by ``iou``/``reverse_iou``.
        counts: optional N_i per image, checked against the other inputs (and used for the
            length R of ``none``).
    Returns:
        (R,) float32 in [0, 1], detached. R == 0 gives (0,).
    Raises:
        ValueError: unknown kind (the message lists the known ones), a missing input, or inputs
            whose row counts disagree.
    """
    if kind not in INDICATORS:
        raise ValueError(f"unknown reliability indicator {kind!r}; known: {', '.join(INDICATORS)}")
    needs = {"bg_teacher": ("teacher_logits",), "bg_student": ("student_logits",),
             "pred_diff": ("teacher_logits", "student_logits"),
             "iou": ("proposals", "pseudo_boxes"), "reverse_iou": ("proposals", "pseudo_boxes"),
             "none": ()}[kind]
    given = {"teacher_logits": teacher_logits, "student_logits": student_logits,
             "proposals": proposals, "pseudo_boxes": pseudo_boxes}
    for name in needs:
        if given[name] is None:
            raise ValueError(f"background_weights({kind!r}) needs {name}")
    sizes = {name: n for name, n in (
        ("counts", None if counts is None else sum(counts)),
        ("proposals", None if proposals is None else sum(int(p.shape[0]) for p in proposals)),
        ("teacher_logits", None if teacher_logits is None else teacher_logits.shape[0]),
        ("student_logits", None if student_logits is None else student_logits.shape[0]),
    ) if n is not None}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"background_weights: inputs disagree on the number of RoIs: {sizes}")

    if kind == "bg_teacher":
        return background_probability(teacher_logits)
    if kind == "bg_student":
        return background_probability(student_logits)
    if kind == "pred_diff":
        return prediction_difference_weights(teacher_logits, student_logits)
    if kind in ("iou", "reverse_iou"):
        return overlap_weights(proposals, pseudo_boxes, mode=kind)
    # none: hard pseudo labels
    if not sizes:
        raise ValueError("background_weights('none') needs counts, proposals or logits to know R")
    ref = next((t for t in (teacher_logits, student_logits) if t is not None), None)
    if ref is None and proposals:
        ref = proposals[0]
    device = ref.device if ref is not None else None
    return torch.ones(int(next(iter(sizes.values()))), dtype=torch.float32, device=device)


def combine_losses(sup: Mapping[str, Tensor], unsup: Mapping[str, Tensor],
                   alpha: float) -> tuple[Tensor, dict[str, Tensor]]:
    """``L = sum(sup) + alpha * sum(unsup)`` and its logged terms (SPEC §1, §10).

    Args:
        sup: supervised terms under torchvision's names (``loss_classifier``, ``loss_box_reg``,
            ``loss_objectness``, ``loss_rpn_box_reg``), scalars.
        unsup: the unsupervised terms under the same names, before weighting; every one of them
            is multiplied by ``alpha`` (RPN and RoI, classification and regression).
        alpha: ``unsup_weight`` (4.0 partial labels, 2.0 full labels).
    Returns:
        (total scalar with graph, logged) where logged maps ``sup/<name>`` to the detached
        supervised term and ``unsup/<name>`` to the detached *weighted* term ``alpha * term``.
    Raises:
        ValueError: both dicts empty.
    """
    terms = [*sup.values()] + [alpha * v for v in unsup.values()]
    if not terms:
        raise ValueError("combine_losses: no loss term given")
    total = torch.stack([t.reshape(()).float() for t in terms]).sum()
    logged = {f"sup/{k}": v.detach() for k, v in sup.items()}
    logged.update({f"unsup/{k}": (alpha * v).detach() for k, v in unsup.items()})
    return total, logged
