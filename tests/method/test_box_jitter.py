import math

import pytest
import torch

from softteacher.method.box_jitter import box_jitter_reliability, jitter_boxes, jitter_reliability


def _gen(seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _boxes(n: int, seed: int = 0) -> torch.Tensor:
    """n boxes with widths and heights between 20 and 200 px."""
    g = _gen(seed)
    xy = torch.rand(n, 2, generator=g) * 300
    wh = 20 + torch.rand(n, 2, generator=g) * 180
    return torch.cat([xy, xy + wh], dim=1)


def _c4(j: int) -> float:
    """E[unbiased sample std] / sigma for j Gaussian samples."""
    return math.sqrt(2 / (j - 1)) * math.exp(math.lgamma(j / 2) - math.lgamma((j - 1) / 2))


def test_shapes_and_empty():
    out = jitter_boxes(_boxes(3), times=10, generator=_gen())
    assert out.shape == (3, 10, 4) and out.dtype == torch.float32
    assert jitter_boxes(torch.zeros(0, 4), times=7).shape == (0, 7, 4)
    assert jitter_reliability(torch.zeros(0, 10, 4)).shape == (0,)


def test_gaussian_offsets_have_std_scale_times_size():
    boxes = _boxes(400)
    out = jitter_boxes(boxes, times=50, scale=0.06, generator=_gen(1))
    wh = boxes[:, 2:] - boxes[:, :2]
    rel = (out - boxes[:, None]) / torch.cat([wh, wh], 1)[:, None]  # (N, J, 4) in units of size
    assert rel.mean().abs() < 2e-3
    for k in range(4):  # 20000 draws per coordinate: std within ~1%
        assert rel[..., k].std().item() == pytest.approx(0.06, rel=0.03)


def test_uniform_offsets_bounded_by_six_percent():
    boxes = torch.cat([_boxes(200), torch.tensor([[5.0, 5.0, 5.5, 5.2]])])  # last: w, h < 1 px
    out = jitter_boxes(boxes, times=50, scale=0.06, noise="uniform", generator=_gen(2))
    size = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1)
    size = torch.cat([size, size], 1)[:, None]
    rel = (out - boxes[:, None]) / size
    assert rel.abs().max() <= 0.06 + 1e-6
    assert rel.abs().max() > 0.059  # the range is used
    assert rel.std().item() == pytest.approx(0.06 / math.sqrt(3), rel=0.03)
    tiny = out[-1] - boxes[-1]  # clamped to 1 px: offsets within +-0.06 px
    assert tiny.abs().max() <= 0.06 + 1e-6


def test_small_boxes_use_one_pixel():
    boxes = torch.tensor([[10.0, 10.0, 10.0, 10.2]])  # width 0, height 0.2
    out = jitter_boxes(boxes, times=2000, scale=0.06, generator=_gen(3))
    assert (out - boxes[:, None]).std(dim=1).squeeze(0).tolist() == pytest.approx([0.06] * 4,
                                                                                  rel=0.1)


