"""The supervised engine end to end on tiny embedded data (CPU, seconds)."""

import copy
import json
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from softteacher import engine
from softteacher.checkpoint import (
    FORMAT,
    CheckpointError,
    CheckpointManager,
    load_checkpoint,
    save_checkpoint,
)
from softteacher.cli import main
from softteacher.config import relative_paths
from softteacher.data.datasets import load_dataset
from softteacher.data.records import DatasetError
from softteacher.engine import TrainingError, lr_factor, train
from softteacher.model import build_detector


def _supervised(cfg, iters, out):
    cfg.method.enabled = False
    cfg.solver.max_iter = iters
    cfg.train.output_dir = str(out)
    return cfg


def _weights(path, which="student"):
    return load_checkpoint(path)[which]


def test_lr_schedule_warmup_and_steps(tiny_cfg):
    s = tiny_cfg.solver
    s.warmup_iters, s.warmup_factor, s.steps, s.gamma = 10, 0.1, (20, 30), 0.1
    assert lr_factor(0, tiny_cfg) == pytest.approx(0.1)
    assert lr_factor(5, tiny_cfg) == pytest.approx(0.1 * 0.5 + 0.5)
    assert lr_factor(10, tiny_cfg) == 1.0
    assert lr_factor(20, tiny_cfg) == pytest.approx(0.1)
    assert lr_factor(35, tiny_cfg) == pytest.approx(0.01)


def test_steps_past_the_last_iteration_are_named(tiny_cfg, tmp_path, caplog):
    cfg = _supervised(tiny_cfg, 2, tmp_path / "run")
    cfg.solver.steps = (1, 2, 5)
    with caplog.at_level("WARNING", logger="softteacher"):
        train(cfg, progress=False)
    assert "solver.steps 2, 5: at or past solver.max_iter 2, never reached" in caplog.text
    caplog.clear()
    cfg.solver.steps = (1,)
    with caplog.at_level("WARNING", logger="softteacher"):
        train(cfg, progress=False)
    assert "solver.steps" not in caplog.text
    # a preset's step kept under a longer schedule: the rate decays before half of it
    cfg = _supervised(tiny_cfg, 3, tmp_path / "longer")
    cfg.solver.steps = (1,)
    with caplog.at_level("WARNING", logger="softteacher"):
        train(cfg, progress=False)
    assert ("solver.steps 1: all in the first half of solver.max_iter 3; the learning rate is "
            "decayed for most of the run") in caplog.text


def test_a_new_run_of_no_iterations_is_refused_before_it_writes(tiny_cfg, tmp_path):
    cfg = _supervised(tiny_cfg, 0, tmp_path / "run")
    with pytest.raises(ValueError, match="solver.max_iter is 0: a new run has nothing to train"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_missing_training_images_stop_a_run_before_it_writes(tiny_cfg, tmp_path):
    """A wrong image folder is found before the first step, and the folder's earlier run keeps
    its log."""
    cfg = tiny_cfg
    good = cfg.data.train
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"iteration": 1, "kind": "train"}\n')
    coco = json.loads(Path(cfg.data.train).read_text())
    coco["images"][1]["file_name"] = "gone.jpg"
    bad = tmp_path / "train.json"
    bad.write_text(json.dumps(coco))
    cfg.data.train = str(bad)
    image_id = coco["images"][1]["id"]
    with pytest.raises(DatasetError, match=re.escape(
            f"{bad}: 1 of {len(coco['images'])} image files not found under {cfg.data.train_images} "
            f"(--train-images DIR names the image folder):\n  image {image_id} (gone.jpg): "
            f"no file {Path(cfg.data.train_images) / 'gone.jpg'}") + "$"):
        train(cfg, progress=False)
    assert (out / "metrics.jsonl").read_text() == '{"iteration": 1, "kind": "train"}\n'
    assert not (out / "config.yaml").exists()
    # an unlabeled json moved away from its images: every one is missing
    cfg.data.train = good
    good_unlabeled = cfg.data.unlabeled, cfg.data.unlabeled_images
    moved = tmp_path / "elsewhere" / "unlabeled.json"
    moved.parent.mkdir()
    shutil.copy(cfg.data.unlabeled, moved)
    cfg.data.unlabeled, cfg.data.unlabeled_images, cfg.data.unlabeled_gt = str(moved), "", ""
    with pytest.raises(DatasetError, match=re.escape(f"{moved}: 8 of 8 image files not found under "
                                                     f"{moved.parent} (--unlabeled-images DIR")):
        engine.load_data(cfg)
    # a val json whose images are not beside it: the folder that holds them is named
    cfg.data.unlabeled, cfg.data.unlabeled_images = good_unlabeled
    val_json = tmp_path / "val" / "annotations" / "val.json"
    val_json.parent.mkdir(parents=True)
    shutil.copy(cfg.data.val, val_json)
    shutil.copytree(cfg.data.val_images, tmp_path / "val" / "images")
    cfg.data.val, cfg.data.val_images = str(val_json), ""
    with pytest.raises(DatasetError, match=re.escape(
            f"files of those names and sizes are under {tmp_path / 'val' / 'images'}: --val-images "
            f"{tmp_path / 'val' / 'images'}")):
        engine.load_data(cfg)


def test_class_names_for_a_coco_json_are_named_as_unused(tiny_cfg, caplog):
    names = engine.load_data(tiny_cfg).labeled.categories.names
    tiny_cfg.method.enabled = False
    for given, warned in ((names, False), (["widget", *names[1:]], True)):
        tiny_cfg.data.class_names = tuple(given)
        caplog.clear()
        with caplog.at_level("WARNING", logger="softteacher"):
            assert engine.load_data(tiny_cfg).labeled.categories.names == names
        assert ("not used; a COCO json's categories are its classes" in caplog.text) == warned


def test_resume_equals_uninterrupted(tiny_cfg, tmp_path):
    full = train(_supervised(tiny_cfg, 4, tmp_path / "full"), progress=False)
    assert full.iteration == 4
    cfg = _supervised(tiny_cfg, 2, tmp_path / "part")
    train(cfg, progress=False)
    # continued from a checkpoint, then from its folder, alone: the run's config.yaml holds its
    # settings
    assert main(["train", "--resume", str(tmp_path / "part" / "model_0000002.pt"), "--set",
                 "solver.max_iter=3", "--no-progress"]) == 0
    assert load_checkpoint(tmp_path / "part" / "model_final.pt")["iteration"] == 3
    assert main(["train", "--resume", "--out", str(tmp_path / "part"), "--set", "solver.max_iter=4",
                 "--no-progress"]) == 0
    assert load_checkpoint(tmp_path / "part" / "model_final.pt")["iteration"] == 4
    a = _weights(tmp_path / "full" / "model_final.pt")
    b = _weights(tmp_path / "part" / "model_final.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    opt_a = load_checkpoint(tmp_path / "full" / "model_final.pt")["optimizer"]["state"]
    opt_b = load_checkpoint(tmp_path / "part" / "model_final.pt")["optimizer"]["state"]
    for k in opt_a:
        assert torch.equal(opt_a[k]["momentum_buffer"], opt_b[k]["momentum_buffer"])
    # and a different run really differs (the comparison above can fail)
    cfg = _supervised(tiny_cfg, 4, tmp_path / "other")
    cfg.train.seed = 1
    train(cfg, progress=False)
    c = _weights(tmp_path / "other" / "model_final.pt")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_a_resumed_run_keeps_its_optimizer_and_sampler_settings_and_says_so(tiny_cfg, tmp_path, caplog):
    # the optimizer's groups come back with the rate, momentum and decay the run trained with,
    # and the sampler's position counts the run's batches: new values would not be used
    import copy

    cfg = _supervised(tiny_cfg, 2, tmp_path / "run")
    cfg.solver.warmup_iters = 0
    trained = copy.deepcopy(cfg)
    train(cfg, progress=False)
    cfg.solver.max_iter = 3
    cfg.solver.lr, cfg.solver.momentum, cfg.solver.weight_decay = 0.5, 0.1, 0.0
    cfg.train.batch_size, cfg.train.seed = cfg.train.batch_size + 1, 7
    with caplog.at_level("WARNING", logger="softteacher"):
        train(cfg, resume="auto", progress=False)
    for key, value in (("solver.lr", trained.solver.lr), ("solver.momentum", trained.solver.momentum),
                       ("solver.weight_decay", trained.solver.weight_decay),
                       ("train.batch_size", trained.train.batch_size), ("train.seed", trained.train.seed)):
        assert f"was trained with {key}={value}; the resumed run keeps it" in caplog.text
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["solver"]["lr"] == trained.solver.lr
    assert saved["train"]["batch_size"] == trained.train.batch_size
    group = load_checkpoint(tmp_path / "run" / "model_final.pt")["optimizer"]["param_groups"][0]
    assert group["initial_lr"] == trained.solver.lr and group["momentum"] == trained.solver.momentum
    assert "sample_ratio" not in caplog.text  # unchanged: not said


def test_a_run_begun_with_relative_paths_resumes_from_any_folder(tiny_cfg, tmp_path, monkeypatch,
                                                                  caplog, capsys):
    here = Path(tiny_cfg.data.train).parents[2]  # the folder that holds the tiny data
    monkeypatch.chdir(here)
    cfg = _supervised(tiny_cfg, 2, tmp_path / "run")
    for dotted in ("data.train", "data.train_images", "data.val", "data.val_images"):
        section, key = dotted.split(".")
        setattr(getattr(cfg, section), key, os.path.relpath(getattr(getattr(cfg, section), key), here))
    assert relative_paths(cfg) == ["data.train", "data.train_images", "data.val", "data.val_images"]
    train(cfg, progress=False)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["train"] == str(here / cfg.data.train)  # written absolute
    assert saved["data"]["val_images"] == str(here / cfg.data.val_images)
    assert saved["data"]["unlabeled"] == tiny_cfg.data.unlabeled  # absolute already: as it was
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # where the relative paths name nothing
    with caplog.at_level("WARNING", logger="softteacher"):
        assert main(["train", "--resume", "--out", str(tmp_path / "run"), "--set", "solver.max_iter=3",
                     "--no-progress"]) == 0
    assert load_checkpoint(tmp_path / "run" / "model_final.pt")["iteration"] == 3
    assert "relative paths" not in caplog.text
    # a config.yaml that names relative paths (written by hand) is read from here, and says so
    saved["data"]["train"] = cfg.data.train
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(saved))
    caplog.clear()
    with caplog.at_level("WARNING", logger="softteacher"):
        assert main(["train", "--resume", "--out", str(tmp_path / "run"), "--set", "solver.max_iter=4",
                     "--no-progress"]) == 2
    assert cfg.data.train in capsys.readouterr().err  # not found from here
    assert f"the relative paths it names (data.train) are read from {elsewhere}" in caplog.text


