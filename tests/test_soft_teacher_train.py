"""Soft Teacher training end to end on tiny embedded data (CPU, seconds)."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import fastrcnn_loss

from softteacher.checkpoint import load_checkpoint
from softteacher.config import Config
from softteacher.data.datasets import load_dataset
from softteacher.data.loading import MixedDataset, collate_mixed
from softteacher.data.samplers import MixedBatchSampler
from softteacher.engine import load_data, train
from softteacher.method.pseudo_labels import PseudoLabels, PseudoLabelSets, candidate_pseudo_labels_batch
from softteacher.method.soft_teacher import soft_weighted_cls_loss
from softteacher.model import build_detector
from softteacher.soft_teacher import (
    UNSUP_TERMS,
    TeacherPseudoLabels,
    _background_weights,
    _ground_truth_in_weak_views,
    _quality_logs,
    found_ground_truth,
    ground_truth_pseudo_labels,
    roi_outputs,
    soft_teacher_step,
    student_losses,
    targets_in_strong,
    teacher_pseudo_boxes,
    true_teacher_boxes,
    view_matrices,
)


def _loose(cfg: Config) -> Config:
    """Thresholds an untrained teacher passes, so pseudo boxes exist from the first step."""
    m = cfg.method
    m.pseudo_threshold = m.cls_pseudo_threshold = m.rpn_pseudo_threshold = 0.0
    m.reg_pseudo_threshold = 1e9
    cfg.model.box_score_thresh = 0.0
    return cfg


def _one_step(cfg: Config, log: bool = True, ratio: tuple[int, int] = (1, 2)):
    data = load_data(cfg)
    torch.manual_seed(0)
    student = build_detector(cfg.model, data.labeled.num_classes)
    teacher = build_detector(cfg.model, data.labeled.num_classes)
    teacher.load_state_dict(student.state_dict())
    teacher.eval().requires_grad_(False)
    student.train()
    ds = MixedDataset(data.labeled, data.unlabeled, cfg.augment, data.unlabeled_gt)
    items = next(iter(MixedBatchSampler(len(data.labeled), len(data.unlabeled), ratio=ratio, seed=0)))
    batch = collate_mixed([ds[i] for i in items])
    return soft_teacher_step(student=student, teacher=teacher, batch=batch, cfg=cfg, iteration=0,
                             log=log), student


def _separate_passes(model, images, targets, pseudo, teacher, t_images, t_features, w2s, s2w, cfg):
    """The student's terms with the RPN and RoI head called for each set on its own images."""
    nl = len(targets)
    batch = model.preprocess(images)
    features = model.features(batch)

    def part(rows):
        images_of_rows = ImageList(batch.tensors[rows], batch.image_sizes[rows])
        return images_of_rows, {k: v[rows] for k, v in features.items()}

    sup_images, sup_features = part(slice(0, nl))
    proposals, sup = model.rpn(sup_images, sup_features, targets)
    sup.update(model.roi_heads(sup_features, proposals, sup_images.image_sizes, targets)[1])
    images_u, features_u = part(slice(nl, None))
    sizes = images_u.image_sizes
    mapped = targets_in_strong([[p.sets.rpn, p.sets.cls, p.sets.reg] for p in pseudo], w2s, sizes,
                               cfg.augment.min_box_size, cfg.augment.box_mapping)
    rpn_t, cls_t, reg_t = ([t[k] for t in mapped] for k in range(3))
    proposals, unsup = model.rpn(images_u, features_u, rpn_t)
    heads = model.roi_heads
    props, _, labels, _ = heads.select_training_samples(proposals, cls_t)
    logits, _ = roi_outputs(model, features_u, props, sizes)
    flat = torch.cat(labels)
    bg = torch.nonzero(flat == 0).squeeze(1)
    weights = torch.ones_like(flat, dtype=logits.dtype)
    weights[bg] = _background_weights(cfg.method.reliability, teacher, t_images, t_features,
                                      [p[lab == 0] for p, lab in zip(props, labels)], logits[bg].detach(),
                                      cls_t, s2w, cfg.augment.box_mapping)
    unsup["loss_classifier"] = soft_weighted_cls_loss(logits, flat, weights)
    props, _, labels, reg_targets = heads.select_training_samples(proposals, reg_t)
    logits, regression = roi_outputs(model, features_u, props, sizes)
    unsup["loss_box_reg"] = fastrcnn_loss(logits, regression, labels, reg_targets)[1]
    return sup, unsup


@pytest.mark.parametrize("without_pseudo_boxes", [False, True])
def test_one_student_pass_gives_each_set_the_terms_of_its_own_pass(tiny_cfg, without_pseudo_boxes):
    cfg = _loose(tiny_cfg)
    data = load_data(cfg)
    torch.manual_seed(0)
    student = build_detector(cfg.model, data.labeled.num_classes).train()
    teacher = build_detector(cfg.model, data.labeled.num_classes).eval().requires_grad_(False)
    teacher.load_state_dict(student.state_dict())
    student.rpn.fg_bg_sampler.batch_size_per_image = 10**7  # every anchor and RoI sampled
    student.roi_heads.fg_bg_sampler = BalancedPositiveNegativeSampler(10**7, 0.25)
    ds = MixedDataset(data.labeled, data.unlabeled, cfg.augment, data.unlabeled_gt)
    items = next(iter(MixedBatchSampler(len(data.labeled), len(data.unlabeled), ratio=(2, 3), seed=0)))
    batch = collate_mixed([ds[i] for i in items])
    lab, unl = batch.labeled, batch.unlabeled
    pseudo, _, _ = teacher_pseudo_boxes(teacher, unl.weak, cfg.method, None)
    # half the candidates are classification pseudo boxes, all of them RPN and regression ones
    cfg.method.cls_pseudo_threshold = float(torch.cat([p.candidates.scores for p in pseudo]).median())
    if without_pseudo_boxes:  # the strong views are all background to the student's RPN and RoI head
        cfg.method.pseudo_threshold = cfg.method.cls_pseudo_threshold = cfg.method.rpn_pseudo_threshold = 1.01
    pseudo, t_images, t_features = teacher_pseudo_boxes(teacher, unl.weak, cfg.method, None)
    w2s, s2w = view_matrices(unl.weak_matrices, unl.strong_matrices, torch.device("cpu"))
    args = (student, lab.images + unl.strong, lab.targets, pseudo, teacher, t_images, t_features, w2s, s2w)
    sup, unsup, logs = student_losses(*args[:3], pseudo=pseudo, teacher=teacher, teacher_images=t_images,
                                      teacher_features=t_features, weak_to_strong=w2s, strong_to_weak=s2w,
                                      cfg=cfg)
    want_sup, want_unsup = _separate_passes(*args, cfg)
    if without_pseudo_boxes:
        assert logs["unsup/num_pseudo_rpn"] == logs["unsup/num_pseudo_reg"] == 0
    else:
        assert 0 < logs["unsup/num_pseudo_cls"] < logs["unsup/num_pseudo_reg"]
    for got, want in ((sup, want_sup), (unsup, want_unsup)):
        assert got.keys() == want.keys() == set(UNSUP_TERMS)
        for k in got:
            regression = got is unsup and k in ("loss_rpn_box_reg", "loss_box_reg")
            assert got[k] == 0 if without_pseudo_boxes and regression else got[k] > 0, k
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)


