"""Process groups under ``torchrun``: rank, world size, gathering, rank-0-only logging.

``torchrun --nproc_per_node=N -m softteacher train ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; one process per device. NCCL on GPUs, gloo on CPU. Without those variables
everything here is the single-process identity.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# a file the processes of ``launch`` append a JSON line to when the command fails: its
# rank, exit status and error
EXIT_FILE_ENV = "SOFTTEACHER_EXIT_FILE"


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_info() -> DistInfo:
    """Rank and world size from torchrun's environment (single process without it)."""
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def init(device_type: str) -> DistInfo:
    """Join the process group torchrun described (once); return this process's place in it."""
    info = env_info()
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            count = torch.cuda.device_count()
            if info.local_rank >= count:
                raise ValueError(f"process {info.local_rank} of this node has no GPU of its own: "
                                 f"{count} visible; start at most {count} processes per node")
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    if info.enabled:
        install_rank_filter(info.rank)
    return info


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather_objects(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank ``dst``, None on the others (``[obj]`` without
    a process group): what one rank writes need not be held by all."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Make every floating-point buffer of ``module`` rank ``src``'s: one collective per dtype."""
    if not dist.is_initialized():
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in module.buffers():
        if b.is_floating_point():
            by_dtype.setdefault(b.dtype, []).append(b)
    for bufs in by_dtype.values():
        flat = torch._utils._flatten_dense_tensors(bufs)
        dist.broadcast(flat, src)
        for b, v in zip(bufs, torch._utils._unflatten_dense_tensors(flat, bufs)):
            b.copy_(v)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_true(flag: bool | torch.Tensor, device: torch.device) -> bool:
    """True when ``flag`` holds on every rank (so all ranks skip or take a step together).

    ``flag`` may be a one-element bool tensor on ``device``: it is reduced where it lies, and
    the answer is the one host sync of the call."""
    if isinstance(flag, torch.Tensor):
        t = flag.reshape(1).to(device=device, dtype=torch.int32)
    elif not dist.is_initialized():
        return flag
    else:
        t = torch.tensor([1 if flag else 0], device=device, dtype=torch.int32)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


class RankFilter(logging.Filter):
    """Lets errors through on every rank (named by it), everything else only on rank 0.

    Every rank reads the same settings, annotations and checkpoints, so their warnings are
    rank 0's: said once, not once per process. What one rank alone meets (an image it cannot
    read) stops it with an error.
    """

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if self.rank == 0:
            return True
        if record.levelno >= logging.ERROR:
            if not str(record.msg).startswith("[rank "):
                record.msg = f"[rank {self.rank}] {record.msg}"
            return True
        return False


def install_rank_filter(rank: int) -> None:
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RankFilter) for f in handler.filters):
            handler.addFilter(RankFilter(rank))


def launch(argv: list[str], devices: int) -> int:
    """Re-run ``softteacher <argv>`` under torchrun with ``devices`` processes on this node.

    Returns the exit status of the lowest rank that failed with one of the command's own
    statuses (2 bad data or settings, 3 training stopped, ...), as a single process would have
    returned, rather than the 1 of the processes that stopped with it; else torchrun's (1 for
    any failure). The processes' errors are said here, once each, after they all stopped: an
    error that every process met alike is one line, as a single process would have said it.
    """
    cmd = [sys.executable, "-c", "import sys; from softteacher.distributed import torchrun_main; "
           "sys.exit(torchrun_main(sys.argv[1:]))", "--standalone", f"--nproc_per_node={devices}",
           "-m", "softteacher", *argv]
    # torchrun's own default for several processes, set here so that it need not print that it did
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    with tempfile.TemporaryDirectory(prefix="softteacher-launch-") as tmp:
        report = Path(tmp) / "exit_codes"
        proc = subprocess.Popen(cmd, env={**env, EXIT_FILE_ENV: str(report)})
        code = _wait(proc)
        if code < 0:  # torchrun itself ended by a signal: the shell's status for it (SIGKILL: 137)
            code = 128 - code
        if not code or not report.is_file():
            return code
        reports = sorted(_read_report(report), key=lambda r: r["rank"])
    own = [r for r in reports if r["status"] != 1]  # 1: stopped as another process did
    said_why = sum(not r["signal"] for r in reports)  # the others were ended by a signal
    for line in _error_lines(own or reports, said_why):
        print(line, file=sys.stderr)
    return own[0]["status"] if own else code


def _read_report(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("rank"), int) and isinstance(
                entry.get("status"), int):
            errors = entry.get("errors")
            out.append({"rank": entry["rank"], "status": entry["status"],
                        "errors": [str(e) for e in errors] if isinstance(errors, list) else [],
                        "signal": str(entry.get("signal") or "")})
    return out


def _error_lines(reports: list[dict], processes: int) -> list[str]:
    """Each distinct error of ``reports`` once (``error: ...``), named by its ranks unless all
    ``processes`` that said why they stopped said it."""
    said: dict[str, list[int]] = {}
    for r in reports:
        for text in r["errors"]:
            said.setdefault(text, []).append(r["rank"])
    if all(len(ranks) == processes for ranks in said.values()):
        return list(said)
    lines = []
    for text, ranks in said.items():
        who = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"
        kind, _, rest = text.partition(": ")
        lines.append(f"{kind}: [{who}] {rest}")
    return lines


def torchrun_main(args: list[str]) -> int:
    """torchrun for ``launch``: its processes say their own errors (``launch`` says them once),
    so torchrun's summary of a failure and traceback are left out. A process ended by a signal,
    which could say nothing, is reported as one that stopped with another (status 1), so that
    ``launch`` names it where no process said why it stopped: torchrun ends the others of a
    failed process by SIGTERM too."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(parse_args(args))
    except SignalException as e:  # Ctrl-C or a kill: torchrun passed it on to its processes,
        return 128 + int(e.sigval)  # which said what they kept; the status a shell gives it
    except ChildFailedError as e:
        ended = []
        for rank, failure in sorted(e.failures.items()):
            if failure.exitcode < 0:
                signal = failure.signal_name()
                text = f"error: ended by signal {signal}{' (out of memory?)' if signal == 'SIGKILL' else ''}"
                ended.append({"rank": rank, "status": 1, "errors": [text], "signal": signal})
        report = os.environ.get(EXIT_FILE_ENV)
        if report:
            try:
                with open(report, "a", encoding="utf-8") as f:
                    f.writelines(json.dumps(entry) + "\n" for entry in ended)
                return 1
            except OSError:
                pass
        for entry in ended:
            tagged = entry["errors"][0].replace("error: ", f"error: [rank {entry['rank']}] ", 1)
            print(tagged, file=sys.stderr)
        return 1
    return 0


def _wait(proc: subprocess.Popen) -> int:
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # torchrun had the terminal's Ctrl-C too and stops its workers (which run in sessions of
        # their own): wait for that rather than kill it and leave them running
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait()
        raise
