"""Seconds that ``softteacher eval`` and ``predict`` take on the embedded ``shapes`` val set with
the images read in the command's own process (``--workers 0``) and in loader processes
(``--workers 1``), alternating, and ``predict`` with and without its pictures:

    python benchmarks/read_ahead.py CHECKPOINT --images 200 --repeats 2 [--workers 0 1] [--threads N]

One JSON line per command (what it ran, its wall seconds, the commit); at the end whether the
results of every variant are the same file. Each command is its own process, as a user runs it.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from softteacher.data import shapes


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--images", type=int, default=200, help="the first N val images")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the commands (0: unset)")
    args = p.parse_args()
    data = shapes.generate_shapes(shapes.default_root())  # made once, then found
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    commit = _commit()
    with tempfile.TemporaryDirectory() as tmp:
        val = json.loads(Path(data.val_json).read_text())
        val["images"] = val["images"][:args.images]
        ids = {im["id"] for im in val["images"]}
        val["annotations"] = [a for a in val["annotations"] if a["image_id"] in ids]
        val_json = Path(tmp) / "val.json"
        val_json.write_text(json.dumps(val))
        files = [str(Path(data.val_images) / im["file_name"]) for im in val["images"]]
        outs: dict[str, list[Path]] = {}
        for repeat in range(args.repeats):
            for w in args.workers:
                runs = {f"eval --workers {w}": ["eval", args.checkpoint, "--data", str(val_json),
                                                "--images", data.val_images]}
                for pictures in ([], ["--no-pictures"]):
                    runs[" ".join(["predict", "--workers", str(w), *pictures])] = [
                        "predict", args.checkpoint, *files, *pictures]
                for name, command in runs.items():
                    out = Path(tmp) / f"{repeat}{name.replace(' ', '_')}"
                    t = time.perf_counter()
                    subprocess.run([sys.executable, "-m", "softteacher", *command, "--workers", str(w),
                                    "--no-progress", "--out", str(out)], check=True, env=env,
                                   stdout=subprocess.DEVNULL)
                    seconds = time.perf_counter() - t
                    outs.setdefault(name.split()[0], []).append(out / "results.json")
                    print(json.dumps({"command": name, "images": len(files),
                                      "seconds": round(seconds, 2), "threads": args.threads or None,
                                      "commit": commit}), flush=True)
        for command, files in outs.items():
            same = all(filecmp.cmp(files[0], f, shallow=False) for f in files[1:])
            print(json.dumps({"command": command, "results_identical": same}))


if __name__ == "__main__":
    main()