def test_background_weights_score_each_roi_where_it_lies_in_the_teacher_view(tiny_cfg):
    # image 0's strong view is its weak view flipped (x -> 64 - x): the RoI [10, 5, 30, 25] is
    # [34, 5, 54, 25] to the teacher; image 1's strong view is twice its weak view: [20, 20, 140,
    # 60] is [10, 10, 70, 30], clipped to the 64-wide weak view: [10, 10, 64, 30]
    torch.manual_seed(0)
    teacher = build_detector(tiny_cfg.model, 3).eval()
    weak = [torch.rand(3, 48, 64), torch.rand(3, 40, 64)]
    strong_to_weak = torch.tensor([[[-1.0, 0, 64], [0, 1, 0], [0, 0, 1]],
                                   [[0.5, 0, 0], [0, 0.5, 0], [0, 0, 1]]])
    rois = [torch.tensor([[10.0, 5, 30, 25]]), torch.tensor([[20.0, 20, 140, 60]])]
    by_hand = [torch.tensor([[34.0, 5, 54, 25]]), torch.tensor([[10.0, 10, 64, 30]])]
    with torch.no_grad():
        images = teacher.preprocess(weak)
        features = teacher.features(images)
        want = roi_outputs(teacher, features, by_hand, images.image_sizes)[0].softmax(-1)[:, 0]
        got = _background_weights("bg_teacher", teacher, images, features, rois,
                                  torch.zeros(2, 4), [{"boxes": torch.zeros(0, 4)}] * 2, strong_to_weak)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(want[0], want[1])  # two RoIs the head tells apart


def test_unsupervised_terms_nonzero_with_pseudo_boxes(tiny_cfg):
    (loss, logs), student = _one_step(_loose(tiny_cfg))
    assert torch.isfinite(loss)
    assert logs["unsup/num_pseudo_cls"] > 0 and logs["unsup/num_pseudo_reg"] > 0
    for term in UNSUP_TERMS:
        assert logs[f"unsup/{term}"] > 0, term
    assert 0.0 <= float(logs["pseudo/precision"]) <= 1.0
    loss.backward()
    assert student.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0


def test_each_process_draws_its_own_jitter_noise(tiny_cfg, monkeypatch):
    seeds = []

    class Recorded(torch.Generator):
        def manual_seed(self, seed):
            seeds.append(seed)
            return super().manual_seed(seed)

    monkeypatch.setattr(torch, "Generator", Recorded)
    cfg = _loose(tiny_cfg)
    cfg.train.seed = 3
    _one_step(cfg, log=False)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 2)
    _one_step(cfg, log=False)
    jitter = [s for s in seeds if s in (3 * 1_000_003, 3 * 1_000_003 + 2 * 2**40)]
    assert jitter == [3 * 1_000_003, 3 * 1_000_003 + 2 * 2**40]  # rank 0's as one process's


def test_a_batch_of_strong_views_alone_has_zero_supervised_terms(tiny_cfg):
    (loss, logs), student = _one_step(_loose(tiny_cfg), ratio=(0, 2))
    assert torch.isfinite(loss) and logs["unsup/num_pseudo_cls"] > 0
    for term in UNSUP_TERMS:
        assert logs[f"sup/{term}"] == 0.0 and logs[f"unsup/{term}"] > 0, term
    loss.backward()
    assert student.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    # and without a single pseudo box: only background to learn, no ground truth anywhere
    m = tiny_cfg.method
    m.pseudo_threshold = m.cls_pseudo_threshold = m.rpn_pseudo_threshold = 1.01
    tiny_cfg.train.seed = 2**63 - 1  # the largest seed the config takes: the step's draws seeded from it
    (loss, logs), student = _one_step(tiny_cfg, ratio=(0, 2))
    assert logs["unsup/num_pseudo_cls"] == 0 and torch.isfinite(loss)
    assert logs["unsup/loss_objectness"] > 0 and logs["unsup/loss_classifier"] > 0
    assert logs["unsup/loss_rpn_box_reg"] == logs["unsup/loss_box_reg"] == 0.0
    loss.backward()
    assert student.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0


