"""``softteacher data show``: pictures of the views, written atomically."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from softteacher.config import AugmentConfig
from softteacher.data.records import DatasetError
from softteacher.data.show import show_views, view_panels

AUG = AugmentConfig(train_short_side=(48, 64), train_max_size=96)


def _tiny_coco(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    entries, anns = [], []
    for i in range(3):
        arr = np.zeros((48, 64, 3), dtype=np.uint8)
        arr[10:30, 20:44] = (200, 60, 20)
        Image.fromarray(arr).save(images / f"{i}.png")
        entries.append({"id": i + 1, "file_name": f"{i}.png", "width": 64, "height": 48})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 3, "bbox": [20, 10, 24, 20],
                     "area": 480, "iscrowd": 0})
    ann_file = tmp_path / "train.json"
    ann_file.write_text(json.dumps({"images": entries, "annotations": anns,
                                    "categories": [{"id": 3, "name": "thing"}]}))
    return ann_file


def test_show_views_writes_pngs(tmp_path):
    ann_file = _tiny_coco(tmp_path)
    out = tmp_path / "views"
    images = tmp_path / "images"
    paths = show_views(ann_file, images=images, out_dir=out, num=2, seed=0, augment=AUG)
    assert len(paths) == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)  # no temp files
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width > 64 * 2 and im.height >= 48
    again = show_views(ann_file, images=images, out_dir=tmp_path / "again", num=2, seed=0,
                       augment=AUG)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    # unlabeled images (a folder of them): the same views, without boxes
    plain = show_views(images, out_dir=tmp_path / "plain", num=3, seed=0, augment=AUG)
    assert [p.name for p in plain] == ["views_000_image1.png", "views_001_image2.png",
                                       "views_002_image3.png"]
    with Image.open(plain[0]) as a, Image.open(paths[0]) as b:
        assert a.size == b.size and a.tobytes() != b.tobytes()  # the same views, the boxes left out
    # nothing to draw, or a seed numpy refuses: said in the options' words, nothing written
    with pytest.raises(ValueError, match=r"^--num 0: expected 1 or more images to draw$"):
        show_views(ann_file, images=images, out_dir=tmp_path / "none", num=0)
    with pytest.raises(ValueError, match=r"^--seed -1: expected 0 or more$"):
        show_views(ann_file, images=images, out_dir=tmp_path / "none", seed=-1)
    assert not (tmp_path / "none").exists()


def test_view_panels_counts_dropped_boxes():
    img = torch.zeros(3, 48, 64, dtype=torch.uint8)
    boxes = torch.tensor([[20.0, 10.0, 44.0, 30.0], [0.0, 0.0, 0.5, 0.5]])
    picture, dropped = view_panels(img, boxes, torch.tensor([1, 1]), np.random.default_rng(0),
                                   AUG, ["thing"])
    assert picture.mode == "RGB"
    assert dropped["weak"] == 1
    empty, dropped = view_panels(img, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long),
                                 np.random.default_rng(0), AUG)
    assert dropped == {"weak": 0, "strong": 0}


def test_captions_wrap_to_a_narrow_panel_and_keep_the_panels_level():
    from PIL import ImageFont

    from softteacher.data.show import _panels, _wrap

    font = ImageFont.load_default()
    title = "strong: as weak, translate, rotate, shear, erase"
    width = int(font.getlength("strong: as weak, translate")) + 1
    assert _wrap(title, width, font) == ["strong: as weak, translate", "rotate, shear, erase"]
    assert _wrap(title, 1000, font) == [title]
    assert _wrap("averyveryverylongword, b", 5, font) == ["averyveryverylongword", "b"]  # never cut
    narrow, wide = Image.new("RGB", (width + 4, 20)), Image.new("RGB", (400, 30))
    a, b = _panels([(narrow, title), (wide, "original")])
    line = font.getbbox("Ag")[3] + 3
    assert a.size == (width + 4, 20 + 2 * line + 2) and b.size == (400, 30 + 2 * line + 2)
    assert a.getpixel((0, 2 * line + 2)) == (0, 0, 0)  # the image starts below both lines
    assert a.getpixel((0, 2 * line + 1)) == (255, 255, 255)


def test_show_names_the_folder_of_images_not_beside_the_json(tmp_path, monkeypatch):
    ann_file = _tiny_coco(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match=r"train.json: 2 of 2 image files not found under .*files "
                                           r"of those names and sizes are under images: --images images"):
        show_views(ann_file, out_dir=tmp_path / "views", num=2, augment=AUG)
    assert not (tmp_path / "views").exists()
