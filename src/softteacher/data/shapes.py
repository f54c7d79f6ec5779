"""The embedded ``shapes`` dataset: procedurally generated detection images in COCO format.

Ships as code, needs no download, and is deterministic per seed: image ``index`` of ``split``
is drawn by a numpy ``Generator`` seeded from ``(GENERATOR_VERSION, seed, split, index)`` only,
so the output is identical for any worker count or order.

What an image holds (sizes are fractions of its short side unless said otherwise):
- width and height drawn independently from 320..640 px;
- a background: a linear gradient between two random colours, two octaves of smooth
  colour noise, and clutter that is never a class: lines, scribbles, partial outlines
  (open arcs, one to three sides of a polygon outline), elongated splats with scalloped
  outlines, thin bars, elongated ellipses, dots; the filled ones stay mostly inside the image
  so that a cut-off one never passes for a class;
- ``Poisson(4)`` objects (0 allowed, at most 15) of ``CLASSES``, which differ by shape only:
  colours come from one distribution shared by all classes and every object carries a
  linear shading. The extent (diameter of the circumscribing circle) is log-uniform in
  ``SIZE_RANGE`` (4.5 % .. 60 % of the short side; the smallest stay >= ~8 px after a
  resize to a 256 px short side), with random rotation and a mild aspect jitter;
- ``Poisson(1.5)`` thin strokes and bars drawn over the objects (occluders), grey pixel
  noise, JPEG quality 90.

Labels (the choices this file makes):
- Occlusion: objects are drawn in order and later ones may cover earlier ones. A placement
  (object or occluding stroke) is rejected if it would leave any annotated object with less
  than ``MIN_VISIBLE_FRACTION`` (40 %) of its pixels visible, border truncation included;
  a rejected object is re-drawn elsewhere (a few tries) or left out, a rejected stroke is left
  out. So every class shape drawn is annotated and at least 40 % of it is visible.
- A pixel belongs to the last object (or occluding stroke) whose anti-aliased coverage there
  is >= 0.5.
- ``bbox``: the tight box of the object's *visible* pixels (like COCO, whose boxes enclose
  the visible segment): every pixel the object painted (coverage > 0) that no later layer
  owns, in integer pixel edges ``[x, y, w, h]``; w, h >= 1. For an unoccluded object it is
  exactly the box of its non-zero pixels.
- ``area``: the count of pixels the object owns at the end (like COCO's segment area), which
  is what the COCO small / medium / large thresholds (32², 96²) are applied to.

On disk (``default_root()/seed0-t2000-v500-u2000-v1/``)::

    images/{train,val,unlabeled}/000001.jpg ...
    annotations/instances_train.json, instances_val.json
    annotations/image_info_unlabeled.json     (images and categories, no annotations)
    annotations/instances_unlabeled_gt.json   (the pool's hidden ground truth, diagnostics only)
    COMPLETE.json                             (the parameters; written last)

The folder is generated under a temporary name and renamed when complete, so an interrupted
generation never looks complete; a complete folder is returned at once.
"""

from __future__ import annotations

import colorsys
import json
import logging
import math
import multiprocessing
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

import numpy as np
from PIL import Image, ImageChops, ImageDraw

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "crescent", "heart")
# classes of the backbone-pretraining crops (``render_pretrain_crop``): none of ``CLASSES``, so a
# backbone trained on them has seen no label of the detection task
PRETRAIN_CLASSES = ("pentagon", "hexagon", "arrow", "letter_l", "letter_t", "rhombus", "trapezoid",
                    "semicircle")
SPLITS = ("train", "val", "unlabeled")
DEFAULT_NUM_TRAIN = 2000
DEFAULT_NUM_VAL = 500
DEFAULT_NUM_UNLABELED = 2000

IMAGE_SIDE_RANGE = (320, 640)  # width and height, inclusive, drawn independently
MEAN_OBJECTS = 4.0  # Poisson mean of objects attempted per image
MAX_OBJECTS = 15
SIZE_RANGE = (0.045, 0.6)  # object extent / image short side, log-uniform
MAX_ASPECT = 1.25  # objects are stretched by up to this factor along one axis
MIN_VISIBLE_FRACTION = 0.4  # of an object's pixels, after occlusion and border truncation
MIN_CONTRAST = 60.0  # RGB distance of an object's colour to what it covers (best of a few tries)
PLACEMENT_TRIES = 8
MEAN_CLUTTER = 7.0  # Poisson mean of background distractors
MEAN_OCCLUDERS = 1.5  # Poisson mean of thin strokes drawn over the objects
JPEG_QUALITY = 90
SUPERSAMPLE = 3  # anti-aliasing: shapes are drawn at 3x and box-filtered down

MARKER = "COMPLETE.json"
_SPLIT_CODE = {"train": 0, "val": 1, "unlabeled": 2}
_PRETRAIN_CODE = 3  # the random streams of the pretraining crops, apart from every split's
_AUTO_POOL_MIN_IMAGES = 64  # below this, workers=None generates in-process


@dataclass(frozen=True)
class ShapesPaths:
    """Where a generated ``shapes`` dataset lies; all absolute paths."""

    root: str
    train_json: str
    train_images: str
    val_json: str
    val_images: str
    unlabeled_json: str
    unlabeled_images: str
    unlabeled_gt_json: str


