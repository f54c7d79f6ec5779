"""Ablation of Soft Teacher's parts at one label fraction (the paper's Tables 6-8, on ``shapes``).

Rows, each adding one part to the row before it (SPEC §8):

- ``multi_stage``: the teacher is frozen at the supervised model, so its pseudo boxes are those
  an offline labelling pass would give (up to the weak view's resize and flip), hard labels;
  the student is what this row reports (the frozen teacher is the supervised model);
- ``end_to_end``: the teacher is the student itself after every step (no EMA), hard labels;
- ``ema``: the EMA teacher (momentum 0.999), hard labels;
- ``soft_teacher``: + soft background weights (indicator ``bg_teacher``);
- ``box_jitter``: + box-jittering regression pseudo boxes: the full method.

and the reliability indicators of the soft weights (Table 8), each in place of ``bg_teacher`` on
the ``soft_teacher`` row: ``bg_student``, ``pred_diff``, ``iou``, ``reverse_iou``; and ``oracle``,
the full method learning from the unlabeled images' hidden ground truth instead of the teacher's
boxes: how far perfect pseudo labels would go with these views, losses and schedule;
``oracle_found``, the same with the hidden ground truth of the objects the teacher finds only;
``no_rotate_shear``, the full method with strong views that only translate;
``ellipse_boxes``, the full method moving boxes between views by their inscribed ellipse; and
``alpha_1``, the full method with the unsupervised terms weighted 1 instead of 4.

Every row starts from the same supervised checkpoint and trains the same iterations with the same
overrides, through ``gain.py``'s ``run`` (same data, splits and record), so one command gives the
whole table and resumes where it stopped:

    python benchmarks/ablation.py run --percent 10 --folds 2 --iters 2600 \\
        --init-from-supervised 2000 --set solver.lr=0.002
    python benchmarks/ablation.py report --init-from-supervised 2000

(``--fold K`` instead of ``--folds N`` runs, or reports, the rows of fold K alone;
``--seeds 0 1`` runs each row twice, with ``train.seed`` 0 and 1, so that the report can set a
row's difference from the next against what a second seed alone changes.)

Records go to ``runs/bench/gain/TAG/ablation.jsonl``; the report prints a markdown table
(with the supervised row of ``gain.py`` for reference) and writes its plot to ``--png`` (default:
``runs/bench/gain/TAG/ablation.png``).
A ``gain.py`` Soft Teacher run with the same start and overrides stands for the full-method
row (``box_jitter``) of its fold, so that row need not be trained twice.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from common import read_jsonl
from gain import ROOT, _latest, add_arguments, started_at
from gain import run as gain_run

PARTS = ("method.reliability=none", "method.use_jitter=false")
ROWS: dict[str, tuple[str, ...]] = {
    "multi_stage": ("method.ema_momentum=1.0", "method.report=student", *PARTS),
    "end_to_end": ("method.use_ema=false", *PARTS),
    "ema": PARTS,
    "soft_teacher": ("method.use_jitter=false",),
    "box_jitter": (),
}
STEPS = tuple(ROWS)
INDICATORS = ("bg_student", "pred_diff", "iou", "reverse_iou")
for _kind in INDICATORS:
    ROWS[f"indicator_{_kind}"] = ("method.use_jitter=false", f"method.reliability={_kind}")
# the full method with the hidden ground truth as its pseudo boxes: what perfect pseudo labels
# would give with these views, losses and schedule (an upper bound, not a method)
ROWS["oracle"] = ("method.pseudo_source=ground_truth",)
# the same with only the hidden ground truth of the objects the teacher's classification pseudo
# boxes find: the teacher's recall with exact boxes and no false ones (what missed objects cost,
# against what false and loose boxes cost)
ROWS["oracle_found"] = ("method.pseudo_source=found_ground_truth",)
# the full method with the teacher's own pseudo boxes less the false ones (loose coordinates
# kept): between it and oracle_found, what loose boxes cost; between the full method and it,
# what false boxes cost
ROWS["oracle_true"] = ("method.pseudo_source=true_teacher",)
# the full method with strong views that neither rotate nor shear (translate or nothing): the
# box of a rotated or sheared box's corners is looser than the object it holds
ROWS["no_rotate_shear"] = ("augment.rotate_deg=0", "augment.shear_deg=0")
# the full method, pseudo boxes moved into the strong view by their inscribed ellipse
ROWS["ellipse_boxes"] = ("augment.box_mapping=ellipse",)
# the full method with the unsupervised terms weighted 1 instead of 4 (loss balance)
ROWS["alpha_1"] = ("method.unsup_weight=1.0",)
RESULTS = "ablation.jsonl"
SEED = "train.seed="


def _overrides(r: dict) -> list[str]:
    """A record's ``--set`` overrides (records older than the ``overrides`` field: its command)."""
    if "overrides" in r:
        return list(r["overrides"])
    words = r.get("command", "").split()
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--set"]


