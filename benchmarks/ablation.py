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
``ellipse_boxes``, the full method moving boxes between views by their inscribed ellipse;
``alpha_1``, the full method with the unsupervised terms weighted 1 instead of 4;
``threshold_07``, the full method with classification pseudo boxes above 0.7 instead of 0.9;
``threshold_095``, the same above 0.95;
``ema_099``, the full method with an EMA momentum of 0.99 instead of 0.999 (the teacher averages
the student's last hundred or so steps instead of its last thousand);
``ema_09995``, the same with 0.9995 (its last two thousand or so: between the EMA teacher and
the frozen one of ``multi_stage``);
``jitter_score_09``, the full method with its regression pseudo boxes chosen by jittering among
the classification pseudo boxes (score > 0.9) instead of among every candidate (score > 0.5); and
``labeled_only``, the full method with the unsupervised terms weighted 0: the EMA teacher of a
student that learns from the same labeled batches alone, which parts what the unlabeled images
add from what averaging the student's weights adds; ``multi_stage_refresh_250``, ``multi_stage``
in rounds: its frozen teacher becomes the student every 250 iterations (``method.teacher_refresh``);
``frozen``, the full method with ``multi_stage``'s frozen teacher, and ``frozen_refresh_250``, the
same refreshed every 250 iterations: soft weights and box jittering with a teacher that the
student does not shape between refreshes.

Every row starts from the same supervised checkpoint and trains the same iterations with the same
overrides, through ``gain.py``'s ``run`` (same data, splits and record), so one command gives the
whole table and resumes where it stopped:

    python benchmarks/ablation.py run --percent 10 --folds 2 --iters 2600 \\
        --init-from-supervised 2000 --set solver.lr=0.002
    python benchmarks/ablation.py report --init-from-supervised 2000

(``--fold K`` instead of ``--folds N`` runs, or reports, the rows of fold K alone;
``--seeds 0 1`` runs each row twice, with ``train.seed`` 0 and 1, so that the report can set a
row's difference from the next against what a second seed alone changes.)

``--variant NAME`` keeps rows run with overrides of their own (a box rule, a longer schedule) in
the same result folder and from the same start as the usual rows, apart from them: their folders
and records are named ``ROW-NAME``, and ``report --variant NAME`` gives their table, the
supervised row and the start unchanged. A ``gain.py`` Soft Teacher run with the same
``--variant`` and overrides stands for that table's full-method row, and ``report
--supervised-variant SNAME`` puts ``gain.py``'s supervised run of ``--variant SNAME`` (from the
same start, a longer schedule) in the supervised row's place:

    python benchmarks/ablation.py run --percent 1 --fold 1 --iters 2000 \
        --init-from-supervised 1000 --variant ellipse --set augment.box_mapping=ellipse \
        --rows ema soft_teacher
    python benchmarks/ablation.py report --percent 1 --fold 1 --init-from-supervised 1000 \
        --variant ellipse

Each record names its start by the checkpoint's SHA-256 (``init_sha256``; a checkpoint's bytes
depend on its state alone), and the supervised run from scratch names those of the checkpoints
it kept: a supervised row trained again at the same path to other weights makes the rows
started from its old checkpoint stale (``run`` trains them again, once their folders, marked
with their start, are moved away) and a report that would pair them with the new start refuses
to. To set the rows' steps against what the start alone changes, keep each start's runs in a
result folder of its own and report them together (a fold's value is then the mean of its
starts', and each row's change from the row above counts the starts both rows have):

    python benchmarks/ablation.py report --tag start1 --more-starts start2 start3 \\
        --percent 5 --init-from-supervised 2000

