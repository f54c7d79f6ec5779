"""Which benchmark records the gain and ablation reports put in their tables, and what
pseudo_quality.py summarises."""

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import ablation  # noqa: E402
import common  # noqa: E402
import gain  # noqa: E402
import pseudo_quality  # noqa: E402
from common import append_jsonl  # noqa: E402


def _rec(method, percent, fold, init=0, iters=1000, ap=0.5, **extra):
    return {"method": method, "percent": percent, "fold": fold, "init_iteration": init,
            "iters": iters, "best_AP": ap, **extra}


def _table(out: str) -> dict[str, list[str]]:
    """A printed markdown table's rows by their first cell: the other cells, stripped."""
    cells = [[c.strip() for c in line.strip("|").split("|")]
             for line in out.splitlines() if line.startswith("| ")]
    return {c[0]: c[1:] for c in cells}


def test_latest_end_starts_each_split_where_its_supervised_run_ended():
    records = [
        _rec("supervised", 1.0, 1, iters=1000, ap=0.20),
        _rec("supervised", 10.0, 1, iters=2000, ap=0.57),
        _rec("soft_teacher", 1.0, 1, init=1000, iters=1600, ap=0.30),
        _rec("soft_teacher", 10.0, 1, init=1200, iters=2000, ap=0.25),   # not at the end
        _rec("soft_teacher", 10.0, 1, init=2000, iters=2600, ap=0.58),
        _rec("supervised", 10.0, 1, init=2000, iters=2600, ap=0.59),
    ]
    latest = gain._latest(records, "end")
    assert {k: r["best_AP"] for k, r in latest.items()} == {
        ("supervised", 1.0, 1): 0.20,          # no continuation: the run from scratch
        ("soft_teacher", 1.0, 1): 0.30,
        ("supervised", 10.0, 1): 0.59,         # the continuation from 2000
        ("soft_teacher", 10.0, 1): 0.58,
    }
    assert gain._latest(records, 1200)[("soft_teacher", 10.0, 1)]["best_AP"] == 0.25
    assert gain._start("end") == "end" and gain._start("1200") == 1200


def test_latest_keeps_a_named_variant_apart_from_its_row():
    records = [
        _rec("supervised", 5.0, 1, iters=2000, ap=0.41),
        _rec("soft_teacher", 5.0, 1, init=2000, iters=2600, ap=0.44),
        _rec("supervised", 5.0, 1, init=2000, iters=2600, ap=0.42),
        _rec("soft_teacher", 5.0, 1, init=2000, iters=3200, ap=0.46, variant="long"),
    ]
    usual = gain._latest(records, "end")
    assert {k: r["best_AP"] for k, r in usual.items()} == {
        ("supervised", 5.0, 1): 0.42, ("soft_teacher", 5.0, 1): 0.44}
    # the longer run, and (until its own supervised continuation exists) the run from scratch
    long = gain._latest(records, "end", "long")
    assert {k: r["best_AP"] for k, r in long.items()} == {
        ("supervised", 5.0, 1): 0.41, ("soft_teacher", 5.0, 1): 0.46}


def test_a_variant_run_from_scratch_is_not_the_start_of_the_split():
    # every run of a split starts from the supervised run without a variant; a longer supervised
    # run from scratch recorded after it neither moves "end" nor stands in for the row
    records = [
        _rec("supervised", 5.0, 1, iters=2000, ap=0.41, checkpoint_sha256={"2000": "a"}),
        _rec("soft_teacher", 5.0, 1, init=2000, iters=2600, ap=0.44, init_sha256="a"),
        _rec("supervised", 5.0, 1, iters=4000, ap=0.43, variant="long", checkpoint_sha256={"2000": "b"}),
    ]
    latest = gain._latest(records, "end")
    assert {k: r["best_AP"] for k, r in latest.items()} == {
        ("supervised", 5.0, 1): 0.41, ("soft_teacher", 5.0, 1): 0.44}
    assert gain._latest(records, 0, "long")[("supervised", 5.0, 1)]["best_AP"] == 0.43
    gain.check_one_start(latest.values(), records, Path("results.jsonl"))  # not compared with "b"
    with pytest.raises(SystemExit, match="different checkpoints"):
        gain.check_one_start(latest.values(), records + [{**records[0], "checkpoint_sha256": {"2000": "c"}}],
                             Path("results.jsonl"))


def test_ablation_rows_keep_their_percent_and_borrow_the_full_method_row(tmp_path, monkeypatch):
    monkeypatch.setattr(ablation, "ROOT", tmp_path)
    res, abl = tmp_path / "t" / "results.jsonl", tmp_path / "t" / ablation.RESULTS
    append_jsonl(res, _rec("supervised", 10.0, 1, iters=2000))
    append_jsonl(res, _rec("supervised", 1.0, 1, iters=1000))
    # the full method from gain.py, same start and overrides: it stands for box_jitter
    append_jsonl(res, _rec("soft_teacher", 10.0, 1, init=2000, ap=0.55,
                           command="benchmarks/gain.py run --set solver.lr=0.002 --threads 1"))
    # a later run of the same row replaces it, as the supervised row's newest record does
    append_jsonl(res, _rec("soft_teacher", 10.0, 1, init=2000, ap=0.58,
                           command="benchmarks/gain.py run --set solver.lr=0.002 --threads 1"))
    # same start, other overrides: not the ablation's configuration
    append_jsonl(res, _rec("soft_teacher", 10.0, 2, init=2000, ap=0.9, overrides=["solver.lr=0.02"]))
    append_jsonl(abl, _rec("soft_teacher", 10.0, 1, init=2000, ap=0.60, variant="oracle",
                           overrides=["solver.lr=0.002", "method.pseudo_source=ground_truth"]))
    append_jsonl(abl, _rec("soft_teacher", 1.0, 1, init=1000, ap=0.40, variant="oracle",
                           overrides=["solver.lr=0.002", "method.pseudo_source=ground_truth"]))

    done = ablation._done("t", 2000, 10.0)
    assert {k: r["best_AP"] for k, r in done.items()} == {("oracle", 1, 0): 0.60, ("box_jitter", 1, 0): 0.58}
    assert done[("box_jitter", 1, 0)]["from_gain"]
    assert {k: r["best_AP"] for k, r in ablation._done("t", "end", 1.0).items()} == {("oracle", 1, 0): 0.40}
    assert ablation._done("t", 2000, 1.0) == {}