def test_batches_share_an_orientation_and_older_checkpoints_resume_ungrouped(tiny_cfg, tmp_path,
                                                                           monkeypatch, caplog):
    drawn = []  # (source, index) of every image the training loop asked for, in order
    get = engine.MixedDataset.__getitem__
    monkeypatch.setattr(engine.MixedDataset, "__getitem__",
                        lambda self, item: drawn.append(item[:2]) or get(self, item))
    records = load_dataset(tiny_cfg.data.train).records
    wide = [r.width > r.height for r in records]
    assert 0 < sum(wide) < len(wide)  # both orientations, or grouping would change nothing

    def run(iters, out, grouped):
        cfg = _supervised(copy.deepcopy(tiny_cfg), iters, tmp_path / out)
        cfg.data.group_by_aspect = grouped
        drawn.clear()
        train(cfg, progress=False)
        return cfg, [i for _, i in drawn]

    with caplog.at_level("INFO", logger="softteacher"):
        _, grouped = run(4, "grouped", True)
    assert "batches grouped by orientation" in caplog.text
    size = tiny_cfg.train.batch_size
    batches = [grouped[k:k + size] for k in range(0, len(grouped), size)]
    assert len(batches) == 4 and all(len({wide[i] for i in b}) == 1 for b in batches)
    assert load_checkpoint(tmp_path / "grouped" / "model_final.pt")["sampler_group_by_aspect"] is True
    # a grouped run resumed where the rules would no longer group its sets: grouped on, exactly
    cfg, _ = run(2, "rules", True)
    assert load_checkpoint(tmp_path / "rules" / "model_0000002.pt")["sampler_grouped"] is True
    from softteacher.data import samplers
    with monkeypatch.context() as m:
        m.setattr(samplers, "MAX_GROUP_SKEW", 0.5)  # below any skew: a new run would not group
        assert not samplers.MixedBatchSampler(len(wide), 0, (size, 0), groups=(wide, None)).grouped
        cfg.solver.max_iter = 4
        drawn.clear()
        train(cfg, resume="auto", progress=False)
    assert [i for _, i in drawn] == grouped[2 * size:]
    _, plain = run(4, "plain", False)
    assert plain != grouped and any(len({wide[i] for i in plain[k:k + size]}) == 2
                                    for k in range(0, len(plain), size))
    # a checkpoint written before grouping existed has no key: its run resumes ungrouped, exactly
    cfg, _ = run(2, "old", False)
    ckpt_path = tmp_path / "old" / "model_0000002.pt"
    state = load_checkpoint(ckpt_path)
    del state["sampler_group_by_aspect"]
    del state["config"]["train"]["eval_batch_size"]  # nor the evaluation's batch size (it was 4)
    state["rng"] = state.pop("rng_per_rank")[0]  # and one random state, not one per process
    save_checkpoint(ckpt_path, state)
    cfg.data.group_by_aspect, cfg.solver.max_iter = True, 4
    drawn.clear()
    caplog.clear()
    with caplog.at_level("INFO", logger="softteacher"):
        train(cfg, resume="auto", progress=False)
    assert [i for _, i in drawn] == plain[2 * size:]
    assert "group_by_aspect: false" in (tmp_path / "old" / "config.yaml").read_text()
    assert "was trained with data.group_by_aspect=False; the resumed run keeps it" in caplog.text
    assert "eval_batch_size: 4" in (tmp_path / "old" / "config.yaml").read_text()
    assert "was evaluated with train.eval_batch_size=4; the resumed run keeps it" in caplog.text
    assert "batches not grouped by orientation" in caplog.text
    a, b = _weights(tmp_path / "plain" / "model_final.pt"), _weights(tmp_path / "old" / "model_final.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_outputs_checkpoints_and_logs(tiny_cfg, tmp_path):
    cfg = _supervised(tiny_cfg, 4, tmp_path / "run")
    cfg.train.checkpoint_period, cfg.train.keep_last, cfg.train.eval_period = 1, 2, 2
    result = train(cfg, progress=False)
    out = tmp_path / "run"
    assert sorted(p.name for p in out.glob("model_0*.pt")) == ["model_0000003.pt", "model_0000004.pt"]
    assert (out / "model_final.pt").is_file() and (out / "model_best.pt").is_file()
    assert (out / "config.yaml").read_text().startswith("data:")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["iteration"] for r in train_rows] == [1, 2, 3, 4]
    assert {"sup/loss_classifier", "sup/loss_objectness", "lr", "loss"} <= set(train_rows[0])
    # each row logs the lr its iteration trained with: warm-up over 2, x0.1 from the 4th (steps 3)
    lrs = [r["lr"] for r in train_rows]
    assert lrs == pytest.approx([cfg.solver.lr * engine.lr_factor(i, cfg) for i in range(4)])
    assert lrs[2] == pytest.approx(0.01) and lrs[3] == pytest.approx(0.001) and lrs[0] < lrs[1] < lrs[2]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["iteration"] for r in evals] == [2, 4]
    assert "student/bbox_AP" in evals[0] and "student/bbox_AP" in result.metrics
    assert all(r["time/eval_student_s"] > 0 for r in evals)  # what each evaluation took
    state = load_checkpoint(out / "model_final.pt")
    assert state["report"] == "student" and state["teacher"] is None and state["iteration"] == 4
    assert not list(out.glob(".*.tmp"))
    # the final model is the last checkpoint under a second name, not a second copy on the disk
    assert (out / "model_final.pt").stat().st_ino == (out / "model_0000004.pt").stat().st_ino


@pytest.mark.parametrize("stop", [DatasetError("val.json: image 2 (b.jpg): cannot read image file"),
                                  KeyboardInterrupt()])
def test_an_evaluation_that_fails_keeps_the_trained_model(tiny_cfg, tmp_path, monkeypatch, caplog, stop):
    """A val image that decodes badly only when read whole fails the final evaluation (or the
    user stops it): the trained weights are saved before the error reaches the user, and a
    resumed run trains the last stretch again and evaluates it."""
    cfg = _supervised(tiny_cfg, 3, tmp_path / "run")
    cfg.train.checkpoint_period, cfg.train.eval_period = 2, 0
    real_evaluate = engine.evaluate

    def bad_image(*args, **kwargs):
        raise stop

    monkeypatch.setattr(engine, "evaluate", bad_image)
    with pytest.raises(type(stop)):
        train(cfg, progress=False)
    out = tmp_path / "run"
    assert sorted(p.name for p in out.glob("model_*.pt")) == ["model_0000002.pt", "model_final.pt"]
    assert load_checkpoint(out / "model_final.pt")["iteration"] == 3
    assert f"evaluation at iteration 3 did not finish; the model trained so far is saved as " \
           f"{out / 'model_final.pt'}" in caplog.text
    assert not (out / "final_metrics.json").exists()
    monkeypatch.setattr(engine, "evaluate", real_evaluate)
    result = train(cfg, resume="auto", progress=False)
    assert "student/bbox_AP" in result.metrics and (out / "final_metrics.json").is_file()
    assert load_checkpoint(out / "model_0000003.pt")["iteration"] == 3


