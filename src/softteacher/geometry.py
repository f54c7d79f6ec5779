"""3x3 matrices and xyxy boxes: the geometric bookkeeping of the views.

Coordinate convention (used everywhere in the package):
    Continuous pixel coordinates. Pixel ``(row i, column j)`` covers ``[j, j+1) x [i, i+1)``;
    its centre is ``(j + 0.5, i + 0.5)``. An image of width ``W`` spans ``x`` in ``[0, W]``, so a
    horizontal flip is ``x -> W - x`` and a resize by ``s`` is ``x -> s * x``. Boxes are
    ``(x0, y0, x1, y1)`` in these coordinates.

Matrices are (3, 3) float64 affine maps acting on column vectors ``(x, y, 1)``. A matrix reads
source-to-target; composing "first A, then B" is ``B @ A``. Image warps in
``softteacher.data.transforms`` sample each output pixel centre at ``M^-1 (x + 0.5, y + 0.5)``,
so the matrix is the single source of truth for pixels and boxes alike.

All box functions are pure tensor functions: batched, device-agnostic (the matrix is moved to the
boxes' device), computed in float64 and returned in the boxes' dtype (float32 for integer boxes).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

Size = tuple[int, int]  # (H, W)


# ---------------------------------------------------------------------------------------------
# Matrix constructors
# ---------------------------------------------------------------------------------------------

def _matrix(rows: list[list[float]], device=None) -> Tensor:
    return torch.tensor(rows, dtype=torch.float64, device=device)


def identity_matrix(device=None) -> Tensor:
    """(3, 3) float64 identity."""
    return torch.eye(3, dtype=torch.float64, device=device)


def scale_matrix(sx: float, sy: float, device=None) -> Tensor:
    """(3, 3) float64: ``x -> sx * x``, ``y -> sy * y`` (about the origin, the image's corner)."""
    return _matrix([[sx, 0.0, 0.0], [0.0, sy, 0.0], [0.0, 0.0, 1.0]], device)


def translate_matrix(tx: float, ty: float, device=None) -> Tensor:
    """(3, 3) float64: ``x -> x + tx``, ``y -> y + ty``."""
    return _matrix([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]], device)


def hflip_matrix(width: float, device=None) -> Tensor:
    """(3, 3) float64 horizontal flip of an image ``width`` pixels wide: ``x -> width - x``.

    Box ``[10, 20, 30, 40]`` in a 100-px-wide image maps to ``[70, 20, 90, 40]``.
    """
    return _matrix([[-1.0, 0.0, width], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], device)


def _about(linear: list[list[float]], center: Sequence[float], device=None) -> Tensor:
    """``T(center) @ L @ T(-center)`` for a 2x2 linear part ``L``."""
    cx, cy = float(center[0]), float(center[1])
    (a, b), (c, d) = linear
    return _matrix([[a, b, cx - a * cx - b * cy],
                    [c, d, cy - c * cx - d * cy],
                    [0.0, 0.0, 1.0]], device)


def rotate_matrix(angle_deg: float, center: Sequence[float], device=None) -> Tensor:
    """(3, 3) float64 rotation by ``angle_deg`` about ``center = (cx, cy)``.

    Positive angles turn the picture counter-clockwise as displayed (y points down), like
    ``torchvision.transforms.v2.functional.rotate``:
    ``x' = cx + cos(a)(x - cx) + sin(a)(y - cy)``, ``y' = cy - sin(a)(x - cx) + cos(a)(y - cy)``.
    The image centre of a ``W x H`` image is ``(W / 2, H / 2)``.
    """
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    return _about([[c, s], [-s, c]], center, device)


def shear_matrix(shear_x_deg: float, shear_y_deg: float, center: Sequence[float],
                 device=None) -> Tensor:
    """(3, 3) float64 shear about ``center = (cx, cy)``:
    ``x' = x + tan(shear_x)(y - cy)``, ``y' = y + tan(shear_y)(x - cx)``.

    Points on the horizontal line through the centre keep their x under a pure x-shear
    (and points on the vertical line through the centre keep their y under a pure y-shear).
    torchvision's ``affine(img, shear=[s, 0])`` is ``shear_matrix(-s, 0, centre)`` (opposite sign;
    likewise for y), checked pixel by pixel in ``tests/data/test_transforms.py``.
    """
    tx, ty = math.tan(math.radians(shear_x_deg)), math.tan(math.radians(shear_y_deg))
    return _about([[1.0, tx], [ty, 1.0]], center, device)


# ---------------------------------------------------------------------------------------------
# Boxes
# ---------------------------------------------------------------------------------------------

def _out_dtype(boxes: Tensor) -> torch.dtype:
    return boxes.dtype if boxes.is_floating_point() else torch.float32


def _check_boxes(boxes: Tensor, name: str = "boxes") -> None:
    if not isinstance(boxes, Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(boxes).__name__}")
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name}: expected shape (N, 4), got {tuple(boxes.shape)}")


