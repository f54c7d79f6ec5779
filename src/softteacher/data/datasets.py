"""Dataset readers: COCO json, Pascal VOC and unlabeled images -> ``DetectionSet``.

Every reader returns the record contract of ``records.py``: xyxy boxes in original
pixels, contiguous labels ``1..C`` and a ``LoadReport`` counting what was changed or
dropped. Bad input raises ``DatasetError`` naming the file and the record; record-level
problems are collected and raised together, so one run shows all of them.

Box conventions:
- COCO ``[x, y, w, h]`` -> ``[x, y, x + w, y + h]``.
- VOC ``xmin..xmax`` are 1-based inclusive pixels -> ``[xmin - 1, ymin - 1, xmax, ymax]``,
  so a VOC box and the COCO box ``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]``
  give identical records.
- Boxes partly outside the image are clipped; boxes with nothing left inside, and COCO boxes
  of zero width or height (COCO train2017 has two), are dropped. Both are counted in the report.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path, PureWindowsPath

import numpy as np
import torch
from PIL import Image

from softteacher.data.records import (
    Category,
    CategoryMap,
    DatasetError,
    DetectionSet,
    ImageRecord,
    LoadReport,
    ScoredAnnotations,
    ignore_classes,
    object_areas,
)
from softteacher.io import write_json

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")
MAX_LISTED = 20  # problems listed in one DatasetError; the rest are counted

# LoadReport reasons
CLIPPED = "box clipped to the image"
OUTSIDE = "box outside the image, dropped"
ZERO_SIZE = "box of zero width or height, dropped"
SIZE_FROM_FILE = "image size read from the file (not in the annotations)"

_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class _Problems:
    """Record-level problems of one source, raised together as one ``DatasetError``."""

    def __init__(self, source: str):
        self.source = source
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def raise_if_any(self) -> None:
        n = len(self.items)
        if n == 1:
            raise DatasetError(f"{self.source}: {self.items[0]}")
        if n > 1:
            lines = [f"{self.source}: {n} problems:"] + [f"  {m}" for m in self.items[:MAX_LISTED]]
            if n > MAX_LISTED:
                lines.append(f"  ... and {n - MAX_LISTED} more")
            raise DatasetError("\n".join(lines))


def _id_key(x):
    """An id as a set key: the integer it is or spells ("12"), else the value's text."""
    value = _as_int(x)
    if value is None and isinstance(x, str):
        try:
            value = int(x)
        except ValueError:
            pass
    return value if value is not None else repr(x)


def _integer_problem(key: str, x) -> str:
    """What is wrong with an id that is not an integer."""
    if x is None:
        return f"no {key}"
    return f"{key} must be an integer, got {x!r:.50} (a {type(x).__name__})"


def _as_int(x) -> int | None:
    """``x`` as an int if it is an integral number (not a bool), else None."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    if isinstance(x, float) and not x.is_integer():
        return None
    return int(x)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


#: Pillow modes of more than 8 bits per channel: converting them to RGB clips every value above
#: 255, so a 12- or 16-bit image would turn mostly white without a word
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _high_depth(mode: str) -> str:
    return (f"{mode} pixels (more than 8 bits per channel), which detection would clip to 255: "
            f"convert the image to 8-bit RGB or grayscale, scaled as suits the data")


def _image_size(path: str | Path, decode: bool = False, depth: bool = False) -> tuple[int, int]:
    """(width, height) from the file's header, or with ``decode`` after decoding every pixel (a
    truncated or corrupt file fails then). ``decode`` or ``depth`` refuse high bit-depth modes
    (known from the header). OSError if missing or not a readable image."""
    try:
        with Image.open(path) as im:
            mode, size = im.mode, im.size
            if decode and mode not in HIGH_DEPTH_MODES:
                im.load()
    except FileNotFoundError:
        raise
    except _PIL_ERRORS as e:
        raise OSError(f"{type(e).__name__}: {e}") from None
    if (decode or depth) and mode in HIGH_DEPTH_MODES:
        raise OSError(_high_depth(mode))
    return size


def _file_problem(path: str | Path, e: OSError) -> str:
    """What is wrong with the file at ``path``: named in it, unless ``path`` is empty."""
    if isinstance(e, FileNotFoundError):
        return f"image file not found{f': {path}' if path else ''}"
    return f"cannot read image file{f' {path}' if path else ''} ({e})"


def check_image_files(paths: list[Path], source: str) -> dict[Path, DatasetError]:
    """Read the header of every file (as cheap as a check gets: no pixel is decoded), so that a
    command meets its unreadable inputs before it writes anything rather than halfway through:
    a file missing, not an image Pillow opens, or of more than 8 bits per channel (which
    ``read_image`` refuses). A file truncated after its header is not found here.

    Returns:
        each unreadable file, to what is wrong with it (the others can go on without them);
        the error's ``reason`` does not name the file.
    Raises:
        DatasetError: no file reads: every one listed together under ``source``.
    """
    found = {}
    for path in paths:
        try:
            _image_size(path, depth=True)
        except OSError as e:
            found[path] = DatasetError(_file_problem(path, e), reason=_file_problem("", e))
    if found and len(found) == len(paths):
        refuse_unreadable(list(found.values()), source)
    return found


def refuse_unreadable(errors: list[DatasetError], source: str) -> None:
    """Raise one ``DatasetError`` that lists ``errors`` (each naming its file) under ``source``:
    a command none of whose input files read."""
    problems = _Problems(source)
    for error in errors:
        problems.add(str(error))
    problems.raise_if_any()


def check_record_files(dset: DetectionSet) -> None:
    """Read the header of every image of ``dset`` (no pixel is decoded: ``data check`` does
    that), so that a command refuses a missing, unreadable, 16-bit or resized file before it
    starts rather than when it reaches it.

    Raises:
        DatasetError: every such file, listed together under the set's source.
    """
    problems = _Problems(dset.source)
    _verify_files(dset.records, problems, decode=False)
    problems.raise_if_any()


def check_files_exist(dset: DetectionSet, setting: str) -> None:
    """Refuse a set whose image files are not all there, with one look at each path (no file is
    opened, so a set of 100k images costs seconds): a wrong image folder then stops a run before
    it starts rather than when the sampler first draws a missing image. ``setting`` is the
    option that names the set's image folder, given in the message.

    Raises:
        DatasetError: the count and the first missing files, the folder they were looked for in.
    """
    missing = [r for r in dset.records if not Path(r.path).is_file()]
    if not missing:
        return
    listed = "".join(f"\n  {_describe(r)}: no file {r.path}" for r in missing[:MAX_LISTED])
    more = f"\n  ... and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else ""
    raise DatasetError(f"{dset.source}: {len(missing)} of {len(dset.records)} image files not found "
                       f"under {dset.image_root} ({image_folder_hint(dset, setting, missing)}):"
                       f"{listed}{more}")


def find_image_folder(records: list[ImageRecord], roots: list[Path], depth: int = 3,
                      max_folders: int = 2000) -> Path | None:
    """A folder under ``roots`` (``depth`` levels down, ``max_folders`` looked at in all) that
    holds a file of each record's ``file_name`` (a relative path) and size (where the record
    gives one): where a set's images are when its image folder was not named. Hidden folders
    are passed over, and so are this package's outputs (``results.json`` beside ``images.json``:
    prediction pictures have the images' names and sizes)."""
    if not records:
        return None

    def holds(folder: Path) -> bool:
        if (folder / "results.json").is_file() and (folder / "images.json").is_file():
            return False
        for r in records:
            path = folder / r.file_name
            if not path.is_file():
                return False
            if r.width > 0 and r.height > 0:
                try:
                    with Image.open(path) as im:
                        if im.size != (r.width, r.height):
                            return False
                except _PIL_ERRORS:
                    return False
        return True

    seen: set[Path] = set()
    for root in roots:
        level = [root.resolve()]
        for _ in range(depth + 1):
            below = []
            for folder in level:
                if folder in seen or len(seen) >= max_folders:
                    continue
                seen.add(folder)
                if holds(folder):
                    return folder
                try:  # the file type from the listing: no look at each of a large folder's files
                    with os.scandir(folder) as entries:
                        below += sorted(Path(e.path) for e in entries
                                        if not e.name.startswith(".") and e.is_dir())
                except OSError:
                    continue
            level = below
    return None