Records go to ``runs/bench/gain/TAG/ablation.jsonl``; the report prints a markdown table
(with the supervised row of ``gain.py`` for reference) and writes its plot to ``--png`` (default:
``runs/bench/gain/TAG/ablation.png``). The table gives each row's best AP over its evaluations
and, beside it, its AP at the last one: the best favours a row whose reported model moves more
from one evaluation to the next (a student more than an EMA teacher). ``--details`` adds a
line per run; ``--curves`` a table of every run's teacher and student AP at each evaluation
(the supervised runs' first) and a plot of the reported models' curves, a panel per fold, next
to the other (``NAME_curves.png``).
A ``gain.py`` Soft Teacher run with the same start and overrides stands for the full-method
row (``box_jitter``) of its fold, so that row need not be trained twice.
"""

from __future__ import annotations

import argparse
import re
import statistics
from pathlib import Path

from common import read_jsonl
from gain import (
    ROOT,
    _latest,
    add_arguments,
    check_one_evaluation,
    check_one_start,
    is_start_run,
    record_overrides,
    stale,
    start_checkpoint,
    started_at,
)
from gain import run as gain_run

from softteacher.config import load_config

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
# the full method with the unsupervised terms weighted 0: every part of the step runs, but only
# the labeled images (the same ones, in the same batches, padded alike) move the student; the
# teacher is then an average of a supervised student's weights. Between it and the full method,
# what the unlabeled images add; between it and supervised continued alike, what the average adds
ROWS["labeled_only"] = ("method.unsup_weight=0",)
# the full method with classification and RPN pseudo boxes above 0.7 instead of 0.9: more of
# the objects the teacher misses at 0.9, and more of its false boxes (pseudo-label recall
# against precision)
ROWS["threshold_07"] = ("method.cls_pseudo_threshold=0.7", "method.rpn_pseudo_threshold=0.7")
# the same above 0.95: fewer of the false boxes an EMA teacher lets through as its scores grow more
# confident over training, and fewer of its true ones early on (pseudo-label precision against
# recall the other way)
ROWS["threshold_095"] = ("method.cls_pseudo_threshold=0.95", "method.rpn_pseudo_threshold=0.95")
# the full method with the EMA momentum 0.99 instead of 0.999: a step's weight in the teacher
# falls to 1/e after about 100 steps instead of 1,000, so on a schedule of a few thousand
# iterations the teacher follows the student closer (the paper's 180k iterations are 180 of
# its 0.999 horizons)
ROWS["ema_099"] = ("method.ema_momentum=0.99",)
# the full method with the EMA momentum 0.9995: a teacher that follows the student half as fast,
# nearer to multi_stage's frozen one, whose pseudo boxes the student does not shape
ROWS["ema_09995"] = ("method.ema_momentum=0.9995",)
# the full method with a score floor of 0.9 on the regression pseudo boxes: jittering then drops
# unsteady boxes from the classification pseudo boxes instead of choosing among every candidate
# above 0.5, steady boxes of a doubtful class or on clutter with them. Between soft_teacher and
# it, what dropping the unsteady boxes gives; between it and the full method, what the steady
# boxes scored 0.5-0.9 give
ROWS["jitter_score_09"] = ("method.reg_score_threshold=0.9",)
# multi_stage in rounds: its frozen teacher becomes the student every 250 iterations (of the
# run's count), so each round's pseudo boxes are the last round's student's, offline labelling
# repeated without leaving the run; between multi_stage and it, what new rounds add
ROWS["multi_stage_refresh_250"] = (*ROWS["multi_stage"], "method.teacher_refresh=250")
# the full method with multi_stage's frozen teacher: soft weights and box jittering with a teacher
# the student does not shape; between multi_stage and it, what those two parts add then
ROWS["frozen"] = ("method.ema_momentum=1.0", "method.report=student")
# the same frozen teacher refreshed every 250 iterations
ROWS["frozen_refresh_250"] = (*ROWS["frozen"], "method.teacher_refresh=250")
RESULTS = "ablation.jsonl"
SEED = "train.seed="
# a --variant name: joined to a row's name by "-" (row names have none), the seed's "-seedN" after
VARIANT_NAME = re.compile(r"[A-Za-z0-9_.]+(-[A-Za-z0-9_.]+)*")


def _seed(overrides: list[str]) -> int:
    """The ``train.seed`` a run's overrides set (0, the default, where they set none)."""
    return next((int(o[len(SEED):]) for o in reversed(overrides) if o.startswith(SEED)), 0)


def _shared(r: dict, row: str) -> list[str]:
    """A record's overrides less those of its row and its seed: the ``--set`` of its command."""
    return [o for o in record_overrides(r) if o not in ROWS.get(row, ()) and not o.startswith(SEED)]


def _variant(row: str, seed: int, name: str = "") -> str:
    """The name (and folder suffix) of a row's run with ``seed`` in the rows called ``name``
    (``--variant``): ``ROW[-NAME][-seedN]``, the row alone for seed 0 and no name."""
    return row + (f"-{name}" if name else "") + (f"-seed{seed}" if seed else "")


def _row_and_name(variant: str, seed: int) -> tuple[str, str]:
    """The row and the ``--variant`` name of a record named ``variant`` (``_variant``'s
    inverse), given the seed its overrides set."""
    row, _, name = variant.removesuffix(_variant("", seed)).partition("-")
    return row, name


def check_variant_name(name: str) -> str:
    if name and not VARIANT_NAME.fullmatch(name):
        raise SystemExit(f"--variant {name!r}: letters, digits, '_', '.' and inner '-' only")
    return name


def _done(tag: str, init: int | str, percent: float, name: str = "") -> dict[tuple[str, int, int], dict]:
    """The newest ablation record of each (row, fold, seed) at ``percent`` started at ``init`` (an
    iteration, or ``"end"`` as in ``gain.py``) among the rows called ``name`` (``--variant``;
    the usual rows for ``""``). Where the full-method row has none for seed 0, ``gain.py``'s
    newest Soft Teacher record of that fold with the same variant name counts for it when it
    ran with the overrides the ablation rows share (the same configuration), as the newest
    supervised record does for the supervised row."""
    gain_records = read_jsonl(ROOT / tag / "results.jsonl")
    at_init = started_at(gain_records, init)

    def started(r: dict) -> bool:
        return r["percent"] == percent and at_init(r)

    out, shared = {}, set()
    for r in read_jsonl(ROOT / tag / RESULTS):
        if started(r):
            seed = _seed(record_overrides(r))
            row, rows_name = _row_and_name(r["variant"], seed)
            if rows_name != name:
                continue
            out[(row, r["fold"], seed)] = r
            shared.add(tuple(_shared(r, row)))
    if len(shared) == 1:
        full = {r["fold"]: r for r in gain_records
                if r["method"] == "soft_teacher" and r.get("variant", "") == name and started(r)
                and tuple(record_overrides(r)) in shared}
        for fold, r in full.items():
            out.setdefault(("box_jitter", fold, 0), {**r, "variant": "box_jitter", "from_gain": True})
    return out


def run(args) -> None:
    if any(o.startswith(SEED) for o in args.set):
        raise SystemExit(f"give the seeds with --seeds, not --set {SEED}N")
    tag = args.tag or args.preset
    name = check_variant_name(getattr(args, "variant", ""))
    folds = [args.fold] if args.fold else list(range(1, args.folds + 1))
    for fold in folds:
        start = start_checkpoint(ROOT / tag, args.percent, fold, args.init_from_supervised)
        if args.init_from_supervised and not start.is_file():
            raise SystemExit(f"{start.parent}: no checkpoint at iteration {args.init_from_supervised}; "
                             f"run gain.py's supervised row of fold {fold} first")
    # a gain.py record stands for the full-method row only if it ran with this run's overrides;
    # a record from another start than the checkpoint there now does not count as done
    done = {k: r for k, r in _done(tag, args.init_from_supervised, args.percent, name).items()
            if (not r.get("from_gain") or record_overrides(r) == list(args.set)) and not stale(r, ROOT / tag)}
    iters = args.iters or load_config(args.preset, overrides=args.set).solver.max_iter
    rows = args.rows or list(ROWS)
    for fold in folds:
        for seed in args.seeds:
            for row in rows:
                r = done.get((row, fold, seed))
                if r and r.get("iters") == iters and _shared(r, row) == list(args.set):
                    continue
                seeded = [f"{SEED}{seed}"] if seed else []
                ns = argparse.Namespace(**{**vars(args), "method": "soft_teacher", "fold": fold,
                                           "variant": _variant(row, seed, name), "results": RESULTS,
                                           "set": [*args.set, *seeded, *ROWS[row]]})
                gain_run(ns)


def report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tag = args.tag or args.preset
    tags = [tag, *getattr(args, "more_starts", [])]
    name = check_variant_name(getattr(args, "variant", ""))
    sup_name = check_variant_name(getattr(args, "supervised_variant", ""))
    pct = args.percent
    # runs by (tag, row, fold, seed); each result folder holds one supervised start per fold
    done: dict[tuple[str, str, int, int], dict] = {}
    sup: dict[tuple[str, int], dict] = {}
    for t in tags:
        gain_records = read_jsonl(ROOT / t / "results.jsonl")
        own = {k: r for k, r in _done(t, args.init_from_supervised, pct, name).items()
               if not args.fold or k[1] == args.fold}
        own_sup = {f: r for (m, p, f), r in _latest(gain_records, args.init_from_supervised, sup_name).items()
                   if m == "supervised" and p == pct and (not args.fold or f == args.fold)}
        named = {f for f, r in own_sup.items() if r.get("variant", "") == sup_name}
        if sup_name and (missing := sorted({fold for _, fold, _ in own} - named)):
            raise SystemExit(f"{ROOT / t / 'results.jsonl'}: no supervised run of variant {sup_name} at "
                             f"{pct:g} % for fold {', '.join(map(str, missing))} from this start")
        check_one_start([*own.values(), *own_sup.values()], gain_records, ROOT / t / RESULTS)
        done |= {(t, *k): r for k, r in own.items()}
        sup |= {(t, f): r for f, r in own_sup.items()}
    where = ", ".join(str(ROOT / t / RESULTS) for t in tags)
    if not done:
        raise SystemExit(f"no ablation results at {pct:g} %" + (f" of variant {name}" if name else "")
                         + f" in {where}")
    check_one_evaluation([*done.values(), *sup.values()], where)

    def last(r: dict) -> float | None:
        """The AP of the run's reported model at its last evaluation."""
        ap = r.get("final", {}).get(f"{r.get('reported', 'teacher')}/bbox_AP")
        return None if ap is None else ap * 100

    def seeded(row: str, value=lambda r: r["best_AP"] * 100) -> dict[int, dict[str, dict[int, float]]]:
        """AP of each of the row's runs (the best by default), by fold, start (result folder)
        and seed."""
        out: dict[int, dict[str, dict[int, float]]] = {}
        for (t, v, fold, seed), r in sorted(done.items()):
            if v == row:
                out.setdefault(fold, {}).setdefault(t, {})[seed] = value(r)
        return out

    def runs(row: str, value=lambda r: r["best_AP"] * 100) -> dict[int, dict[str, list[float]]]:
        """The same, a start's seeds as a list."""
        return {f: {t: list(by_seed.values()) for t, by_seed in by_start.items()}
                for f, by_start in seeded(row, value).items()}

    def fmt(v: list[float]) -> str:
        if not v:
            return "-"
        spread = f" ({', '.join(f'{x:.1f}' for x in v)})" if len(v) > 1 else ""
        return f"{statistics.fmean(v):.1f}{spread}"

    def largest_range(groups: list[list[float]]) -> str:
        ranges = [max(v) - min(v) for v in groups if len(v) > 1]
        return f"{max(ranges):.1f}" if ranges else "-"

    def summary(by_fold: dict[int, dict[str, list[float]]]) -> tuple[dict, list[float], str]:
        """A row's value per fold and start (a start's is the mean of its seeds'), per fold (the
        mean of its starts') and its table cells after the AP: folds, starts and runs counted,
        then the largest range between one fold's starts and between one start's seeds."""
        starts = {f: {t: statistics.fmean(x) for t, x in by_start.items()}
                  for f, by_start in sorted(by_fold.items())}
        v = [statistics.fmean(s.values()) for s in starts.values()]
        seeds = [x for by_start in by_fold.values() for x in by_start.values()]
        cells = (f"{len(v)} | {sum(map(len, starts.values()))} | {sum(map(len, seeds))} | {fmt(v)} "
                 f"| {{last}} | {{change}} | {largest_range([list(s.values()) for s in starts.values()])} "
                 f"| {largest_range(seeds)}")
        return starts, v, cells

    def last_cell(by_fold: dict[int, dict[str, list[float | None]]]) -> str:
        """The last evaluations' means, or "-" where a run's record does not give its last."""
        every = [x for by_start in by_fold.values() for xs in by_start.values() for x in xs]
        return fmt(summary(by_fold)[1]) if every and None not in every else "-"

    def paired(row: dict[int, float], above: dict[int, float]) -> float:
        """One start's change: over the seeds both rows ran (a seed moves a row as much as a
        step does), else between the means of their seeds."""
        common = row.keys() & above.keys()
        if common:
            return statistics.fmean(row[s] - above[s] for s in common)
        return statistics.fmean(row.values()) - statistics.fmean(above.values())

    def change(row: dict, above: dict) -> str:
        """The row's change from the one above over the starts both have: per fold the mean of
        its starts' changes, then the mean of the folds'."""
        per_fold = [statistics.fmean(paired(row[f][t], above[f][t]) for t in common)
                    for f in row.keys() & above.keys() if (common := row[f].keys() & above[f].keys())]
        return f"{round(statistics.fmean(per_fold), 1) + 0.0:+.1f}" if per_fold else ""  # no -0.0

    students = [row for row in ROWS if runs(row) and "method.report=student" in ROWS[row]]
    reported = "teacher" + (f", student for {', '.join(students)}" if students else "")
    lines = [f"| row ({pct:g} % labels) | folds | starts | runs | AP (best; {reported}; mean of the "
             "folds' means) | AP at the last evaluation (the same means) "
             "| change from the row above (same starts, same seeds where both ran them) | start spread "
             "| seed spread |",
             "|---|---|---|---|---|---|---|---|---|"]
    sup_v: list[float] = []
    if sup:
        sup_by_fold: dict[int, dict[str, list[float]]] = {}
        sup_last: dict[int, dict[str, list[float | None]]] = {}
        for (t, f), r in sorted(sup.items()):
            sup_by_fold.setdefault(f, {})[t] = [r["best_AP"] * 100]
            sup_last.setdefault(f, {})[t] = [last({**r, "reported": "student"})]
        _, sup_v, cells = summary(sup_by_fold)
        lines.append(f"| supervised (student{', ' + sup_name if sup_name else ''}) | "
                     f"{cells.format(last=last_cell(sup_last), change='')} |")
    prev: dict | None = None
    bars = []
    for row in ROWS:
        by_fold = runs(row)
        if not by_fold:
            continue
        step = row in STEPS
        starts, v, cells = summary(by_fold)
        cells = cells.format(last=last_cell(runs(row, last)),
                             change=change(seeded(row), prev) if step and prev else "")
        lines.append(f"| {row} | {cells} |")
        if step:
            prev = seeded(row)
        bars.append((row, v, [x for by_start in by_fold.values() for xs in by_start.values() for x in xs]))
    lines += _mixed_notes(done, sup, args.init_from_supervised, len(tags) > 1)
    if args.details:
        lines += ["", "| run | best AP (iter) | final teacher / student | pseudo P / R | s/iter | commit |",
                  "|---|---|---|---|---|---|"]
        for (t, row, fold, seed), r in sorted(done.items()):
            fin = r["final"]
            pr = (f"{r['pseudo_precision_last20pct']:.2f} / {r['pseudo_recall_last20pct']:.2f}"
                  if r.get("pseudo_precision_last20pct") is not None else "-")
            src = " (gain.py)" if r.get("from_gain") else ""
            label = _run_label(t, row, fold, seed, len(tags) > 1) + src
            lines.append(f"| {label} | {r['best_AP'] * 100:.1f} ({r['best_iteration']}) | "
                         f"{fin.get('teacher/bbox_AP', float('nan')) * 100:.1f} / "
                         f"{fin.get('student/bbox_AP', float('nan')) * 100:.1f} | {pr} | "
                         f"{r['s_per_iter_median']:.2f} | {r['commit']} |")
    curve_runs = None  # with --curves: every run's key and record, the supervised runs first
    if getattr(args, "curves", False):
        several = len(tags) > 1
        curve_runs = ([((t, "supervised", f, 0), {**r, "reported": "student"})
                       for (t, f), r in sorted(sup.items())]
                      + sorted(done.items(), key=lambda kr: (kr[0][0], list(ROWS).index(kr[0][1]),
                                                            *kr[0][2:])))
        lines += ["", *curve_table(curve_runs, several)]
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (row, v, every) in enumerate(bars):
        ax.bar(i, statistics.fmean(v), color="tab:blue" if row in STEPS else "tab:cyan")
        ax.scatter([i] * len(every), every, color="k", s=8)
    if sup_v:
        ax.axhline(statistics.fmean(sup_v), color="tab:gray", linestyle="--",
                   label="supervised" + (f" ({sup_name})" if sup_name else ""))
        ax.legend()
    ax.set_xticks(range(len(bars)), [r.replace("indicator_", "ind. ") for r, *_ in bars], rotation=30,
                  ha="right")
    ax.set_ylabel("val mAP@[.5:.95], best")
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"shapes, ablation at {pct:g} % labels ({' + '.join(tags)})"
                 + (f", variant {name}" if name else ""))
    fig.tight_layout()
    png = Path(args.png or ROOT / tag / f"ablation{'_' + name if name else ''}.png")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    curves_png = png.with_name(png.stem + "_curves.png") if curve_runs is not None else None
    if curves_png:
        plot_curves(curve_runs, curves_png, ax.get_title(), several)
    print("\n".join(lines))
    print(f"\nplot: {png}" + (f", curves: {curves_png}" if curves_png else ""))