def _seed(overrides: list[str]) -> int:
    """The ``train.seed`` a run's overrides set (0, the default, where they set none)."""
    return next((int(o[len(SEED):]) for o in reversed(overrides) if o.startswith(SEED)), 0)


def _variant(row: str, seed: int) -> str:
    """The name (and folder suffix) of a row's run with ``seed``: the row alone for seed 0."""
    return f"{row}-seed{seed}" if seed else row


def _done(tag: str, init: int | str, percent: float) -> dict[tuple[str, int, int], dict]:
    """The newest ablation record of each (row, fold, seed) at ``percent`` started at ``init`` (an
    iteration, or ``"end"`` as in ``gain.py``). Where the full-method row has none for seed 0,
    ``gain.py``'s newest Soft Teacher record of that fold counts for it when it ran with the
    overrides the ablation rows share (the same configuration), as the newest supervised record
    does for the supervised row."""
    gain_records = read_jsonl(ROOT / tag / "results.jsonl")
    at_init = started_at(gain_records, init)

    def started(r: dict) -> bool:
        return r["percent"] == percent and at_init(r)

    out, shared = {}, set()
    for r in read_jsonl(ROOT / tag / RESULTS):
        if started(r):
            seed = _seed(_overrides(r))
            row = r["variant"].removesuffix(_variant("", seed))
            out[(row, r["fold"], seed)] = r
            own = ROWS.get(row, ())
            shared.add(tuple(o for o in _overrides(r) if o not in own and not o.startswith(SEED)))
    if len(shared) == 1:
        full = {r["fold"]: r for r in gain_records
                if r["method"] == "soft_teacher" and not r.get("variant") and started(r)
                and tuple(_overrides(r)) in shared}
        for fold, r in full.items():
            out.setdefault(("box_jitter", fold, 0), {**r, "variant": "box_jitter", "from_gain": True})
    return out


def run(args) -> None:
    if any(o.startswith(SEED) for o in args.set):
        raise SystemExit(f"give the seeds with --seeds, not --set {SEED}N")
    tag = args.tag or args.preset
    folds = [args.fold] if args.fold else list(range(1, args.folds + 1))
    for fold in folds:
        base = ROOT / tag / f"supervised-p{args.percent:g}-f{fold}"
        if args.init_from_supervised and not (base / f"model_{args.init_from_supervised:07d}.pt").is_file():
            raise SystemExit(f"{base}: no checkpoint at iteration {args.init_from_supervised}; run "
                             f"gain.py's supervised row of fold {fold} first")
    # a gain.py record stands for the full-method row only if it ran with this run's overrides
    done = {k: r for k, r in _done(tag, args.init_from_supervised, args.percent).items()
            if not r.get("from_gain") or _overrides(r) == list(args.set)}
    rows = args.rows or list(ROWS)
    for fold in folds:
        for seed in args.seeds:
            for row in rows:
                if (row, fold, seed) in done:
                    continue
                seeded = [f"{SEED}{seed}"] if seed else []
                ns = argparse.Namespace(**{**vars(args), "method": "soft_teacher", "fold": fold,
                                           "variant": _variant(row, seed), "results": RESULTS,
                                           "set": [*args.set, *seeded, *ROWS[row]]})
                gain_run(ns)


