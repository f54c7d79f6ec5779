"""Command line: ``softteacher demo | train | eval | predict | split | data {generate,check,show}``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

log = logging.getLogger("softteacher")


class _Once(argparse.Action):
    """An option given at most once: a second would silently replace the first."""

    HINTS = {"config": "one file (put the settings of both in it, or give one with --set)",
             "preset": "one preset (a --config file or --set changes its settings)"}

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)}, {values}): "
                         f"{self.HINTS.get(self.dest, 'give it once')}")
        setattr(namespace, self.dest, values)


def _add_config_args(p: argparse.ArgumentParser, default_preset: str) -> None:
    p.add_argument("--preset", default=None, action=_Once,
                   help=f"named preset (default: the --config file's, else {default_preset}); "
                        "see `softteacher presets`")
    p.set_defaults(fallback_preset=default_preset)
    p.add_argument("--config", action=_Once, help="YAML file of overrides (may name its own `preset`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one field, e.g. --set method.unsup_weight=2.0 (repeatable)")


DEVICE_HELP = "auto (CUDA when available, else cpu), cpu, cuda or cuda:N"


def _command(sub, name: str, text: str) -> argparse.ArgumentParser:
    """A (sub)command's parser. Options match whole names only: argparse would otherwise take
    a prefix for the one option it begins, and ``train --device 0`` would mean ``--devices 0``."""
    return sub.add_parser(name, help=text, allow_abbrev=False)


def build_parser() -> argparse.ArgumentParser:
    from softteacher import __version__

    parser = argparse.ArgumentParser(
        prog="softteacher", allow_abbrev=False,
        description="Soft Teacher: semi-supervised object detection on PyTorch and torchvision.",
        epilog="`softteacher COMMAND --help` gives each command's options.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"softteacher {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = _command(sub, "demo", "generate the embedded `shapes` data, train, evaluate, predict")
    p.add_argument("--root", help="shapes cache folder, or a set `data generate` wrote (default: "
                                  "$SOFTTEACHER_DATA, else ~/.cache/softteacher/shapes)")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--iters", type=int, help="training iterations (default: 150, a short "
                   "smoke run, in place of the preset's solver.max_iter)")
    _add_config_args(p, "shapes-cpu")

    p = _command(sub, "train", "train a detector (Soft Teacher, or the supervised baseline with "
                                 "--supervised)")
    _add_config_args(p, "default")
    p.add_argument("--train", help="labeled COCO json or VOC root (data.train)")
    p.add_argument("--val", help="validation COCO json or VOC root (data.val)")
    p.add_argument("--unlabeled", help="unlabeled COCO json or image folder (data.unlabeled)")
    for name in ("train", "val", "unlabeled"):
        p.add_argument(f"--{name}-images", metavar="DIR",
                       help=f"image folder of the --{name} json (data.{name}_images; default: "
                            f"beside the json)")
    p.add_argument("--shapes", nargs="?", const="", default=None, metavar="DIR",
                   help="use the embedded `shapes` dataset (generated on first use), or the one of "
                        "another size that `data generate` wrote to DIR")
    p.add_argument("--out", help="output folder (train.output_dir)")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from a checkpoint (default: the newest in the output folder)")
    p.add_argument("--weights", help="initial detector weights (model.weights)")
    p.add_argument("--backbone-weights", help="ImageNet backbone weights file (model.backbone_weights)")
    p.add_argument("--supervised", action="store_true", help="labeled data only (method.enabled=false)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--devices", type=int, default=1,
                   help="train with N processes on this node (runs torchrun; one per GPU, or gloo on CPU)")

    for name in ("eval", "evaluate"):
        p = _command(sub, name, "COCO mAP of a checkpoint on a labeled set")
        p.add_argument("checkpoint")
        p.add_argument("--data", required=True, help="COCO json or VOC root")
        p.add_argument("--images", default="", help="image folder (default: beside the json)")
        p.add_argument("--split", default="test", help="VOC image set")
        p.add_argument("--model", choices=("teacher", "student"), default=None,
                       help="which model of the checkpoint (default: the one its config reports)")
        p.add_argument("--score-thresh", type=float,
                       help="detections kept above this score (default: the checkpoint's "
                            "model.box_score_thresh, 0.05 in every preset; the reference's 1e-3 "
                            "adds about 1 mAP)")
        p.add_argument("--batch-size", type=int, default=None,
                       help="images per inference batch (default: the checkpoint's "
                            "train.eval_batch_size, 1 unless set: each image's detections are "
                            "then those predict gives it; larger batches pad images and change them)")
        p.add_argument("--out", help="folder for results json and metrics")
        p.add_argument("--device", default="auto", help=DEVICE_HELP)
        _add_reading_args(p)

    p = _command(sub, "predict", "detect objects in images; writes results json and pictures")
    p.add_argument("checkpoint")
    p.add_argument("images", nargs="+", help="image files, folders or globs")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", choices=("teacher", "student"), default=None,
                   help="which model of the checkpoint (default: the one its config reports)")
    p.add_argument("--score-thresh", type=float, default=0.3,
                   help="detections drawn and written above this score (default: 0.3)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--no-pictures", action="store_true",
                   help="write results.json and images.json only, no picture of each image")
    p.add_argument("--batch-size", type=int, default=1,
                   help="images per inference batch (default: 1, each image's detections as eval "
                        "gives them at its default; larger batches pad images and change them "
                        "slightly, faster on a GPU)")
    _add_reading_args(p)

    p = _command(sub, "export", "write one model of a checkpoint, for eval, predict and --weights")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="the file to write")
    p.add_argument("--model", choices=("teacher", "student"), default=None,
                   help="which model of the checkpoint (default: the one its config reports)")
    p.add_argument("--force", action="store_true", help="replace --out where it exists")

    p = _command(sub, "split", "STAC-protocol partial-label split of a labeled COCO json")
    p.add_argument("ann_file", help="labeled COCO json (NAME.json)")
    p.add_argument("--percent", type=float, required=True,
                   help="percent of the images that keep their labels, in (0, 100]")
    p.add_argument("--fold", type=int, default=1, help="fold 1, 2, ...: another draw (default: 1)")
    p.add_argument("--seed", type=int, default=1, help="seed of the draws (default: 1)")
    p.add_argument("--images", default="",
                   help="image folder, read for sizes the json lacks (default: beside the json)")
    p.add_argument("--out", "--out-dir", dest="out_dir", metavar="DIR",
                   help="folder for NAME.FOLD@PERCENT.json and NAME.FOLD@PERCENT-unlabeled.json "
                        "(default: beside ann_file)")

    p = _command(sub, "presets", "list presets, or print one as YAML")
    p.add_argument("name", nargs="?", help="the preset to print (default: list them all)")

    data = _command(sub, "data", "dataset tools").add_subparsers(dest="data_command", required=True)
    p = _command(data, "generate", "write the embedded `shapes` dataset (COCO format)")
    p.add_argument("--root", help="output folder (default: $SOFTTEACHER_DATA, else "
                                  "~/.cache/softteacher/shapes)")
    p.add_argument("--seed", type=int, default=0, help="seed of the drawing (default: 0)")
    p.add_argument("--num-train", type=int, help="train images (default: 2000)")
    p.add_argument("--num-val", type=int, help="val images (default: 500)")
    p.add_argument("--num-unlabeled", type=int, help="unlabeled images (default: 2000)")
    p.add_argument("--force", action="store_true", help="regenerate even if cached")

    p = _command(data, "check", "validate a dataset and print a summary or every problem")
    p.add_argument("path", help="COCO json, VOC root, or folder of images")
    p.add_argument("--images", default="", help="image folder (default: beside the json)")
    p.add_argument("--split", default="trainval", help="VOC image set")

    p = _command(data, "show", "draw weak and strong views with boxes mapped into each")
    p.add_argument("path", help="COCO json, VOC root or folder of images (views without boxes)")
    p.add_argument("--images", default="", help="image folder (default: beside the json)")
    p.add_argument("--split", default="trainval", help="VOC image set (default: trainval)")
    p.add_argument("--out", default="runs/views", help="output folder for PNGs (default: runs/views)")
    p.add_argument("--num", type=int, default=4, help="number of images, the first ones (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the views' random augmentation "
                                                       "(default: 0)")
    _add_config_args(p, "shapes-cpu")
    return parser


def _config(args):
    from softteacher.config import load_config

    return load_config(args.preset, args.config, args.overrides, fallback=args.fallback_preset)


def _cmd_generate(args) -> int:
    from softteacher.data import shapes

    sizes = {k: v for k, v in (("num_train", args.num_train), ("num_val", args.num_val),
                               ("num_unlabeled", args.num_unlabeled)) if v is not None}
    paths = shapes.generate_shapes(args.root or shapes.default_root(), seed=args.seed,
                                   force=args.force, **sizes)
    print(shapes.describe(paths))
    print(f"train on it: softteacher train --shapes {paths.root} ...")
    return 0


def _warn_unused(args, path: str) -> None:
    """--images applies to a json, --split to a VOC root: say so of one given for the other."""
    from softteacher.data.datasets import is_voc_root

    given = {a.split("=", 1)[0] for a in args.argv if a.startswith("--")}
    voc = is_voc_root(path)
    if voc and "--images" in given:
        log.warning("--images is ignored: %s is a VOC root (its images are in its JPEGImages/)", path)
    elif Path(path).is_dir() and "--images" in given:
        log.warning("--images is ignored: %s is a folder of images", path)
    if not voc and "--split" in given:
        log.warning("--split is ignored: it names a VOC root's image set, and %s is none", path)


def _cmd_check(args) -> int:
    from softteacher.data.check import check_dataset

    _warn_unused(args, args.path)
    ok, text = check_dataset(args.path, images=args.images, split=args.split)
    print(text)
    return 0 if ok else 1


def _cmd_split(args) -> int:
    from softteacher.data.splits import write_split

    labeled, unlabeled = write_split(args.ann_file, percent=args.percent, fold=args.fold,
                                     seed=args.seed, out_dir=args.out_dir, images=args.images)
    print(f"labeled:   {labeled}\nunlabeled: {unlabeled or 'none (every image is labeled at 100 %)'}")
    return 0


def _cmd_show(args) -> int:
    from softteacher.data.show import show_views

    cfg = _config(args)
    _warn_unused(args, args.path)
    for path in show_views(args.path, images=args.images, split=args.split, out_dir=args.out,
                           num=args.num, seed=args.seed, augment=cfg.augment):
        print(path)
    return 0


def _cmd_presets(args) -> int:
    from softteacher.config import PRESETS, get_preset

    if args.name:
        print(get_preset(args.name).to_yaml(), end="")
    else:
        for name, fn in PRESETS.items():
            summary = " ".join((fn.__doc__ or "").strip().split("\n\n")[0].split()).replace("``", "`")
            print(f"{name:12s} {summary}")
    return 0


def _use_shapes(cfg, folder: str | None = None) -> None:
    """Point ``cfg.data`` at the embedded dataset (generated on first use), or at the one
    ``data generate`` wrote to ``folder``."""
    from softteacher.data import shapes

    if folder is None:
        paths = shapes.generate_shapes(shapes.default_root())
    else:
        paths = shapes.shapes_paths(folder)
        train_json = Path(paths.train_json).relative_to(paths.root)
        if not Path(paths.train_json).is_file():
            # the --root given to `data generate`: its one set, if it holds one
            sets = sorted(p for p in Path(folder).glob("*") if (p / train_json).is_file())
            if len(sets) != 1:
                held = f" (it holds {len(sets)} sets: {', '.join(p.name for p in sets)})" if sets else ""
                raise ValueError(f"--shapes {folder}: no {train_json} there{held}: name the folder "
                                 f"`softteacher data generate` printed")
            log.info("--shapes %s: the set in %s", folder, sets[0])
            paths = shapes.shapes_paths(sets[0])
    d = cfg.data
    d.train, d.train_images = paths.train_json, paths.train_images
    d.val, d.val_images = paths.val_json, paths.val_images
    d.unlabeled, d.unlabeled_images = paths.unlabeled_json, paths.unlabeled_images
    d.unlabeled_gt = paths.unlabeled_gt_json


def _without_devices(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--devices":
            skip = True
        elif not a.startswith("--devices="):
            out.append(a)
    return out


def _cmd_train(args) -> int:
    from softteacher import distributed
    from softteacher.config import relative_paths
    from softteacher.engine import TrainingError, check_launch, train

    if args.devices < 1:
        raise ValueError(f"--devices {args.devices}: expected at least 1 (processes on this node)")
    if args.devices > 1 and not distributed.env_info().enabled:
        if not args.resume:  # the settings refused here, before the processes start
            check_launch(_config(args), args.devices)
        return distributed.launch(_without_devices(args.argv), args.devices)
    if args.devices > 1:
        log.warning("--devices %d ignored: torchrun started %d processes already", args.devices,
                    distributed.env_info().world_size)
    if args.resume not in (None, "auto") and Path(args.resume).is_dir():
        raise ValueError(f"--resume {args.resume}: a folder, not a checkpoint (`--resume --out "
                         f"{args.resume}` continues its newest checkpoint)")
    folder = args.out or (str(Path(args.resume).parent) if args.resume not in (None, "auto") else "")
    saved = Path(folder, "config.yaml")
    data_set = ("data.train=", "data.val=", "data.unlabeled=")
    settings_given = (args.config or args.preset or args.shapes is not None
                      or any((args.train, args.val, args.unlabeled))
                      or any(o.startswith(data_set) for o in args.overrides))
    if args.resume and folder and not saved.is_file() and not settings_given:
        if Path(args.resume).is_file():  # an exported model, say, whose folder holds no run
            from softteacher import checkpoint as ckpt

            ckpt.check_resumable(ckpt.load_checkpoint(args.resume, mmap=True), args.resume)
        raise ValueError(f"{saved}: no such file, so --resume has no run to continue in {folder} "
                         f"(check the folder; to start a run there, give its data: --train ... or "
                         f"--shapes, or --config)")
    if args.resume and folder and saved.is_file() and not (args.config or args.preset):
        # the run's own settings; --set and the data flags still override them
        args.config = str(saved)
        if not args.out:
            args.out = folder
    cfg = _config(args)
    relative = relative_paths(cfg) if args.config == str(saved) else []
    if relative and distributed.env_info().is_main:
        log.warning("resuming with the settings in %s; the relative paths it names (%s) are read "
                    "from %s", saved, ", ".join(relative), Path.cwd())
    if args.shapes is not None:
        from softteacher.config import apply_overrides

        _use_shapes(cfg, args.shapes or None)
        apply_overrides(cfg, [o for o in args.overrides if o.startswith("data.")])  # --set wins
    for key in ("train", "val", "unlabeled", "train_images", "val_images", "unlabeled_images"):
        if getattr(args, key):
            setattr(cfg.data, key, getattr(args, key))
    if args.out:
        cfg.train.output_dir = args.out
    if args.weights:
        cfg.model.weights = args.weights
    if args.backbone_weights:
        cfg.model.backbone_weights = args.backbone_weights
    if args.supervised:
        cfg.method.enabled = False
        unlabeled_given = (args.unlabeled or args.unlabeled_images
                           or any(o.startswith(("data.unlabeled=", "data.unlabeled_images="))
                                  for o in args.overrides))
        if unlabeled_given and distributed.env_info().is_main:
            log.warning("--supervised trains on the labeled images alone: the unlabeled data given "
                        "(%s) is not read", cfg.data.unlabeled or cfg.data.unlabeled_images)
    try:
        result = train(cfg, resume=args.resume, progress=not args.no_progress)
    except TrainingError as e:
        _error(str(e), kind="training stopped")
        return 3
    finally:
        distributed.shutdown()
    if distributed.env_info().is_main:
        if result.started_at == result.iteration:
            print(f"nothing to train: {result.output_dir} is at iteration {result.iteration}")
        else:
            print(f"done: {_count(result.iteration, 'iteration')} in {result.output_dir}"
                  f"{_final_scores(result)}")
    return 0


def _final_scores(result) -> str:
    """``: teacher AP 0.4123, student AP 0.3901 (model_final.pt ...)`` where the run was
    evaluated at its end (APs as the tables print them)."""
    from softteacher.evaluation import format_metric

    scores = [f"{name} AP {format_metric(result.metrics[f'{name}/bbox_AP'])}"
              for name in ("teacher", "student") if f"{name}/bbox_AP" in result.metrics]
    if not scores:
        return ""
    best = " and model_best.pt, the best evaluated" if (result.output_dir / "model_best.pt").is_file() else ""
    return f": {', '.join(scores)} (model_final.pt{best})"


def _add_reading_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=None,
                   help="processes that read the next images while the model runs (default: on a "
                        "GPU the checkpoint's data.num_workers, on the CPU 0: read in this process)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _batch_size(args) -> None:
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: expected at least 1")


def _workers(args) -> int | None:
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers {args.workers}: expected 0 or more")
    return args.workers


def _cmd_eval(args) -> int:
    from softteacher.data.datasets import check_record_files, image_folder_hint, is_voc_root, load_dataset
    from softteacher.data.records import DatasetError, category_difference
    from softteacher.engine import evaluate, model_from_checkpoint, resolve_device
    from softteacher.evaluation import format_metrics, write_results
    from softteacher.io import write_json

    _batch_size(args)
    workers = _workers(args)
    device = resolve_device(args.device)
    model, cfg, cats, which = model_from_checkpoint(args.checkpoint, args.model, device)
    _warn_unused(args, args.data)
    dset = load_dataset(args.data, images=args.images, split=args.split, labeled=True, categories=cats)
    if dset.categories != cats:
        raise ValueError(f"{args.data}: classes differ from the checkpoint's: "
                         f"{category_difference(dset.categories, cats)}")
    try:
        check_record_files(dset)
    except DatasetError as e:
        raise DatasetError(f"{e}\n(images are read under {dset.image_root}: "
                           f"{image_folder_hint(dset, '--images DIR')})") from None
    if args.batch_size is not None:
        cfg.train.eval_batch_size = args.batch_size
    if args.out:  # a folder that cannot be made is said before the evaluation, not after it
        Path(args.out).mkdir(parents=True, exist_ok=True)
    metrics, results = evaluate(model, dset, cfg, device, score_thresh=args.score_thresh,
                                progress=None if args.no_progress else "eval", workers=workers)
    if args.out:  # before the printing: a reader of it that stops early (| head) loses nothing
        write_results(Path(args.out) / "results.json", results)
        write_json(Path(args.out) / "images.json",  # a VOC set's ids are its images' places
                   {"images": [{"id": r.image_id, "file_name": r.file_name, "width": r.width,
                                "height": r.height} for r in dset.records],
                    "categories": dset.categories.to_coco()})
        write_json(Path(args.out) / "metrics.json",
                   {"model": which, "eval_batch_size": cfg.train.eval_batch_size, **metrics}, indent=2)
    image_set = f" (image set {args.split})" if is_voc_root(args.data) else ""
    print(f"model: {which} ({args.checkpoint}) on {args.data}{image_set}, {_count(len(dset), 'image')}, "
          f"in batches of {cfg.train.eval_batch_size}")
    print(format_metrics(metrics))
    return 0


def _cmd_predict(args) -> int:
    from softteacher.engine import resolve_device
    from softteacher.predict import predict

    _batch_size(args)
    workers = _workers(args)
    summary = predict(args.checkpoint, args.images, args.out, which=args.model,
                      score_thresh=args.score_thresh, device=resolve_device(args.device),
                      pictures=not args.no_pictures, workers=workers,
                      progress=not args.no_progress, batch_size=args.batch_size)
    print(f"{_count(summary['images'], 'image')}, {_count(summary['detections'], 'detection')} "
          f"(model: {summary['model']}) -> {args.out}")
    if summary["skipped"]:
        print(f"{_count(len(summary['skipped']), 'image')} skipped, unreadable (listed in "
              f"{Path(args.out) / 'images.json'}): {', '.join(summary['skipped'][:3])}"
              f"{' ...' if len(summary['skipped']) > 3 else ''}", file=sys.stderr)
        return 1
    return 0


def _cmd_export(args) -> int:
    from softteacher.engine import export_model

    done = export_model(args.checkpoint, args.out, args.model, replace=args.force)
    src, dst = (b / 2 ** 20 for b in done["bytes"])
    print(f"{done['model']} at iteration {done['iteration']} -> {args.out} ({dst:.1f} MiB; the "
          f"checkpoint {src:.1f} MiB)")
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _cmd_demo(args) -> int:
    from softteacher.demo import DEMO_SETS, run_demo

    made = [o for o in args.overrides if o.split("=", 1)[0].strip() in DEMO_SETS]
    if made:
        raise ValueError(f"demo: --set {made[0]}: the demo sets its data, output folder and schedule "
                         f"itself ({', '.join(DEMO_SETS)}); --out DIR and --iters N choose the folder "
                         f"and the length, and `softteacher train` takes any setting")
    cfg = _config(args)
    if args.config:  # read as load_config read it; what it sets of the demo's own is refused alike
        import yaml

        data = yaml.safe_load(Path(args.config).read_bytes()) or {}
        made = [f"{s}.{k}" for s, v in data.items() if isinstance(v, dict) for k in v
                if f"{s}.{k}" in DEMO_SETS]
        if made:
            raise ValueError(f"demo: {args.config} sets {made[0]}: the demo sets its data, output "
                             f"folder and schedule itself ({', '.join(DEMO_SETS)}); --out DIR and "
                             f"--iters N choose the folder and the length, and `softteacher train` "
                             f"takes any setting")
    run_demo(cfg, root=args.root, out_dir=args.out, iters=args.iters)
    return 0


COMMANDS = {
    "demo": _cmd_demo,
    "train": _cmd_train,
    "eval": _cmd_eval,
    "predict": _cmd_predict,
    "export": _cmd_export,
    "split": _cmd_split,
    "presets": _cmd_presets,
    ("data", "generate"): _cmd_generate,
    ("data", "check"): _cmd_check,
    ("data", "show"): _cmd_show,
}


def main(argv: list[str] | None = None) -> int:
    _said.clear()
    code = _main(argv)
    if not code:
        return code
    from softteacher.distributed import EXIT_FILE_ENV

    report = os.environ.get(EXIT_FILE_ENV)
    if report:  # a process torchrun started for --devices: tell the launcher why it stopped
        entry = {"rank": int(os.environ.get("RANK", "0")), "status": code, "errors": list(_said)}
        try:
            with open(report, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
        except OSError:
            for line in _said:
                print(line, file=sys.stderr)
    return code


_said: list[str] = []  # the errors of this command, for the launcher of --devices


def _error(text: str, kind: str = "error") -> None:
    """Say ``kind: text`` on stderr, under torchrun named by this process's rank; in a process
    of ``--devices``, to the launcher instead, which says each error of its processes once."""
    from softteacher.distributed import EXIT_FILE_ENV, env_info

    if os.environ.get(EXIT_FILE_ENV):
        _said.append(f"{kind}: {text}")
        return
    info = env_info()
    print(f"{kind}: {f'[rank {info.rank}] ' if info.enabled else ''}{text}", file=sys.stderr)


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a process of torchrun's: warnings from rank 0
        from softteacher import distributed

        distributed.install_rank_filter(distributed.env_info().rank)
    key = ("data", args.data_command) if args.command == "data" else args.command
    if key == "evaluate":
        key = "eval"
    handler = COMMANDS.get(key)
    if handler is None:
        print(f"softteacher {args.command}: not available", file=sys.stderr)
        return 2
    try:
        return handler(args)
    except KeyboardInterrupt:
        from softteacher import distributed

        # a process of `train --devices`: the launcher, which had the Ctrl-C too, says it once
        if distributed.env_info().is_main and not os.environ.get(distributed.EXIT_FILE_ENV):
            kept = ("; the checkpoints written so far are kept, and the same command with --resume "
                    "continues from the newest") if args.command == "train" else ""
            print(f"\ninterrupted: softteacher {args.command} stopped{kept}", file=sys.stderr)
        return 130
    except ValueError as e:
        _error(worker_message(str(e)))
        return 2
    except OSError as e:  # a file missing, in the way or not permitted: which one, and why
        where = f"{e.filename}: " if e.filename else ""
        _error(f"{where}{worker_message(e.strerror or str(e))}")
        return 2
    except RuntimeError as e:
        from softteacher import distributed

        info = distributed.env_info()
        if not (info.enabled and _peer_lost(e)):
            raise
        # another process stopped (bad data it alone read, say) and said why: not a traceback
        # of this one's waiting for it
        lines = str(e).strip().splitlines()
        _error(f"stopped, as another process did (whose error says why): "
               f"{lines[0] if lines else type(e).__name__}")
        return 1


def _peer_lost(error: RuntimeError) -> bool:
    """An error of a collective whose other side went away."""
    import torch.distributed as dist

    text = str(error)
    return isinstance(error, dist.DistNetworkError) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer"))


_EXCEPTION_TYPE = re.compile(r"^[A-Za-z_][\w.]*(: |$)")


def worker_message(text: str) -> str:
    """The message of an error raised in a DataLoader worker, without the worker's traceback.

    torch raises it again in the main process with the traceback text in its message
    ("Caught DatasetError in DataLoader worker process 0. Original Traceback ..."); the error's
    own message follows its type on the first unindented line after the last traceback header.
    """
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return text
    lines = text.rstrip("\n").split("\n")
    headers = [i for i, line in enumerate(lines) if line.endswith("Traceback (most recent call last):")]
    if not headers:
        return text
    first = next((i for i in range(headers[-1] + 1, len(lines)) if lines[i][:1] not in ("", " ")), None)
    if first is None or not _EXCEPTION_TYPE.match(lines[first]):
        return text
    message = "\n".join([_EXCEPTION_TYPE.sub("", lines[first], count=1), *lines[first + 1:]]).strip()
    return message or lines[first]  # an error without a message: its type
