"""COCO box evaluation through pycocotools (SPEC §7), with no files and no printing.

Metrics are FRACTIONS in [0, 1] (pycocotools' own scale; detectron2 prints 0-100):
``bbox_AP`` (mAP@[.50:.05:.95]), ``bbox_AP50``, ``bbox_AP75``, ``bbox_APs``, ``bbox_APm``,
``bbox_APl`` and, per class, ``bbox_AP/{class name}``. A metric that is undefined (no
ground-truth box of that size or class; pycocotools says -1) is ``float("nan")`` and
``format_metrics`` shows it as ``-``.

Ground truth of a COCO json is its annotations as the json gives them
(``DetectionSet.scored_annotations``): boxes that training clips to the image or drops (zero
size, outside the image) are scored as pycocotools scores them on the json itself, so an AP
here is the one the official evaluation gives. Other sets' ground truth comes from their
records: xyxy boxes become xywh; ``ignore_boxes`` become ``iscrowd=1`` annotations of their
class (a detection of that class inside such a region is neither a true nor a false positive,
as in COCO). Size ranges (small < 32², medium < 96², large) use each object's area from the
source (COCO's ``area``), or its box's where the source has none (VOC). AP, AP50 and AP75 do
not depend on areas.

A Pascal VOC set is scored with COCO's metric as well (101-point AP over IoU 0.5:0.95; AP50
is the closest to VOC's): its ``difficult`` objects are crowd regions of their class, which
forgive a detection of that class by the share of the detection inside them, where VOC's own
evaluation asks the detection's IoU with the difficult box.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from typing import Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from softteacher.data.records import CategoryMap, DetectionSet, ignore_classes, object_areas
from softteacher.io import write_json

OVERALL_KEYS = ("bbox_AP", "bbox_AP50", "bbox_AP75", "bbox_APs", "bbox_APm", "bbox_APl")
_BOX_DECIMALS = 2  # 0.01 px
_SCORE_DECIMALS = 5


def _quiet():
    """pycocotools prints progress on stdout; swallow it."""
    return contextlib.redirect_stdout(io.StringIO())


def _xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def _coco_from_dict(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with _quiet():
        coco.createIndex()
    return coco


def coco_gt_from_records(dset: DetectionSet) -> COCO:
    """An in-memory pycocotools ``COCO`` of ``dset``'s ground truth.

    Args:
        dset: labeled set; boxes xyxy in original pixels, labels 1..C.
    Returns:
        COCO with every image (those without boxes too), the original category ids of
        ``dset.categories`` and, for a COCO json, its annotations of those images as it gives
        them (``scored_annotations``); else the records' boxes as xywh with the source's areas
        (``w * h`` where it has none), and each ignore box as an ``iscrowd=1`` annotation of
        its class. Annotation ids are renumbered 1..N (pycocotools treats id 0 as "unmatched").
    Raises:
        ValueError: duplicate image ids, or a label outside 1..C (names ``dset.source``).
    """
    cats = dset.categories
    images, anns, seen = [], [], set()
    for rec in dset.records:
        if rec.image_id in seen:
            raise ValueError(f"{dset.source}: duplicate image id {rec.image_id}")
        seen.add(rec.image_id)
        images.append({"id": int(rec.image_id), "file_name": rec.file_name,
                       "width": int(rec.width), "height": int(rec.height)})
        labels = np.asarray(rec.labels).reshape(-1)
        boxes = _xyxy_to_xywh(rec.boxes)
        if len(labels) != len(boxes):
            raise ValueError(f"{dset.source}: image {rec.image_id}: {len(boxes)} boxes, "
                             f"{len(labels)} labels")
        crowd_labels = ignore_classes(rec)
        for label in [*labels, *crowd_labels]:
            if not 1 <= int(label) <= len(cats):
                raise ValueError(f"{dset.source}: image {rec.image_id}: label {int(label)} "
                                 f"outside 1..{len(cats)}")
        if dset.scored_annotations is not None:
            continue  # the json's own annotations are scored, below
        for box, label, area in zip(boxes, labels, object_areas(rec)):
            anns.append({"image_id": int(rec.image_id), "category_id": cats.category_id(int(label)),
                         "bbox": [float(v) for v in box], "area": float(area), "iscrowd": 0})
        for box, label in zip(_xyxy_to_xywh(rec.ignore_boxes), crowd_labels):
            anns.append({"image_id": int(rec.image_id), "category_id": cats.category_id(int(label)),
                         "bbox": [float(v) for v in box], "area": float(box[2] * box[3]),
                         "iscrowd": 1})
    if dset.scored_annotations is not None:
        ids, values = dset.scored_annotations
        keep = [int(i) in seen for i in ids[:, 0]]  # the records' images (a subset, say)
        anns = [{"image_id": int(i[0]), "category_id": int(i[1]), "bbox": [float(x) for x in v[:4]],
                 "area": float(v[4]), "iscrowd": int(v[5])} for i, v in zip(ids[keep], values[keep])]
    for i, ann in enumerate(anns, start=1):
        ann["id"] = i
    return _coco_from_dict({"info": {"description": str(dset.source)}, "images": images,
                            "annotations": anns, "categories": cats.to_coco()})


def _as_numpy(x, dtype) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def detections_to_results(image_id: int, boxes_xyxy, scores, labels,
                          categories: CategoryMap) -> list[dict]:
    """COCO results entries for one image's detections.

    Args:
        image_id: the image's id in the evaluated set.
        boxes_xyxy: (N, 4) float tensor or array, xyxy pixels of the ORIGINAL image.
        scores: (N,) float.
        labels: (N,) int, contiguous 1..C.
        categories: maps labels to the original category ids.
    Returns:
        N dicts ``{"image_id", "category_id" (original id), "bbox" (xywh, 0.01 px),
        "score" (float, 5 decimals)}``; N == 0 gives ``[]``.
    Raises:
        ValueError: mismatched lengths, or a label outside 1..C.
    """
    boxes = _as_numpy(boxes_xyxy, np.float64)
    scores = _as_numpy(scores, np.float64).reshape(-1)
    labels = _as_numpy(labels, np.int64).reshape(-1)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"image {image_id}: boxes must be (N, 4), got {tuple(boxes.shape)}")
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores, "
                         f"{len(labels)} labels")
    bad = labels[(labels < 1) | (labels > len(categories))]
    if len(bad):
        raise ValueError(f"image {image_id}: label {int(bad[0])} outside 1..{len(categories)}")
    boxes_xywh = np.round(_xyxy_to_xywh(boxes), _BOX_DECIMALS)
    scores = np.round(scores, _SCORE_DECIMALS)
    return [{"image_id": int(image_id), "category_id": categories.category_id(int(label)),
             "bbox": [float(v) for v in box], "score": float(score)}
            for box, score, label in zip(boxes_xywh, scores, labels)]


def _nan_if_undefined(value: float) -> float:
    return float("nan") if value < 0 else float(value)


def evaluate_detections(dset: DetectionSet, results: Sequence[dict],
                        per_class: bool = True) -> dict[str, float]:
    """COCO bbox metrics of ``results`` against ``dset``'s ground truth.

    Args:
        dset: the labeled set the detections were made on.
        results: COCO results entries (see ``detections_to_results``); not modified.
        per_class: also return ``bbox_AP/{class name}``.
    Returns:
        FRACTIONS in [0, 1] (not percentages): ``bbox_AP`` (mAP@[.5:.95], 100 dets per
        image), ``bbox_AP50``, ``bbox_AP75``, ``bbox_APs``, ``bbox_APm``, ``bbox_APl`` and
        per class ``bbox_AP/{name}``. NaN where undefined (no ground truth of that size or
        class). Empty ``results`` give 0.0 for every defined metric.
    Raises:
        ValueError: a result names an image or category id that ``dset`` lacks.
    """
    gt = coco_gt_from_records(dset)
    known_images = set(gt.getImgIds())
    known_cats = set(gt.getCatIds())
    dts = []
    for i, r in enumerate(results):
        if r["image_id"] not in known_images:
            raise ValueError(f"{dset.source}: result {i} names image id {r['image_id']}, "
                             f"not in the set")
        if r["category_id"] not in known_cats:
            raise ValueError(f"{dset.source}: result {i} names category id {r['category_id']}, "
                             f"not one of {sorted(known_cats)}")
        dts.append({"image_id": r["image_id"], "category_id": r["category_id"],
                    "bbox": list(r["bbox"]), "score": float(r["score"])})
    if dts:
        with _quiet():
            dt = gt.loadRes(dts)  # adds area/id/iscrowd to our copies
    else:  # loadRes cannot take an empty list; an empty result set scores 0 where defined
        dt = _coco_from_dict({"images": list(gt.dataset["images"]), "annotations": [],
                              "categories": list(gt.dataset["categories"])})

    ev = COCOeval(gt, dt, iouType="bbox")
    with _quiet():
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    metrics = {k: _nan_if_undefined(v) for k, v in zip(OVERALL_KEYS, ev.stats[:6])}
    if per_class:
        # precision: (T iou thresholds, R recall points, K classes, A areas, M maxDets)
        precision = ev.eval["precision"]
        for k, cat_id in enumerate(ev.params.catIds):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            name = dset.categories.name(dset.categories.label(cat_id))
            metrics[f"bbox_AP/{name}"] = float(p.mean()) if p.size else float("nan")
    return metrics


def format_metric(v: float) -> str:
    """One metric as the tables print it: a fraction to 4 places, ``-`` where undefined."""
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def format_metrics(metrics: dict[str, float], columns: int = 3) -> str:
    """A compact text table: the overall row, then per-class AP in ``columns`` pairs per row.

    Values are shown as the fractions they are (4 decimals); NaN (undefined) shows ``-``.
    Keys other than the ``bbox_*`` ones are listed after the table.
    """
    short = [k.removeprefix("bbox_") for k in OVERALL_KEYS]
    lines = ["  ".join(f"{s:>7}" for s in short),
             "  ".join(f"{format_metric(metrics.get(k, float('nan'))):>7}" for k in OVERALL_KEYS)]
    per_class = [(k.split("/", 1)[1], v) for k, v in metrics.items() if k.startswith("bbox_AP/")]
    if per_class:
        width = max(5, *(len(n) for n, _ in per_class))
        lines.append("")
        lines.append("   ".join(f"{'class':<{width}}  {'AP':>7}"
                                for _ in range(min(columns, len(per_class)))))
        for i in range(0, len(per_class), columns):
            lines.append("   ".join(f"{n:<{width}}  {format_metric(v):>7}"
                                    for n, v in per_class[i:i + columns]))
    others = [k for k in metrics if k not in OVERALL_KEYS and not k.startswith("bbox_AP/")]
    if others:
        lines.append("")
        lines.extend(f"{k}: {metrics[k]}" for k in others)
    return "\n".join(lines)


def write_results(path: str | os.PathLike, results: Sequence[dict]) -> None:
    """Write COCO results json atomically (a crash never leaves a truncated file)."""
    write_json(path, list(results))
