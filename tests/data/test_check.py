import json

import numpy as np
import pytest

from softteacher.cli import main
from softteacher.data.check import check_dataset, dataset_stats
from softteacher.data.datasets import CLIPPED, OUTSIDE, check_files_exist, load_coco
from softteacher.data.records import DatasetError

from .conftest import cut_short, write_image


def _counted(make_coco):
    """Hand-counted set: see the expected numbers in the tests."""
    return make_coco(
        [(1, "a.png", 120, 100), (2, "b.png", 20, 20), (3, "c.png", 20, 20)],
        [(1, 1, 1, [0, 0, 10, 10]),         # cat, area 100: small
         (2, 1, 5, [0, 0, 31, 33]),         # dog, 1023: small
         (3, 1, 5, [0, 0, 32, 32]),         # dog, 1024 = 32²: medium
         (4, 1, 1, [0, 0, 100, 96]),        # cat, 9600: large
         (5, 1, 1, [0, 0, 96, 96]),         # cat, 9216 = 96²: large
         (6, 1, 1, [10, 10, 20, 20], 1),    # crowd: ignored
         (7, 1, 1, [110, 90, 20, 20]),      # cat, clipped to 10x10: small
         (8, 3, 5, [-30, -30, 5, 5])],      # outside: dropped -> image 3 has no boxes
        ((1, "cat"), (5, "dog"), (90, "toothbrush")))


def test_stats_hand_counted(make_coco):
    stats = dataset_stats(load_coco(_counted(make_coco)))
    assert stats["images"] == 3 and stats["boxes"] == 6 and stats["ignored"] == 1
    assert stats["images_without_boxes"] == 2
    assert stats["sizes"] == {"small": 3, "medium": 1, "large": 2}
    assert stats["classes"] == [(1, 1, "cat", 4), (2, 5, "dog", 2), (3, 90, "toothbrush", 0)]
    assert stats["report"][0] == f"1 x {CLIPPED}" and f"1 x {OUTSIDE}" in stats["report"]


def test_sizes_count_the_source_s_area_where_it_gives_one(tmp_path):
    # as COCO evaluation ranges them: a 40 x 40 box around a thin object (area 900) is small,
    # a 100 x 100 box with area 5000 medium; a box whose area is missing counts w * h
    root = tmp_path / "coco"
    write_image(root / "a.png", 200, 200)
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 40], "area": 900},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 50, 100, 100], "area": 5000},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [0, 100, 40, 40]}]
    (root / "ann.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 200, "height": 200}],
        "annotations": anns, "categories": [{"id": 1, "name": "cat"}]}))
    assert dataset_stats(load_coco(str(root / "ann.json")))["sizes"] == {"small": 1, "medium": 2, "large": 0}


def test_check_summary_text(make_coco):
    path = _counted(make_coco)
    ok, text = check_dataset(str(path))
    assert ok
    lines = text.splitlines()
    assert lines[0] == f"OK: {path} (COCO json, labeled)"
    for expected in ("  images: 3", "  images without boxes: 2", "  boxes: 6",
                     "  ignored boxes (crowd / difficult): 1",
                     "  box sizes (the source's area, else w*h, as evaluation ranges them): small (< 32²) 3, "
                     "medium (< 96²) 1, large 2",
                     "  classes: 3", "        3     90  toothbrush      0",
                     "        2      5  dog             2", f"    1 x {CLIPPED}"):
        assert expected in lines, expected


def test_check_lists_every_problem(make_coco):
    path = _counted(make_coco)
    (path.parent / "b.png").unlink()
    write_image(path.parent / "c.png", 21, 20)
    data = json.loads(path.read_text())
    data["annotations"][0]["category_id"] = 2
    path.write_text(json.dumps(data))
    ok, text = check_dataset(str(path))
    assert not ok
    assert text.startswith(f"FAILED: {path}\n{path}: 3 problems:")
    assert "image 1 (a.png), annotation 1: unknown category id 2" in text
    assert "image 2 (b.png): image file not found" in text
    assert "image 3 (c.png): file" in text and "is 21x20" in text
    assert text.endswith(f"\n(image files are looked for under {path.parent}: --images DIR names "
                         f"their folder)")


def test_check_says_where_the_missing_images_are(make_coco, monkeypatch):
    path = make_coco([(1, "a.png", 12, 10), (2, "b.png", 8, 8)], files=False)
    write_image(path.parent / "photos" / "a.png", 12, 10)
    write_image(path.parent / "photos" / "b.png", 8, 8)
    monkeypatch.chdir(path.parent)
    ok, text = check_dataset(str(path))
    assert not ok and "image 1 (a.png): image file not found" in text
    assert text.endswith(f"\n(image files are looked for under {path.parent}: --images DIR names "
                         f"their folder; files of those names and sizes are under photos: --images "
                         f"photos)")
    ok, _ = check_dataset(str(path), images=str(path.parent / "photos"))
    assert ok