def test_teacher_runs_its_nms_on_candidates_only_and_finds_the_same_ones(tiny_cfg, monkeypatch):
    torch.manual_seed(0)
    teacher = build_detector(tiny_cfg.model, 3).eval().requires_grad_(False)
    teacher.roi_heads.score_thresh = 0.0
    weak = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    with torch.no_grad():
        images = teacher.preprocess(weak)
        features = teacher.features(images)
        proposals, _ = teacher.rpn(images, features)
        full = teacher.roi_heads(features, proposals, images.image_sizes)[0]
    scores = torch.cat([d["scores"] for d in full])
    threshold = float(scores.median())  # candidates above it, detections below it
    assert (scores > threshold).any() and (scores < threshold).any()
    expected = candidate_pseudo_labels_batch(full, threshold)

    nms_inputs, in_heads = [], []  # the scores the RoI heads' NMS sees (the RPN's has its own)
    nms, postprocess = torchvision.ops.boxes.batched_nms, teacher.roi_heads.postprocess_detections

    def recording_nms(boxes, scores, idxs, iou):
        if in_heads:
            nms_inputs.append(scores.clone())
        return nms(boxes, scores, idxs, iou)

    def recording_postprocess(*args):
        in_heads.append(True)
        try:
            return postprocess(*args)
        finally:
            in_heads.clear()

    monkeypatch.setattr(torchvision.ops.boxes, "batched_nms", recording_nms)
    monkeypatch.setattr(teacher.roi_heads, "postprocess_detections", recording_postprocess)
    method = replace(tiny_cfg.method, pseudo_threshold=threshold, use_jitter=False)
    pseudo, _, _ = teacher_pseudo_boxes(teacher, weak, method, None)

    assert len(nms_inputs) == 2 and all(len(s) and s.min() > threshold for s in nms_inputs)
    assert sum(len(s) for s in nms_inputs) < len(scores)  # NMS saw fewer boxes than it kept before
    assert teacher.roi_heads.score_thresh == 0.0  # the teacher's own threshold is back
    for got, want in zip(pseudo, expected):
        torch.testing.assert_close(got.candidates.boxes, want.boxes, rtol=0, atol=0)
        torch.testing.assert_close(got.candidates.scores, want.scores, rtol=0, atol=0)
        assert torch.equal(got.candidates.labels, want.labels)


def test_a_score_floor_keeps_low_scored_steady_boxes_out_of_the_regression_set(tiny_cfg):
    """``method.reg_score_threshold``: jittering chooses the regression pseudo boxes among the
    candidates above the floor only; 0 (the reference's rule) among every candidate."""
    cfg = _loose(tiny_cfg)  # every candidate steady (reliability < 1e9)
    torch.manual_seed(0)
    teacher = build_detector(cfg.model, 3).eval().requires_grad_(False)
    weak = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    generator = torch.Generator().manual_seed(0)
    pseudo, _, _ = teacher_pseudo_boxes(teacher, weak, cfg.method, generator)
    scores = torch.cat([p.candidates.scores for p in pseudo])
    assert len(scores) > 2 and all(torch.equal(p.sets.reg.scores, p.candidates.scores) for p in pseudo)
    floor = float(scores.median())
    floored, _, _ = teacher_pseudo_boxes(teacher, weak, replace(cfg.method, reg_score_threshold=floor),
                                         torch.Generator().manual_seed(0))
    for got, every in zip(floored, pseudo):
        assert torch.equal(got.sets.reg.scores, every.candidates.scores[every.candidates.scores > floor])
        assert torch.equal(got.sets.cls.scores, every.sets.cls.scores)  # the other sets unchanged
    assert 0 < sum(len(p.sets.reg.scores) for p in floored) < len(scores)


def test_steps_without_logging_skip_the_host_diagnostics_only(tiny_cfg):
    cfg = _loose(tiny_cfg)
    (loss, logs), _ = _one_step(cfg, log=True)
    (quiet_loss, quiet_logs), _ = _one_step(cfg, log=False)
    diagnostics = {"pseudo/precision", "pseudo/recall", "unsup/reliability_mean"}
    assert diagnostics <= set(logs)
    assert set(quiet_logs) == set(logs) - diagnostics
    assert torch.equal(quiet_loss.detach(), loss.detach())
    for key, value in quiet_logs.items():
        assert torch.equal(value, logs[key]), key


def _mixed_batch(cfg: Config):
    """The data and the first mixed batch (1 labeled + 2 unlabeled images) of ``cfg``."""
    data = load_data(cfg)
    ds = MixedDataset(data.labeled, data.unlabeled, cfg.augment, data.unlabeled_gt)
    items = next(iter(MixedBatchSampler(len(data.labeled), len(data.unlabeled), ratio=(1, 2), seed=0)))
    return data, collate_mixed([ds[i] for i in items])


def test_ground_truth_pseudo_boxes_are_the_hidden_labels_in_the_strong_view(tiny_cfg):
    cfg = tiny_cfg
    cfg.method.pseudo_source = "ground_truth"
    _, batch = _mixed_batch(cfg)
    pseudo = ground_truth_pseudo_labels(batch, torch.device("cpu"))
    unl = batch.unlabeled
    assert len(pseudo) == len(unl) == 2
    for p, gt, labels, wm, sm in zip(pseudo, unl.gt_boxes, unl.gt_labels, unl.weak_matrices,
                                     unl.strong_matrices):
        # weak view = resize (+ flip) of the original: the boxes scale by the matrix's diagonal
        sx, sy = float(wm[0, 0].abs()), float(wm[1, 1])
        widths = (p.candidates.boxes[:, 2] - p.candidates.boxes[:, 0]).sort().values
        assert torch.allclose(widths, ((gt[:, 2] - gt[:, 0]) * sx).sort().values, atol=1e-3)
        heights = (p.candidates.boxes[:, 3] - p.candidates.boxes[:, 1]).sort().values
        assert torch.allclose(heights, ((gt[:, 3] - gt[:, 1]) * sy).sort().values, atol=1e-3)
        assert sorted(p.sets.cls.labels.tolist()) == sorted(labels.tolist())
        assert p.sets.cls is p.sets.reg is p.sets.rpn and (p.reliability == 0).all()
    (loss, logs), _ = _one_step(cfg)
    # every hidden box is a pseudo box (the quality is measured in the weak view)
    assert float(logs["pseudo/precision"]) == 1.0 and float(logs["pseudo/recall"]) == 1.0
    assert logs["unsup/num_pseudo_cls"] > 0 and torch.isfinite(loss)
    cfg.method.pseudo_source = "oracle"
    with pytest.raises(ValueError, match="pseudo_source"):
        _one_step(cfg)