def report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tag = args.tag or args.preset
    pct = args.percent
    done = {k: r for k, r in _done(tag, args.init_from_supervised, pct).items()
            if not args.fold or k[1] == args.fold}
    if not done:
        raise SystemExit(f"no ablation results at {pct:g} % in {ROOT / tag / RESULTS}")
    sup = [r["best_AP"] for (m, p, f), r in
           sorted(_latest(read_jsonl(ROOT / tag / "results.jsonl"), args.init_from_supervised).items())
           if m == "supervised" and p == pct and (not args.fold or f == args.fold)]

    def runs(row: str) -> dict[int, list[float]]:
        """AP of each of the row's runs, by fold."""
        out: dict[int, list[float]] = {}
        for (v, fold, _), r in sorted(done.items()):
            if v == row:
                out.setdefault(fold, []).append(r["best_AP"] * 100)
        return out

    def fmt(v: list[float]) -> str:
        if not v:
            return "-"
        spread = f" ({', '.join(f'{x:.1f}' for x in v)})" if len(v) > 1 else ""
        return f"{statistics.fmean(v):.1f}{spread}"

    def seed_spread(by_fold: dict[int, list[float]]) -> str:
        """What another seed changed: the largest range of one fold's runs."""
        ranges = [max(v) - min(v) for v in by_fold.values() if len(v) > 1]
        return f"{max(ranges):.1f}" if ranges else "-"

    lines = [f"| row ({pct:g} % labels) | folds | runs | AP (best; teacher, student for multi_stage; "
             "mean of the folds' means) | change from the row above | seed spread |",
             "|---|---|---|---|---|---|"]
    if sup:
        lines.append(f"| supervised (student) | {len(sup)} | {len(sup)} | {fmt([s * 100 for s in sup])} "
                     "| | - |")
    prev = None
    bars = []
    for row in ROWS:
        by_fold = runs(row)
        if not by_fold:
            continue
        v = [statistics.fmean(x) for x in by_fold.values()]
        step = row in STEPS
        delta = f"{statistics.fmean(v) - prev:+.1f}" if step and prev is not None else ""
        lines.append(f"| {row} | {len(v)} | {sum(map(len, by_fold.values()))} | {fmt(v)} | {delta} "
                     f"| {seed_spread(by_fold)} |")
        if step:
            prev = statistics.fmean(v)
        bars.append((row, v, [x for xs in by_fold.values() for x in xs]))
    if args.details:
        lines += ["", "| run | best AP (iter) | final teacher / student | pseudo P / R | s/iter | commit |",
                  "|---|---|---|---|---|---|"]
        for (row, fold, seed), r in sorted(done.items()):
            fin = r["final"]
            pr = (f"{r['pseudo_precision_last20pct']:.2f} / {r['pseudo_recall_last20pct']:.2f}"
                  if r.get("pseudo_precision_last20pct") is not None else "-")
            src = " (gain.py)" if r.get("from_gain") else ""
            name = f"{row} fold {fold}" + (f" seed {seed}" if seed else "") + src
            lines.append(f"| {name} | {r['best_AP'] * 100:.1f} ({r['best_iteration']}) | "
                         f"{fin.get('teacher/bbox_AP', float('nan')) * 100:.1f} / "
                         f"{fin.get('student/bbox_AP', float('nan')) * 100:.1f} | {pr} | "
                         f"{r['s_per_iter_median']:.2f} | {r['commit']} |")
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (row, v, every) in enumerate(bars):
        ax.bar(i, statistics.fmean(v), color="tab:blue" if row in STEPS else "tab:cyan")
        ax.scatter([i] * len(every), every, color="k", s=8)
    if sup:
        ax.axhline(statistics.fmean(sup) * 100, color="tab:gray", linestyle="--", label="supervised")
        ax.legend()
    ax.set_xticks(range(len(bars)), [r.replace("indicator_", "ind. ") for r, *_ in bars], rotation=30,
                  ha="right")
    ax.set_ylabel("val mAP@[.5:.95], best")
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"shapes, ablation at {pct:g} % labels ({tag})")
    fig.tight_layout()
    png = Path(args.png or ROOT / tag / "ablation.png")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print("\n".join(lines))
    print(f"\nplot: {png}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "report"):
        q = sub.add_parser(name)
        add_arguments(q, training=name == "run")
        q.add_argument("--percent", type=float, default=10.0)
        q.add_argument("--fold", type=int, default=0, help="only this fold")
        if name == "report":
            q.add_argument("--details", action="store_true", help="one line per run as well")
            continue
        q.add_argument("--folds", type=int, default=2, help="folds 1 to FOLDS (without --fold)")
        q.add_argument("--rows", nargs="+", choices=list(ROWS), default=[],
                       help="only these rows (default: all)")
        q.add_argument("--seeds", type=int, nargs="+", default=[0],
                       help="one run of each row per train.seed (default: 0)")
    args = p.parse_args()
    {"run": run, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()