def test_a_periodic_evaluation_that_fails_keeps_the_model_until_evaluated(tiny_cfg, tmp_path,
                                                                           monkeypatch):
    """The model of a periodic evaluation that did not finish is kept under a name of its own,
    which the resumed run removes once it has evaluated that iteration."""
    cfg = _supervised(tiny_cfg, 4, tmp_path / "run")
    cfg.train.checkpoint_period, cfg.train.eval_period = 1, 2
    real_evaluate = engine.evaluate

    def bad_image(*args, **kwargs):
        raise DatasetError("val.json: image 2 (b.jpg): cannot read image file")

    monkeypatch.setattr(engine, "evaluate", bad_image)
    with pytest.raises(DatasetError):
        train(cfg, progress=False)
    out = tmp_path / "run"
    assert sorted(p.name for p in out.glob("model_*.pt")) == ["model_0000001.pt",
                                                              "model_unevaluated_0000002.pt"]
    assert load_checkpoint(out / "model_unevaluated_0000002.pt")["iteration"] == 2
    (out / "model_unevaluated_0000005.pt").write_bytes(b"")  # past the iteration evaluated: kept
    monkeypatch.setattr(engine, "evaluate", real_evaluate)
    train(cfg, resume="auto", progress=False)
    assert sorted(p.name for p in out.glob("model_*.pt")) == [
        "model_0000002.pt", "model_0000003.pt", "model_0000004.pt", "model_best.pt",
        "model_final.pt", "model_unevaluated_0000005.pt"]


def test_a_resumed_or_repeated_run_logs_each_iteration_once(tiny_cfg, tmp_path, caplog):
    cfg = _supervised(tiny_cfg, 4, tmp_path / "run")
    cfg.train.checkpoint_period, cfg.train.keep_last, cfg.train.eval_period = 1, 4, 2
    out = tmp_path / "run"
    train(cfg, progress=False)

    def logged() -> list[tuple[str, int]]:
        rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        return [(r["kind"], r["iteration"]) for r in rows]

    def tensorboard_steps(tag: str) -> list[int]:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(out / "tensorboard"))
        events.Reload()
        return [e.step for e in events.Scalars(tag)]

    once = [("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("train", 4), ("eval", 4)]
    assert logged() == once
    # a crash after iteration 3's checkpoint: iteration 4's rows and a half-written line are dropped
    (out / "model_0000004.pt").unlink()
    (out / "model_final.pt").unlink()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 5, "ki')
    assert train(cfg, resume="auto", progress=False).started_at == 3  # what its own times cover
    assert logged() == once
    # TensorBoard alike: the resumed run replaces what was logged after its checkpoint, and keeps
    # the checkpoint's own iteration
    assert tensorboard_steps("loss") == [1, 2, 3, 4]
    assert tensorboard_steps("student/bbox_AP") == [2, 4]
    # trained again from the beginning in the same folder: the old run's rows go
    assert train(cfg, progress=False).started_at == 0
    assert logged() == once
    assert tensorboard_steps("loss") == [1, 2, 3, 4]
    # resumed when finished: nothing trained or written (other settings not even in config.yaml)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    changed = copy.deepcopy(cfg)
    changed.solver.lr = 0.5
    result = train(changed, resume="auto", progress=False)
    final = json.loads((out / "final_metrics.json").read_text())
    assert result.iteration == 4 and result.metrics == {k: v for k, v in final.items() if "/" in k}
    assert "student/bbox_AP" in result.metrics
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert "model_0000004.pt is at solver.max_iter (4): nothing to train" in caplog.text
    assert result.started_at == 4
    (out / "model_final.pt").unlink()  # a process stopped between the last checkpoint and it
    train(changed, resume="auto", progress=False)
    assert (out / "model_final.pt").stat().st_ino == (out / "model_0000004.pt").stat().st_ino
    # started again on a shorter schedule: the earlier run's files are named, and its checkpoints
    # past the new end make --resume refuse rather than "train" from 4 to 2
    short = copy.deepcopy(cfg)
    short.solver.max_iter, short.solver.steps = 2, ()
    train(short, progress=False)
    assert "model_final.pt, model_best.pt, final_metrics.json of an earlier run in this folder stay " \
           "until this run writes its own" in caplog.text
    with pytest.raises(CheckpointError, match=r"model_0000004.pt is at iteration 4, past "
                                              r"solver.max_iter=2: .*\(or move it away"):
        train(short, resume="auto", progress=False)
    caplog.clear()
    train(short, resume=str(out / "model_0000001.pt"), progress=False)  # an earlier one, on purpose
    assert "3 checkpoint(s) past iteration 1 (model_0000002.pt, model_0000003.pt, model_0000004.pt) " \
           "are replaced as this run reaches" in caplog.text


def test_the_progress_bar_is_drawn_on_a_terminal_only(tmp_path, monkeypatch, caplog, capsys):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    logger = engine.MetricLogger(tmp_path, 0, 10, progress=True)
    assert logger.bar is None  # a log file gets a line per logged step, not carriage returns
    with caplog.at_level("INFO", logger="softteacher"):
        logger.progress(5, {"loss": "1.20"}, 5, 10)
    assert "iteration 5/10 loss 1.20" in caplog.text
    logger.close()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    logger = engine.MetricLogger(tmp_path, 0, 10, progress=True)
    assert logger.bar is not None and logger.bar.total == 10
    logger.bar.mininterval = logger.bar.miniters = 0  # drawn at every update
    capsys.readouterr()
    logger.progress(5, {"loss": "1.20"}, 5, 10)
    drawn = capsys.readouterr().err.strip("\r\n").split("\r")[-1]
    assert "5/10" in drawn and "loss=1.20" in drawn  # this step's numbers drawn with it
    logger.write("iteration 5, student: AP 0.1")
    out, err = capsys.readouterr()
    assert out == "" and "iteration 5, student: AP 0.1" in err  # beside the bar and the log
    logger.close()


def test_a_file_that_is_no_checkpoint_is_refused_without_advice_to_unpickle_it(tmp_path):
    import fractions

    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8)).save(photo)
    pickled = tmp_path / "other.pt"
    torch.save({"w": torch.zeros(2), "f": fractions.Fraction(1, 2)}, pickled)
    text = tmp_path / "notes.pt"
    text.write_text("epoch 3\n")
    for path, detail in ((photo, "operand"), (pickled, "fractions.Fraction"), (text, "")):
        with pytest.raises(CheckpointError) as caught:
            load_checkpoint(path)
        message = str(caught.value)  # torch's own words (in brackets) depend on its version
        assert message.startswith(f"{path}: not a readable checkpoint: no torch.save file of tensors "
                                  f"and plain data (")
        assert message.endswith("); other objects are never loaded, as unpickling them can run code")
        assert detail in message and "weights_only" not in message and "\n" not in message
    # the same words for a --weights file
    from softteacher.model import load_state_file

    with pytest.raises(ValueError) as caught:
        load_state_file(str(pickled))
    message = str(caught.value)
    assert message.startswith(f"{pickled}: cannot read weights (") and "fractions.Fraction" in message
    assert "weights_only" not in message and "\n" not in message


def test_a_checkpoint_whose_bytes_changed_is_refused(tmp_path):
    import zipfile

    path = tmp_path / "model_0000001.pt"
    save_checkpoint(path, {"format": FORMAT, "iteration": 1, "w": torch.zeros(64)})
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    raw = bytearray(path.read_bytes())
    local = info.header_offset  # the local header: its name and extra field lengths, then the bytes
    start = local + 30 + int.from_bytes(raw[local + 26:local + 28], "little") + int.from_bytes(
        raw[local + 28:local + 30], "little")
    raw[start:start + 8] = b"\x01" * 8
    path.write_bytes(bytes(raw))
    assert torch.load(path, weights_only=True)["w"].count_nonzero() > 0  # torch reads it as it is
    with pytest.raises(CheckpointError, match=r"model_0000001.pt: damaged: its part .*/data/0 does not "
                                              r"match its checksum"):
        load_checkpoint(path)
    assert load_checkpoint(path, mmap=True)["iteration"] == 1  # mapped: not read whole, not checked


