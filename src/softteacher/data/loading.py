"""Torch datasets and batches over ``DetectionSet`` records.

Items are addressed by ``(source, index, draw_seed)`` from ``MixedBatchSampler``: the
augmentation of every draw is seeded by its ``draw_seed``, so a view depends on
(seed, image, iteration) only, never on worker count or process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from softteacher.config import AugmentConfig
from softteacher.data.datasets import read_image
from softteacher.data.records import DatasetError, DetectionSet
from softteacher.data.samplers import MixedBatchSampler
from softteacher.data.transforms import labeled_view, test_view, unlabeled_views

LABELED, UNLABELED = 0, 1

logger = logging.getLogger(__name__)
# unreadable unlabeled images tried for one draw before training stops: a few bad files are
# skipped, a set whose files have gone (a folder moved, a mount lost) is an error
MAX_UNREADABLE_IN_A_ROW = 50


@dataclass
class LabeledSample:
    """One labeled image in its training (or test) view."""

    image: Tensor  # (3, H, W) uint8, view frame
    boxes: Tensor  # (N, 4) float32 xyxy, view frame
    labels: Tensor  # (N,) int64, 1..C
    matrix: Tensor  # (3, 3) float64, original -> view
    image_id: int
    orig_size: tuple[int, int]  # (H, W) of the original image
    dropped: int = 0  # boxes that lost their area in the view


@dataclass
class UnlabeledSample:
    """One unlabeled image as the teacher's weak view and the student's strong view."""

    weak: Tensor  # (3, Hw, Ww) uint8
    strong: Tensor  # (3, Hs, Ws) uint8
    weak_matrix: Tensor  # (3, 3) float64, original -> weak view
    strong_matrix: Tensor  # (3, 3) float64, original -> strong view
    image_id: int
    orig_size: tuple[int, int]
    gt_boxes: Tensor | None = None  # (G, 4) original frame, diagnostics only
    gt_labels: Tensor | None = None  # (G,)


@dataclass
class LabeledBatch:
    images: list[Tensor]
    targets: list[dict[str, Tensor]]  # boxes (N, 4) view frame, labels (N,)
    matrices: list[Tensor]
    image_ids: list[int]
    orig_sizes: list[tuple[int, int]]
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.images)

    def to(self, device: torch.device) -> "LabeledBatch":
        return LabeledBatch(
            [im.to(device, non_blocking=True) for im in self.images],
            [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in self.targets],
            self.matrices, self.image_ids, self.orig_sizes, self.dropped)

    def pin_memory(self) -> "LabeledBatch":
        """The images and targets in page-locked memory, which a DataLoader with ``pin_memory``
        asks of a batch (it leaves a type without this method as it is), so that ``to(cuda)``
        copies them without blocking."""
        return LabeledBatch([im.pin_memory() for im in self.images],
                            [{k: v.pin_memory() for k, v in t.items()} for t in self.targets],
                            self.matrices, self.image_ids, self.orig_sizes, self.dropped)


@dataclass
class UnlabeledBatch:
    weak: list[Tensor]
    strong: list[Tensor]
    weak_matrices: list[Tensor]
    strong_matrices: list[Tensor]
    image_ids: list[int]
    orig_sizes: list[tuple[int, int]]
    gt_boxes: list[Tensor | None] = field(default_factory=list)
    gt_labels: list[Tensor | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.weak)

    def to(self, device: torch.device) -> "UnlabeledBatch":
        mv = lambda xs: [x.to(device, non_blocking=True) for x in xs]  # noqa: E731
        return UnlabeledBatch(mv(self.weak), mv(self.strong), self.weak_matrices,
                              self.strong_matrices, self.image_ids, self.orig_sizes,
                              self.gt_boxes, self.gt_labels)

    def pin_memory(self) -> "UnlabeledBatch":
        """The views in page-locked memory (``LabeledBatch.pin_memory``); what stays on the CPU
        (matrices, the diagnostic ground truth) as it is."""
        pin = lambda xs: [x.pin_memory() for x in xs]  # noqa: E731
        return UnlabeledBatch(pin(self.weak), pin(self.strong), self.weak_matrices,
                              self.strong_matrices, self.image_ids, self.orig_sizes,
                              self.gt_boxes, self.gt_labels)


@dataclass
class MixedBatch:
    labeled: LabeledBatch
    unlabeled: UnlabeledBatch

    def to(self, device: torch.device) -> "MixedBatch":
        return MixedBatch(self.labeled.to(device), self.unlabeled.to(device))

    def pin_memory(self) -> "MixedBatch":
        return MixedBatch(self.labeled.pin_memory(), self.unlabeled.pin_memory())


def _boxes_tensor(rec) -> tuple[Tensor, Tensor]:
    return (torch.as_tensor(rec.boxes, dtype=torch.float32).reshape(-1, 4),
            torch.as_tensor(rec.labels, dtype=torch.int64).reshape(-1))


class MixedDataset(Dataset):
    """Labeled training views and unlabeled weak/strong views, addressed by sampler items.

    A labeled image that cannot be read stops training with a ``DatasetError`` naming it. An
    unlabeled one (a file cut short after the header that the start of a run reads, or one
    removed since) is skipped with a warning, once per file and process: the next readable
    image of the unlabeled set takes its place in the draw, so that one bad file in a large pool
    does not end a long run, and a resumed run draws the same images.
    """

    def __init__(self, labeled: DetectionSet, unlabeled: DetectionSet | None,
                 augment: AugmentConfig, unlabeled_gt: DetectionSet | None = None):
        self.labeled = labeled
        self.unlabeled = unlabeled
        self.augment = augment
        self._gt = {r.image_id: r for r in unlabeled_gt.records} if unlabeled_gt else {}
        self._unreadable: set[int] = set()  # unlabeled indices warned of in this process

    def _read_unlabeled(self, index: int):
        """The record and image of unlabeled ``index``, or of the first readable one after it."""
        records = self.unlabeled.records
        tries = min(len(records), MAX_UNREADABLE_IN_A_ROW)
        for k in range(tries):
            i = (index + k) % len(records)
            rec = records[i]
            try:
                return rec, read_image(rec.path, rec, self.unlabeled.source)
            except DatasetError as e:
                last = e.reason
                if i not in self._unreadable:
                    self._unreadable.add(i)
                    logger.warning("%s; skipped: the next unlabeled image is drawn in its place "
                                   "(`softteacher data check` lists every unreadable file)", e)
        raise DatasetError(f"{self.unlabeled.source}: {tries} unlabeled images in a row cannot be read, "
                           f"from image {index + 1} on (the last: {last}); are the files there?")

    def __getitem__(self, item: tuple[int, int, int]):
        source, index, draw_seed = item
        rng = np.random.default_rng(draw_seed)
        if source == LABELED:
            rec = self.labeled.records[index]
            image = read_image(rec.path, rec, self.labeled.source)
            boxes, labels = _boxes_tensor(rec)
            view, boxes_view, keep = labeled_view(image, boxes, rng, self.augment)
            return LabeledSample(view.image, boxes_view.float(), labels[keep], view.matrix,
                                 rec.image_id, (rec.height, rec.width), int((~keep).sum()))
        assert self.unlabeled is not None, "unlabeled item without an unlabeled set"
        rec, image = self._read_unlabeled(index)
        weak, strong = unlabeled_views(image, rng, self.augment)
        gt = self._gt.get(rec.image_id)
        gt_boxes, gt_labels = _boxes_tensor(gt) if gt is not None else (None, None)
        return UnlabeledSample(weak.image, strong.image, weak.matrix, strong.matrix,
                               rec.image_id, (rec.height, rec.width), gt_boxes, gt_labels)


def collate_labeled(samples: list[LabeledSample]) -> LabeledBatch:
    return LabeledBatch([s.image for s in samples],
                        [{"boxes": s.boxes, "labels": s.labels} for s in samples],
                        [s.matrix for s in samples], [s.image_id for s in samples],
                        [s.orig_size for s in samples], sum(s.dropped for s in samples))


def collate_unlabeled(samples: list[UnlabeledSample]) -> UnlabeledBatch:
    return UnlabeledBatch([s.weak for s in samples], [s.strong for s in samples],
                          [s.weak_matrix for s in samples], [s.strong_matrix for s in samples],
                          [s.image_id for s in samples], [s.orig_size for s in samples],
                          [s.gt_boxes for s in samples], [s.gt_labels for s in samples])


def collate_mixed(samples: list) -> MixedBatch:
    return MixedBatch(
        collate_labeled([s for s in samples if isinstance(s, LabeledSample)]),
        collate_unlabeled([s for s in samples if isinstance(s, UnlabeledSample)]))


def _own_generator() -> torch.Generator:
    """DataLoader iterators draw a worker base seed; from their own generator, so that creating
    one (for an evaluation, or on resume) never moves the global torch RNG the model samples from.
    Our augmentation is seeded by ``draw_seed`` and does not depend on it."""
    return torch.Generator().manual_seed(0)


def train_loader(dataset: MixedDataset, sampler: MixedBatchSampler, num_workers: int,
                 pin_memory: bool = False) -> DataLoader:
    """An infinite loader of ``MixedBatch``es in the sampler's order."""
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_mixed, generator=_own_generator(),
                      num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0,
                      prefetch_factor=2 if num_workers > 0 else None)


class TestDataset(Dataset):
    """Deterministic test views of a labeled or unlabeled set, in record order."""

    def __init__(self, dset: DetectionSet, augment: AugmentConfig):
        self.dset = dset
        self.augment = augment

    def __len__(self) -> int:
        return len(self.dset.records)

    def __getitem__(self, index: int) -> LabeledSample:
        rec = self.dset.records[index]
        image = read_image(rec.path, rec, self.dset.source)
        view = test_view(image, self.augment)
        boxes, labels = _boxes_tensor(rec)
        return LabeledSample(view.image, boxes, labels, view.matrix, rec.image_id,
                             (rec.height, rec.width))


def test_loader(dset: DetectionSet, augment: AugmentConfig, batch_size: int = 4,
                num_workers: int = 0, indices: list[int] | None = None,
                pin_memory: bool = False) -> DataLoader:
    """Batches of test views, in the set's order; boxes in the samples stay in the ORIGINAL frame."""
    ds = TestDataset(dset, augment)
    if indices is not None:
        ds = torch.utils.data.Subset(ds, indices)
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate_labeled, generator=_own_generator(), pin_memory=pin_memory)
