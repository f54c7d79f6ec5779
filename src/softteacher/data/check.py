"""``softteacher data check``: validate a dataset and summarise it, or list every problem."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from softteacher.data.datasets import (
    absolute_names_hint,
    image_folder_found,
    load_as_found,
    missing_image_records,
)
from softteacher.data.records import DatasetError, DetectionSet, object_areas

SMALL, MEDIUM = 32 ** 2, 96 ** 2  # COCO size ranges, on each object's area


def dataset_stats(dset: DetectionSet) -> dict:
    """Counts of a loaded set.

    Returns:
        dict with ``images``, ``boxes``, ``ignored`` (crowd / difficult boxes),
        ``images_without_boxes``, ``sizes`` ({"small", "medium", "large"}: objects by area
        < 32², < 96², larger; the area evaluation ranges them by: the source's ``area``, else
        the box's ``w * h``), ``classes``: one (label, category id, name, boxes)
        per class, and ``report``: the loader's counted clips and drops, as lines.
    """
    boxes = [np.asarray(r.boxes, dtype=np.float64).reshape(-1, 4) for r in dset.records]
    area = np.concatenate([object_areas(r) for r in dset.records]) if dset.records else np.zeros(0)
    labels = np.concatenate([np.asarray(r.labels, dtype=np.int64).reshape(-1) for r in dset.records])
    per_label = np.bincount(labels, minlength=len(dset.categories) + 1)
    cats = dset.categories
    return {
        "images": len(dset.records),
        "boxes": sum(len(b) for b in boxes),
        "ignored": sum(len(r.ignore_boxes) for r in dset.records),
        "images_without_boxes": sum(len(b) == 0 for b in boxes),
        "sizes": {"small": int((area < SMALL).sum()),
                  "medium": int(((area >= SMALL) & (area < MEDIUM)).sum()),
                  "large": int((area >= MEDIUM).sum())},
        "classes": [(label, cats.category_id(label), cats.name(label), int(per_label[label]))
                    for label in range(1, len(cats) + 1)],
        "report": dset.report.lines(),
    }


def format_stats(dset: DetectionSet, kind: str, stats: dict) -> str:
    lines = [f"OK: {dset.source} ({kind})", f"  images: {stats['images']}"]
    if dset.has_annotations:
        s = stats["sizes"]
        lines += [
            f"  images without boxes: {stats['images_without_boxes']}",
            f"  boxes: {stats['boxes']}",
            f"  ignored boxes (crowd / difficult): {stats['ignored']}",
            (f"  box sizes (the source's area, else w*h, as evaluation ranges them): "
             f"small (< 32²) {s['small']}, medium (< 96²) {s['medium']}, large {s['large']}"),
        ]
    lines.append(f"  classes: {len(stats['classes'])}")
    if stats["classes"]:
        width = max(len(name) for _, _, name, _ in stats["classes"])
        head = f"    {'label':>5}  {'id':>5}  {'name':<{width}}"
        lines.append(head + ("  boxes" if dset.has_annotations else ""))
        for label, cid, name, n in stats["classes"]:
            row = f"    {label:>5}  {cid:>5}  {name:<{width}}"
            lines.append(row + (f"  {n:>5}" if dset.has_annotations else ""))
    if stats["report"]:
        lines.append("  changed while loading:")
        lines += [f"    {line}" for line in stats["report"]]
    else:
        lines.append("  changed while loading: nothing")
    return "\n".join(lines)


def check_dataset(path: str, images: str = "", split: str = "trainval") -> tuple[bool, str]:
    """Load ``path`` (COCO json, VOC root or folder of images) decoding every image file.

    A json with ``annotations`` and a VOC root are checked as labeled sets, a json without
    ``annotations`` and a plain folder as unlabeled ones.
    Returns:
        (True, summary) or (False, every problem found).
    """
    try:
        dset, kind = load_as_found(path, images, split, verify_images=True)
    except DatasetError as e:
        hint = ""
        if "image file not found" in str(e) and Path(path).is_file():
            root = Path(images) if images else Path(path).parent
            missing = missing_image_records(path, root)
            absolute = absolute_names_hint(missing, "--images DIR")
            hint = (f"\n({absolute})" if absolute
                    else f"\n(image files are looked for under {root}: --images DIR names their folder"
                         f"{image_folder_found(missing, path, '--images DIR')})")
        return False, f"FAILED: {path}\n{e}{hint}"
    return True, format_stats(dset, kind, dataset_stats(dset))
