"""Checkpoints: plain dicts of tensors and plain Python values, written atomically.

A checkpoint holds the student and (for Soft Teacher) the teacher, the optimizer,
scheduler and grad scaler, the iteration, the random number generator states and the
resolved config, so that training resumes exactly. Files are read with
``weights_only=True``; nothing in them is executed.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from softteacher.io import atomic_path

log = logging.getLogger(__name__)

FORMAT = "softteacher-checkpoint-v1"
_NAME = re.compile(r"^model_(\d{7,})\.pt$")
_UNEVALUATED = re.compile(r"^model_unevaluated_(\d{7,})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupt, foreign, or for another model or class set."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically and durably (temp file on disk, then the rename,
    before older checkpoints are removed). ``torch.save`` writes through a
    file object, so the archive inside is not named after the temp file: one state gives the
    same bytes (and SHA-256) wherever and however often it is written."""
    try:
        with atomic_path(path, durable=True) as tmp, open(tmp, "wb") as fh:
            torch.save(state, fh)
    except OSError as e:  # a full disk, say: the older checkpoints are still there
        raise OSError(e.errno, f"{path}: checkpoint not written ({e.strerror or e}); the ones "
                               f"before it are kept") from e
    except RuntimeError as e:
        # Ctrl-C or a failed write (a full disk) inside torch.save: its archive writer, closed on
        # the way out, raises an error of its own about the cut archive; the interrupt or the
        # disk's error is what happened (the temp file is gone)
        if isinstance(e.__context__, KeyboardInterrupt):
            raise e.__context__ from None
        if isinstance(e.__context__, OSError):
            cause = e.__context__
            raise OSError(cause.errno, f"{path}: checkpoint not written ({cause.strerror or cause}); "
                                       f"the ones before it are kept") from cause
        raise


def check_resumable(state: dict[str, Any], path: str | Path) -> None:
    """Refuse an exported model (``softteacher export``) as a run to resume."""
    if state.get("exported"):
        raise CheckpointError(f"{path}: an exported model (one model, no optimizer or random "
                              f"states) does not resume; start from it with --weights")


def load_error_detail(e: Exception) -> str:
    """What ``torch.load(..., weights_only=True)`` found wrong, in one line: the object it would
    not unpickle, else the error's first line (never torch's advice to load with
    ``weights_only=False``, which would run the file's code)."""
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. Please use|\n|$)", str(e))
    lines = str(e).strip().splitlines()
    return found.group(1).strip() if found else f"{type(e).__name__}: {lines[0] if lines else ''}"


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (``weights_only=True``); ``mmap``: its
    tensors are mapped from the file, read only where used (otherwise the file is read whole,
    and a part whose bytes changed since it was written is refused)."""
    p = Path(path)
    if p.is_dir():
        raise CheckpointError(f"{path}: a folder, not a checkpoint (--resume alone takes the newest "
                              f"checkpoint of the output folder)")
    if not p.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    if not mmap:  # the whole file is read anyway: its members checked against their CRC-32
        try:
            with zipfile.ZipFile(p) as archive:
                damaged = archive.testzip()
        except (zipfile.BadZipFile, OSError):  # no zip (an older torch file): torch.load says
            damaged = None
        if damaged is not None:  # torch's reader does not check: wrong weights would load
            raise CheckpointError(f"{path}: damaged: its part {damaged} does not match its checksum "
                                  f"(a copy or a disk that changed bytes); use another checkpoint")
    try:
        with warnings.catch_warnings():  # torch warns of a legacy file before it fails on it
            warnings.simplefilter("ignore")
            state = torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch's own message would advise weights_only=False
        raise CheckpointError(f"{path}: not a readable checkpoint: no torch.save file of tensors and "
                              f"plain data ({load_error_detail(e)}); other objects are never "
                              f"loaded, as unpickling them can run code") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a softteacher checkpoint (no format {FORMAT!r})")
    return state


def rng_state() -> dict[str, Any]:
    """Every random number generator the training loop draws from."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # the GPU draws (RoI sampling) then differ from the uninterrupted run's
            log.warning("the checkpoint holds the random states of %d GPUs and %d are visible: the "
                        "GPUs' random states start afresh, so the run does not repeat exactly",
                        len(cuda), torch.cuda.device_count())


