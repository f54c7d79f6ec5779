import math

import pytest
import torch

from softteacher.method.box_jitter import box_jitter_reliability
from softteacher.method.soft_teacher import (
    INDICATORS,
    background_probability,
    background_weights,
    combine_losses,
    soft_weighted_cls_loss,
)

L2, L3 = math.log(2), math.log(3)
# Rows of (R, 3) logits with simple softmaxes (background = column 0):
UNIFORM = [0.0, 0.0, 0.0]  # [1/3, 1/3, 1/3]
BG_HALF = [L2, 0.0, 0.0]  # [1/2, 1/4, 1/4]
FG1_3_5 = [0.0, L3, 0.0]  # [1/5, 3/5, 1/5]


def _four_rois():
    logits = torch.tensor([FG1_3_5, UNIFORM, BG_HALF, FG1_3_5], requires_grad=True)
    targets = torch.tensor([1, 2, 0, 0])
    # CE: -log(3/5) = log(5/3), log 3, log 2, log 5.  Foreground entries (7.0) are ignored.
    bg_weights = torch.tensor([7.0, 7.0, 0.5, 0.25])
    return logits, targets, bg_weights


def test_soft_weighted_loss_four_rois_by_hand():
    logits, targets, bg_weights = _four_rois()
    loss = soft_weighted_cls_loss(logits, targets, bg_weights)
    # Normaliser N_fg + sum r_j = 2 + 0.5 + 0.25.
    expected = (math.log(5 / 3) + L3 + 0.5 * L2 + 0.25 * math.log(5)) / 2.75
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    hard = soft_weighted_cls_loss(logits, targets, None)
    assert hard.item() == pytest.approx((math.log(5 / 3) + L3 + L2 + math.log(5)) / 4, rel=1e-6)


def test_soft_weighted_loss_with_teacher_background_weights():
    logits = torch.tensor([FG1_3_5, BG_HALF, UNIFORM])
    targets = torch.tensor([1, 0, 0])
    teacher = torch.tensor([UNIFORM, BG_HALF, FG1_3_5])  # teacher's p_bg of the two bg RoIs
    r = background_weights("bg_teacher", teacher_logits=teacher[1:])
    assert r.tolist() == pytest.approx([0.5, 0.2])
    w = torch.ones(3)
    w[targets == 0] = r
    loss = soft_weighted_cls_loss(logits, targets, w)
    assert loss.item() == pytest.approx((math.log(5 / 3) + 0.5 * L2 + 0.2 * L3) / 1.7, rel=1e-6)


def test_normaliser_clamped_at_one():
    logits = torch.tensor([BG_HALF, UNIFORM])
    targets = torch.tensor([0, 0])
    loss = soft_weighted_cls_loss(logits, targets, torch.tensor([0.1, 0.2]))
    assert loss.item() == pytest.approx(0.1 * L2 + 0.2 * L3, rel=1e-6)  # / max(0.3, 1)
    zero = soft_weighted_cls_loss(logits, targets, torch.zeros(2))
    assert zero.item() == 0.0


def test_empty_rois_give_zero_with_graph():
    logits = torch.zeros(0, 3, requires_grad=True)
    loss = soft_weighted_cls_loss(logits, torch.zeros(0, dtype=torch.long), torch.zeros(0))
    assert loss.item() == 0.0 and loss.requires_grad and loss.dim() == 0
    loss.backward()
    assert logits.grad.shape == (0, 3)


def test_gradients_flow_to_logits_only():
    logits, targets, _ = _four_rois()
    bg_weights = torch.tensor([1.0, 1.0, 0.5, 0.25], requires_grad=True)
    soft_weighted_cls_loss(logits, targets, bg_weights).backward()
    assert bg_weights.grad is None
    # d loss / d logits_i = w_i / sum(w) * (softmax_i - onehot_i): check the soft bg row 2.
    expected_row2 = 0.5 / 2.75 * (torch.tensor([0.5, 0.25, 0.25]) - torch.tensor([1.0, 0, 0]))
    torch.testing.assert_close(logits.grad[2], expected_row2)


def test_bad_loss_shapes_raise():
    with pytest.raises(ValueError, match="soft_weighted_cls_loss: logits must be"):
        soft_weighted_cls_loss(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"soft_weighted_cls_loss: bg_weights \(3,\) must be"):
        soft_weighted_cls_loss(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), torch.ones(3))


def test_background_column_is_zero():
    p = background_probability(torch.tensor([BG_HALF, FG1_3_5, UNIFORM]))
    assert p.tolist() == pytest.approx([0.5, 0.2, 1 / 3])
    assert background_probability(torch.zeros(0, 3)).shape == (0,)


def test_bg_student_is_detached():
    student = torch.tensor([BG_HALF, FG1_3_5], requires_grad=True)
    r = background_weights("bg_student", student_logits=student)
    assert r.tolist() == pytest.approx([0.5, 0.2]) and not r.requires_grad


def test_pred_diff():
    teacher = torch.tensor([BG_HALF, UNIFORM, FG1_3_5])
    student = torch.tensor([FG1_3_5, UNIFORM, BG_HALF])
    r = background_weights("pred_diff", teacher_logits=teacher, student_logits=student)
    # 1 - |p_t - p_s|: the teacher more sure of background, as sure, less sure (0.2 against 0.5)
    assert r.tolist() == pytest.approx([1 - (0.5 - 0.2), 1.0, 1 - (0.5 - 0.2)])


