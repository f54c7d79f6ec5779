"""Views of an image: labeled training view, weak/strong unlabeled views, test view.

Images are uint8 tensors (3, H, W). Every geometric op returns its (3, 3) float64 matrix (input
pixel coordinates -> output pixel coordinates, convention of ``softteacher.geometry``), and a
``View`` carries the product of its ops' matrices (original image -> view). Pixel warps are
driven by those same matrices (``warp_affine`` samples each output pixel centre at
``M^-1 (x + 0.5, y + 0.5)``), resize and flip use torchvision/torch ops whose pixel grids agree
with ``scale_matrix``/``hflip_matrix`` exactly (half-pixel centres).

Randomness comes only from the ``numpy.random.Generator`` passed in: a view depends on the
generator's seed alone, never on global state, so it is reproducible per (seed, image,
iteration) and safe in DataLoader workers.

Strong view (SPEC §1, §10): the weak view's resize and flip (or its own draws with
``augment.independent_views``), then one photometric op, one geometric op (translate, rotate or
shear, uniformly), then random erasing of square patches filled with a random colour each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from softteacher.config import AugmentConfig
from softteacher.geometry import (
    clip_boxes,
    filter_boxes,
    hflip_matrix,
    identity_matrix,
    rotate_matrix,
    scale_matrix,
    shear_matrix,
    transform_boxes,
    translate_matrix,
)

Size = tuple[int, int]  # (H, W)


@dataclass
class View:
    """An image as one model sees it.

    Attributes:
        image: (3, H, W) uint8.
        matrix: (3, 3) float64, original-image pixel coordinates -> view pixel coordinates.
        size: (H, W) of ``image``.
        ops: what was applied, in order, for pictures and logs (e.g. ``"rotate -12.3"``).
    """

    image: Tensor
    matrix: Tensor
    size: Size
    ops: tuple[str, ...] = field(default_factory=tuple)


def _check_image(image: Tensor) -> None:
    if not isinstance(image, Tensor):
        raise TypeError(f"image: expected a tensor, got {type(image).__name__}")
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image: expected a (3, H, W) uint8 tensor, got "
                         f"{tuple(image.shape)} {image.dtype}")


def _check_rng(rng) -> None:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: expected a numpy.random.Generator, got {type(rng).__name__}")


def _size(image: Tensor) -> Size:
    return int(image.shape[-2]), int(image.shape[-1])


# ---------------------------------------------------------------------------------------------
# Geometric ops: (image, ...) -> (image, matrix input -> output)
# ---------------------------------------------------------------------------------------------

def resize_size(size: Size, short_side: int, max_size: int) -> Size:
    """Output (H, W) of a resize to ``short_side`` with the long side capped at ``max_size``.

    ``scale = min(short_side / short, max_size / long)`` (no cap when ``max_size <= 0``); each
    side is rounded to the nearest integer, at least 1.
    """
    h, w = size
    scale = short_side / min(h, w)
    if max_size > 0:
        scale = min(scale, max_size / max(h, w))
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def resize_to(image: Tensor, size: Size) -> tuple[Tensor, Tensor]:
    """Bilinear (antialiased) resize to ``size = (H', W')``.

    Returns:
        the (3, H', W') image and ``scale_matrix(W'/W, H'/H)`` (exact: torchvision's resize uses
        half-pixel centres, so continuous coordinates scale by the per-axis size ratio).
    """
    h, w = _size(image)
    nh, nw = int(size[0]), int(size[1])
    if (nh, nw) != (h, w):
        image = TF.resize(image, [nh, nw], interpolation=TF.InterpolationMode.BILINEAR,
                          antialias=True)
    return image, scale_matrix(nw / w, nh / h)


def resize(image: Tensor, short_side: int, max_size: int) -> tuple[Tensor, Tensor]:
    """Resize so the short side is ``short_side`` and the long side at most ``max_size``.

    Returns:
        (3, H', W') uint8 and its (3, 3) matrix (see ``resize_to``).
    """
    return resize_to(image, resize_size(_size(image), short_side, max_size))


def hflip(image: Tensor) -> tuple[Tensor, Tensor]:
    """Mirror left-right. Returns the image and ``hflip_matrix(W)`` (``x -> W - x``)."""
    return image.flip(-1), hflip_matrix(image.shape[-1])


def _pixel_to_normalized(size: Size) -> Tensor:
    """Continuous pixel coordinates -> grid_sample's normalised [-1, 1] (align_corners=False)."""
    h, w = size
    return scale_matrix(2.0 / w, 2.0 / h) @ translate_matrix(-w / 2.0, -h / 2.0)


