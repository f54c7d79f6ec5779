"""COCO evaluation on hand-built cases whose AP is known by hand."""

import io
import json
import math
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch

from softteacher.data.records import Category, CategoryMap, DetectionSet, ImageRecord
from softteacher.evaluation import (
    OVERALL_KEYS,
    coco_gt_from_records,
    detections_to_results,
    evaluate_detections,
    format_metrics,
    write_results,
)

CATS = CategoryMap([Category(3, "cat"), Category(7, "dog")])  # labels: cat 1, dog 2


def record(image_id, boxes=(), labels=(), ignore=(), size=(400, 400), ignore_labels=None, areas=()):
    """``ignore_labels``: the class of each ignore box (default: cat, 1)."""
    return ImageRecord(image_id, f"{image_id}.jpg", f"/nowhere/{image_id}.jpg", size[1], size[0],
                       np.asarray(boxes, np.float32).reshape(-1, 4),
                       np.asarray(labels, np.int64).reshape(-1),
                       np.arange(1, len(labels) + 1, dtype=np.int64),
                       np.asarray(ignore, np.float32).reshape(-1, 4),
                       np.asarray(areas, np.float32),
                       np.asarray([1] * len(ignore) if ignore_labels is None else ignore_labels, np.int64))


def dset(*records, cats=CATS):
    return DetectionSet("test.json", "/nowhere", cats, list(records))


def dets(image_id, boxes, scores, labels, cats=CATS):
    return detections_to_results(image_id, np.asarray(boxes, np.float64).reshape(-1, 4),
                                 np.asarray(scores, np.float64), np.asarray(labels), cats)


# one gt box of each COCO size: small (20² < 32²), medium (50²), large (100² > 96²)
SIZED = [[0, 0, 20, 20], [100, 100, 150, 150], [200, 200, 300, 300]]


def test_gt_from_records_converts_boxes_ids_and_crowds():
    ds = dset(record(5, [[10, 20, 30, 60]], [2], ignore=[[0, 0, 4, 4]], ignore_labels=[2]), record(9))
    buf = io.StringIO()
    with redirect_stdout(buf):
        gt = coco_gt_from_records(ds)
    assert buf.getvalue() == ""
    assert sorted(gt.getImgIds()) == [5, 9]  # the image without boxes is included
    assert sorted(gt.getCatIds()) == [3, 7]
    anns = gt.loadAnns(gt.getAnnIds())
    normal = [a for a in anns if not a["iscrowd"]]
    crowd = [a for a in anns if a["iscrowd"]]
    assert normal == [{"image_id": 5, "category_id": 7, "bbox": [10.0, 20.0, 20.0, 40.0],
                       "area": 800.0, "iscrowd": 0, "id": normal[0]["id"]}]
    assert [(a["category_id"], a["bbox"]) for a in crowd] == [(7, [0.0, 0.0, 4.0, 4.0])]  # its class
    assert min(a["id"] for a in anns) >= 1  # pycocotools reads id 0 as "unmatched"


def test_gt_label_of_an_object_or_a_crowd_outside_1_to_C_is_an_error():
    with pytest.raises(ValueError, match=r"test.json: image 1: label 3 outside 1..2"):
        coco_gt_from_records(dset(record(1, [[0, 0, 4, 4]], [3])))
    with pytest.raises(ValueError, match=r"test.json: image 1: label 3 outside 1..2"):
        coco_gt_from_records(dset(record(1, ignore=[[0, 0, 4, 4]], ignore_labels=[3])))


def test_gt_duplicate_image_id_is_an_error():
    with pytest.raises(ValueError, match="test.json: duplicate image id 1"):
        coco_gt_from_records(dset(record(1), record(1)))


def test_results_map_labels_to_original_ids_and_xywh():
    res = detections_to_results(4, torch.tensor([[1.0, 2.0, 11.5, 22.25], [0, 0, 1 / 3, 2 / 3]]),
                                torch.tensor([0.123456789, 0.5]), torch.tensor([1, 2]), CATS)
    assert res == [
        {"image_id": 4, "category_id": 3, "bbox": [1.0, 2.0, 10.5, 20.25], "score": 0.12346},
        {"image_id": 4, "category_id": 7, "bbox": [0.0, 0.0, 0.33, 0.67], "score": 0.5}]
    assert all(type(v) is float for r in res for v in r["bbox"] + [r["score"]])
    json.dumps(res)  # plain python types
    assert detections_to_results(4, torch.zeros(0, 4), torch.zeros(0), torch.zeros(0), CATS) == []


@pytest.mark.parametrize("label", [0, 3])
def test_results_reject_labels_outside_1_to_C(label):
    with pytest.raises(ValueError, match=f"label {label} outside 1..2"):
        dets(1, [[0, 0, 1, 1]], [0.5], [label])


