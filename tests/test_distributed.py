"""Two gloo processes on CPU under torchrun (a few iterations)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from softteacher.checkpoint import load_checkpoint
from softteacher.distributed import RankFilter
from softteacher.engine import inference, load_data, model_from_checkpoint, train


def _loose(cfg):
    m = cfg.method
    m.pseudo_threshold = m.cls_pseudo_threshold = m.rpn_pseudo_threshold = 0.0
    m.reg_pseudo_threshold = 1e9
    m.sample_ratio = (1, 1)
    m.ema_momentum = 0.5
    cfg.model.box_score_thresh = 0.0
    return cfg


@pytest.mark.slow
# BatchNorm: each rank's running statistics are its own images'; the teachers take rank 0's, and
# the students too before each evaluation, so every rank evaluates the student rank 0 saves
# three processes: a rank past 1 draws, seeds and resumes as ranks 0 and 1 do; to the bit where
# DDP keeps its first gradient buckets (train.exact_resume)
@pytest.mark.parametrize("norm, procs, exact", [("gn", 2, False), ("frozen_bn", 2, False), ("bn", 2, False),
                                                ("gn", 3, False), ("gn", 3, True)])
def test_processes_train_identical_teachers_and_resume_with_one(tiny_cfg, tmp_path, norm, procs, exact):
    cfg = _loose(tiny_cfg)
    cfg.model.norm = norm
    cfg.train.exact_resume = exact
    cfg.solver.max_iter = 3
    cfg.train.output_dir = str(tmp_path / "ddp")
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(yaml.safe_dump({k: v for k, v in yaml.safe_load(cfg.to_yaml()).items()}))
    worker = Path(__file__).with_name("ddp_worker.py")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
         str(worker), str(config_file), str(tmp_path), *(["split"] if norm == "gn" else [])],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, *others = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(procs)]
    for r1 in others:
        for which in ("teacher", "student"):
            for k, v in r0[which].items():
                assert torch.equal(v, r1[which][k]), (which, k)
    # the EMA moved the teacher away from the student (with m = 0.5 they cannot coincide)
    assert any(not torch.equal(v, r0["student"][k]) for k, v in r0["teacher"].items())
    # evaluation gathered every rank's images: every rank got the same metrics
    assert all(repr(r0["metrics"]) == repr(r1["metrics"]) for r1 in others)
    assert "teacher/bbox_AP" in r0["metrics"]
    # rank 0 holds the detections of every val image, as one process finds them; the others none
    assert all(r1["results"] == [] for r1 in others)
    cpu = torch.device("cpu")
    model, _, _, _ = model_from_checkpoint(tmp_path / "ddp" / "model_final.pt", "teacher", cpu)
    val = load_data(cfg).val
    alone = inference(model, val, cfg, cpu)

    assert {r["image_id"] for r in alone} == {r.image_id for r in val.records} and len(alone) > 0
    assert len(r0["results"]) == len(alone)
    unmatched = list(alone)
    for a in r0["results"]:  # each a detection of the one process (rounded as COCO results are)
        close = [b for b in unmatched
                 if (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
                 and a["bbox"] == pytest.approx(b["bbox"], abs=0.011)
                 and a["score"] == pytest.approx(b["score"], abs=2e-5)]
        assert close, a
        unmatched.remove(close[0])
    if norm == "gn":  # stopped at 2 and resumed by the same processes: each rank draws on as it would have
        for rank in range(procs):
            split = torch.load(tmp_path / f"rank{rank}-split.pt", weights_only=True)
            for which in ("teacher", "student"):
                for k, v in r0[which].items():
                    if procs == 2 or exact:  # a sum of two gradients is the same in either order
                        assert torch.equal(v, split[which][k]), (rank, which, k)
                    else:  # DDP's buckets, rebuilt at each start, set the order of a sum of three
                        torch.testing.assert_close(split[which][k], v, rtol=0, atol=1e-6)
        for rank in range(procs):
            refused = (tmp_path / f"rank{rank}-refused.txt").read_text()
            assert ".pt: rank 0 resumes from it, but another process cannot read it" in refused
        rngs = load_checkpoint(tmp_path / "ddp" / "model_final.pt")["rng_per_rank"]
        assert len(rngs) == procs
        assert all(not torch.equal(rngs[a]["torch"], rngs[b]["torch"])
                   for a in range(procs) for b in range(a))
    # only rank 0 wrote; the checkpoint resumes in one process
    state = load_checkpoint(tmp_path / "ddp" / "model_final.pt")
    assert state["iteration"] == 3 and state["sampler_consumed_batches"] == 3 * procs
    assert [p.name for p in (tmp_path / "ddp").glob("metrics.jsonl")] == ["metrics.jsonl"]
    cfg.solver.max_iter = 4
    result = train(cfg, resume="auto", progress=False)
    assert result.iteration == 4
    assert load_checkpoint(tmp_path / "ddp" / "model_final.pt")["sampler_consumed_batches"] == 3 * procs + 1


def test_sync_bn_is_refused_on_a_cpu_and_idle_without_batchnorm(tiny_cfg, caplog):
    from softteacher.engine import _check_sync_bn

    cfg = tiny_cfg
    cfg.model.sync_bn, cfg.model.norm = True, "bn"
    with pytest.raises(ValueError, match="model.sync_bn needs CUDA devices"):
        train(cfg, progress=False)
    cfg.model.norm = "gn"
    with caplog.at_level("WARNING", logger="softteacher"):
        _check_sync_bn(cfg, torch.device("cuda", 0))
    assert "model.sync_bn applies to model.norm=bn; the model has gn" in caplog.text


def test_a_process_without_a_gpu_of_its_own_is_refused(monkeypatch):
    from softteacher import distributed

    for key, value in (("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "3")):
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="process 3 of this node has no GPU of its own: 2 visible; "
                                         "start at most 2 processes per node"):
        distributed.init("cuda")


def test_rank_filter_says_warnings_once_and_errors_of_every_rank():
    import logging

    info = logging.LogRecord("x", logging.INFO, "f", 1, "hello", None, None)
    warn = logging.LogRecord("x", logging.WARNING, "f", 1, "careful", None, None)
    error = logging.LogRecord("x", logging.ERROR, "f", 1, "broken", None, None)
    assert RankFilter(0).filter(info) and RankFilter(0).filter(warn)
    assert not RankFilter(1).filter(info) and not RankFilter(1).filter(warn)
    assert warn.msg == "careful"
    assert RankFilter(1).filter(error) and error.msg == "[rank 1] broken"
    assert RankFilter(1).filter(error) and error.msg == "[rank 1] broken"  # a second handler's filter


def test_devices_shortcut_relaunches_without_the_flag(monkeypatch):
    from softteacher import cli, distributed

    seen = {}
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(distributed, "launch", lambda argv, n: seen.update(argv=argv, n=n) or 0)
    assert cli.main(["train", "--shapes", "--devices", "2", "--preset", "tiny", "--devices=3"]) == 0
    assert seen == {"argv": ["train", "--shapes", "--preset", "tiny"], "n": 3}  # the last flag wins


def test_ctrl_c_during_devices_waits_for_torchrun_then_says_so(monkeypatch, capsys):
    """The launcher does not kill torchrun at once (its workers would run on without it): it
    waits for torchrun to stop them, then ends in one line with status 130."""
    from softteacher import cli

    calls = []

    class Torchrun:
        def __init__(self, cmd, env=None):
            calls.append(("start", cmd[1:4]))

        def wait(self, timeout=None):
            calls.append(("wait", timeout))
            if len(calls) == 2:
                raise KeyboardInterrupt  # the terminal's Ctrl-C, while torchrun runs
            return -2

        def terminate(self):
            calls.append(("terminate", None))

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(subprocess, "Popen", Torchrun)
    assert cli.main(["train", "--shapes", "--devices", "2", "--preset", "tiny"]) == 130
    assert calls[0][0] == "start" and "torchrun_main" in calls[0][1][1]
    assert calls[1:] == [("wait", None), ("wait", 60)]
    assert capsys.readouterr().err.count("interrupted: softteacher train stopped") == 1


def test_torchrun_ended_by_a_signal_gives_the_shell_s_status(monkeypatch):
    """torchrun's agent meets Ctrl-C (or a kill) as a SignalException: 128 + the signal, no
    traceback; torchrun itself killed (the OOM killer) gives 137, not a negative status."""
    import signal

    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from softteacher import distributed

    def interrupted(args):
        raise SignalException("Process 1 got signal: 2", signal.SIGINT)

    monkeypatch.setattr(torchrun, "run", interrupted)
    assert distributed.torchrun_main(["--standalone", "--nproc_per_node=2", "-m", "softteacher"]) == 130

    class Killed:
        def __init__(self, cmd, env=None):
            pass

        def wait(self, timeout=None):
            return -9

    monkeypatch.setattr(subprocess, "Popen", Killed)
    assert distributed.launch(["train"], 2) == 137


def test_devices_returns_the_commands_own_exit_status(tmp_path, capfd):
    """torchrun ends with 1 whatever stopped its processes; ``--devices`` ends as one process
    would: 2 for bad data, here a training json that is not there, which both ranks meet and
    which is said once, without torchrun's summary."""
    from softteacher import cli

    missing = tmp_path / "missing.json"
    code = cli.main(["train", "--devices", "2", "--train", str(missing), "--preset", "tiny",
                     "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 2
    err = capfd.readouterr().err
    assert err.count(f"error: {missing}: no such file") == 1 and "[rank" not in err
    assert "ChildFailedError" not in err and "OMP_NUM_THREADS" not in err


def test_devices_refuses_bad_settings_before_starting_processes(monkeypatch, capsys):
    from softteacher import cli, distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(distributed, "launch", lambda argv, n: pytest.fail("launched"))
    assert cli.main(["train", "--shapes", "--devices", "2", "--preset", "tiny", "--set", "solver.lr=-1"]) == 2
    assert "solver.lr must be at least 0" in capsys.readouterr().err
    for n in ("0", "-2"):  # no process at all is no run of one process
        assert cli.main(["train", "--shapes", "--devices", n, "--preset", "tiny"]) == 2
        assert capsys.readouterr().err == (f"error: --devices {n}: expected at least 1 (processes on "
                                           f"this node)\n")
    assert cli.main(["train", "--shapes", "--devices", "2", "--preset", "tiny", "--set", "model.sync_bn=true",
                     "--set", "train.device=cpu"]) == 2
    assert capsys.readouterr().err == ("error: model.sync_bn needs CUDA devices (SyncBatchNorm does not run "
                                       "on cpu); set model.sync_bn=false\n")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cli.main(["train", "--shapes", "--devices", "3", "--preset", "tiny",
                     "--set", "train.device=cuda"]) == 2
    assert capsys.readouterr().err == "error: --devices 3: 2 GPU(s) visible, one needed per process\n"


def _report(rank: int, status: int, *errors: str) -> str:
    return json.dumps({"rank": rank, "status": status, "errors": list(errors)}) + "\n"


def test_launch_reports_the_lowest_failed_rank_and_each_error_once(monkeypatch, capsys):
    from softteacher import distributed

    lost = "error: stopped, as another process did (whose error says why): Connection closed by peer"

    class Torchrun:
        text = (_report(1, 3, "training stopped: loss is nan") + _report(0, 2, "error: a.jpg: truncated")
                + _report(2, 1, lost))  # rank 0 had bad data, 2 stopped with it

        def __init__(self, cmd, env):
            Path(env[distributed.EXIT_FILE_ENV]).write_text(self.text)

        def wait(self, timeout=None):
            return 1

    monkeypatch.setattr(subprocess, "Popen", Torchrun)
    assert distributed.launch(["train"], 3) == 2
    assert capsys.readouterr().err == ("error: [rank 0] a.jpg: truncated\n"
                                       "training stopped: [rank 1] loss is nan\n")

    class PeerLost(Torchrun):
        text = _report(0, 1, lost) + _report(1, 3, "training stopped: loss is nan")  # rank 1 stopped the run

    monkeypatch.setattr(subprocess, "Popen", PeerLost)
    assert distributed.launch(["train"], 2) == 3
    assert capsys.readouterr().err == "training stopped: [rank 1] loss is nan\n"

    class Alike(Torchrun):  # both read one bad file: said once, as one process says it
        text = _report(1, 2, "error: x.json: not found") + _report(0, 2, "error: x.json: not found")

    monkeypatch.setattr(subprocess, "Popen", Alike)
    assert distributed.launch(["train"], 2) == 2
    assert capsys.readouterr().err == "error: x.json: not found\n"

    class Both(Torchrun):  # ranks 0 and 2 alike, rank 1 another error
        text = _report(0, 2, "error: a") + _report(1, 2, "error: b") + _report(2, 2, "error: a")

    monkeypatch.setattr(subprocess, "Popen", Both)
    assert distributed.launch(["train"], 3) == 2
    assert capsys.readouterr().err == "error: [ranks 0, 2] a\nerror: [rank 1] b\n"

    class Ended(Torchrun):  # rank 1 ended by torchrun's SIGTERM before it could say the same
        text = (_report(0, 2, "error: x.json: not found")
                + json.dumps({"rank": 1, "status": 1, "errors": ["error: ended by signal SIGTERM"],
                              "signal": "SIGTERM"}) + "\n")

    monkeypatch.setattr(subprocess, "Popen", Ended)
    assert distributed.launch(["train"], 2) == 2
    assert capsys.readouterr().err == "error: x.json: not found\n"

    class Killed(Torchrun):
        text = "not json\n"  # no process got to say why (killed by a signal)

    monkeypatch.setattr(subprocess, "Popen", Killed)
    assert distributed.launch(["train"], 2) == 1
    assert capsys.readouterr().err == ""


def test_the_launchers_torchrun_reports_a_process_ended_by_a_signal(monkeypatch, tmp_path):
    """A process killed (out of memory, say) could not say why; torchrun's SIGTERM to the others
    of a failed process is reported alike, and ``launch`` shows either only where no process
    said why it stopped."""
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from softteacher import distributed

    def run(args):
        assert args.nproc_per_node == "2" and args.standalone
        raise ChildFailedError("softteacher", {
            0: ProcessFailure(0, 0, -15, "<N/A>"), 1: ProcessFailure(1, 1, -9, "<N/A>")})

    monkeypatch.setattr(torchrun, "run", run)
    report = tmp_path / "report"
    monkeypatch.setenv(distributed.EXIT_FILE_ENV, str(report))
    assert distributed.torchrun_main(["--standalone", "--nproc_per_node=2", "-m", "softteacher"]) == 1
    entries = distributed._read_report(report)
    assert entries == [
        {"rank": 0, "status": 1, "errors": ["error: ended by signal SIGTERM"], "signal": "SIGTERM"},
        {"rank": 1, "status": 1, "errors": ["error: ended by signal SIGKILL (out of memory?)"],
         "signal": "SIGKILL"}]
    assert distributed._error_lines(entries, 0) == [
        "error: [rank 0] ended by signal SIGTERM", "error: [rank 1] ended by signal SIGKILL (out of memory?)"]
