"""``softteacher predict``: detections for image files as COCO results json and pictures."""

from __future__ import annotations

import fnmatch
import glob
import json
import logging
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from softteacher.data.datasets import check_image_files, read_image, refuse_unreadable
from softteacher.data.records import DatasetError
from softteacher.detector import Detector, check_batch_size
from softteacher.engine import expand_images, progress_bar, reading_workers
from softteacher.io import save_image, write_json

log = logging.getLogger(__name__)


def picture_names(paths: list[Path]) -> list[str]:
    """Each image's picture name: its stem, then ``<stem>_1``, ``<stem>_2``... for a stem met
    again (in any letter case)."""
    names: list[str] = []
    used: set[str] = set()  # casefolded: IMG_1.JPG and img_1.jpg are one file on macOS and Windows
    for path in paths:
        name, k = path.stem, 1
        while name.casefold() in used:
            k, name = k + 1, f"{path.stem}_{k}"
        used.add(name.casefold())
        names.append(name)
    return names


def glob_lists(pattern: str, path: Path) -> bool:
    """Whether ``glob.glob(pattern, recursive=True)`` would list ``path`` (absolute, resolved)
    were it there: ``**`` takes any number of folders, and ``*``, ``?`` and ``[...]`` skip hidden
    names unless the pattern's own name starts with a dot, as glob does."""
    parts = Path(os.path.abspath(pattern)).parts
    first = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    base = Path(*parts[:first]).resolve()
    if base != path and base not in path.parents:
        return False
    rest, names = parts[first:], path.relative_to(base).parts

    def match(ps: tuple[str, ...], ns: tuple[str, ...]) -> bool:
        if not ps:
            return not ns
        if ps[0] == "**":
            return match(ps[1:], ns) or (bool(ns) and not ns[0].startswith(".") and match(ps, ns[1:]))
        return (bool(ns) and fnmatch.fnmatchcase(ns[0], ps[0])
                and (ps[0].startswith(".") or not ns[0].startswith(".")) and match(ps[1:], ns[1:]))

    return match(rest, names)


def _name_an_earlier_prediction(out: Path, names: list[str]) -> None:
    """Warn that ``out`` holds an earlier prediction, whose pictures this run leaves where it
    draws none: its ``images.json`` would no longer list them."""
    try:
        earlier = json.loads((out / "images.json").read_text())["images"]
        pictures = {im["picture"] for im in earlier if "picture" in im}  # none: --no-pictures
    except (OSError, ValueError, KeyError, TypeError):
        return
    kept = sorted(pictures - {f"{n}.jpg" for n in names})
    log.warning("%s holds an earlier prediction: its results.json and images.json are replaced%s", out,
                f"; {len(kept)} of its pictures ({', '.join(kept[:3])}{', ...' if len(kept) > 3 else ''}) "
                f"stay, not listed in the new images.json" if kept else "")


def _refuse_pictures_read_as_inputs(out: Path, images: list[str], paths: list[Path],
                                    names: list[str]) -> None:
    """Refuse an ``out`` whose pictures would replace input images or be read as inputs by the
    same command next time: one that holds inputs, lies in an input folder, or whose pictures
    an input glob lists."""
    inside = [p for p in paths if out.resolve() in (*p.parents, *p.resolve().parents)]
    if inside:
        more = f" and {len(inside) - 1} more" if len(inside) > 1 else ""
        raise ValueError(f"predict: the output folder {out} holds input images ({inside[0]}{more}); "
                         f"its pictures would replace them or be read as inputs next time: "
                         f"choose another --out")
    folders = [Path(i).resolve() for i in images if Path(i).is_dir()]
    holder = [d for d in folders if out.resolve().is_relative_to(d)]  # the folder itself or within it
    if holder:  # a folder read whole would read this run's pictures as inputs next time
        raise ValueError(f"predict: the output folder {out} is in the input folder {holder[0]}; "
                         f"its pictures would be read as inputs next time: choose another --out")
    root = out.resolve()
    for item in images:
        if not Path(item).exists():  # a glob: would it list a picture of this run next time?
            caught = [n for n in names if glob_lists(item, root / f"{n}.jpg")]
            if caught:
                raise ValueError(f"predict: {item!r} would read this run's picture "
                                 f"{out / (caught[0] + '.jpg')} as an input next time: choose "
                                 f"another --out")


class _ImageFiles(torch.utils.data.Dataset):
    """Each readable path's image, upright as its EXIF orientation says, or ``(message,
    reason)`` of the ``DatasetError`` that reading it raised (rebuilt by the reader: a loader
    process hands back data, not exceptions); None for a path left out (``skip``)."""

    def __init__(self, paths: list[Path], skip: set[Path]):
        self.paths, self.skip = paths, skip

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        if self.paths[i] in self.skip:
            return None
        try:
            return read_image(str(self.paths[i]), exif_orientation=True)
        except DatasetError as e:
            return str(e), e.reason