def warp_affine(image: Tensor, matrix: Tensor, size: Size | None = None,
                interpolation: str = "bilinear") -> Tensor:
    """Warp an image by an affine matrix; the matrix is the single source of truth.

    Output pixel ``(i, j)`` takes the input's value at ``matrix^-1 (j + 0.5, i + 0.5)``
    (bilinear); points outside the input are filled with 0.

    Args:
        image: (3, H, W) uint8 (any device).
        matrix: (3, 3) input pixel coords -> output pixel coords.
        size: output (H', W'); default the input's size.
        interpolation: ``"bilinear"`` or ``"nearest"``.
    Returns:
        (3, H', W') uint8.
    """
    size = _size(image) if size is None else (int(size[0]), int(size[1]))
    m = matrix.detach().to("cpu", torch.float64)
    # normalised output -> normalised input
    theta = _pixel_to_normalized(_size(image)) @ torch.linalg.inv(m) \
        @ torch.linalg.inv(_pixel_to_normalized(size))
    theta = theta[:2].to(device=image.device, dtype=torch.float32).unsqueeze(0)
    grid = nnf.affine_grid(theta, [1, image.shape[0], size[0], size[1]], align_corners=False)
    out = nnf.grid_sample(image.unsqueeze(0).float(), grid, mode=interpolation,
                          padding_mode="zeros", align_corners=False)[0]
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _center(image: Tensor) -> tuple[float, float]:
    h, w = _size(image)
    return w / 2.0, h / 2.0


def translate(image: Tensor, tx: float, ty: float) -> tuple[Tensor, Tensor]:
    """Shift by ``(tx, ty)`` pixels; same size, fill 0. Returns the image and its matrix."""
    m = translate_matrix(tx, ty)
    return warp_affine(image, m), m


def rotate(image: Tensor, angle_deg: float) -> tuple[Tensor, Tensor]:
    """Rotate about the image centre (positive: counter-clockwise as displayed); same size,
    fill 0. Returns the image and its matrix."""
    m = rotate_matrix(angle_deg, _center(image))
    return warp_affine(image, m), m


def shear(image: Tensor, shear_x_deg: float, shear_y_deg: float = 0.0) -> tuple[Tensor, Tensor]:
    """Shear about the image centre (see ``geometry.shear_matrix``); same size, fill 0.
    Returns the image and its matrix."""
    m = shear_matrix(shear_x_deg, shear_y_deg, _center(image))
    return warp_affine(image, m), m


# ---------------------------------------------------------------------------------------------
# Photometric ops: (image, level) -> image, level in 1..10 (SPEC §10)
# ---------------------------------------------------------------------------------------------

def enhance_factor(level: int) -> float:
    """PIL-style enhance factor of a level: ``0.1 + 1.8 * level / 10`` (1 leaves the image)."""
    return 0.1 + 1.8 * level / 10.0


def brightness(image: Tensor, level: int) -> Tensor:
    return TF.adjust_brightness(image, enhance_factor(level))


def contrast(image: Tensor, level: int) -> Tensor:
    return TF.adjust_contrast(image, enhance_factor(level))


def color(image: Tensor, level: int) -> Tensor:
    """Saturation (PIL's ``ImageEnhance.Color``)."""
    return TF.adjust_saturation(image, enhance_factor(level))


def sharpness(image: Tensor, level: int) -> Tensor:
    return TF.adjust_sharpness(image, enhance_factor(level))


def equalize(image: Tensor, level: int) -> Tensor:
    """Histogram equalisation; ``level`` unused."""
    return TF.equalize(image)


def autocontrast(image: Tensor, level: int) -> Tensor:
    """Stretch each channel to [0, 255]; ``level`` unused."""
    return TF.autocontrast(image)


def solarize(image: Tensor, level: int) -> Tensor:
    """Invert pixels ``>= int(256 - 25.6 * level)`` (level 1: threshold 230, level 9: 25; level
    0: none, the image as it is)."""
    threshold = int(256 - 25.6 * level)
    return image.clone() if threshold > 255 else TF.solarize(image, threshold=threshold)


def posterize(image: Tensor, level: int) -> Tensor:
    """Keep ``8 - round(0.4 * level)`` bits per channel (level 1: 8, level 9: 4)."""
    return TF.posterize(image, bits=max(1, 8 - round(0.4 * level)))