def _check_matrix(matrix: Tensor, name: str = "matrix") -> None:
    if not isinstance(matrix, Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(matrix).__name__}")
    if matrix.ndim not in (2, 3) or matrix.shape[-2:] != (3, 3):
        raise ValueError(f"{name}: expected shape (3, 3) or (N, 3, 3), got {tuple(matrix.shape)}")


def box_corners(boxes: Tensor) -> Tensor:
    """The 4 corners of each box.

    Args:
        boxes: (N, 4) xyxy.
    Returns:
        (N, 4, 2) corners (x0,y0), (x1,y0), (x0,y1), (x1,y1); N == 0 gives (0, 4, 2).
    """
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([torch.stack([x0, y0], -1), torch.stack([x1, y0], -1),
                        torch.stack([x0, y1], -1), torch.stack([x1, y1], -1)], dim=-2)


def transform_points(points: Tensor, matrix: Tensor) -> Tensor:
    """Apply an affine matrix to points.

    Args:
        points: (N, K, 2) or (N, 2) xy.
        matrix: (3, 3), or (N, 3, 3) one per row of ``points``; any float dtype, any device.
    Returns:
        points of the same shape, in ``points``' dtype (float32 for integer input) and device.
    """
    _check_matrix(matrix)
    squeeze = points.ndim == 2
    pts = points.unsqueeze(1) if squeeze else points
    m = matrix.to(device=pts.device, dtype=torch.float64)
    if m.ndim == 3 and m.shape[0] != pts.shape[0]:
        raise ValueError(f"matrix: {m.shape[0]} matrices for {pts.shape[0]} rows of points")
    if m.ndim == 2:
        m = m.unsqueeze(0)
    p = pts.to(torch.float64)
    # (N, K, 2) @ (N, 2, 2)^T + (N, 1, 2)
    out = p @ m[:, :2, :2].transpose(1, 2) + m[:, None, :2, 2]
    out = out.to(_out_dtype(points))
    return out.squeeze(1) if squeeze else out


BOX_MAPPINGS = ("corners", "ellipse")


def transform_boxes(boxes: Tensor, matrix: Tensor, mode: str = "corners") -> Tensor:
    """Map boxes through an affine matrix.

    ``corners`` (the reference's rule): transform the 4 corners, take their enclosing box.
    ``ellipse``: transform the ellipse inscribed in the box, take its enclosing box: centre
    ``A c + t`` and half extents ``sqrt((A00 w/2)^2 + (A01 h/2)^2)``,
    ``sqrt((A10 w/2)^2 + (A11 h/2)^2)`` for the linear part ``A``. Both are exact for scale,
    translate and flip. Under rotate and shear the corner box grows around the object it holds
    (a disc rotated by 30 degrees: 1.87 x its area), the ellipse box stays close to it (exact
    for a disc).

    Args:
        boxes: (N, 4) xyxy in the matrix's source frame.
        matrix: (3, 3) affine, or (N, 3, 3) one per box; any float dtype, any device.
        mode: one of ``BOX_MAPPINGS``.
    Returns:
        (N, 4) xyxy in the target frame, unclipped, in ``boxes``' dtype (float32 for integer
        boxes) and device. N == 0 gives (0, 4).
    """
    _check_boxes(boxes)
    if mode == "corners":
        corners = transform_points(box_corners(boxes), matrix)  # (N, 4, 2)
        return torch.cat([corners.amin(dim=1), corners.amax(dim=1)], dim=-1)
    if mode != "ellipse":
        raise ValueError(f"transform_boxes: mode {mode!r} is not one of {', '.join(BOX_MAPPINGS)}")
    b = boxes.float() if not boxes.is_floating_point() else boxes
    centres = transform_points((b[:, :2] + b[:, 2:]) / 2, matrix)  # (N, 2)
    lin = matrix.to(device=b.device, dtype=torch.float64)[..., :2, :2]
    semi = ((b[:, 2:] - b[:, :2]) / 2).double()  # (N, 2): w/2, h/2
    half = ((lin * semi[:, None, :]) ** 2).sum(-1).sqrt().to(b.dtype)  # (N, 2)
    return torch.cat([centres - half, centres + half], dim=-1)


def clip_boxes(boxes: Tensor, size: Size) -> Tensor:
    """Clip boxes to an image.

    Args:
        boxes: (N, 4) xyxy.
        size: (H, W) of the image; coordinates are clamped to ``[0, W] x [0, H]``.
    Returns:
        (N, 4) same dtype and device; N == 0 gives (0, 4).
    """
    _check_boxes(boxes)
    h, w = float(size[0]), float(size[1])
    x = boxes[:, 0::2].clamp(0.0, w)
    y = boxes[:, 1::2].clamp(0.0, h)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=-1)