def test_check_says_that_absolute_file_names_are_not_under_the_image_folder(make_coco, tmp_path):
    elsewhere = str(tmp_path / "other-machine" / "a.png")  # a json written where the images were
    path = make_coco([(1, elsewhere, 12, 10), (2, "b.png", 8, 8)], files=False)
    write_image(path.parent / "b.png", 8, 8)
    ok, text = check_dataset(str(path), images=str(path.parent))
    assert not ok and f"image 1 ({elsewhere}): image file not found" in text
    assert text.endswith(f"\n(the json names 1 of them by absolute paths, such as {elsewhere}, which "
                         f"--images does not change: write its file_names relative to the image folder)")
    with pytest.raises(DatasetError, match=r"1 of 2 image files not found under .* \(the json names 1 of "
                                           r"them by absolute paths, .* which --set data.train_images "
                                           r"does not change"):
        check_files_exist(load_coco(str(path)), "--set data.train_images=DIR")


def test_check_json_without_annotations_is_unlabeled(make_coco):
    path = make_coco([(1, "a.png", 8, 8), (2, "b.png", 8, 8)], files=True)
    data = json.loads(path.read_text())
    del data["annotations"]
    path.write_text(json.dumps(data))
    ok, text = check_dataset(str(path))
    assert ok and text.splitlines()[:2] == [f"OK: {path} (COCO json without annotations, unlabeled)",
                                            "  images: 2"]
    assert "boxes" not in text.splitlines()[2]


def test_check_voc_and_folder(make_voc, tmp_path):
    root = make_voc({"a": (40, 40, [("cat", 1, 1, 10, 10), ("dog", 1, 1, 40, 40, 1)]), "b": (20, 20, [])})
    ok, text = check_dataset(str(root))
    assert ok and f"OK: {root} (Pascal VOC, image set 'trainval', labeled)" in text
    assert "  boxes: 1" in text and "  ignored boxes (crowd / difficult): 1" in text
    assert "  images without boxes: 1" in text and "  classes: 20" in text

    folder = tmp_path / "pool"
    write_image(folder / "x.png", 3, 3)
    write_image(folder / "y.png", 3, 3)
    ok, text = check_dataset(str(folder))
    assert ok and text.splitlines()[:2] == [f"OK: {folder} (folder of images, unlabeled)", "  images: 2"]
    ok, text = check_dataset(str(tmp_path / "missing"))
    assert not ok and "missing: no such file or folder" in text


def test_cli_data_check(make_coco, capsys):
    path = _counted(make_coco)
    assert main(["data", "check", str(path)]) == 0
    assert "boxes: 6" in capsys.readouterr().out
    (path.parent / "a.png").unlink()
    assert main(["data", "check", str(path)]) == 1
    assert "image 1 (a.png): image file not found" in capsys.readouterr().out


def test_check_folder_decodes_every_image(tmp_path):
    # the same files listed in a json fail there (test_datasets): a folder reports them alike
    from PIL import Image

    folder = tmp_path / "pool"
    write_image(folder / "a.png", 20, 20)
    write_image(folder / "b.jpg", 64, 48)  # cut short after its header
    cut_short(folder / "b.jpg")
    Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 60).save(folder / "c.png")
    ok, text = check_dataset(str(folder))
    assert not ok and text.splitlines()[:2] == [f"FAILED: {folder}", f"{folder}: 2 problems:"]
    assert f"image 2 (b.jpg): cannot read image file {folder / 'b.jpg'}" in text
    assert "truncated" in text.lower()
    assert f"image 3 (c.png): cannot read image file {folder / 'c.png'} (I;16 pixels (more than 8" in text
    # loading for training reads the headers only, as for a json
    from softteacher.data.datasets import load_unlabeled

    assert len(load_unlabeled(folder)) == 3


def test_an_option_that_does_not_apply_to_the_data_is_named(make_coco, make_voc, caplog, capsys):
    path = make_coco([(1, "a.png", 8, 8)], files=True)
    root = make_voc({"a": (20, 20, [])})
    assert main(["data", "check", str(path), "--split", "val"]) == 0
    assert f"--split is ignored: it names a VOC root's image set, and {path} is none" in caplog.text
    assert main(["data", "check", str(root), "--images", str(path.parent)]) == 0
    assert f"--images is ignored: {root} is a VOC root" in caplog.text
    caplog.clear()
    assert main(["data", "check", str(path), f"--images={path.parent}"]) == 0
    assert "ignored" not in caplog.text