def test_ablation_keeps_each_seed_of_a_row_and_reports_its_spread(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ablation, "ROOT", tmp_path)
    res, abl = tmp_path / "t" / "results.jsonl", tmp_path / "t" / ablation.RESULTS
    # the supervised runs' last evaluations: 39 and 41, a point below their best
    append_jsonl(res, _rec("supervised", 5.0, 1, iters=2000, ap=0.40, final={"student/bbox_AP": 0.39}))
    append_jsonl(res, _rec("supervised", 5.0, 2, iters=2000, ap=0.42, final={"student/bbox_AP": 0.41}))

    def _run(ap, fold=1, last=None, **extra):  # a Soft Teacher record as gain.py writes it
        return _rec("soft_teacher", 5.0, fold, init=2000, iters=2600, ap=ap, best_iteration=2600,
                    final={"teacher/bbox_AP": ap if last is None else last, "student/bbox_AP": 0.1},
                    pseudo_precision_last20pct=None, s_per_iter_median=2.0, commit="abc1234", **extra)
    append_jsonl(res, _run(0.43, overrides=["solver.lr=0.002"]))
    append_jsonl(res, _run(0.44, fold=2, overrides=["solver.lr=0.002"]))
    ema = ("method.reliability=none", "method.use_jitter=false")
    append_jsonl(abl, _run(0.425, last=0.40, variant="ema",
                           overrides=["solver.lr=0.002", *ema]))
    # the second seed of both rows on fold 1: the seed override does not hide the gain.py row
    append_jsonl(abl, _run(0.415, last=0.41, variant="ema-seed1",
                           overrides=["solver.lr=0.002", "train.seed=1", *ema]))
    append_jsonl(abl, _run(0.41, variant="box_jitter-seed1",
                           overrides=["solver.lr=0.002", "train.seed=1"]))
    done = ablation._done("t", 2000, 5.0)
    assert {k: r["best_AP"] for k, r in done.items()} == {
        ("ema", 1, 0): 0.425, ("ema", 1, 1): 0.415,
        ("box_jitter", 1, 0): 0.43, ("box_jitter", 1, 1): 0.41, ("box_jitter", 2, 0): 0.44}
    assert ablation._seed(["train.seed=3", "a=1"]) == 3 and ablation._seed(["a=1"]) == 0
    assert ablation._variant("ema", 0) == "ema" and ablation._variant("ema", 2) == "ema-seed2"

    ablation.report(argparse.Namespace(preset="shapes-cpu", tag="t", init_from_supervised=2000, percent=5.0,
                                       fold=0, details=True, curves=True, png=str(tmp_path / "a.png")))
    out = capsys.readouterr().out
    table = _table(out)
    # folds, starts, runs, AP: the mean of the folds' means, the same at the last evaluation of
    # the reported model, change from the row above, start spread, seed spread
    assert table["supervised (student)"] == ["2", "2", "2", "41.0 (40.0, 42.0)", "40.0 (39.0, 41.0)", "",
                                             "-", "-"]
    # ema's last evaluations, 40 and 41, are below their best, 42.5 and 41.5
    assert table["ema"] == ["1", "1", "2", "42.0", "40.5", "", "-", "1.0"]
    # fold 1's mean is 42.0 ((43 + 41) / 2), fold 2's 44.0: 43.0; its change from ema counts
    # fold 1 alone, the fold both have (42.0 against 42.0), not fold 2's 44.0
    assert table["box_jitter"] == ["2", "2", "3", "43.0 (42.0, 44.0)", "43.0 (42.0, 44.0)", "+0.0", "-",
                                   "2.0"]
    assert table["box_jitter fold 1 seed 1"][0] == "41.0 (2600)"
    assert (tmp_path / "a.png").is_file()
    # these records keep no evaluations: the curve table says so, the plot has its panels alone
    assert "(no run's record keeps its evaluations)" in out and (tmp_path / "a_curves.png").is_file()


def test_ablation_report_says_where_its_rows_do_not_compare_alike(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ablation, "ROOT", tmp_path)
    res, abl = tmp_path / "t" / "results.jsonl", tmp_path / "t" / ablation.RESULTS
    append_jsonl(res, _rec("supervised", 5.0, 1, iters=2000, ap=0.40))  # the start, and no more

    def _run(ap, row, iters=2600, lr="0.002"):
        return _rec("soft_teacher", 5.0, 1, init=2000, iters=iters, ap=ap, best_iteration=iters,
                    final={"teacher/bbox_AP": ap}, s_per_iter_median=2.0, commit="abc1234", variant=row,
                    overrides=[f"solver.lr={lr}", *ablation.ROWS[row]])
    append_jsonl(abl, _run(0.41, "ema"))
    append_jsonl(abl, _run(0.42, "soft_teacher"))
    args = argparse.Namespace(preset="shapes-cpu", tag="t", init_from_supervised=2000, percent=5.0, fold=0,
                              details=False, png=str(tmp_path / "a.png"))
    ablation.report(args)
    out = capsys.readouterr().out
    assert ("- Note: Supervised fold 1: the run from scratch the rows start from (2000 iterations); no "
            "supervised run continued from it is recorded.") in out
    assert "Not alike" not in out
    assert "| AP (best; teacher; mean of the folds' means) |" in out  # no row reports its student
    # a row run longer, and one at another rate: said under the table
    append_jsonl(abl, _run(0.43, "box_jitter", iters=3000))
    append_jsonl(abl, _run(0.44, "end_to_end", lr="0.01"))
    ablation.report(args)
    out = capsys.readouterr().out
    assert ("**Not alike.** Schedules differ: 2600 iterations: end_to_end fold 1, ema fold 1, "
            "soft_teacher fold 1; 3000 iterations: box_jitter fold 1.") in out
    assert ("**Not alike.** Settings differ: solver.lr=0.002: ema fold 1, soft_teacher fold 1, box_jitter "
            "fold 1; solver.lr=0.01: end_to_end fold 1.") in out
    # a supervised run continued to the rows' end: no note of its start; of another length: said
    append_jsonl(res, _rec("supervised", 5.0, 1, init=2000, iters=3000, ap=0.40))
    ablation.report(args)
    out = capsys.readouterr().out
    assert "Note: Supervised" not in out
    assert "- **Not alike.** Schedules differ: 2600 iterations: end_to_end fold 1, ema fold 1, " \
           "soft_teacher fold 1; 3000 iterations: box_jitter fold 1, supervised fold 1." in out


