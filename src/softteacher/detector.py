"""A trained detector for use from Python: ``Detector.load(checkpoint)(image)``.

    from softteacher import Detector
    detector = Detector.load("runs/mine/model_best.pt")  # on the GPU when there is one
    dets = detector("photo.jpg")             # or a PIL image, an array, a tensor
    for box, name, score in zip(dets.boxes.tolist(), dets.names, dets.scores.tolist()):
        print(name, round(score, 2), box)    # xyxy pixels of the image as given
    detector.draw("photo.jpg", dets).save("photo_boxes.jpg")

What ``softteacher predict`` runs (and ``eval``, at the checkpoint's own score threshold): one
image at a time unless asked for batches, resized as the checkpoint's test view says, its boxes
mapped back to the image's pixels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from softteacher.data.datasets import HIGH_DEPTH_MODES, read_image
from softteacher.data.records import CategoryMap
from softteacher.data.transforms import test_view
from softteacher.engine import model_from_checkpoint, resolve_device, to_original
from softteacher.evaluation import detections_to_results
from softteacher.model import check_score_threshold, score_threshold
from softteacher.visualize import draw_boxes


@dataclass(frozen=True)
class Detections:
    """One image's detections, best score first.

    Attributes:
        boxes: (N, 4) float32, xyxy pixels of the image as given to the detector.
        scores: (N,) float32 in (score_thresh, 1].
        labels: (N,) int64, contiguous class labels 1..C (``Detector.classes[label - 1]``).
        names: the N class names.
        category_ids: (N,) int64, the classes' ids in the training annotations.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    names: list[str]
    category_ids: Tensor

    def __len__(self) -> int:
        return int(self.scores.numel())


def as_image(image: Any) -> Tensor:
    """An image as the (3, H, W) uint8 RGB tensor the views take.

    Accepts a file path (``str`` or ``os.PathLike``: decoded as ``predict`` decodes it, turned
    as its EXIF orientation says a viewer shows it), a PIL image (its pixels as they are; any
    8-bit mode is converted to RGB), a numpy array (H, W, 3) or (H, W) of uint8, RGB, or a
    tensor (3, H, W) of uint8, or of floats in [0, 1] as torchvision's detectors take them
    (rounded to 8 bits).

    Raises:
        DatasetError: a path that is missing or unreadable (the message names the file).
        ValueError / TypeError: another shape, type or value range, named in the message.
    """
    if isinstance(image, (str, os.PathLike)):
        return read_image(str(Path(image)), exif_orientation=True)
    if isinstance(image, Image.Image):
        if image.mode in HIGH_DEPTH_MODES:
            raise ValueError(f"image: a PIL image of mode {image.mode!r} (more than 8 bits per "
                             f"channel); convert it to 8 bits as suits the data")
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            why = ("a float array's scale is ambiguous: pass a tensor in [0, 1] or convert to uint8"
                   if image.dtype.kind == "f" else
                   "more than 8 bits per channel: convert it to 8 bits as suits the data"
                   if image.dtype.kind in "ui" and image.dtype.itemsize > 1 else "convert to uint8")
            raise ValueError(f"image: expected a uint8 array (H, W, 3) in RGB, got {image.dtype}; {why}")
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image: expected an array (H, W, 3) or (H, W), got shape "
                             f"{tuple(image.shape)}")
        if 0 in image.shape:
            raise ValueError(f"image: an array of shape {tuple(image.shape)} has no pixels")
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()  # a copy
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image: expected a tensor (3, H, W), got shape {tuple(image.shape)}")
        if 0 in image.shape:
            raise ValueError(f"image: a tensor of shape {tuple(image.shape)} has no pixels")
        image = image.detach().cpu()
        if image.dtype == torch.uint8:
            return image.contiguous()
        if not image.is_floating_point():
            raise ValueError(f"image: expected a uint8 or float tensor, got {image.dtype}")
        low, high = (float(image.min()), float(image.max())) if image.numel() else (0.0, 0.0)
        if not (0.0 <= low and high <= 1.0):
            raise ValueError(f"image: a float tensor must hold values in [0, 1] (torchvision's "
                             f"convention), got [{low:g}, {high:g}]; for 0-255 values pass "
                             f"uint8")
        return (image.float() * 255.0).round().to(torch.uint8).contiguous()
    raise TypeError(f"image: expected a path, PIL image, numpy array or tensor, got "
                    f"{type(image).__name__}")


