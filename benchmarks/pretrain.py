"""Pretrain a backbone on shapes that are none of the detection classes: ImageNet's role, offline.

The paper starts every detector from an ImageNet-pretrained ResNet-50; the `shapes-cpu` preset
trains from scratch, so at 1 % labels there is no teacher to start from. This script gives
the `shapes` protocol a pretrained backbone without a download and without any label of the
detection task: a torchvision ResNet (BatchNorm, as ImageNet's) learns to classify
``shapes.PRETRAIN_CLASSES`` crops (pentagon, hexagon, arrow, ...; ``render_pretrain_crop``),
and its weights, in torchvision's naming without ``fc``, load as ``model.backbone_weights``
(which makes ``model.norm`` ``auto`` pick FrozenBN, as over ImageNet weights).

    python benchmarks/pretrain.py [--train 20000] [--val 2000] [--size 64] [--epochs 20] \\
        [--out runs/bench/pretrain/resnet18-shapes-other.pt]
    python benchmarks/gain.py run --tag shapes-cpu-pretrained \\
        --set model.backbone_weights=runs/bench/pretrain/resnet18-shapes-other.pt ...

Writes the weights (atomically) and, beside them, the same name with ``.json`` for its suffix
(``resnet18-shapes-other.json``): the command, commit, the validation accuracy after each
epoch and the wall time. The crops are drawn once and cached as
``crops-<seed>-<first index>-<count>-<size>.npz`` in the output folder.

Resumable: after every epoch the weights, optimizer and random stream are saved as
``<name>.resume.pt`` beside the output; the same command run again continues after the last
finished epoch, to the same weights as a run that was never stopped (same machine and
threads), and the file is removed once the weights are written. A run with other settings
than the file's is refused. Once the weights and their record are written, the same command
returns that record without training; one with other settings is refused.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from common import command_line, commit, software

from softteacher.data import shapes
from softteacher.io import atomic_path, write_json
from softteacher.model import BACKBONES, IMAGENET_MEAN, IMAGENET_STD

# the detector's input normalisation, so that the detector feeds the weights what they learnt on
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def draw_crops(seed: int, first: int, count: int, size: int,
               cache_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """Crops ``first .. first + count - 1``: (count, size, size, 3) uint8 images and (count,) labels."""
    cache = cache_dir / f"crops-{seed}-{first}-{count}-{size}.npz" if cache_dir else None
    if cache is not None and cache.is_file():
        with np.load(cache) as z:
            return z["images"], z["labels"]
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    labels = np.empty(count, dtype=np.int64)
    for i in range(count):
        image, labels[i] = shapes.render_pretrain_crop(seed, first + i, size)
        images[i] = np.asarray(image)
    if cache is not None:
        with atomic_path(cache) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, images=images, labels=labels)
    return images, labels


def fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of the crops' pixels and labels: equal on two machines when both drew the same crops."""
    h = hashlib.sha256()
    for a in (images, labels):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> normalised float NCHW."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    return (x - MEAN) / STD


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and shifts of up to 1/8 of the side (zero-padded): the crops are
    already drawn at random angles, sizes and places."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h)).view(n, 1, h, 1).expand(n, 3, h, w + 2 * pad)
    x = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(w)).view(n, 1, 1, w).expand(n, 3, h, w)
    return x.gather(3, cols)


