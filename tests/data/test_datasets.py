import json
import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image

from softteacher.data.datasets import (
    CLIPPED,
    OUTSIDE,
    SIZE_FROM_FILE,
    VOC_CLASSES,
    ZERO_SIZE,
    check_files_exist,
    check_image_files,
    check_record_files,
    find_image_folder,
    load_coco,
    load_dataset,
    load_unlabeled,
    load_voc,
    read_image,
    write_coco,
)
from softteacher.data.records import DatasetError, ImageRecord

from .conftest import cut_short, write_image

CATS = ((1, "cat"), (5, "dog"), (90, "toothbrush"))


def assert_same_records(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert (ra.image_id, ra.file_name, ra.path, ra.width, ra.height) == \
               (rb.image_id, rb.file_name, rb.path, rb.width, rb.height)
        for field in ("boxes", "labels", "ann_ids", "ignore_boxes", "ignore_labels"):
            x, y = getattr(ra, field), getattr(rb, field)
            assert x.dtype == y.dtype and x.shape == y.shape, field
            np.testing.assert_array_equal(x, y, err_msg=field)


# ----------------------------------------------------------------------------- read_image

@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_read_image_converts_to_rgb(tmp_path, mode):
    expected = write_image(tmp_path / "a.png", 5, 3, mode=mode)
    img = read_image(str(tmp_path / "a.png"))
    assert img.shape == (3, 3, 5) and img.dtype == torch.uint8
    np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), expected)
    if mode == "L":
        assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])


def test_read_image_errors_name_file_source_and_record(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(DatasetError, match=r"nope\.jpg"):
        read_image(str(missing))
    rec = ImageRecord(7, "nope.jpg", str(missing), 5, 3)
    with pytest.raises(DatasetError) as e:
        read_image(str(missing), rec, "train.json")
    assert "train.json: image 7 (nope.jpg): image file not found" in str(e.value)

    corrupt = tmp_path / "bad.png"
    corrupt.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=r"bad\.png.*cannot read"):
        read_image(str(corrupt))


def test_read_image_size_mismatch(tmp_path):
    write_image(tmp_path / "a.png", 5, 3)
    rec = ImageRecord(4, "a.png", str(tmp_path / "a.png"), 6, 3)
    with pytest.raises(DatasetError) as e:
        read_image(rec.path, rec, "val.json")
    msg = str(e.value)
    assert msg.startswith("val.json: image 4 (a.png): file ")
    assert "is 5x3" in msg and "say 6x3" in msg


def test_missing_images_are_looked_for_below_the_json_and_the_working_folder(tmp_path, monkeypatch):
    """A json whose image folder was not named: the files are found two levels down, and the
    message says the setting that reads them."""
    for name in ("a/1.png", "a/2.png"):
        write_image(tmp_path / "data" / "photos" / "set1" / name, 4, 3)
    write_image(tmp_path / "data" / "decoy" / "a" / "1.png", 4, 3)  # one of the two only
    (tmp_path / "data" / ".hidden" / "a").mkdir(parents=True)
    source = tmp_path / "data" / "train.json"
    source.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a/1.png", "width": 4, "height": 3},
                   {"id": 2, "file_name": "a/2.png", "width": 4, "height": 3}],
        "annotations": [], "categories": [{"id": 1, "name": "cat"}]}))
    monkeypatch.chdir(tmp_path)
    dset = load_coco(str(source))
    with pytest.raises(DatasetError) as e:
        check_files_exist(dset, "--set data.train_images=DIR")
    assert str(e.value).startswith(
        f"{source}: 2 of 2 image files not found under {source.parent} (--set data.train_images=DIR "
        f"names the image folder; files of those names and sizes are under data/photos/set1: --set "
        f"data.train_images=data/photos/set1):\n  image 1 (a/1.png): no file ")
    records = dset.records
    assert find_image_folder(records, [tmp_path / "data"], depth=1) is None  # too deep
    assert find_image_folder(records[:1], [tmp_path / "data"]) == (tmp_path / "data" / "decoy").resolve()
    write_image(tmp_path / "data" / "decoy" / "a" / "2.png", 5, 3)  # the name, not the size
    assert find_image_folder(records, [tmp_path / "data"], depth=1) is None
    assert find_image_folder([ImageRecord(3, "a/3.png", "", 4, 3)], [tmp_path]) is None
    # prediction pictures have the images' names and sizes: passed over
    write_image(tmp_path / "data" / "out" / "a" / "2.png", 4, 3)
    write_image(tmp_path / "data" / "out" / "a" / "1.png", 4, 3)
    for name in ("results.json", "images.json"):
        (tmp_path / "data" / "out" / name).write_text("[]")
    assert find_image_folder(records, [tmp_path / "data"], depth=1) is None


def test_a_coco_layouts_image_folder_beside_its_annotations_is_found(tmp_path, monkeypatch):
    root = tmp_path / "coco"
    write_image(root / "val2017" / "1.png", 4, 3)
    source = root / "annotations" / "instances_val2017.json"
    source.parent.mkdir(parents=True)
    source.write_text(json.dumps({"images": [{"id": 1, "file_name": "1.png", "width": 4, "height": 3}],
                                  "annotations": [], "categories": [{"id": 1, "name": "cat"}]}))
    monkeypatch.chdir(tmp_path / "coco" / "annotations")  # neither the json's folder nor below it
    with pytest.raises(DatasetError, match=f"files of those names and sizes are under {root / 'val2017'}: "
                                           f"--images {root / 'val2017'}"):
        check_files_exist(load_coco(str(source)), "--images DIR")


