"""Which benchmark records the gain and ablation reports put in their tables, and what
pseudo_quality.py summarises."""

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import ablation  # noqa: E402
import gain  # noqa: E402
import pseudo_quality  # noqa: E402
from common import append_jsonl  # noqa: E402


def _rec(method, percent, fold, init=0, iters=1000, ap=0.5, **extra):
    return {"method": method, "percent": percent, "fold": fold, "init_iteration": init,
            "iters": iters, "best_AP": ap, **extra}


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
    append_jsonl(res, _rec("supervised", 5.0, 1, iters=2000, ap=0.40))
    append_jsonl(res, _rec("supervised", 5.0, 2, iters=2000, ap=0.42))

    def _run(ap, fold=1, **extra):  # a Soft Teacher record as gain.py writes it
        return _rec("soft_teacher", 5.0, fold, init=2000, iters=2600, ap=ap, best_iteration=2600,
                    final={"teacher/bbox_AP": ap}, pseudo_precision_last20pct=None,
                    s_per_iter_median=2.0, commit="abc1234", **extra)
    append_jsonl(res, _run(0.43, overrides=["solver.lr=0.002"]))
    append_jsonl(res, _run(0.44, fold=2, overrides=["solver.lr=0.002"]))
    ema = ("method.reliability=none", "method.use_jitter=false")
    append_jsonl(abl, _run(0.425, variant="ema",
                           overrides=["solver.lr=0.002", *ema]))
    # the second seed of both rows on fold 1: the seed override does not hide the gain.py row
    append_jsonl(abl, _run(0.415, variant="ema-seed1",
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
                                       fold=0, details=True, png=str(tmp_path / "a.png")))
    cells = [[c.strip() for c in line.strip("|").split("|")]
             for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    table = {c[0]: c[1:] for c in cells}
    # folds, runs, AP: the mean of the folds' means, change from the row above, seed spread
    assert table["supervised (student)"] == ["2", "2", "41.0 (40.0, 42.0)", "", "-"]
    assert table["ema"] == ["1", "2", "42.0", "", "1.0"]
    # fold 1's mean is 42.0 ((43 + 41) / 2), fold 2's 44.0: 43.0, 1.0 above ema
    assert table["box_jitter"] == ["2", "3", "43.0 (42.0, 44.0)", "+1.0", "2.0"]
    assert table["box_jitter fold 1 seed 1"][0] == "41.0 (2600)"
    assert (tmp_path / "a.png").is_file()


@pytest.mark.parametrize("command,expected", [
    ("benchmarks/gain.py run --set a=1 --threads 1 --set b=2", ["a=1", "b=2"]),
    ("benchmarks/gain.py run --threads 1", []),
])
def test_overrides_of_records_older_than_the_field(command, expected):
    assert ablation._overrides({"command": command}) == expected
    assert ablation._overrides({"command": command, "overrides": ["x=1"]}) == ["x=1"]


def test_pseudo_quality_reports_the_share_of_each_kind():
    errors = {"cls": {"true": 6, "wrong_class": 3, "background": 1},
              "reg": {"true": 1},
              "missed": {"found": 6, "low_score": 2},
              "cls_confusions": {"cross on a star": 2, "circle on a square": 1}}
    shares = pseudo_quality._error_shares(errors)
    assert shares["cls_kinds"] == {"true": [6, 0.6], "wrong_class": [3, 0.3], "background": [1, 0.1]}
    assert shares["reg_kinds"] == {"true": [1, 1.0]}
    assert shares["missed_kinds"] == {"found": [6, 0.75], "low_score": [2, 0.25]}
    assert shares["cls_confusions"] == errors["cls_confusions"]
    assert pseudo_quality._error_shares(None) == {}  # results written before the breakdown
