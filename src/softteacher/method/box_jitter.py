"""Box jittering: how stable the teacher's regression is around a candidate (SPEC §4, §10).

Each candidate box is copied ``times`` times with every coordinate offset by noise proportional to
the box's width (x1, x2) or height (y1, y2); the teacher's RoI head refines every copy
(class-specific regression for the candidate's class); the spread of the refined copies,
relative to their mean box's size, is the candidate's *reliability* (lower = more reliable).
Candidates with reliability < ``reg_pseudo_threshold`` (0.02) become regression pseudo boxes.

Everything is batched, runs on the boxes' device and draws noise from ``generator`` (which must
live on that device) or from torch's global generator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

NOISES = ("gaussian", "uniform")

RefineFn = Callable[[list[Tensor], list[Tensor]], Sequence[Tensor]]


def _sizes(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy -> (..., 4) [w, h, w, h], each clamped >= 1 px."""
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=1.0)
    return torch.cat([wh, wh], dim=-1)


def jitter_boxes(boxes: Tensor, times: int = 10, scale: float = 0.06, noise: str = "gaussian",
                 generator: torch.Generator | None = None) -> Tensor:
    """``times`` randomly offset copies of each box.

    Offsets are independent per box, copy and coordinate: x1 and x2 move by ``scale * w * e``,
    y1 and y2 by ``scale * h * e``, with w, h the box's width and height clamped >= 1 px and
    ``e ~ N(0, 1)`` (``"gaussian"``, SPEC default: std ``scale`` of the size) or
    ``e ~ U[-1, 1)`` (``"uniform"``, the paper's text: offsets within +-``scale`` of the size).
    The copies are not clipped to the image and may be degenerate (x2 < x1); the refinement
    decodes them anyway, and clips what it decodes to the image.

    Args:
        boxes: (N, 4) float xyxy, absolute pixels (teacher frame).
        times: number of copies J >= 1 (SPEC: 10).
        scale: relative noise level (SPEC: 0.06).
        noise: ``"gaussian"`` or ``"uniform"``.
        generator: optional torch.Generator on ``boxes.device``, for reproducible draws.
    Returns:
        (N, times, 4), boxes' dtype and device. N == 0 gives (0, times, 4).
    Raises:
        ValueError: bad shape, ``times < 1``, negative scale or unknown noise.
        TypeError: non-floating boxes.
    """
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"jitter_boxes: boxes must be (N, 4), got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise TypeError(f"jitter_boxes: boxes must be floating point, got {boxes.dtype}")
    if times < 1:
        raise ValueError(f"jitter_boxes: times must be >= 1, got {times}")
    if scale < 0:
        raise ValueError(f"jitter_boxes: scale must be >= 0, got {scale}")
    shape = (boxes.shape[0], times, 4)
    kw = dict(generator=generator, dtype=boxes.dtype, device=boxes.device)
    if noise == "gaussian":
        e = torch.randn(shape, **kw)
    elif noise == "uniform":
        e = torch.rand(shape, **kw) * 2.0 - 1.0
    else:
        raise ValueError(f"jitter_boxes: unknown noise {noise!r}; known: {', '.join(NOISES)}")
    offsets = e * (scale * _sizes(boxes))[:, None, :]
    return boxes[:, None, :] + offsets


def jitter_reliability(refined: Tensor) -> Tensor:
    """Relative spread of the refined copies of each jittered box.

    For each box and coordinate: the *unbiased* standard deviation over the J copies
    (``torch.std`` default, divisor J - 1), divided by the mean refined box's width (x1, x2) or
    height (y1, y2), clamped >= 1 px; then averaged over the 4 coordinates.

    Args:
        refined: (N, J, 4) float, xyxy, teacher frame; J >= 2 copies per box.
    Returns:
        (N,) float, same dtype/device, >= 0 (lower = more reliable). N == 0 gives (0,).
    Raises:
        ValueError: bad shape or J < 2 (an unbiased std needs two copies).
    """
    if refined.dim() != 3 or refined.shape[-1] != 4:
        raise ValueError(f"jitter_reliability: refined must be (N, J, 4), got "
                         f"{tuple(refined.shape)}")
    if refined.shape[1] < 2:
        raise ValueError(f"jitter_reliability: need J >= 2 copies per box, got {refined.shape[1]}")
    if refined.shape[0] == 0:
        return refined.new_zeros((0,))
    std = refined.std(dim=1)  # (N, 4), unbiased
    size = _sizes(refined.mean(dim=1))  # (N, 4): [w, h, w, h] of the mean refined box
    return (std / size).mean(dim=-1)