def _start_run(ap, variant, start, fold=1, **extra):
    """An ablation record from the supervised checkpoint whose checksum is ``start``."""
    return _rec("soft_teacher", 5.0, fold, init=2000, iters=2600, ap=ap, best_iteration=2600,
                final={"teacher/bbox_AP": ap}, s_per_iter_median=2.0, commit="abc1234",
                variant=variant, overrides=["solver.lr=0.002", *ablation.ROWS[variant]],
                init_sha256=start, **extra)


def test_ablation_report_averages_the_starts_of_a_fold_before_the_folds(tmp_path, monkeypatch, capsys):
    """Two result folders, each from its own supervised start: fold 1 has a start in each,
    fold 2 one. A fold's value is the mean of its starts', the row's the mean of its folds'."""
    monkeypatch.setattr(ablation, "ROOT", tmp_path)
    for tag, sup, runs in (
            ("a", {1: 0.40, 2: 0.44}, [(0.41, "ema", 1), (0.43, "ema", 2), (0.42, "box_jitter", 1),
                                        (0.45, "box_jitter", 2)]),
            ("b", {1: 0.38}, [(0.37, "ema", 1), (0.40, "box_jitter", 1)])):
        for fold, ap in sup.items():
            append_jsonl(tmp_path / tag / "results.jsonl", _rec("supervised", 5.0, fold, iters=2000, ap=ap,
                                                                checkpoint_sha256={"2000": f"{tag}{fold}"}))
        for ap, row, fold in runs:
            append_jsonl(tmp_path / tag / ablation.RESULTS, _start_run(ap, row, f"{tag}{fold}", fold))
    # a second seed of start b's ema run: start b's ema is (37 + 35) / 2 = 36
    append_jsonl(tmp_path / "b" / ablation.RESULTS, {**_start_run(0.35, "ema", "b1"), "variant": "ema-seed1",
                                                      "overrides": ["solver.lr=0.002", "train.seed=1",
                                                                    *ablation.ROWS["ema"]]})
    ablation.report(argparse.Namespace(preset="shapes-cpu", tag="a", more_starts=["b"],
                                       init_from_supervised=2000, percent=5.0, fold=0, details=True,
                                       png=str(tmp_path / "a.png")))
    table = _table(capsys.readouterr().out)
    # supervised: fold 1 (40 + 38) / 2 = 39, fold 2 44: 41.5; its starts of fold 1 differ by 2
    # (these records do not give the last evaluation: "-")
    assert table["supervised (student)"] == ["2", "3", "3", "41.5 (39.0, 44.0)", "-", "", "2.0", "-"]
    # ema: fold 1 (41 + 36) / 2 = 38.5 (not the mean of its three runs, 37.7), fold 2 43: 40.75
    assert table["ema"] == ["2", "3", "4", "40.8 (38.5, 43.0)", "40.8 (38.5, 43.0)", "", "5.0", "2.0"]
    # box_jitter: fold 1 (42 + 40) / 2 = 41, fold 2 45: 43.0; over ema on the seeds both ran
    # (start b: 40 against seed 0's 37, not against 36), fold 1 (+1 + 3) / 2, fold 2 +2: +2.0
    assert table["box_jitter"] == ["2", "3", "3", "43.0 (41.0, 45.0)", "43.0 (41.0, 45.0)", "+2.0", "2.0",
                                   "-"]
    assert table["ema fold 1 [b]"][0] == "37.0 (2600)"


def test_a_report_refuses_runs_of_one_fold_from_different_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(ablation, "ROOT", tmp_path)
    res, abl = tmp_path / "t" / "results.jsonl", tmp_path / "t" / ablation.RESULTS
    # the supervised run was trained again: its checkpoint at 2000 is now "new"
    append_jsonl(res, _rec("supervised", 5.0, 1, iters=2000, checkpoint_sha256={"2000": "old"}))
    append_jsonl(res, _rec("supervised", 5.0, 1, iters=2000, checkpoint_sha256={"2000": "new"}))
    append_jsonl(abl, _start_run(0.42, "ema", "old"))
    args = argparse.Namespace(preset="shapes-cpu", tag="t", more_starts=[], init_from_supervised=2000,
                              percent=5.0, fold=0, details=False, png=str(tmp_path / "a.png"))
    with pytest.raises(SystemExit, match=r"5 % fold 1 started from different checkpoints \(ema old, "
                                         r"supervised run from scratch at 2000 new\)"):
        ablation.report(args)
    # runs of the new start agree with it, and records older than the checksum cannot be checked
    append_jsonl(abl, _start_run(0.43, "ema", "new"))
    append_jsonl(abl, {**_start_run(0.44, "box_jitter", ""), "init_sha256": None})
    ablation.report(args)
    # the supervised row continued from the old start is in the table too
    append_jsonl(res, _rec("supervised", 5.0, 1, init=2000, iters=2600, init_sha256="old"))
    with pytest.raises(SystemExit, match=r"\(ema new, supervised old, supervised run from scratch "
                                         r"at 2000 new\)"):
        ablation.report(args)
    gain.check_one_start([_start_run(0.4, "ema", "x"), _start_run(0.4, "ema", "x", fold=2)], [], res)
    with pytest.raises(SystemExit, match="fold 1"):
        gain.check_one_start([_start_run(0.4, "ema", "x"), _start_run(0.4, "soft_teacher", "y")], [], res)