def test_a_ground_truth_source_needs_every_unlabeled_image_before_the_run(tiny_cfg, tmp_path):
    import json

    cfg = tiny_cfg
    gt = json.loads(Path(cfg.data.unlabeled_gt).read_text())
    first = gt["images"][0]
    gt["images"] = gt["images"][1:]
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] != first["id"]]
    lacking = tmp_path / "gt.json"
    lacking.write_text(json.dumps(gt))
    cfg.data.unlabeled_gt = str(lacking)
    for source in ("ground_truth", "found_ground_truth", "true_teacher"):
        cfg.method.pseudo_source = source
        with pytest.raises(ValueError, match=rf"method.pseudo_source={source}: .*gt.json lacks 1 of the "
                                             rf"\d+ unlabeled images \(image {first['id']}, "):
            load_data(cfg)
    cfg.method.pseudo_source = "ground_truth"
    cfg.data.unlabeled_gt = ""
    with pytest.raises(ValueError, match="method.pseudo_source=ground_truth takes its pseudo boxes from the "
                                         "unlabeled pool's hidden ground truth: set data.unlabeled_gt"):
        load_data(cfg)
    # the teacher's boxes: measured against the images the ground truth holds, in every batch
    cfg.method.pseudo_source, cfg.data.unlabeled_gt = "teacher", str(lacking)
    data = load_data(cfg)
    ds = MixedDataset(data.labeled, data.unlabeled, cfg.augment, data.unlabeled_gt)
    index = next(i for i, r in enumerate(data.unlabeled.records) if r.image_id == first["id"])
    batch = collate_mixed([ds[(0, 0, 1)], ds[(1, index, 2)], ds[(1, (index + 1) % len(ds.unlabeled), 3)]])
    assert batch.unlabeled.gt_boxes[0] is None and batch.unlabeled.gt_boxes[1] is not None
    known = _ground_truth_in_weak_views(batch, torch.device("cpu"))
    assert known[0] is None and known[1] is not None
    none = PseudoLabels(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    pseudo = [TeacherPseudoLabels(none, PseudoLabelSets(none, none, none), torch.zeros(0))] * 2
    logs = _quality_logs(pseudo, batch, torch.device("cpu"))  # no pseudo box: recall 0 of the known
    assert len(known[1][0]) > 0 and float(logs["pseudo/recall"]) == 0.0
    with pytest.raises(ValueError, match="method.pseudo_source=true_teacher needs"):
        ground_truth_pseudo_labels(batch, torch.device("cpu"), "true_teacher")


def _labels(boxes, labels, scores=None) -> TeacherPseudoLabels:
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    scores = torch.ones(len(boxes)) if scores is None else torch.tensor(scores)
    p = PseudoLabels(boxes, scores, torch.tensor(labels, dtype=torch.int64))
    return TeacherPseudoLabels(p, PseudoLabelSets(p, p, p), torch.zeros(len(boxes)))


def test_found_ground_truth_keeps_the_exact_boxes_of_the_objects_the_teacher_found():
    gt = _labels([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 0, 70, 10]], [1, 2, 1, 4])
    teacher = _labels([[1, 0, 11, 10],  # object 0: IoU 90 / 110, same class: found
                       [20, 20, 30, 30],  # object 1 exactly, but class 1 instead of 2: not found
                       [40, 40, 45, 50],  # object 2: IoU 50 / 100 = 0.5, the threshold: found
                       [60, 0, 64.9, 10],  # object 3: IoU 49 / 100, below: not found
                       [80, 80, 90, 90]], [1, 1, 1, 4, 3], [0.95, 0.99, 0.91, 0.97, 0.93])  # a false box
    empty = _labels([], [])
    out = found_ground_truth([teacher, empty, teacher], [gt, gt, empty])
    assert out[0].sets.cls.boxes.tolist() == [[0, 0, 10, 10], [40, 40, 50, 50]]
    assert out[0].sets.cls.labels.tolist() == [1, 1] and out[0].sets.cls.scores.tolist() == [1, 1]
    assert out[0].sets.cls is out[0].sets.reg is out[0].sets.rpn and out[0].reliability.tolist() == [0, 0]
    assert len(out[1].sets.cls.boxes) == 0 and len(out[2].sets.cls.boxes) == 0  # nothing found, nothing there


def _step_with_a_teacher_missing_the_first_object(cfg, monkeypatch, source: str):
    """One Soft Teacher step with ``method.pseudo_source=source`` and a stand-in teacher whose
    boxes are each hidden object but the first of each image, one pixel off, plus a box where
    there is nothing. Returns the loss, the logs, that teacher's recall, the objects it finds
    per image, and whether each of its calls was asked to jitter."""
    import softteacher.soft_teacher as st

    cfg.method.pseudo_source = source
    data, batch = _mixed_batch(cfg)
    hidden = ground_truth_pseudo_labels(batch, torch.device("cpu"))
    assert all(len(h.sets.cls.boxes) >= 2 for h in hidden)
    jitter = []

    def pseudo_boxes(teacher, weak, method, generator):
        jitter.append(method.use_jitter)
        _, images, features = teacher_pseudo_boxes(teacher, weak, method, generator)
        found = []
        for h in hidden:
            boxes = torch.cat([h.sets.cls.boxes[1:] + 1.0, torch.tensor([[0.0, 0.0, 2.0, 2.0]])])
            found.append(_labels(boxes.tolist(), h.sets.cls.labels[1:].tolist() + [1]))
        return found, images, features

    monkeypatch.setattr(st, "teacher_pseudo_boxes", pseudo_boxes)
    torch.manual_seed(0)
    student = build_detector(cfg.model, data.labeled.num_classes).train()
    teacher = build_detector(cfg.model, data.labeled.num_classes).eval().requires_grad_(False)
    loss, logs = soft_teacher_step(student=student, teacher=teacher, batch=batch, cfg=cfg, iteration=0)
    num_hidden = sum(len(boxes) for boxes, _ in st._ground_truth_in_weak_views(batch, torch.device("cpu")))
    found = sum(len(h.sets.cls.boxes) - 1 for h in hidden)
    return loss, logs, found / num_hidden, found / len(hidden), jitter


def test_found_ground_truth_source_trains_on_the_exact_boxes_the_teacher_found(tiny_cfg, monkeypatch):
    loss, logs, recall, _, jitter = _step_with_a_teacher_missing_the_first_object(
        tiny_cfg, monkeypatch, "found_ground_truth")
    # exact boxes (no false one, the one-pixel shift undone) at the recall of the teacher
    assert float(logs["pseudo/precision"]) == 1.0
    assert float(logs["pseudo/recall"]) == pytest.approx(recall)
    assert jitter == [False] and torch.isfinite(loss)  # exact boxes are not jittered


