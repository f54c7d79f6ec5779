"""Speed and memory of a CPU training loop under glibc malloc settings and oneDNN cache sizes.

    python benchmarks/malloc_loop.py --modes keep system caches64 --iters 200 \
        --set model.norm=frozen_bn --set solver.amp=bf16

Each mode runs ``softteacher train --preset shapes-cpu`` (Soft Teacher) on the embedded data's
train and unlabeled sets, without a val set (no evaluation), in a process of its own.
``benchmarks/speed.py`` times fixed batches, which reuse the same block sizes every step; a
training loop's batches change size, and whether freed blocks are kept, trimmed or unmapped
shows only there, in the time per iteration and in the resident set. Writes one JSON line per
run: the maximum resident set (the kernel's count for the process), the resident set sampled
every second, and the median of the logged ``time/step_s`` after ``--skip`` iterations.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import commit, software

from softteacher import cpu_ops
from softteacher.data import shapes

MIB = 2**20
#: mode -> environment. ``keep`` is training's own (``cpu_ops.keep_freed_memory``, and oneDNN's
#: caches at ``cpu_ops.bound_operator_caches``'s 256 entries); the others set glibc's variables,
#: which ``keep_freed_memory`` then leaves alone, or the caches' sizes. ``system`` names a tunable at
#: its default value: glibc's own behaviour, its thresholds moving with the blocks freed; a
#: ``MALLOC_*_`` variable fixes them instead (``fixed128k``: both at glibc's initial 128 KiB)
MODES: dict[str, dict[str, str]] = {
    "keep": {},
    "system": {"GLIBC_TUNABLES": "glibc.malloc.perturb=0"},
    "fixed128k": {"MALLOC_TRIM_THRESHOLD_": str(128 * 1024)},
    # blocks above 4 MiB mapped fresh, smaller ones from the heap, kept
    "mmap4": {"MALLOC_MMAP_THRESHOLD_": str(4 * MIB), "MALLOC_TRIM_THRESHOLD_": str(2**62)},
    # training's own malloc; torch's oneDNN (ideep) and oneDNN's own caches of operators compiled
    # for each shape keep N entries each (oneDNN's default: 1,024)
    **{f"caches{n}": {name: str(n) for name in cpu_ops.OPERATOR_CACHES} for n in (64, 256, 1024)},
}
#: mode -> seconds between ``malloc_trim(0)`` calls from a thread of the training process, which
#: hand the free pages inside the heap back too (training's own setting otherwise)
RELEASE = {"release10s": 10.0}
MODES.update({name: {} for name in RELEASE})

#: runs ``softteacher`` with a thread that calls ``malloc_trim(0)`` every argv[1] seconds
RELEASING = """
import ctypes, runpy, sys, threading
libc, period = ctypes.CDLL("libc.so.6"), float(sys.argv.pop(1))
def release():
    while not threading.Event().wait(period):
        libc.malloc_trim(0)
threading.Thread(target=release, daemon=True).start()
sys.argv[0] = "softteacher"
runpy.run_module("softteacher", run_name="__main__")
"""


def rss_sampler(pid: int, samples: list[tuple[float, int]], stop: threading.Event) -> None:
    """Append (seconds, resident MiB) of ``pid`` every second until ``stop``."""
    t0 = time.perf_counter()
    while not stop.wait(1.0):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    samples.append((round(time.perf_counter() - t0, 1), int(line.split()[1]) // 1024))
        except OSError:
            return


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", *cpu_ops.OPERATOR_CACHES)}
    env.update(MODES[mode])
    paths = shapes.generate_shapes(shapes.default_root())
    with tempfile.TemporaryDirectory(prefix="malloc-loop-") as out:
        start = [sys.executable, "-c", RELEASING, str(RELEASE[mode])] if mode in RELEASE else [
            sys.executable, "-m", "softteacher"]
        cmd = start + [
            "train", "--preset", "shapes-cpu", "--no-progress", "--out", out,
            "--train", paths.train_json, "--train-images", paths.train_images,
            "--unlabeled", paths.unlabeled_json, "--unlabeled-images", paths.unlabeled_images,
            "--set", f"solver.max_iter={args.iters}", "--set", "train.eval_period=0",
            "--set", "train.log_period=10", "--set", f"train.num_threads={args.threads}"]
        for item in args.set:
            cmd += ["--set", item]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        samples: list[tuple[float, int]] = []
        stop = threading.Event()
        sampler = threading.Thread(target=rss_sampler, args=(proc.pid, samples, stop), daemon=True)
        sampler.start()
        err = proc.stderr.read() if proc.stderr else ""
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        stop.set()
        sampler.join()
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{mode}: training failed ({proc.returncode}):\n{err[-3000:]}")
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["time/step_s"] for r in rows if "time/step_s" in r and r.get("iteration", 0) > args.skip]
    losses = [r["loss"] for r in rows if "loss" in r]
    return {"mode": mode, "env": MODES[mode], "iters": args.iters, "threads": args.threads, "set": args.set,
            "max_rss_mib": round(usage.ru_maxrss / 1024), "step_s_median": round(statistics.median(steps), 4),
            "step_s_range": [round(min(steps), 4), round(max(steps), 4)], "wall_s": round(wall, 1),
            "final_loss": round(losses[-1], 4) if losses else None, "rss_mib": samples,
            "commit": commit(), "software": software()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=["keep", "system", "caches64"])
    p.add_argument("--repeats", type=int, default=1, help="runs of each mode, the modes alternating")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--skip", type=int, default=50, help="iterations before the median's window")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", action="append", default=[], help="config override")
    p.add_argument("--out", default="", help="append the JSON lines to this file as well")
    args = p.parse_args()
    for _ in range(args.repeats):
        for mode in args.modes:
            row = run_mode(mode, args)
            line = json.dumps(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("rss_mib", "software")}), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