def test_a_report_refuses_runs_evaluated_in_batches_of_different_sizes(tmp_path, monkeypatch):
    monkeypatch.setattr(ablation, "ROOT", tmp_path)
    res, abl = tmp_path / "t" / "results.jsonl", tmp_path / "t" / ablation.RESULTS
    # records older than the field were evaluated in batches of 4
    append_jsonl(res, _rec("supervised", 5.0, 1, iters=2000, checkpoint_sha256={"2000": "s"}))
    append_jsonl(abl, _start_run(0.42, "ema", "s"))
    append_jsonl(abl, _start_run(0.43, "box_jitter", "s", eval_batch_size=4))
    args = argparse.Namespace(preset="shapes-cpu", tag="t", more_starts=[], init_from_supervised=2000,
                              percent=5.0, fold=0, details=False, png=str(tmp_path / "a.png"))
    ablation.report(args)
    append_jsonl(abl, _start_run(0.44, "soft_teacher", "s", eval_batch_size=1))
    with pytest.raises(SystemExit, match=r"evaluated in batches of different sizes \(1, 4\)"):
        ablation.report(args)
    # and a run's size is read from its saved config, 4 where the config predates the field
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("train:\n  seed: 0\n")
    assert gain.eval_batch_size(gain.saved_config(run)) == 4
    (run / "config.yaml").write_text("train:\n  eval_batch_size: 1\n")
    assert gain.eval_batch_size(gain.saved_config(run)) == 1


def test_the_report_gives_each_row_s_ap_per_class_at_its_last_evaluation(tmp_path):
    assert gain.run_folder(tmp_path, "soft_teacher", 1.0, 2, 1000) == tmp_path / "soft_teacher-p1-f2-init1000"
    assert gain.run_folder(tmp_path, "supervised", 5.0, 1, 0, "long") == tmp_path / "supervised-p5-f1-long"
    st = gain.run_folder(tmp_path, "soft_teacher", 1.0, 2, 1000)
    st.mkdir()
    for row in ({"iteration": 250, "kind": "eval", "teacher/bbox_AP/cross": 0.1, "teacher/bbox_AP/star": 0.2},
                {"iteration": 260, "kind": "train", "loss": 1.0},
                {"iteration": 500, "kind": "eval", "teacher/bbox_AP/cross": 0.178,
                 "teacher/bbox_AP/star": 0.335, "student/bbox_AP/cross": 0.5}):
        append_jsonl(st / "metrics.jsonl", row)
    latest = {("soft_teacher", 1.0, 2): _rec("soft_teacher", 1.0, 2, init=1000, iters=1500),
              ("supervised", 1.0, 2): _rec("supervised", 1.0, 2, iters=1000)}  # its folder is gone
    assert gain.per_class_lines(latest, tmp_path) == [
        "", "| run | cross | star |", "|---|---|---|",
        "| soft_teacher 1 % fold 2, teacher at 1500 | 17.8 | 33.5 |"]
    assert gain.per_class_lines({("supervised", 1.0, 2): latest[("supervised", 1.0, 2)]}, tmp_path) == []


def test_a_run_from_a_start_trained_again_since_is_stale(tmp_path):
    start = gain.start_checkpoint(tmp_path, 5.0, 1, 2000)
    assert start == tmp_path / "supervised-p5-f1" / "model_0002000.pt"
    start.parent.mkdir()
    start.write_bytes(b"abc")
    # SHA-256 of b"abc" (FIPS 180-2, appendix B.1)
    digest = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert common.sha256_file(start) == digest
    record = _start_run(0.4, "ema", digest)
    assert not gain.stale(record, tmp_path)
    assert gain.stale({**record, "init_sha256": "0" * 64}, tmp_path)
    assert not gain.stale({**record, "init_sha256": ""}, tmp_path)  # older than the field: unknown
    start.unlink()
    assert not gain.stale({**record, "init_sha256": "0" * 64}, tmp_path)  # nothing to compare with


def test_a_run_folder_is_kept_to_the_start_it_began_from(tmp_path):
    out = tmp_path / "soft_teacher-p5-f1-init2000-ema"
    gain.claim_start(out, "a" * 64)
    gain.claim_start(out, "a" * 64)  # the same start resumes
    assert (out / "start.sha256").read_text() == "a" * 64 + "\n"
    with pytest.raises(SystemExit, match=r"soft_teacher-p5-f1-init2000-ema: holds a run from another "
                                         r"start \(aaaaaaaaaaaa, not bbbbbbbbbbbb\)"):
        gain.claim_start(out, "b" * 64)


@pytest.mark.parametrize("command,expected", [
    ("benchmarks/gain.py run --set a=1 --threads 1 --set b=2", ["a=1", "b=2"]),
    ("benchmarks/gain.py run --threads 1", []),
])
def test_overrides_of_records_older_than_the_field(command, expected):
    assert gain.record_overrides({"command": command}) == expected
    assert gain.record_overrides({"command": command, "overrides": ["x=1"]}) == ["x=1"]


def test_pseudo_quality_reports_the_share_of_each_kind():
    errors = {"cls": {"true": 6, "wrong_class": 3, "background": 1},
              "reg": {"true": 1},
              "missed": {"found": 6, "low_score": 2},
              "cls_confusions": {"cross on a star": 2, "circle on a square": 1},
              "missed_by_class": {"cross": {"found": 3, "low_score": 1},
                                  "star": {"found": 3, "low_score": 1}},
              "missed_by_size": {"small": {"low_score": 2}, "medium": {"found": 6}}}
    shares = pseudo_quality._error_shares(errors)
    assert shares["found_by_class"] == {"cross": [3, 4, 0.75], "star": [3, 4, 0.75]}
    assert shares["found_by_size"] == {"small": [0, 2, 0.0], "medium": [6, 6, 1.0]}
    assert shares["cls_kinds"] == {"true": [6, 0.6], "wrong_class": [3, 0.3], "background": [1, 0.1]}
    assert shares["reg_kinds"] == {"true": [1, 1.0]}
    assert shares["missed_kinds"] == {"found": [6, 0.75], "low_score": [2, 0.25]}
    assert shares["cls_confusions"] == errors["cls_confusions"]
    assert pseudo_quality._error_shares(None) == {}  # results written before the breakdown


