"""Pictures of the views with boxes mapped into each: ``softteacher data show``.

Each PNG shows, side by side: the original image with its ground truth; the weak view with the
ground truth mapped original -> weak; the strong view with the ground truth mapped
original -> strong (colour per label) and, on top in thin white, the weak-view boxes mapped
weak -> strong with ``geometry.map_boxes`` (what pseudo labels go through). When the bookkeeping
is right, the white boxes sit on the coloured ones and both enclose the objects.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from softteacher.config import AugmentConfig
from softteacher.geometry import map_boxes
from softteacher.io import save_image
from softteacher.visualize import draw_boxes, side_by_side


def _wrap(title: str, width: int, font) -> list[str]:
    """``title``'s comma-separated parts in lines no wider than ``width`` px (a part wider than
    that on a line of its own)."""
    lines: list[str] = []
    for part in title.split(", "):
        line = f"{lines[-1]}, {part}" if lines else part
        if lines and font.getlength(line) <= width:
            lines[-1] = line
        else:
            lines.append(part)
    return lines


def _panels(items: list[tuple[Image.Image, str]]) -> list[Image.Image]:
    """Each image under its caption on white, wrapped to the image's width; all captions given
    the height of the longest, so the images stay level side by side."""
    font = ImageFont.load_default()
    line_height = font.getbbox("Ag")[3] + 3
    wrapped = [_wrap(title, image.width - 4, font) for image, title in items]
    header = max(len(lines) for lines in wrapped) * line_height + 2
    out = []
    for (image, _), lines in zip(items, wrapped):
        canvas = Image.new("RGB", (image.width, image.height + header), (255, 255, 255))
        canvas.paste(image, (0, header))
        draw = ImageDraw.Draw(canvas)
        for k, line in enumerate(lines):
            draw.text((2, 1 + k * line_height), line, fill=(0, 0, 0), font=font)
        out.append(canvas)
    return out


def view_panels(image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                rng: np.random.Generator, augment: AugmentConfig,
                names: list[str] | None = None) -> tuple[Image.Image, dict[str, int]]:
    """One picture of an image and its weak and strong views, boxes mapped through the matrices.

    Args:
        image: (3, H, W) uint8 original.
        boxes: (N, 4) float xyxy, original frame; N == 0 draws no boxes.
        labels: (N,) int64 labels 1..C.
        rng: draws the views (``unlabeled_views``).
    Returns:
        the picture and the number of ground-truth boxes dropped in each view
        (``{"weak": k, "strong": k}``, boxes left with less than ``min_box_size``).
    """
    from softteacher.data.transforms import boxes_into_view, unlabeled_views

    boxes = boxes.reshape(-1, 4).float()
    weak, strong = unlabeled_views(image, rng, augment)
    boxes_weak, keep_weak = boxes_into_view(boxes, weak, augment.min_box_size)
    boxes_strong, keep_strong = boxes_into_view(boxes, strong, augment.min_box_size)
    # The pseudo-label path: weak-view boxes -> strong view through M_strong @ M_weak^-1.
    weak_to_strong = map_boxes(boxes_weak, weak.matrix, strong.matrix, strong.size, augment.box_mapping)

    h, w = image.shape[-2:]
    original = draw_boxes(image, boxes, labels.tolist(), names=names)
    weak_pic = draw_boxes(weak.image, boxes_weak, labels[keep_weak].tolist(), names=names)
    strong_pic = draw_boxes(strong.image, boxes_strong, labels[keep_strong].tolist(), names=names)
    strong_pic = draw_boxes(strong_pic, weak_to_strong, color=(255, 255, 255), width=1)
    strong_ops = (strong.ops if augment.independent_views
                  else ("as weak",) + strong.ops[len(weak.ops):])
    panels = _panels([
        (original, f"original {w}x{h}, {len(boxes)} boxes"),
        (weak_pic, "weak: " + ", ".join(weak.ops)),
        (strong_pic, "strong: " + ", ".join(strong_ops)),
    ])
    dropped = {"weak": int((~keep_weak).sum()), "strong": int((~keep_strong).sum())}
    return side_by_side(panels), dropped


def show_views(path: str | os.PathLike, images: str = "", split: str = "trainval",
               out_dir: str | os.PathLike = "runs/views", num: int = 4, seed: int = 0,
               augment: AugmentConfig | None = None) -> list[Path]:
    """Draw the first ``num`` images of a set with their weak and strong views (and boxes,
    where the set has them).

    Args:
        path: COCO json, VOC root or folder of images (``datasets.load_as_found``).
        images, split: passed to ``load_as_found``.
        out_dir: folder for the PNGs (created); files are written atomically.
        num: how many images (the first ones of the set).
        seed: image ``i`` is drawn with ``numpy.random.default_rng([seed, i])``.
        augment: view magnitudes; default ``AugmentConfig()``.
    Returns:
        the written PNG paths, one per image.
    """
    from softteacher.data.datasets import check_files_exist, load_as_found, read_image

    if num < 1:
        raise ValueError(f"--num {num}: expected 1 or more images to draw")
    if seed < 0:
        raise ValueError(f"--seed {seed}: expected 0 or more")
    augment = augment or AugmentConfig()
    dset, _ = load_as_found(path, images=images, split=split)
    # the images drawn are there, or the message says which folder holds them
    check_files_exist(dataclasses.replace(dset, records=dset.records[:num]), "--images DIR")
    names = dset.categories.names
    out = Path(out_dir)
    written = []
    for i, rec in enumerate(dset.records[:num]):
        image = read_image(rec.path, rec, dset.source)
        boxes = torch.as_tensor(np.asarray(rec.boxes), dtype=torch.float32).reshape(-1, 4)
        labels = torch.as_tensor(np.asarray(rec.labels), dtype=torch.int64).reshape(-1)
        picture, _ = view_panels(image, boxes, labels, np.random.default_rng([seed, i]),
                                 augment, names)
        target = out / f"views_{i:03d}_image{rec.image_id}.png"
        save_image(target, picture)
        written.append(target)
    return written