PhotometricOp = Callable[[Tensor, int], Tensor]
PHOTOMETRIC_OPS: tuple[PhotometricOp, ...] = (
    brightness, contrast, color, sharpness, equalize, solarize, posterize, autocontrast)


def erase(image: Tensor, patches: Tensor, colors: Tensor) -> Tensor:
    """Fill rectangles of a copy of ``image``.

    Args:
        image: (3, H, W) uint8.
        patches: (K, 4) int xyxy pixel bounds (``x0 <= x < x1``); K == 0 copies the image.
        colors: (K, 3) uint8 fill colours.
    Returns:
        (3, H, W) uint8, a new tensor.
    """
    out = image.clone()
    for (x0, y0, x1, y1), c in zip(patches.tolist(), colors):
        out[:, y0:y1, x0:x1] = c.to(out.device).view(3, 1, 1)
    return out


# ---------------------------------------------------------------------------------------------
# Random draws (all from the explicit generator, in a fixed order)
# ---------------------------------------------------------------------------------------------

def draw_short_side(rng: np.random.Generator, augment: AugmentConfig) -> int:
    """A training short side: from ``train_short_sides`` when non-empty, else uniform in the
    inclusive range ``train_short_side``."""
    if augment.train_short_sides:
        return int(augment.train_short_sides[rng.integers(len(augment.train_short_sides))])
    lo, hi = augment.train_short_side
    return int(rng.integers(lo, hi + 1))


def random_resize_flip(image: Tensor, rng: np.random.Generator, augment: AugmentConfig) -> View:
    """The weak view: random multi-scale resize, then horizontal flip with ``flip_prob``."""
    short = draw_short_side(rng, augment)
    flip = bool(rng.random() < augment.flip_prob)
    out, m = resize(image, short, augment.train_max_size)
    ops = [f"resize {out.shape[-1]}x{out.shape[-2]}"]
    if flip:
        out, mf = hflip(out)
        m = mf @ m
        ops.append("hflip")
    return View(out, m, _size(out), tuple(ops))


def random_photometric(image: Tensor, rng: np.random.Generator, augment: AugmentConfig
                       ) -> tuple[Tensor, str]:
    """One op of ``PHOTOMETRIC_OPS`` (uniform) at a level uniform in ``color_level`` (inclusive).
    Returns the image and a description."""
    op = PHOTOMETRIC_OPS[int(rng.integers(len(PHOTOMETRIC_OPS)))]
    lo, hi = augment.color_level
    level = int(rng.integers(lo, hi + 1))
    return op(image, level), f"{op.__name__} {level}"


def random_geometric(image: Tensor, rng: np.random.Generator, augment: AugmentConfig
                     ) -> tuple[Tensor, Tensor, str]:
    """One of translate / rotate / shear, chosen uniformly, about the image centre.

    translate: ``tx, ty`` uniform in ``±augment.translate`` of the width / height, rounded to
    whole pixels; rotate: uniform in ``±rotate_deg``; shear: along x or y (fair coin), angle
    uniform in ``±shear_deg``. Returns the image, its matrix and a description.
    """
    h, w = _size(image)
    kind = int(rng.integers(3))
    if kind == 0:
        t = augment.translate
        tx = round(float(rng.uniform(-t, t)) * w)
        ty = round(float(rng.uniform(-t, t)) * h)
        out, m = translate(image, tx, ty)
        return out, m, f"translate {tx:+d},{ty:+d}"
    if kind == 1:
        angle = float(rng.uniform(-augment.rotate_deg, augment.rotate_deg))
        out, m = rotate(image, angle)
        return out, m, f"rotate {angle:+.1f}"
    axis = int(rng.integers(2))
    angle = float(rng.uniform(-augment.shear_deg, augment.shear_deg))
    out, m = shear(image, angle if axis == 0 else 0.0, angle if axis == 1 else 0.0)
    return out, m, f"shear_{'xy'[axis]} {angle:+.1f}"


def random_erase(image: Tensor, rng: np.random.Generator, augment: AugmentConfig
                 ) -> tuple[Tensor, Tensor]:
    """Erase ``erase_count`` (inclusive range) square patches, each of side
    ``f * min(H, W)`` with ``f`` uniform in ``[0, erase_max_frac]``, placed uniformly inside
    the image and filled with a random colour (uniform RGB). Boxes are left unchanged.

    Returns:
        the image and the (K, 4) int64 xyxy patches.
    """
    h, w = _size(image)
    lo, hi = augment.erase_count
    k = int(rng.integers(lo, hi + 1))
    sides = np.rint(rng.uniform(0.0, augment.erase_max_frac, size=k) * min(h, w)).astype(np.int64)
    x0 = np.floor(rng.random(k) * (w - sides + 1)).astype(np.int64)
    y0 = np.floor(rng.random(k) * (h - sides + 1)).astype(np.int64)
    colors = torch.from_numpy(rng.integers(0, 256, size=(k, 3)).astype(np.uint8))
    patches = torch.from_numpy(np.stack([x0, y0, x0 + sides, y0 + sides], axis=1).reshape(-1, 4))
    return erase(image, patches, colors), patches