def backbone_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The classifier's weights in torchvision's naming, without the ``fc`` head."""
    return {k: v.detach().clone() for k, v in net.state_dict().items() if not k.startswith("fc.")}


@torch.no_grad()
def accuracy(net: torch.nn.Module, images: np.ndarray, labels: np.ndarray, batch: int) -> float:
    net.eval()
    right = 0
    for i in range(0, len(labels), batch):
        logits = net(to_input(images[i:i + batch]))
        right += int((logits.argmax(1) == torch.from_numpy(labels[i:i + batch])).sum())
    return right / max(len(labels), 1)


def pretrain(backbone: str = "resnet18", num_train: int = 20000, num_val: int = 2000, size: int = 64,
             epochs: int = 20, batch: int = 64, lr: float = 0.05, weight_decay: float = 1e-4, seed: int = 0,
             out: str | Path = "runs/bench/pretrain/resnet18-shapes-other.pt", cache: bool = True,
             log=print) -> dict:
    """Train ``backbone`` to classify ``num_train`` pretraining crops, write its weights to ``out``.

    SGD with momentum 0.9, a linear warm-up over the first epoch's first 10 % then cosine decay
    to 0. Returns the record written beside the weights.
    """
    if backbone not in BACKBONES or not backbone.startswith("resnet"):
        raise ValueError(f"backbone {backbone!r}: expected a ResNet of {BACKBONES}")
    if min(num_train, num_val, epochs, batch) < 1:
        raise ValueError("num_train, num_val, epochs and batch must be at least 1")
    started_at = commit()  # the code this process imported, whatever is committed while it runs
    out = Path(out)
    cache_dir = out.parent if cache else None
    start = time.perf_counter()
    train_x, train_y = draw_crops(seed, 0, num_train, size, cache_dir)
    # validation crops come after the training ones: other indices, other random streams
    val_x, val_y = draw_crops(seed, num_train, num_val, size, cache_dir)
    log(f"crops: {num_train} train, {num_val} val at {size} px ({time.perf_counter() - start:.0f} s)")

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = getattr(torchvision.models, backbone)(weights=None, num_classes=len(shapes.PRETRAIN_CLASSES))
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    settings = {"backbone": backbone, "num_train": num_train, "num_val": num_val, "size": size,
                "epochs": epochs, "batch": batch, "lr": lr, "weight_decay": weight_decay, "seed": seed,
                "crops_sha256": {"train": fingerprint(train_x, train_y), "val": fingerprint(val_x, val_y)}}
    resume_file = resume_path(out)
    finished = finished_record(out, settings) if not resume_file.is_file() else None
    if finished is not None:
        log(f"{out}: already trained with these settings (val accuracy "
            f"{finished['val_accuracy']:.3f}); delete it to train again")
        return finished
    threads = torch.get_num_threads()  # of the first part: a resumed run warns of another count
    curve: list[dict] = []
    resumed: list[dict] = []
    done, step, elapsed_before = 0, 0, 0.0
    if resume_file.is_file():
        state = load_resume_state(resume_file, settings)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        done, step, curve = state["epoch"], state["step"], state["curve"]
        started_at, elapsed_before = state["commit"], state["elapsed_s"]
        resumed = state["resumed"] + [{"after_epoch": done, "commit": commit(),
                                       "threads": torch.get_num_threads()}]
        log(f"resuming after epoch {done}/{epochs} from {resume_file}")
        threads = state.get("threads", threads)  # states saved before threads were recorded lack it
        if threads != torch.get_num_threads():
            log(f"warning: {threads} threads before, {torch.get_num_threads()} now: sums taken in "
                f"another order train to other weights than a run that was never stopped")
    steps_per_epoch = math.ceil(num_train / batch)
    total = epochs * steps_per_epoch
    warmup = max(1, steps_per_epoch // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    for epoch in range(done + 1, epochs + 1):
        net.train()
        order = torch.randperm(num_train, generator=generator).numpy()
        loss_sum = 0.0
        for i in range(0, num_train, batch):
            idx = np.sort(order[i:i + batch])
            x = augment(to_input(train_x[idx]), generator)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            loss = F.cross_entropy(net(x), torch.from_numpy(train_y[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(idx)
            step += 1
        acc = accuracy(net, val_x, val_y, 2 * batch)
        elapsed = elapsed_before + time.perf_counter() - start
        curve.append({"epoch": epoch, "train_loss": loss_sum / num_train, "val_accuracy": acc,
                      "elapsed_s": round(elapsed, 1)})
        if epoch < epochs:
            with atomic_path(resume_file, durable=True) as tmp, open(tmp, "wb") as fh:
                torch.save({"settings": settings, "epoch": epoch, "step": step, "net": net.state_dict(),
                            "optimizer": opt.state_dict(), "generator": generator.get_state(),
                            "curve": curve, "elapsed_s": elapsed, "commit": started_at,
                            "threads": threads, "resumed": resumed}, fh)
        log(f"epoch {epoch}/{epochs}: train loss {loss_sum / num_train:.3f}, val accuracy {acc:.3f}")

    with atomic_path(out) as tmp:
        torch.save(backbone_state(net), tmp)
    record = {**settings, "classes": list(shapes.PRETRAIN_CLASSES),
              "val_accuracy": curve[-1]["val_accuracy"], "curve": curve,
              "wall_s": round(elapsed_before + time.perf_counter() - start, 1), "weights": str(out),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "software": software(),
              "commit": started_at, "resumed": resumed,
              "command": command_line()}
    write_json(out.with_suffix(".json"), record, indent=1)
    resume_file.unlink(missing_ok=True)
    return record


def resume_path(out: str | Path) -> Path:
    """Where a run writing ``out`` keeps its state between epochs: ``<name>.resume.pt`` beside it."""
    out = Path(out)
    return out.with_name(f"{out.stem}.resume.pt")


def settings_differ(saved: dict, settings: dict) -> str:
    """``key A there, B here; ...`` for each of ``settings`` that ``saved`` holds otherwise."""
    return "; ".join(f"{k} {saved.get(k)!r} there, {v!r} here" for k, v in settings.items()
                     if saved.get(k) != v)


def finished_record(out: Path, settings: dict) -> dict | None:
    """The record of a finished run that wrote ``out`` with ``settings``; None if there is none.
    Weights written by a run with other settings are refused rather than replaced."""
    record_file = out.with_suffix(".json")
    if not (out.is_file() and record_file.is_file()):
        return None
    try:
        record = json.loads(record_file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{record_file}: not a readable pretraining record ({type(e).__name__}); "
                         f"delete it and {out.name} to train again") from None
    differ = settings_differ(record, settings)
    if differ:
        raise ValueError(f"{out}: trained with other settings ({differ}); choose another "
                         f"--out, or delete it and {record_file.name} to train again")
    return record


def load_resume_state(path: Path, settings: dict) -> dict:
    """The state saved after an epoch, if it was saved by a run with ``settings``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable pretraining state ({type(e).__name__}); delete it "
                         f"to start anew") from None
    saved = state.get("settings") if isinstance(state, dict) else None
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: not a pretraining state; delete it to start anew")
    differ = settings_differ(saved, settings)
    if differ:
        raise ValueError(f"{path}: saved by a run with other settings ({differ}); run with "
                         f"its settings to continue it, or delete it to start anew")
    return state


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--train", type=int, default=20000, help="training crops")
    ap.add_argument("--val", type=int, default=2000, help="validation crops")
    ap.add_argument("--size", type=int, default=64, help="crop side in pixels")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--out", default="runs/bench/pretrain/resnet18-shapes-other.pt")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    record = pretrain(args.backbone, args.train, args.val, args.size, args.epochs, args.batch, args.lr,
                      seed=args.seed, out=args.out, log=functools.partial(print, flush=True))
    print(f"val accuracy {record['val_accuracy']:.3f} after {record['wall_s']:.0f} s; weights: {args.out}")


if __name__ == "__main__":
    main()