def test_iou_weights_per_image():
    proposals = [torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 5], [50, 50, 60, 60]]),
                 torch.tensor([[0.0, 0, 4, 4]]),
                 torch.zeros(0, 4)]
    pseudo = [torch.tensor([[0.0, 0, 10, 20], [0, 0, 10, 6]]),
              torch.zeros(0, 4),  # no pseudo box: weight 1
              torch.tensor([[0.0, 0, 1, 1]])]
    r = background_weights("iou", proposals=proposals, pseudo_boxes=pseudo, counts=[3, 1, 0])
    # Row 0: IoU 100/200 = 0.5 and 60/100 = 0.6 -> 1 - 0.6.  Row 1: 50/200 and 50/60 -> 1 - 5/6.
    # Row 2: no overlap -> 1.  Image 1: no pseudo boxes -> 1.
    assert r.tolist() == pytest.approx([0.4, 1 / 6, 1.0, 1.0])


def test_reverse_iou_weights():
    proposals = [torch.tensor([[0.0, 0, 10, 10], [0, 0, 4, 4], [20, 20, 30, 30]])]
    pseudo = [torch.tensor([[2.0, 2, 6, 6]])]  # area 16
    r = background_weights("reverse_iou", proposals=proposals, pseudo_boxes=pseudo)
    # Row 0 contains the pseudo box: 16/16 -> 0.  Row 1: intersection [2,2,4,4] = 4 -> 1 - 1/4.
    assert r.tolist() == pytest.approx([0.0, 0.75, 1.0])
    r_iou = background_weights("iou", proposals=proposals, pseudo_boxes=pseudo)
    # IoU: row 0 16/100, row 1 4/(16 + 16 - 4) = 1/7.
    assert r_iou.tolist() == pytest.approx([1 - 16 / 100, 1 - 1 / 7, 1.0])


def test_none_and_empty():
    r = background_weights("none", counts=[2, 0, 3])
    assert r.tolist() == [1.0] * 5 and r.dtype == torch.float32
    assert background_weights("bg_teacher", teacher_logits=torch.zeros(0, 3)).shape == (0,)
    assert background_weights("iou", proposals=[torch.zeros(0, 4)],
                              pseudo_boxes=[torch.zeros(0, 4)]).shape == (0,)


def test_dispatcher_errors():
    with pytest.raises(ValueError, match="known: " + ", ".join(INDICATORS)):
        background_weights("entropy", teacher_logits=torch.zeros(1, 3))
    with pytest.raises(ValueError, match="needs teacher_logits"):
        background_weights("pred_diff", student_logits=torch.zeros(1, 3))
    with pytest.raises(ValueError, match="disagree"):
        background_weights("bg_teacher", teacher_logits=torch.zeros(2, 3), counts=[1])
    with pytest.raises(ValueError):
        background_weights("none")


def test_combine_losses_weights_every_unsup_term():
    names = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")
    sup = {k: torch.tensor(v, requires_grad=True) for k, v in zip(names, (1.0, 2.0, 0.5, 0.25))}
    unsup = {k: torch.tensor(v, requires_grad=True) for k, v in zip(names, (0.1, 0.2, 0.3, 0.4))}
    total, logged = combine_losses(sup, unsup, alpha=4.0)
    assert total.item() == pytest.approx(3.75 + 4.0 * 1.0)
    assert set(logged) == {f"{p}/{k}" for p in ("sup", "unsup") for k in names}
    assert logged["unsup/loss_box_reg"].item() == pytest.approx(0.8)
    assert logged["sup/loss_box_reg"].item() == 2.0
    assert not any(v.requires_grad for v in logged.values())
    total.backward()
    assert all(v.grad.item() == 1.0 for v in sup.values())
    assert all(v.grad.item() == pytest.approx(4.0) for v in unsup.values())
    with pytest.raises(ValueError):
        combine_losses({}, {}, 4.0)


def test_combine_losses_weight_zero_leaves_the_supervised_gradient():
    """``unsup_weight=0`` (the ``labeled_only`` ablation row): the unsupervised terms are computed
    and logged as 0, and nothing of them reaches the parameters."""
    w = torch.tensor([0.5, -2.0], requires_grad=True)
    sup = {"loss_classifier": (w ** 2).sum()}                       # d/dw = 2w = (1, -4)
    unsup = {"loss_classifier": (3.0 * w).sum(), "loss_box_reg": w.abs().sum()}
    total, logged = combine_losses(sup, unsup, alpha=0.0)
    assert total.item() == 4.25
    assert logged["unsup/loss_classifier"].item() == 0.0 and logged["unsup/loss_box_reg"].item() == 0.0
    total.backward()
    assert w.grad.tolist() == [1.0, -4.0]


@pytest.mark.gpu
def test_jitter_and_loss_on_cuda():
    device = torch.device("cuda")
    g = torch.Generator(device=device)
    g.manual_seed(0)
    boxes = torch.tensor([[10.0, 10, 60, 80], [0, 0, 30, 30]], device=device)
    rels = box_jitter_reliability([boxes, boxes[:0]], [torch.tensor([1, 2], device=device),
                                                        torch.zeros(0, dtype=torch.long,
                                                                    device=device)],
                                  lambda b, lab: b, times=10, generator=g)
    assert rels[0].device.type == "cuda" and rels[0].shape == (2,) and rels[1].shape == (0,)
    assert ((rels[0] > 0.01) & (rels[0] < 0.15)).all()
    logits, targets, bg_weights = (t.detach().to(device) for t in _four_rois())
    logits.requires_grad_()
    r = background_weights("bg_teacher", teacher_logits=logits[2:])
    w = bg_weights.clone()
    w[2:] = r
    loss = soft_weighted_cls_loss(logits, targets, w)
    loss.backward()
    expected = (math.log(5 / 3) + L3 + 0.5 * L2 + 0.2 * math.log(5)) / 2.7
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert logits.grad.device.type == "cuda"