def _as_is(item):
    """A loader's item as the dataset gives it (no conversion of its tuples to lists)."""
    return item


@torch.no_grad()
def predict(checkpoint: str, images: list[str], out_dir: str, which: str | None = None,
            score_thresh: float = 0.3, device: torch.device | str = "cpu",
            pictures: bool = True, workers: int | None = None, progress: bool = False,
            batch_size: int = 1) -> dict:
    """Detect objects in ``images`` (files, folders, globs; see ``engine.expand_images``) with a
    checkpoint's model.

    Writes ``out_dir/results.json`` (COCO results: ``image_id`` indexes ``images.json``,
    original category ids, boxes in the image's pixels as a viewer shows them: turned as its
    EXIF orientation says, as detectron2 reads images) and one picture per image, ``<stem>.jpg``
    (``<stem>_1.jpg``, ... for a stem met again; ``images.json`` names each image's ``picture``).
    Every image's header is read first: an image that is missing, unreadable or of more than 8
    bits per channel is skipped with a warning and listed under ``skipped`` in ``images.json``,
    as is one that fails to decode later (a file cut short after its header); the others are
    predicted. Where no image reads, the run is refused (all listed in one ``DatasetError``)
    and nothing is written: the folder is made, and the pictures written, from the first image
    that decodes on. ``pictures``: false writes the two json files only. ``workers`` loader
    processes (default: ``engine.reading_workers``) read the next images while the model
    runs; ``progress``: a bar over the images on a terminal. ``batch_size`` images go through
    the model at a time (``Detector.detect_batch``; 1: each image's detections as ``eval``
    gives them at its default batch size of 1).
    Returns a summary dict (model used, counts, skipped files, paths).
    """
    check_batch_size(batch_size)
    detector = Detector.load(checkpoint, which, device, score_thresh)
    paths = expand_images(images)  # absolute
    out = Path(out_dir)
    names = picture_names(paths)
    if pictures:
        _refuse_pictures_read_as_inputs(out, images, paths, names)
    unreadable = check_image_files(paths, "predict")
    for path, error in unreadable.items():  # each said as `skipped: FILE: what is wrong`
        log.warning("skipped: %s: %s", path, error.reason)
    _name_an_earlier_prediction(out, names)
    results, image_infos, skipped, errors = [], [], [], []
    workers = reading_workers(detector.cfg, detector.device, workers)
    read = DataLoader(_ImageFiles(paths, set(unreadable)), batch_size=None, num_workers=workers,
                      collate_fn=_as_is)
    bar = progress_bar(len(paths), "predict", enabled=progress)
    batch: list[tuple[int, Path, str, torch.Tensor]] = []  # decoded, not yet detected

    def detect_batch() -> None:
        for (image_id, path, name, image), dets in zip(batch, detector.detect_batch([b[3] for b in batch])):
            results.extend(detector.to_coco(dets, image_id))
            info = {"id": image_id, "file_name": str(path), "height": int(image.shape[-2]),
                    "width": int(image.shape[-1])}
            if pictures:
                info["picture"] = f"{name}.jpg"
                save_image(out / f"{name}.jpg", detector.draw(image, dets), quality=92)
            image_infos.append(info)
        if bar is not None:
            bar.update(len(batch))
        batch.clear()

    try:
        for image_id, (path, name, image) in enumerate(zip(paths, names, read), start=1):
            error = unreadable.get(path)
            if isinstance(image, tuple):  # failed to decode although its header read
                error = DatasetError(image[0], reason=image[1])
                log.warning("skipped: %s: %s", path, error.reason)
            if error is not None:  # the file is named beside its error
                skipped.append({"file_name": str(path), "error": error.reason})
                errors.append(error)
                if bar is not None:
                    bar.update(1)
                continue
            if not image_infos and not batch:  # the first image that decodes
                out.mkdir(parents=True, exist_ok=True)
            batch.append((image_id, path, name, image))
            if len(batch) == batch_size:
                detect_batch()
        if batch:
            detect_batch()
    finally:
        if bar is not None:
            bar.close()
    if not image_infos:  # every header read, no image decoded (all cut short)
        refuse_unreadable(errors, "predict")
    write_json(out / "results.json", results)
    write_json(out / "images.json", {"images": image_infos,
                                     "categories": detector.categories.to_coco(),
                                     "model": detector.which, "checkpoint": str(checkpoint),
                                     "score_thresh": score_thresh, "skipped": skipped})
    log.debug("%s: %d images, %d detections above %.2f, model: %s", out, len(image_infos),
              len(results), score_thresh, detector.which)
    return {"model": detector.which, "images": len(image_infos), "detections": len(results),
            "skipped": [s["file_name"] for s in skipped], "results": str(out / "results.json")}