# ---------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------

def boxes_into_view(boxes: Tensor, view: View, min_size: float = 0.0) -> tuple[Tensor, Tensor]:
    """Map boxes from the original image into a view, clip them to it, drop the small ones.

    Args:
        boxes: (N, 4) xyxy, original image frame.
        view: the target view.
        min_size: boxes narrower or lower than this (or empty) after clipping are dropped.
    Returns:
        ``(boxes_view, keep)``: (K, 4) xyxy in the view frame (boxes' dtype, float32 for integer
        boxes) and the (N,) bool mask of kept input boxes. N == 0 gives (0, 4) and (0,).
    """
    mapped = clip_boxes(transform_boxes(boxes.reshape(-1, 4), view.matrix), view.size)
    return filter_boxes(mapped, min_size)


def labeled_view(image: Tensor, boxes: Tensor, rng: np.random.Generator,
                 augment: AugmentConfig) -> tuple[View, Tensor, Tensor]:
    """Training view of a labeled image: random resize, flip, one photometric op.

    Args:
        image: (3, H, W) uint8 original.
        boxes: (N, 4) xyxy, original frame.
        rng: the only source of randomness.
    Returns:
        ``(view, boxes_view, keep)``: boxes mapped into the view, clipped, those under
        ``augment.min_box_size`` dropped; ``keep`` (N,) bool says which input boxes survive
        (index labels with it; ``(~keep).sum()`` counts the dropped ones).
    """
    _check_image(image)
    _check_rng(rng)
    view = random_resize_flip(image, rng, augment)
    out, desc = random_photometric(view.image, rng, augment)
    view = View(out, view.matrix, view.size, view.ops + (desc,))
    boxes_view, keep = boxes_into_view(boxes, view, augment.min_box_size)
    return view, boxes_view, keep


def unlabeled_views(image: Tensor, rng: np.random.Generator, augment: AugmentConfig
                    ) -> tuple[View, View]:
    """The teacher's weak view and the student's strong view of one unlabeled image.

    weak: random resize + flip. strong: the same resize and flip (its own draws when
    ``augment.independent_views``), then one photometric op, one geometric op (translate,
    rotate or shear), then random erasing. Pseudo boxes move weak -> strong with
    ``geometry.map_boxes(boxes, weak.matrix, strong.matrix, strong.size)``.

    Args:
        image: (3, H, W) uint8 original.
        rng: the only source of randomness.
    Returns:
        ``(weak, strong)`` views.
    """
    _check_image(image)
    _check_rng(rng)
    weak = random_resize_flip(image, rng, augment)
    base = random_resize_flip(image, rng, augment) if augment.independent_views else weak
    out, photo = random_photometric(base.image, rng, augment)
    out, mg, geo = random_geometric(out, rng, augment)
    out, patches = random_erase(out, rng, augment)
    strong = View(out, mg @ base.matrix, base.size,
                  base.ops + (photo, geo, f"erase {len(patches)}"))
    return weak, strong


def test_view(image: Tensor, augment: AugmentConfig) -> View:
    """Deterministic evaluation view: resize to ``test_short_side``, long side at most
    ``test_max_size``."""
    _check_image(image)
    out, m = resize(image, augment.test_short_side, augment.test_max_size)
    return View(out, m, _size(out), (f"resize {out.shape[-1]}x{out.shape[-2]}",))


def identity_view(image: Tensor) -> View:
    """The original image as a view (identity matrix)."""
    _check_image(image)
    return View(image, identity_matrix(), _size(image), ())


__all__ = [
    "View", "PHOTOMETRIC_OPS", "resize_size", "resize_to", "resize", "hflip", "warp_affine",
    "translate", "rotate", "shear", "enhance_factor", "brightness", "contrast", "color",
    "sharpness", "equalize", "autocontrast", "solarize", "posterize", "erase", "draw_short_side",
    "random_resize_flip", "random_photometric", "random_geometric", "random_erase",
    "boxes_into_view", "labeled_view", "unlabeled_views", "test_view", "identity_view",
]
