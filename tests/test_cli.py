"""The command line: option names, one-line errors, listings."""

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from softteacher.cli import build_parser, main, worker_message
from softteacher.data.records import DatasetError
from softteacher.engine import resolve_device


def _parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_options_are_never_abbreviated(capsys):
    assert all(not p.allow_abbrev for p in _parsers(build_parser()))
    with pytest.raises(SystemExit) as e:  # --device is not --devices
        main(["train", "--device", "cpu"])
    assert e.value.code == 2 and "unrecognized arguments: --device" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["data", "check", "x.json", "--im", "images"])
    assert e.value.code == 2


def test_os_errors_are_one_line(tmp_path, capsys):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 4, "height": 4}],
                               "annotations": [], "categories": [{"id": 1, "name": "cat"}]}))
    taken = tmp_path / "taken"
    taken.write_text("a file")
    assert main(["split", str(ann), "--percent", "50", "--out-dir", str(taken / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(taken) in err and err.count("\n") == 1


def test_resume_in_a_folder_without_a_run_says_so(tmp_path, capsys):
    """Not "no training data": the folder is what is wrong (a typo, or a run not started)."""
    assert main(["train", "--resume", "--out", str(tmp_path / "nonexist")]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {tmp_path / 'nonexist' / 'config.yaml'}: no such file, so --resume has no "
                   f"run to continue in {tmp_path / 'nonexist'} (check the folder; to start a run "
                   f"there, give its data: --train ... or --shapes, or --config)\n")


def test_eval_batch_size_is_refused_by_its_flag_before_the_checkpoint_is_read(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "none.pt"), "--data", "v.json", "--batch-size", "0"]) == 2
    assert capsys.readouterr().err == "error: --batch-size 0: expected at least 1\n"
    assert main(["eval", str(tmp_path / "none.pt"), "--data", "v.json", "--workers", "-1"]) == 2
    assert capsys.readouterr().err == "error: --workers -1: expected 0 or more\n"


def test_a_process_whose_peer_stopped_ends_in_one_line(monkeypatch, capsys):
    from softteacher import cli

    def lost(args):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:3907. "
                           "This is typically caused by a remote worker crashing.")

    monkeypatch.setitem(cli.COMMANDS, "presets", lost)
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(key, value)
    assert main(["presets"]) == 1
    assert capsys.readouterr().err == (
        "error: [rank 0] stopped, as another process did (whose error says why): [gloo/transport/tcp/"
        "pair.cc:561] Connection closed by peer [127.0.0.1]:3907. This is typically caused by a "
        "remote worker crashing.\n")
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: its own error, as it is
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        main(["presets"])