def is_voc_root(path: str | Path) -> bool:
    """A Pascal VOC root: a folder with ``Annotations/``."""
    return Path(path, "Annotations").is_dir()


def image_folder_hint(dset: DetectionSet, setting: str, missing: list[ImageRecord] | None = None) -> str:
    """What names ``dset``'s image folder: ``setting`` (``... DIR``) for a json, the root's folder
    for VOC; for a json whose ``missing`` records' files (default: looked for) are found in
    another folder, that folder's setting."""
    if is_voc_root(dset.source):
        return "a VOC root's images are in its JPEGImages/"
    if missing is None:
        missing = [r for r in dset.records if not Path(r.path).is_file()]
    absolute = absolute_names_hint(missing, setting)
    if absolute:
        return absolute
    return f"{setting} names the image folder{image_folder_found(missing, dset.source, setting)}"


def absolute_names_hint(missing: list[ImageRecord], setting: str) -> str:
    """Why ``setting`` cannot find ``missing`` records' files whose ``file_name`` is an absolute
    path (a json written on another machine), or "" where none is."""
    absolute = [r for r in missing if Path(r.file_name).is_absolute()]
    if not absolute:
        return ""
    option = setting.removesuffix("DIR").rstrip(" =")
    return (f"the json names {len(absolute)} of them by absolute paths, such as {absolute[0].file_name}, "
            f"which {option} does not change: write its file_names relative to the image folder")


def image_folder_found(missing: list[ImageRecord], source: str | Path, setting: str) -> str:
    """Where the files of ``missing`` records of json ``source`` are, if ``find_image_folder``
    finds them below its folder, the folder above (COCO's ``annotations/`` beside the image
    folders) or the working folder: ``; ... under X: SETTING X``, else ""."""
    folder = Path(source).parent
    found = find_image_folder(missing[:MAX_LISTED], [folder, folder.parent, Path.cwd()])
    if found is None:
        return ""
    shown = found.relative_to(Path.cwd()) if Path.cwd() in found.parents else found
    return f"; files of those names and sizes are under {shown}: {setting.rsplit('DIR', 1)[0]}{shown}"


def _describe(record: ImageRecord) -> str:
    origin = f", {record.origin}" if record.origin else ""
    return f"image {record.image_id} ({record.file_name}{origin})"


def _exif_hint(path: str, stored: tuple[int, int], annotated: tuple[int, int]) -> str:
    """Why a file's stored size may be the annotations' turned by 90 degrees: its EXIF says so."""
    if stored[::-1] != tuple(annotated):
        return ""
    try:
        with Image.open(path) as im:
            orientation = im.getexif().get(0x0112, 1)  # the EXIF Orientation tag
    except _PIL_ERRORS:
        return ""
    if orientation not in (5, 6, 7, 8):
        return ""
    return (f" (the file's EXIF orientation {orientation} turns it by 90 degrees for a viewer: the "
            f"annotations were made on the turned photo, while datasets are read as stored, as "
            f"COCO's are; store the pixels turned, e.g. with PIL.ImageOps.exif_transpose)")


