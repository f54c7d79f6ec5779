"""Gain over the supervised baseline from the same labels (the paper's Table 3, on ``shapes``).

Each labeled fraction is a STAC split of the embedded train set (fold k, seed 1). Soft Teacher
gets the rest of the train set (labels dropped) plus the unlabeled pool as unlabeled data; the
supervised baseline trains on the labeled part alone, same preset and iterations, and its best
val checkpoint counts. Supervised on 100 % is the ceiling.

    python benchmarks/gain.py table                       # every row not recorded yet (resumable)
    python benchmarks/gain.py run --method soft_teacher --percent 10 --fold 1
    python benchmarks/gain.py report --png docs/img/gain.png   # markdown table + plot
    python benchmarks/gain.py report --init-from-supervised end   # rows started where supervised ended

``--preset`` picks the model and schedule (``shapes-cpu`` by default; on a GPU add
``--device cuda``); ``--tag`` names the result folder (default: the preset). Runs append one JSON
line each to ``runs/bench/gain/TAG/results.jsonl`` and resume from their newest checkpoint.

``--init-from-supervised B`` starts a run from the supervised run of the same split (trained
from scratch) at iteration B and trains it for the remaining ``iters - B`` iterations. That
stands in for the ImageNet-pretrained backbone of the paper where none is available: a teacher
trained from scratch inside Soft Teacher sees one labeled image per batch and may stay below
the 0.9 confidence threshold for a whole short run. Both methods can start there (with the
same ``--set solver.lr=...``, say), so the supervised row continues for as many iterations as
the Soft Teacher row and its best checkpoint, in either run, counts; where only Soft Teacher
was started there, the report compares it with the supervised run from scratch. ``table`` with
``--init-from-supervised B`` first trains the supervised runs from scratch for B iterations.
"""

from __future__ import annotations

import argparse
import functools
import resource
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import yaml
from common import append_jsonl, command_line, commit, merge_coco, read_jsonl, sha256_file, software

from softteacher.config import load_config, with_absolute_paths
from softteacher.data import shapes
from softteacher.data.splits import write_split
from softteacher.engine import train
from softteacher.io import write_text

ROOT = Path("runs/bench/gain")
METHODS = ("supervised", "soft_teacher")
PERCENTS = (1.0, 5.0, 10.0)