def _mixed_notes(done: dict, sup: dict, init: int | str, several_tags: bool) -> list[str]:
    """Lines under the table where its records do not compare alike (rows of other schedules,
    ``iters``, or other shared overrides than the rest), and where a fold's supervised row is
    the run from scratch the rows start from."""
    notes, mixed = [], []
    by_iters: dict[int, list[str]] = {}
    by_shared: dict[tuple, list[str]] = {}
    order = list(ROWS)
    for (t, row, fold, seed), r in sorted(done.items(), key=lambda kr: (kr[0][0], order.index(kr[0][1]),
                                                                       *kr[0][2:])):
        label = _run_label(t, row, fold, seed, several_tags)
        by_iters.setdefault(r.get("iters"), []).append(label)
        by_shared.setdefault(tuple(_shared(r, row)), []).append(label)
    for (t, fold), r in sorted(sup.items()):
        if init and is_start_run(r):
            notes.append(f"Supervised fold {fold}{f' [{t}]' if several_tags else ''}: the run from "
                         f"scratch the rows start from ({r['iters']} iterations); no supervised run "
                         f"continued from it is recorded.")
        else:
            by_iters.setdefault(r.get("iters"), []).append(_run_label(t, "supervised", fold, 0, several_tags))
    if len(by_iters) > 1:
        mixed.append("Schedules differ: " + "; ".join(f"{n} iterations: {', '.join(labels)}"
                                                      for n, labels in sorted(by_iters.items())) + ".")
    if len(by_shared) > 1:
        mixed.append("Settings differ: " + "; ".join(f"{' '.join(o) or 'no --set'}: {', '.join(labels)}"
                                                     for o, labels in sorted(by_shared.items())) + ".")
    lines = [f"- **Not alike.** {n}" for n in mixed] + [f"- Note: {n}" for n in notes]
    return ["", *lines] if lines else []