def test_files_are_written_where_permissions_cannot_be_set(tmp_path, monkeypatch):
    # a FAT file system (a USB drive) refuses chmod: the file is written as it is, no temp left
    import os

    from softteacher import io

    def refuse(path, mode):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(io.os, "chmod", refuse)
    io.write_text(tmp_path / "config.yaml", "a: 1\n")
    save_checkpoint(tmp_path / "model_0000001.pt", {"format": FORMAT, "iteration": 1})
    assert sorted(os.listdir(tmp_path)) == ["config.yaml", "model_0000001.pt"]
    assert (tmp_path / "config.yaml").read_text() == "a: 1\n"


def test_a_file_that_cannot_replace_its_name_is_named_in_the_error(tmp_path):
    from softteacher import io

    (tmp_path / "picture.png").mkdir()  # a folder in the way
    with pytest.raises(IsADirectoryError) as e:
        io.write_text(tmp_path / "picture.png", "x")
    assert e.value.filename == str(tmp_path / "picture.png")  # not the hidden temp file's name
    assert [p.name for p in tmp_path.iterdir()] == ["picture.png"]


def test_a_checkpoint_file_depends_on_its_state_alone(tmp_path):
    """Runs name their start by the SHA-256 of its file: one state written twice, under other
    temp names, gives the same bytes; another state does not."""
    state = {"format": FORMAT, "w": torch.arange(6.0).reshape(2, 3), "iteration": 7}
    save_checkpoint(tmp_path / "a" / "model_0000007.pt", state)
    save_checkpoint(tmp_path / "b" / "model_0000007.pt", state)
    a, b = ((tmp_path / d / "model_0000007.pt").read_bytes() for d in "ab")
    assert a == b
    assert torch.equal(load_checkpoint(tmp_path / "b" / "model_0000007.pt")["w"], state["w"])
    save_checkpoint(tmp_path / "c.pt", {**state, "iteration": 8})
    assert (tmp_path / "c.pt").read_bytes() != a


def test_checkpoints_reach_the_disk_before_their_rename_and_older_ones_go(tmp_path, monkeypatch):
    import os

    from softteacher.checkpoint import CheckpointManager

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(dst).name))
        real_replace(src, dst)

    state = {"format": FORMAT, "w": torch.zeros(2), "iteration": 1}
    manager = CheckpointManager(tmp_path / "run", keep_last=1)
    manager.save(1, state)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    manager.save(2, {**state, "iteration": 2})
    temp, *rest = events
    assert temp[0] == "fsync" and temp[1].startswith(".model_0000002.pt.") and temp[1].endswith(".tmp")
    assert rest == [("replace", "model_0000002.pt"), ("fsync", "run")]  # the file, the rename, the folder
    assert [p.name for p in manager.numbered()] == ["model_0000002.pt"]  # keep_last=1: the older one went


def test_a_checkpoint_that_cannot_be_written_is_named_and_keeps_the_ones_before(tmp_path, monkeypatch):
    # the disk fills in the middle of torch.save's writes, whose archive writer then raises a
    # RuntimeError of its own on the way out: the disk's error is what is said
    import errno
    import io

    from softteacher import checkpoint

    class FullDisk(io.FileIO):
        def write(self, b):
            if self.tell() > 100:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(b)

    manager = CheckpointManager(tmp_path / "run", keep_last=1)
    manager.save(1, {"format": FORMAT, "iteration": 1})
    monkeypatch.setattr(checkpoint, "open", lambda path, mode: FullDisk(path, mode), raising=False)
    written = r"model_0000002.pt: checkpoint not written \(No space left on device\); the ones before"
    with pytest.raises(OSError, match=written) as e:
        manager.save(2, {"format": FORMAT, "iteration": 2, "weights": torch.ones(5000)})
    assert e.value.errno == errno.ENOSPC
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["model_0000001.pt"]  # no temp file
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "run" / "model_0000001.pt")["iteration"] == 1
    with pytest.raises(CheckpointError, match="run: a folder, not a checkpoint"):
        load_checkpoint(tmp_path / "run")


def test_ctrl_c_while_a_checkpoint_is_written_is_an_interrupt_and_leaves_no_file(tmp_path, monkeypatch):
    # the interrupt lands in the middle of torch.save's writes, whose archive writer then raises
    # a RuntimeError of its own on the way out: the interrupt must come through, not that error
    import io

    from softteacher import checkpoint

    class CutByCtrlC(io.FileIO):
        writes = 0

        def write(self, b):
            CutByCtrlC.writes += 1
            if CutByCtrlC.writes == 3:
                raise KeyboardInterrupt
            return super().write(b)

    manager = CheckpointManager(tmp_path / "run", keep_last=2)
    manager.save(1, {"format": FORMAT, "iteration": 1})
    monkeypatch.setattr(checkpoint, "open", lambda path, mode: CutByCtrlC(path, mode), raising=False)
    with pytest.raises(KeyboardInterrupt):
        manager.save(2, {"format": FORMAT, "iteration": 2, "weights": torch.ones(5000)})
    assert CutByCtrlC.writes == 3  # the interrupt came from inside torch.save's writes
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["model_0000001.pt"]
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "run" / "model_0000001.pt")["iteration"] == 1