def test_pseudo_quality_summarises_a_model_with_and_without_jittering():
    meta = {"checkpoint": "c.pt", "model": "teacher", "images": 2, "reg_pseudo_threshold": 0.02,
            "cls_pseudo_threshold": 0.9, "commit": "abc", "command": "x"}
    iou = [0.9, 0.6, 0.0, 0.3, 0.8]
    score = [0.95, 0.92, 0.97, 0.6, 0.7]
    jittered = pseudo_quality.summarize({"summary": meta, "candidates": {
        "score": score, "reliability": [0.01, 0.03, 0.05, 0.04, 0.015], "iou": iou}})
    assert jittered["overlapping_their_class"] == 4
    # score > 0.9: IoU 0.9, 0.6, 0.0; reliability < 0.02: IoU 0.9 and 0.8
    assert jittered["mean_iou_cls_pseudo"] == pytest.approx(0.5)
    assert jittered["mean_iou_reg_pseudo"] == pytest.approx(0.85)
    # over the four that overlap: ranks of IoU 4 2 1 3, of -reliability 4 2 1 3
    assert jittered["spearman_iou_neg_reliability_overlapping"] == pytest.approx(1.0)
    plain = pseudo_quality.summarize({"summary": meta, "candidates": {
        "score": score, "reliability": [float("nan")] * 5, "iou": iou}})
    # no reliability: the score's statistics stand, the regression set is the score's
    assert plain["overlapping_their_class"] == 4
    assert plain["spearman_iou_score_overlapping"] == jittered["spearman_iou_score_overlapping"]
    # ranks 4 2 1 3 and 4 3 1 2: 1 - 6 * 2 / (4 * 15)
    assert plain["spearman_iou_score_overlapping"] == pytest.approx(0.8)
    assert plain["mean_iou_reg_pseudo"] == pytest.approx(0.5)
    assert plain["spearman_iou_neg_reliability"] != plain["spearman_iou_neg_reliability"]  # NaN


def test_pseudo_quality_compares_results_side_by_side(tmp_path, capsys):
    def result(model, curve, cls, confusions):
        return {"summary": {"model": model},
                "curve": [{"threshold": t, "precision": p, "recall": r} for t, p, r in curve],
                "errors": {"cls": cls, "cls_confusions": confusions}}
    start = result("student", [(0.9, 0.86, 0.40), (0.95, 0.924, 0.34)], {"true": 477, "wrong_class": 51},
                   {"circle on a heart": 11, "circle on a ring": 10, "star on a cross": 4})
    teacher = result("teacher", [(0.9, 0.779, 0.507)], {"true": 609, "wrong_class": 123, "background": 45},
                     {"circle on a heart": 64})
    table = _table("\n".join(pseudo_quality.compare_table({"start": start, "teacher": teacher})))
    # P / R at each threshold any result has ("-" where one lacks it); true / duplicate / wrong
    # class / loose / background; the two most frequent wrong classes
    assert table["start"] == ["student", "0.86 / 0.40", "0.92 / 0.34", "477 / 0 / 51 / 0 / 0",
                              "circle on a heart 11, circle on a ring 10"]
    assert table["teacher"] == ["teacher", "0.78 / 0.51", "-", "609 / 0 / 123 / 0 / 45",
                                "circle on a heart 64"]
    # a threshold no box passes: its precision written to json as null
    empty = result("student", [(0.9, None, 0.0)], {}, {})
    assert _table("\n".join(pseudo_quality.compare_table({"empty": empty})))["empty"][1] == "- / 0.00"
    paths = []
    for name, res in (("a", start), ("b", teacher)):
        paths.append(str(tmp_path / f"{name}.json"))
        Path(paths[-1]).write_text(json.dumps(res))
    pseudo_quality.compare(paths, [], tmp_path / "c.png")
    assert (tmp_path / "c.png").is_file() and "| a | student |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--labels names 1 results, --compare gives 2"):
        pseudo_quality.compare(paths, ["x"], tmp_path / "c.png")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"bad.json: not a result json of this script \(no curve"):
        pseudo_quality.compare([str(tmp_path / "bad.json")], [], tmp_path / "c.png")


def test_objects_fall_in_coco_s_size_ranges():
    assert [pseudo_quality.size_range(a) for a in (0, 1023.9, 1024, 9215.9, 9216)] == [
        "small", "small", "medium", "medium", "large"]


def test_the_error_breakdown_counts_the_pseudo_boxes_training_used():
    import torch

    from softteacher.method.pseudo_labels import PseudoLabels

    boxes = PseudoLabels(torch.tensor([[0.0, 0, 4, 4], [1, 1, 5, 5], [2, 2, 6, 6]]),
                         torch.tensor([0.55, 0.65, 0.95]), torch.tensor([1, 2, 3]))
    # a checkpoint trained with candidates above 0.7: the boxes at 0.55 and 0.65 go
    kept = pseudo_quality.trained_on(boxes, 0.7)
    assert kept.labels.tolist() == [3] and kept.scores.tolist() == pytest.approx([0.95])
    assert len(pseudo_quality.trained_on(boxes, 0.5)) == 3


def test_the_gain_row_compares_the_folds_both_methods_have():
    # supervised has folds 1 and 2, Soft Teacher fold 1 only: the gain is fold 1's, 45 against 40
    # (+5.0, 45 / 40 = 1.125, (45 - 40) / (60 - 40) = 25 % of the gap), not 45 against the mean
    # of 40 and 50 (+0.0, 1.00x, 0 %)
    row = gain.gain_row(5.0, {1: 0.40, 2: 0.50}, {1: 0.45}, [0.60])
    assert row == ("| 5 % | 1 paired (alone, not in the means: supervised f2) | 40.0 (f1 40.0, f2 50.0) "
                   "| 45.0 | +5.0 | 1.12x | 25 % |")
    both = gain.gain_row(5.0, {1: 0.40, 2: 0.50}, {1: 0.45, 2: 0.52}, [0.60])
    assert both == "| 5 % | 2 | 45.0 (f1 40.0, f2 50.0) | 48.5 (f1 45.0, f2 52.0) | +3.5 | 1.08x | 23 % |"
    assert gain.gain_row(1.0, {1: 0.04}, {}, []) == "| 1 % | 1 | 4.0 | - | - | - | - |"
    assert gain.gain_row(1.0, {1: 0.0}, {2: 0.1}, []).endswith("| - | - | - |")  # no fold in common
    # the bars of the plot take the same values as the table's means
    assert gain.in_means({1: 0.40, 2: 0.50}, {1: 0.45}) == ([1], [0.40], [0.45])
    assert gain.in_means({1: 0.0}, {2: 0.1}) == ([], [0.0], [0.1])


