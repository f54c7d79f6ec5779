import errno
import json
from pathlib import Path

import numpy as np
import pytest

from softteacher.cli import main
from softteacher.data.datasets import load_coco, load_unlabeled
from softteacher.data.records import DatasetError
from softteacher.data.splits import split_indices, split_names, write_split


@pytest.mark.parametrize("n, percent, k", [(3, 1, 1), (100, 10, 10), (10, 5, 1), (50, 5, 3),
                                           (7, 100, 7), (200, 0.5, 1), (1, 50, 1)])
def test_split_indices_sizes_disjoint_and_cover(n, percent, k):
    labeled, unlabeled = split_indices(n, percent, fold=1, seed=1)
    assert len(labeled) == k and len(unlabeled) == n - k
    assert labeled.dtype == np.int64 and unlabeled.dtype == np.int64
    assert np.array_equal(np.sort(np.concatenate([labeled, unlabeled])), np.arange(n))
    assert np.all(np.diff(labeled) > 0) and np.all(np.diff(unlabeled) > 0)


def test_split_indices_deterministic_folds_differ_and_nested():
    a = split_indices(100, 10, fold=1, seed=1)
    b = split_indices(100, 10, fold=1, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], split_indices(100, 10, fold=2, seed=1)[0])
    assert not np.array_equal(a[0], split_indices(100, 10, fold=1, seed=2)[0])
    small = split_indices(100, 2, fold=1, seed=1)[0]
    assert set(small) <= set(a[0])


@pytest.mark.parametrize("kwargs, match", [
    (dict(percent=0), "percent"), (dict(percent=-1), "percent"), (dict(percent=100.5), "percent"),
    (dict(percent=float("nan")), "percent"), (dict(fold=0), "fold"), (dict(seed=-1), "seed"),
    (dict(num_images=0), "nothing to split")])
def test_split_indices_rejects_bad_args(kwargs, match):
    args = dict(num_images=10, percent=10, fold=1, seed=1) | kwargs
    with pytest.raises(ValueError, match=match):
        split_indices(**args)


def test_split_names():
    assert split_names("/x/instances_train2017.json", 10.0, 1) == \
           ("instances_train2017.1@10.json", "instances_train2017.1@10-unlabeled.json")
    assert split_names("a.json", 0.5, 3)[0] == "a.3@0.5.json"
    assert split_names("a.json", 1.0, 2)[1] == "a.2@1-unlabeled.json"


def _ten_images(make_coco):
    images = [(i, f"{i}.png", 16, 16) for i in range(1, 11)]
    anns = [(100 + i, i, 1, [1, 1, 4, 4]) for i in range(1, 11)] + [(200, 3, 1, [5, 5, 2, 2])]
    return make_coco(images, anns, files=False, name="train.json",
                     extra={"licenses": [{"id": 1, "name": "cc"}]})


def test_write_split_files(make_coco, tmp_path):
    src = _ten_images(make_coco)
    lab, unl = write_split(src, percent=30, fold=2, seed=1)
    assert lab == str(src.parent / "train.2@30.json")
    assert unl == str(src.parent / "train.2@30-unlabeled.json")
    original = json.loads(src.read_text())
    a, b = json.loads(Path(lab).read_text()), json.loads(Path(unl).read_text())
    assert list(a) == list(original) == list(b)  # info, licenses, categories kept, in order
    assert a["licenses"] == original["licenses"] and a["categories"] == original["categories"]
    ids_a, ids_b = [im["id"] for im in a["images"]], [im["id"] for im in b["images"]]
    assert len(ids_a) == 3 and sorted(ids_a + ids_b) == list(range(1, 11))
    expected = split_indices(10, 30, 2, 1)[0] + 1  # image ids are index + 1 here
    assert ids_a == expected.tolist()
    for part, ids in ((a, ids_a), (b, ids_b)):
        assert sorted(ann["image_id"] for ann in part["annotations"] if ann["id"] < 200) == sorted(ids)
    assert len(a["annotations"]) + len(b["annotations"]) == 11

    labeled = load_coco(lab, images=src.parent)
    assert len(labeled) == 3 and sum(len(r.boxes) for r in labeled.records) == len(a["annotations"])
    assert len(load_unlabeled(unl, images=src.parent)) == 7

    # deterministic: same args, same bytes
    first = Path(lab).read_text(), Path(unl).read_text()
    out = tmp_path / "again"
    lab2, unl2 = write_split(src, percent=30, fold=2, seed=1, out_dir=out)
    assert (Path(lab2).read_text(), Path(unl2).read_text()) == first
    # another fold chooses other images
    lab3, _ = write_split(src, percent=30, fold=3, seed=1, out_dir=out)
    assert [im["id"] for im in json.loads(Path(lab3).read_text())["images"]] != ids_a