def _run_label(tag: str, row: str, fold: int | None, seed: int, several_tags: bool) -> str:
    """A run's name in a report: its row, fold (unless None), seed and, where the report reads
    several result folders, its folder."""
    return (row + (f" fold {fold}" if fold is not None else "") + (f" seed {seed}" if seed else "")
            + (f" [{tag}]" if several_tags else ""))


RunKey = tuple[str, str, int, int]  # result folder, row, fold, seed


def curve_table(runs: list[tuple[RunKey, dict]], several_tags: bool = False) -> list[str]:
    """A markdown table of runs' evaluations, one line per (key, record): teacher / student AP
    (x100) at every iteration any run evaluated at ("-" where a run has no evaluation there or a
    model no AP), from the ``curve`` each record keeps."""
    iters = sorted({int(p[0]) for _, r in runs for p in r.get("curve") or []})
    if not iters:
        return ["(no run's record keeps its evaluations)"]

    def ap(v: float | None) -> str:
        return "-" if v is None else f"{v * 100:.1f}"

    lines = ["| run (teacher / student AP at each evaluation) | " + " | ".join(map(str, iters)) + " |",
             "|---|" + "---|" * len(iters)]
    for key, r in runs:
        at = {int(p[0]): f"{ap(p[1])} / {ap(p[2])}" for p in r.get("curve") or []}
        cells = " | ".join(at.get(i, "-") for i in iters)
        lines.append(f"| {_run_label(*key, several_tags)} | {cells} |")
    return lines


