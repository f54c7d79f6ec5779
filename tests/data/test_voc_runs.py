"""A Pascal VOC root through the commands a user runs: train (supervised and Soft Teacher),
eval on another image set, predict."""

import json

from softteacher.checkpoint import load_checkpoint
from softteacher.cli import main
from softteacher.data.datasets import VOC_CLASSES

IMAGES = {
    "img1": (64, 48, [("cat", 5, 5, 30, 30), ("dog", 30, 10, 60, 40)]),
    "img2": (48, 64, [("dog", 4, 20, 40, 60)]),
    "img3": (64, 48, [("cat", 10, 8, 50, 40)]),
    "img4": (64, 48, [("dog", 2, 2, 20, 20), ("cat", 25, 5, 60, 45)]),
}


def test_a_voc_root_trains_evaluates_on_its_test_set_and_predicts(make_voc, tmp_path, capsys):
    root = make_voc(IMAGES)
    (root / "ImageSets" / "Main" / "test.txt").write_text("img3\nimg4\n")
    out = tmp_path / "run"
    common = ["--preset", "tiny", "--no-progress", "--set", "solver.max_iter=1",
              "--set", "train.batch_size=2"]
    assert main(["train", "--train", str(root), "--val", str(root), "--supervised", "--out", str(out),
                 *common]) == 0
    printed = capsys.readouterr().out
    assert f"done: 1 iteration in {out}: student AP " in printed
    state = load_checkpoint(out / "model_final.pt")
    # cat and dog are VOC classes: the model has the 20, in VOC's order, ids 1..20
    assert [c["name"] for c in state["categories"]] == list(VOC_CLASSES)
    assert [c["id"] for c in state["categories"]] == list(range(1, 21))

    assert main(["eval", str(out / "model_final.pt"), "--data", str(root)]) == 0
    assert (f"model: student ({out / 'model_final.pt'}) on {root} (image set test), 2 images, in "
            f"batches of 1") in capsys.readouterr().out

    # Soft Teacher with the root's images as the unlabeled folder
    assert main(["train", "--train", str(root), "--val", str(root), "--unlabeled", str(root / "JPEGImages"),
                 "--out", str(tmp_path / "st"), *common]) == 0
    assert "teacher AP" in capsys.readouterr().out
    assert main(["predict", str(tmp_path / "st" / "model_final.pt"), str(root / "JPEGImages"),
                 "--out", str(tmp_path / "pred"), "--score-thresh", "0.0"]) == 0
    info = json.loads((tmp_path / "pred" / "images.json").read_text())
    assert [i["picture"] for i in info["images"]] == ["img1.jpg", "img2.jpg", "img3.jpg", "img4.jpg"]
    assert info["model"] == "teacher" and len(info["categories"]) == 20
    results = json.loads((tmp_path / "pred" / "results.json").read_text())
    assert all(1 <= r["category_id"] <= 20 for r in results)