def default_root() -> str:
    """``$SOFTTEACHER_DATA`` if set, else ``~/.cache/softteacher/shapes``."""
    env = os.environ.get("SOFTTEACHER_DATA")
    return env if env else str(Path("~/.cache/softteacher/shapes").expanduser())


def dataset_name(seed: int, num_train: int, num_val: int, num_unlabeled: int) -> str:
    """Folder name of one parameter set, e.g. ``seed0-t2000-v500-u2000-v1``."""
    return f"seed{seed}-t{num_train}-v{num_val}-u{num_unlabeled}-v{GENERATOR_VERSION}"


def shapes_paths(folder: str | os.PathLike) -> ShapesPaths:
    """The file layout inside one parameter-set folder (nothing is checked)."""
    f = Path(folder).absolute()
    ann = f / "annotations"
    return ShapesPaths(
        root=str(f),
        train_json=str(ann / "instances_train.json"), train_images=str(f / "images" / "train"),
        val_json=str(ann / "instances_val.json"), val_images=str(f / "images" / "val"),
        unlabeled_json=str(ann / "image_info_unlabeled.json"),
        unlabeled_images=str(f / "images" / "unlabeled"),
        unlabeled_gt_json=str(ann / "instances_unlabeled_gt.json"),
    )


def categories() -> list[dict]:
    """COCO categories: ids ``1..len(CLASSES)``."""
    return [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)]


# ----------------------------------------------------------------------------------------------
# Geometry: every drawable thing is a list of ops in image pixel coordinates,
# ("poly", (N, 2) points, 0, fill) or ("line", (N, 2) points, width, fill), fill 1 paints, 0 erases.


def _regular(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    t = phase + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def _unit(pts) -> np.ndarray:
    """Points with their bounding box centred at 0, scaled to a largest norm of 1."""
    p = np.asarray(pts, dtype=np.float64)
    p = p - (p.max(0) + p.min(0)) / 2
    return p / np.linalg.norm(p, axis=1).max()


def _heart_unit() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    return _unit(np.stack([16 * np.sin(t) ** 3,
                           -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))],
                          axis=1))


_HEART = _heart_unit()

# standard normal quantiles of 256 equal-probability bins: pixel noise from random bytes,
# 5x faster than numpy's float32 normals
_GAUSS_LUT = np.array([NormalDist().inv_cdf((k + 0.5) / 256) for k in range(256)], dtype=np.float32)


