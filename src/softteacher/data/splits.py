"""STAC-protocol partial-label splits of a labeled COCO json (SPEC §7).

For ``NAME.json``, fold ``f`` and percent ``p`` this writes ``NAME.{f}@{p}.json`` (the labeled
images with their annotations) and ``NAME.{f}@{p}-unlabeled.json`` (the other images; their
annotations are kept, as STAC does, and ignored when the file is read as unlabeled data).
Both keep the json's other top-level keys (info, licenses, categories, ...). A seed other than
the default 1 is in the names (``NAME.{f}@{p}.seed{s}.json``), so that another draw does not
replace this one's files.
"""

from __future__ import annotations

import logging
import math
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from softteacher.data.datasets import coco_from_dict, read_coco_json
from softteacher.data.records import DatasetError
from softteacher.io import atomic_path, json_text

log = logging.getLogger(__name__)


def _check_args(percent: float, fold: int, seed: int) -> None:
    if not (isinstance(percent, (int, float)) and 0 < percent <= 100):
        raise ValueError(f"percent must be in (0, 100], got {percent}")
    if isinstance(fold, bool) or not isinstance(fold, int) or fold < 1:
        raise ValueError(f"fold must be a positive integer, got {fold!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def split_indices(num_images: int, percent: float, fold: int, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Choose the labeled images of one fold.

    ``round(num_images * percent / 100)`` images (halves round up; at least 1) are the first
    of a permutation drawn from a generator seeded by ``(seed, fold)``. So the choice is
    deterministic per (seed, fold, percent), folds differ, and for one fold a smaller
    percent's labeled images are a subset of a larger one's.
    Returns:
        labeled, unlabeled: (K,) and (num_images - K,) int64 indices, ascending, disjoint,
        together ``0..num_images-1``. ``percent == 100`` gives an empty unlabeled part.
    Raises:
        ValueError: ``num_images < 1``, percent outside (0, 100], fold < 1 or seed < 0.
    """
    _check_args(percent, fold, seed)
    if num_images < 1:
        raise ValueError(f"nothing to split: {num_images} images")
    k = min(num_images, max(1, math.floor(num_images * percent / 100 + 0.5)))
    order = np.random.default_rng([seed, fold]).permutation(num_images)
    return np.sort(order[:k]), np.sort(order[k:])


DEFAULT_SEED = 1


def split_names(ann_file: str | Path, percent: float, fold: int,
                seed: int = DEFAULT_SEED) -> tuple[str, str]:
    """``(NAME.{fold}@{percent}.json, NAME.{fold}@{percent}-unlabeled.json)`` for ``NAME.json``;
    percent printed with ``:g`` (10.0 -> "10", 0.5 -> "0.5"); ``.seed{seed}`` after the percent
    for a seed other than the default."""
    name = Path(ann_file).name
    stem = name[:-5] if name.lower().endswith(".json") else name
    tag = f"{stem}.{fold}@{percent:g}" + (f".seed{seed}" if seed != DEFAULT_SEED else "")
    return f"{tag}.json", f"{tag}-unlabeled.json"


def write_split(ann_file: str | Path, percent: float, fold: int = 1, seed: int = DEFAULT_SEED,
                out_dir: str | Path | None = None, images: str | Path = "") -> tuple[str, str]:
    """Split a labeled COCO json into labeled and unlabeled parts (see ``split_indices``).

    The json is validated as a labeled set first (``load_coco`` rules), so both parts load.
    Args:
        out_dir: folder for the two files (default: beside ``ann_file``). Image ``file_name``s
            are copied unchanged: read the parts with the original image folder.
        images: folder the json's ``file_name``s are relative to (default: beside the json),
            read for the sizes of images the json gives none.
    Returns:
        (labeled_path, unlabeled_path): both written before either replaces a file of that
        name, so an error leaves the earlier pair whole. At 100 % no image is unlabeled and
        no unlabeled file is written: its path is "".
    Raises:
        ValueError: bad percent/fold/seed; DatasetError for a json that is not a valid labeled set.
    """
    _check_args(percent, fold, seed)
    ann_file = Path(ann_file)
    if ann_file.is_dir():
        raise DatasetError(f"{ann_file}: a folder; split takes a labeled COCO json (a VOC root's "
                           f"labeled part is an image set of its own, ImageSets/Main/NAME.txt, "
                           f"which data.train_split names)")
    data = read_coco_json(ann_file)
    if "annotations" not in data:
        raise DatasetError(f"{ann_file}: no 'annotations' key: only a labeled COCO json can be split")
    coco_from_dict(data, ann_file, images, labeled=True)
    listed = data["images"]
    labeled_idx, unlabeled_idx = split_indices(len(listed), percent, fold, seed)
    parts = []
    for idx in (labeled_idx, unlabeled_idx):
        part_images = [listed[i] for i in idx]
        ids = {img["id"] for img in part_images}
        anns = [a for a in data["annotations"] if a["image_id"] in ids]
        parts.append({**data, "images": part_images, "annotations": anns})
    out = Path(out_dir) if out_dir else ann_file.parent
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: a file, not a folder for the split's files")
    paths = [out / name for name in split_names(ann_file, percent, fold, seed)]
    if not parts[1]["images"]:
        paths, parts = paths[:1], parts[:1]
    for path in paths:
        if path.is_dir():
            raise ValueError(f"{path}: a folder where the split's file goes")
    with ExitStack() as files:  # both written, then both renamed
        for path, part in zip(paths, parts):
            files.enter_context(atomic_path(path)).write_text(json_text(part))
    unlabeled = parts[1]["images"] if len(parts) > 1 else []
    log.info("%s fold %d @ %g%% (seed %d): %d labeled images (%d annotations) -> %s; "
             "%d unlabeled -> %s", ann_file, fold, percent, seed, len(parts[0]["images"]),
             len(parts[0]["annotations"]), paths[0], len(unlabeled), paths[1] if unlabeled else "-")
    return str(paths[0]), str(paths[1]) if unlabeled else ""