# ----------------------------------------------------------------------------- COCO

def test_load_coco_boxes_labels_and_category_mapping(make_coco):
    path = make_coco([(10, "a.png", 40, 30), (11, "sub/b.png", 20, 20)],
                     [(100, 10, 90, [1.5, 2, 10, 5]), (101, 10, 1, [0, 0, 40, 30]),
                      (102, 11, 5, [3, 4, 2, 2])], CATS)
    dset = load_coco(path)
    assert dset.source == str(path) and dset.image_root == str(path.parent)
    assert dset.has_annotations and not dset.report
    assert dset.categories.names == ["cat", "dog", "toothbrush"]
    # non-contiguous ids 1, 5, 90 <-> labels 1, 2, 3
    assert [dset.categories.label(i) for i in (1, 5, 90)] == [1, 2, 3]
    assert [dset.categories.category_id(label) for label in (1, 2, 3)] == [1, 5, 90]
    a, b = dset.records
    assert (a.image_id, a.file_name, a.path, a.width, a.height) == \
           (10, "a.png", str(path.parent / "a.png"), 40, 30)
    np.testing.assert_array_equal(a.boxes, [[1.5, 2, 11.5, 7], [0, 0, 40, 30]])
    assert a.boxes.dtype == np.float32
    np.testing.assert_array_equal(a.labels, [3, 1])
    np.testing.assert_array_equal(a.ann_ids, [100, 101])
    assert b.path == str(path.parent / "sub" / "b.png")
    np.testing.assert_array_equal(b.boxes, [[3, 4, 5, 6]])
    np.testing.assert_array_equal(b.labels, [2])


def test_load_coco_images_folder_override(make_coco, tmp_path):
    path = make_coco([(1, "a.png", 8, 8)], files=False)
    dset = load_coco(path, images=tmp_path / "elsewhere")
    assert dset.image_root == str(tmp_path / "elsewhere")
    assert dset.records[0].path == str(tmp_path / "elsewhere" / "a.png")


def test_crowd_goes_to_ignore_and_image_without_boxes_is_kept(make_coco):
    path = make_coco([(1, "a.png", 40, 30), (2, "b.png", 10, 10)],
                     [(1, 1, 1, [1, 1, 5, 5]), (2, 1, 1, [10, 10, 20, 10], 1)])
    a, b = load_coco(path).records
    np.testing.assert_array_equal(a.boxes, [[1, 1, 6, 6]])
    np.testing.assert_array_equal(a.ignore_boxes, [[10, 10, 30, 20]])
    np.testing.assert_array_equal(a.ignore_labels, [1])  # the crowd's class
    np.testing.assert_array_equal(a.areas, [25])  # the file's area
    np.testing.assert_array_equal(a.ann_ids, [1])
    assert b.boxes.shape == (0, 4) and b.labels.shape == (0,) and b.ignore_boxes.shape == (0, 4)


def test_clip_outside_and_zero_size_are_counted(make_coco, caplog):
    path = make_coco([(1, "a.png", 40, 30)],
                     [(1, 1, 1, [-2, 25, 10, 10]),     # partly outside: clipped
                      (2, 1, 1, [40, 0, 5, 5]),        # starts at the right edge: nothing left
                      (3, 1, 1, [-9, -9, 4, 4]),       # wholly outside
                      (4, 1, 1, [5, 5, 3, 0]),         # zero height (as in COCO train2017)
                      (5, 1, 1, [2, 2, 3, 3])])
    with caplog.at_level(logging.WARNING, logger="softteacher.data.datasets"):
        dset = load_coco(path)
    rec = dset.records[0]
    np.testing.assert_array_equal(rec.boxes, [[0, 25, 8, 30], [2, 2, 5, 5]])
    np.testing.assert_array_equal(rec.ann_ids, [1, 5])
    assert dset.report.counts == {CLIPPED: 1, OUTSIDE: 2, ZERO_SIZE: 1}
    assert "annotation 1" in dset.report.examples[CLIPPED][0]
    assert "annotation 4" in dset.report.examples[ZERO_SIZE][0]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and str(path) in warnings[0] and f"2 x {OUTSIDE}" in warnings[0]


def test_missing_size_is_read_from_file(make_coco):
    path = make_coco([(1, "a.png", 12, 7)])
    data = json.loads(path.read_text())
    del data["images"][0]["width"], data["images"][0]["height"]
    path.write_text(json.dumps(data))
    dset = load_coco(path)
    assert (dset.records[0].width, dset.records[0].height) == (12, 7)
    assert dset.report.counts == {SIZE_FROM_FILE: 1}