def _class_parts(kind: str, rng: np.random.Generator, extent: float) -> list[tuple[np.ndarray, int]]:
    """Unit-radius polygons of a class shape (centre 0, circumscribing radius ~1), fill 1 or 0."""
    n_round = int(np.clip(extent * 1.2, 24, 96))
    if kind == "circle":
        return [(_regular(n_round), 1)]
    if kind == "square":
        return [(_regular(4, phase=np.pi / 4), 1)]
    if kind == "triangle":
        return [(_regular(3, phase=np.pi / 2), 1)]
    if kind == "star":
        inner = rng.uniform(0.38, 0.5)
        pts = _regular(10, phase=np.pi / 2)
        pts[1::2] *= inner
        return [(pts, 1)]
    if kind == "cross":
        w = rng.uniform(0.2, 0.3)
        q = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1),
             (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)]
        return [(np.array(q, dtype=np.float64), 1)]
    if kind == "ring":
        return [(_regular(n_round), 1), (_regular(n_round, rng.uniform(0.45, 0.62)), 0)]
    if kind == "crescent":
        bite = _regular(n_round, rng.uniform(0.72, 0.85)) + [rng.uniform(0.35, 0.5), 0.0]
        return [(_regular(n_round), 1), (bite, 0)]
    if kind == "heart":
        return [(_HEART.copy(), 1)]
    # the pretraining classes
    if kind == "pentagon":
        return [(_regular(5, phase=np.pi / 2), 1)]
    if kind == "hexagon":
        return [(_regular(6), 1)]
    if kind == "arrow":
        w, h, neck = rng.uniform(0.12, 0.22), rng.uniform(0.45, 0.6), rng.uniform(0.1, 0.3)
        return [(_unit([(-1, -w), (neck, -w), (neck, -h), (1, 0), (neck, h), (neck, w), (-1, w)]), 1)]
    if kind == "letter_l":
        t = rng.uniform(0.3, 0.4)
        return [(_unit([(-0.6, -1), (-0.6 + t, -1), (-0.6 + t, 1 - t), (0.6, 1 - t), (0.6, 1),
                        (-0.6, 1)]), 1)]
    if kind == "letter_t":
        t = rng.uniform(0.3, 0.4)
        return [(_unit([(-0.8, -1), (0.8, -1), (0.8, -1 + t), (t / 2, -1 + t), (t / 2, 1), (-t / 2, 1),
                        (-t / 2, -1 + t), (-0.8, -1 + t)]), 1)]
    if kind == "rhombus":
        r = rng.uniform(0.45, 0.6)
        return [(np.array([(1, 0), (0, r), (-1, 0), (0, -r)], dtype=np.float64), 1)]
    if kind == "trapezoid":
        top = rng.uniform(0.3, 0.55)
        return [(_unit([(-1, 0.55), (1, 0.55), (top, -0.55), (-top, -0.55)]), 1)]
    if kind == "semicircle":
        t = np.linspace(0, np.pi, n_round // 2 + 1)
        return [(_unit(np.stack([np.cos(t), np.sin(t)], axis=1)), 1)]
    raise ValueError(f"unknown shape kind {kind!r}")


def _place(pts: np.ndarray, cx: float, cy: float, radius: float, angle: float,
           aspect: float = 1.0) -> np.ndarray:
    """Stretch unit points by ``aspect`` along x, rotate by ``angle``, scale and move them."""
    p = pts * [math.sqrt(aspect), 1.0 / math.sqrt(aspect)]
    c, s = math.cos(angle), math.sin(angle)
    p = p @ np.array([[c, s], [-s, c]])
    return p * radius + [cx, cy]


@dataclass
class _Object:
    """One annotated object while an image is drawn."""

    label: int  # 1..len(CLASSES)
    ops: list
    colour: np.ndarray  # (3,) float32 RGB
    full: int  # pixels of the whole shape (coverage >= 0.5), including those outside the image
    visible: int  # of those, pixels inside the image and not covered by a later layer
    layer: int  # its value in the layer map (1, 2, ... in drawing order)
    alpha: np.ndarray  # (h, w) uint8 coverage (255 = full) of its in-image patch
    origin: tuple[int, int]  # x0, y0 of that patch
    covered: bool = False  # whether a later layer hides any pixel it painted (set at the end)


def _rasterize(ops: list, clip: tuple[int, int] | None = None):
    """Anti-aliased coverage of ``ops``.

    Args:
        ops: ("poly" | "line", (N, 2) float xy points, line width, fill 0/1), image frame;
            the bounds come from the fill-1 ops.
        clip: (W, H) to cut the patch to the image, or None for the whole shape.
    Returns:
        (alpha, x0, y0): (h, w) uint8 coverage (0 .. 255) whose pixel (0, 0) is image pixel
        (x0, y0); None if the patch is empty after clipping.
    """
    lo, hi = np.full(2, np.inf), np.full(2, -np.inf)
    for kind, pts, width, fill in ops:
        if fill:
            lo = np.minimum(lo, pts.min(0) - width / 2)
            hi = np.maximum(hi, pts.max(0) + width / 2)
    x0, y0 = math.floor(lo[0]) - 1, math.floor(lo[1]) - 1
    x1, y1 = math.ceil(hi[0]) + 1, math.ceil(hi[1]) + 1
    if clip is not None:
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, clip[0]), min(y1, clip[1])
    if x1 <= x0 or y1 <= y0:
        return None
    ss = SUPERSAMPLE
    mask = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
    draw = ImageDraw.Draw(mask)
    origin = np.array([x0, y0], dtype=np.float64)
    for kind, pts, width, fill in ops:
        # a supersampled pixel k covers [k, k + 1) / ss; PIL samples it at its integer corner
        q = ((pts - origin) * ss - 0.5).ravel().tolist()
        if kind == "poly":
            draw.polygon(q, fill=255 * fill)
        else:
            draw.line(q, fill=255 * fill, width=max(1, round(width * ss)), joint="curve")
    return np.asarray(mask.reduce(ss)), x0, y0


def _crop_to_image(alpha: np.ndarray, x0: int, y0: int, width: int, height: int):
    """The in-image part of a patch: (alpha, x0, y0) or None."""
    h, w = alpha.shape
    cx0, cy0 = max(x0, 0), max(y0, 0)
    cx1, cy1 = min(x0 + w, width), min(y0 + h, height)
    if cx1 <= cx0 or cy1 <= cy0:
        return None
    return alpha[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0], cx0, cy0


