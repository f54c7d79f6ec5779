import pytest
import torch

from softteacher.method.pseudo_labels import (
    PseudoLabels,
    candidate_pseudo_labels,
    classification_pseudo_labels,
    false_box_kinds,
    match_to_ground_truth,
    missed_object_kinds,
    pseudo_label_quality,
    pseudo_label_sets,
    regression_mask,
    regression_pseudo_labels,
    rpn_pseudo_labels,
    score_mask,
    select_by_score,
)


def _dets(scores, dtype=torch.float32):
    n = len(scores)
    boxes = torch.arange(n * 4, dtype=dtype).reshape(n, 4)
    boxes[:, 2:] += 10
    return boxes, torch.tensor(scores, dtype=dtype), torch.arange(1, n + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_threshold_is_strict_at_the_edges(dtype):
    scores = torch.tensor([0.9, 0.9 + 1e-6, 0.5, 0.5 + 1e-6, 0.4999, 1.0], dtype=dtype)
    assert score_mask(scores, 0.9).tolist() == [False, True, False, False, False, True]
    assert score_mask(scores, 0.5).tolist() == [True, True, False, True, False, True]


def test_select_by_score_filters_rows_in_order():
    boxes, scores, labels = _dets([0.95, 0.9, 0.3, 0.91])
    kept = select_by_score(boxes, scores, labels, 0.9)
    assert isinstance(kept, PseudoLabels) and len(kept) == 2
    assert torch.equal(kept.boxes, boxes[[0, 3]])
    assert torch.equal(kept.labels, torch.tensor([1, 4]))
    assert torch.equal(kept.scores, scores[[0, 3]])


def test_empty_and_nan():
    boxes, scores, labels = _dets([])
    assert boxes.shape == (0, 4)
    kept = select_by_score(boxes, scores, labels, 0.5)
    assert len(kept) == 0 and kept.boxes.shape == (0, 4)
    assert score_mask(torch.tensor([float("nan")]), 0.5).tolist() == [False]
    assert regression_mask(torch.tensor([0.99]), torch.tensor([float("nan")])).tolist() == [False]


def test_three_sets_from_candidates():
    boxes, scores, labels = _dets([0.97, 0.9, 0.6, 0.5, 0.92, 0.95])
    cands = candidate_pseudo_labels(boxes, scores, labels, pseudo_threshold=0.5)
    assert cands.labels.tolist() == [1, 2, 3, 5, 6]  # 0.5 is not a candidate
    assert classification_pseudo_labels(cands, 0.9).labels.tolist() == [1, 5, 6]
    assert rpn_pseudo_labels(cands, 0.93).labels.tolist() == [1, 6]
    reliability = torch.tensor([0.05, 0.01, 0.02, 0.0199, float("nan")])
    reg = regression_pseudo_labels(cands, reliability, reg_pseudo_threshold=0.02)
    assert reg.labels.tolist() == [2, 5]  # by jitter, not by score; 0.02 itself is not kept
    # with a score floor of 0.9 as well: 2 (score 0.9, not above it) goes, 5 (0.92) stays
    assert regression_pseudo_labels(cands, reliability, reg_pseudo_threshold=0.02,
                                    reg_score_threshold=0.9).labels.tolist() == [5]
    # --no-jitter: regression boxes are the boxes with score > cls threshold
    assert regression_pseudo_labels(cands, None, cls_pseudo_threshold=0.9).labels.tolist() == \
        [1, 5, 6]
    sets = pseudo_label_sets(cands, reliability, cls_pseudo_threshold=0.9,
                             rpn_pseudo_threshold=0.95, reg_pseudo_threshold=0.02)
    assert sets.cls.labels.tolist() == [1, 5, 6]
    assert sets.rpn.labels.tolist() == [1]
    assert sets.reg.labels.tolist() == [2, 5]
    floored = pseudo_label_sets(cands, reliability, reg_pseudo_threshold=0.02, reg_score_threshold=0.5)
    assert floored.reg.labels.tolist() == [2, 5]  # every candidate is above 0.5 already
    assert pseudo_label_sets(cands, reliability, reg_score_threshold=0.95).reg.labels.tolist() == []
    # the floor applies to jittered sets only: without jittering the cls threshold decides
    assert pseudo_label_sets(cands, None, reg_score_threshold=0.95).reg.labels.tolist() == [1, 5, 6]
    empty = pseudo_label_sets(cands.select(torch.zeros(5, dtype=torch.bool)), torch.zeros(0))
    assert len(empty.cls) == len(empty.rpn) == len(empty.reg) == 0


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        PseudoLabels(torch.zeros(3, 4), torch.zeros(2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        regression_mask(torch.zeros(3), torch.zeros(2))


def test_quality_greedy_class_aware():
    gt_boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]])
    gt_labels = torch.tensor([1, 2, 1])
    pred_boxes = torch.tensor([
        [0.0, 0, 10, 10],  # exact match of gt 0 (class 1): TP
        [0.0, 0, 10, 11],  # duplicate of gt 0: FP (gt 0 already matched)
        [20.0, 20, 30, 30],  # right place, wrong class (1 vs 2): FP
        [40.0, 40, 50, 60],  # IoU 100/200 = 0.5 with gt 2, class 1: TP (>= 0.5)
        [100.0, 100, 110, 110],  # nowhere: FP
    ])
    pred_labels = torch.tensor([1, 1, 1, 1, 1])
    assert pseudo_label_quality(pred_boxes, pred_labels, gt_boxes, gt_labels) == (2, 5, 3)
    assert pseudo_label_quality(pred_boxes, pred_labels, gt_boxes, gt_labels, iou=0.6) == (1, 5, 3)