def test_pruning_keeps_the_new_checkpoint_and_another_runs_later_ones(tiny_cfg, tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    for it in (10, 15, 20):  # a longer run's, left in the folder
        save_checkpoint(out / f"model_{it:07d}.pt", {"format": FORMAT, "iteration": it})
    (out / ".model_0000025.pt.k1x2.tmp").write_bytes(b"half")  # its last, killed while written
    cfg = _supervised(tiny_cfg, 3, out)
    cfg.train.checkpoint_period, cfg.train.keep_last = 1, 2
    train(cfg, progress=False)  # from scratch: saves 1, 2, 3 and copies 3 as the final one
    assert "3 checkpoint(s) past iteration 0, of another run" in caplog.text
    assert not list(out.glob(".*.tmp"))
    assert [p.name for p in CheckpointManager(out).numbered()] == [
        "model_0000002.pt", "model_0000003.pt", "model_0000010.pt", "model_0000015.pt", "model_0000020.pt"]
    assert load_checkpoint(out / "model_final.pt")["iteration"] == 3


def test_logged_step_time_leaves_the_first_step_out():
    assert engine.smoothed_time(0.0, 9.0, 1) == 9.0  # the only step so far
    assert engine.smoothed_time(9.0, 1.0, 2) == 1.0  # the slow first step dropped
    assert engine.smoothed_time(1.0, 2.0, 3) == pytest.approx(1.1)
    assert engine.smoothed_time(1.1, 2.0, 4) == pytest.approx(1.19)


def test_logged_data_time_is_the_wait_for_a_slow_loader(tiny_cfg, tmp_path, monkeypatch):
    import time

    from softteacher.data.loading import MixedDataset

    cfg = _supervised(tiny_cfg, 3, tmp_path / "run")
    assert cfg.data.num_workers == 0 and cfg.train.batch_size == 2  # the views are made in the loop
    real = MixedDataset.__getitem__

    def slow(self, item):
        time.sleep(0.05)
        return real(self, item)

    monkeypatch.setattr(MixedDataset, "__getitem__", slow)
    train(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert len(train_rows) == 3
    for r in train_rows:  # two views of 0.05 s each per step, and the step holds its wait
        assert 0.1 <= r["time/data_s"] <= r["time/step_s"]


def _spoil_second_step(monkeypatch, spoil) -> None:
    """The supervised step's second call returns ``spoil(loss, its keyword arguments)``."""
    real, calls = engine.supervised_step, {"n": 0}

    def step(**kw):
        calls["n"] += 1
        loss, logs = real(**kw)
        return (spoil(loss, kw) if calls["n"] == 2 else loss), logs

    monkeypatch.setattr(engine, "supervised_step", step)


def test_nan_steps_are_skipped_then_training_stops(tiny_cfg, tmp_path, monkeypatch):
    real = engine.supervised_step
    _spoil_second_step(monkeypatch, lambda loss, kw: loss * float("nan"))
    cfg = _supervised(tiny_cfg, 4, tmp_path / "one_nan")
    result = train(cfg, progress=False)
    assert result.skipped_steps == 1 and result.iteration == 4
    for v in _weights(tmp_path / "one_nan" / "model_final.pt").values():
        assert torch.isfinite(v.float()).all()

    def refuse(word):
        raise ValueError(f"not JSON: {word}")

    rows = [json.loads(line, parse_constant=refuse)  # strict JSON: the skipped step's loss is null
            for line in (tmp_path / "one_nan" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if r["kind"] == "train" and r["iteration"] == 2]
    assert len(skipped) == 1 and skipped[0]["loss"] is None, skipped
    assert all(isinstance(r["loss"], float) for r in rows if r["kind"] == "train" and r["iteration"] != 2)

    def always_inf(**kw):
        loss, logs = real(**kw)
        return loss * float("inf"), logs

    monkeypatch.setattr(engine, "supervised_step", always_inf)
    # skipped steps change nothing: the weights stay those the run started from
    cfg = _supervised(tiny_cfg, 2, tmp_path / "two_inf")
    cfg.solver.max_bad_steps = 3
    assert train(cfg, progress=False).skipped_steps == 2
    engine.seed_everything(cfg.train.seed)
    start = engine.build_detector(cfg.model, engine.load_data(cfg).labeled.num_classes).state_dict()
    final = _weights(tmp_path / "two_inf" / "model_final.pt")
    assert final.keys() == start.keys()
    for k, v in start.items():
        assert torch.equal(final[k], v), k
    # the streak is part of the run: resumed, it stops at the third bad step in a row, not the fifth
    assert load_checkpoint(tmp_path / "two_inf" / "model_final.pt")["bad_steps_in_row"] == 2
    cfg.solver.max_iter = 4
    with pytest.raises(TrainingError, match="non-finite for 3 iterations in a row at iteration 2"):
        train(cfg, resume="auto", progress=False)

    cfg = _supervised(tiny_cfg, 10, tmp_path / "all_nan")
    cfg.solver.max_bad_steps = 3
    cfg.data.num_workers = 1
    with pytest.raises(TrainingError, match="non-finite for 3 iterations in a row") as stopped:
        train(cfg, progress=False)
    # the loader's process ends with the run, though the error (and its frames) is still held
    import multiprocessing

    assert stopped.value is not None and multiprocessing.active_children() == []


@pytest.mark.parametrize("clip", [0.0, 10.0])
def test_a_finite_loss_with_a_non_finite_gradient_is_skipped(tiny_cfg, tmp_path, monkeypatch, caplog, clip):
    # the square root's gradient at 0 is infinite: the loss stays finite, every gradient would
    # carry the inf (through clipping, too) into the weights
    def inf_gradient(loss, kw):
        anchor = next(p for p in kw["student"].parameters() if p.requires_grad)
        return loss + (anchor.flatten()[0] * 0).abs().sqrt()

    _spoil_second_step(monkeypatch, inf_gradient)
    cfg = _supervised(tiny_cfg, 3, tmp_path / "run")
    cfg.solver.clip_grad_norm = clip
    with caplog.at_level("WARNING", logger="softteacher"):
        result = train(cfg, progress=False)
    assert result.skipped_steps == 1
    assert re.search(r"iteration 1: non-finite gradient \(norm (nan|inf)\) of the loss [0-9.]+, step skipped "
                     r"\(1 in a row\)", caplog.text)
    for v in _weights(tmp_path / "run" / "model_final.pt").values():
        assert torch.isfinite(v.float()).all()


def test_a_step_another_process_found_non_finite_is_skipped_and_said(tiny_cfg, tmp_path, monkeypatch, caplog):
    # this process's loss and gradient finite, another's not: every process skips the step
    from softteacher import distributed

    real, calls = distributed.all_true, {"n": 0}

    def another_process_failed(flag, device):
        calls["n"] += 1
        return False if calls["n"] == 2 else real(flag, device)

    monkeypatch.setattr(distributed, "all_true", another_process_failed)
    cfg = _supervised(tiny_cfg, 3, tmp_path / "run")
    cfg.data.val = ""
    with caplog.at_level("WARNING", logger="softteacher"):
        assert train(cfg, progress=False).skipped_steps == 1
    assert re.search(r"iteration 1: non-finite loss or gradient in another process \(this one's loss "
                     r"[0-9.]+\), step skipped \(1 in a row\)", caplog.text)


def test_labeled_boxes_dropped_from_the_views_are_logged_and_all_dropped_said(tiny_cfg, tmp_path, caplog):
    cfg = _supervised(tiny_cfg, 2, tmp_path / "kept")
    cfg.train.log_period, cfg.data.val = 1, ""
    with caplog.at_level("WARNING", logger="softteacher"):
        train(cfg, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "kept" / "metrics.jsonl").read_text().splitlines()]
    assert [r["data/dropped_box_fraction"] for r in rows if r["kind"] == "train"] == [0.0, 0.0]
    assert "was dropped from the training views" not in caplog.text
    cfg = _supervised(tiny_cfg, 2, tmp_path / "dropped")
    cfg.augment.min_box_size = 10_000.0  # no box is that large in a view
    with caplog.at_level("WARNING", logger="softteacher"):
        train(cfg, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "dropped" / "metrics.jsonl").read_text().splitlines()]
    assert [r["data/dropped_box_fraction"] for r in rows if r["kind"] == "train"] == [1.0, 1.0]
    assert caplog.text.count("was dropped from the training views, smaller than "
                             "augment.min_box_size=10000.0 px once resized") == 1


def test_an_undefined_val_ap_is_said_and_chooses_no_best_model(tiny_cfg, tmp_path, caplog):
    val = json.loads(Path(tiny_cfg.data.val).read_text())
    val["annotations"] = []  # no box to score against: AP is NaN
    path = tmp_path / "val.json"
    path.write_text(json.dumps(val))
    cfg = _supervised(tiny_cfg, 2, tmp_path / "run")
    cfg.data.val = str(path)  # its images in data.val_images, as before
    cfg.train.eval_period = 1
    with caplog.at_level("WARNING", logger="softteacher"):
        train(cfg, progress=False)
    assert caplog.text.count("AP on val is undefined (no box in the val set to score against), so no "
                             "model_best.pt is chosen") == 1
    assert not (tmp_path / "run" / "model_best.pt").exists()


def test_an_exported_model_predicts_as_its_checkpoint_and_starts_but_does_not_resume_a_run(
        tiny_cfg, tiny_shapes, tmp_path, capsys, caplog):
    cfg = _supervised(tiny_cfg, 1, tmp_path / "run")
    cfg.solver.steps = ()
    caplog.set_level("INFO")
    train(cfg, progress=False)
    assert f"model: {cfg.model.backbone} FPN, norm gn, 8 classes, from scratch; batch per process: " \
           f"{cfg.train.batch_size} labeled images; output: {tmp_path / 'run'}" in caplog.text
    full, lean = tmp_path / "run" / "model_final.pt", tmp_path / "model.pt"
    assert main(["export", str(full), "--out", str(lean)]) == 0
    assert capsys.readouterr().out.startswith(f"student at iteration 1 -> {lean} (")
    state = load_checkpoint(lean)
    assert set(state) == {"format", "iteration", "config", "fingerprint", "categories", "exported",
                          "report", "student"}
    assert state["student"].keys() == _weights(full).keys()
    assert all(torch.equal(a, b) for a, b in zip(state["student"].values(), _weights(full).values()))
    assert lean.stat().st_size < 0.6 * full.stat().st_size  # no optimizer momentum, no teacher slot
    for path, out in ((full, "a"), (lean, "b")):
        assert main(["predict", str(path), tiny_shapes.val_images, "--out", str(tmp_path / out),
                     "--score-thresh", "0.0"]) == 0
    assert (tmp_path / "a" / "results.json").read_text() == (tmp_path / "b" / "results.json").read_text()
    # the other model is not there; the checkpoint is not overwritten
    assert main(["export", str(full), "--out", str(tmp_path / "t.pt"), "--model", "teacher"]) == 2
    assert "has no teacher weights (supervised checkpoints hold the student only)" in capsys.readouterr().err
    assert main(["predict", str(lean), tiny_shapes.val_images, "--out", str(tmp_path / "c"),
                 "--model", "teacher"]) == 2
    assert "has no teacher weights (an exported model holds one model: its student)" in \
        capsys.readouterr().err
    assert main(["export", str(full), "--out", str(full)]) == 2
    assert main(["export", str(full), "--out", str(tmp_path / "run" / "model_0000001.pt")]) == 2  # a link
    assert "the checkpoint itself (or another name of it)" in capsys.readouterr().err
    assert main(["export", str(full), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path}: a folder: --out names the file to write\n"
    # a file there is kept unless --force; a folder meant by a trailing slash, or a file as folder
    kept = lean.read_bytes()
    assert main(["export", str(full), "--out", str(lean)]) == 2
    assert capsys.readouterr().err == f"error: {lean}: there already (--force replaces it)\n"
    assert lean.read_bytes() == kept
    assert main(["export", str(full), "--out", str(lean), "--force"]) == 0
    capsys.readouterr()
    assert main(["export", str(full), "--out", f"{tmp_path / 'new'}/"]) == 2
    assert not (tmp_path / "new").exists() and "a folder: --out names the file" in capsys.readouterr().err
    assert main(["export", str(full), "--out", str(lean / "x.pt")]) == 2
    assert capsys.readouterr().err == f"error: {lean / 'x.pt'}: {lean} is a file, not a folder\n"
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "y.pt")]) == 2
    assert "a folder; export takes a checkpoint file" in capsys.readouterr().err
    # a start for another run (--weights), not a run to resume
    names = [c["name"] for c in state["categories"]]
    built = build_detector(replace(cfg.model, weights=str(lean)), len(names), names)
    assert built.state_dict().keys() == _weights(full).keys()
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), _weights(full).values()))
    with pytest.raises(CheckpointError, match="an exported model .* does not resume; start from it "
                                              "with --weights"):
        train(_supervised(tiny_cfg, 2, tmp_path / "again"), resume=str(lean), progress=False)
    capsys.readouterr()
    assert main(["train", "--resume", str(lean)]) == 2  # no data, no --out: its folder holds no run
    assert capsys.readouterr().err == (f"error: {lean}: an exported model (one model, no optimizer or "
                                       f"random states) does not resume; start from it with --weights\n")
    (tmp_path / "notes.pt").write_text("not a checkpoint")  # a file, no run beside it: what it is
    assert main(["train", "--resume", str(tmp_path / "notes.pt")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'notes.pt'}: not a readable checkpoint")


def test_eval_predict_and_refusals_through_the_cli(tiny_cfg, tiny_shapes, tmp_path, capsys):
    train(_supervised(tiny_cfg, 2, tmp_path / "run"), progress=False)
    ckpt_path = str(tmp_path / "run" / "model_final.pt")
    assert main(["eval", ckpt_path, "--data", tiny_shapes.val_json, "--images", tiny_shapes.val_images,
                 "--out", str(tmp_path / "eval"), "--score-thresh", "0.001"]) == 0
    out = capsys.readouterr().out
    assert "model: student" in out and "AP50" in out
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["model"] == "student" and metrics["eval_batch_size"] == 1
    val = json.loads(Path(tiny_shapes.val_json).read_text())
    listed = json.loads((tmp_path / "eval" / "images.json").read_text())  # what results' ids name
    assert [(i["id"], i["file_name"]) for i in listed["images"]] == [
        (i["id"], i["file_name"]) for i in val["images"]]
    assert listed["categories"] == [{"id": c["id"], "name": c["name"]} for c in val["categories"]]
    assert 0.0 <= metrics["bbox_AP"] <= 1.0

    class ClosedPipe:  # `eval ... | head -1`: the reader gone before the metrics are printed
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stdout", ClosedPipe())
        main(["eval", ckpt_path, "--data", tiny_shapes.val_json, "--images", tiny_shapes.val_images,
              "--out", str(tmp_path / "eval_piped"), "--score-thresh", "0.001", "--workers", "2"])
    assert json.loads((tmp_path / "eval_piped" / "metrics.json").read_text()) == metrics
    # read by two loader processes: the same detections
    piped, first = (tmp_path / name / "results.json" for name in ("eval_piped", "eval"))
    assert piped.read_bytes() == first.read_bytes()
    capsys.readouterr()
    # an --out that cannot be a folder is said before the evaluation, which it would otherwise lose
    (tmp_path / "afile").write_text("")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "evaluate", lambda *a, **kw: pytest.fail("evaluated before --out was made"))
        assert main(["eval", ckpt_path, "--data", tiny_shapes.val_json, "--images",
                     tiny_shapes.val_images, "--out", str(tmp_path / "afile")]) == 2
    assert str(tmp_path / "afile") in capsys.readouterr().err

    assert main(["predict", ckpt_path, tiny_shapes.val_images, "--out", str(tmp_path / "pred"),
                 "--score-thresh", "0.05"]) == 0
    results = json.loads((tmp_path / "pred" / "results.json").read_text())
    info = json.loads((tmp_path / "pred" / "images.json").read_text())
    assert len(info["images"]) == 4 and len(list((tmp_path / "pred").glob("*.jpg"))) == 4
    cat_ids = {c["id"] for c in info["categories"]}
    for r in results:
        assert r["category_id"] in cat_ids and r["image_id"] in {i["id"] for i in info["images"]}
        assert len(r["bbox"]) == 4

    # pictures never go where the inputs are: they would replace them, or be read next time
    inputs = tmp_path / "photos"
    shutil.copytree(tiny_shapes.val_images, inputs)
    before = {p.name: p.read_bytes() for p in inputs.iterdir()}
    for out in (inputs, tmp_path / "pred"):
        folders = [tiny_shapes.val_images, str(tmp_path / "pred")] if out != inputs else [str(inputs)]
        assert main(["predict", ckpt_path, *folders, "--out", str(out)]) == 2
        assert f"the output folder {out} holds input images" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in inputs.iterdir()} == before
    assert len(list((tmp_path / "pred").glob("*.jpg"))) == 4
    # nor into a folder inside an input folder, empty as it is the first time
    assert main(["predict", ckpt_path, str(inputs), "--out", str(inputs / "preds")]) == 2
    assert f"the output folder {inputs / 'preds'} is in the input folder {inputs.resolve()}" in \
        capsys.readouterr().err
    assert not (inputs / "preds").exists()

    # teacher asked of a supervised checkpoint
    assert main(["predict", ckpt_path, tiny_shapes.val_images, "--out", str(tmp_path / "p2"),
                 "--model", "teacher"]) == 2
    assert "has no teacher" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage")
    assert main(["eval", str(corrupt), "--data", tiny_shapes.val_json,
                 "--images", tiny_shapes.val_images]) == 2
    assert "corrupt.pt: not a readable checkpoint" in capsys.readouterr().err
    # the same class names under other ids: the message shows the ids that differ
    renumbered = json.loads(Path(tiny_shapes.val_json).read_text())
    for category in renumbered["categories"]:
        category["id"] += 10
    for annotation in renumbered["annotations"]:
        annotation["category_id"] += 10
    (tmp_path / "renumbered.json").write_text(json.dumps(renumbered))
    assert main(["eval", ckpt_path, "--data", str(tmp_path / "renumbered.json"),
                 "--images", tiny_shapes.val_images]) == 2
    first = min(renumbered["categories"], key=lambda c: c["id"])
    err = capsys.readouterr().err
    n = len(renumbered["categories"])
    assert f"renumbered.json: classes differ from the checkpoint's: [{first['id']} {first['name']}, " in err
    assert f"against [{first['id'] - 10} {first['name']}, " in err and f"({n} and {n} classes)" in err

    # a val image missing and one of another size than its record: both named, before any inference
    broken = tmp_path / "broken_val"
    shutil.copytree(tiny_shapes.val_images, broken)
    first, second = sorted(broken.iterdir())[:2]
    first.unlink()
    with Image.open(second) as im:
        im.resize((im.width + 1, im.height)).save(second)
    assert main(["eval", ckpt_path, "--data", tiny_shapes.val_json, "--images", str(broken),
                 "--out", str(tmp_path / "eval_broken")]) == 2
    err = capsys.readouterr().err
    assert "2 problems" in err and f"image file not found: {first}" in err
    assert f"file {second} is " in err and "the annotations say" in err
    # the set's own folder, beside its json's annotations/, holds both files as recorded
    found = Path(tiny_shapes.val_images).resolve()
    assert (f"(images are read under {broken}: --images DIR names the image folder; files of those "
            f"names and sizes are under {found}: --images {found})") in err
    assert not (tmp_path / "eval_broken").exists()
    cfg = _supervised(copy.deepcopy(tiny_cfg), 2, tmp_path / "broken_run")
    cfg.data.val_images = str(broken)
    with pytest.raises(DatasetError, match=re.escape(f"1 of 4 image files not found under {broken} "
                                                     f"(--val-images DIR names the image folder; files "
                                                     f"of those names and sizes are under {found}")):
        train(cfg, progress=False)
    assert not (tmp_path / "broken_run" / "metrics.jsonl").exists()
    shutil.copy(Path(tiny_shapes.val_images) / first.name, first)  # then the file of another size
    with pytest.raises(DatasetError, match=re.escape(f"file {second} is ")):
        train(cfg, progress=False)
    assert not (tmp_path / "broken_run" / "metrics.jsonl").exists()

    # eval gives each image the detections predict gives it alone (above 0.05, the model's own
    # score threshold, which eval keeps by default), unless batches pad it to another image's size
    files = {im["id"]: im["file_name"] for im in json.loads(Path(tiny_shapes.val_json).read_text())["images"]}

    def detections(results, names):
        out = {}
        for r in results:
            out.setdefault(Path(names[r["image_id"]]).name, []).append(
                (r["category_id"], r["score"], *r["bbox"]))
        return {k: sorted(v) for k, v in out.items()}

    def evaluated(*extra):
        out = tmp_path / f"eval{len(extra)}"
        assert main(["eval", ckpt_path, "--data", tiny_shapes.val_json, "--images",
                     tiny_shapes.val_images, "--out", str(out), *extra]) == 0
        return detections(json.loads((out / "results.json").read_text()), files), capsys.readouterr().out

    alone, printed = evaluated()
    assert "in batches of 1" in printed
    predicted = detections(results, {im["id"]: im["file_name"] for im in info["images"]})
    assert len(alone) == len(files) and predicted == alone
    assert len({(im["width"], im["height"]) for im in info["images"]}) > 1
    batched, printed = evaluated("--batch-size", "4")
    assert "in batches of 4" in printed and batched.keys() == alone.keys() and batched != alone
    assert main(["eval", ckpt_path, "--data", tiny_shapes.val_json, "--images",
                 tiny_shapes.val_images, "--batch-size", "0"]) == 2
    assert "--batch-size 0: expected at least 1" in capsys.readouterr().err
    assert main(["eval", ckpt_path, "--data", tiny_shapes.val_json, "--images",
                 tiny_shapes.val_images, "--score-thresh", "5"]) == 2
    assert "score threshold 5.0: expected a number from 0 to 1" in capsys.readouterr().err
    # and training refuses it before its first step
    cfg = _supervised(tiny_cfg, 2, tmp_path / "zero")
    cfg.train.eval_batch_size = 0
    with pytest.raises(ValueError, match="train.eval_batch_size must be at least 1, got 0"):
        train(cfg, progress=False)
    assert not (tmp_path / "zero" / "metrics.jsonl").exists()