def box_of_mask(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight ``[x, y, w, h]`` (integer pixel edges) of the true pixels of a (H, W) mask; None if empty."""
    cols, rows = np.flatnonzero(mask.any(0)), np.flatnonzero(mask.any(1))
    if cols.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


# ----------------------------------------------------------------------------------------------
# Drawing


def _random_colour(rng: np.random.Generator, sat=(0.25, 1.0), val=(0.3, 1.0)) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*sat), rng.uniform(*val))
    return np.array(rgb, dtype=np.float32) * 255.0


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """An RGB image: a gradient between two colours plus two octaves of smooth noise.

    Built on a grid of ``fine`` cells along the long side (a linear gradient is exactly
    bilinear, the coarse octave is upsampled onto the grid) and resized once."""
    c0 = _random_colour(rng, sat=(0.0, 0.8), val=(0.15, 1.0))
    c1 = _random_colour(rng, sat=(0.0, 0.8), val=(0.15, 1.0))
    coarse, fine = int(rng.integers(3, 7)), int(rng.integers(20, 60))
    amp_coarse, amp_fine = rng.uniform(10, 35), rng.uniform(0, 15)
    long_side = max(width, height)
    gw, gh = max(2, round(fine * width / long_side)), max(2, round(fine * height / long_side))
    phi = rng.uniform(0, 2 * np.pi)
    t = (np.linspace(0, 1, gh)[:, None] * math.sin(phi) * height
         + np.linspace(0, 1, gw)[None, :] * math.cos(phi) * width)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    grid = c0 + (c1 - c0) * t[..., None]
    cw, ch = max(2, round(coarse * width / long_side)), max(2, round(coarse * height / long_side))
    noise = np.clip(128 + rng.standard_normal((ch, cw, 3)) * amp_coarse, 0, 255).astype(np.uint8)
    grid += np.asarray(Image.fromarray(noise, "RGB").resize((gw, gh), Image.BICUBIC), np.float32) - 128
    grid += rng.standard_normal((gh, gw, 3)) * amp_fine
    grid = np.clip(grid + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(grid, "RGB").resize((width, height), Image.BILINEAR)


def _paint(canvas: Image.Image, alpha: np.ndarray, x0: int, y0: int, colour: np.ndarray,
           shading: float = 0.0, rng: np.random.Generator | None = None) -> None:
    """Blend ``colour`` into the RGB ``canvas`` with uint8 coverage ``alpha`` (h, w) at (x0, y0);
    ``shading`` > 0 adds a linear brightness ramp of that relative strength in a random direction."""
    h, w = alpha.shape
    mask = Image.fromarray(alpha, "L")
    if shading > 0 and rng is not None:
        phi = rng.uniform(0, 2 * np.pi)
        ramp = (np.linspace(-1, 1, w, dtype=np.float32)[None, :] * math.cos(phi)
                + np.linspace(-1, 1, h, dtype=np.float32)[:, None] * math.sin(phi))
        fill = np.clip(colour * (1.0 + shading * ramp[..., None]) + 0.5, 0, 255).astype(np.uint8)
        canvas.paste(Image.fromarray(fill, "RGB"), (x0, y0), mask)
    else:
        canvas.paste(tuple(int(c + 0.5) for c in colour), (x0, y0, x0 + w, y0 + h), mask)


def _inside(rng: np.random.Generator, side: float, margin: float) -> float:
    """A coordinate in [margin, side - margin] (the middle if that is empty): filled
    distractors stay mostly inside, so that a cut-off one never passes for a class."""
    return float(rng.uniform(margin, side - margin)) if side > 2 * margin else side / 2


def _clutter_ops(rng: np.random.Generator, width: int, height: int, overlay: bool) -> list:
    """Ops of one distractor that is no class: lines, scribbles, arcs, open polygons, bars,
    and (under the objects only) scalloped splats, elongated ellipses and dots."""
    short = min(width, height)
    kinds = ("line", "scribble", "arc", "bar") if overlay else (
        "line", "scribble", "arc", "open_polygon", "bar", "blob", "ellipse", "dots")
    kind = kinds[int(rng.integers(len(kinds)))]
    cx, cy = rng.uniform(0, width), rng.uniform(0, height)
    stroke = float(rng.uniform(1.0, 3.5))
    if kind == "line":
        n = int(rng.integers(2, 4))
        pts = np.stack([rng.uniform(-0.1 * width, 1.1 * width, n),
                        rng.uniform(-0.1 * height, 1.1 * height, n)], axis=1)
        return [("line", pts, stroke, 1)]
    if kind == "scribble":
        steps = rng.normal(0, rng.uniform(8, 40), (int(rng.integers(4, 10)), 2))
        return [("line", np.cumsum(steps, axis=0) + [cx, cy], stroke, 1)]
    if kind == "arc":
        r = short * math.exp(rng.uniform(math.log(0.04), math.log(0.3)))
        a0 = rng.uniform(0, 2 * np.pi)
        t = a0 + np.linspace(0, rng.uniform(0.4, 1.5) * np.pi, 24)
        pts = np.stack([np.cos(t), np.sin(t) * rng.uniform(0.5, 1.0)], axis=1)
        return [("line", _place(pts, cx, cy, r, rng.uniform(0, 2 * np.pi)), stroke, 1)]
    if kind == "open_polygon":
        n = int(rng.integers(3, 5))
        r = short * math.exp(rng.uniform(math.log(0.04), math.log(0.25)))
        pts = _regular(n, phase=rng.uniform(0, 2 * np.pi))[: int(rng.integers(2, n + 1))]
        return [("line", _place(pts, cx, cy, r, 0.0), stroke, 1)]
    if kind == "bar":
        length = short * rng.uniform(0.08, 0.5)
        thick = min(length / rng.uniform(4, 10), 12.0)
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * [1, thick / length]
        return [("poly", _place(pts, cx, cy, length / 2, rng.uniform(0, 2 * np.pi)), 0, 1)]
    if kind == "blob":
        # an elongated splat with a scalloped outline (2nd harmonic plus two of the 6th..9th):
        # neither a polygon, a circle nor a smooth heart
        t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        rad = 1.0 + rng.uniform(0.15, 0.3) * np.cos(2 * t + rng.uniform(0, 2 * np.pi))
        for k in rng.choice(np.arange(6, 10), 2, replace=False):
            rad += rng.uniform(0.05, 0.1) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
        pts = np.stack([np.cos(t) * rad, np.sin(t) * rad], axis=1) / rad.max()
        r = short * math.exp(rng.uniform(math.log(0.03), math.log(0.3)))
        cx, cy = _inside(rng, width, 0.8 * r), _inside(rng, height, 0.8 * r)
        return [("poly", _place(pts, cx, cy, r, 0.0), 0, 1)]
    if kind == "ellipse":
        r = short * math.exp(rng.uniform(math.log(0.03), math.log(0.25)))
        pts = _regular(48) * [1.0, 1.0 / rng.uniform(2.5, 4.0)]
        cx, cy = _inside(rng, width, 0.8 * r), _inside(rng, height, 0.8 * r)
        return [("poly", _place(pts, cx, cy, r, rng.uniform(0, 2 * np.pi)), 0, 1)]
    # dots: a cluster of tiny discs, smaller than the smallest object
    n = int(rng.integers(3, 13))
    spread = rng.uniform(10, 60)
    centres = rng.normal(0, spread / 2, (n, 2)) + [cx, cy]
    return [("poly", c + _regular(8, rng.uniform(1.0, 2.5)), 0, 1) for c in centres]


def _object_ops(rng: np.random.Generator, label: int, width: int, height: int) -> list:
    """Ops of one class object of contiguous label ``label`` at a random place, size, angle."""
    short = min(width, height)
    extent = short * math.exp(rng.uniform(math.log(SIZE_RANGE[0]), math.log(SIZE_RANGE[1])))
    aspect = math.exp(rng.uniform(-math.log(MAX_ASPECT), math.log(MAX_ASPECT)))
    angle = rng.uniform(0, 2 * np.pi)
    # at most ~20 % of the extent may leave the image
    m = 0.3 * extent
    cx, cy = rng.uniform(m, width - m), rng.uniform(m, height - m)
    parts = _class_parts(CLASSES[label - 1], rng, extent)
    return [("poly", _place(p, cx, cy, extent / 2, angle, aspect), 0, fill) for p, fill in parts]


def _overlap_ok(layer_patch: np.ndarray, mask: np.ndarray, layer_object: list[int],
                objects: list[_Object]) -> tuple[bool, np.ndarray]:
    """Whether covering ``mask`` leaves every object >= MIN_VISIBLE_FRACTION visible.

    Args:
        layer_patch: (h, w) int16 layer map under the patch; 0 where no layer owns a pixel.
        mask: (h, w) bool pixels the new layer would own.
        layer_object: object index of each layer (``layer - 1``), -1 for occluding strokes.
    Returns:
        (ok, (len(objects),) pixels each object would lose).
    """
    under = layer_patch[mask]
    under = np.asarray(layer_object, dtype=np.int64)[under[under > 0] - 1]
    lost = np.bincount(under[under >= 0], minlength=len(objects))
    for j in np.flatnonzero(lost):
        if objects[j].visible - lost[j] < MIN_VISIBLE_FRACTION * objects[j].full:
            return False, lost
    return True, lost


def _pick_colour(rng: np.random.Generator, canvas_patch: Image.Image, mask: np.ndarray,
                 covered: list[np.ndarray]) -> np.ndarray:
    """A random colour at least MIN_CONTRAST away from the mean it covers and from the covered
    objects' colours (the best of a few draws)."""
    refs = [np.asarray(canvas_patch, dtype=np.float32)[mask].mean(0)] + covered
    best, best_d = None, -1.0
    for _ in range(6):
        c = _random_colour(rng)
        d = min(float(np.linalg.norm(c - r)) for r in refs)
        if d > best_d:
            best, best_d = c, d
        if d >= MIN_CONTRAST:
            break
    return best


def _pixel_noise(rng: np.random.Generator, canvas: Image.Image) -> Image.Image:
    """Grey pixel noise: 128 + sigma * N(0, 1) per pixel, added to all three channels."""
    width, height = canvas.size
    lut = np.clip(128.5 + _GAUSS_LUT * rng.uniform(2.0, 9.0), 0, 255).astype(np.uint8)
    noise = Image.frombytes("L", (width, height), lut[np.frombuffer(rng.bytes(height * width), np.uint8)])
    return ImageChops.add(canvas, Image.merge("RGB", (noise, noise, noise)), 1.0, -128)


def _draw_image(seed: int, split: str, index: int):
    """Draw image ``index`` of ``split``.

    Returns:
        (image, annotations, objects): the PIL RGB image, a list of dicts with ``category_id``,
        ``bbox`` [x, y, w, h] (integer pixel edges) and ``area`` (visible pixels), one per object
        in drawing order, and the ``_Object`` records (ops, colour, full/visible pixel counts).
    """
    rng = np.random.default_rng([GENERATOR_VERSION, seed, _SPLIT_CODE[split], index])
    width, height = (int(v) for v in rng.integers(IMAGE_SIDE_RANGE[0], IMAGE_SIDE_RANGE[1] + 1, 2))
    canvas = _background(rng, width, height)

    for _ in range(int(rng.poisson(MEAN_CLUTTER))):
        r = _rasterize(_clutter_ops(rng, width, height, overlay=False), clip=(width, height))
        if r is not None:
            _paint(canvas, *r, _random_colour(rng, sat=(0.0, 1.0), val=(0.1, 1.0)))

    # layer map: which object or occluding stroke owns each pixel (coverage >= 0.5), 0 = none
    layers = np.zeros((height, width), dtype=np.int16)
    layer_object: list[int] = []
    objects: list[_Object] = []
    for _ in range(min(int(rng.poisson(MEAN_OBJECTS)), MAX_OBJECTS)):
        label = int(rng.integers(1, len(CLASSES) + 1))
        for _try in range(PLACEMENT_TRIES):
            ops = _object_ops(rng, label, width, height)
            whole = _rasterize(ops)
            full = int((whole[0] >= 128).sum()) if whole is not None else 0
            cropped = _crop_to_image(*whole, width, height) if full else None
            if cropped is None:
                continue
            alpha, x0, y0 = cropped
            mask = alpha >= 128
            inside = int(mask.sum())
            if inside < MIN_VISIBLE_FRACTION * full:
                continue
            h, w = alpha.shape
            layer_patch = layers[y0:y0 + h, x0:x0 + w]
            ok, lost = _overlap_ok(layer_patch, mask, layer_object, objects)
            if not ok:
                continue
            covered = [objects[j].colour for j in np.flatnonzero(lost)]
            colour = _pick_colour(rng, canvas.crop((x0, y0, x0 + w, y0 + h)), mask, covered)
            _paint(canvas, alpha, x0, y0, colour, shading=rng.uniform(0.0, 0.25), rng=rng)
            for j in np.flatnonzero(lost):
                objects[j].visible -= int(lost[j])
            layer_object.append(len(objects))
            layer_patch[mask] = len(layer_object)
            objects.append(_Object(label, ops, colour, full, inside, len(layer_object), alpha, (x0, y0)))
            break

    for _ in range(int(rng.poisson(MEAN_OCCLUDERS))):
        r = _rasterize(_clutter_ops(rng, width, height, overlay=True), clip=(width, height))
        colour = _random_colour(rng, sat=(0.0, 1.0), val=(0.1, 1.0))
        if r is None:
            continue
        alpha, x0, y0 = r
        h, w = alpha.shape
        mask = alpha >= 128
        layer_patch = layers[y0:y0 + h, x0:x0 + w]
        ok, lost = _overlap_ok(layer_patch, mask, layer_object, objects)
        if not ok:
            continue
        _paint(canvas, alpha, x0, y0, colour)
        for j in np.flatnonzero(lost):
            objects[j].visible -= int(lost[j])
        layer_object.append(-1)
        layer_patch[mask] = len(layer_object)

    image = _pixel_noise(rng, canvas)

    annotations = []
    for obj in objects:
        (x0, y0), (h, w) = obj.origin, obj.alpha.shape
        layer_patch = layers[y0:y0 + h, x0:x0 + w]
        # box: every pixel it painted (coverage > 0) that no later layer owns
        painted = obj.alpha > 0
        shown = painted & (layer_patch <= obj.layer)
        obj.covered = bool((painted & ~shown).any())
        box = box_of_mask(shown)
        area = int((layer_patch == obj.layer).sum())
        assert box is not None and area == obj.visible, "visible pixel bookkeeping"
        annotations.append({"category_id": obj.label,
                            "bbox": [box[0] + x0, box[1] + y0, box[2], box[3]],
                            "area": area})
    return image, annotations, objects


def render_image(seed: int, split: str, index: int) -> tuple[Image.Image, list[dict]]:
    """Image ``index`` (from 0) of ``split`` as it is written, before JPEG compression.

    Returns:
        (image, annotations): PIL RGB; per object ``category_id`` (1..len(CLASSES)),
        ``bbox`` [x, y, w, h] integer pixel edges of the visible pixels, ``area`` visible pixels.
        Empty list when the image has no objects.
    """
    if split not in _SPLIT_CODE:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    image, annotations, _ = _draw_image(seed, split, index)
    return image, annotations


PRETRAIN_EXTENT = (0.35, 0.9)  # object extent / crop side, uniform
MEAN_PRETRAIN_CLUTTER = 2.0  # Poisson means of distractors and of occluding strokes per crop
MEAN_PRETRAIN_OCCLUDERS = 0.5


def render_pretrain_crop(seed: int, index: int, size: int = 64) -> tuple[Image.Image, int]:
    """Crop ``index`` (from 0) of the backbone-pretraining set: one object of a
    ``PRETRAIN_CLASSES`` class, drawn as the detection images draw theirs, on their kind of
    background and clutter (fewer pieces: the crop is small).

    A stand-in for ImageNet pretraining that needs no download: a backbone classifies shapes
    that are none of the detection classes, so it learns edges, corners and outlines, not the
    task's labels. Deterministic per ``(seed, index)``, with random streams apart from the
    detection images'.

    Returns:
        (image, label): a ``size`` x ``size`` PIL RGB image and the class index, 0-based into
        ``PRETRAIN_CLASSES``.
    """
    if size < 16:
        raise ValueError(f"pretraining crop size {size}: expected at least 16 px")
    rng = np.random.default_rng([GENERATOR_VERSION, seed, _PRETRAIN_CODE, index])
    canvas = _background(rng, size, size)
    for _ in range(int(rng.poisson(MEAN_PRETRAIN_CLUTTER))):
        r = _rasterize(_clutter_ops(rng, size, size, overlay=False), clip=(size, size))
        if r is not None:
            _paint(canvas, *r, _random_colour(rng, sat=(0.0, 1.0), val=(0.1, 1.0)))
    label = int(rng.integers(len(PRETRAIN_CLASSES)))
    extent = size * rng.uniform(*PRETRAIN_EXTENT)
    aspect = math.exp(rng.uniform(-math.log(MAX_ASPECT), math.log(MAX_ASPECT)))
    angle = rng.uniform(0, 2 * np.pi)
    cx, cy = size / 2 + rng.uniform(-0.1, 0.1, 2) * size
    parts = _class_parts(PRETRAIN_CLASSES[label], rng, extent)
    ops = [("poly", _place(p, cx, cy, extent / 2, angle, aspect), 0, fill) for p, fill in parts]
    alpha, x0, y0 = _rasterize(ops, clip=(size, size))
    h, w = alpha.shape
    colour = _pick_colour(rng, canvas.crop((x0, y0, x0 + w, y0 + h)), alpha >= 128, [])
    _paint(canvas, alpha, x0, y0, colour, shading=rng.uniform(0.0, 0.25), rng=rng)
    for _ in range(int(rng.poisson(MEAN_PRETRAIN_OCCLUDERS))):
        r = _rasterize(_clutter_ops(rng, size, size, overlay=True), clip=(size, size))
        colour = _random_colour(rng, sat=(0.0, 1.0), val=(0.1, 1.0))
        if r is not None:
            _paint(canvas, *r, colour)
    return _pixel_noise(rng, canvas), label


def _write_one(task: tuple[str, int, str, int]) -> tuple[dict, list[dict]]:
    """Draw and write one image; returns its COCO image record and annotations (no ids)."""
    folder, seed, split, index = task
    image, annotations, _ = _draw_image(seed, split, index)
    file_name = f"{index + 1:06d}.jpg"
    image.save(Path(folder) / "images" / split / file_name, format="JPEG", quality=JPEG_QUALITY)
    record = {"id": index + 1, "file_name": file_name, "width": image.width, "height": image.height}
    return record, annotations


# ----------------------------------------------------------------------------------------------
# Writing the dataset


def _coco(split: str, params: dict, images: list[dict], annotations: list[list[dict]] | None) -> dict:
    out = {
        "info": {"description": f"softteacher embedded shapes dataset, split {split}",
                 "version": str(GENERATOR_VERSION), "seed": params["seed"]},
        "licenses": [],
        "images": images,
        "categories": categories(),
    }
    if annotations is not None:
        anns, next_id = [], 1
        for image, per_image in zip(images, annotations):
            for a in per_image:
                anns.append({"id": next_id, "image_id": image["id"], "iscrowd": 0, **a})
                next_id += 1
        out["annotations"] = anns
    return out


def _params(seed: int, num_train: int, num_val: int, num_unlabeled: int) -> dict:
    return {"generator": "softteacher.shapes", "version": GENERATOR_VERSION, "seed": seed,
            "num_train": num_train, "num_val": num_val, "num_unlabeled": num_unlabeled}


def _is_complete(folder: Path, params: dict) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()) == params
    except (OSError, ValueError):
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _remove_stale_temps(root: Path, name: str) -> None:
    """Remove ``.{name}.tmp-PID-*`` / ``.{name}.old-PID-*`` folders left by processes of this
    machine that died mid-way (they never look complete: only ``name`` itself is read)."""
    for p in root.glob(f".{name}.*-*-*"):
        try:
            pid = int(p.name[len(name) + 2:].split("-")[1])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def _run_tasks(tasks: list, workers: int | None):
    if workers is None:
        workers = 1 if len(tasks) < _AUTO_POOL_MIN_IMAGES else min(2, os.cpu_count() or 1)
    if workers <= 1:
        return [_write_one(t) for t in tasks]
    chunk = max(1, min(32, len(tasks) // (workers * 8)))
    # spawn: workers share nothing with a parent that may run torch threads
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return list(pool.imap(_write_one, tasks, chunksize=chunk))


def _generate_into(folder: Path, params: dict, workers: int | None) -> None:
    sizes = {"train": params["num_train"], "val": params["num_val"],
             "unlabeled": params["num_unlabeled"]}
    for split in SPLITS:
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
    (folder / "annotations").mkdir(exist_ok=True)
    tasks = [(str(folder), params["seed"], split, i) for split in SPLITS for i in range(sizes[split])]
    results = _run_tasks(tasks, workers)
    paths = shapes_paths(folder)
    start = 0
    for split in SPLITS:
        part = results[start:start + sizes[split]]
        start += sizes[split]
        images = [r for r, _ in part]
        anns = [a for _, a in part]
        # plain writes: the whole folder becomes visible at once when it is renamed
        if split == "unlabeled":
            _write_json(paths.unlabeled_json, _coco(split, params, images, None))
            _write_json(paths.unlabeled_gt_json, _coco(split, params, images, anns))
        else:
            _write_json(getattr(paths, f"{split}_json"), _coco(split, params, images, anns))


def _write_json(path: str | os.PathLike, obj: dict, indent: int | None = None) -> None:
    Path(path).write_text(json.dumps(obj, indent=indent))


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def generate_shapes(root: str | os.PathLike | None = None, *, seed: int = 0,
                    num_train: int = DEFAULT_NUM_TRAIN, num_val: int = DEFAULT_NUM_VAL,
                    num_unlabeled: int = DEFAULT_NUM_UNLABELED, force: bool = False,
                    workers: int | None = None) -> ShapesPaths:
    """Write the ``shapes`` dataset once (COCO format) and return its paths.

    Args:
        root: cache folder (default ``default_root()``); the data go to its subfolder
            ``dataset_name(...)``, so seeds and sizes coexist.
        seed: >= 0; the same seed gives byte-identical json and identical images.
        num_train, num_val, num_unlabeled: images per split (0 allowed).
        force: regenerate even if a complete folder exists.
        workers: processes; default ``min(2, os.cpu_count())`` (in-process for < 64 images).
    Returns:
        ShapesPaths of the complete folder. A complete cached folder returns at once.
    """
    seed = _check_count("seed", seed)
    num_train, num_val, num_unlabeled = (_check_count(n, v) for n, v in (
        ("num_train", num_train), ("num_val", num_val), ("num_unlabeled", num_unlabeled)))
    if workers is not None and (_check_count("workers", workers) < 1):
        raise ValueError(f"workers must be >= 1, got {workers}")
    root = Path(root if root is not None else default_root()).expanduser().absolute()
    name = dataset_name(seed, num_train, num_val, num_unlabeled)
    final = root / name
    params = _params(seed, num_train, num_val, num_unlabeled)
    if not force and _is_complete(final, params):
        log.debug("shapes: using cached %s", final)
        return shapes_paths(final)

    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root, name)
    tmp = root / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    total = num_train + num_val + num_unlabeled
    log.info("shapes: generating %d images into %s", total, final)
    t0 = time.perf_counter()
    try:
        tmp.mkdir()
        _generate_into(tmp, params, workers)
        _write_json(tmp / MARKER, params, indent=2)
        if final.exists():
            if not force and _is_complete(final, params):  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return shapes_paths(final)
            old = root / f".{name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, final)
            except OSError:
                if not _is_complete(final, params):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("shapes: %d images in %.1f s", total, time.perf_counter() - t0)
    return shapes_paths(final)


# ----------------------------------------------------------------------------------------------
# Statistics


@dataclass
class SplitStats:
    """Counts over one COCO json (computed from the file)."""

    images: int = 0
    boxes: int = 0
    per_class: dict[str, int] = field(default_factory=dict)
    small: int = 0  # area < 32²
    medium: int = 0  # 32² <= area < 96²
    large: int = 0  # area >= 96²
    max_per_image: int = 0
    empty_images: int = 0
    width_range: tuple[int, int] = (0, 0)
    height_range: tuple[int, int] = (0, 0)

    @property
    def mean_per_image(self) -> float:
        return self.boxes / self.images if self.images else 0.0


def split_stats(ann_file: str | os.PathLike) -> SplitStats:
    """Statistics of one COCO json; a json without ``annotations`` counts images only."""
    data = json.loads(Path(ann_file).read_text())
    images = data.get("images", [])
    names = {c["id"]: c["name"] for c in data.get("categories", [])}
    anns = data.get("annotations", [])
    s = SplitStats(images=len(images), boxes=len(anns))
    s.per_class = {n: 0 for n in names.values()}
    per_image = {im["id"]: 0 for im in images}
    for a in anns:
        cname = names.get(a["category_id"], str(a["category_id"]))
        s.per_class[cname] = s.per_class.get(cname, 0) + 1
        per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
        area = a["area"]
        if area < 32 ** 2:
            s.small += 1
        elif area < 96 ** 2:
            s.medium += 1
        else:
            s.large += 1
    s.max_per_image = max(per_image.values(), default=0)
    s.empty_images = sum(1 for n in per_image.values() if n == 0)
    if images:
        ws, hs = [im["width"] for im in images], [im["height"] for im in images]
        s.width_range, s.height_range = (min(ws), max(ws)), (min(hs), max(hs))
    return s


def describe(paths: ShapesPaths) -> str:
    """Human-readable statistics of a generated dataset, computed from its json files."""
    rows = [("train", split_stats(paths.train_json)), ("val", split_stats(paths.val_json)),
            ("unlabeled (hidden gt)", split_stats(paths.unlabeled_gt_json))]
    unlabeled = split_stats(paths.unlabeled_json)
    lines = [f"shapes dataset: {paths.root}",
             f"  classes ({len(CLASSES)}): {', '.join(CLASSES)}"]
    for name, s in rows:
        lines.append(
            f"  {name}: {s.images} images, {s.boxes} boxes ({s.mean_per_image:.2f}/image, "
            f"max {s.max_per_image}, {s.empty_images} images without boxes); "
            f"by object area small {s.small} / medium {s.medium} / large {s.large}; "
            f"width {s.width_range[0]}-{s.width_range[1]}, height {s.height_range[0]}-{s.height_range[1]}")
    lines.append(f"  unlabeled json: {unlabeled.images} images, no annotations")
    lines.append("  boxes per class (train / val / unlabeled gt):")
    width = max(len(c) for c in CLASSES)
    for c in CLASSES:
        counts = " / ".join(str(s.per_class.get(c, 0)) for _, s in rows)
        lines.append(f"    {c:<{width}}  {counts}")
    return "\n".join(lines)