def _edit(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


BAD_COCO = {
    "duplicate image id": (
        lambda d: d["images"].append({"id": 1, "file_name": "c.png", "width": 4, "height": 4}),
        ["image 1 (c.png): duplicate image id 1"]),
    "duplicate annotation id": (lambda d: d["annotations"].append(dict(d["annotations"][0], image_id=2)),
                                ["annotation 7: duplicate annotation id 7"]),
    "unknown image": (lambda d: d["annotations"][0].update(image_id=99),
                      ["annotation 7: unknown image id 99"]),
    "unknown category": (lambda d: d["annotations"][0].update(category_id=3),
                         ["image 1 (a.png), annotation 7: unknown category id 3"]),
    "bbox of 3 numbers": (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]),
                          ["image 1 (a.png), annotation 7: bbox must be 4 numbers", "[1, 2, 3]"]),
    "bbox not numbers": (lambda d: d["annotations"][0].update(bbox=["1", 2, 3, 4]),
                         ["image 1 (a.png), annotation 7: bbox must be 4 numbers"]),
    "negative width": (lambda d: d["annotations"][0].update(bbox=[5, 5, -1, 3]),
                       ["image 1 (a.png), annotation 7: "
                        "bbox width and height must not be negative, got -1 x 3"]),
    "image without id": (lambda d: d["images"][1].pop("id"),
                         ["images[1]: needs an integer 'id', has none: {'file_name': 'b.png'"]),
    "annotation null": (lambda d: d["annotations"].insert(0, None),
                        ["annotations[0]: expected a record ({...}), got None"]),
    "category a list": (lambda d: d["categories"].insert(0, [1, "cat"]),
                        ["categories[0]: expected a record ({...}), got [1, 'cat']"]),
    "annotation id a string": (lambda d: d["annotations"][0].update(id="7"),
                               ["annotations[0]: needs an integer 'id', got '7'"]),
    "bad image size": (lambda d: d["images"][1].update(width=0),
                       ["image 2 (b.png): width and height must be positive integers, got 0 x 10"]),
    "no annotations key": (lambda d: d.pop("annotations"), ["no 'annotations' key"]),
    "no categories key": (lambda d: d.pop("categories"), ["no 'categories' key"]),
    "no categories": (lambda d: d.update(categories=[]),
                      ["'categories' is empty: a labeled COCO json lists the classes"]),
    "no images": (lambda d: d.update(images=[], annotations=[]), ["no images"]),
    "no images key": (lambda d: d.pop("images"), ["no 'images' key"]),
    "images not a list": (lambda d: d.update(images={}), ["'images' must be a list"]),
    "duplicate category": (lambda d: d["categories"].append({"id": 1, "name": "x"}),
                           ["duplicate category ids [1]"]),
    "duplicate category name": (lambda d: d["categories"].append({"id": 2, "name": "cat"}),
                                ["duplicate category names ['cat']"]),
    "image id of an annotation a string": (
        lambda d: d["annotations"][0].update(image_id="1"),
        ["annotation 7: image_id must be an integer, got '1' (a str)"]),
    "no image id": (lambda d: d["annotations"][0].pop("image_id"), ["annotation 7: no image_id"]),
    "category id a string": (lambda d: d["annotations"][0].update(category_id="1"),
                             ["image 1 (a.png), annotation 7: category_id must be an integer, "
                              "got '1' (a str)"]),
    "segmentation without bbox": (
        lambda d: (d["annotations"][0].pop("bbox"),
                   d["annotations"][0].update(segmentation=[[1, 1, 4, 1, 4, 4]])),
        ["annotation 7: bbox must be 4 numbers [x, y, width, height], got None (every annotation "
         "needs a bbox; a segmentation alone is not read)"]),
    "iscrowd a string": (lambda d: d["annotations"][0].update(iscrowd="0"),
                         ["image 1 (a.png), annotation 7: iscrowd must be 0 or 1, got '0'"]),
    "iscrowd a list": (lambda d: d["annotations"][0].update(iscrowd=[1]),
                       ["image 1 (a.png), annotation 7: iscrowd must be 0 or 1, got [1]"]),
}


def test_annotations_of_a_refused_image_add_no_second_problem(make_coco):
    path = make_coco([(1, "a.png", 20, 20), (2, "b.png", 10, 10)],
                     [(7, 1, 1, [1, 1, 4, 4]), (8, 2, 1, [1, 1, 4, 4])], files=False)
    _edit(path, lambda d: d["images"][1].update(width="10"))
    with pytest.raises(DatasetError) as e:
        load_coco(path)
    assert str(e.value) == (f"{path}: image 2 (b.png): width and height must be positive integers, "
                            f"got '10' x 10")
    # an image id written as a string refuses the image, not each of its annotations again
    _edit(path, lambda d: d["images"][1].update(width=10, id="2"))
    with pytest.raises(DatasetError) as e:
        load_coco(path)
    assert str(e.value).startswith(f"{path}: images[1]: needs an integer 'id', got ")
    assert "annotation 8" not in str(e.value)
    for odd in ("--2", "²"):  # not an integer, though str.isdigit would say so of the second
        _edit(path, lambda d: d["images"][1].update(id=odd))
        with pytest.raises(DatasetError, match=r"images\[1\]: needs an integer 'id'"):
            load_coco(path)
    # an annotation of a refused image with a problem of its own: both listed at once
    _edit(path, lambda d: (d["images"][1].update(id=2, width="10"),
                           d["annotations"][1].update(category_id=7)))
    with pytest.raises(DatasetError) as e:
        load_coco(path)
    assert str(e.value).splitlines()[1:] == [
        "  image 2 (b.png): width and height must be positive integers, got '10' x 10",
        "  image 2, annotation 8: unknown category id 7"]