def test_a_record_of_another_schedule_or_setting_is_not_the_row_asked_for(tmp_path, monkeypatch):
    monkeypatch.setattr(ablation, "ROOT", tmp_path)
    monkeypatch.setattr(gain, "ROOT", tmp_path)
    res, abl = tmp_path / "t" / "results.jsonl", tmp_path / "t" / ablation.RESULTS
    append_jsonl(res, _rec("supervised", 5.0, 1, iters=2000))
    start = gain.start_checkpoint(tmp_path / "t", 5.0, 1, 2000)
    start.parent.mkdir(parents=True)
    start.write_bytes(b"x")
    lr = ["solver.lr=0.002"]
    append_jsonl(abl, _rec("soft_teacher", 5.0, 1, init=2000, iters=2600, variant="ema",
                           overrides=[*lr, *ablation.ROWS["ema"]]))
    append_jsonl(abl, _rec("soft_teacher", 5.0, 1, init=2000, iters=2600, variant="alpha_1-seed1",
                           overrides=[*lr, "train.seed=1", *ablation.ROWS["alpha_1"]]))
    trained = []
    monkeypatch.setattr(ablation, "gain_run", lambda ns: trained.append(ns.variant))

    def run(iters, overrides, rows, seeds=(0,)):
        trained.clear()
        ablation.run(argparse.Namespace(tag="t", preset="tiny", percent=5.0, fold=1, folds=1,
                                        init_from_supervised=2000, iters=iters, set=overrides,
                                        rows=rows, seeds=list(seeds)))
        return list(trained)

    assert run(2600, lr, ["ema"]) == []                      # recorded with these settings
    assert run(2600, lr, ["alpha_1"], seeds=[1]) == []       # the seed's and the row's own apart
    assert run(3200, lr, ["ema"]) == ["ema"]                 # a longer schedule
    assert run(2600, ["solver.lr=0.001"], ["ema"]) == ["ema"]  # another lr
    assert run(2600, lr, ["soft_teacher"]) == ["soft_teacher"]  # never run


def test_ablation_rows_of_a_variant_stay_apart_from_the_usual_rows(tmp_path, monkeypatch, capsys):
    """``--variant ellipse``: rows with an override of their own, from the same start and result
    folder as the usual rows, each set kept to its own table and its own full-method row."""
    monkeypatch.setattr(ablation, "ROOT", tmp_path)
    monkeypatch.setattr(gain, "ROOT", tmp_path)
    res, abl = tmp_path / "t" / "results.jsonl", tmp_path / "t" / ablation.RESULTS
    start = gain.start_checkpoint(tmp_path / "t", 1.0, 1, 1000)
    start.parent.mkdir(parents=True)
    start.write_bytes(b"x")
    sha = common.sha256_file(start)
    append_jsonl(res, _rec("supervised", 1.0, 1, iters=1000, ap=0.377, checkpoint_sha256={"1000": sha}))
    lr, ell = ["solver.lr=0.002"], ["solver.lr=0.002", "augment.box_mapping=ellipse"]

    def _run(ap, variant, overrides, file=abl):
        append_jsonl(file, _rec("soft_teacher", 1.0, 1, init=1000, iters=2000, ap=ap, best_iteration=2000,
                                final={"teacher/bbox_AP": ap}, s_per_iter_median=1.2, commit="abc1234",
                                variant=variant, overrides=overrides, init_sha256=sha))
    _run(0.396, "", lr, file=res)                       # gain.py's full method, corner rule
    _run(0.411, "ellipse", ell, file=res)               # gain.py --variant ellipse
    _run(0.397, "ema", [*lr, *ablation.ROWS["ema"]])
    _run(0.400, "soft_teacher", [*lr, *ablation.ROWS["soft_teacher"]])
    _run(0.4113, "ema-ellipse", [*ell, *ablation.ROWS["ema"]])
    _run(0.405, "ema-ellipse-seed1", [*ell, "train.seed=1", *ablation.ROWS["ema"]])

    assert ablation._variant("ema", 1, "ellipse") == "ema-ellipse-seed1"
    assert ablation._row_and_name("ema-ellipse-seed1", 1) == ("ema", "ellipse")
    assert ablation._row_and_name("ema_099", 0) == ("ema_099", "")
    assert ablation._row_and_name("box_jitter-seed1", 1) == ("box_jitter", "")
    usual = ablation._done("t", 1000, 1.0)
    assert {k: r["best_AP"] for k, r in usual.items()} == {
        ("ema", 1, 0): 0.397, ("soft_teacher", 1, 0): 0.400, ("box_jitter", 1, 0): 0.396}
    named = ablation._done("t", 1000, 1.0, "ellipse")
    assert {k: r["best_AP"] for k, r in named.items()} == {
        ("ema", 1, 0): 0.4113, ("ema", 1, 1): 0.405, ("box_jitter", 1, 0): 0.411}
    assert ablation._done("t", 1000, 1.0, "other") == {}

    trained = []
    monkeypatch.setattr(ablation, "gain_run", lambda ns: trained.append((ns.variant, ns.set)))

    def run(overrides, rows, variant, seeds=(0,)):
        trained.clear()
        ablation.run(argparse.Namespace(tag="t", preset="tiny", percent=1.0, fold=1, folds=1,
                                        init_from_supervised=1000, iters=2000, set=overrides,
                                        rows=rows, seeds=list(seeds), variant=variant))
        return list(trained)

    # recorded under the name: nothing to train; the usual soft_teacher row does not count for it
    assert run(ell, ["ema", "box_jitter"], "ellipse") == []
    assert run(ell, ["ema"], "ellipse", seeds=[1]) == []
    assert run(ell, ["soft_teacher"], "ellipse") == [
        ("soft_teacher-ellipse", [*ell, *ablation.ROWS["soft_teacher"]])]
    assert run(ell, ["soft_teacher"], "ellipse", seeds=[2]) == [
        ("soft_teacher-ellipse-seed2", [*ell, "train.seed=2", *ablation.ROWS["soft_teacher"]])]
    assert run(lr, ["soft_teacher"], "") == []
    with pytest.raises(SystemExit, match="--variant 'a b'"):
        run(ell, ["ema"], "a b")
    with pytest.raises(SystemExit, match="--variant '-x'"):
        run(ell, ["ema"], "-x")

    ablation.report(argparse.Namespace(preset="shapes-cpu", tag="t", init_from_supervised=1000, percent=1.0,
                                       fold=1, details=True, png="", variant="ellipse"))
    table = _table(capsys.readouterr().out)
    assert table["supervised (student)"][3] == "37.7"
    # ema: the mean of its two seeds, (41.13 + 40.5) / 2; box_jitter: gain.py's ellipse run, its
    # change from ema on seed 0, the seed both ran: 41.1 against 41.13, not against 40.8
    assert table["ema"][:4] == ["1", "1", "2", "40.8"]
    assert table["box_jitter"][:6] == ["1", "1", "1", "41.1", "41.1", "+0.0"]
    assert "soft_teacher" not in table
    assert (tmp_path / "t" / "ablation_ellipse.png").is_file()
    with pytest.raises(SystemExit, match="of variant other"):
        ablation.report(argparse.Namespace(preset="shapes-cpu", tag="t", init_from_supervised=1000,
                                           percent=1.0, fold=1, details=False, png="", variant="other"))

    # --supervised-variant: gain.py's supervised run of that name from the same start stands in
    # for the supervised row; a name without such a run is refused, not the start put in its place
    def report(sup_name):
        ablation.report(argparse.Namespace(preset="shapes-cpu", tag="t", init_from_supervised=1000,
                                           percent=1.0, fold=1, details=False, png="", variant="ellipse",
                                           supervised_variant=sup_name))
        return _table(capsys.readouterr().out)
    with pytest.raises(SystemExit, match="no supervised run of variant long at 1 % for fold 1"):
        report("long")
    append_jsonl(res, _rec("supervised", 1.0, 1, init=1000, iters=3000, ap=0.392, variant="long",
                           overrides=lr, init_sha256=sha))
    table = report("long")
    assert table["supervised (student, long)"][3] == "39.2"
    assert table["box_jitter"][3] == "41.1" and "supervised (student)" not in table
    assert report("")["supervised (student)"][3] == "37.7"