#: the turn that shows an image as its EXIF orientation (2-8) says, as ``ImageOps.exif_transpose``
_ORIENTATION_TURNS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                      4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                      6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                      8: Image.Transpose.ROTATE_90}


def upright(im: Image.Image) -> Image.Image:
    """``im`` turned as its EXIF orientation says a viewer shows it; as stored where its EXIF
    says nothing or cannot be read (a tag of the wrong type, as some cameras write, on which
    ``ImageOps.exif_transpose``, which writes the EXIF again, fails)."""
    try:
        turn = _ORIENTATION_TURNS.get(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - any unreadable EXIF: the pixels as stored
        return im
    return im if turn is None else im.transpose(turn)


def read_image(path: str, record: ImageRecord | None = None, source: str = "",
               exif_orientation: bool = False) -> torch.Tensor:
    """Decode an image file as RGB (grayscale, palette and alpha images are converted).

    EXIF orientation is ignored unless ``exif_orientation`` (the stored pixels, in which COCO's
    annotations are drawn and their sizes given).
    Args:
        path: image file.
        record: when given, the decoded size must equal ``record.width/height``.
        source: annotation file of ``record``, named in messages.
        exif_orientation: turn the pixels as the file's EXIF orientation says a viewer shows them
            (a phone's photo taken upright): what ``predict`` detects on.
    Returns:
        (3, H, W) uint8 tensor.
    Raises:
        DatasetError: missing or unreadable file, or a size other than the record's; the message
            names the file, and the source and image id when a record is given.
    """
    where, file = str(path), ""  # the path once: first, or after the record it belongs to
    if record is not None:
        where, file = f"{source + ': ' if source else ''}{_describe(record)}", f" {path}"
    try:
        with Image.open(path) as im:
            mode = im.mode
            shown = upright(im) if exif_orientation else im
            rgb = None if mode in HIGH_DEPTH_MODES else shown.convert("RGB")
    except FileNotFoundError:
        reason = f"image file not found{':' if file else ''}{file}"
        raise DatasetError(f"{where}: {reason}", reason=reason) from None
    except _PIL_ERRORS as e:
        reason = f"cannot read image file{file} ({type(e).__name__}: {e})"
        raise DatasetError(f"{where}: {reason}", reason=reason) from None
    if rgb is None:
        reason = f"image file{file} has {_high_depth(mode)}"
        raise DatasetError(f"{where}: {reason}", reason=reason)
    if record is not None and rgb.size != (record.width, record.height):
        raise DatasetError(f"{where}: file {path} is {rgb.size[0]}x{rgb.size[1]} (width x height), "
                           f"the annotations say {record.width}x{record.height}"
                           f"{_exif_hint(path, rgb.size, (record.width, record.height))}")
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)


def _fmt_box(box) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "] (xyxy)"


def _fit_box(box: tuple[float, float, float, float], rec: ImageRecord, what: str,
             report: LoadReport) -> tuple[float, float, float, float] | None:
    """Clip an xyxy box to its image; None (counted in ``report``) when nothing remains."""
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        report.add(ZERO_SIZE, f"{what}: box {_fmt_box(box)}")
        return None
    w, h = rec.width, rec.height
    clipped = (min(max(x1, 0.0), w), min(max(y1, 0.0), h), min(max(x2, 0.0), w), min(max(y2, 0.0), h))
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        report.add(OUTSIDE, f"{what}: box {_fmt_box(box)} outside the {w}x{h} image")
        return None
    if clipped != box:
        report.add(CLIPPED, f"{what}: box {_fmt_box(box)} clipped to the {w}x{h} image")
    return clipped


def _fill(rec: ImageRecord, anns: list[tuple[int, tuple, int, float]], ignore: list[tuple[tuple, int]]
          ) -> None:
    """Set a record's arrays from (ann_id, xyxy box, label, area or NaN) and (ignore box, label)."""
    if anns:
        rec.ann_ids = np.array([a[0] for a in anns], dtype=np.int64)
        rec.boxes = np.array([a[1] for a in anns], dtype=np.float32).reshape(-1, 4)
        rec.labels = np.array([a[2] for a in anns], dtype=np.int64)
        areas = np.array([a[3] for a in anns], dtype=np.float32)
        if not np.isnan(areas).all():
            rec.areas = areas
    if ignore:
        rec.ignore_boxes = np.array([b for b, _ in ignore], dtype=np.float32).reshape(-1, 4)
        rec.ignore_labels = np.array([label for _, label in ignore], dtype=np.int64)


def _area(ann: dict) -> float:
    """A COCO annotation's ``area`` when it is a positive number, else NaN (the box's counts)."""
    area = ann.get("area")
    return float(area) if _is_number(area) and 0 < float(area) < math.inf else math.nan


def _verify_files(records: list[ImageRecord], problems: _Problems, decode: bool = True) -> None:
    """Each image file must exist, hold at most 8 bits per channel, have the record's size and,
    with ``decode``, decode to its end (without it only the header is read)."""
    for rec in records:
        try:
            size = _image_size(rec.path, decode=decode, depth=True)
        except OSError as e:
            problems.add(f"{_describe(rec)}: {_file_problem(rec.path, e)}")
            continue
        if size != (rec.width, rec.height):
            problems.add(f"{_describe(rec)}: file {rec.path} is {size[0]}x{size[1]} (width x height), "
                         f"the annotations say {rec.width}x{rec.height}"
                         f"{_exif_hint(rec.path, size, (rec.width, rec.height))}")


