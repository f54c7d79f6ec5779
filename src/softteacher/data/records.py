"""The in-memory form every dataset reader produces.

Boxes are xyxy in absolute pixels of the original image. Labels are contiguous
``1..C`` (``0`` is background, as in torchvision's detectors); ``CategoryMap``
maps them to the original category ids and back.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np


class DatasetError(ValueError):
    """Bad input data. The message names the file and the record; ``reason`` says what is wrong
    without the file that the message begins with (for a list that names it beside)."""

    def __init__(self, *args, reason: str | None = None):
        super().__init__(*args)
        self.reason = str(self) if reason is None else reason


@dataclass(frozen=True)
class Category:
    id: int
    name: str


class ScoredAnnotations(NamedTuple):
    """A COCO json's annotations as pycocotools scores them, one row each: ``ids`` (N, 2)
    image and category id (int64, or Python ints where one does not fit), ``values`` (N, 6)
    float64 x, y, w, h, area, iscrowd."""

    ids: np.ndarray
    values: np.ndarray

    @classmethod
    def from_rows(cls, rows: list[tuple]) -> "ScoredAnnotations":
        """From (image_id, category_id, x, y, w, h, area, iscrowd) tuples."""
        ids = [row[:2] for row in rows]
        try:
            id_array = np.array(ids, dtype=np.int64).reshape(-1, 2)
        except OverflowError:
            id_array = np.array(ids, dtype=object).reshape(-1, 2)
        return cls(id_array, np.array([row[2:] for row in rows], dtype=np.float64).reshape(-1, 6))


def category_difference(ours: "CategoryMap", theirs: "CategoryMap", shown: int = 10) -> str:
    """``[3 circle] against [1 circle] (8 and 8 classes)``: the ids and names each set has and
    the other lacks, as two sets of classes are told apart."""

    def listed(cats: list[Category]) -> str:
        more = f", ... {len(cats) - shown} more" if len(cats) > shown else ""
        return "[" + ", ".join(f"{c.id} {c.name}" for c in cats[:shown]) + more + "]"

    only_ours = [c for c in ours.categories if c not in theirs.categories]
    only_theirs = [c for c in theirs.categories if c not in ours.categories]
    return (f"{listed(only_ours)} against {listed(only_theirs)} "
            f"({len(ours)} and {len(theirs)} classes)")


class CategoryMap:
    """Original category ids <-> contiguous labels ``1..C`` (sorted by id)."""

    def __init__(self, categories: list[Category]):
        ids = [c.id for c in categories]
        if len(set(ids)) != len(ids):
            dup = sorted(i for i, n in Counter(ids).items() if n > 1)
            raise ValueError(f"duplicate category ids {dup}")
        names = [c.name for c in categories]
        if len(set(names)) != len(names):  # pictures and per-class metrics name classes by name
            dup = sorted(n for n, k in Counter(names).items() if k > 1)
            raise ValueError(f"duplicate category names {dup}")
        self.categories = sorted(categories, key=lambda c: c.id)
        self._label_of = {c.id: i + 1 for i, c in enumerate(self.categories)}

    def __len__(self) -> int:
        return len(self.categories)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CategoryMap) and self.categories == other.categories

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.categories]

    def label(self, category_id: int) -> int:
        """Contiguous label (1..C) of an original category id; KeyError if unknown."""
        return self._label_of[category_id]

    def has(self, category_id: int) -> bool:
        return category_id in self._label_of

    def category_id(self, label: int) -> int:
        """Original category id of a contiguous label (1..C)."""
        if not 1 <= label <= len(self.categories):
            raise KeyError(f"label {label} outside 1..{len(self.categories)}")
        return self.categories[label - 1].id

    def name(self, label: int) -> str:
        return self.categories[label - 1].name

    def to_coco(self) -> list[dict]:
        return [{"id": c.id, "name": c.name} for c in self.categories]

    @classmethod
    def from_coco(cls, categories: list[dict]) -> "CategoryMap":
        return cls([Category(int(c["id"]), str(c.get("name", c["id"]))) for c in categories])


def empty_boxes() -> np.ndarray:
    return np.zeros((0, 4), dtype=np.float32)


@dataclass
class ImageRecord:
    """One image and its boxes.

    Attributes:
        image_id: id in the source (COCO image id; VOC: position in the image set, from 1).
        file_name: name as written in the source, relative to the image root.
        path: resolved path of the image file.
        width, height: size of the image file in pixels.
        boxes: (N, 4) float32 xyxy pixels, original image frame; N == 0 allowed.
        labels: (N,) int64 contiguous labels 1..C.
        ann_ids: (N,) int64 annotation ids of the source (VOC: sequential from 1).
        ignore_boxes: (M, 4) float32 xyxy of crowd / difficult regions, kept out of training targets.
        areas: (N,) float32 the source's object areas (COCO ``area``: the segmentation's pixels),
            which COCO's small / medium / large ranges use; NaN where the source gives none
            (VOC), and the box area counts. Empty when no box has one.
        ignore_labels: (M,) int64 the class of each ignore box (1..C); evaluation ignores
            detections of that class inside it, as COCO does.
        origin: the file that describes this image alone, named in messages (VOC: its xml);
            empty where the source file holds every image (COCO json).
    """

    image_id: int
    file_name: str
    path: str
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=empty_boxes)
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.int64))
    ann_ids: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.int64))
    ignore_boxes: np.ndarray = field(default_factory=empty_boxes)
    areas: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.float32))
    ignore_labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.int64))
    origin: str = ""


def object_areas(rec: ImageRecord) -> np.ndarray:
    """(N,) float64 the area of each object: the source's, else its box's."""
    boxes = np.asarray(rec.boxes, dtype=np.float64).reshape(-1, 4)
    box_areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    if len(rec.areas) != len(boxes):
        return box_areas
    given = np.asarray(rec.areas, dtype=np.float64)
    return np.where(np.isnan(given), box_areas, given)


def ignore_classes(rec: ImageRecord) -> np.ndarray:
    """(M,) int64 the class of each ignore box. Raises ValueError when a record lacks them."""
    if len(rec.ignore_labels) != len(rec.ignore_boxes):
        raise ValueError(f"image {rec.image_id} ({rec.file_name}): {len(rec.ignore_boxes)} ignore "
                         f"boxes, {len(rec.ignore_labels)} ignore labels")
    return np.asarray(rec.ignore_labels, dtype=np.int64)


@dataclass
class LoadReport:
    """What a reader changed or skipped, so nothing is dropped silently.

    ``counts`` maps a reason ("box clipped to image", ...) to how often it happened;
    ``examples`` keeps the first few full messages per reason.
    """

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    def add(self, reason: str, message: str) -> None:
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(message)

    def __bool__(self) -> bool:
        return bool(self.counts)

    def lines(self) -> list[str]:
        out = []
        for reason, n in sorted(self.counts.items()):
            out.append(f"{n} x {reason}")
            out.extend(f"    {m}" for m in self.examples.get(reason, []))
        return out


@dataclass
class DetectionSet:
    """A labeled or unlabeled set of images.

    Attributes:
        source: the annotation file (or folder) it was read from; used in messages.
        image_root: folder the records' ``file_name`` is relative to.
        categories: the label map; empty for an unlabeled folder of images.
        records: one per image, in source order.
        has_annotations: False for unlabeled sets (images only).
        report: counted clips and skips.
        scored_annotations: for a COCO json, its annotations as pycocotools scores them
            (``bbox`` and ``area`` as the json gives them, boxes that training clips or drops
            included; ``w * h`` for a missing area);
            evaluation takes these rather than the records, so that an AP is the one
            pycocotools gives on the json itself. None for other sources.
    """

    source: str
    image_root: str
    categories: CategoryMap
    records: list[ImageRecord]
    has_annotations: bool = True
    report: LoadReport = field(default_factory=LoadReport)
    scored_annotations: ScoredAnnotations | None = None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_classes(self) -> int:
        return len(self.categories)