def test_write_split_tiny_and_full(make_coco, tmp_path):
    src = make_coco([(1, "a.png", 8, 8), (2, "b.png", 8, 8), (3, "c.png", 8, 8)],
                    [(1, 2, 1, [0, 0, 2, 2])], files=False)
    lab, unl = write_split(src, percent=1, out_dir=tmp_path / "s")
    assert lab.endswith("ann.1@1.json")
    assert len(json.loads(Path(lab).read_text())["images"]) == 1
    assert len(json.loads(Path(unl).read_text())["images"]) == 2
    lab, unl = write_split(src, percent=100, out_dir=tmp_path / "s")
    assert len(json.loads(Path(lab).read_text())["images"]) == 3
    # no unlabeled image: no file that every loader would refuse as empty
    assert unl == "" and not (tmp_path / "s" / "ann.1@100-unlabeled.json").exists()


def test_another_seed_writes_its_own_files(make_coco, tmp_path):
    src = _ten_images(make_coco)
    first = write_split(src, percent=30, fold=1, seed=1, out_dir=tmp_path)
    kept = [Path(p).read_bytes() for p in first]
    other = write_split(src, percent=30, fold=1, seed=2, out_dir=tmp_path)
    assert [Path(p).name for p in other] == ["train.1@30.seed2.json", "train.1@30.seed2-unlabeled.json"]
    assert [Path(p).read_bytes() for p in first] == kept  # seed 1's split stays as it was
    assert json.loads(Path(other[0]).read_text())["images"] != json.loads(kept[0])["images"]
    assert split_names("a.json", 10.0, 1, seed=1) == ("a.1@10.json", "a.1@10-unlabeled.json")


def test_a_split_that_cannot_write_both_files_replaces_neither(make_coco, tmp_path, capsys, monkeypatch):
    src = _ten_images(make_coco)
    lab, unl = write_split(src, percent=30, fold=1, out_dir=tmp_path)
    kept = Path(lab).read_bytes()
    Path(unl).unlink()
    Path(unl).mkdir()  # in the way of the second file
    with pytest.raises(ValueError, match="train.1@30-unlabeled.json: a folder where the split's file goes"):
        write_split(src, percent=30, fold=1, out_dir=tmp_path)
    with open(tmp_path / "train.1@30.json", "rb") as f:
        assert f.read() == kept
    assert not list(tmp_path.glob(".*.tmp"))

    Path(unl).rmdir()
    real = Path.write_text

    def full_disk(self, text, *args, **kwargs):  # the second file cannot be written
        if "unlabeled" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, text, *args, **kwargs)
    for p in (lab, unl):
        Path(p).write_text("an earlier pair")
    with monkeypatch.context() as m:
        m.setattr(Path, "write_text", full_disk)
        with pytest.raises(OSError, match="No space left on device"):
            write_split(src, percent=30, fold=1, out_dir=tmp_path)
    assert [Path(p).read_text() for p in (lab, unl)] == ["an earlier pair"] * 2
    assert not list(tmp_path.glob(".*.tmp"))
    # a file as the output folder
    assert main(["split", str(src), "--percent", "20", "--out-dir", lab]) == 2
    assert f"{lab}: a file, not a folder for the split's files" in capsys.readouterr().err


def test_write_split_rejects_bad_json(make_coco):
    src = make_coco([(1, "a.png", 8, 8)], [(1, 5, 1, [0, 0, 2, 2])], files=False)
    with pytest.raises(DatasetError, match="annotation 1: unknown image id 5"):
        write_split(src, percent=10)
    assert not (src.parent / "ann.1@10.json").exists()
    with pytest.raises(DatasetError, match=r"a folder; split takes a labeled COCO json .*data.train_split"):
        write_split(src.parent, percent=10)


def test_cli_split(make_coco, tmp_path, capsys):
    src = _ten_images(make_coco)
    out = tmp_path / "cli"
    assert main(["split", str(src), "--percent", "20", "--fold", "1", "--out-dir", str(out)]) == 0
    assert f"labeled:   {out / 'train.1@20.json'}" in capsys.readouterr().out
    assert len(json.loads((out / "train.1@20.json").read_text())["images"]) == 2
    assert main(["split", str(src), "--percent", "0"]) == 2
    assert "percent must be in (0, 100]" in capsys.readouterr().err


def test_split_reads_sizes_from_another_image_folder(make_coco, tmp_path, capsys):
    # a json without width/height: the sizes come from the files, which are not beside it
    src = make_coco([(1, "a.png", 8, 6), (2, "b.png", 10, 4)], [(1, 2, 1, [0, 0, 2, 2])])
    data = json.loads(src.read_text())
    for im in data["images"]:
        del im["width"], im["height"]
    elsewhere = tmp_path / "json"
    elsewhere.mkdir()
    ann = elsewhere / "ann.json"
    ann.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="image 1 \\(a.png\\): no width/height in the json"):
        write_split(ann, percent=50)
    lab, unl = write_split(ann, percent=50, images=src.parent)
    assert len(json.loads(Path(lab).read_text())["images"]) == 1
    assert main(["split", str(ann), "--percent", "50", "--images", str(src.parent),
                 "--out-dir", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "ann.1@50.json").is_file()
    assert main(["split", str(ann), "--percent", "50", "--images", str(src.parent),  # as other commands
                 "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "ann.1@50.json").is_file()
    assert main(["split", str(ann), "--percent", "50"]) == 2
    assert "no width/height in the json" in capsys.readouterr().err