def test_true_teacher_boxes_drop_the_false_ones_and_keep_the_teachers_coordinates():
    gt = _labels([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 0, 70, 10]], [1, 2, 1, 4])
    boxes = torch.tensor([[1, 0, 11, 10],  # object 0: IoU 90 / 110, same class: true
                          [20, 20, 30, 30],  # object 1 exactly, but class 1 instead of 2: false
                          [40, 40, 45, 50],  # object 2: IoU 50 / 100 = 0.5, the threshold: true
                          [60, 0, 64.9, 10],  # object 3: IoU 49 / 100, below: false
                          [80, 80, 90, 90]], dtype=torch.float32)  # nothing there: false
    candidates = PseudoLabels(boxes, torch.tensor([0.95, 0.99, 0.91, 0.97, 0.6]),
                              torch.tensor([1, 1, 1, 4, 3]))
    sets = PseudoLabelSets(candidates.select(torch.tensor([0, 1, 2, 3])),  # score > 0.9
                           candidates.select(torch.tensor([0, 1, 3])),
                           candidates.select(torch.tensor([2, 3, 4])))  # the reliable ones
    teacher = TeacherPseudoLabels(candidates, sets, torch.tensor([0.01, 0.5, 0.015, 0.002, 0.019]))
    out = true_teacher_boxes([teacher, _labels([], []), teacher], [gt, gt, _labels([], [])])
    t = out[0]
    assert t.candidates.boxes.tolist() == [[1, 0, 11, 10], [40, 40, 45, 50]]  # the teacher's, not exact
    assert t.candidates.scores.tolist() == pytest.approx([0.95, 0.91])
    assert t.candidates.labels.tolist() == [1, 1] and t.reliability.tolist() == pytest.approx([0.01, 0.015])
    assert t.sets.cls.boxes.tolist() == [[1, 0, 11, 10], [40, 40, 45, 50]]
    assert t.sets.rpn.boxes.tolist() == [[1, 0, 11, 10]]
    assert t.sets.reg.boxes.tolist() == [[40, 40, 45, 50]]
    for empty in out[1:]:  # a teacher without boxes; objects nowhere
        assert len(empty.candidates) == len(empty.reliability) == 0
        assert all(len(s) == 0 for s in empty.sets)


def test_true_teacher_source_trains_on_the_teachers_true_boxes_with_jittering(tiny_cfg, monkeypatch):
    loss, logs, recall, per_image, jitter = _step_with_a_teacher_missing_the_first_object(
        tiny_cfg, monkeypatch, "true_teacher")
    assert jitter == [True]  # the teacher's boxes are jittered as in the method
    assert float(logs["pseudo/precision"]) == 1.0  # the false boxes are gone
    assert float(logs["pseudo/recall"]) == pytest.approx(recall)
    assert logs["unsup/num_pseudo_cls"] == pytest.approx(per_image) and torch.isfinite(loss)


def test_strong_views_without_pseudo_boxes_are_all_background(tiny_cfg):
    # as in the reference: no pseudo box in the whole batch still teaches the RPN and the RoI
    # classifier that the strong views hold background; there is nothing to regress
    cfg = tiny_cfg
    m = cfg.method
    m.pseudo_threshold = m.cls_pseudo_threshold = m.rpn_pseudo_threshold = 1.01
    (loss, logs), student = _one_step(cfg)
    assert logs["unsup/num_pseudo_cls"] == 0 and logs["unsup/empty_batch"] == 1
    assert logs["unsup/loss_rpn_box_reg"] == 0.0 and logs["unsup/loss_box_reg"] == 0.0
    assert logs["unsup/loss_objectness"] > 0 and logs["unsup/loss_classifier"] > 0
    # every RoI is background, each weighted by the teacher's background score (below 1 for an
    # untrained teacher); with hard labels (reliability none) each weighs 1
    assert 0 < float(logs["unsup/bg_weight_mean"]) < 0.99
    total = sum(v for k, v in logs.items() if k.startswith(("sup/loss", "unsup/loss")))
    torch.testing.assert_close(loss.detach(), total)
    loss.backward()
    grad = student.roi_heads.box_predictor.cls_score.weight.grad
    assert grad is not None and torch.isfinite(grad).all()
    m.reliability = "none"
    (_, hard), _ = _one_step(cfg)
    assert float(hard["unsup/bg_weight_mean"]) == 1.0
    assert float(hard["unsup/loss_classifier"]) != pytest.approx(float(logs["unsup/loss_classifier"]))


@pytest.mark.parametrize("norm", ["gn", "frozen_bn"])  # frozen BN: cached scale, buffers copied once
def test_soft_teacher_trains_logs_and_resumes_exactly(tiny_cfg, tmp_path, norm):
    cfg = _loose(tiny_cfg)
    cfg.model.norm = norm
    cfg.method.sample_ratio = (1, 1)
    cfg.method.ema_momentum = 0.5
    cfg.solver.max_iter = 4
    cfg.train.output_dir = str(tmp_path / "full")
    cfg.train.vis_period = 2
    result = train(cfg, progress=False)
    pictures = sorted(p.name for p in (tmp_path / "full" / "pseudo_labels").iterdir())
    assert pictures == ["iter_0000002.jpg", "iter_0000004.jpg"]
    # the evaluation at the end: the first val image with the teacher's and the student's detections
    val_first = load_dataset(cfg.data.val, images=cfg.data.val_images, labeled=True).records[0]
    with Image.open(tmp_path / "full" / "val_predictions" / "iter_0000004.jpg") as drawn:
        assert drawn.width >= 2 * val_first.width + 4 and drawn.height > val_first.height
    assert math.isfinite(result.last_losses["loss"])
    assert "teacher/bbox_AP" in result.metrics and "student/bbox_AP" in result.metrics
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all("unsup/num_pseudo_cls" in r and "pseudo/recall" in r for r in rows if r["kind"] == "train")
    full = load_checkpoint(tmp_path / "full" / "model_final.pt")
    assert full["report"] == "teacher"
    assert any(not torch.equal(full["teacher"][k], full["student"][k]) for k in full["student"])

    cfg.solver.max_iter = 2
    cfg.train.output_dir = str(tmp_path / "part")
    train(cfg, progress=False)
    cfg.solver.max_iter = 4
    train(cfg, resume="auto", progress=False)
    part = load_checkpoint(tmp_path / "part" / "model_final.pt")
    for which in ("student", "teacher"):
        for k in full[which]:
            assert torch.equal(full[which][k], part[which][k]), (which, k)


