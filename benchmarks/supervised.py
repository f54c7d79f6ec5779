"""Supervised baseline on the embedded ``shapes`` data with the CPU preset.

One run per call (so each run's peak memory is its own process's), then ``--report`` collects
the runs into a markdown table and a learning-curve PNG:

    python benchmarks/supervised.py run --percent 100 --iters 1000 --threads 1
    python benchmarks/supervised.py run --percent 10 --iters 1000 --threads 1
    python benchmarks/supervised.py report

Each run appends one JSON line to ``runs/bench/supervised/results.jsonl`` and prints it.
Resumable: a run whose output folder holds checkpoints continues from the newest.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from common import append_jsonl, command_line, commit

from softteacher.config import load_config
from softteacher.data import shapes
from softteacher.data.splits import write_split
from softteacher.engine import train

OUT = Path("runs/bench/supervised")


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    commit_id = commit()
    paths = shapes.generate_shapes(shapes.default_root())
    name = f"p{args.percent:g}-f{args.fold}"
    out = OUT / name
    cfg = load_config("shapes-cpu", overrides=args.set)
    cfg.method.enabled = False
    d = cfg.data
    d.train, d.train_images = paths.train_json, paths.train_images
    if args.percent < 100:
        d.train, _ = write_split(paths.train_json, percent=args.percent, fold=args.fold, seed=1,
                                 out_dir=str(OUT / "splits"))
    d.val, d.val_images = paths.val_json, paths.val_images
    s = cfg.solver
    s.max_iter = args.iters
    s.steps = (int(args.iters * 0.75), int(args.iters * 0.9))
    cfg.train.eval_period = cfg.train.checkpoint_period = max(args.iters // 4, 1)
    cfg.train.output_dir = str(out)
    t0 = time.perf_counter()
    result = train(cfg, resume="auto", progress=False)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["time/step_s"] for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    best = max(evals, key=lambda r: r.get("student/bbox_AP") or -1)
    record = {
        "percent": args.percent, "fold": args.fold, "iters": args.iters, "threads": args.threads,
        "final_AP": result.metrics.get("student/bbox_AP"),
        "final_AP50": result.metrics.get("student/bbox_AP50"),
        "best_AP": best.get("student/bbox_AP"), "best_iteration": best["iteration"],
        "s_per_iter_median": sorted(steps)[len(steps) // 2] if steps else None,
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "commit": commit_id, "command": command_line(),
        "curve": [(r["iteration"], r.get("student/bbox_AP")) for r in evals],
    }
    append_jsonl(OUT / "results.jsonl", record)
    print(json.dumps(record))
    return record


def report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(x) for x in (OUT / "results.jsonl").read_text().splitlines()]
    latest = {}
    for r in records:
        latest[(r["percent"], r["fold"])] = r
    lines = ["| labels | fold | iterations | best AP | (at iter) | final AP | final AP50 | s/iter "
             "| peak RSS MiB | commit |", "|---|---|---|---|---|---|---|---|---|---|"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for (pct, fold), r in sorted(latest.items(), reverse=True):
        lines.append(f"| {pct:g}% | {fold} | {r['iters']} | {r['best_AP']:.4f} | {r['best_iteration']} "
                     f"| {r['final_AP']:.4f} | {r['final_AP50']:.4f} | {r['s_per_iter_median']:.2f} "
                     f"| {r['peak_rss_mib']:.0f} | {r['commit']} |")
        xs, ys = zip(*r["curve"])
        ax.plot(xs, ys, marker="o", label=f"{pct:g}% labels (fold {fold})")
    ax.set_xlabel("iteration")
    ax.set_ylabel("val mAP@[.5:.95] (student)")
    ax.set_title("supervised baseline, shapes, CPU preset")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = Path(args.png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print("\n".join(lines))
    print(f"\nlearning curve: {png}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--percent", type=float, default=100.0)
    r.add_argument("--fold", type=int, default=1)
    r.add_argument("--iters", type=int, default=1000)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--set", action="append", default=[], help="config override")
    q = sub.add_parser("report")
    q.add_argument("--png", default="docs/img/supervised_curve.png")
    args = p.parse_args()
    run(args) if args.cmd == "run" else report(args)


if __name__ == "__main__":
    main()