def _log_report(dset: DetectionSet) -> None:
    if dset.report:
        counts = ", ".join(f"{n} x {r}" for r, n in sorted(dset.report.counts.items()))
        log.warning("%s: %s", dset.source, counts)


# ----------------------------------------------------------------------------- COCO

def read_coco_json(ann_file: str | Path) -> dict:
    """Parse a COCO json and check it is an object with an ``images`` list.

    Raises:
        DatasetError: missing or unreadable file, invalid JSON (with its line and column),
            no ``images`` list.
    """
    ann_file = Path(ann_file)
    try:
        raw = ann_file.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{ann_file}: no such file") from None
    except OSError as e:
        raise DatasetError(f"{ann_file}: cannot read ({e.strerror or e})") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        # json's own "Unterminated string starting at" ends with the word the position follows
        raise DatasetError(f"{ann_file}: not valid JSON: {e.msg.removesuffix(' at')} at line "
                           f"{e.lineno} column {e.colno} (char {e.pos})") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{ann_file}: not valid JSON: not UTF-8 text ({e.reason} at byte "
                           f"{e.start})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{ann_file}: expected a JSON object with an 'images' list, "
                           f"got a {type(data).__name__}")
    if "images" not in data:
        raise DatasetError(f"{ann_file}: no 'images' key, not a COCO json "
                           f"(keys: {', '.join(sorted(map(str, data))) or 'none'})")
    for key in ("images", "annotations", "categories"):
        if key in data and not isinstance(data[key], list):
            raise DatasetError(f"{ann_file}: '{key}' must be a list, got a {type(data[key]).__name__}")
    return data


def _id_problem(key: str, i: int, entry: object) -> str:
    """Why item ``i`` of a COCO json's ``key`` list has no id: not a record at all (``null``, a
    list), no ``id``, or an id that is no integer (the record shown where its id is missing, to
    find it by)."""
    if not isinstance(entry, dict):
        return f"{key}[{i}]: expected a record ({{...}}), got {entry!r:.100}"
    if "id" not in entry:
        return f"{key}[{i}]: needs an integer 'id', has none: {entry!r:.100}"
    return f"{key}[{i}]: needs an integer 'id', got {entry['id']!r:.100}"


def _coco_categories(data: dict, source: str) -> CategoryMap:
    cats = []
    for i, c in enumerate(data.get("categories", [])):
        cid = _as_int(c.get("id")) if isinstance(c, dict) else None
        if cid is None:
            raise DatasetError(f"{source}: {_id_problem('categories', i, c)}")
        cats.append(Category(cid, str(c.get("name", cid))))
    try:
        return CategoryMap(cats)
    except ValueError as e:
        raise DatasetError(f"{source}: {e}") from None


def _coco_images(data: dict, image_root: Path, problems: _Problems,
                 report: LoadReport) -> list[ImageRecord]:
    records, seen = [], set()
    for i, img in enumerate(data["images"]):
        image_id = _as_int(img.get("id")) if isinstance(img, dict) else None
        if image_id is None:
            problems.add(_id_problem("images", i, img))
            continue
        name = img.get("file_name")
        if not isinstance(name, str) or not name:
            problems.add(f"image {image_id}: 'file_name' missing or not a string")
            continue
        what = f"image {image_id} ({name})"
        if image_id in seen:
            problems.add(f"{what}: duplicate image id {image_id}")
            continue
        seen.add(image_id)
        path = image_root / name
        if "\\" in name and "/" not in name and not path.exists():  # written on Windows: images\\a.jpg
            posix = image_root / PureWindowsPath(name).as_posix()
            if posix.exists():
                name, path = PureWindowsPath(name).as_posix(), posix
        w, h = img.get("width"), img.get("height")
        if w is None and h is None:
            try:
                w, h = _image_size(path)
            except OSError as e:
                problems.add(f"{what}: no width/height in the json and {_file_problem(path, e)}")
                continue
            report.add(SIZE_FROM_FILE, what)
        elif (_as_int(w) or 0) <= 0 or (_as_int(h) or 0) <= 0:
            problems.add(f"{what}: width and height must be positive integers, got {w!r} x {h!r}")
            continue
        records.append(ImageRecord(image_id, name, str(path), int(w), int(h)))
    return records


def missing_image_records(ann_file: str | Path, image_root: Path) -> list[ImageRecord]:
    """The images of COCO json ``ann_file`` that it names well and whose files are not under
    ``image_root`` (none where the json cannot be read)."""
    try:
        data = read_coco_json(ann_file)
    except DatasetError:
        return []
    records = _coco_images(data, image_root, _Problems(str(ann_file)), LoadReport())
    return [r for r in records if not Path(r.path).is_file()]