def test_perfect_predictions_give_one_everywhere():
    ds = dset(record(1, SIZED, [1, 1, 2]), record(2, [[50, 50, 90, 120]], [2]), record(3))
    res = dets(1, SIZED, [0.9, 0.8, 0.7], [1, 1, 2]) + dets(2, [[50, 50, 90, 120]], [0.6], [2])
    m = evaluate_detections(ds, res)
    assert set(m) == set(OVERALL_KEYS) | {"bbox_AP/cat", "bbox_AP/dog"}
    for k, v in m.items():
        assert v == pytest.approx(1.0), k


def test_shrunk_box_with_iou_0_62():
    # gt [0,0,100,100]; prediction [0,0,100,62]: IoU = 6200 / 10000 = 0.62 exactly, clear of
    # the thresholds .60 and .65. pycocotools matches when IoU >= threshold, so 3 of the 10
    # thresholds (.50, .55, .60) match with precision 1 and the other 7 give 0: AP = 0.3.
    ds = dset(record(1, [[0, 0, 100, 100]], [1]))
    m = evaluate_detections(ds, dets(1, [[0, 0, 100, 62]], [0.9], [1]))
    assert m["bbox_AP"] == pytest.approx(0.3)
    assert m["bbox_AP50"] == pytest.approx(1.0)
    assert m["bbox_AP75"] == pytest.approx(0.0)
    assert m["bbox_APl"] == pytest.approx(0.3)  # gt area 10000 > 96²: large
    assert math.isnan(m["bbox_APs"]) and math.isnan(m["bbox_APm"])  # no gt of those sizes
    assert m["bbox_AP/cat"] == pytest.approx(0.3)
    assert math.isnan(m["bbox_AP/dog"])  # no dog in the ground truth


def test_shifted_box():
    # prediction shifted right by 20 px: IoU = 80*100 / (2*100*100 - 80*100) = 2/3 = 0.667,
    # which passes .50 .55 .60 .65 (4 of 10): AP = 0.4.
    ds = dset(record(1, [[0, 0, 100, 100]], [2]))
    m = evaluate_detections(ds, dets(1, [[20, 0, 120, 100]], [0.9], [2]))
    assert m["bbox_AP"] == pytest.approx(0.4)
    assert (m["bbox_AP50"], m["bbox_AP75"]) == (pytest.approx(1.0), pytest.approx(0.0))


def test_false_positive_above_true_positive():
    # Ranked FP (0.9) then TP (0.8): recall [0, 1], precision [0, 1/2]; the interpolated
    # (right-max) precision is 1/2 at every one of the 101 recall points: AP = 0.5.
    ds = dset(record(1, [[0, 0, 100, 100]], [1]))
    res = dets(1, [[200, 200, 300, 300], [0, 0, 100, 100]], [0.9, 0.8], [1, 1])
    m = evaluate_detections(ds, res)
    assert m["bbox_AP"] == pytest.approx(0.5)
    assert m["bbox_AP50"] == pytest.approx(0.5)


def test_101_point_interpolation():
    # 3 gts; ranked TP .9, FP .8, TP .7, TP .6: recall [1/3, 1/3, 2/3, 1], precision
    # [1, 1/2, 2/3, 3/4]; right-max precision [1, 3/4, 3/4, 3/4]. Recall points 0, .01,
    # .., .33 (34 of them) read 1, the 67 points .34 .. 1 read 3/4:
    # AP = (34 * 1 + 67 * 0.75) / 101 = 84.25 / 101.
    gts = [[0, 0, 100, 100], [150, 0, 250, 100], [300, 0, 400, 100]]
    ds = dset(record(1, gts, [1, 1, 1]))
    res = dets(1, [gts[0], [0, 200, 100, 300], gts[1], gts[2]], [0.9, 0.8, 0.7, 0.6], [1] * 4)
    m = evaluate_detections(ds, res)
    assert m["bbox_AP"] == pytest.approx(84.25 / 101)


def test_crowd_region_absorbs_a_detection():
    gt_box, crowd = [0, 0, 100, 100], [200, 0, 300, 100]
    res = dets(1, [[210, 10, 290, 90], gt_box], [0.9, 0.8], [1, 1])  # first one in the crowd
    with_crowd = evaluate_detections(dset(record(1, [gt_box], [1], ignore=[crowd])), res)
    without = evaluate_detections(dset(record(1, [gt_box], [1])), res)
    assert with_crowd["bbox_AP"] == pytest.approx(1.0)  # no false positive
    assert without["bbox_AP"] == pytest.approx(0.5)  # same detection is a FP without the region
    # a crowd of dogs forgives no cat: the cat inside it stays a false positive, as in COCO
    dogs = evaluate_detections(dset(record(1, [gt_box], [1], ignore=[crowd], ignore_labels=[2])), res)
    assert dogs["bbox_AP"] == pytest.approx(0.5)


