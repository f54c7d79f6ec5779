import ast
import json
import re
from pathlib import Path

from softteacher import Detector
from softteacher.config import preset_tiny
from softteacher.data.shapes import CLASSES
from softteacher.demo import run_demo


def test_demo_trains_evaluates_and_draws(tiny_shapes, tmp_path, capsys):
    out = tmp_path / "demo"
    # --root names the set `data generate` wrote: that set, not a new one made inside it
    summary = run_demo(preset_tiny(), root=tiny_shapes.root, out_dir=str(out), iters=2, progress=False)
    assert not [p for p in Path(tiny_shapes.root).iterdir() if p.name.startswith("seed")]
    text = capsys.readouterr().out
    assert "teacher (reported) on val after 2 iterations" in text and "student on val" in text
    assert "teacher/bbox_AP" in summary["metrics"] and summary["predictions"]["model"] == "teacher"
    evaluation = [r for r in map(json.loads, (out / "train" / "metrics.jsonl").read_text().splitlines())
                  if r["kind"] == "eval"][-1]  # with the time each model's evaluation took
    assert evaluation["time/eval_teacher_s"] > 0 and evaluation["time/eval_student_s"] > 0
    assert len(list((out / "predictions").glob("*.jpg"))) == 4
    assert (out / "splits" / "instances_train.1@10.json").is_file()
    assert sorted(p.name for p in (out / "train" / "pseudo_labels").iterdir()) == \
        ["iter_0000001.jpg", "iter_0000002.jpg"]
    assert sorted(p.name for p in (out / "train" / "val_predictions").iterdir()) == ["iter_0000002.jpg"]
    assert f"(teacher | student): {out / 'train' / 'val_predictions'}\n" in text
    hint = re.search(r"^from Python: softteacher\.Detector\.load\(('.*')\)\(image\)$", text, re.M)
    detector = Detector.load(ast.literal_eval(hint.group(1)))  # the file the hint names
    assert detector.which == "teacher" and detector.classes == list(CLASSES)


def test_demo_iterations_default_as_its_help_says_and_zero_is_refused(tmp_path, capsys):
    import pytest

    from softteacher import demo
    from softteacher.cli import main

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert f"(default: {demo.DEMO_ITERS}, a short smoke run" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(ValueError, match="demo --iters 0: expected at least 1"):
        demo.run_demo(preset_tiny(), out_dir=str(tmp_path), iters=0, paths=object())
    # a setting the demo makes itself would be overwritten without a word: refused
    assert main(["demo", "--out", str(tmp_path), "--set", "train.eval_period=50"]) == 2
    assert capsys.readouterr().err.startswith("error: demo: --set train.eval_period=50: the demo sets its "
                                              "data, output folder and schedule itself (data.train, ")
    assert not any(tmp_path.iterdir())
    # the same in a --config file
    (tmp_path.parent / "demo.yaml").write_text("solver:\n  lr: 0.01\n  max_iter: 5\n")
    assert main(["demo", "--out", str(tmp_path), "--config", str(tmp_path.parent / "demo.yaml")]) == 2
    assert capsys.readouterr().err.startswith(f"error: demo: {tmp_path.parent / 'demo.yaml'} sets "
                                              f"solver.max_iter: the demo sets its data, output folder")
    assert not any(tmp_path.iterdir())