def test_a_run_folder_resumes_only_the_settings_it_was_started_with(tmp_path):
    from softteacher.config import load_config

    out = tmp_path / "soft_teacher-p5-f1"
    cfg = load_config("tiny", overrides=["solver.lr=0.002", "augment.rotate_deg=0"])
    gain.check_same_run(out, cfg)  # nothing there yet
    out.mkdir()
    (out / "config.yaml").write_text(cfg.to_yaml())
    gain.check_same_run(out, load_config("tiny", overrides=["solver.lr=0.002", "augment.rotate_deg=0"]))
    other = load_config("tiny", overrides=["solver.lr=0.002", "solver.max_iter=7"])
    with pytest.raises(SystemExit, match=r"soft_teacher-p5-f1: holds a run with other settings "
                                         r"\(augment.rotate_deg: 0.0 there, 30.0 now; solver.max_iter: "
                                         r"4 there, 7 now\)"):
        gain.check_same_run(out, other)
    # another seed, batch or grouping in a finished run's folder would be recorded with its weights
    for override, said in (("train.seed=1", "train.seed: 0 there, 1 now"),
                           ("train.batch_size=3", "train.batch_size: 2 there, 3 now"),
                           ("data.group_by_aspect=false", "data.group_by_aspect: True there, False now")):
        with pytest.raises(SystemExit, match=f"other settings \\({said}\\)"):
            gain.check_same_run(out, load_config("tiny", overrides=[
                "solver.lr=0.002", "augment.rotate_deg=0", override]))
    # the folder's own output_dir, device and periods are not what it trained
    gain.check_same_run(out, load_config("tiny", overrides=[
        "solver.lr=0.002", "augment.rotate_deg=0", "train.device=cpu", "train.eval_period=3"]))


def test_a_run_folder_resumes_when_its_files_are_named_relative_to_the_working_directory(tmp_path,
                                                                                       monkeypatch):
    from softteacher.config import load_config, with_absolute_paths

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "soft_teacher-p1-f1"
    out.mkdir()
    relative = load_config("tiny", overrides=["model.backbone_weights=pretrain/r18.pt"])
    # the engine writes config.yaml with the path made absolute
    (out / "config.yaml").write_text(with_absolute_paths(relative).to_yaml())
    assert str(tmp_path / "pretrain" / "r18.pt") in (out / "config.yaml").read_text()
    gain.check_same_run(out, relative)
    gain.check_same_run(out, load_config("tiny", overrides=[
        f"model.backbone_weights={tmp_path / 'pretrain' / 'r18.pt'}"]))
    with pytest.raises(SystemExit, match=r"model.backbone_weights: '.*/pretrain/r18.pt' there, "
                                         r"'.*/pretrain/other.pt' now"):
        gain.check_same_run(out, load_config("tiny", overrides=["model.backbone_weights=pretrain/other.pt"]))


def test_spearman_gives_tied_values_their_mean_rank():
    # ranks of a: 0.5, 0.5, 2, 3 (two ties at 0); of b: 0, 1, 2, 3. Deviations from the mean 1.5:
    # a -1, -1, .5, 1.5 and b -1.5, -.5, .5, 1.5: r = 4.5 / sqrt(4.5 * 5) = 0.9487
    a, b = [0.0, 0.0, 1.0, 2.0], [1.0, 2.0, 3.0, 4.0]
    import numpy as np

    assert pseudo_quality.spearman(np.array(a), np.array(b)) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    # the order the tied values come in does not matter (ranks by position gave 1.0 and 0.8)
    assert pseudo_quality.spearman(np.array(a), np.array([2.0, 1.0, 3.0, 4.0])) == pytest.approx(
        4.5 / (4.5 * 5) ** 0.5)
    assert np.isnan(pseudo_quality.spearman(np.zeros(5), np.arange(5.0)))  # one side constant