def test_quality_order_by_score():
    gt_boxes = torch.tensor([[0.0, 0, 10, 10], [4.0, 0, 14, 10]])
    gt_labels = torch.tensor([1, 1])
    # A: IoU 90/110 with gt 0, 70/130 with gt 1.  B: IoU 70/130 with gt 0, 30/170 with gt 1.
    pred_boxes = torch.tensor([[1.0, 0, 11, 10], [-3.0, 0, 7, 10]])
    pred_labels = torch.tensor([1, 1])
    # A first takes gt 0 (its best); B is then left with gt 1 at IoU 0.18: one TP.
    assert pseudo_label_quality(pred_boxes, pred_labels, gt_boxes, gt_labels) == (1, 2, 2)
    assert pseudo_label_quality(pred_boxes, pred_labels, gt_boxes, gt_labels,
                                pred_scores=torch.tensor([0.9, 0.6])) == (1, 2, 2)
    # B first takes gt 0; A then matches gt 1 at IoU 0.54: two TPs.
    assert pseudo_label_quality(pred_boxes, pred_labels, gt_boxes, gt_labels,
                                pred_scores=torch.tensor([0.6, 0.9])) == (2, 2, 2)


def test_quality_empty():
    z = torch.zeros(0, 4)
    zl = torch.zeros(0, dtype=torch.long)
    one = torch.tensor([[0.0, 0, 5, 5]])
    assert pseudo_label_quality(z, zl, one, torch.tensor([1])) == (0, 0, 1)
    assert pseudo_label_quality(one, torch.tensor([1]), z, zl) == (0, 1, 0)
    assert pseudo_label_quality(z, zl, z, zl) == (0, 0, 0)


def test_match_to_ground_truth_reports_the_matched_box_in_input_order():
    gt_boxes = torch.tensor([[0.0, 0, 10, 10], [4.0, 0, 14, 10]])
    gt_labels = torch.tensor([1, 1])
    pred_boxes = torch.tensor([[1.0, 0, 11, 10], [-3.0, 0, 7, 10]])  # as in the order test above
    pred_labels = torch.tensor([1, 1])
    assert match_to_ground_truth(pred_boxes, pred_labels, gt_boxes, gt_labels).tolist() == [0, -1]
    assert match_to_ground_truth(pred_boxes, pred_labels, gt_boxes, gt_labels,
                                 pred_scores=torch.tensor([0.6, 0.9])).tolist() == [1, 0]
    assert match_to_ground_truth(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long),
                                 gt_boxes, gt_labels).shape == (0,)