def test_seeded_determinism():
    boxes = _boxes(5)
    a = jitter_boxes(boxes, generator=_gen(7))
    b = jitter_boxes(boxes, generator=_gen(7))
    c = jitter_boxes(boxes, generator=_gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_arguments():
    with pytest.raises(ValueError, match="known: gaussian, uniform"):
        jitter_boxes(_boxes(1), noise="laplace")
    with pytest.raises(ValueError):
        jitter_boxes(torch.zeros(4))
    with pytest.raises(TypeError):
        jitter_boxes(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError):
        jitter_reliability(torch.zeros(2, 1, 4))  # one copy: no unbiased std


def test_reliability_two_copies_by_hand():
    refined = torch.tensor([[[0.0, 0, 10, 10], [2, 0, 12, 10]]])
    # x1: 0, 2 -> unbiased std sqrt(2); x2 likewise; y1, y2 constant -> 0.
    # Mean box [1, 0, 11, 10]: w = h = 10.  (sqrt2/10 + 0 + sqrt2/10 + 0) / 4 = sqrt2/20.
    assert jitter_reliability(refined).item() == pytest.approx(math.sqrt(2) / 20, rel=1e-6)


def test_reliability_divides_by_the_mean_refined_size():
    refined = torch.tensor([[[0.0, 0, 10, 10], [0, 0, 30, 10]]])  # widths 10 and 30
    # x2: 10, 30 -> std sqrt(200); the rest constant. Mean box [0, 0, 20, 10]: w 20 (10 or 30
    # for either copy alone). (sqrt(200) / 20) / 4 = 0.1768.
    assert jitter_reliability(refined).item() == pytest.approx(math.sqrt(200) / 80, rel=1e-6)


def test_reliability_three_copies_by_hand():
    refined = torch.tensor([[[0.0, 0, 10, 10], [2, 0, 12, 10], [4, 3, 14, 13]],
                            [[5.0, 5, 5.5, 5.5], [5.2, 5, 5.7, 5.5], [5.1, 5, 5.6, 5.5]]])
    # Box 0: x1 0,2,4 -> std 2; x2 10,12,14 -> 2; y1 0,0,3 -> mean 1, var (1+1+4)/2 = 3 -> sqrt3;
    # y2 10,10,13 -> sqrt3.  Mean box [2, 1, 12, 11]: w = h = 10.  (2+2+2 sqrt3)/40 = (2+sqrt3)/20.
    # Box 1: x1 5,5.2,5.1 and x2 5.5,5.7,5.6 -> std 0.1; y's constant.  Mean width 0.5 -> clamp 1.
    # (0.1 + 0 + 0.1 + 0) / 4 = 0.05.
    rel = jitter_reliability(refined)
    assert rel.tolist() == pytest.approx([(2 + math.sqrt(3)) / 20, 0.05], rel=1e-5)


def test_identity_refine_gives_scale_times_c4():
    """With refined = jittered, each coordinate's std / size estimates 0.06 (Gaussian).

    The unbiased std of J samples has mean c4(J) * sigma (c4(10) = 0.9727), and x_i's sample std
    is independent of the mean width (Gaussian sample mean and std are independent), whose
    reciprocal has mean ~1 + 2 scale^2 / J.  So E[reliability] = 0.06 * c4(J) * (1 + 2*0.06^2/J)
    = 0.05840 for J = 10; the per-box spread is ~0.007, so 2000 boxes give a standard error
    of ~1.6e-4.
    """
    boxes = _boxes(2000)
    [rel] = box_jitter_reliability([boxes], [torch.ones(2000, dtype=torch.long)],
                                   lambda b, lab: b, times=10, scale=0.06, generator=_gen(4))
    expected = 0.06 * _c4(10) * (1 + 2 * 0.06**2 / 10)
    assert rel.mean().item() == pytest.approx(expected, abs=6e-4)
    # Many jitters: c4 -> 1 and the estimate -> 0.06.
    [rel] = box_jitter_reliability([boxes[:8]], [torch.ones(8, dtype=torch.long)],
                                   lambda b, lab: b, times=4000, scale=0.06, generator=_gen(5))
    assert rel.mean().item() == pytest.approx(0.06, abs=1e-3)


def test_fixed_box_refine_gives_exactly_zero():
    def refine(boxes, labels):
        return [torch.tensor([3.0, 4.0, 50.0, 60.0]).expand(len(b), 4).clone() for b in boxes]

    rels = box_jitter_reliability([_boxes(3), _boxes(2, seed=1)],
                                  [torch.tensor([1, 2, 3]), torch.tensor([4, 5])], refine,
                                  generator=_gen(6))
    assert [r.tolist() for r in rels] == [[0.0, 0.0, 0.0], [0.0, 0.0]]


def test_refine_called_once_with_box_major_copies():
    calls = []

    def refine(boxes, labels):
        calls.append(([b.clone() for b in boxes], [lab.clone() for lab in labels]))
        return boxes

    boxes = [_boxes(2), torch.zeros(0, 4), _boxes(1, seed=2)]
    labels = [torch.tensor([3, 7]), torch.zeros(0, dtype=torch.long), torch.tensor([2])]
    rels = box_jitter_reliability(boxes, labels, refine, times=3, generator=_gen(9))
    assert len(calls) == 1
    sent_boxes, sent_labels = calls[0]
    assert [tuple(b.shape) for b in sent_boxes] == [(6, 4), (0, 4), (3, 4)]
    assert [lab.tolist() for lab in sent_labels] == [[3, 3, 3, 7, 7, 7], [], [2, 2, 2]]
    # Copies of box k are rows 3k..3k+2, each within 40% of that box's size (~7 sigma) of it.
    size = boxes[0][:, 2:] - boxes[0][:, :2]
    off = (sent_boxes[0].reshape(2, 3, 4) - boxes[0][:, None]) / size.repeat(1, 2)[:, None]
    assert off.abs().max() < 0.4
    assert [tuple(r.shape) for r in rels] == [(2,), (0,), (1,)]


def test_all_empty_does_not_call_refine():
    def refine(boxes, labels):
        raise AssertionError("refine must not be called")

    rels = box_jitter_reliability([torch.zeros(0, 4)] * 2, [torch.zeros(0, dtype=torch.long)] * 2,
                                  refine)
    assert [tuple(r.shape) for r in rels] == [(0,), (0,)]
    assert box_jitter_reliability([], [], refine) == []


def test_refine_contract_violations_raise():
    boxes, labels = [_boxes(2)], [torch.tensor([1, 1])]
    with pytest.raises(ValueError, match="refine returned"):
        box_jitter_reliability(boxes, labels, lambda b, lab: [x[:-1] for x in b])
    with pytest.raises(ValueError, match="labels"):
        box_jitter_reliability(boxes, [torch.tensor([1])], lambda b, lab: b)


def test_seeded_reliability_is_deterministic_and_detached():
    boxes = _boxes(4).requires_grad_()
    labels = [torch.ones(4, dtype=torch.long)]
    a = box_jitter_reliability([boxes], labels, lambda b, lab: b, generator=_gen(11))[0]
    b = box_jitter_reliability([boxes], labels, lambda b, lab: b, generator=_gen(11))[0]
    assert torch.equal(a, b) and not a.requires_grad