def plot_curves(runs: list[tuple[RunKey, dict]], png: Path, title: str, several_tags: bool = False) -> None:
    """Each run's reported model's AP at every evaluation, one panel per fold, the supervised
    runs (row ``supervised``) dashed."""
    import matplotlib.pyplot as plt

    def name(key: RunKey) -> str:
        t, row, _, seed = key
        return _run_label(t, row, None, seed, several_tags)

    folds = sorted({key[2] for key, _ in runs})
    # one colour per row in every panel; gray stays the supervised runs'
    names = list(dict.fromkeys(name(key) for key, _ in runs if key[1] != "supervised"))
    palette = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7]
    palette += [c for i, c in enumerate(plt.get_cmap("tab20").colors) if i % 2 and i not in (14, 15)]
    fig, axes = plt.subplots(1, len(folds), figsize=(6 * len(folds), 4.5), squeeze=False, sharey=True)
    for ax, fold in zip(axes[0], folds):
        ax.set_title(f"fold {fold}")
        for key, r in runs:
            if key[2] != fold:
                continue
            which = r.get("reported", "teacher")
            idx = 1 if which == "teacher" else 2  # curve rows: (iteration, teacher AP, student AP)
            pts = [(p[0], p[idx] * 100) for p in r.get("curve") or [] if p[idx] is not None]
            if pts:
                sup = key[1] == "supervised"
                ax.plot(*zip(*pts), marker=".", linestyle="--" if sup else "-",
                        color="tab:gray" if sup else palette[names.index(name(key)) % len(palette)],
                        label=f"{name(key)} ({which})")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel("val mAP@[.5:.95]")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "report"):
        q = sub.add_parser(name)
        add_arguments(q, training=name == "run")
        q.add_argument("--percent", type=float, default=10.0)
        q.add_argument("--fold", type=int, default=0, help="only this fold")
        q.add_argument("--variant", default="", help="rows run with overrides of their own, kept "
                       "apart from the usual ones under this name (see above)")
        if name == "report":
            q.add_argument("--details", action="store_true", help="one line per run as well")
            q.add_argument("--curves", action="store_true",
                           help="each run's teacher and student AP at every evaluation as well")
            q.add_argument("--supervised-variant", default="", metavar="NAME",
                           help="the supervised row from gain.py's supervised runs of this "
                                "--variant name (a longer schedule) instead of the usual one")
            q.add_argument("--more-starts", nargs="+", default=[], metavar="TAG",
                           help="result folders holding the same rows from other supervised "
                                "starts of the same splits (the supervised row trained again, "
                                "another machine): each fold's value averages its starts")
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