def _coco_annotations(data: dict, records: list[ImageRecord], cats: CategoryMap,
                      problems: _Problems, report: LoadReport) -> ScoredAnnotations:
    """Fill the records' boxes; return the annotations as pycocotools scores them."""
    by_id = {r.image_id: r for r in records}
    # images listed but refused above (their problem is reported): their annotations are skipped
    refused = {_id_key(img.get("id")) for img in data.get("images", []) if isinstance(img, dict)} - set(by_id)
    anns, ignore = defaultdict(list), defaultdict(list)
    scored = []
    seen: set[int] = set()
    for i, ann in enumerate(data.get("annotations", [])):
        ann_id = _as_int(ann.get("id")) if isinstance(ann, dict) else None
        if ann_id is None:
            problems.add(_id_problem("annotations", i, ann))
            continue
        if not -2**63 <= ann_id < 2**63:
            problems.add(f"annotations[{i}]: id {ann_id} does not fit in 64 bits")
            continue
        if ann_id in seen:
            problems.add(f"annotation {ann_id}: duplicate annotation id {ann_id}")
            continue
        seen.add(ann_id)
        rec = by_id.get(_as_int(ann.get("image_id")))
        if rec is None:
            raw = ann.get("image_id")
            if _id_key(raw) not in refused:
                problem = (f"unknown image id {raw!r}" if _as_int(raw) is not None
                           else _integer_problem("image_id", raw))
                problems.add(f"annotation {ann_id}: {problem}")
                continue
            # its image's problem is reported: its own are checked, nothing is kept of it
            what = f"image {raw!r}, annotation {ann_id}"
        else:
            what = f"{_describe(rec)}, annotation {ann_id}"
        raw = ann.get("category_id")
        cat_id = _as_int(raw)
        if cat_id is None:
            problems.add(f"{what}: {_integer_problem('category_id', raw)}")
            continue
        if not cats.has(cat_id):
            problems.add(f"{what}: unknown category id {raw!r}")
            continue
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))):
            hint = (" (every annotation needs a bbox; a segmentation alone is not read)"
                    if bbox is None and "segmentation" in ann else "")
            problems.add(f"{what}: bbox must be 4 numbers [x, y, width, height], got {bbox!r:.100}{hint}")
            continue
        x, y, w, h = (float(v) for v in bbox)
        if w < 0 or h < 0:
            problems.add(f"{what}: bbox width and height must not be negative, got {w:g} x {h:g}")
            continue
        crowd = ann.get("iscrowd", 0)
        if not (isinstance(crowd, (int, float)) and crowd in (0, 1)):  # True and False are 1 and 0
            problems.add(f"{what}: iscrowd must be 0 or 1, got {crowd!r:.50}")
            continue
        if rec is None:
            continue
        area = ann.get("area")  # pycocotools takes it as given; w * h where there is none
        scored.append((rec.image_id, cat_id, x, y, w, h,
                       float(area) if _is_number(area) and math.isfinite(area) else w * h, int(crowd)))
        box = _fit_box((x, y, x + w, y + h), rec, what, report)
        if box is None:
            continue
        if crowd:
            ignore[rec.image_id].append((box, cats.label(cat_id)))
        else:
            anns[rec.image_id].append((ann_id, box, cats.label(cat_id), _area(ann)))
    for rec in records:
        _fill(rec, anns.get(rec.image_id, []), ignore.get(rec.image_id, []))
    return ScoredAnnotations.from_rows(scored)


def coco_from_dict(data: dict, source: str | Path, images: str | Path = "", labeled: bool = True,
                   verify_images: bool = False) -> DetectionSet:
    """Build a ``DetectionSet`` from a parsed COCO json (see ``read_coco_json``).

    Args:
        data: the json's object, with an ``images`` list.
        source: the json file, for messages; ``images`` defaults to its folder.
        images: folder the images' ``file_name``s are relative to.
        labeled: read ``annotations`` and ``categories`` (both required); otherwise ignore
            the annotations and keep the categories if present.
        verify_images: decode every image; missing, truncated or unreadable files, more
            than 8 bits per channel and sizes other than the json's are errors.
    Raises:
        DatasetError: every record-level problem found, in one message.
    """
    source = str(source)
    if labeled:
        for key in ("annotations", "categories"):
            if key not in data:
                raise DatasetError(f"{source}: no '{key}' key: a labeled COCO json needs "
                                   f"'images', 'annotations' and 'categories' (an image-only "
                                   f"json can be used as unlabeled data)")
    if not data["images"]:
        raise DatasetError(f"{source}: no images")
    image_root = Path(images) if str(images) else Path(source).parent
    cats = _coco_categories(data, source)
    if labeled and not len(cats) and data["annotations"]:  # else every annotation's class is unknown
        raise DatasetError(f"{source}: 'categories' is empty: a labeled COCO json lists the classes "
                           f"its annotations' category_id name")
    problems, report = _Problems(source), LoadReport()
    records = _coco_images(data, image_root, problems, report)
    scored = _coco_annotations(data, records, cats, problems, report) if labeled else None
    if verify_images:
        _verify_files(records, problems)
    problems.raise_if_any()
    dset = DetectionSet(source, str(image_root), cats, records, has_annotations=labeled, report=report,
                        scored_annotations=scored)
    _log_report(dset)
    return dset


def load_coco(ann_file: str | Path, images: str | Path = "", verify_images: bool = False) -> DetectionSet:
    """A labeled COCO json (``images``, ``annotations``, ``categories``).

    ``iscrowd`` boxes become ``ignore_boxes``; images without annotations are kept.
    Without ``verify_images`` no image file is opened (cheap for 118k images); ``read_image``
    checks each file when it is used.
    """
    return coco_from_dict(read_coco_json(ann_file), ann_file, images, True, verify_images)