def test_a_finished_run_run_again_stands_for_its_first_record():
    run = dict(variant="", overrides=["solver.lr=0.002"], preset="shapes-cpu", init_sha256="ab")
    first = _rec("soft_teacher", 1.0, 2, init=1000, iters=2000, ap=0.41, **run, wall_s=2400.0,
                 commit="c1")
    other_fold = _rec("soft_teacher", 1.0, 1, init=1000, iters=2000, ap=0.41, **run, wall_s=9.0)
    again = _rec("soft_teacher", 1.0, 2, init=1000, iters=2000, ap=0.41, **run, wall_s=0.3)
    assert gain.recorded([first, other_fold], again) is first
    # another schedule, setting or start, or another best AP (weights trained again): not that run
    for change in ({"iters": 2600}, {"overrides": []}, {"init_sha256": "cd"}, {"best_AP": 0.40},
                   {"variant": "ema"}):
        assert gain.recorded([first], {**again, **change}) is None
    assert gain.recorded([], again) is None


def test_counting_as_cuda_takes_the_gpu_s_pooling_paths(monkeypatch):
    import speed
    import torch
    from torchvision.ops import boxes as box_ops

    from softteacher import cpu_ops
    from softteacher import model as model_module

    # what _take_cuda_branches replaces goes back after the test
    for owner, name in ((model_module, "pools_sparse"), (cpu_ops, "pools_sparse"), (box_ops, "batched_nms")):
        monkeypatch.setattr(owner, name, getattr(owner, name))
    monkeypatch.setattr(cpu_ops.MaxPool2d, "forward", cpu_ops.MaxPool2d.forward)
    maps = [torch.zeros(1, 4, 8, 8)]
    assert model_module.pools_sparse(maps, 64, 2) and cpu_ops.pools_sparse(maps, 64, 2)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    speed._take_cuda_branches(optimizer)
    # a CUDA device pools with torchvision's kernel per level and never through the sparse product
    assert not model_module.pools_sparse(maps, 64, 2) and not cpu_ops.pools_sparse(maps, 64, 2)
    assert cpu_ops.MaxPool2d.forward is torch.nn.MaxPool2d.forward
    assert optimizer.param_groups[0]["foreach"] is True
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    pooled = cpu_ops.MaxPool2d(kernel_size=2)(x)
    assert torch.equal(pooled, torch.nn.functional.max_pool2d(x, 2)) and pooled.is_contiguous()


def test_the_operator_count_names_autocast_s_casts_by_site():
    import speed
    import torch

    lin = torch.nn.Linear(4, 3)
    x = torch.rand(2, 4)

    def in_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lin(x)

    # float32: the matrix product and its transposed weight; bf16: the input, weight and bias
    # cast first, three more operators
    plain, cast = speed._count_ops(lambda: lin(x)), speed._count_ops(in_bf16)
    assert (plain.sites["other"], sum(plain.casts.values())) == (2, 0)
    assert (cast.sites["other"], cast.casts["other"]) == (5, 3)


def test_the_curve_table_puts_each_run_s_evaluations_under_their_iterations():
    table = _table("\n".join(ablation.curve_table([
        (("t", "ema", 1, 0), {"curve": [[1250, 0.386, 0.38], [1500, 0.4, None]]}),
        (("t", "ema", 1, 1), {"curve": [[1500, 0.41, 0.395]]}),
        (("t", "multi_stage", 2, 0), {})])))
    assert table["run (teacher / student AP at each evaluation)"] == ["1250", "1500"]
    # a model without an AP and an iteration a run did not evaluate at read "-"
    assert table["ema fold 1"] == ["38.6 / 38.0", "40.0 / -"]
    assert table["ema fold 1 seed 1"] == ["-", "41.0 / 39.5"]
    assert table["multi_stage fold 2"] == ["-", "-"]
    assert ablation.curve_table([(("t", "ema", 1, 0), {})]) == ["(no run's record keeps its evaluations)"]
    # runs from several result folders name theirs
    assert _table("\n".join(ablation.curve_table([(("b", "ema", 2, 0), {"curve": [[250, 0.5, 0.5]]})],
                                                  several_tags=True)))["ema fold 2 [b]"] == ["50.0 / 50.0"]


def test_the_curve_plot_draws_each_run_s_reported_model_in_its_fold_s_panel(tmp_path, monkeypatch):
    import matplotlib.axes
    import matplotlib.colors

    drawn = []
    real_plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, *a, **k: (
        drawn.append((ax.get_title(), k["label"], list(a[1]), k["color"])), real_plot(ax, *a, **k))[1])
    student = {"reported": "student"}
    ablation.plot_curves([(("t", "supervised", 2, 0), {**student, "curve": [[250, 0.2, 0.3]]}),
                          (("t", "ema", 2, 0), {"curve": [[1250, 0.4, 0.35], [1500, None, 0.36]]}),
                          (("t", "multi_stage", 1, 0), {**student, "curve": [[1250, 0.38, 0.37]]}),
                          (("t", "multi_stage", 2, 0), {**student, "curve": [[1250, 0.36, 0.35]]})],
                         tmp_path / "c.png", "t")
    colors = {(title, label): matplotlib.colors.to_rgb(color) for title, label, _, color in drawn}
    # a row keeps its colour from panel to panel, and no row takes the supervised runs' gray
    assert colors[("fold 1", "multi_stage (student)")] == colors[("fold 2", "multi_stage (student)")]
    assert colors[("fold 2", "supervised (student)")] == matplotlib.colors.to_rgb("tab:gray")
    assert len(set(colors.values())) == 3
    drawn = [d[:3] for d in drawn]
    assert (tmp_path / "c.png").is_file()
    # the fold 1 panel first; a teacher's missing AP leaves its point out
    assert [(t, label, [round(y, 1) for y in ys]) for t, label, ys in drawn] == [
        ("fold 1", "multi_stage (student)", [37.0]), ("fold 2", "supervised (student)", [30.0]),
        ("fold 2", "ema (teacher)", [40.0]), ("fold 2", "multi_stage (student)", [35.0])]