def _without_pseudo_boxes(cfg, iters: int, warn_after: int, checkpoint_period: int):
    """``cfg`` with thresholds no score passes, training ``iters`` iterations without val."""
    m = cfg.method
    m.pseudo_threshold = m.cls_pseudo_threshold = m.rpn_pseudo_threshold = 1.01
    cfg.solver.max_iter, cfg.train.warn_empty_iters = iters, warn_after
    cfg.train.checkpoint_period, cfg.data.val = checkpoint_period, ""
    return cfg


def _empty_warnings(caplog) -> list[str]:
    return [r.message for r in caplog.records if "no pseudo box above" in r.message]


def test_a_long_run_without_pseudo_boxes_is_reported(tiny_cfg, caplog):
    cfg = _without_pseudo_boxes(tiny_cfg, 3, warn_after=2, checkpoint_period=0)
    with caplog.at_level("INFO", logger="softteacher.engine"):
        train(cfg, progress=False)
    warnings = _empty_warnings(caplog)
    assert len(warnings) == 1 and "cls_pseudo_threshold=1.01 for 2 iterations" in warnings[0]
    rows = [json.loads(x) for x in (Path(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["unsup/empty_fraction"] for r in rows] == [1.0, 1.0, 1.0]


def test_the_streak_without_pseudo_boxes_runs_on_through_a_resume(tiny_cfg, caplog):
    cfg = _without_pseudo_boxes(tiny_cfg, 2, warn_after=3, checkpoint_period=1)
    with caplog.at_level("INFO", logger="softteacher.engine"):
        train(cfg, progress=False)  # 2 iterations without a box: no warning yet
        cfg.solver.max_iter = 4
        train(cfg, resume="auto", progress=False)  # the third in a row warns, once
    warnings = _empty_warnings(caplog)
    assert len(warnings) == 1 and "for 3 iterations" in warnings[0]
    state = load_checkpoint(Path(cfg.train.output_dir) / "model_final.pt")
    assert state["empty_pseudo_streak"] == 4
    caplog.clear()
    cfg.solver.max_iter = 5
    with caplog.at_level("INFO", logger="softteacher.engine"):
        train(cfg, resume="auto", progress=False)  # warned of before the checkpoint: not again
    assert not _empty_warnings(caplog)


def _to_strong(pseudo, weak_m, strong_m, size, min_size, mode="corners"):
    from softteacher.soft_teacher import targets_in_strong, view_matrices

    weak_to_strong, _ = view_matrices([weak_m], [strong_m], torch.device("cpu"))
    return targets_in_strong([[pseudo]], weak_to_strong, [size], min_size, mode)[0][0]


def test_pseudo_box_lands_in_a_flipped_and_rotated_strong_view():
    from softteacher.geometry import hflip_matrix, rotate_matrix, scale_matrix
    from softteacher.method.pseudo_labels import PseudoLabels

    # original 200x100 -> weak: scale 0.5 (100x50) then flip; strong: the weak view rotated 90 deg
    weak_m = hflip_matrix(100) @ scale_matrix(0.5, 0.5)
    strong_m = rotate_matrix(90.0, (50.0, 25.0)) @ weak_m
    pseudo = PseudoLabels(torch.tensor([[40.0, 10.0, 60.0, 20.0]]), torch.tensor([0.95]),
                          torch.tensor([3]))
    target = _to_strong(pseudo, weak_m, strong_m, (50, 100), min_size=1.0)
    # about the centre (50, 25), a quarter turn counter-clockwise on screen sends (dx, dy) to (dy, -dx):
    # x' = 50 + dy with dy in [-15, -5] -> [35, 45]; y' = 25 - dx with dx in [-10, 10] -> [15, 35]
    torch.testing.assert_close(target["boxes"], torch.tensor([[35.0, 15.0, 45.0, 35.0]]),
                               atol=1e-4, rtol=0)
    assert target["labels"].tolist() == [3]
    # a box rotated out of the strong view is dropped with its label
    gone = PseudoLabels(torch.tensor([[0.0, 0.0, 5.0, 5.0]]), torch.tensor([0.95]), torch.tensor([1]))
    out = _to_strong(gone, weak_m, strong_m, (50, 100), min_size=1.0)
    assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,)


def test_pseudo_boxes_reach_the_strong_view_by_the_configured_mapping():
    from softteacher.geometry import rotate_matrix, scale_matrix
    from softteacher.method.pseudo_labels import PseudoLabels

    # weak view: x0.5; strong view: the same resize, then 45 degrees about (50, 50)
    weak_m = scale_matrix(0.5, 0.5)
    strong_m = rotate_matrix(45, (50, 50)) @ weak_m
    p = PseudoLabels(torch.tensor([[40.0, 40.0, 60.0, 60.0]]), torch.tensor([0.95]), torch.tensor([3]))
    r = 10 * math.sqrt(2)
    corners = _to_strong(p, weak_m, strong_m, (100, 100), 1.0)
    ellipse = _to_strong(p, weak_m, strong_m, (100, 100), 1.0, "ellipse")
    torch.testing.assert_close(corners["boxes"], torch.tensor([[50 - r, 50 - r, 50 + r, 50 + r]]))
    torch.testing.assert_close(ellipse["boxes"], torch.tensor([[40.0, 40.0, 60.0, 60.0]]))
    assert ellipse["labels"].tolist() == [3]


def test_targets_of_several_images_and_sets_are_mapped_and_filtered_each_in_its_own_view():
    from softteacher.geometry import hflip_matrix, scale_matrix, translate_matrix
    from softteacher.method.pseudo_labels import PseudoLabels
    from softteacher.soft_teacher import targets_in_strong, view_matrices

    def labels(boxes, classes):
        return PseudoLabels(torch.tensor(boxes), torch.full((len(boxes),), 0.95), torch.tensor(classes))

    # image 0: weak = original x0.5, strong = original (so weak -> strong is x2), strong view 100x100
    # image 1: weak = original, strong = the original flipped in a 60-wide view (x -> 60 - x), 40x60
    weak = [scale_matrix(0.5, 0.5), translate_matrix(0.0, 0.0)]
    strong = [scale_matrix(1.0, 1.0), hflip_matrix(60)]
    weak_to_strong, strong_to_weak = view_matrices(weak, strong, torch.device("cpu"))
    double = torch.diag(torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(weak_to_strong[0], double)
    torch.testing.assert_close(strong_to_weak[1] @ weak_to_strong[1], torch.eye(3, dtype=torch.float64))
    sets = [
        [labels([[10.0, 10.0, 20.0, 30.0], [45.0, 45.0, 70.0, 70.0]], [1, 2]),  # second: clipped to 100
         PseudoLabels(torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.int64))],
        [labels([[0.0, 0.0, 10.0, 5.0]], [3]),
         labels([[5.0, 30.0, 15.0, 50.0], [59.5, 0.0, 80.0, 10.0]], [1, 4])],  # y clipped to 40; x < 1 px
    ]
    out = targets_in_strong(sets, weak_to_strong, [(100, 100), (40, 60)], min_size=1.0)
    torch.testing.assert_close(out[0][0]["boxes"], torch.tensor([[20.0, 20.0, 40.0, 60.0],
                                                                 [90.0, 90.0, 100.0, 100.0]]))
    assert out[0][0]["labels"].tolist() == [1, 2]
    assert out[0][1]["boxes"].shape == (0, 4) and out[0][1]["labels"].shape == (0,)
    torch.testing.assert_close(out[1][0]["boxes"], torch.tensor([[50.0, 0.0, 60.0, 5.0]]))
    torch.testing.assert_close(out[1][1]["boxes"], torch.tensor([[45.0, 30.0, 55.0, 40.0]]))
    assert out[1][1]["labels"].tolist() == [1]  # the box flipped to x in [-20, 0.5] left the view


@pytest.mark.parametrize("mode", ["corners", "ellipse"])
def test_boxes_of_all_images_move_in_one_pass_as_they_do_one_image_at_a_time(mode):
    from softteacher.geometry import clip_boxes, rotate_matrix, shear_matrix, transform_boxes
    from softteacher.soft_teacher import boxes_in_views

    g = torch.Generator().manual_seed(0)

    def random_boxes(n):
        xy = torch.rand((n, 2), generator=g) * 80
        return torch.cat([xy, xy + 5 + torch.rand((n, 2), generator=g) * 40], dim=1)

    matrices = torch.stack([rotate_matrix(25.0, (40.0, 30.0)), shear_matrix(10.0, -5.0, (20.0, 20.0)),
                            rotate_matrix(-90.0, (50.0, 50.0))])
    sizes = [(60, 90), (100, 70), (50, 50)]
    sets = [random_boxes(7), random_boxes(0), random_boxes(5), random_boxes(3)]
    owners = [0, 1, 2, 0]  # the last set belongs to the first image too
    got = boxes_in_views(sets, matrices, sizes, mode, owners)
    want = torch.cat([clip_boxes(transform_boxes(b, matrices[i], mode), sizes[i])
                      for b, i in zip(sets, owners)])
    assert got.shape == (15, 4)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (got[:, 2] <= 90).all() and (got[12:, 3] <= 60).all() and (got >= 0).all()


def test_same_seed_gives_the_same_weights_in_another_process(tiny_cfg, tmp_path):
    """Nothing in training depends on the order of a hashed set or on the process: two processes
    with other string-hash seeds train bitwise-identical students and teachers."""
    cfg = _loose(tiny_cfg)
    cfg.method.sample_ratio = (1, 1)
    cfg.method.ema_momentum = 0.5
    cfg.solver.max_iter = 3
    cfg.train.eval_period = 0
    config = tmp_path / "config.yaml"
    config.write_text(cfg.to_yaml())
    weights = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"hash{hash_seed}"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "softteacher", "train", "--config", str(config),
                        "--out", str(out), "--no-progress"], env=env, check=True, capture_output=True)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert any(r.get("unsup/num_pseudo_cls", 0) > 0 for r in rows if r["kind"] == "train")
        weights.append(load_checkpoint(out / "model_final.pt"))
    for which in ("student", "teacher"):
        a, b = weights[0][which], weights[1][which]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (which, k)