def check_compatible(state: dict[str, Any], model_fingerprint: dict, categories: list[dict],
                     path: str | Path) -> None:
    """Refuse a checkpoint for another architecture or class set, saying what differs."""
    theirs = state.get("categories")
    if theirs != categories:
        a = [c["name"] for c in theirs or []]
        b = [c["name"] for c in categories]
        raise CheckpointError(f"{path}: checkpoint is for classes {a}, this data has {b}")
    fp = dict(state.get("fingerprint", {}))
    if "pretrained_backbone" not in fp:  # written before the key: from the config it stored
        m = (state.get("config") or {}).get("model") or {}
        fp["pretrained_backbone"] = bool(m.get("backbone_weights") or m.get("torchvision_weights"))
    # keys one side lacks are not compared: runtime keys older checkpoints still hold
    diff = sorted(k for k in set(fp) & set(model_fingerprint) if fp[k] != model_fingerprint[k])
    if diff:
        details = ", ".join(f"{k}: {fp.get(k)!r} vs {model_fingerprint.get(k)!r}" for k in diff[:6])
        raise CheckpointError(f"{path}: checkpoint is for another model config ({details})")


class CheckpointManager:
    """Numbered checkpoints ``model_{iteration:07d}.pt`` in a folder, keeping the last K,
    plus ``model_best.pt`` and ``model_final.pt`` copies."""

    def __init__(self, folder: str | Path, keep_last: int = 3):
        self.folder = Path(folder)
        self.keep_last = keep_last

    def _found(self) -> list[tuple[int, Path]]:
        """(iteration, path) of every numbered checkpoint, by iteration."""
        if not self.folder.is_dir():
            return []
        return sorted((int(m.group(1)), p) for p in self.folder.iterdir() if (m := _NAME.match(p.name)))

    def numbered(self, upto: int | None = None) -> list[Path]:
        """Numbered checkpoints by iteration (those up to ``upto`` when given)."""
        return [p for it, p in self._found() if upto is None or it <= upto]

    def latest(self) -> Path | None:
        items = self.numbered()
        return items[-1] if items else None

    def remove_partial(self) -> list[Path]:
        """Delete the temp files of checkpoints whose writing a killed process left unfinished
        (``.model_*.tmp``; each would be as large as a checkpoint). Call before saving."""
        found = sorted(self.folder.glob(".model_*.tmp")) if self.folder.is_dir() else []
        for p in found:
            p.unlink(missing_ok=True)
        return found

    def unevaluated(self, iteration: int) -> Path:
        """Where the model of an evaluation that did not finish is kept: a name ``latest`` does
        not take, as a resumed run would skip the evaluation."""
        return self.folder / f"model_unevaluated_{iteration:07d}.pt"

    def remove_unevaluated(self, upto: int) -> list[Path]:
        """Delete ``model_unevaluated_{iteration}.pt`` (kept when an evaluation did not finish)
        up to ``upto``: a run that evaluated there has trained past it again."""
        found = [p for p in (self.folder.iterdir() if self.folder.is_dir() else [])
                 if (m := _UNEVALUATED.match(p.name)) and int(m.group(1)) <= upto]
        for p in sorted(found):
            p.unlink(missing_ok=True)
        return sorted(found)

    def later(self, iteration: int) -> list[Path]:
        """Numbered checkpoints past ``iteration``: in a run that is at ``iteration``, those of
        another run in the same folder (one started again, or resumed from an earlier one)."""
        return [p for it, p in self._found() if it > iteration]

    def save(self, iteration: int, state: dict[str, Any]) -> Path:
        """Write ``model_{iteration}.pt``, then delete all but the last ``keep_last`` numbered
        checkpoints up to it (later ones are another run's: left as they are)."""
        path = self.folder / f"model_{iteration:07d}.pt"
        save_checkpoint(path, state)
        if self.keep_last > 0:
            for old in self.numbered(upto=iteration)[: -self.keep_last]:
                old.unlink(missing_ok=True)
        return path

    def copy_as(self, src: Path, name: str) -> Path:
        """``src`` under another name in the folder: a hard link where the file system has them
        (no second copy on the disk; every checkpoint is replaced by renaming, never rewritten in
        place, so neither name changes the other), else a copy."""
        dst = self.folder / name
        with atomic_path(dst, durable=True) as tmp:
            tmp.unlink()
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
        return dst
