"""Helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import subprocess
import sys
from pathlib import Path

from softteacher.engine import cpu_has_amx, cpu_has_bf16
from softteacher.io import write_json


@functools.lru_cache(maxsize=1)
def commit() -> str:
    """The short git commit the benchmark runs from, ``+dirty`` when tracked files differ from it
    (``unknown`` outside a checkout). Read at the first call and kept: a process that runs
    several rows one after the other ran the code it imported, whatever was committed since."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}+dirty" if changed else head


def software() -> dict:
    """What besides the code decides a run's arithmetic: library versions, the CPU and the
    vector instructions torch's CPU kernels use. Two machines with other instruction sets train
    to other weights from the same seed, because their kernels sum in other orders."""
    import numpy
    import PIL
    import torch
    import torchvision

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "pillow": PIL.__version__, "python": platform.python_version(),
            "cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_bf16": cpu_has_bf16(), "cpu_amx": cpu_has_amx()}


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, in hex: what identifies a checkpoint beyond its path."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])


def append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def merge_coco(parts: list[tuple[str, str]], image_root: str, out: Path, labeled: bool) -> str:
    """One COCO json from several, for images under one common ``image_root``.

    Args:
        parts: (json path, that json's image folder) pairs; the folders lie under ``image_root``.
        labeled: keep ``annotations`` and ``categories`` (the first part's categories).
    Returns:
        The written path. Image and annotation ids are renumbered from 1; ``file_name`` becomes
        relative to ``image_root``.
    """
    images, anns, categories = [], [], None
    for ann_file, folder in parts:
        data = json.loads(Path(ann_file).read_text())
        prefix = Path(folder).resolve().relative_to(Path(image_root).resolve())
        new_id = {}
        for im in data["images"]:
            new_id[im["id"]] = len(images) + 1
            images.append({**im, "id": new_id[im["id"]], "file_name": str(prefix / im["file_name"])})
        if labeled:
            categories = categories or data["categories"]
            for a in data.get("annotations", []):
                anns.append({**a, "id": len(anns) + 1, "image_id": new_id[a["image_id"]]})
    merged: dict = {"images": images}
    if labeled:
        merged.update(annotations=anns, categories=categories)
    write_json(out, merged)
    return str(out)