def test_size_ranges_take_the_source_s_object_areas():
    # a 100 x 100 box is large by its box area, but an object of 500 pixels (a thin diagonal
    # shape, say) is small by COCO's rule, which reads the annotation's area
    box = [[0, 0, 100, 100]]
    res = dets(1, box, [0.9], [1])
    by_box = evaluate_detections(dset(record(1, box, [1])), res)
    by_area = evaluate_detections(dset(record(1, box, [1], areas=[500.0])), res)
    assert by_box["bbox_APl"] == pytest.approx(1.0) and math.isnan(by_box["bbox_APs"])
    assert by_area["bbox_APs"] == pytest.approx(1.0) and math.isnan(by_area["bbox_APl"])
    assert by_area["bbox_AP"] == by_box["bbox_AP"] == pytest.approx(1.0)
    # NaN where the source has none (VOC): the box area counts
    nan = evaluate_detections(dset(record(1, box, [1], areas=[float("nan")])), res)
    assert nan["bbox_APl"] == pytest.approx(1.0)


def test_non_contiguous_ids_evaluate_per_class():
    ds = dset(record(1, [[0, 0, 50, 50]], [1]), record(2, [[0, 0, 60, 60]], [2]))
    res = dets(1, [[0, 0, 50, 50]], [0.9], [1]) + dets(2, [[0, 0, 60, 60]], [0.9], [2])
    assert [r["category_id"] for r in res] == [3, 7]
    m = evaluate_detections(ds, res)
    assert m["bbox_AP/cat"] == pytest.approx(1.0) and m["bbox_AP/dog"] == pytest.approx(1.0)
    swapped = dets(1, [[0, 0, 50, 50]], [0.9], [2]) + dets(2, [[0, 0, 60, 60]], [0.9], [1])
    m = evaluate_detections(ds, swapped)  # right boxes, wrong classes
    assert m["bbox_AP"] == 0.0 and m["bbox_AP/cat"] == 0.0 and m["bbox_AP/dog"] == 0.0


def test_empty_results_give_zeros():
    ds = dset(record(1, SIZED, [1, 2, 1]), record(2))
    m = evaluate_detections(ds, [])
    assert m == {k: 0.0 for k in list(OVERALL_KEYS) + ["bbox_AP/cat", "bbox_AP/dog"]}
    assert evaluate_detections(ds, [], per_class=False) == {k: 0.0 for k in OVERALL_KEYS}


def test_no_ground_truth_gives_nan():
    m = evaluate_detections(dset(record(1)), dets(1, [[0, 0, 10, 10]], [0.5], [1]))
    assert all(math.isnan(v) for v in m.values())


def test_results_are_not_modified_and_unknown_ids_are_errors():
    ds = dset(record(1, [[0, 0, 10, 10]], [1]))
    res = dets(1, [[0, 0, 10, 10]], [0.5], [1])
    before = json.dumps(res)
    evaluate_detections(ds, res)
    assert json.dumps(res) == before
    with pytest.raises(ValueError, match="image id 2"):
        evaluate_detections(ds, dets(2, [[0, 0, 10, 10]], [0.5], [1]))
    with pytest.raises(ValueError, match="category id 4"):
        evaluate_detections(ds, [{"image_id": 1, "category_id": 4, "bbox": [0, 0, 1, 1],
                                  "score": 0.5}])


def test_evaluation_prints_nothing():
    ds = dset(record(1, [[0, 0, 10, 10]], [1]))
    buf = io.StringIO()
    with redirect_stdout(buf):
        evaluate_detections(ds, dets(1, [[0, 0, 10, 10]], [0.5], [1]))
        evaluate_detections(ds, [])
    assert buf.getvalue() == ""


def test_format_metrics_shows_nan_as_dash():
    m = {"bbox_AP": 0.3, "bbox_AP50": 1.0, "bbox_AP75": 0.0, "bbox_APs": float("nan"),
         "bbox_APm": float("nan"), "bbox_APl": 0.3, "bbox_AP/cat": 0.3,
         "bbox_AP/dog": float("nan")}
    text = format_metrics(m)
    lines = text.splitlines()
    assert lines[0].split() == ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    assert lines[1].split() == ["0.3000", "1.0000", "0.0000", "-", "-", "0.3000"]
    assert "cat" in text and "dog" in text and "nan" not in text.lower()
    assert format_metrics({k: 0.0 for k in OVERALL_KEYS}).count("\n") == 1  # no class rows


def test_write_results_round_trips(tmp_path):
    res = dets(1, [[0, 0, 10, 10]], [0.5], [2])
    path = tmp_path / "out" / "results.json"
    write_results(path, res)
    assert json.loads(path.read_text()) == res
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temp file left