def check_batch_size(batch_size) -> None:
    """Refuse a batch size that is not a whole number of at least 1."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size {batch_size!r}: expected a whole number of at least 1")


class Detector:
    """A checkpoint's model, ready to detect objects in images.

    Use ``Detector.load``; ``detector(image)`` gives ``Detections``, ``detector.predict(images)``
    a list of them. ``model`` is the underlying ``torch.nn.Module`` (eval mode, on ``device``).
    """

    def __init__(self, model: torch.nn.Module, cfg, categories: CategoryMap, which: str,
                 device: torch.device, score_thresh: float):
        check_score_threshold(score_thresh)
        self.model, self.cfg, self.categories = model, cfg, categories
        self.which, self.device, self.score_thresh = which, device, float(score_thresh)

    @classmethod
    def load(cls, checkpoint: str | os.PathLike, model: str | None = None,
             device: torch.device | str = "auto", score_thresh: float = 0.3) -> Detector:
        """Build the detector of a checkpoint or exported model.

        Args:
            checkpoint: a training checkpoint (``model_best.pt``, ...) or ``softteacher export``'s
                file; read with ``weights_only``.
            model: ``teacher`` or ``student``; by default the one the run reports.
            device: where it runs: ``"auto"`` (the first GPU when there is one, else the CPU,
                as ``predict --device`` by default), ``"cpu"``, ``"cuda"``, ``"cuda:1"``.
            score_thresh: detections at or below it are left out (``predict``'s 0.3 by default;
                ``eval`` scores with the checkpoint's ``model.box_score_thresh``).
        Raises:
            CheckpointError: a file that holds no such model.
            ValueError: a device that torch does not know or that is not there.
        """
        check_score_threshold(score_thresh)
        device = device if isinstance(device, torch.device) else resolve_device(device)
        net, cfg, cats, which = model_from_checkpoint(str(checkpoint), model, device)
        return cls(net, cfg, cats, which, device, score_thresh)

    @property
    def classes(self) -> list[str]:
        """Class names in label order: label ``k`` is ``classes[k - 1]``."""
        return self.categories.names

    @torch.no_grad()
    def detect(self, image: Tensor) -> Detections:
        """Detections for a (3, H, W) uint8 image (see ``as_image`` for other inputs)."""
        return self.detect_batch([image])[0]

    @torch.no_grad()
    def detect_batch(self, images: list[Tensor]) -> list[Detections]:
        """Detections for each of (3, H, W) uint8 ``images``, run through the model as one batch
        (their test views padded to a common size: more images per second on a GPU, and
        detections that differ slightly from those of one image at a time)."""
        views = [test_view(image, self.cfg.augment) for image in images]
        with score_threshold(self.model, min(self.score_thresh, self.model.roi_heads.score_thresh)):
            found = self.model([view.image.to(self.device) for view in views])  # below its own when asked
        out = []
        for image, view, det in zip(images, views, found):
            keep = det.scores > self.score_thresh
            size = (int(image.shape[-2]), int(image.shape[-1]))
            boxes = to_original(det.boxes[keep].float().cpu(), view.matrix, size).float()
            labels = det.labels[keep].cpu().long()
            out.append(Detections(boxes=boxes, scores=det.scores[keep].float().cpu(), labels=labels,
                                  names=[self.categories.name(k) for k in labels.tolist()],
                                  category_ids=torch.tensor([self.categories.category_id(k)
                                                             for k in labels.tolist()], dtype=torch.int64)))
        return out

    def __call__(self, image: Any) -> Detections:
        """Detections for one image: a path, PIL image, numpy array or tensor (``as_image``)."""
        return self.detect(as_image(image))

    def predict(self, images, batch_size: int = 1) -> list[Detections]:
        """Detections for each of ``images`` (an iterable of what ``__call__`` takes, or a
        (N, 3, H, W) tensor), in order, ``batch_size`` images through the model at a time (1:
        each image's detections as ``detector(image)`` gives them; see ``detect_batch``).

        Raises:
            TypeError: one image (a path, PIL image, array or (3, H, W) tensor), which would be
                read as a sequence of its characters or rows: call the detector on it.
            ValueError: a ``batch_size`` below 1.
        """
        if isinstance(images, (str, os.PathLike, Image.Image)) or (
                isinstance(images, (Tensor, np.ndarray)) and images.ndim <= 3):
            raise TypeError(f"predict takes a list of images, got one {type(images).__name__}: "
                            f"call the detector on one image, detector(image)")
        check_batch_size(batch_size)
        out: list[Detections] = []
        batch: list[Tensor] = []
        for image in images:
            batch.append(as_image(image))
            if len(batch) == batch_size:
                out += self.detect_batch(batch)
                batch = []
        return out + (self.detect_batch(batch) if batch else [])

    def draw(self, image: Any, detections: Detections | None = None) -> Image.Image:
        """A PIL picture of ``image`` with its detections (found now when not given), as
        ``predict`` draws them."""
        pixels = as_image(image)
        dets = self.detect(pixels) if detections is None else detections
        return draw_boxes(pixels, dets.boxes, dets.labels.tolist(), dets.scores.tolist(), self.classes)

    def to_coco(self, detections: Detections, image_id: int) -> list[dict]:
        """COCO results entries of ``detections`` for ``image_id`` (``bbox`` xywh, the
        training annotations' category ids), as ``eval`` and ``predict`` write them."""
        return detections_to_results(image_id, detections.boxes, detections.scores,
                                     detections.labels, self.categories)

    def __repr__(self) -> str:
        return (f"Detector({self.which}, {len(self.classes)} classes, {self.cfg.model.backbone}, "
                f"device={self.device}, score_thresh={self.score_thresh})")


__all__ = ["Detector", "Detections", "as_image"]