def write_coco(dset: DetectionSet, path: str | Path) -> None:
    """Write ``dset`` as a COCO json (atomically) that ``load_coco`` reads back identically.

    Boxes become ``[x, y, w, h]`` with ``area = w * h``, labels their original category ids.
    Ignore boxes become ``iscrowd=1`` annotations of the first category (records keep no class
    for them) with ids after the largest annotation id. An unlabeled set is written without
    ``annotations``.
    """
    cats = dset.categories
    out: dict = {"images": [{"id": int(r.image_id), "file_name": r.file_name, "width": int(r.width),
                             "height": int(r.height)} for r in dset.records],
                 "categories": cats.to_coco()}
    if dset.has_annotations:
        anns = []
        next_id = max((int(r.ann_ids.max()) for r in dset.records if len(r.ann_ids)), default=0) + 1

        def add(ann_id: int, image_id: int, category_id: int, box, crowd: int, area: float) -> None:
            x1, y1, x2, y2 = (float(v) for v in box)
            w, h = x2 - x1, y2 - y1
            anns.append({"id": int(ann_id), "image_id": int(image_id), "category_id": int(category_id),
                         "bbox": [x1, y1, w, h], "area": w * h if math.isnan(area) else area,
                         "iscrowd": crowd})

        for rec in dset.records:
            for ann_id, box, label, area in zip(rec.ann_ids, rec.boxes, rec.labels, object_areas(rec)):
                add(ann_id, rec.image_id, cats.category_id(int(label)), box, 0, float(area))
            for box, label in zip(rec.ignore_boxes, ignore_classes(rec)):
                add(next_id, rec.image_id, cats.category_id(int(label)), box, 1, math.nan)
                next_id += 1
        out["annotations"] = anns
    write_json(path, out)


# ----------------------------------------------------------------------------- unlabeled

def image_files(folder: Path) -> list[Path]:
    """Regular image files under ``folder`` (recursive, into linked folders too, each folder
    once: a link back up is not followed again; hidden files and folders, such as macOS's
    ``._x.jpg`` or a ``.cache/``, skipped; a folder named like an image is no image), sorted by
    relative path."""
    files, walked = [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in walked:  # reached again through a link
            dirs[:] = []
            continue
        walked.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [Path(root, n) for n in names
                  if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_SUFFIXES
                  and Path(root, n).is_file()]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def load_unlabeled(path: str | Path, images: str | Path = "", verify_images: bool = False) -> DetectionSet:
    """Unlabeled images (``has_annotations=False``, records without boxes).

    Args:
        path: a COCO json with ``images`` (annotations, if any, are ignored; categories are
            kept), or a folder of images (``image_files``: jpg, jpeg, png, bmp, webp, tif, tiff; recursive;
            sorted by relative path; ids 1..N; sizes read from the headers; ``images`` is ignored).
        images: folder of a json's ``file_name``s (default: the json's folder).
        verify_images: decode every image, as ``coco_from_dict`` does: missing, truncated or
            unreadable files and more than 8 bits per channel are errors.
    Raises:
        DatasetError: no images, or unreadable files (listed together).
    """
    path = Path(path)
    if path.is_file():
        return coco_from_dict(read_coco_json(path), path, images, False, verify_images)
    if not path.is_dir():
        raise DatasetError(f"{path}: no such file or folder")
    files = image_files(path)
    if not files:
        raise DatasetError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder "
                           f"or below")
    problems, records = _Problems(str(path)), []
    for i, f in enumerate(files, start=1):
        name = f.relative_to(path).as_posix()
        try:
            w, h = _image_size(f, decode=verify_images)
        except OSError as e:
            problems.add(f"image {i} ({name}): {_file_problem(f, e)}")
            continue
        records.append(ImageRecord(i, name, str(f), w, h))
    problems.raise_if_any()
    return DetectionSet(str(path), str(path), CategoryMap([]), records, has_annotations=False)


# ----------------------------------------------------------------------------- Pascal VOC

def _to_number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _voc_objects(xml_path: Path, root_el: ET.Element, problems: _Problems
                 ) -> list[tuple[int, str, bool, tuple | None]]:
    """(object index from 1, class name, difficult, VOC box xyxy 0-based or None if bad)."""
    out = []
    for k, obj in enumerate(root_el.findall("object"), start=1):
        what = f"{xml_path}: object {k}"
        name = (obj.findtext("name") or "").strip()
        if not name:
            problems.add(f"{what}: no <name>")
            continue
        what = f"{what} ({name})"
        difficult = (obj.findtext("difficult") or "0").strip()
        if difficult not in ("0", "1"):
            problems.add(f"{what}: <difficult> must be 0 or 1, got {difficult!r}")
            continue
        bnd = obj.find("bndbox")
        texts = [bnd.findtext(t) if bnd is not None else None for t in ("xmin", "ymin", "xmax", "ymax")]
        try:
            xmin, ymin, xmax, ymax = (float(t) for t in texts)
        except (TypeError, ValueError):
            problems.add(f"{what}: <bndbox> needs numbers xmin, ymin, xmax, ymax, got {texts}")
            continue
        if not all(map(math.isfinite, (xmin, ymin, xmax, ymax))):
            problems.add(f"{what}: <bndbox> has a non-finite coordinate: {texts}")
            continue
        if xmax < xmin or ymax < ymin:
            problems.add(f"{what}: bad box xmin={xmin:g} ymin={ymin:g} xmax={xmax:g} ymax={ymax:g} "
                         f"(max < min)")
            out.append((k, name, difficult == "1", None))
            continue
        out.append((k, name, difficult == "1", (xmin - 1, ymin - 1, xmax, ymax)))
    return out