def test_resume_given_a_folder_says_how_to_resume_it(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("{}\n")
    assert main(["train", "--resume", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == (f"error: --resume {tmp_path / 'run'}: a folder, not a checkpoint "
                                       f"(`--resume --out {tmp_path / 'run'}` continues its newest "
                                       f"checkpoint)\n")


def test_a_second_config_file_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", "data.yaml", "--config", "out.yaml"])
    assert e.value.code == 2
    assert "--config given twice (data.yaml, out.yaml): one file" in capsys.readouterr().err


def test_a_second_preset_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--preset", "shapes-cpu", "--preset", "default"])
    assert e.value.code == 2
    assert "--preset given twice (shapes-cpu, default): one preset" in capsys.readouterr().err


@pytest.fixture
def trained_data(monkeypatch):
    """``train`` without training: the dict it returns gets the data settings ``train`` was given."""
    from softteacher import engine

    seen = {}

    def train(cfg, **kwargs):
        seen["data"] = cfg.data
        return SimpleNamespace(started_at=0, iteration=1, output_dir=cfg.train.output_dir, metrics={})

    monkeypatch.setattr(engine, "train", train)
    return seen


def test_shapes_takes_a_generated_set_of_another_size(tiny_shapes, tmp_path, trained_data, capsys):
    seen = trained_data
    out = str(tmp_path / "r")
    assert main(["train", "--shapes", tiny_shapes.root, "--preset", "tiny", "--out", out]) == 0
    d = seen["data"]
    assert (d.train, d.train_images, d.val, d.unlabeled, d.unlabeled_gt) == (
        tiny_shapes.train_json, tiny_shapes.train_images, tiny_shapes.val_json,
        tiny_shapes.unlabeled_json, tiny_shapes.unlabeled_gt_json)
    assert main(["train", "--shapes", str(tmp_path), "--preset", "tiny"]) == 2
    assert f"--shapes {tmp_path}: no annotations/instances_train.json there: name" in capsys.readouterr().err
    # the folder given to `data generate --root`, holding one set: that set
    seen.clear()
    assert main(["train", "--shapes", str(Path(tiny_shapes.root).parent), "--preset", "tiny",
                 "--out", out]) == 0
    assert seen["data"].train == tiny_shapes.train_json
    other = tmp_path / "two"
    for name in ("seed0-a", "seed1-b"):
        (other / name / "annotations").mkdir(parents=True)
        (other / name / "annotations" / "instances_train.json").write_text("{}")
    assert main(["train", "--shapes", str(other), "--preset", "tiny"]) == 2
    assert (f"--shapes {other}: no annotations/instances_train.json there (it holds 2 sets: "
            f"seed0-a, seed1-b): name the folder") in capsys.readouterr().err
    # a data setting given with --set is not replaced by --shapes
    assert main(["train", "--shapes", tiny_shapes.root, "--preset", "tiny", "--out", out,
                 "--set", "data.val=other.json"]) == 0
    assert seen["data"].val == "other.json" and seen["data"].train == tiny_shapes.train_json


def test_image_folders_are_named_by_their_own_flags(tiny_shapes, tmp_path, trained_data):
    seen = trained_data
    out = str(tmp_path / "r")
    assert main(["train", "--preset", "tiny", "--out", out, "--train", "coco/ann/train.json",
                 "--train-images", "coco/train2017", "--val", "coco/ann/val.json", "--val-images",
                 "coco/val2017", "--unlabeled", "coco/ann/unl.json", "--unlabeled-images",
                 "coco/unlabeled2017"]) == 0
    d = seen["data"]
    assert (d.train, d.train_images, d.val, d.val_images, d.unlabeled, d.unlabeled_images) == (
        "coco/ann/train.json", "coco/train2017", "coco/ann/val.json", "coco/val2017",
        "coco/ann/unl.json", "coco/unlabeled2017")
    # over --shapes too: the flag names the folder, the rest stays the set's
    assert main(["train", "--shapes", tiny_shapes.root, "--preset", "tiny", "--out", out,
                 "--val-images", "elsewhere"]) == 0
    assert seen["data"].val_images == "elsewhere" and seen["data"].val == tiny_shapes.val_json
    assert seen["data"].train_images == tiny_shapes.train_images


def test_supervised_says_it_leaves_unlabeled_data_it_was_given_unread(tiny_shapes, tmp_path, trained_data,
                                                                        caplog):
    out = str(tmp_path / "r")
    with caplog.at_level("WARNING", logger="softteacher"):
        assert main(["train", "--shapes", tiny_shapes.root, "--preset", "tiny", "--out", out,
                     "--supervised"]) == 0
    assert "not read" not in caplog.text  # --shapes names its unlabeled set for every run
    for given in (["--unlabeled", "extra.json"], ["--set", "data.unlabeled=extra.json"]):
        caplog.clear()
        with caplog.at_level("WARNING", logger="softteacher"):
            assert main(["train", "--shapes", tiny_shapes.root, "--preset", "tiny", "--out", out,
                         "--supervised", *given]) == 0
        assert ("--supervised trains on the labeled images alone: the unlabeled data given (extra.json) "
                "is not read") in caplog.text, given


def test_bad_device_names_what_is_accepted():
    with pytest.raises(ValueError, match="device 'gpu': expected auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")
    assert resolve_device("cpu").type == "cpu"


def test_a_gpu_number_past_the_visible_ones_is_refused_before_anything_runs(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(ValueError, match=r"^device 'cuda:2': 2 GPU\(s\) visible, cuda:0 to cuda:1$"):
        resolve_device("cuda:2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES numbers the GPUs it lists from 0"):
        resolve_device("cuda:4")


def test_presets_listing_gives_whole_summaries(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    line = next(x for x in lines if x.startswith("coco-full"))
    assert line.endswith("8 images per GPU in 1:1 (4 labeled + 4 unlabeled; a supervised run draws "
                         "8 labeled).")
    assert "`shapes` data" in next(x for x in lines if x.startswith("shapes-cpu"))  # markup as text


def test_a_config_file_s_preset_and_the_command_s(tmp_path):
    from softteacher import cli

    named = tmp_path / "named.yaml"
    named.write_text("preset: tiny\n")
    parse = build_parser().parse_args
    assert cli._config(parse(["train", "--config", str(named)])).solver.max_iter == 4  # the file's
    assert cli._config(parse(["train"])).solver.max_iter == 180_000                     # train's default
    assert cli._config(parse(["demo"])).model.backbone == "resnet18"                    # demo's: shapes-cpu
    assert main(["train", "--preset", "default", "--config", str(named)]) == 2          # two presets


def test_version_and_help_name_the_program(capsys):
    from softteacher import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"softteacher {__version__}\n"
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and "COMMAND --help" in text
    with pytest.raises(SystemExit):
        main(["data", "show", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--num NUM number of images, the first ones (default: 4)" in text
    assert "--seed SEED seed of the views' random augmentation" in text


def test_ctrl_c_ends_in_one_line_that_says_how_to_continue(monkeypatch, capsys):
    from softteacher import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "train", interrupted)
    assert main(["train", "--shapes", "--out", "runs/x"]) == 130
    err = capsys.readouterr().err
    assert err == ("\ninterrupted: softteacher train stopped; the checkpoints written so far are kept, "
                   "and the same command with --resume continues from the newest\n")
    # a process that `train --devices` started: its launcher says it, once
    from softteacher import distributed

    monkeypatch.setenv(distributed.EXIT_FILE_ENV, "/nonexistent/exit_codes")
    assert main(["train", "--shapes", "--out", "runs/x"]) == 130
    assert capsys.readouterr().err == ""


class _BadImages:
    """A dataset whose second image fails to decode, as a truncated file does."""

    def __init__(self, error):
        self.error = error

    def __len__(self):
        return 3

    def __getitem__(self, i):
        if i == 1:
            try:
                raise OSError("image file is truncated (4 bytes not processed)")
            except OSError as e:
                raise self.error from e
        return i


@pytest.mark.parametrize("error, expected", [
    (DatasetError("unl: image 2 (b.jpg): cannot read image file\n(OSError: truncated)"),
     "unl: image 2 (b.jpg): cannot read image file\n(OSError: truncated)"),
    (FileNotFoundError(2, "No such file or directory", "b.jpg"),
     "[Errno 2] No such file or directory: 'b.jpg'"),
    (DatasetError("unl: 2 problems:\n  image 2: cannot read image file\nnote: the rest is fine"),
     "unl: 2 problems:\n  image 2: cannot read image file\nnote: the rest is fine"),
    (DatasetError(), "softteacher.data.records.DatasetError"),
])
def test_an_error_in_a_data_loader_worker_is_printed_as_its_message(error, expected):
    loader = torch.utils.data.DataLoader(_BadImages(error), num_workers=1)
    with pytest.raises(type(error)) as caught:
        list(loader)
    text = str(caught.value)
    assert text.startswith("Caught ") and "Traceback" in text  # what torch hands on
    assert worker_message(text) == expected
    # messages from the main process pass unchanged
    assert worker_message(expected) == expected
    assert worker_message("Caught nothing: Original Traceback without an error line") == \
        "Caught nothing: Original Traceback without an error line"


def test_a_finished_run_ends_with_its_scores(tmp_path):
    from softteacher.cli import _final_scores

    result = SimpleNamespace(output_dir=tmp_path, metrics={"teacher/bbox_AP": 0.41249,
                                                           "student/bbox_AP": float("nan")})
    assert _final_scores(result) == ": teacher AP 0.4125, student AP - (model_final.pt)"
    (tmp_path / "model_best.pt").write_bytes(b"")
    assert _final_scores(result) == (": teacher AP 0.4125, student AP - (model_final.pt and "
                                     "model_best.pt, the best evaluated)")
    assert _final_scores(SimpleNamespace(output_dir=tmp_path, metrics={})) == ""  # not evaluated


def test_resume_with_data_flags_keeps_the_run_s_own_settings(tmp_path, monkeypatch):
    from softteacher import engine
    from softteacher.config import apply_overrides, get_preset

    run = tmp_path / "run"
    run.mkdir()
    saved = apply_overrides(get_preset("tiny"), ["solver.lr=0.002", "method.unsup_weight=2.0",
                                                 f"data.train={tmp_path / 'train.json'}"])
    (run / "config.yaml").write_text(saved.to_yaml())
    seen = []

    class Stop(Exception):
        pass

    def fake_train(cfg, **kw):
        seen.append(cfg)
        raise Stop

    monkeypatch.setattr(engine, "train", fake_train)
    for extra in (["--set", f"data.val={tmp_path / 'new.json'}"], ["--val", str(tmp_path / "new.json")]):
        with pytest.raises(Stop):
            main(["train", "--resume", "--out", str(run), *extra])
        cfg = seen.pop()  # the run's settings, the new val set on top
        assert (cfg.solver.lr, cfg.method.unsup_weight) == (0.002, 2.0)
        assert cfg.model.backbone == saved.model.backbone
        assert (cfg.data.train, cfg.data.val) == (str(tmp_path / "train.json"), str(tmp_path / "new.json"))
    # --shapes alike: a data flag, the embedded set's files over the run's settings
    monkeypatch.setattr("softteacher.cli._use_shapes",
                        lambda cfg, folder=None: setattr(cfg.data, "train", "s.json"))
    with pytest.raises(Stop):
        main(["train", "--resume", "--out", str(run), "--shapes"])
    cfg = seen.pop()
    assert (cfg.solver.lr, cfg.method.unsup_weight, cfg.data.train) == (0.002, 2.0, "s.json")
    with pytest.raises(Stop):  # a preset named: the run's file is not read
        main(["train", "--resume", "--out", str(run), "--preset", "tiny"])
    assert seen.pop().solver.lr == get_preset("tiny").solver.lr