def keep_mask(boxes: Tensor, min_size: float = 1.0) -> Tensor:
    """Which boxes still cover some area (e.g. after clipping).

    Args:
        boxes: (N, 4) xyxy.
        min_size: a box is kept when its width and height are both ``>= min_size`` and ``> 0``.
    Returns:
        (N,) bool; N == 0 gives (0,).
    """
    _check_boxes(boxes)
    wh = boxes[:, 2:] - boxes[:, :2]
    return ((wh > 0) & (wh >= min_size)).all(dim=1)


def filter_boxes(boxes: Tensor, min_size: float = 1.0) -> tuple[Tensor, Tensor]:
    """Drop boxes narrower or lower than ``min_size`` (see ``keep_mask``).

    Returns:
        ``(boxes[keep], keep)``: (K, 4) and the (N,) bool mask, so callers can drop the matching
        labels and count the dropped boxes (``(~keep).sum()``).
    """
    keep = keep_mask(boxes, min_size)
    return boxes[keep], keep


def relative_matrix(matrix_a: Tensor, matrix_b: Tensor) -> Tensor:
    """The matrix from view A to view B: ``M_b @ M_a^-1``, inverted in float64.

    Args:
        matrix_a: (3, 3) or (B, 3, 3), original -> view A.
        matrix_b: (3, 3) or (B, 3, 3), original -> view B (broadcasts against ``matrix_a``).
    Returns:
        (3, 3) or (B, 3, 3) float64 on ``matrix_a``'s device: view A -> view B.
    """
    _check_matrix(matrix_a, "matrix_a")
    _check_matrix(matrix_b, "matrix_b")
    a = matrix_a.to(torch.float64)
    b = matrix_b.to(device=a.device, dtype=torch.float64)
    return b @ torch.linalg.inv(a)


def map_boxes(boxes_a: Tensor, matrix_a: Tensor, matrix_b: Tensor,
              size_b: Size | None = None, mode: str = "corners") -> Tensor:
    """Move boxes from view A to view B, both given by their matrices from the original image.

    Computes ``M_b @ M_a^-1`` in float64 and applies it with ``transform_boxes``. Use it for
    pseudo boxes (teacher/weak -> student/strong) and proposals (strong -> weak).

    Args:
        boxes_a: (N, 4) xyxy in view A.
        matrix_a: (3, 3) original -> view A.
        matrix_b: (3, 3) original -> view B.
        size_b: (H, W) of view B; when given, the result is clipped to it.
        mode: how a box moves through rotate and shear (``transform_boxes``).
    Returns:
        (N, 4) xyxy in view B, in ``boxes_a``' dtype and device. N == 0 gives (0, 4).
    """
    _check_boxes(boxes_a, "boxes_a")
    _check_matrix(matrix_a, "matrix_a")
    _check_matrix(matrix_b, "matrix_b")
    if matrix_a.ndim != 2 or matrix_b.ndim != 2:
        raise ValueError("map_boxes: expected (3, 3) matrices; use map_boxes_batch for a batch")
    out = transform_boxes(boxes_a, relative_matrix(matrix_a, matrix_b), mode)
    return clip_boxes(out, size_b) if size_b is not None else out


def map_boxes_batch(boxes_a: Sequence[Tensor], matrices_a: Sequence[Tensor] | Tensor,
                    matrices_b: Sequence[Tensor] | Tensor,
                    sizes_b: Sequence[Size] | None = None, mode: str = "corners") -> list[Tensor]:
    """``map_boxes`` over a batch of images, with one batched matrix inversion.

    Args:
        boxes_a: B tensors (N_i, 4) xyxy, each in its image's view A.
        matrices_a: B matrices (3, 3), as a list or a (B, 3, 3) tensor: original -> view A.
        matrices_b: the same for view B.
        sizes_b: optional B sizes (H, W) of the B views, to clip to.
        mode: how a box moves through rotate and shear (``transform_boxes``).
    Returns:
        B tensors (N_i, 4) in view B, each in its input's dtype and device. B == 0 gives [].
    """
    n = len(boxes_a)
    if len(matrices_a) != n or len(matrices_b) != n or (sizes_b is not None and len(sizes_b) != n):
        raise ValueError(f"map_boxes_batch: {n} box sets, {len(matrices_a)} matrices_a, "
                         f"{len(matrices_b)} matrices_b"
                         + (f", {len(sizes_b)} sizes_b" if sizes_b is not None else ""))
    if n == 0:
        return []
    ma = matrices_a if isinstance(matrices_a, Tensor) else torch.stack(
        [m.to(device=matrices_a[0].device, dtype=torch.float64) for m in matrices_a])
    mb = matrices_b if isinstance(matrices_b, Tensor) else torch.stack(
        [m.to(device=ma.device, dtype=torch.float64) for m in matrices_b])
    rel = relative_matrix(ma, mb)  # (B, 3, 3)
    out = []
    for i, boxes in enumerate(boxes_a):
        mapped = transform_boxes(boxes, rel[i], mode)
        out.append(clip_boxes(mapped, sizes_b[i]) if sizes_b is not None else mapped)
    return out