@pytest.mark.parametrize("case", sorted(BAD_COCO))
def test_bad_coco_names_file_and_record(make_coco, case):
    edit, expected = BAD_COCO[case]
    path = make_coco([(1, "a.png", 20, 20), (2, "b.png", 10, 10)], [(7, 1, 1, [1, 1, 4, 4])],
                     files=False)
    _edit(path, edit)
    with pytest.raises(DatasetError) as e:
        load_coco(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ")
    for part in expected:
        assert part in msg


def test_corrupt_json_reports_position(make_coco, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [\n  {"id": 1,}\n]}')
    with pytest.raises(DatasetError, match=r"broken\.json: not valid JSON: .* at line 2 column 12"):
        load_coco(path)
    path.write_text('{"images": [{"file_name": "a.jpg')  # cut short inside a string
    with pytest.raises(DatasetError) as e:
        load_coco(path)
    assert str(e.value).endswith("broken.json: not valid JSON: Unterminated string starting at line 1 "
                                 "column 27 (char 26)")
    with pytest.raises(DatasetError, match=r"missing\.json: no such file"):
        load_coco(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(DatasetError, match=r"list\.json: expected a JSON object"):
        load_coco(tmp_path / "list.json")


def test_all_problems_listed_together_and_capped(make_coco):
    anns = [(i, 1, 1, [0, 0, -1, 1]) for i in range(1, 26)] + [(99, 5, 1, [0, 0, 1, 1])]
    path = make_coco([(1, "a.png", 20, 20)], anns, files=False)
    with pytest.raises(DatasetError) as e:
        load_coco(path)
    lines = str(e.value).splitlines()
    assert lines[0] == f"{path}: 26 problems:"
    assert lines[1].strip().startswith("image 1 (a.png), annotation 1: bbox width")
    assert len(lines) == 1 + 20 + 1 and lines[-1].strip() == "... and 6 more"


def test_verify_images_decodes_every_file(make_coco):
    # a file cut short after its header passes a header check and fails when decoded; a 16-bit
    # image would be clipped to 255 by the conversion to RGB
    from PIL import Image

    path = make_coco([(1, "a.png", 20, 20), (2, "b.jpg", 24, 16), (3, "c.png", 8, 8)])
    root = path.parent
    Image.fromarray(np.full((16, 24, 3), 90, np.uint8)).save(root / "b.jpg", quality=90)
    cut_short(root / "b.jpg")
    Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 60).save(root / "c.png")  # 0..3780
    assert Image.open(root / "c.png").mode == "I;16"
    with pytest.raises(DatasetError) as e:
        load_coco(path, verify_images=True)
    msg = str(e.value)
    assert f"{path}: 2 problems:" in msg
    assert f"image 2 (b.jpg): cannot read image file {root / 'b.jpg'}" in msg and "truncated" in msg.lower()
    assert f"image 3 (c.png): cannot read image file {root / 'c.png'} (I;16 pixels (more than 8 bits" in msg
    with pytest.raises(DatasetError) as e:
        read_image(str(root / "c.png"))
    assert str(e.value).startswith(f"{root / 'c.png'}: image file has I;16 pixels")  # the path once
    assert "convert the image to 8-bit" in str(e.value)


def test_verify_images_lists_missing_and_wrong_size(make_coco):
    path = make_coco([(1, "a.png", 20, 20), (2, "b.png", 10, 10), (3, "c.png", 8, 8)])
    (path.parent / "b.png").unlink()
    _edit(path, lambda d: d["images"][2].update(width=9))
    assert len(load_coco(path)) == 3  # files are not opened by default
    with pytest.raises(DatasetError) as e:
        load_coco(path, verify_images=True)
    msg = str(e.value)
    assert f"{path}: 2 problems:" in msg
    assert f"image 2 (b.png): image file not found: {path.parent / 'b.png'}" in msg
    assert "image 3 (c.png): file" in msg and "is 8x8" in msg and "say 9x8" in msg


def test_write_coco_round_trip(make_coco, tmp_path):
    path = make_coco([(3, "a.png", 40, 30), (8, "b.png", 10, 10)],
                     [(5, 3, 90, [1.25, 2.5, 10.1, 5.3]), (6, 3, 5, [0, 0, 3, 3], 1),
                      (2, 8, 1, [1, 1, 2, 2])], CATS)
    dset = load_coco(path)
    out = tmp_path / "out" / "copy.json"
    write_coco(dset, out)
    written = json.loads(out.read_text())
    assert sorted(c["id"] for c in written["categories"]) == [1, 5, 90]
    assert [a["category_id"] for a in written["annotations"] if not a["iscrowd"]] == [90, 1]
    assert [a["category_id"] for a in written["annotations"] if a["iscrowd"]] == [5]  # the crowd's
    again = load_coco(out, images=path.parent)
    assert again.categories == dset.categories
    assert_same_records(again.records, dset.records)
    # the file's areas travel, the boxes' where the source had none
    dset.records[0].areas = np.array([7.5], np.float32)
    write_coco(dset, out)
    assert [a["area"] for a in json.loads(out.read_text())["annotations"] if not a["iscrowd"]] == \
        [7.5, 4.0]


# ----------------------------------------------------------------------------- unlabeled

def test_load_unlabeled_json_ignores_annotations(make_coco):
    path = make_coco([(4, "a.png", 20, 20)], [(1, 4, 5, [1, 1, 3, 3])], CATS)
    dset = load_unlabeled(path)
    assert not dset.has_annotations and dset.categories.names == ["cat", "dog", "toothbrush"]
    assert dset.records[0].image_id == 4 and dset.records[0].boxes.shape == (0, 4)
    _edit(path, lambda d: (d.pop("annotations"), d.pop("categories")))
    dset = load_unlabeled(path)
    assert len(dset) == 1 and len(dset.categories) == 0
    _edit(path, lambda d: d.update(images=[]))
    with pytest.raises(DatasetError, match="no images"):
        load_unlabeled(path)


def test_load_unlabeled_folder(tmp_path):
    folder = tmp_path / "pool"
    write_image(folder / "z.png", 4, 3)
    write_image(folder / "sub" / "a.JPG", 6, 5)
    write_image(folder / "b.bmp", 2, 2)
    write_image(folder / "scan.tif", 3, 2)
    (folder / "notes.txt").write_text("not an image")
    write_image(folder / ".hidden" / "c.png", 2, 2)
    dset = load_unlabeled(folder)
    assert not dset.has_annotations and dset.image_root == str(folder)
    assert [(r.image_id, r.file_name, r.width, r.height) for r in dset.records] == \
           [(1, "b.bmp", 2, 2), (2, "scan.tif", 3, 2), (3, "sub/a.JPG", 6, 5), (4, "z.png", 4, 3)]
    assert dset.records[2].path == str(folder / "sub" / "a.JPG")
    (folder / "broken.png").write_bytes(b"xx")
    with pytest.raises(DatasetError, match=r"pool: image 2 \(broken.png\): cannot read image file"):
        load_unlabeled(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=r"empty: no image files"):
        load_unlabeled(empty)


# ----------------------------------------------------------------------------- VOC

def test_load_voc_boxes_difficult_and_default_classes(make_voc):
    root = make_voc({"000005": (50, 40, [("person", 1, 1, 10, 20), ("cat", 5, 6, 5, 6),
                                         ("dog", 2, 3, 30, 40, 1)]),
                     "000007": (30, 30, [])})
    dset = load_voc(root)
    assert dset.source == str(root) and dset.image_root == str(root / "JPEGImages")
    assert dset.categories.names == list(VOC_CLASSES)
    a, b = dset.records
    assert (a.image_id, a.file_name, a.path, a.width, a.height) == \
           (1, "000005.jpg", str(root / "JPEGImages" / "000005.jpg"), 50, 40)
    np.testing.assert_array_equal(a.boxes, [[0, 0, 10, 20], [4, 5, 5, 6]])  # 1 px box stays 1 px
    np.testing.assert_array_equal(a.labels, [15, 8])  # person, cat in VOC order
    np.testing.assert_array_equal(a.ann_ids, [1, 2])
    np.testing.assert_array_equal(a.ignore_boxes, [[1, 2, 30, 40]])
    np.testing.assert_array_equal(a.ignore_labels, [12])  # the difficult object's class: dog
    assert a.areas.shape == (0,)  # VOC gives no areas: the boxes' count
    assert b.image_id == 2 and b.boxes.shape == (0, 4)


def test_voc_class_names_other_than_voc(make_voc):
    root = make_voc({"x": (20, 20, [("zebra", 1, 1, 5, 5), ("ant", 1, 1, 5, 5)])})
    assert load_voc(root).categories.names == ["ant", "zebra"]
    dset = load_voc(root, class_names=["zebra", "ant", "bee"])
    assert dset.categories.names == ["zebra", "ant", "bee"]
    np.testing.assert_array_equal(dset.records[0].labels, [1, 2])


def test_voc_and_coco_give_identical_records(make_voc, make_coco):
    objects = {"a": (50, 40, [("car", 3, 4, 20, 30), ("bus", 1, 1, 50, 40), ("car", 7, 8, 9, 10, 1)]),
               "b": (30, 20, [("bus", 10, 5, 12, 25)])}  # ymax beyond the image: clipped
    root = make_voc(objects)
    voc = load_voc(root, class_names=["bus", "car"])
    images, anns, ann_id = [], [], 0
    for image_id, (name, (w, h, objs)) in enumerate(objects.items(), start=1):
        images.append((image_id, f"{name}.jpg", w, h))
        for cls, x1, y1, x2, y2, *difficult in objs:
            ann_id += 1
            anns.append((ann_id, image_id, 1 if cls == "bus" else 2,
                         [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1], *difficult))
    path = make_coco(images, anns, ((1, "bus"), (2, "car")), files=False)
    coco = load_coco(path, images=root / "JPEGImages")
    assert coco.categories == voc.categories
    assert_same_records(coco.records, voc.records)
    assert coco.report.counts == voc.report.counts == {CLIPPED: 1}


def test_bad_voc_names_xml_and_object(make_voc):
    root = make_voc({"a": (20, 20, [("cat", 1, 1, 5, 5), ("cat", 6, 1, 3, 5)]),
                     "b": (20, 20, [("cat", 1, 1, "x", 5)]),
                     "c": (20, 20, []), "d": (20, 20, []),
                     "e": (20, 20, [("cat", 1, 1, 2, 2), ("zebra", 1, 1, 2, 2)])})
    (root / "Annotations" / "c.xml").unlink()
    (root / "Annotations" / "d.xml").write_text("<annotation><size>")
    with pytest.raises(DatasetError) as e:
        load_voc(root, class_names=["cat"])
    msg = str(e.value)
    ann = root / "Annotations"
    assert msg.startswith(f"{root} (trainval): 5 problems:")
    assert f"{ann / 'a.xml'}: object 2 (cat): bad box xmin=6 ymin=1 xmax=3 ymax=5" in msg
    assert f"{ann / 'b.xml'}: object 1 (cat): <bndbox> needs numbers" in msg
    assert f"{ann / 'c.xml'}: no such annotation file" in msg
    assert f"{ann / 'd.xml'}: malformed XML (" in msg and "line 1" in msg
    assert f"{ann / 'e.xml'}: object 2: unknown class 'zebra'" in msg


def test_voc_missing_split_and_not_a_root(make_voc, tmp_path):
    root = make_voc({"a": (20, 20, [])})
    with pytest.raises(DatasetError, match=r"test\.txt: no such image set .*available: trainval"):
        load_voc(root, split="test")
    with pytest.raises(DatasetError, match="not a Pascal VOC root"):
        load_voc(tmp_path)


def test_voc_verify_images(make_voc):
    root = make_voc({"a": (20, 20, []), "b": (20, 20, [])})
    write_image(root / "JPEGImages" / "b.jpg", 21, 20)
    assert len(load_voc(root)) == 2
    xml = root / "Annotations" / "b.xml"  # the file that gives the size is named
    with pytest.raises(DatasetError, match=rf"image 2 \(b.jpg, {re.escape(str(xml))}\): file .* is 21x20"):
        load_voc(root, verify_images=True)
    dset = load_voc(root)
    assert [r.origin for r in dset.records] == [str(root / "Annotations" / "a.xml"), str(xml)]
    with pytest.raises(DatasetError, match=rf"image 2 \(b.jpg, {re.escape(str(xml))}\): file .* say 20x20"):
        check_record_files(dset)
    with pytest.raises(DatasetError, match=rf"image 2 \(b.jpg, {re.escape(str(xml))}\): file .* is 21x20"):
        read_image(dset.records[1].path, dset.records[1], dset.source)
    unlabeled = load_dataset(root, labeled=False)
    assert [r.origin for r in unlabeled.records] == [r.origin for r in dset.records]


def test_training_data_from_a_voc_root_names_its_image_set(make_voc, caplog):
    from softteacher.config import Config
    from softteacher.engine import load_data

    root = make_voc({"a": (20, 20, [("cat", 1, 1, 5, 5)]), "b": (20, 20, [])})
    cfg = Config()
    cfg.method.enabled = False
    cfg.data.train, cfg.data.val, cfg.data.val_split = str(root), str(root), "trainval"
    caplog.set_level("INFO")
    load_data(cfg)
    assert f"train: 2 images from {root} (image set trainval)" in caplog.text
    assert f"val: 2 images from {root} (image set trainval)" in caplog.text
    # the same files as val and as unlabeled images: said, as that is rarely meant
    assert "2 of the 2 val images are training images too" in caplog.text
    cfg.method.enabled, cfg.data.unlabeled = True, str(root)
    load_data(cfg)
    assert f"every unlabeled image (2, {root}) is a labeled one too" in caplog.text


def test_voc_images_other_than_jpg(make_voc):
    # labelImg writes <filename> with the image's own suffix; a folder may hold PNGs under the id
    root = make_voc({"a": (20, 20, []), "b": (20, 20, []), "c": (20, 20, []), "d": (20, 20, [])})
    (root / "JPEGImages" / "a.jpg").rename(root / "JPEGImages" / "photo_a.png")
    xml = root / "Annotations" / "a.xml"
    xml.write_text(xml.read_text().replace("<filename>a.jpg</filename>",
                                           "<filename>photo_a.png</filename>"))
    (root / "JPEGImages" / "b.jpg").rename(root / "JPEGImages" / "b.PNG")
    (root / "JPEGImages" / "d.jpg").unlink()
    records = load_voc(root).records
    assert [r.file_name for r in records] == ["photo_a.png", "b.PNG", "c.jpg", "d.jpg"]
    assert records[0].path == str(root / "JPEGImages" / "photo_a.png")
    with pytest.raises(DatasetError, match=r"image 4 \(d.jpg, .*d.xml\): image file not found"):
        load_voc(root, verify_images=True)


def test_voc_windows_paths_and_a_split_file_with_a_byte_order_mark(make_voc):
    root = make_voc({"a": (20, 20, [("cat", 1, 1, 5, 5)]), "b": (20, 20, [])})
    (root / "JPEGImages" / "a.jpg").rename(root / "JPEGImages" / "photo_a.png")
    xml = root / "Annotations" / "a.xml"
    xml.write_text(xml.read_text().replace("<filename>a.jpg</filename>",
                                           "<filename>C:\\labels\\VOC\\photo_a.png</filename>"))
    split = root / "ImageSets" / "Main" / "trainval.txt"
    split.write_bytes(b"\xef\xbb\xbf" + split.read_bytes())  # as Notepad saves UTF-8
    records = load_voc(root, verify_images=True).records
    assert [r.file_name for r in records] == ["photo_a.png", "b.jpg"]



def test_voc_an_xml_copied_for_another_image_reads_its_own_image(make_voc):
    # b.xml copied from a.xml keeps <filename>a.jpg</filename>; b's own file is b.png
    root = make_voc({"a": (20, 20, [("cat", 1, 1, 5, 5)]), "b": (20, 20, [("cat", 2, 2, 9, 9)])})
    (root / "JPEGImages" / "b.jpg").rename(root / "JPEGImages" / "b.png")
    xml = root / "Annotations" / "b.xml"
    xml.write_text(xml.read_text().replace("<filename>b.jpg</filename>", "<filename>a.jpg</filename>"))
    assert [r.file_name for r in load_voc(root, verify_images=True).records] == ["a.jpg", "b.png"]
    # without a file of its own, both xmls would be of a.jpg: refused, naming both
    (root / "JPEGImages" / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"a\.xml and .*b\.xml: both are of the image file .*a\.jpg"):
        load_voc(root)


def test_voc_xml_in_a_multi_byte_encoding_is_read_and_a_bad_one_named(make_voc):
    root = make_voc({"a": (20, 20, []), "b": (20, 20, []), "c": (20, 20, [])})
    for name, encoding in (("a", "gbk"), ("b", "shift_jis")):
        xml = f'<?xml version="1.0" encoding="{encoding}"?>\n<annotation><size><width>20</width>' \
              f'<height>20</height></size><object><name>猫</name><difficult>0</difficult><bndbox>' \
              f'<xmin>1</xmin><ymin>2</ymin><xmax>5</xmax><ymax>6</ymax></bndbox></object></annotation>'
        (root / "Annotations" / f"{name}.xml").write_bytes(xml.encode(encoding))
    dset = load_voc(root)
    assert dset.categories.names == ["猫"]
    assert [r.boxes.tolist() for r in dset.records] == [[[0, 1, 5, 6]], [[0, 1, 5, 6]], []]
    (root / "Annotations" / "c.xml").write_bytes(b'<?xml version="1.0" encoding="gbk"?>\n<annotation>\xff')
    with pytest.raises(DatasetError, match=r"c\.xml: not gbk text as its declaration says"):
        load_voc(root)
    (root / "Annotations" / "c.xml").write_bytes(b'<?xml version="1.0" encoding="nonesuch"?><annotation/>')
    with pytest.raises(DatasetError, match=r"c\.xml: malformed XML"):
        load_voc(root)


def test_voc_image_sets_in_utf16_with_spaces_in_ids_and_sets_with_underscores_listed(make_voc):
    root = make_voc({"IMG 001": (20, 20, [("cat", 1, 1, 5, 5)]), "b": (20, 20, [])})
    split = root / "ImageSets" / "Main" / "trainval.txt"
    split.write_text("IMG 001\nb\n", encoding="utf-16")  # with its byte-order mark, as Notepad's "Unicode"
    assert [r.file_name for r in load_voc(root, verify_images=True).records] == ["IMG 001.jpg", "b.jpg"]
    (root / "ImageSets" / "Main" / "cat_trainval.txt").write_text("IMG 001  1\nb -1\n")  # a per-class list
    assert [r.file_name for r in load_voc(root, split="cat_trainval").records] == ["IMG 001.jpg", "b.jpg"]
    split.write_bytes(b"b\n\xff\xfe")  # no byte-order mark first: not UTF-8
    with pytest.raises(DatasetError, match=r"trainval\.txt: not UTF-8 text \(invalid start byte at "
                                           r"byte 2\): save it as UTF-8"):
        load_voc(root)
    (root / "ImageSets" / "Main" / "train_10pct.txt").write_text("b\n")
    with pytest.raises(DatasetError, match=r"split 'train10'; available: train_10pct, trainval\)"):
        load_voc(root, split="train10")


def test_coco_file_names_written_on_windows_are_found(make_coco):
    path = make_coco([(1, "images/a.png", 20, 20), (2, "b.png", 20, 20)], [(1, 1, 1, [1, 1, 4, 4])])
    data = json.loads(path.read_text())
    data["images"][0]["file_name"] = "images\\a.png"
    path.write_text(json.dumps(data))
    records = load_coco(path, verify_images=True).records
    assert [r.file_name for r in records] == ["images/a.png", "b.png"]
    assert records[0].path == str(path.parent / "images" / "a.png")


def test_coco_annotation_ids_beyond_64_bits_are_named(make_coco):
    path = make_coco([(1, "a.png", 20, 20)], [(2**63, 1, 1, [1, 1, 4, 4]), (-2**63, 1, 1, [1, 1, 4, 4])])
    with pytest.raises(DatasetError, match=r"ann\.json: annotations\[0\]: id 9223372036854775808 "
                                           r"does not fit in 64 bits$"):  # the one problem: -2**63 fits
        load_coco(path)


# ----------------------------------------------------------------------------- dispatch

def test_load_dataset_dispatch(make_coco, make_voc, tmp_path):
    path = make_coco([(1, "a.png", 20, 20)], [(1, 1, 1, [1, 1, 4, 4])])
    assert load_dataset(path).has_annotations
    unl = load_dataset(path, labeled=False)
    assert not unl.has_annotations and unl.records[0].boxes.shape == (0, 4)

    root = make_voc({"a": (20, 20, [("cat", 1, 1, 5, 5)])})
    assert len(load_dataset(root).records[0].boxes) == 1
    voc_unl = load_dataset(root, labeled=False)
    assert not voc_unl.has_annotations and voc_unl.records[0].boxes.shape == (0, 4)

    folder = tmp_path / "pool"
    write_image(folder / "x.png", 3, 3)
    assert len(load_dataset(folder, labeled=False)) == 1
    with pytest.raises(DatasetError, match="pool: a labeled set needs a COCO json or a Pascal VOC root"):
        load_dataset(folder)
    with pytest.raises(DatasetError, match="nothing-here: no such file or folder"):
        load_dataset(tmp_path / "nothing-here")
    with pytest.raises(DatasetError, match=r"x\.png: expected a COCO \.json"):
        load_dataset(folder / "x.png")


def test_a_voc_val_set_takes_the_training_classes_and_class_names_set_them(make_voc):
    from softteacher.config import Config, apply_overrides
    from softteacher.engine import load_data

    make_voc({"t1": (20, 20, [("zebra", 1, 1, 5, 5), ("ant", 1, 1, 5, 5)]),
              "t2": (20, 20, [("bee", 2, 2, 9, 9)])}, split="trainval")
    root = make_voc({"v1": (20, 20, [("bee", 1, 1, 5, 5)]), "v2": (20, 20, [("ant", 3, 3, 8, 8)])},
                    split="test")
    cfg = Config()
    cfg.method.enabled = False
    cfg.data.train, cfg.data.val = str(root), str(root)
    data = load_data(cfg)  # val alone would be [ant, bee]
    assert data.labeled.categories.names == data.val.categories.names == ["ant", "bee", "zebra"]
    np.testing.assert_array_equal(data.val.records[0].labels, [2])
    cfg = apply_overrides(cfg, ["data.class_names=[zebra, bee, ant]"])
    assert cfg.data.class_names == ("zebra", "bee", "ant")
    data = load_data(cfg)
    assert data.labeled.categories.names == data.val.categories.names == ["zebra", "bee", "ant"]
    np.testing.assert_array_equal(data.val.records[0].labels, [2])


def test_hidden_ground_truth_must_list_the_unlabeled_images_under_their_ids(make_coco):
    from softteacher.config import Config
    from softteacher.engine import load_data

    images = [(1, "a.png", 20, 20), (2, "b.png", 10, 10)]
    anns = [(7, 1, 1, [1, 1, 4, 4]), (8, 2, 1, [1, 1, 4, 4])]
    cfg = Config()
    cfg.data.train = cfg.data.unlabeled = str(make_coco(images, anns, name="train.json"))
    cfg.data.unlabeled_gt = str(make_coco(images, anns, name="gt.json", files=False))
    assert len(load_data(cfg).unlabeled_gt.records) == 2
    swapped = [(2, "a.png", 20, 20), (1, "b.png", 10, 10)]
    cfg.data.unlabeled_gt = str(make_coco(swapped, anns, name="swapped.json", files=False))
    with pytest.raises(ValueError, match=r"swapped\.json: image 1 is .*b\.png \(10x10\), in .*train\.json "
                                         r"image 1 is .*a\.png \(20x20\)"):
        load_data(cfg)
    cfg.data.unlabeled_gt = str(make_coco(images, anns, categories=((1, "dog"),), name="dogs.json",
                                          files=False))
    with pytest.raises(ValueError, match=r"dogs\.json: categories differ from .*train\.json's: "
                                         r"\[1 dog\] against \[1 cat\] \(1 and 1 classes\)"):
        load_data(cfg)


def test_a_voc_val_set_takes_the_ids_of_a_coco_training_json(make_coco, make_voc):
    """A COCO training json whose ids are not 1..K, evaluated on a VOC root of the same names:
    labels follow the names, results the json's ids."""
    from softteacher.config import Config
    from softteacher.engine import load_data

    voc = make_voc({"v1": (20, 20, [("widget", 1, 1, 5, 5), ("dog", 2, 2, 9, 9)])}, split="test")
    train = make_coco([(1, "a.png", 20, 20)], [(1, 1, 9, [1, 1, 4, 4]), (2, 1, 5, [2, 2, 5, 5])],
                      categories=((9, "widget"), (5, "dog")), name="train.json")
    cfg = Config()
    cfg.method.enabled = False
    cfg.data.train, cfg.data.val = str(train), str(voc)
    data = load_data(cfg)
    assert data.val.categories == data.labeled.categories
    assert [(c.id, c.name) for c in data.val.categories.categories] == [(5, "dog"), (9, "widget")]
    rec = data.val.records[0]
    assert [data.val.categories.name(int(k)) for k in rec.labels] == ["widget", "dog"]
    assert [data.val.categories.category_id(int(k)) for k in rec.labels] == [9, 5]
    # a class the training json lacks is named, with the classes it has
    make_voc({"v1": (20, 20, [("cat", 1, 1, 5, 5)])}, split="test")
    with pytest.raises(DatasetError, match=r"object 1: unknown class 'cat' \(classes: dog, widget\)"):
        load_data(cfg)


def test_a_size_turned_by_the_file_s_exif_orientation_is_explained(make_coco):
    path = make_coco([(1, "a.jpg", 10, 20), (2, "b.jpg", 10, 20)], files=False)
    turned = Image.new("RGB", (20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned by 90 degrees
    turned.save(path.parent / "a.jpg", exif=exif)
    Image.new("RGB", (20, 10)).save(path.parent / "b.jpg")  # no EXIF: a plain mismatch
    with pytest.raises(DatasetError) as e:
        load_coco(path, verify_images=True)
    a, b = (line for line in str(e.value).splitlines() if "the annotations say 10x20" in line)
    assert "a.jpg is 20x10" in a and "EXIF orientation 6 turns it by 90 degrees" in a
    assert "b.jpg is 20x10" in b and "EXIF" not in b


def test_category_difference_names_what_each_side_lacks():
    from softteacher.data.records import Category, CategoryMap, category_difference

    a = CategoryMap([Category(i, f"c{i}") for i in range(1, 14)])
    b = CategoryMap([Category(i, f"c{i}") for i in range(2, 15)])
    assert category_difference(a, b) == "[1 c1] against [14 c14] (13 and 13 classes)"
    renamed = CategoryMap([Category(i + 20, f"c{i}") for i in range(1, 13)])
    assert category_difference(renamed, a) == (
        "[21 c1, 22 c2, 23 c3, 24 c4, 25 c5, 26 c6, 27 c7, 28 c8, 29 c9, 30 c10, ... 2 more] against "
        "[1 c1, 2 c2, 3 c3, 4 c4, 5 c5, 6 c6, 7 c7, 8 c8, 9 c9, 10 c10, ... 3 more] (12 and 13 classes)")


def test_an_image_error_says_what_is_wrong_apart_from_the_file(tmp_path):
    missing = tmp_path / "a.jpg"
    with pytest.raises(DatasetError) as e:
        read_image(str(missing))
    assert str(e.value) == f"{missing}: image file not found" and e.value.reason == "image file not found"
    (tmp_path / "b.jpg").write_bytes(b"not an image")
    write_image(tmp_path / "c.png", 8, 6)
    found = check_image_files([missing, tmp_path / "b.jpg", tmp_path / "c.png"], "predict")
    assert list(found) == [missing, tmp_path / "b.jpg"]
    assert str(found[missing]) == f"image file not found: {missing}"
    assert found[missing].reason == "image file not found"
    assert found[tmp_path / "b.jpg"].reason.startswith("cannot read image file (UnidentifiedImageError")