def test_a_coco_json_is_scored_as_it_gives_its_boxes_not_as_training_reads_them(tmp_path):
    """Training drops a box outside its image and a box of zero width; the evaluation scores
    them as pycocotools does on the json itself: two objects no detection can find. One cat
    found of three: precision 1 up to recall 1/3, so 34 of the 101 recall points, at every IoU."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from softteacher.data.datasets import load_coco

    data = {"images": [{"id": 5, "file_name": "a.jpg", "width": 400, "height": 400}],
            "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
            "annotations": [
                {"id": 1, "image_id": 5, "category_id": 3, "bbox": [10, 10, 40, 40], "area": 1600,
                 "iscrowd": 0},
                {"id": 2, "image_id": 5, "category_id": 3, "bbox": [500, 10, 20, 20], "area": 400,
                 "iscrowd": 0},  # outside the 400 px image
                {"id": 3, "image_id": 5, "category_id": 3, "bbox": [100, 100, 0, 30], "area": 0,
                 "iscrowd": 0}]}  # zero width
    path = tmp_path / "val.json"
    path.write_text(json.dumps(data))
    loaded = load_coco(path)
    assert len(loaded.records[0].boxes) == 1  # what training learns from
    results = dets(5, [[10, 10, 50, 50]], [0.9], [1])
    metrics = evaluate_detections(loaded, results)
    assert metrics["bbox_AP"] == pytest.approx(34 / 101)
    assert metrics["bbox_AP50"] == pytest.approx(34 / 101)
    # pycocotools on the json itself agrees on every overall metric
    with redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
        ev = COCOeval(gt, gt.loadRes(results), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    for key, official in zip(OVERALL_KEYS, ev.stats[:6]):
        assert (math.isnan(metrics[key]) and official == -1) or metrics[key] == pytest.approx(official)
    # the records alone would score the one cat they keep as all there is
    loaded.scored_annotations = None
    assert evaluate_detections(loaded, results)["bbox_AP"] == pytest.approx(1.0)


def test_clipped_boxes_crowd_areas_and_a_subset_score_as_pycocotools_scores_the_json(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from softteacher.data.datasets import load_coco

    big = 2 ** 70  # an id no int64 holds
    data = {"images": [{"id": 5, "file_name": "a.jpg", "width": 400, "height": 400},
                       {"id": big, "file_name": "b.jpg", "width": 300, "height": 200}],
            "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
            "annotations": [
                {"id": 1, "image_id": 5, "category_id": 3, "bbox": [380, 10, 40, 20], "area": 800,
                 "iscrowd": 0},  # half outside: training clips it to 20 x 20
                {"id": 2, "image_id": 5, "category_id": 7, "bbox": [200, 200, 50, 50], "area": 900,
                 "iscrowd": 1},  # a crowd whose area is not its box's
                {"id": 3, "image_id": 5, "category_id": 7, "bbox": [20, 300, 60, 60], "area": 30,
                 "iscrowd": 0},  # "small" by its area, "medium" by its box
                {"id": 4, "image_id": big, "category_id": 3, "bbox": [10, 10, 100, 80], "area": 8000,
                 "iscrowd": 0}]}
    path = tmp_path / "val.json"
    path.write_text(json.dumps(data))
    loaded = load_coco(path)
    np.testing.assert_array_equal(loaded.records[0].boxes[0], [380, 10, 400, 30])
    results = (dets(5, [[380, 10, 400, 30], [205, 205, 245, 245], [20, 300, 80, 360], [0, 0, 50, 50]],
                    [0.9, 0.8, 0.7, 0.95], [1, 2, 2, 2])
               + dets(big, [[12, 10, 110, 90], [150, 100, 200, 150]], [0.6, 0.99], [1, 1]))

    def official(image_ids=None):
        with redirect_stdout(io.StringIO()):
            gt = COCO(str(path))
            ev = COCOeval(gt, gt.loadRes(copy_of(results)), iouType="bbox")
            if image_ids is not None:
                ev.params.imgIds = image_ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        return ev.stats[:6]

    def copy_of(rs):
        return [dict(r, bbox=list(r["bbox"])) for r in rs]

    def agree(metrics, stats):
        for key, value in zip(OVERALL_KEYS, stats):
            assert (math.isnan(metrics[key]) and value == -1) or metrics[key] == pytest.approx(value), key

    whole = evaluate_detections(loaded, results)
    agree(whole, official())
    # small by their areas (800 and 30): the dog found exactly (AP 1); the cat's detection is
    # its clipped box, IoU 0.5 with the json's box, a match at the first of 10 thresholds only
    assert whole["bbox_APs"] == pytest.approx((1.0 + 0.1) / 2)
    # the records of one image alone: the json's annotations of that image alone
    loaded.records = loaded.records[:1]
    agree(evaluate_detections(loaded, [r for r in results if r["image_id"] == 5]), official([5]))
