"""Atomic file writes: a temp file in the same folder, then ``os.replace``.

A crash mid-write leaves the previous file intact, never a truncated one. Durable writes
(checkpoints) also reach the disk before the rename, and the rename before the call returns,
so a power loss right after cannot leave an empty file under the new name.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it replaces ``path``, on error it is removed.

    ``durable``: the temp file is flushed to the disk before the rename, and the folder after it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the name cut short: a temp name 18 bytes longer than a long one would pass the file
    # system's limit of 255
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:100]}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        try:  # mkstemp makes 0600; give the file the usual permissions
            os.chmod(tmp, 0o666 & ~_UMASK)
        except OSError:  # a file system without them (FAT on a USB drive): as it is
            pass
        yield Path(tmp)
        if durable:
            _fsync(tmp)
        try:
            os.replace(tmp, path)
        except OSError as e:  # said of the file asked for, not of the hidden temp file
            raise type(e)(e.errno, e.strerror, str(path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        try:
            _fsync(path.parent)
        except OSError:  # a folder cannot be opened or flushed on some systems (Windows)
            pass


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float (at any depth) replaced by None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def json_text(obj: Any, indent: int | None = None) -> str:
    """Strict JSON: NaN and infinities (undefined metrics) as ``null``."""
    return json.dumps(finite(obj), indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> None:
    """Strict JSON: NaN and infinities (undefined metrics) are written as ``null``."""
    write_text(path, json_text(obj, indent))


def save_image(path: str | os.PathLike, image, **kwargs) -> None:
    """Save a PIL image atomically; the format comes from ``path``'s suffix."""
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}.get(Path(path).suffix.lower(), "PNG")
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt, **kwargs)