def test_a_refused_run_leaves_the_folder_s_config(tmp_path):
    """A run that stops at its data leaves an earlier run's config.yaml as it was."""
    from softteacher.config import preset_tiny
    from softteacher.data.records import DatasetError

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_bytes(b"train:\n  seed: 7\n")
    cfg = _supervised(preset_tiny(), 2, out)
    cfg.data.train = str(tmp_path / "missing.json")
    with pytest.raises(DatasetError, match="missing.json: no such file"):
        train(cfg, progress=False)
    assert (out / "config.yaml").read_bytes() == b"train:\n  seed: 7\n"
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


def test_a_run_writing_into_its_unlabeled_image_folder_is_refused(tiny_cfg, tiny_shapes, tmp_path):
    """A folder of unlabeled images is read whole: a run writing its pictures there would feed
    them to the next run as unlabeled images. A json lists its images, so its folder is free."""
    folder = tmp_path / "photos"
    shutil.copytree(tiny_shapes.unlabeled_images, folder)
    tiny_cfg.data.unlabeled, tiny_cfg.data.unlabeled_images, tiny_cfg.data.unlabeled_gt = str(folder), "", ""
    for out in (folder / "run", folder):
        tiny_cfg.train.output_dir = str(out)
        with pytest.raises(ValueError, match=f"train: the output folder {re.escape(str(out))} is in the "
                                             f"unlabeled image folder {re.escape(str(folder))};"):
            train(tiny_cfg, progress=False)
    assert not (folder / "run").exists()
    assert main(["train", "--preset", "tiny", "--train", tiny_shapes.train_json, "--train-images",
                 tiny_shapes.train_images, "--unlabeled", str(folder), "--out", str(folder / "r2"),
                 "--no-progress"]) == 2
    assert not (folder / "r2").exists()