def prepare_data(paths: shapes.ShapesPaths, percent: float, fold: int, out: Path,
                 unlabeled: bool = True) -> dict[str, str]:
    """Labeled split, and (``unlabeled``: for Soft Teacher) the unlabeled set (rest of train +
    pool) with its hidden ground truth; without it those entries are empty."""
    images_root = str(Path(paths.train_images).parent)
    if percent >= 100:
        labeled = paths.train_json
        parts_unl = [(paths.unlabeled_json, paths.unlabeled_images)]
        parts_gt = [(paths.unlabeled_gt_json, paths.unlabeled_images)]
    else:
        labeled, rest = write_split(paths.train_json, percent=percent, fold=fold, seed=1,
                                    out_dir=str(out / "splits"))
        parts_unl = [(rest, paths.train_images), (paths.unlabeled_json, paths.unlabeled_images)]
        parts_gt = [(rest, paths.train_images), (paths.unlabeled_gt_json, paths.unlabeled_images)]
    tag = f"{fold}@{percent:g}"
    data = {"train": labeled, "train_images": paths.train_images,
            "val": paths.val_json, "val_images": paths.val_images,
            "unlabeled": "", "unlabeled_gt": "", "unlabeled_images": ""}
    if unlabeled:
        data |= {
            "unlabeled": merge_coco(parts_unl, images_root, out / "splits" / f"unlabeled.{tag}.json", False),
            "unlabeled_gt": merge_coco(parts_gt, images_root, out / "splits" / f"unlabeled_gt.{tag}.json",
                                       True),
            "unlabeled_images": images_root}
    return data


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    started_at = commit()
    base = ROOT / (args.tag or args.preset)
    offset = args.init_from_supervised
    init = ""
    if offset:
        init = str(start_checkpoint(base, args.percent, args.fold, offset))
        if not Path(init).is_file():
            raise SystemExit(f"{init}: run the supervised row first (its checkpoint at iteration "
                             f"{offset} starts this run)")
    # the start's checksum, read before training: a later supervised run may overwrite the path
    start_sum = _checksum(init, Path(init).stat().st_mtime_ns) if init else ""
    variant = getattr(args, "variant", "")
    out = run_folder(base, args.method, args.percent, args.fold, offset, variant)
    if start_sum:
        claim_start(out, start_sum)
    paths = shapes.generate_shapes(shapes.default_root())
    cfg = load_config(args.preset, overrides=args.set)
    cfg.method.enabled = args.method == "soft_teacher"
    for key, value in prepare_data(paths, args.percent, args.fold, base, cfg.method.enabled).items():
        setattr(cfg.data, key, value)
    s = cfg.solver
    if args.iters:
        s.max_iter = args.iters - offset
        s.steps = (int(s.max_iter * 0.75), int(s.max_iter * 0.9))
        s.warmup_iters = min(s.warmup_iters, s.max_iter // 10)
    elif offset:
        raise SystemExit("--init-from-supervised needs --iters (the total of both stages)")
    cfg.model.weights = init or cfg.model.weights
    if init and not any(o.startswith("train.eval_batch_size=") for o in args.set):
        # evaluated as its start was, so that the curve and the best checkpoint compare alike
        cfg.train.eval_batch_size = eval_batch_size(saved_config(Path(init).parent))
    cfg.train.eval_period = cfg.train.checkpoint_period = args.eval_period or max(s.max_iter // 5, 1)
    cfg.train.keep_last = 1000  # a later Soft Teacher run may start from any of them
    cfg.train.vis_period = max(s.max_iter // 4, 1)
    cfg.train.device = args.device
    cfg.train.output_dir = str(out)
    check_same_run(out, cfg)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # this row's peak, not an earlier row's of the process
    t0 = time.perf_counter()
    result = train(cfg, resume="auto", progress=False)
    wall = time.perf_counter() - t0
    rows = read_jsonl(out / "metrics.jsonl")
    # a resumed run logs the iterations it repeats twice; keep the last row of each iteration
    train_rows = list({r["iteration"]: r for r in rows if r["kind"] == "train"}.values())
    evals = list({r["iteration"]: r for r in rows if r["kind"] == "eval"}.values())
    rep = cfg.method.report if cfg.method.enabled else "student"
    if offset and args.method == "supervised":
        # the supervised row's best checkpoint may be one of the run it continues
        base_rows = read_jsonl(Path(init).parent / "metrics.jsonl")
        evals = [{**r, "iteration": r["iteration"] - offset} for r in base_rows
                 if r["kind"] == "eval" and r["iteration"] <= offset] + evals
    best = max(evals, key=lambda r: r.get(f"{rep}/bbox_AP") or -1)
    tail = train_rows[-max(len(train_rows) // 5, 1):]

    def tail_mean(key: str) -> float | None:
        vals = [r[key] for r in tail if isinstance(r.get(key), float) and r[key] == r[key]]
        return round(statistics.fmean(vals), 4) if vals else None

    device = torch.device(result.student.pixel_mean.device)
    saved = saved_config(out)  # as the run used it (a resumed run keeps some of its start's)
    record = {
        "variant": variant, "overrides": list(args.set),
        "method": args.method, "percent": args.percent, "fold": args.fold, "preset": args.preset,
        "iters": s.max_iter + offset, "init_from": init, "init_iteration": offset,
        "init_sha256": start_sum, "reported": rep,
        "best_AP": best.get(f"{rep}/bbox_AP"), "best_AP50": best.get(f"{rep}/bbox_AP50"),
        "best_iteration": best["iteration"] + offset,
        "final": {k: v for k, v in result.metrics.items() if k.endswith(("bbox_AP", "bbox_AP50"))},
        "pseudo_precision_last20pct": tail_mean("pseudo/precision"),
        "pseudo_recall_last20pct": tail_mean("pseudo/recall"),
        "pseudo_cls_per_image_last20pct": tail_mean("unsup/num_pseudo_cls"),
        "s_per_iter_median": statistics.median(r["time/step_s"] for r in train_rows),
        # wall_s, peak_mib and commit: of the process that trained from resumed_from (the
        # iteration it resumed at; None: from the start)
        "resumed_from": result.started_at + offset if result.started_at else None,
        "wall_s": round(wall, 1),
        # on a CPU the process's largest resident set: with several rows in one process (table,
        # ablation.py run) the largest of this row and those before it
        "peak_mib": round(torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                          else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"cpu x{torch.get_num_threads()} threads",
        "torch": torch.__version__, "software": software(), "commit": started_at,
        # what the run drew its batches with and evaluated in (see README)
        "group_by_aspect": bool(saved["data"].get("group_by_aspect", False)),
        "eval_batch_size": eval_batch_size(saved),
        "command": command_line(),
        "curve": [(r["iteration"] + offset, r.get("teacher/bbox_AP"), r.get("student/bbox_AP"))
                  for r in evals],
    }
    if args.method == "supervised" and not offset:
        # what the runs that start from this one's checkpoints name as their start
        record["checkpoint_sha256"] = {str(int(f.stem.split("_")[1])): sha256_file(f)
                                       for f in sorted(out.glob("model_[0-9]*.pt"))}
    results = base / getattr(args, "results", "results.jsonl")
    if result.started_at == result.iteration:  # finished before: nothing trained, nothing timed
        earlier = recorded(read_jsonl(results), record)
        if earlier is not None:
            print(f"{out}: finished and recorded in {results} (commit {earlier['commit']})", flush=True)
            return earlier
        record["wall_s"] = record["peak_mib"] = None
    append_jsonl(results, record)
    print({k: v for k, v in record.items() if k != "curve"}, flush=True)
    return record


def run_folder(base: Path, method: str, percent: float, fold: int, init_iteration: int = 0,
               variant: str = "") -> Path:
    """The folder ``run`` trains a row in: ``METHOD-pPERCENT-fFOLD[-initB][-VARIANT]``."""
    name = f"{method}-p{percent:g}-f{fold}" + (f"-init{init_iteration}" if init_iteration else "")
    return base / (f"{name}-{variant}" if variant else name)


def per_class_lines(latest: dict[tuple, dict], base: Path) -> list[str]:
    """A markdown table of each row's AP per class at its run's last evaluation, of the model the
    row reports, read from the run folder's ``metrics.jsonl`` (rows whose folder is gone are left
    out; an empty list where none is left)."""
    rows = []
    for (m, p, f), r in sorted(latest.items()):
        folder = run_folder(base, m, p, f, r.get("init_iteration", 0), r.get("variant", ""))
        metrics = folder / "metrics.jsonl"
        evals = [e for e in read_jsonl(metrics) if e.get("kind") == "eval"] if metrics.is_file() else []
        if not evals:
            continue
        which = r.get("reported", "teacher") if m == "soft_teacher" else "student"
        prefix = f"{which}/bbox_AP/"
        per_class = {k[len(prefix):]: v for k, v in evals[-1].items() if k.startswith(prefix)}
        at = evals[-1]["iteration"] + r.get("init_iteration", 0)
        rows.append((f"{m} {p:g} % fold {f}, {which} at {at}", per_class))
    if not rows:
        return []
    classes = list(dict.fromkeys(c for _, per_class in rows for c in per_class))
    return (["", "| run | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
            + [f"| {name} | " + " | ".join("-" if per_class.get(c) is None else f"{per_class[c] * 100:.1f}"
                                            for c in classes) + " |" for name, per_class in rows])


# what a run is: two records alike in these are of one run folder's training
RUN_KEYS = ("variant", "overrides", "method", "percent", "fold", "preset", "iters", "init_iteration",
            "init_sha256")


def recorded(records: list[dict], record: dict) -> dict | None:
    """The newest of ``records`` of the run ``record`` is of, if it holds its best AP: a finished
    run run again trains nothing, and its record stands (its time was measured when it trained)."""
    for r in reversed(records):
        if all(r.get(k) == record[k] for k in RUN_KEYS) and r.get("best_AP") == record["best_AP"]:
            return r
    return None


def table(args) -> None:
    """Every row of the table that ``results.jsonl`` does not hold yet."""
    base = ROOT / (args.tag or args.preset)
    records = read_jsonl(base / "results.jsonl")
    done = _latest(records, args.init_from_supervised)
    scratch = set(_latest(records, 0))
    iters = args.iters or load_config(args.preset, overrides=args.set).solver.max_iter
    todo = [(m, p, f) for p in args.percents for f in range(1, args.folds + 1) for m in METHODS]
    todo.append(("supervised", 100.0, 1))
    for method, percent, fold in todo:
        if args.init_from_supervised and ("supervised", percent, fold) not in scratch:
            # the run from scratch whose checkpoint the others start from
            run(argparse.Namespace(**{**vars(args), "method": "supervised", "percent": percent,
                                      "fold": fold, "init_from_supervised": 0,
                                      "iters": args.init_from_supervised}))
            scratch.add(("supervised", percent, fold))
        r = done.get((method, percent, fold))
        if (r and r.get("init_iteration", 0) == args.init_from_supervised and not stale(r, base)
                and same_settings(r, iters, args.set)):
            continue
        run(argparse.Namespace(**{**vars(args), "method": method, "percent": percent, "fold": fold}))


def same_settings(record: dict, iters: int, overrides: list[str]) -> bool:
    """Whether ``record`` ran for ``iters`` iterations in all with exactly ``overrides``: a
    record of another schedule or setting does not stand for the row asked for."""
    return record.get("iters") == iters and record_overrides(record) == list(overrides)


def record_overrides(r: dict) -> list[str]:
    """A record's ``--set`` overrides (records older than the ``overrides`` field: its command)."""
    if "overrides" in r:
        return list(r["overrides"])
    words = r.get("command", "").split()
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--set"]


def claim_start(out: Path, digest: str) -> None:
    """Mark ``out`` as the run from the start checkpoint with SHA-256 ``digest``, refusing a
    folder that holds a run from another start: resuming there would continue the old run."""
    mark = out / "start.sha256"
    if mark.is_file() and (held := mark.read_text().strip()) != digest:
        raise SystemExit(f"{out}: holds a run from another start ({held[:12]}, not {digest[:12]}); "
                         "move the folder away to train this row from the current start")
    out.mkdir(parents=True, exist_ok=True)
    write_text(mark, digest + "\n")


# what a run folder's training is: a folder holding a run with other values here would resume
# that run under this one's name (a finished one: its weights, recorded as this run's)
RUN_SECTIONS = ("model", "augment", "method", "solver")
# and the keys of the other sections that change what a run trains: another seed in the same
# folder would be recorded under its name with the first seed's weights
RUN_FIELDS = {"train": ("seed", "batch_size"), "data": ("group_by_aspect",)}


def check_same_run(out: Path, cfg) -> None:
    """Refuse to resume the run in ``out`` if it was trained with other settings than ``cfg``
    (another ``--iters`` or ``--set``, ``train.seed`` among them). Keys the saved config lacks
    (older than the field) pass. Paths compare as the run's config.yaml names them: absolute, from the working
    directory, so a relative path to the same file is the same setting."""
    if not (out / "config.yaml").is_file():
        return
    saved, now = saved_config(out), with_absolute_paths(cfg).to_dict()
    keys = [(section, key) for section in RUN_SECTIONS for key in sorted(saved.get(section, {}))]
    keys += [(section, key) for section, names in RUN_FIELDS.items() for key in names
             if key in saved.get(section, {})]
    differ = [f"{section}.{key}: {saved[section][key]!r} there, {now[section][key]!r} now"
              for section, key in keys
              if key in now[section] and _plain(saved[section][key]) != _plain(now[section][key])]
    if differ:
        raise SystemExit(f"{out}: holds a run with other settings ({'; '.join(differ)}); move the "
                         "folder away, or give this row its own --variant or --tag")


def _plain(value):
    """A config value as YAML reads it back (tuples as lists)."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def start_checkpoint(base: Path, percent: float, fold: int, iteration: int) -> Path:
    """The checkpoint of the split's supervised run from scratch that runs started at
    ``iteration`` start from."""
    return base / f"supervised-p{percent:g}-f{fold}" / f"model_{iteration:07d}.pt"


@functools.lru_cache(maxsize=64)
def _checksum(path: str, mtime_ns: int) -> str:
    return sha256_file(path)


def stale(record: dict, base: Path) -> bool:
    """Whether a record started from another checkpoint than the one its start's path holds now
    (the supervised run was trained again since): its row has to run again. Records without a
    checksum (older than the field) cannot tell and count as current."""
    want = record.get("init_sha256")
    if not want or not record.get("init_iteration"):
        return False
    path = start_checkpoint(base, record["percent"], record["fold"], record["init_iteration"])
    return path.is_file() and _checksum(str(path), path.stat().st_mtime_ns) != want


def saved_config(run_dir: Path) -> dict:
    """The config a run in ``run_dir`` saved, as a plain mapping."""
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def eval_batch_size(saved: dict) -> int:
    """The evaluation batch size of a saved config (4 for configs older than the field)."""
    return int(saved.get("train", {}).get("eval_batch_size", 4))


def check_one_evaluation(chosen: Iterable[dict], where: Path | str) -> None:
    """Refuse a table of runs evaluated in batches of different sizes: an image's detections
    depend on the images padded into its batch, by an AP or more on ``shapes`` (records older
    than the field were evaluated in batches of 4)."""
    sizes = {r.get("eval_batch_size", 4) for r in chosen}
    if len(sizes) > 1:
        raise SystemExit(f"{where}: the runs were evaluated in batches of different sizes "
                         f"({', '.join(map(str, sorted(sizes)))}); report them apart, or evaluate "
                         "them again alike")


def check_one_start(chosen: Iterable[dict], records: list[dict], where: Path) -> None:
    """Refuse a table that pairs runs of one split started from different checkpoints (a
    supervised run trained again at the same path, say). The newest supervised run from scratch
    of each split in ``records`` names its checkpoints' checksums; records without checksums
    (older than the field) cannot be checked and pass."""
    kept = {(r["percent"], r["fold"]): r.get("checkpoint_sha256", {}) for r in records
            if is_start_run(r)}
    starts: dict[tuple[float, int], dict[str, str]] = {}
    for r in chosen:
        if not r.get("init_sha256"):
            continue
        split = (r["percent"], r["fold"])
        starts.setdefault(split, {})[r.get("variant") or r["method"]] = r["init_sha256"]
        scratch = kept.get(split, {}).get(str(r["init_iteration"]))
        if scratch:
            starts[split][f"supervised run from scratch at {r['init_iteration']}"] = scratch
    for (pct, fold), names in sorted(starts.items()):
        if len(set(names.values())) > 1:
            listed = ", ".join(f"{name} {digest[:12]}" for name, digest in sorted(names.items()))
            raise SystemExit(f"{where}: the runs of {pct:g} % fold {fold} started from different "
                             f"checkpoints ({listed}); keep each start's records in a result "
                             "folder of its own (--tag)")


def is_start_run(record: dict) -> bool:
    """Whether a record is of the supervised run from scratch that every run of its split starts
    from (``start_checkpoint``): one without a ``--variant``."""
    return (record["method"] == "supervised" and not record.get("init_iteration")
            and not record.get("variant"))


def started_at(records: list[dict], init: int | str) -> Callable[[dict], bool]:
    """Whether a record started from the supervised checkpoint at iteration ``init`` (0: from
    scratch; ``"end"``: where its split's supervised run from scratch in ``records`` ended, so
    splits trained for different lengths share a table)."""
    end = {(r["percent"], r["fold"]): r["iters"] for r in records if is_start_run(r)}
    return lambda r: r.get("init_iteration", 0) == (
        end.get((r["percent"], r["fold"]), 0) if init == "end" else init)


def _latest(records: list[dict], init: int | str, variant: str = "") -> dict[tuple, dict]:
    """The newest record of each (method, percent, fold) among the runs named ``variant`` that
    started at ``init`` (see ``started_at``). A supervised row without such a run falls back to
    the supervised run from scratch that its split's runs start from."""
    started = started_at(records, init)
    out, fallback = {}, {}
    for r in records:
        key = (r["method"], r["percent"], r["fold"])
        if started(r) and r.get("variant", "") == variant:
            out[key] = r
        elif is_start_run(r):
            fallback[key] = r
    return fallback | out


def report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tag = args.tag or args.preset
    records = read_jsonl(ROOT / tag / "results.jsonl")
    latest = _latest(records, args.init_from_supervised, args.variant)
    if not latest:
        raise SystemExit(f"no results in {ROOT / tag}")
    check_one_start(latest.values(), records, ROOT / tag / "results.jsonl")
    check_one_evaluation(latest.values(), ROOT / tag / "results.jsonl")

    def aps(method: str, pct: float) -> dict[int, float]:
        return {f: r["best_AP"] for (m, p, f), r in sorted(latest.items()) if m == method and p == pct}

    ceiling = list(aps("supervised", 100.0).values())
    reported = sorted({r.get("reported", "teacher") for (m, _, _), r in latest.items()
                       if m == "soft_teacher"}) or ["teacher"]
    lines = ["| labels | folds | supervised AP (student) | Soft Teacher AP "
             f"({' / '.join(reported)}) | gain | ratio | gap to 100 % closed |",
             "|---|---|---|---|---|---|---|"]
    pcts = sorted({p for (_, p, _) in latest})
    bars = []
    for pct in pcts:
        sup, st = aps("supervised", pct), aps("soft_teacher", pct)
        lines.append(gain_row(pct, sup, st, ceiling))
        bars.append((pct, *in_means(sup, st)[1:]))  # the bars are the table's means
    runs = ["", "| run | iterations | best AP (at iter) | final teacher / student AP | pseudo P / R "
                "| s/iter | peak MiB | device | commit |", "|---|---|---|---|---|---|---|---|---|"]
    started = started_at(records, args.init_from_supervised)
    for (m, p, f), r in sorted(latest.items()):
        fin = r["final"]
        pr = (f"{r['pseudo_precision_last20pct']:.2f} / {r['pseudo_recall_last20pct']:.2f}"
              if r.get("pseudo_precision_last20pct") is not None else "-")
        start = f", from supervised at {r['init_iteration']}" if r.get("init_iteration") else ""
        peak = "-" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"  # none: not trained there
        if not started(r) or r.get("variant", "") != args.variant:
            start += " (the run from scratch: no run of its own here)"
        runs.append(f"| {m} {p:g} % fold {f}{start} | {r['iters']} | {r['best_AP'] * 100:.1f} "
                    f"({r['best_iteration']}) | {fin.get('teacher/bbox_AP', float('nan')) * 100:.1f} / "
                    f"{fin.get('student/bbox_AP', float('nan')) * 100:.1f} | {pr} | "
                    f"{r['s_per_iter_median']:.3f} | {peak} | {r['device']} | {r['commit']} |")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.38
    labelled = set()
    for i, (pct, sup, st) in enumerate(bars):
        for j, (vals, label, color) in enumerate(((sup, "supervised", "tab:gray"),
                                                   (st, f"Soft Teacher ({' / '.join(reported)})",
                                                    "tab:blue"))):
            if vals:
                ax1.bar(i + (j - 0.5) * width, statistics.fmean(vals) * 100, width, color=color,
                        label=None if label in labelled else label)
                labelled.add(label)
                ax1.scatter([i + (j - 0.5) * width] * len(vals), [v * 100 for v in vals], color="k", s=8)
    ax1.set_xticks(range(len(bars)), [f"{p:g} %" for p, _, _ in bars])
    ax1.set_xlabel("labeled fraction of train")
    ax1.set_ylabel("val mAP@[.5:.95] (best checkpoint)")
    ax1.legend()
    for (m, p, f), r in sorted(latest.items()):
        which = r.get("reported", "teacher") if m == "soft_teacher" else "student"
        idx = 1 if which == "teacher" else 2  # curve rows: (iteration, teacher AP, student AP)
        pts = [(row[0], row[idx]) for row in r["curve"] if row[idx] is not None]
        if pts:
            xs, ys = zip(*pts)
            ax2.plot(xs, [y * 100 for y in ys], marker=".", linestyle="-" if m == "soft_teacher" else "--",
                     label=f"{'ST ' + which if m == 'soft_teacher' else 'sup'} {p:g}% f{f}")
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("val mAP")
    ax2.legend(fontsize=7, ncol=2)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.suptitle(f"shapes, results {tag}" + (f", variant {args.variant}" if args.variant else ""))
    fig.tight_layout()
    png = Path(args.png or ROOT / tag / f"gain{'_' + args.variant if args.variant else ''}.png")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print("\n".join(lines + runs + per_class_lines(latest, ROOT / tag)))
    print(f"\nplot: {png}")


def gain_row(pct: float, sup: dict[int, float], st: dict[int, float], ceiling: list[float]) -> str:
    """One line of the gain table from each method's best AP by fold. Gain, ratio and the share
    of the gap to 100 % closed compare the folds both methods have; a fold only one of them has
    is shown with its AP but counts in neither mean, and the folds column says so."""
    paired, sup_vals, st_vals = in_means(sup, st)

    def fmt(aps: dict[int, float], vals: list[float]) -> str:
        if not aps:
            return "-"
        text = f"{statistics.fmean(vals) * 100:.1f}"
        if len(aps) > 1:
            text += f" ({', '.join(f'f{f} {v * 100:.1f}' for f, v in sorted(aps.items()))})"
        return text

    gain = ratio = closed = "-"
    if paired:
        s_, t_ = statistics.fmean(sup_vals), statistics.fmean(st_vals)
        gain, ratio = f"{(t_ - s_) * 100:+.1f}", f"{t_ / s_:.2f}x" if s_ > 0 else "-"
        if ceiling and pct < 100 and statistics.fmean(ceiling) > s_:
            closed = f"{(t_ - s_) / (statistics.fmean(ceiling) - s_) * 100:.0f} %"
    alone = [f"{name} f{f}" for name, aps in (("supervised", sup), ("Soft Teacher", st))
             for f in sorted(aps.keys() - set(paired))]
    folds = str(len(paired) or max(len(sup), len(st)))
    if alone and (sup and st):
        folds += f" paired (alone, not in the means: {', '.join(alone)})"
    return (f"| {pct:g} % | {folds} | {fmt(sup, sup_vals)} | {fmt(st, st_vals)} | {gain} | {ratio} "
            f"| {closed} |")


def in_means(sup: dict[int, float], st: dict[int, float]) -> tuple[list[int], list[float], list[float]]:
    """The folds both methods have, and the APs each method's mean takes: those folds', or all
    of its own where the two share none."""
    paired = sorted(sup.keys() & st.keys())
    return (paired, [sup[f] for f in paired] or list(sup.values()),
            [st[f] for f in paired] or list(st.values()))


def _start(text: str) -> int | str:
    if text == "end":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an iteration or 'end', not {text!r}") from None


def add_arguments(q: argparse.ArgumentParser, training: bool) -> None:
    """The options every subcommand shares, and those of the ones that train."""
    q.add_argument("--preset", default="shapes-cpu")
    q.add_argument("--tag", default="", help="result folder name (default: the preset)")
    if training:
        q.add_argument("--init-from-supervised", type=int, default=0, metavar="B",
                       help="start from the supervised run's checkpoint at iteration B")
    else:
        q.add_argument("--init-from-supervised", type=_start, default=0, metavar="B",
                       help="the runs that started from the supervised checkpoint at iteration B; "
                            "'end': where each split's supervised run ended")
        q.add_argument("--png", default="", help="default: a PNG in the result folder")
        return
    q.add_argument("--iters", type=int, default=0, help="iterations (default: the preset's)")
    q.add_argument("--eval-period", type=int, default=0, help="default: iters / 5")
    q.add_argument("--device", default="auto")
    q.add_argument("--threads", type=int, default=0)
    q.add_argument("--set", action="append", default=[], help="config override")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "table", "report"):
        q = sub.add_parser(name)
        add_arguments(q, training=name != "report")
        if name == "report":
            q.add_argument("--variant", default="", help="the runs made with this --variant")
            continue
        if name == "run":
            q.add_argument("--method", choices=METHODS, required=True)
            q.add_argument("--percent", type=float, default=10.0)
            q.add_argument("--fold", type=int, default=1)
            q.add_argument("--variant", default="", help="a name for a run that differs from its "
                           "row's usual one (a longer schedule, say): its folder gets it as a "
                           "suffix and the report selects it with --variant")
        else:
            q.add_argument("--percents", type=float, nargs="+", default=list(PERCENTS))
            q.add_argument("--folds", type=int, default=2)
    args = p.parse_args()
    {"run": run, "table": table, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()
