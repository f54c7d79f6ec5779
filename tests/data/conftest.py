"""Tiny COCO / VOC / image-folder datasets written into tmp_path with PIL."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_image(path: Path, width: int, height: int, mode: str = "RGB", seed: int = 0) -> np.ndarray:
    """Write a random image; returns its (H, W, 3) uint8 RGB pixels (PNG keeps them exactly)."""
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(rgb)
    if mode != "RGB":
        im = im.convert(mode)
    im.save(path)
    return np.array(im.convert("RGB"))


def cut_short(path: Path) -> None:
    """Keep the first half of an image file: its header reads, its pixels do not decode."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def make_coco(tmp_path):
    """``make_coco(images, annotations, categories, name=..., files=True) -> json path``.

    ``images``: (id, file_name, width, height); image files are written beside the json
    unless ``files`` is False. ``annotations``: (id, image_id, category_id, [x, y, w, h]) or
    with a 5th item iscrowd. ``categories``: (id, name).
    """

    def make(images, annotations=(), categories=((1, "cat"),), name="ann.json", files=True,
             extra=None):
        root = tmp_path / "coco"
        if files:
            for i, (_, file_name, w, h) in enumerate(images):
                write_image(root / file_name, w, h, seed=i)
        data = {
            "info": {"description": "tiny"},
            "images": [{"id": i, "file_name": f, "width": w, "height": h} for i, f, w, h in images],
            "annotations": [{"id": a[0], "image_id": a[1], "category_id": a[2], "bbox": a[3],
                             "area": a[3][2] * a[3][3], "iscrowd": a[4] if len(a) > 4 else 0}
                            for a in annotations],
            "categories": [{"id": i, "name": n} for i, n in categories],
            **(extra or {}),
        }
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
        return path

    return make


def voc_xml(name: str, width: int, height: int, objects) -> str:
    """``objects``: (class, xmin, ymin, xmax, ymax) or with a 6th item difficult."""
    objs = "".join(
        f"<object><name>{o[0]}</name><difficult>{o[5] if len(o) > 5 else 0}</difficult>"
        f"<bndbox><xmin>{o[1]}</xmin><ymin>{o[2]}</ymin><xmax>{o[3]}</xmax><ymax>{o[4]}</ymax>"
        f"</bndbox></object>" for o in objects)
    return (f"<annotation><filename>{name}.jpg</filename><size><width>{width}</width>"
            f"<height>{height}</height><depth>3</depth></size>{objs}</annotation>")


@pytest.fixture
def make_voc(tmp_path):
    """``make_voc({name: (width, height, objects)}, split="trainval") -> VOC root``."""

    def make(images: dict, split: str = "trainval"):
        root = tmp_path / "VOC"
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        for i, (name, (w, h, objects)) in enumerate(images.items()):
            write_image(root / "JPEGImages" / f"{name}.jpg", w, h, seed=i)
            (root / "Annotations" / f"{name}.xml").write_text(voc_xml(name, w, h, objects))
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(images) + "\n")
        return root

    return make