def test_false_box_kinds_by_hand():
    # objects: a class-1 square at the origin, a class-2 square to its right, nothing else
    gt_boxes = torch.tensor([[0.0, 0, 10, 10], [20, 0, 30, 10]])
    gt_labels = torch.tensor([1, 2])
    pred_boxes = torch.tensor([
        [0.0, 0, 10, 10],  # exact on object 0, class 1: true
        [0.0, 0, 10, 12],  # IoU 100/120 = 0.83 with object 0, taken by the box above: duplicate
        [20.0, 0, 30, 10],  # exact on object 1 but class 1: wrong_class (class 2)
        [5.0, 0, 15, 10],  # IoU 50/150 = 0.33 with object 0: loose
        [25.0, 0, 35, 10],  # class 1, IoU 50/150 = 0.33 with object 1 (class 2) only: wrong_class
        [8.0, 0, 18, 10],  # IoU 20/180 = 0.11 with object 0, class 3: wrong_class (class 1)
        [50.0, 50, 60, 60],  # overlaps nothing: background
        [9.5, 0, 19.5, 10],  # class 1, IoU 5/195 = 0.026 with object 0: background
    ])
    pred_labels = torch.tensor([1, 1, 1, 1, 1, 3, 1, 1])
    scores = torch.linspace(0.99, 0.92, 8)
    kinds, other = false_box_kinds(pred_boxes, pred_labels, gt_boxes, gt_labels, pred_scores=scores)
    assert kinds == ["true", "duplicate", "wrong_class", "loose", "wrong_class", "wrong_class",
                     "background", "background"]
    assert other.tolist() == [0, 0, 2, 0, 2, 1, 0, 0]
    # the duplicate scored higher takes the object, and the exact box becomes the duplicate
    kinds, _ = false_box_kinds(pred_boxes[:2], pred_labels[:2], gt_boxes, gt_labels,
                               pred_scores=torch.tensor([0.5, 0.9]))
    assert kinds == ["duplicate", "true"]
    # below the matching threshold a same-class overlap is a loose box, not a duplicate
    kinds, _ = false_box_kinds(pred_boxes[:2], pred_labels[:2], gt_boxes, gt_labels, iou=0.9)
    assert kinds == ["true", "loose"]  # at iou 0.9 the 0.83 box is neither true nor duplicate
    # without ground truth everything is background; without predictions nothing is returned
    kinds, other = false_box_kinds(pred_boxes[:2], pred_labels[:2], torch.zeros(0, 4),
                                   torch.zeros(0, dtype=torch.long))
    assert kinds == ["background", "background"] and other.tolist() == [0, 0]
    assert false_box_kinds(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), gt_boxes,
                           gt_labels)[0] == []


def test_kinds_agree_with_the_matching_on_random_boxes():
    # the kinds share one IoU matrix with the matching: "true" boxes and "found" objects are
    # exactly the pairs match_to_ground_truth makes, on crowded scenes with ties in class
    g = torch.Generator().manual_seed(0)

    def boxes(n):
        xy = torch.rand(n, 2, generator=g) * 40
        return torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=g) * 15], 1)

    for _ in range(20):
        num_gt = int(torch.randint(0, 6, (1,), generator=g))
        num_cand = int(torch.randint(0, 12, (1,), generator=g))
        gt_boxes, gt_labels = boxes(num_gt), torch.randint(1, 3, (num_gt,), generator=g)
        cand_boxes, cand_labels = boxes(num_cand), torch.randint(1, 3, (num_cand,), generator=g)
        scores = torch.rand(num_cand, generator=g)
        keep = scores > 0.4
        matches = match_to_ground_truth(cand_boxes[keep], cand_labels[keep], gt_boxes, gt_labels,
                                        pred_scores=scores[keep])
        kinds, _ = false_box_kinds(cand_boxes[keep], cand_labels[keep], gt_boxes, gt_labels,
                                   pred_scores=scores[keep])
        assert [k == "true" for k in kinds] == (matches >= 0).tolist()
        found = missed_object_kinds(cand_boxes, cand_labels, scores, keep, gt_boxes, gt_labels)
        assert [k == "found" for k in found] == [j in matches.tolist() for j in range(num_gt)]


def test_missed_object_kinds_by_hand():
    # five class-1 objects in a row, 20 px apart, and one class-2 object
    gt_boxes = torch.tensor([[0.0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10],
                             [80, 0, 90, 10], [100, 0, 110, 10]])
    gt_labels = torch.tensor([1, 1, 1, 1, 1, 2])
    cand_boxes = torch.tensor([
        [0.0, 0, 10, 10],  # kept, exact on object 0: found
        [20.0, 0, 30, 11],  # not kept (score 0.7), IoU 0.91 with object 1: low_score
        [40.0, 0, 50, 10],  # kept, class 2 on object 2: wrong_class
        [65.0, 0, 75, 10],  # kept, IoU 0.33 with object 3: loose
        [100.0, 0, 110, 10],  # not kept, class 1 on the class-2 object 5: not_detected
    ])
    cand_labels = torch.tensor([1, 1, 2, 1, 1])
    cand_scores = torch.tensor([0.95, 0.7, 0.96, 0.93, 0.8])
    keep = cand_scores > 0.9
    kinds = missed_object_kinds(cand_boxes, cand_labels, cand_scores, keep, gt_boxes, gt_labels)
    # object 4 has nothing near it
    assert kinds == ["found", "low_score", "wrong_class", "loose", "not_detected", "not_detected"]
    # kept, the low-scored box finds object 1; not kept, the exact box leaves object 0 low_score
    kinds = missed_object_kinds(cand_boxes, cand_labels, cand_scores, torch.tensor([0, 1, 1, 1, 0]) > 0,
                                gt_boxes, gt_labels)
    assert kinds[:2] == ["low_score", "found"]
    assert missed_object_kinds(cand_boxes, cand_labels, cand_scores, keep, torch.zeros(0, 4),
                               torch.zeros(0, dtype=torch.long)) == []