def test_refined_boxes_are_clipped_to_their_image():
    from softteacher.config import preset_tiny
    from softteacher.soft_teacher import refine_boxes

    model = build_detector(preset_tiny().model, 2).eval()
    pred = model.roi_heads.box_predictor.bbox_pred
    torch.nn.init.zeros_(pred.weight)
    with torch.no_grad():  # codes weighted (10, 10, 5, 5): class 1 moves right by half its width,
        pred.bias.zero_()  # class 2 up by half its height
        pred.bias[4] = 10 * 0.5
        pred.bias[9] = -10 * 0.5
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 48, 64, generator=g), torch.rand(3, 32, 40, generator=g)]
    batch = model.preprocess(images)
    with torch.no_grad():
        features = model.features(batch)
        boxes = [torch.tensor([[40.0, 10, 60, 30], [10, 10, 20, 30]]), torch.tensor([[5.0, 4, 15, 14]])]
        labels = [torch.tensor([1, 1]), torch.tensor([2])]
        refined = refine_boxes(model, features, batch.image_sizes, boxes, labels)
    # [50, 10, 70, 30] leaves the 64-wide image; [15, 10, 25, 30] stays; [5, -1, 15, 9] leaves the top
    assert refined[0].tolist() == [[50, 10, 64, 30], [15, 10, 25, 30]]
    assert refined[1].tolist() == [[5, 0, 15, 9]]


def _momenta_of_each_update(monkeypatch) -> list[float]:
    """The list that the EMA updates of the runs trained from now on append their momenta to."""
    from softteacher import engine

    seen: list[float] = []
    real = engine.ema_update
    monkeypatch.setattr(engine, "ema_update", lambda teacher, student, m, **kw: (
        seen.append(m), real(teacher, student, m, **kw))[1])
    return seen