def test_a_pretrained_backbones_checkpoint_builds_as_trained_and_resumes_only_so(tiny_cfg, tmp_path):
    import torchvision

    from softteacher.model import CachedFrozenBatchNorm2d

    torch.manual_seed(0)
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    cfg = _supervised(tiny_cfg, 2, tmp_path / "run")
    cfg.model.backbone, cfg.model.backbone_weights = "resnet18", str(weights)
    result = train(cfg, progress=False)
    final = tmp_path / "run" / "model_final.pt"
    weights.unlink()  # the file the backbone started from is not needed to use the model
    # norm auto: FrozenBN over the pretrained backbone, not the GroupNorm it has from scratch
    model, built, _, _ = engine.model_from_checkpoint(final, None, torch.device("cpu"))
    assert built.model.norm == "frozen_bn"
    assert any(isinstance(m, CachedFrozenBatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in model.backbone.body.modules())
    image = [torch.rand(3, 64, 80)]
    trained = result.student.eval()
    with torch.no_grad():
        a, b = model(image)[0], trained(image)[0]
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores)
    # resumed with the backbone file gone: the checkpoint holds every weight, no file is read
    cfg.solver.max_iter = 3
    assert train(cfg, resume="auto", progress=False).iteration == 3
    # a new run started from it (--weights) is built as it was (FrozenBN, the stem frozen),
    # though it names no backbone file, and reads none
    again = _supervised(copy.deepcopy(tiny_cfg), 1, tmp_path / "again")
    again.model.backbone, again.model.weights = "resnet18", str(final)
    again.model.trainable_layers = 3  # as a pretrained backbone trains; from scratch: all five
    started = train(again, progress=False).student
    assert any(isinstance(m, CachedFrozenBatchNorm2d) for m in started.modules())
    assert not started.backbone.body.conv1.weight.requires_grad
    assert started.backbone.body.layer4[0].conv1.weight.requires_grad
    # resumed from scratch it would be another model and train other layers: refused, named
    cfg.model.backbone_weights = ""
    cfg.solver.max_iter = 4
    with pytest.raises(CheckpointError, match="pretrained_backbone: True vs False"):
        train(cfg, resume="auto", progress=False)


def test_resume_takes_other_detection_and_speed_settings_and_older_fingerprints(tiny_cfg, tmp_path):
    import dataclasses

    cfg = _supervised(tiny_cfg, 2, tmp_path / "run")
    train(cfg, progress=False)
    final = tmp_path / "run" / "model_final.pt"
    state = load_checkpoint(final)
    # a checkpoint written before the fingerprint left out the runtime keys and named whether
    # the backbone was pretrained: every model field, the weight files nulled
    old = dataclasses.asdict(cfg.model) | {"backbone_weights": None, "weights": None,
                                           "torchvision_weights": None}
    state["fingerprint"] = json.loads(json.dumps(old))
    torch.save(state, tmp_path / "old.pt")
    cfg.solver.max_iter = 3
    cfg.model.box_score_thresh, cfg.model.box_detections_per_img = 0.2, 50
    cfg.model.rpn_post_nms_top_n_test = 7
    for path in (final, tmp_path / "old.pt"):
        assert train(copy.deepcopy(cfg), resume=str(path), progress=False).iteration == 3
    cfg.model.representation_size += 1  # what the weights are still has to agree
    with pytest.raises(CheckpointError, match="another model config.*representation_size"):
        train(cfg, resume=str(tmp_path / "old.pt"), progress=False)


def test_resume_refuses_other_classes_or_model(tiny_cfg, tmp_path):
    cfg = _supervised(tiny_cfg, 2, tmp_path / "run")
    train(cfg, progress=False)
    ckpt_path = tmp_path / "run" / "model_final.pt"
    state = load_checkpoint(ckpt_path)
    cfg.solver.max_iter = 3
    cfg.model.fpn_channels = 16
    written = (tmp_path / "run" / "config.yaml").read_bytes()
    with pytest.raises(CheckpointError, match="another model config.*fpn_channels"):
        train(cfg, resume=str(ckpt_path), progress=False)
    assert (tmp_path / "run" / "config.yaml").read_bytes() == written  # the run's, not the refused one's
    cfg.model.fpn_channels = state["config"]["model"]["fpn_channels"]
    state["categories"] = state["categories"][:-1]
    torch.save(state, tmp_path / "fewer.pt")
    with pytest.raises(CheckpointError, match="fewer.pt: checkpoint is for classes"):
        train(cfg, resume=str(tmp_path / "fewer.pt"), progress=False)