def _voc_image_name(img_dir: Path, name: str, filename: str | None) -> str:
    """The file in ``JPEGImages/`` of the image ``name``: ``{name}.jpg`` as in Pascal VOC; where
    that is missing, ``name`` with another image suffix (a PNG), then the file the xml's
    ``<filename>`` names (labelImg's, for an image whose file has another stem), whichever
    exists; else ``{name}.jpg``, reported missing later. The id's own file comes first: an xml
    copied for another image often keeps the ``<filename>`` of the one it was copied from."""
    given = PureWindowsPath((filename or "").strip()).name  # the name after / or \\ (a Windows path)
    for candidate in [name + s for s in IMAGE_SUFFIXES + tuple(s.upper() for s in IMAGE_SUFFIXES)] + (
            [given] if given else []):
        if (img_dir / candidate).is_file():
            return candidate
    return f"{name}.jpg"


def _per_class_list(stem: str, stems: set[str]) -> bool:
    """Whether image-set file ``stem`` is one of VOC's per-class lists, ``{class}_{set}``
    (``aeroplane_trainval``), not an image set of its own (``train_10pct``)."""
    cls, _, image_set = stem.partition("_")
    return cls in VOC_CLASSES and image_set in stems | {"train", "val", "trainval", "test"}


def _image_set_ids(set_file: Path, ann_dir: Path) -> list[str]:
    """The image ids a VOC image-set file lists, one a line: its first word (VOC's per-class
    lists add a column: ``2008_000008 -1``), or where ``Annotations/`` has an xml of the
    whole line, or of the line less such a column, that (an id with spaces, ``IMG 001``).
    UTF-8 with or without a byte-order mark, or UTF-16 with one (what Windows editors save)."""
    try:
        raw = set_file.read_bytes()
    except OSError as e:
        raise DatasetError(f"{set_file}: cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{set_file}: not UTF-8 text ({e.reason} at byte {e.start}): save it "
                           f"as UTF-8") from None
    ids = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        word = line.split()[0]
        if word != line:  # an id with spaces, with or without a per-class list's column
            column = re.fullmatch(r"(.*\S)\s+-?[01]", line)
            named = [line, column.group(1)] if column else [line]
            word = next((c for c in named if (ann_dir / f"{c}.xml").is_file()), word)
        ids.append(word)
    return ids


def _parse_xml(path: Path) -> ET.Element:
    """The root element of an xml file, in whatever encoding its declaration names (expat
    itself takes no multi-byte one such as GBK or Shift_JIS).

    Raises:
        FileNotFoundError: no such file.
        DatasetError: unreadable or malformed (naming the file).
    """
    try:
        return ET.parse(path).getroot()
    except FileNotFoundError:
        raise
    except ET.ParseError as e:
        raise DatasetError(f"{path}: malformed XML ({e})") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, LookupError):  # "multi-byte encodings are not supported": decode it here
        pass
    raw = path.read_bytes()
    declared = re.match(rb"\s*<\?xml[^>]*?encoding\s*=\s*[\"']([A-Za-z0-9._-]+)[\"'][^>]*\?>", raw)
    if declared is None:
        raise DatasetError(f"{path}: malformed XML (an encoding expat cannot read)")
    encoding = declared.group(1).decode("ascii")
    try:
        text = raw[declared.end():].decode(encoding)
    except LookupError:
        raise DatasetError(f"{path}: malformed XML (unknown encoding {encoding!r})") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not {encoding} text as its declaration says ({e.reason} at "
                           f"byte {declared.end() + e.start})") from None
    try:
        return ET.fromstring(text)
    except ET.ParseError as e:
        raise DatasetError(f"{path}: malformed XML ({e})") from None