@torch.no_grad()
def box_jitter_reliability(boxes_per_image: Sequence[Tensor], labels_per_image: Sequence[Tensor],
                           refine: RefineFn, times: int = 10, scale: float = 0.06,
                           noise: str = "gaussian",
                           generator: torch.Generator | None = None) -> list[Tensor]:
    """Jitter reliability of every candidate of a batch, with one call of the teacher's head.

    Each image's candidates are jittered ``times`` times (:func:`jitter_boxes`); ``refine`` is
    called once with all copies of all images, ``refine(jittered_per_image, labels_per_image)``
    where ``jittered_per_image[i]`` is (N_i * times, 4) ordered box-major (the copies of box 0,
    then of box 1, ...) and ``labels_per_image[i]`` is (N_i * times,) int64, each copy carrying
    its candidate's label. It must return the refined boxes per image, (N_i * times, 4) each, in
    the same order and frame (the trainer's refine runs the teacher's RoI head with the
    class-specific regression of that label). ``refine`` runs under ``torch.no_grad`` and is
    not called when no image has a candidate.

    Args:
        boxes_per_image: B tensors (N_i, 4) float xyxy, teacher frame.
        labels_per_image: B tensors (N_i,) int64, classes 1..C.
        refine: the callable above.
        times, scale, noise, generator: as in :func:`jitter_boxes`; ``times >= 2``.
    Returns:
        B tensors (N_i,) of :func:`jitter_reliability`, on the boxes' device; (0,) for an image
        without candidates, [] for B == 0.
    Raises:
        ValueError: mismatched inputs, ``times < 2``, or refine returning wrong shapes.
    """
    if len(boxes_per_image) != len(labels_per_image):
        raise ValueError(f"box_jitter_reliability: {len(boxes_per_image)} box tensors but "
                         f"{len(labels_per_image)} label tensors")
    if times < 2:
        raise ValueError(f"box_jitter_reliability: times must be >= 2, got {times}")
    counts = [int(b.shape[0]) for b in boxes_per_image]
    for i, (b, lab) in enumerate(zip(boxes_per_image, labels_per_image)):
        if lab.shape != (b.shape[0],):
            raise ValueError(f"box_jitter_reliability: image {i}: labels {tuple(lab.shape)} do "
                             f"not match boxes {tuple(b.shape)}")
    if sum(counts) == 0:
        return [b.new_zeros((0,)) for b in boxes_per_image]
    # all images' candidates in one draw and one reliability pass (a fixed number of operators)
    jittered = jitter_boxes(torch.cat(list(boxes_per_image)), times, scale, noise, generator)
    labels = torch.cat(list(labels_per_image)).repeat_interleave(times)
    copies = [n * times for n in counts]
    refined = list(refine(list(jittered.reshape(-1, 4).split(copies)), list(labels.split(copies))))
    if len(refined) != len(counts):
        raise ValueError(f"box_jitter_reliability: refine returned {len(refined)} tensors for "
                         f"{len(counts)} images")
    for i, (r, n) in enumerate(zip(refined, copies)):
        if r.shape != (n, 4):
            raise ValueError(f"box_jitter_reliability: image {i}: refine returned "
                             f"{tuple(r.shape)}, expected ({n}, 4)")
    return list(jitter_reliability(torch.cat(refined).reshape(-1, times, 4)).split(counts))