def test_the_ramp_makes_the_teacher_the_mean_of_every_student_so_far(tiny_cfg, monkeypatch):
    # the reference updates before iteration t with min(m, 1 - 1/(t + 1)), the student having
    # taken t steps: after the loop's iterations 0, 1, 2 the momenta are 1/2, 2/3, 3/4, so the
    # teacher is the mean of the start and the students of steps 1, 2, 3
    seen = _momenta_of_each_update(monkeypatch)
    cfg = tiny_cfg
    cfg.method.ema_schedule, cfg.method.ema_momentum = "ramp", 0.999
    cfg.solver.max_iter, cfg.train.checkpoint_period, cfg.data.val = 3, 0, ""
    train(cfg, progress=False)
    assert seen == pytest.approx([1 / 2, 2 / 3, 3 / 4])
    cfg.method.sample_ratio = (2, 0)
    with pytest.raises(ValueError, match=r"method.sample_ratio \(2, 0\): Soft Teacher needs unlabeled"):
        train(cfg, progress=False)


def test_a_frozen_teacher_refreshed_every_two_steps_is_the_student_at_each_refresh(tiny_cfg, tmp_path,
                                                                                      monkeypatch):
    seen = _momenta_of_each_update(monkeypatch)
    cfg = _loose(tiny_cfg)
    cfg.method.ema_momentum, cfg.method.teacher_refresh = 1.0, 2
    cfg.solver.max_iter, cfg.train.checkpoint_period, cfg.data.val = 2, 0, ""
    cfg.train.output_dir = str(tmp_path / "two")
    train(cfg, progress=False)
    assert seen == [1.0, 0.0]
    final = load_checkpoint(tmp_path / "two" / "model_final.pt")
    for name, value in final["student"].items():  # the teacher took the student at step 2, exactly
        assert torch.equal(final["teacher"][name], value), name
    key = next(k for k in final["student"] if k.endswith("cls_score.weight"))
    cfg.solver.max_iter, cfg.train.output_dir = 5, str(tmp_path / "five")
    seen.clear()
    train(cfg, progress=False)
    assert seen == [1.0, 0.0, 1.0, 0.0, 1.0]
    final = load_checkpoint(tmp_path / "five" / "model_final.pt")
    assert not torch.equal(final["teacher"][key], final["student"][key])  # frozen since step 4
    cfg.method.teacher_refresh = -1
    with pytest.raises(ValueError, match="method.teacher_refresh"):
        train(cfg, progress=False)


@pytest.mark.parametrize("norm", ["frozen_bn", "bn"])
def test_a_teacher_unchanged_since_its_last_evaluation_is_not_evaluated_again(tiny_cfg, tmp_path,
                                                                             monkeypatch, norm):
    # frozen, refreshed at steps 2 and 4, evaluated after every step: with frozen BatchNorm the
    # teacher is written to at step 1 (the buffers' first copy), 2 and 4 only, so step 3 keeps
    # step 2's metrics; with BatchNorm its statistics come from the student at every step
    from softteacher import engine

    calls, pictured = [], []
    real = engine.evaluate
    monkeypatch.setattr(engine, "evaluate", lambda model, *a, **kw: (calls.append(id(model)),
                                                                      real(model, *a, **kw))[1])
    real_picture = engine.val_prediction_picture
    monkeypatch.setattr(engine, "val_prediction_picture",
                        lambda dset, results_of: (pictured.append(dict(results_of)),
                                                  real_picture(dset, results_of))[1])
    cfg = tiny_cfg
    cfg.model.norm = norm
    cfg.method.ema_momentum, cfg.method.teacher_refresh = 1.0, 2
    cfg.solver.max_iter, cfg.train.eval_period, cfg.train.checkpoint_period = 4, 1, 0
    cfg.train.vis_period = 1
    out = train(cfg, progress=False).output_dir
    teacher = calls[0]
    want = [1, 1, 1, 1] if norm == "bn" else [1, 1, 0, 1]
    assert [c == teacher for c in calls] == [b for t in want for b in ([True, False] if t else [False])]
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if r.get("kind") == "eval"]
    assert [r["iteration"] for r in evals] == [1, 2, 3, 4]
    for r in evals:
        assert ("time/eval_teacher_s" in r) == bool(want[r["iteration"] - 1])
    keys = [k for k in evals[1] if k.startswith("teacher/")]
    assert keys and all(evals[2][k] == evals[1][k] for k in keys)
    # the val picture shows the unchanged teacher too: its detections as evaluated then
    want_names = [["teacher", "student"] if t else ["teacher (as at iteration 2)", "student"] for t in want]
    assert [list(p) for p in pictured] == want_names
    if norm == "frozen_bn":
        assert pictured[2]["teacher (as at iteration 2)"] is pictured[1]["teacher"]
    assert len(list((out / "val_predictions").iterdir())) == 4


@pytest.mark.parametrize("buffers", ["copy", "average"])
def test_the_teacher_copies_or_averages_the_students_batchnorm_statistics(tiny_cfg, tmp_path, buffers):
    cfg = _loose(tiny_cfg)
    cfg.model.norm, cfg.method.sample_ratio = "bn", (1, 1)
    cfg.method.ema_momentum, cfg.method.ema_buffers = 0.5, buffers
    cfg.solver.max_iter, cfg.train.checkpoint_period, cfg.data.val = 1, 0, ""
    cfg.train.output_dir = str(tmp_path / buffers)
    train(cfg, progress=False)
    final = load_checkpoint(tmp_path / buffers / "model_final.pt")
    teacher, student = final["teacher"], final["student"]
    key = next(k for k in student if k.endswith("running_var"))
    moved = student[key]  # BatchNorm's running variance starts at 1 in both models
    assert not torch.equal(moved, torch.ones_like(moved))
    want = moved if buffers == "copy" else 0.5 * torch.ones_like(moved) + 0.5 * moved
    torch.testing.assert_close(teacher[key], want)
    cfg.method.ema_buffers = "lerp"
    with pytest.raises(ValueError, match="method.ema_buffers 'lerp': expected copy or average"):
        train(cfg, progress=False)