def load_voc(root: str | Path, split: str = "trainval", class_names: list[str] | None = None,
             verify_images: bool = False) -> DetectionSet:
    """A Pascal VOC set: ``Annotations/{id}.xml``, ``JPEGImages/{id}.jpg`` (or, where that is
    missing, ``{id}`` with another image suffix, then the file the xml's ``<filename>`` names),
    ``ImageSets/Main/{split}.txt``.

    Args:
        root: the VOC root (e.g. ``VOCdevkit/VOC2007``).
        split: image set name.
        class_names: category ids 1..K in this order. Default: the 20 VOC classes in their
            standard order when every class found is one of them, else the sorted names found.
    Returns:
        Records with image ids 1..N in image-set order, annotation ids 1.. over all objects
        of the set in file order; ``difficult`` objects become ``ignore_boxes``.
    Raises:
        DatasetError: missing or malformed xml, unknown class, bad box (naming the xml file and
            the object's index from 1), missing image set.
    """
    root = Path(root)
    ann_dir, img_dir = root / "Annotations", root / "JPEGImages"
    set_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not ann_dir.is_dir():
        raise DatasetError(f"{root}: not a Pascal VOC root (no Annotations/ folder)")
    if not set_file.is_file():
        stems = {p.stem for p in set_file.parent.glob("*.txt")}
        known = sorted(stem for stem in stems if not _per_class_list(stem, stems))
        raise DatasetError(f"{set_file}: no such image set (split {split!r}; "
                           f"available: {', '.join(known) or 'none'})")
    names = _image_set_ids(set_file, ann_dir)
    if not names:
        raise DatasetError(f"{set_file}: empty image set")
    problems, report = _Problems(f"{root} ({split})"), LoadReport()
    parsed = []  # (record, objects)
    seen: set[str] = set()
    file_owner: dict[str, Path] = {}  # image file -> the xml whose image it is
    for image_id, name in enumerate(names, start=1):
        xml_path = ann_dir / f"{name}.xml"
        if name in seen:
            problems.add(f"{set_file}: image {name!r} listed twice")
            continue
        seen.add(name)
        try:
            root_el = _parse_xml(xml_path)
        except FileNotFoundError:
            problems.add(f"{xml_path}: no such annotation file (image {name!r} of {set_file.name})")
            continue
        except DatasetError as e:
            problems.add(str(e))
            continue
        file_name = _voc_image_name(img_dir, name, root_el.findtext("filename"))
        if file_name in file_owner:  # another id's file, by a <filename> left from a copied xml
            problems.add(f"{file_owner[file_name]} and {xml_path}: both are of the image file "
                         f"{img_dir / file_name}; each image's xml names its own file (one copied "
                         f"from another keeps the other's <filename>)")
            continue
        file_owner[file_name] = xml_path
        rec = ImageRecord(image_id, file_name, str(img_dir / file_name), 0, 0, origin=str(xml_path))
        w, h = (_as_int(_to_number(root_el.findtext(f"size/{t}"))) or 0 for t in ("width", "height"))
        if w > 0 and h > 0:
            rec.width, rec.height = w, h
        else:
            try:
                rec.width, rec.height = _image_size(rec.path)
            except OSError as e:
                problems.add(f"{xml_path}: no valid <size> and {_file_problem(rec.path, e)}")
                continue
            report.add(SIZE_FROM_FILE, f"{xml_path}")
        parsed.append((rec, xml_path, _voc_objects(xml_path, root_el, problems)))

    found = {obj[1] for _, _, objs in parsed for obj in objs}
    if class_names is None:
        class_names = list(VOC_CLASSES) if found <= set(VOC_CLASSES) else sorted(found)
    if len(set(class_names)) != len(class_names) or not all(isinstance(n, str) and n for n in class_names):
        raise ValueError(f"class_names must be distinct non-empty strings, got {class_names}")
    label_of = {n: i for i, n in enumerate(class_names, start=1)}

    ann_id = 0
    records = []
    for rec, xml_path, objs in parsed:
        anns, ignore = [], []
        for k, name, difficult, box in objs:
            ann_id += 1
            if name not in label_of:
                problems.add(f"{xml_path}: object {k}: unknown class {name!r} "
                             f"(classes: {', '.join(class_names)})")
                continue
            if box is None:
                continue
            box = _fit_box(box, rec, f"{xml_path}: object {k} ({name})", report)
            if box is None:
                continue
            if difficult:
                ignore.append((box, label_of[name]))
            else:
                anns.append((ann_id, box, label_of[name], math.nan))
        _fill(rec, anns, ignore)
        records.append(rec)
    if verify_images:
        _verify_files(records, problems)
    problems.raise_if_any()
    cats = CategoryMap([Category(i, n) for n, i in label_of.items()])
    dset = DetectionSet(str(root), str(img_dir), cats, records, report=report)
    _log_report(dset)
    return dset


# ----------------------------------------------------------------------------- dispatch

def load_as_found(path: str | Path, images: str | Path = "", split: str = "trainval",
                  verify_images: bool = False) -> tuple[DetectionSet, str]:
    """A COCO json, VOC root or folder of images, labeled where the source has annotations (a
    json's ``annotations`` key, a VOC root), else unlabeled. Returns (set, what it is)."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".json":
        data = read_coco_json(path)
        labeled = "annotations" in data
        kind = "COCO json, labeled" if labeled else "COCO json without annotations, unlabeled"
        return coco_from_dict(data, path, images, labeled=labeled, verify_images=verify_images), kind
    if is_voc_root(path):
        return (load_dataset(path, split=split, labeled=True, verify_images=verify_images),
                f"Pascal VOC, image set {split!r}, labeled")
    return (load_dataset(path, images, labeled=False, verify_images=verify_images),
            "folder of images, unlabeled")


def load_dataset(path: str | Path, images: str | Path = "", split: str = "trainval",
                 labeled: bool = True, verify_images: bool = False,
                 class_names: list[str] | None = None,
                 categories: CategoryMap | None = None) -> DetectionSet:
    """Read a dataset by what ``path`` is.

    - a ``.json`` file: ``load_coco`` (labeled) or ``load_unlabeled``;
    - a folder with ``Annotations/``: ``load_voc`` (``split``, and ``class_names`` when
      labeled); unlabeled, its boxes are dropped;
    - another folder: ``load_unlabeled`` (unlabeled only).

    ``categories`` (a training set's): a VOC set takes these classes, their names in the order
    of their labels and their ids, so that a VOC val set pairs with a COCO training json whose
    ids are not 1..K. A COCO json keeps its own categories.
    """
    p = Path(path)
    if not str(path):
        raise DatasetError("no dataset path given")
    if p.is_file():
        if p.suffix.lower() != ".json":
            raise DatasetError(f"{p}: expected a COCO .json file, a Pascal VOC root (a folder with "
                               f"Annotations/) or a folder of images")
        return load_coco(p, images, verify_images) if labeled else load_unlabeled(p, images, verify_images)
    if not p.is_dir():
        raise DatasetError(f"{p}: no such file or folder")
    if is_voc_root(p):
        if labeled and categories is not None:
            dset = load_voc(p, split, categories.names, verify_images=verify_images)
            dset.categories = categories  # label k is the k-th name of both
            return dset
        dset = load_voc(p, split, class_names if labeled else None, verify_images=verify_images)
        if not labeled:
            dset.records = [ImageRecord(r.image_id, r.file_name, r.path, r.width, r.height,
                                        origin=r.origin) for r in dset.records]
            dset.has_annotations = False
        return dset
    if labeled:
        raise DatasetError(f"{p}: a labeled set needs a COCO json or a Pascal VOC root (a folder "
                           f"with Annotations/); a plain folder of images can only be unlabeled data")
    return load_unlabeled(p, verify_images=verify_images)
