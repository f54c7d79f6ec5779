import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL
import pytest
from PIL import Image

from softteacher.data import shapes

TINY = {"num_train": 6, "num_val": 3, "num_unlabeled": 4}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shapes.generate_shapes(tmp_path_factory.mktemp("shapes"), seed=0, **TINY)


def _load(path):
    return json.loads(Path(path).read_text())


def _files(paths: shapes.ShapesPaths) -> dict[str, bytes]:
    root = Path(paths.root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_default_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SOFTTEACHER_DATA", str(tmp_path))
    assert shapes.default_root() == str(tmp_path)
    monkeypatch.delenv("SOFTTEACHER_DATA")
    assert shapes.default_root() == str(Path.home() / ".cache" / "softteacher" / "shapes")


def test_layout_and_coco_validity(tiny):
    root = Path(tiny.root)
    assert root.name == f"seed0-t6-v3-u4-v{shapes.GENERATOR_VERSION}"
    assert (root / shapes.MARKER).is_file()
    cats = _load(tiny.train_json)["categories"]
    assert len(cats) >= 6 and [c["id"] for c in cats] == list(range(1, len(cats) + 1))
    assert len({c["name"] for c in cats}) == len(cats)
    for key, images_key, n in (("train_json", "train_images", 6), ("val_json", "val_images", 3),
                               ("unlabeled_gt_json", "unlabeled_images", 4)):
        data = _load(getattr(tiny, key))
        assert data["categories"] == cats
        images = {im["id"]: im for im in data["images"]}
        assert sorted(images) == list(range(1, n + 1))
        for im in data["images"]:
            with Image.open(Path(getattr(tiny, images_key)) / im["file_name"]) as f:
                assert f.format == "JPEG" and f.size == (im["width"], im["height"])
            assert 320 <= im["width"] <= 640 and 320 <= im["height"] <= 640
        ann_ids = [a["id"] for a in data["annotations"]]
        assert len(set(ann_ids)) == len(ann_ids)
        for a in data["annotations"]:
            im = images[a["image_id"]]
            x, y, w, h = a["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0, a
            assert x + w <= im["width"] and y + h <= im["height"], a
            assert 1 <= a["category_id"] <= len(cats) and a["iscrowd"] == 0
            assert 0 < a["area"] <= w * h
    unlabeled, gt = _load(tiny.unlabeled_json), _load(tiny.unlabeled_gt_json)
    assert "annotations" not in unlabeled
    assert unlabeled["images"] == gt["images"] and unlabeled["categories"] == cats
    assert len(list(Path(tiny.unlabeled_images).glob("*.jpg"))) == 4


def test_same_seed_same_bytes_other_seed_differs(tiny, tmp_path):
    again = shapes.generate_shapes(tmp_path / "again", seed=0, **TINY)
    assert _files(again) == _files(tiny)
    other = shapes.generate_shapes(tmp_path / "other", seed=1, **TINY)
    a, b = _files(tiny), _files(other)
    assert a.keys() == b.keys()
    assert a["annotations/instances_train.json"] != b["annotations/instances_train.json"]
    assert all(a[k] != b[k] for k in a if k.endswith(".jpg"))


def test_worker_pool_gives_the_same_bytes(tiny, tmp_path):
    pooled = shapes.generate_shapes(tmp_path, seed=0, workers=2, **TINY)
    assert _files(pooled) == _files(tiny)


def test_cache_hit_returns_without_drawing_and_force_regenerates(tmp_path, monkeypatch):
    first = shapes.generate_shapes(tmp_path, seed=0, **TINY)
    marker = Path(first.root) / shapes.MARKER
    stamp = marker.stat().st_mtime_ns, Path(first.root).stat().st_ino

    def no_drawing(*args, **kwargs):
        raise AssertionError("a cached dataset was drawn again")

    with monkeypatch.context() as m:
        m.setattr(shapes, "_draw_image", no_drawing)
        assert shapes.generate_shapes(tmp_path, seed=0, **TINY) == first
    assert (marker.stat().st_mtime_ns, Path(first.root).stat().st_ino) == stamp
    before = _files(first)
    forced = shapes.generate_shapes(tmp_path, seed=0, force=True, **TINY)
    assert forced == first and Path(forced.root).stat().st_ino != stamp[1]
    assert _files(forced) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [Path(first.root).name]


def test_interrupted_generation_never_looks_complete(tmp_path, monkeypatch):
    name = shapes.dataset_name(0, **TINY)
    real = shapes._draw_image
    calls = []

    def crash_on_fifth(*args):
        calls.append(args)
        if len(calls) == 5:
            raise RuntimeError("simulated crash")
        return real(*args)

    with monkeypatch.context() as m:
        m.setattr(shapes, "_draw_image", crash_on_fifth)
        with pytest.raises(RuntimeError, match="simulated crash"):
            shapes.generate_shapes(tmp_path, seed=0, workers=1, **TINY)
    assert list(tmp_path.iterdir()) == []  # no final folder and no temp left behind

    # a process killed mid-way leaves a temp folder: ignored, then removed
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = tmp_path / f".{name}.tmp-{int(dead.stdout)}-0000"
    (stale / "images" / "train").mkdir(parents=True)
    # a final-looking folder without the marker is not complete either
    (tmp_path / name / "annotations").mkdir(parents=True)
    paths = shapes.generate_shapes(tmp_path, seed=0, **TINY)
    assert (Path(paths.root) / shapes.MARKER).is_file() and Path(paths.train_json).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_boxes_are_tight_around_the_drawn_shape():
    checked = 0
    for index in range(8):
        image, anns, objects = shapes._draw_image(0, "train", index)
        assert len(anns) == len(objects)
        for ann, obj in zip(anns, objects):
            # the object alone on a blank canvas, through the same drawing function
            alpha, x0, y0 = shapes._rasterize(obj.ops, clip=image.size)
            canvas = np.zeros((image.height, image.width), dtype=np.float32)
            canvas[y0:y0 + alpha.shape[0], x0:x0 + alpha.shape[1]] = alpha
            x, y, w, h = shapes.box_of_mask(canvas > 0)
            bx, by, bw, bh = ann["bbox"]
            if obj.visible == obj.full and not obj.covered:  # unoccluded, inside: all its pixels
                assert abs(bx - x) <= 1 and abs(by - y) <= 1, (index, ann)
                assert abs(bx + bw - x - w) <= 1 and abs(by + bh - y - h) <= 1, (index, ann)
                checked += 1
            else:  # the visible part lies within the whole shape
                assert x <= bx and y <= by and bx + bw <= x + w and by + bh <= y + h
            assert ann["area"] == obj.visible >= shapes.MIN_VISIBLE_FRACTION * obj.full
    assert checked >= 10


def test_box_of_mask():
    mask = np.zeros((5, 7), dtype=bool)
    assert shapes.box_of_mask(mask) is None
    mask[1:3, 2:6] = True
    assert shapes.box_of_mask(mask) == (2, 1, 4, 2)


def test_describe_matches_hand_counts(tiny):
    text = shapes.describe(tiny)
    rows = {"train_json": "train", "val_json": "val", "unlabeled_gt_json": "unlabeled (hidden gt)"}
    per_class = {}
    for key, row in rows.items():
        data = _load(getattr(tiny, key))
        anns = data["annotations"]
        per_image = [sum(a["image_id"] == im["id"] for a in anns) for im in data["images"]]
        areas = np.array([a["area"] for a in anns])
        small, large = int((areas < 32 ** 2).sum()), int((areas >= 96 ** 2).sum())
        medium = len(anns) - small - large
        ws = [im["width"] for im in data["images"]]
        hs = [im["height"] for im in data["images"]]
        s = shapes.split_stats(getattr(tiny, key))
        assert (s.images, s.boxes, s.max_per_image, s.empty_images) == (
            len(data["images"]), len(anns), max(per_image), per_image.count(0))
        assert (s.small, s.medium, s.large) == (small, medium, large)
        assert s.width_range == (min(ws), max(ws)) and s.height_range == (min(hs), max(hs))
        assert (f"{row}: {len(data['images'])} images, {len(anns)} boxes "
                f"({len(anns) / len(data['images']):.2f}/image, max {max(per_image)}, "
                f"{per_image.count(0)} images without boxes)") in text
        assert f"by object area small {small} / medium {medium} / large {large}" in text
        assert f"width {min(ws)}-{max(ws)}, height {min(hs)}-{max(hs)}" in text
        for c in data["categories"]:
            per_class.setdefault(c["name"], []).append(
                sum(a["category_id"] == c["id"] for a in anns))
    assert "unlabeled json: 4 images, no annotations" in text
    for name, counts in per_class.items():
        assert any(line.split() == [name, *" / ".join(map(str, counts)).split()]
                   for line in text.splitlines()), (name, counts)


def test_statistics_at_moderate_size():
    counts, areas, sides, whole_sides, labels = [], [], [], [], set()
    for index in range(60):
        image, anns, objects = shapes._draw_image(3, "val", index)
        counts.append(len(anns))
        scale = 256 / min(image.size)  # the CPU preset's resize
        for a, obj in zip(anns, objects):
            areas.append(a["area"])
            sides.append(min(a["bbox"][2:]) * scale)
            if obj.visible == obj.full:
                whole_sides.append(min(a["bbox"][2:]) * scale)
            labels.add(a["category_id"])
    areas = np.array(areas)
    small, large = (areas < 32 ** 2).mean(), (areas >= 96 ** 2).mean()
    assert small > 0.2 and large > 0.05 and 1 - small - large > 0.2  # COCO-like mix
    assert len(set(counts)) >= 4 and max(counts) <= shapes.MAX_OBJECTS
    assert 2.5 <= np.mean(counts) <= 5.5
    assert labels == set(range(1, len(shapes.CLASSES) + 1))
    # visible after a resize to a 256 px short side; occlusion may leave a thinner sliver
    assert min(whole_sides) >= 7 and np.percentile(sides, 5) >= 8


def test_rejects_bad_arguments(tmp_path):
    for kwargs, message in (({"seed": -1}, "seed must be an integer >= 0, got -1"),
                            ({"num_train": 2.5}, "num_train must be an integer >= 0, got 2.5"),
                            ({"num_val": -3}, "num_val must be an integer >= 0, got -3"),
                            ({"workers": 0}, "workers must be >= 1, got 0")):
        with pytest.raises(ValueError, match=message):
            shapes.generate_shapes(tmp_path, **kwargs)
    assert not list(tmp_path.iterdir())  # refused before anything is written
    with pytest.raises(ValueError, match="split"):
        shapes.render_image(0, "test", 0)


def test_unit_centres_the_bounding_box_and_scales_to_norm_one():
    # a 2 x 1 rectangle from (0, 0): centred at (1, 0.5), corners at (+-1, +-0.5), norm sqrt(1.25)
    p = shapes._unit([(0, 0), (2, 0), (2, 1), (0, 1)])
    r = 1 / np.sqrt(1.25)
    np.testing.assert_allclose(p, [(-r, -r / 2), (r, -r / 2), (r, r / 2), (-r, r / 2)], atol=1e-12)


def test_pretraining_classes_are_none_of_the_detection_classes():
    assert not set(shapes.PRETRAIN_CLASSES) & set(shapes.CLASSES)
    assert len(set(shapes.PRETRAIN_CLASSES)) == len(shapes.PRETRAIN_CLASSES) == 8
    rng = np.random.default_rng(0)
    for kind in shapes.PRETRAIN_CLASSES:
        (pts, fill), = shapes._class_parts(kind, rng, extent=40.0)
        assert fill == 1 and pts.shape[1] == 2 and len(pts) >= 4
        # unit circumscribing radius, like the detection classes
        assert np.linalg.norm(pts, axis=1).max() == pytest.approx(1.0), kind
    # a pentagon's first corner points up (phase pi / 2), a hexagon's along x
    (pent, _), = shapes._class_parts("pentagon", rng, 40.0)
    np.testing.assert_allclose(pent[0], [0.0, 1.0], atol=1e-12)
    (hexagon, _), = shapes._class_parts("hexagon", rng, 40.0)
    np.testing.assert_allclose(hexagon[1], [0.5, np.sqrt(3) / 2], atol=1e-12)


def test_pretraining_crops_are_deterministic_and_cover_every_class():
    a, label_a = shapes.render_pretrain_crop(0, 5, 48)
    b, label_b = shapes.render_pretrain_crop(0, 5, 48)
    c, _ = shapes.render_pretrain_crop(0, 6, 48)
    d, _ = shapes.render_pretrain_crop(1, 5, 48)
    assert a.size == (48, 48) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes() and label_a == label_b
    assert a.tobytes() != c.tobytes() and a.tobytes() != d.tobytes()
    labels = {shapes.render_pretrain_crop(0, i, 32)[1] for i in range(80)}
    assert labels == set(range(len(shapes.PRETRAIN_CLASSES)))
    with pytest.raises(ValueError, match="at least 16"):
        shapes.render_pretrain_crop(0, 0, 8)


# sha256 of seed 0's first three train images (pixels and annotations) and first 16 pretraining
# crops, as drawn with Pillow 13. Last-bit differences in numpy's sin and cos change no pixel
# (docs/results.md, section 17), so the pixels depend on the Pillow that rasterises them rather
# than on the CPU: a Pillow that draws polygons otherwise changes the data every recorded result
# was measured on, and this test says so.
GOLDEN_PIXELS = {
    "13": ("6ef98f8de9eeb1935dd217bb7b9a664af9f747892f9feed8e36a66d7c8ef2296",
           "1694e207db79d8d592f5a948472a6d22687fbaeeecc088481cc4a6249959e386"),
}


def test_images_and_crops_match_their_recorded_pixels():
    major = PIL.__version__.split(".")[0]
    if major not in GOLDEN_PIXELS:
        pytest.skip(f"no pixels recorded for Pillow {PIL.__version__}")
    images, crops = hashlib.sha256(), hashlib.sha256()
    for i in range(3):
        image, anns = shapes.render_image(0, "train", i)
        images.update(np.asarray(image).tobytes())
        images.update(json.dumps(anns, sort_keys=True).encode())
    for i in range(16):
        crop, label = shapes.render_pretrain_crop(0, i, 64)
        crops.update(np.asarray(crop).tobytes())
        crops.update(bytes([label]))
    assert (images.hexdigest(), crops.hexdigest()) == GOLDEN_PIXELS[major], (
        f"Pillow {PIL.__version__} draws other pixels than those the results were measured on")
