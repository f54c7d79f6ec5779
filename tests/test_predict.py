"""``softteacher predict`` on folders: which files are inputs, and refusals before any output."""

import glob
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from softteacher.checkpoint import FORMAT, CheckpointError, save_checkpoint
from softteacher.cli import main
from softteacher.config import preset_tiny
from softteacher.data.records import DatasetError
from softteacher.engine import model_from_checkpoint
from softteacher.model import build_detector
from softteacher.predict import glob_lists, picture_names, predict


def _write(path, width=40, height=32, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained tiny detector of two classes, as a checkpoint."""
    cfg = preset_tiny()
    torch_model = build_detector(cfg.model, 2)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, {"format": FORMAT, "config": json.loads(json.dumps(cfg.to_dict())),
                           "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
                           "report": "student", "student": torch_model.state_dict(), "teacher": None})
    return path


def test_folders_give_regular_visible_image_files(checkpoint, tmp_path):
    photos = tmp_path / "photos"
    _write(photos / "a.png")
    (photos / "._a.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS metadata
    _write(photos / ".cache" / "thumb.jpg")
    _write(photos / "zz.jpg" / "b.png", seed=1)  # a folder named like an image
    out = tmp_path / "out"
    summary = predict(str(checkpoint), [str(photos)], str(out), score_thresh=0.0)
    images = json.loads((out / "images.json").read_text())["images"]
    assert [im["file_name"] for im in images] == [str((photos / "a.png").resolve()),
                                                  str((photos / "zz.jpg" / "b.png").resolve())]
    assert [im["picture"] for im in images] == ["a.jpg", "b.jpg"]
    assert summary["images"] == 2 and sorted(p.name for p in out.glob("*.jpg")) == ["a.jpg", "b.jpg"]


def test_an_earlier_prediction_in_the_folder_is_named(checkpoint, tmp_path, caplog):
    for name in ("a", "b", "c"):
        _write(tmp_path / "photos" / f"{name}.png")
    out = tmp_path / "out"
    predict(str(checkpoint), [str(tmp_path / "photos")], str(out))
    with caplog.at_level("WARNING", logger="softteacher"):
        predict(str(checkpoint), [str(tmp_path / "photos" / "b.png")], str(out))
    assert (f"{out} holds an earlier prediction: its results.json and images.json are replaced; "
            f"2 of its pictures (a.jpg, c.jpg) stay, not listed in the new images.json") in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="softteacher"):
        predict(str(checkpoint), [str(tmp_path / "photos" / "b.png")], str(out))
    assert caplog.text.count("holds an earlier prediction") == 1 and "stay" not in caplog.text


def test_predict_and_the_detector_run_without_autograd(checkpoint, tmp_path, monkeypatch):
    from softteacher import detector as module

    seen = []
    real = module.test_view

    def view(*args, **kwargs):
        seen.append(torch.is_grad_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "test_view", view)
    _write(tmp_path / "a.png")
    predict(str(checkpoint), [str(tmp_path / "a.png")], str(tmp_path / "out"))
    module.Detector.load(checkpoint)(tmp_path / "a.png")
    assert seen == [False, False] and torch.is_grad_enabled()


def test_unreadable_inputs_are_skipped_and_refused_where_none_reads(checkpoint, tmp_path, capsys, caplog):
    photos = tmp_path / "photos"
    (photos / "b.jpg").parent.mkdir(parents=True)
    (photos / "b.jpg").write_bytes(b"not an image")
    Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 60).save(photos / "c.png")
    out = tmp_path / "out"
    with pytest.raises(DatasetError) as e:  # nothing to predict: refused, nothing written
        predict(str(checkpoint), [str(photos)], str(out))
    lines = str(e.value).splitlines()
    assert lines[0] == "predict: 2 problems:"
    resolved = photos.resolve()
    assert lines[1].startswith(f"  cannot read image file {resolved / 'b.jpg'} (UnidentifiedImageError")
    assert lines[2].startswith(f"  cannot read image file {resolved / 'c.png'} (I;16 pixels")
    assert not out.exists()

    _write(photos / "a.png")  # one that reads: it is predicted, the others skipped and listed
    assert main(["predict", str(checkpoint), str(photos), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"skipped: {resolved / 'b.jpg'}: cannot read image file (UnidentifiedImageError" in caplog.text
    assert (f"2 images skipped, unreadable (listed in {out / 'images.json'}): {resolved / 'b.jpg'}, "
            f"{resolved / 'c.png'}") in err
    info = json.loads((out / "images.json").read_text())
    assert [Path(i["file_name"]).name for i in info["images"]] == ["a.png"]
    assert [(Path(i["file_name"]).name, i["error"].split(" (")[0]) for i in info["skipped"]] == [
        ("b.jpg", "cannot read image file"), ("c.png", "cannot read image file")]
    assert sorted(p.name for p in out.glob("*.jpg")) == ["a.jpg"]
    assert info["images"][0]["id"] == 1  # ids index images.json, numbered in the order given


def test_an_image_cut_short_after_its_header_is_skipped_and_the_rest_predicted(checkpoint, tmp_path,
                                                                              capsys, caplog):
    photos = tmp_path / "photos"
    _write(photos / "a.jpg")
    _write(photos / "b.jpg", seed=1)
    whole = (photos / "b.jpg").read_bytes()
    (photos / "b.jpg").write_bytes(whole[:len(whole) * 3 // 4])  # the header reads, the pixels not
    out = tmp_path / "out"
    assert main(["predict", str(checkpoint), str(photos), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"1 image skipped, unreadable (listed in {out / 'images.json'}): {photos.resolve() / 'b.jpg'}" \
        in err
    assert f"skipped: {photos.resolve() / 'b.jpg'}: cannot read image file (" in caplog.text  # as above
    info = json.loads((out / "images.json").read_text())
    assert [Path(i["file_name"]).name for i in info["images"]] == ["a.jpg"]
    assert [Path(i["file_name"]).name for i in info["skipped"]] == ["b.jpg"]
    assert info["skipped"][0]["error"].startswith("cannot read image file (")  # its file named beside
    assert sorted(p.name for p in out.glob("*.jpg")) == ["a.jpg"]
    assert all(r["image_id"] == info["images"][0]["id"]
               for r in json.loads((out / "results.json").read_text()))


def test_a_missing_file_is_skipped_and_only_cut_short_files_are_refused_before_any_output(
        checkpoint, tmp_path, capsys):
    photos = tmp_path / "photos"
    _write(photos / "a.jpg")
    missing = photos / "nope.jpg"  # a path, not a glob: a missing input like an unreadable one
    out = tmp_path / "out"
    assert main(["predict", str(checkpoint), str(photos / "a.jpg"), str(missing), "--out", str(out)]) == 1
    assert f"1 image skipped, unreadable (listed in {out / 'images.json'}): {missing.resolve()}" \
        in capsys.readouterr().err
    info = json.loads((out / "images.json").read_text())
    assert [Path(i["file_name"]).name for i in info["images"]] == ["a.jpg"]
    assert [(Path(i["file_name"]).name, i["error"]) for i in info["skipped"]] == [
        ("nope.jpg", "image file not found")]
    assert main(["predict", str(checkpoint), str(missing), "--out", str(tmp_path / "o1")]) == 2
    assert capsys.readouterr().err.startswith(f"error: predict: image file not found: {missing.resolve()}")
    assert main(["predict", str(checkpoint), str(photos / "*.png"), "--out", str(tmp_path / "o1")]) == 2
    assert "*.png: no such image, folder or matching glob" in capsys.readouterr().err  # a glob: nothing
    assert not (tmp_path / "o1").exists()

    whole = (photos / "a.jpg").read_bytes()  # every header reads and no image decodes: refused
    for name in ("b.jpg", "c.jpg"):
        (photos / name).write_bytes(whole[:len(whole) * 3 // 4])
    with pytest.raises(DatasetError) as e:
        predict(str(checkpoint), [str(photos / "b.jpg"), str(photos / "c.jpg")], str(tmp_path / "o2"))
    lines = str(e.value).splitlines()
    assert lines[0] == "predict: 2 problems:" and len(lines) == 3
    assert f"{photos.resolve() / 'b.jpg'}: cannot read image file" in lines[1]
    assert not (tmp_path / "o2").exists()


def test_cli_refusals_are_one_line_errors(checkpoint, tmp_path, capsys):
    _write(tmp_path / "a.png")
    taken = tmp_path / "taken"
    taken.write_text("a file")
    assert main(["predict", str(checkpoint), str(tmp_path / "a.png"), "--out", str(taken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {taken}: ") and err.count("\n") == 1
    assert main(["predict", str(checkpoint), str(tmp_path / "a.png"), "--out", str(tmp_path / "o"),
                 "--device", "gpu"]) == 2
    assert "device 'gpu'" in capsys.readouterr().err and not (tmp_path / "o").exists()
    for thresh in ("30", "nan", "-0.1"):  # a percent, say, would keep no detection
        assert main(["predict", str(checkpoint), str(tmp_path / "a.png"), "--out", str(tmp_path / "o"),
                     "--score-thresh", thresh]) == 2
        assert f"score threshold {float(thresh)}: expected a number from 0 to 1" in capsys.readouterr().err
    assert main(["predict", str(checkpoint), str(tmp_path / "a.png"), "--out", str(tmp_path / "o"),
                 "--workers", "-1"]) == 2
    assert "error: --workers -1: expected 0 or more" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("key", ["config", "categories", "student"])
def test_a_checkpoint_without_its_config_or_weights_is_named(checkpoint, tmp_path, capsys, key):
    import torch

    state = torch.load(checkpoint, weights_only=True)
    del state[key]
    path = tmp_path / "partial.pt"
    save_checkpoint(path, state)
    with pytest.raises(CheckpointError, match=f"^{path}: .*{key}"):
        model_from_checkpoint(path, None, torch.device("cpu"))
    _write(tmp_path / "a.png")
    assert main(["predict", str(path), str(tmp_path / "a.png"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}: ")


def test_pictures_of_inputs_with_one_stem_are_told_apart(checkpoint, tmp_path):
    _write(tmp_path / "x" / "a.png")
    _write(tmp_path / "y" / "a.png", seed=1)
    out = tmp_path / "out"
    predict(str(checkpoint), [str(tmp_path / "x"), str(tmp_path / "y")], str(out))
    images = json.loads((out / "images.json").read_text())["images"]
    assert [(im["file_name"].split("/")[-2], im["picture"]) for im in images] == [("x", "a.jpg"),
                                                                                ("y", "a_1.jpg")]
    assert sorted(p.name for p in out.glob("*.jpg")) == ["a.jpg", "a_1.jpg"]


def test_a_threshold_below_the_model_s_own_reaches_its_detections(checkpoint, tmp_path):
    # the untrained model made to score every box of each class 1 / (e^b + 2) = 0.03, below its
    # own threshold of 0.05: a zero class weight and a background bias b = ln(1 / 0.03 - 2)
    from softteacher.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint)
    cls = "roi_heads.box_predictor.cls_score"
    state["student"][f"{cls}.weight"] = torch.zeros_like(state["student"][f"{cls}.weight"])
    state["student"][f"{cls}.bias"] = torch.tensor([math.log(1 / 0.03 - 2), 0.0, 0.0])
    shy = tmp_path / "shy.pt"
    save_checkpoint(shy, state)
    photos = tmp_path / "photos"
    _write(photos / "a.png", 64, 48)
    assert model_from_checkpoint(str(shy), None, "cpu")[0].roi_heads.score_thresh == pytest.approx(0.05)

    def scores(thresh):
        predict(str(shy), [str(photos)], str(tmp_path / str(thresh)), score_thresh=thresh)
        return [r["score"] for r in json.loads((tmp_path / str(thresh) / "results.json").read_text())]

    low = scores(0.01)
    assert low and all(s == pytest.approx(0.03) for s in low)
    assert scores(0.05) == []


def test_a_photo_is_detected_upright_as_its_exif_orientation_shows_it(checkpoint, tmp_path):
    stored = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high as stored
    stored[:, :10] = 255  # its left edge white
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: 20 wide, 40 high, the white edge on top
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(stored).save(photos / "phone.jpg", exif=exif, quality=95)
    out = tmp_path / "out"
    predict(str(checkpoint), [str(photos)], str(out), score_thresh=1.0)  # no box drawn over it
    image = json.loads((out / "images.json").read_text())["images"][0]
    assert (image["width"], image["height"]) == (20, 40)
    picture = np.asarray(Image.open(out / "phone.jpg").convert("L"), dtype=float)
    assert picture.shape == (40, 20)
    assert picture[:8].mean() > 200 and picture[14:].mean() < 50  # white on top, as shown
    # every orientation turned as Pillow's exif_transpose turns it
    from PIL import ImageOps

    from softteacher.data.datasets import upright

    for orientation in range(1, 9):
        exif[0x0112] = orientation
        Image.fromarray(stored).save(tmp_path / "o.png", exif=exif)
        with Image.open(tmp_path / "o.png") as im:
            assert np.array_equal(np.asarray(upright(im)), np.asarray(ImageOps.exif_transpose(im)))


def test_a_photo_whose_exif_pillow_cannot_write_again_is_still_turned_and_predicted(checkpoint, tmp_path):
    # a camera's tag of the wrong type (Make's text under tag 320, a number's tag), on which
    # Pillow's exif_transpose fails: the orientation (6) is read and applied all the same
    exif = (b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x02"
            b"\x01\x40\x00\x02\x00\x00\x00\x06\x00\x00\x00\x26"  # tag 320, text of 6 bytes at 38
            b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00"  # orientation 6
            b"\x00\x00\x00\x00Canon\x00")
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.zeros((20, 40, 3), dtype=np.uint8)).save(photos / "camera.jpg", exif=exif)
    out = tmp_path / "out"
    assert main(["predict", str(checkpoint), str(photos), "--out", str(out)]) == 0
    image = json.loads((out / "images.json").read_text())["images"][0]
    assert (image["width"], image["height"]) == (20, 40)


def test_long_names_and_names_in_two_letter_cases_get_pictures_of_their_own(checkpoint, tmp_path):
    photos = tmp_path / "photos"
    long = "a" * 240  # the picture's name fits the file system; a temp name 18 bytes longer would not
    _write(photos / f"{long}.jpg")
    _write(photos / "IMG_1.JPG", seed=1)
    _write(photos / "x" / "img_1.jpg", seed=2)  # one file with IMG_1.jpg on macOS and Windows
    out = tmp_path / "out"
    assert main(["predict", str(checkpoint), str(photos), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.jpg")) == sorted(["IMG_1.jpg", "img_1_1.jpg", f"{long}.jpg"])
    assert picture_names([Path("a/IMG_1.JPG"), Path("b/img_1.jpg")]) == ["IMG_1", "img_1_1"]


FILES = ["a.jpg", "b.png", ".h.jpg", "x/a.jpg", "x/.h/c.jpg", "x/y/d.jpg", ".hd/e.jpg",
         "x/y/z/f.jpg", "img_1.jpg", "x/img_2.jpg"]


@pytest.mark.parametrize("pattern", [
    "*.jpg", "**/*.jpg", "x/*.jpg", "*/*.jpg", "**", "x/**", "x/**/*.jpg", "**/y/*.jpg",
    "img_*.jpg", "**/img_?.jpg", ".*", "**/.h/*.jpg", "[ab].*", "x/y/**/*.jpg", "*/**/d.jpg",
])
def test_glob_lists_what_glob_lists(tmp_path, monkeypatch, pattern):
    """The check that keeps pictures from a glob's reach agrees with glob itself, file by file,
    for absolute and relative patterns: hidden names, ``**`` and its empty match included."""
    root = tmp_path.resolve()
    for name in FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    monkeypatch.chdir(root)
    for pat in (str(root / pattern), pattern):
        listed = {Path(m).resolve() for m in glob.glob(pat, recursive=True)}
        assert listed, pat
        for name in FILES:
            assert glob_lists(pat, root / name) == (root / name in listed), (pat, name)
    assert not glob_lists(str(root / "x" / "**"), root.parent / "x" / "a.jpg")


def test_picture_names_number_a_stem_met_again():
    paths = [Path("a/p.jpg"), Path("b/p.png"), Path("c/p_1.jpg"), Path("d/p.jpg"), Path("q.jpg")]
    assert picture_names(paths) == ["p", "p_1", "p_1_1", "p_2", "q"]


def test_a_glob_that_would_read_the_pictures_is_refused(checkpoint, tmp_path, capsys):
    for k in range(2):
        _write(tmp_path / "photos" / f"im{k}.jpg", seed=k)
    out = tmp_path / "photos" / "preds"
    recursive = str(tmp_path / "photos" / "**" / "*.jpg")
    assert main(["predict", str(checkpoint), recursive, "--out", str(out)]) == 2
    assert (f"{recursive!r} would read this run's picture {out / 'im0.jpg'} as an input next "
            f"time") in capsys.readouterr().err
    assert not out.exists()
    # one folder down only: the pictures are out of this glob's reach
    assert main(["predict", str(checkpoint), str(tmp_path / "photos" / "*.jpg"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.jpg")) == ["im0.jpg", "im1.jpg"]
    assert os.path.isfile(out / "results.json")


def test_images_are_read_by_loader_processes_to_the_same_results_and_skips(checkpoint, tmp_path,
                                                                          caplog):
    photos = tmp_path / "photos"
    for i, name in enumerate(("a.jpg", "b.jpg", "c.png", "d.jpg")):
        _write(photos / name, seed=i)
    whole = (photos / "b.jpg").read_bytes()
    (photos / "b.jpg").write_bytes(whole[:len(whole) * 3 // 4])  # the header reads, the pixels not
    outs = {}
    for workers in (0, 2):
        out = tmp_path / f"out{workers}"
        with caplog.at_level("WARNING", logger="softteacher"):
            summary = predict(str(checkpoint), [str(photos)], str(out), score_thresh=0.0, workers=workers)
        assert f"skipped: {photos.resolve() / 'b.jpg'}: cannot read image file (" in caplog.text
        caplog.clear()
        assert summary["skipped"] == [str(photos.resolve() / "b.jpg")] and summary["detections"] > 0
        outs[workers] = [json.loads((out / f).read_text()) for f in ("results.json", "images.json")]
        assert sorted(p.name for p in out.glob("*.jpg")) == ["a.jpg", "c.jpg", "d.jpg"]
    assert outs[0] == outs[2] and [i["id"] for i in outs[2][1]["images"]] == [1, 3, 4]


def test_without_pictures_only_the_json_files_are_written_even_into_the_input_folder(
        checkpoint, tmp_path, capsys, caplog):
    photos = tmp_path / "photos"
    _write(photos / "a.png")
    _write(photos / "b.jpg", seed=1)
    out = photos / "predictions"  # refused where pictures are drawn: the next run would read them
    assert main(["predict", str(checkpoint), str(photos), "--out", str(out)]) == 2
    assert "is in the input folder" in capsys.readouterr().err and not out.exists()
    assert main(["predict", str(checkpoint), str(photos), "--out", str(out), "--no-pictures",
                 "--workers", "1", "--score-thresh", "0"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["images.json", "results.json"]
    images = json.loads((out / "images.json").read_text())["images"]
    assert [Path(i["file_name"]).name for i in images] == ["a.png", "b.jpg"]
    assert all("picture" not in i for i in images)
    assert len(json.loads((out / "results.json").read_text())) > 0
    with caplog.at_level("WARNING", logger="softteacher"):
        assert main(["predict", str(checkpoint), str(photos), "--out", str(out), "--no-pictures"]) == 0
    assert f"{out} holds an earlier prediction: its results.json and images.json are replaced\n" \
        in caplog.text
    assert len(json.loads((out / "images.json").read_text())["images"]) == 2  # its json not read as images


def test_batches_write_each_image_s_results_in_order_with_skips_between(checkpoint, tmp_path, capsys):
    photos = tmp_path / "photos"
    for i, name in enumerate(("a.jpg", "b.jpg", "c.png", "d.jpg", "e.jpg")):
        _write(photos / name, seed=i)  # one size: each padded as alone
    whole = (photos / "b.jpg").read_bytes()
    (photos / "b.jpg").write_bytes(whole[:len(whole) * 3 // 4])  # the header reads, the pixels not
    outs = {}
    for size in (1, 3):
        out = tmp_path / f"out{size}"
        summary = predict(str(checkpoint), [str(photos)], str(out), score_thresh=0.0, batch_size=size)
        assert summary["images"] == 4 and summary["detections"] > 0
        assert sorted(p.name for p in out.glob("*.jpg")) == ["a.jpg", "c.jpg", "d.jpg", "e.jpg"]
        outs[size] = [json.loads((out / f).read_text()) for f in ("results.json", "images.json")]
    assert outs[1][1] == outs[3][1] and [i["id"] for i in outs[3][1]["images"]] == [1, 3, 4, 5]
    key = lambda r: (r["image_id"], r["category_id"], r["bbox"])  # noqa: E731
    for one, three in zip(sorted(outs[1][0], key=key), sorted(outs[3][0], key=key), strict=True):
        assert one["image_id"] == three["image_id"] and one["category_id"] == three["category_id"]
        assert one["bbox"] == pytest.approx(three["bbox"], abs=1e-3)
        assert one["score"] == pytest.approx(three["score"], abs=1e-4)
    assert main(["predict", str(checkpoint), str(photos), "--out", str(tmp_path / "o"),
                 "--batch-size", "0"]) == 2
    assert capsys.readouterr().err == "error: --batch-size 0: expected at least 1\n"


def test_linked_files_are_named_as_given_and_linked_folders_are_read(checkpoint, tmp_path):
    # a DVC / git-annex layout: files linked into a store; a folder linked into the input folder
    store, photos = tmp_path / "store", tmp_path / "photos"
    _write(store / "3f9a2c.jpg")
    _write(tmp_path / "elsewhere" / "x.jpg", seed=1)
    photos.mkdir()
    (photos / "cat.jpg").symlink_to(store / "3f9a2c.jpg")
    (photos / "cat_copy.jpg").symlink_to(store / "3f9a2c.jpg")
    (photos / "linked").symlink_to(tmp_path / "elsewhere")
    (photos / "linked" / "loop").symlink_to(photos)  # a link back up: read once
    out = tmp_path / "out"
    assert main(["predict", str(checkpoint), str(photos), "--out", str(out)]) == 0
    info = json.loads((out / "images.json").read_text())["images"]
    assert [i["file_name"] for i in info] == [str(photos / "cat.jpg"), str(photos / "cat_copy.jpg"),
                                               str(photos / "linked" / "x.jpg")]
    assert sorted(p.name for p in out.glob("*.jpg")) == ["cat.jpg", "cat_copy.jpg", "x.jpg"]
    # and a folder of the output linked into an input folder is still refused
    (photos / "out_link").symlink_to(out)
    assert main(["predict", str(checkpoint), str(photos / "out_link"), "--out", str(out)]) == 2