def test_gradient_clipping_scales_the_first_step(tiny_cfg, tmp_path, caplog):
    """With plain SGD (no weight decay, no warm-up) the first update is -lr * g; clipping to
    max_norm scales it by max_norm / ||g|| and keeps its direction."""
    s = tiny_cfg.solver
    s.weight_decay, s.warmup_iters, s.steps, s.lr = 0.0, 0, (), 0.01
    tiny_cfg.data.val = ""

    def first_step(name, lr, clip):
        s.lr, s.clip_grad_norm = lr, clip
        train(_supervised(tiny_cfg, 1, tmp_path / name), progress=False)
        return _weights(tmp_path / name / "model_final.pt")

    with caplog.at_level("INFO", logger="softteacher"):
        w0 = first_step("still", 0.0, 0.0)  # lr 0: the initial weights
    assert "by orientation; no val set (data.val), so no evaluation" in caplog.text
    free = first_step("free", 0.01, 0.0)
    delta_free = {k: free[k] - w0[k] for k in w0 if w0[k].is_floating_point()}
    grad_norm = torch.sqrt(sum((d / 0.01).pow(2).sum() for d in delta_free.values())).item()
    assert grad_norm > 0
    clip = grad_norm / 10
    clipped = first_step("clipped", 0.01, clip)
    scale = clip / (grad_norm + 1e-6)
    for k, d in delta_free.items():
        torch.testing.assert_close(clipped[k] - w0[k], d * scale, rtol=1e-3, atol=1e-7, msg=k)


def test_more_than_100_detections_per_image_is_named(tiny_cfg, caplog):
    from softteacher.model import build_detector

    data = engine.load_data(tiny_cfg)
    model = build_detector(tiny_cfg.model, data.labeled.num_classes).eval()
    model.roi_heads.detections_per_img = 300
    with caplog.at_level("WARNING", logger="softteacher"):
        metrics, _ = engine.evaluate(model, data.val, tiny_cfg, torch.device("cpu"))
    assert "model.box_detections_per_img=300: COCO's AP counts up to 100" in caplog.text
    assert 0.0 <= metrics["bbox_AP"] <= 1.0


def test_bf16_autocast_on_the_cpu_is_taken_when_asked_for(tiny_cfg, tmp_path, monkeypatch, caplog):
    """On the CPU ``solver.amp`` auto and off train in float32, bf16 under the CPU's autocast
    (convolutions in bf16, weights and checkpoint in float32), with a warning where the CPU has
    no bf16 instructions; fp16 is refused there."""
    cpu = torch.device("cpu")
    for mode, dtype in (("auto", None), ("off", None), ("bf16", torch.bfloat16)):
        tiny_cfg.solver.amp = mode
        assert engine.amp_dtype(tiny_cfg, cpu) is dtype
    tiny_cfg.solver.amp = "fp16"
    with pytest.raises(ValueError, match="solver.amp fp16 needs a CUDA device .* on cpu"):
        engine.amp_dtype(tiny_cfg, cpu)

    assert tiny_cfg.method.enabled  # the Soft Teacher step: teacher, jitter and student under autocast
    tiny_cfg.data.val = ""
    tiny_cfg.solver.max_iter = 2
    seen: dict[str, set] = {}

    def record(module, args, output):
        if isinstance(module, torch.nn.Conv2d):
            seen[mode].add(output.dtype)

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    try:
        for mode in ("bf16", "off"):
            seen[mode] = set()
            tiny_cfg.solver.amp = mode
            tiny_cfg.train.output_dir = str(tmp_path / mode)
            with caplog.at_level("WARNING", logger="softteacher"):
                train(tiny_cfg, progress=False)
            warned = "CPU without bf16 instructions" in caplog.text
            assert warned == (mode == "bf16"), mode
            caplog.clear()
    finally:
        hook.remove()
    assert seen == {"bf16": {torch.bfloat16}, "off": {torch.float32}}
    assert engine.cpu_has_amx() is False
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert engine.cpu_has_bf16() is True and engine.cpu_has_amx() is True
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert engine.cpu_has_bf16() is None  # a torch that cannot tell: no warning either way
    assert engine.cpu_has_amx() is None
    weights = _weights(tmp_path / "bf16" / "model_final.pt")
    floats = [w for w in weights.values() if w.is_floating_point()]
    assert floats and all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in floats)


def test_an_evaluated_model_is_unchanged_until_a_tensor_of_it_is_written():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    seen = engine.EvaluatedModel()
    assert not seen.unchanged(net)  # nothing evaluated yet
    seen.record(net, {"bbox_AP": 0.5}, 10)
    net.eval()
    net(torch.ones(3, 2))  # inference in eval mode writes nothing
    assert seen.unchanged(net) and seen.metrics == {"bbox_AP": 0.5} and seen.iteration == 10
    net.load_state_dict(net.state_dict())  # the same values, written in place
    assert not seen.unchanged(net)
    seen.record(net, {"bbox_AP": 0.6}, 20)
    net.train()
    net(torch.ones(3, 2))  # BatchNorm's running statistics move
    assert not seen.unchanged(net)
    with torch.inference_mode():
        frozen = torch.nn.Linear(2, 2)
    seen.record(frozen, {"bbox_AP": 0.7}, 30)
    assert not seen.unchanged(frozen)  # inference tensors keep no version counter


class _Terminal:
    """A stderr that says it is a terminal and keeps what is written to it."""

    def __init__(self):
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass


def test_inference_reads_in_loader_processes_to_the_same_results_with_a_bar_on_a_terminal(
        tiny_cfg, monkeypatch):
    data = engine.load_data(tiny_cfg)
    torch.manual_seed(0)
    model = build_detector(tiny_cfg.model, data.labeled.num_classes).eval()
    cpu = torch.device("cpu")
    alone = engine.inference(model, data.val, tiny_cfg, cpu, score_thresh=0.0, progress="eval")
    assert len(alone) > 0 and {r["image_id"] for r in alone} == {r.image_id for r in data.val.records}
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert engine.inference(model, data.val, tiny_cfg, cpu, score_thresh=0.0, progress="eval",
                            workers=2) == alone
    n = len(data.val)
    assert "eval: 100%" in terminal.text and f"{n}/{n}" in terminal.text
    terminal.text = ""
    assert engine.inference(model, data.val, tiny_cfg, cpu, score_thresh=0.0) == alone
    assert terminal.text == ""  # no bar unless asked for one


def test_images_are_read_by_loader_processes_on_a_gpu_and_in_the_process_on_the_cpu(tiny_cfg):
    tiny_cfg.data.num_workers = 3
    assert engine.reading_workers(tiny_cfg, torch.device("cuda", 0)) == 3  # no GPU needed to ask
    assert engine.reading_workers(tiny_cfg, torch.device("cpu")) == 0
    assert engine.reading_workers(tiny_cfg, torch.device("cpu"), workers=2) == 2
    assert engine.reading_workers(tiny_cfg, torch.device("cuda"), workers=0) == 0
    with pytest.raises(ValueError, match="workers must be 0 or more, got -1"):
        engine.reading_workers(tiny_cfg, torch.device("cpu"), workers=-1)


def test_no_progress_bar_off_a_terminal_or_when_not_asked(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert engine.progress_bar(3, "eval", enabled=False) is None
    bar = engine.progress_bar(3, "eval")
    assert bar is not None and bar.total == 3
    bar.close()
    monkeypatch.setattr(terminal, "isatty", lambda: False)  # a log file
    assert engine.progress_bar(3, "eval") is None


def test_the_val_picture_draws_each_model_s_detections_above_its_threshold(tiny_cfg):
    from softteacher.visualize import color_of

    val = engine.load_data(tiny_cfg).val
    first = val.records[0]
    cid = val.categories.category_id(2)
    results = {"teacher": [{"image_id": first.image_id, "category_id": cid, "bbox": [10, 12, 30, 20],
                            "score": 0.31},
                           {"image_id": first.image_id, "category_id": cid, "bbox": [50, 50, 20, 20],
                            "score": 0.29},  # under 0.3: not drawn
                           {"image_id": val.records[1].image_id, "category_id": cid,
                            "bbox": [60, 60, 20, 20], "score": 0.9}],  # another image
               "student": []}
    picture = np.asarray(engine.val_prediction_picture(val, results))
    plain = np.asarray(Image.open(first.path).convert("RGB"))
    h, w = plain.shape[:2]
    strip = picture.shape[0] - h
    assert 0 < strip < 30 and picture.shape[1] == 2 * w + 4
    teacher, student = picture[strip:, :w], picture[strip:, w + 4:]
    np.testing.assert_array_equal(student, plain)  # no detection of the student's
    assert tuple(teacher[32, 10]) == color_of(2)  # the box's left side, x 10, y 12-32
    assert tuple(teacher[25, 40]) == color_of(2)  # its right side, x 40
    np.testing.assert_array_equal(teacher[55:68, 53:68], plain[55:68, 53:68])  # 0.29: not drawn
    np.testing.assert_array_equal(teacher[62:78, 62:78], plain[62:78, 62:78])
