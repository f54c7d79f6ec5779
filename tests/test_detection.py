import copy

import pytest
import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import box_iou

from softteacher.config import preset_tiny
from softteacher.detection import (
    BatchedRoIHeads,
    BatchedRPN,
    LeanBoxCoder,
    balanced_sample,
    batched_box_iou,
    fastrcnn_losses,
    match,
    nms_per_image,
    pad_ground_truth,
    pad_rows,
    padding_rows,
)
from softteacher.model import build_detector


def _boxes(n: int, g: torch.Generator, size: float = 100.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * 40 + 1
    return torch.cat([xy, xy + wh], dim=1)


def _torchvision_parts(model):
    """A copy of ``model`` whose RPN and RoI heads run torchvision's own per-image code."""
    ref = copy.deepcopy(model)
    ref.rpn.__class__ = RegionProposalNetwork
    s = model.rpn.fg_bg_sampler
    ref.rpn.fg_bg_sampler = BalancedPositiveNegativeSampler(s.batch_size_per_image, s.positive_fraction)
    ref.roi_heads.__class__ = RoIHeads
    return ref


def _scene(n_images=4, gt_counts=(3, 2, 0, 5)):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 120 + 13 * i, 160 - 7 * i, generator=g) for i in range(n_images)]
    targets = [{"boxes": _boxes(k, g), "labels": torch.randint(1, 4, (k,), generator=g)} for k in gt_counts]
    return images, targets


def test_batched_iou_is_torchvisions_to_the_last_bit():
    g = torch.Generator().manual_seed(0)
    gt = [_boxes(3, g), _boxes(1, g)]
    gt[0][1] = torch.tensor([5.0, 5.0, 5.0, 9.0])  # zero width
    boxes = torch.stack([_boxes(50, g), _boxes(50, g)])
    iou = batched_box_iou(pad_ground_truth(gt)[0], boxes)
    assert iou.shape == (2, 3, 50)
    for i in range(2):
        assert torch.equal(iou[i, : len(gt[i])], box_iou(gt[i], boxes[i]))
    shared = batched_box_iou(pad_ground_truth(gt)[0], boxes[0])  # anchors shared by the images
    assert torch.equal(shared[1, :1], box_iou(gt[1], boxes[0]))
    # a hand-computed pair: 10x10 boxes overlapping by 5x10 -> 50 / 150
    one = batched_box_iou(torch.tensor([[[0.0, 0, 10, 10]]]), torch.tensor([[5.0, 0, 15, 10]]))
    assert one.item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("low_quality", [False, True])
def test_match_is_torchvisions_matcher_per_image(low_quality):
    g = torch.Generator().manual_seed(1)
    gt = [_boxes(4, g), _boxes(0, g), _boxes(2, g)]
    # the last object of image 0 has no box above the high threshold: its best is a copy
    # moved right by 20 % of its width, IoU 0.8 / 1.2
    width = gt[0][3, 2] - gt[0][3, 0]
    moved = gt[0][3:] + torch.stack([0.2 * width, torch.tensor(0.0), 0.2 * width, torch.tensor(0.0)])
    boxes = torch.cat([_boxes(300, g), gt[0][:3] + 0.5, moved, gt[2]])  # some above the high threshold
    k = 303
    iou_k = box_iou(gt[0][3:], boxes)[0]
    assert iou_k.argmax() == k and iou_k[k].item() == pytest.approx(0.8 / 1.2, abs=1e-5)
    padded, valid, _ = pad_ground_truth(gt)
    matches = match(batched_box_iou(padded, boxes), valid, 0.7, 0.3, low_quality)
    matcher = Matcher(0.7, 0.3, allow_low_quality_matches=low_quality)
    assert torch.equal(matches[0], matcher(box_iou(gt[0], boxes)))
    assert torch.equal(matches[2], matcher(box_iou(gt[2], boxes)))
    assert (matches[1] == -1).all()  # no ground truth: everything below the low threshold
    assert (matches == -2).any() and (matches >= 0).any()
    # its best box is matched to it only when low-quality matches are allowed (between thresholds)
    assert matches[0, k].item() == (3 if low_quality else -2)


def test_balanced_sample_takes_torchvisions_counts_uniformly():
    # per row: 5 positives / 20 negatives; 1 positive / 3 negatives / ignored; only ignored
    labels = torch.full((3, 30), -1)
    labels[0, :5], labels[0, 5:25] = 2, 0
    labels[1, 7], labels[1, 10:13] = 1, 0
    torch.manual_seed(0)
    pos, neg = balanced_sample(labels, batch_size_per_image=8, positive_fraction=0.25)
    # int(8 * 0.25) = 2 positives, 6 negatives; 1 positive then min(3, 7) negatives; nothing
    assert pos.sum(1).tolist() == [2, 1, 0] and neg.sum(1).tolist() == [6, 3, 0]
    assert (labels[pos] >= 1).all() and (labels[neg] == 0).all()
    # every positive of row 0 is drawn with probability 2/5, every negative with 6/20
    hits_pos, hits_neg = torch.zeros(5), torch.zeros(20)
    for _ in range(2000):
        p, n = balanced_sample(labels[:1], 8, 0.25)
        hits_pos += p[0, :5]
        hits_neg += n[0, 5:25]
    assert torch.allclose(hits_pos / 2000, torch.full((5,), 0.4), atol=0.04)
    assert torch.allclose(hits_neg / 2000, torch.full((20,), 0.3), atol=0.04)


def test_nms_per_image_suppresses_within_an_image_and_group_and_keeps_the_top_k():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10],  # image 0
                          [0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 10]])  # image 1
    scores = torch.tensor([0.6, 0.9, 0.5, 0.8, 0.7, 0.4])
    groups = torch.tensor([0, 0, 1, 0, 0, 0])
    # image 0: row 1 (IoU 9/11 with row 0) suppresses row 0; row 2 is alone in its group
    # image 1: row 3 suppresses row 5 (same box); k = 2 keeps rows 3 and 4 by score
    kept, counts = nms_per_image(boxes, scores, groups, [3, 3], iou_threshold=0.5, k=2)
    assert kept.tolist() == [1, 2, 3, 4] and counts == [2, 2]
    kept, counts = nms_per_image(boxes, scores, groups, [3, 3], iou_threshold=0.5, k=1)
    assert kept.tolist() == [1, 3] and counts == [1, 1]
    kept, counts = nms_per_image(boxes[3:], scores[3:], groups[3:], [0, 3], iou_threshold=0.5, k=5)
    assert kept.tolist() == [0, 1] and counts == [0, 2]


def test_nms_per_image_over_threads_keeps_what_one_thread_keeps():
    g = torch.Generator().manual_seed(4)
    counts = [700, 0, 1500, 300]  # 1,500 rows: torchvision's per-group loop on the CPU
    boxes = _boxes(sum(counts), g, size=200)
    scores = torch.rand(sum(counts), generator=g)
    groups = torch.randint(0, 5, (sum(counts),), generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = nms_per_image(boxes, scores, groups, counts, iou_threshold=0.7, k=200)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 scores, as from an RPN head
            want_bf16 = nms_per_image(boxes, scores.bfloat16(), groups, counts, 0.7, 200)
        torch.set_num_threads(3)
        got = nms_per_image(boxes, scores, groups, counts, iou_threshold=0.7, k=200)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got_bf16 = nms_per_image(boxes, scores.bfloat16(), groups, counts, 0.7, 200)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got[0], want[0]) and got[1] == want[1] == [200, 0, 200, 200]
    assert torch.equal(got_bf16[0], want_bf16[0]) and got_bf16[1] == want_bf16[1]
    assert got[0][:200].max() < 700 and got[0][200:400].min() >= 700  # image after image


def test_padding_puts_each_images_rows_first_and_zeros_after():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    c = torch.tensor([[5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0]])
    empty = torch.zeros(0, 4)
    assert padding_rows([1, 0, 2], 2, torch.device("cpu")).tolist() == [0, 4, 5]
    assert padding_rows([2, 3], 4, torch.device("cpu")).tolist() == [0, 1, 4, 5, 6]
    labels = [torch.tensor([3]), torch.zeros(0, dtype=torch.int64), torch.tensor([1, 2])]
    boxes, valid, labels = pad_ground_truth([a, empty, c], labels)
    assert boxes.tolist() == [[[1, 2, 3, 4], [0, 0, 0, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]],
                              [[5, 6, 7, 8], [9, 10, 11, 12]]]
    assert valid.tolist() == [[True, False], [False, False], [True, True]]
    assert labels.tolist() == [[3, 0], [0, 0], [1, 2]] and labels.dtype == torch.int64
    boxes, valid, labels = pad_ground_truth([empty, empty])  # G >= 1: one invalid zero row each
    assert boxes.shape == (2, 1, 4) and not boxes.any() and not valid.any() and labels is None
    scores = pad_rows([torch.tensor([0.5]), torch.tensor([0.25, 0.75])], 3)  # wider than any block
    assert scores.tolist() == [[0.5, 0, 0], [0.25, 0.75, 0]]
    assert pad_rows([empty, empty], 0).shape == (2, 0, 4)


def test_rpn_targets_are_torchvisions_with_shared_or_separate_anchors():
    model = build_detector(preset_tiny().model, num_classes=3).train()
    assert isinstance(model.rpn, BatchedRPN) and isinstance(model.roi_heads, BatchedRoIHeads)
    g = torch.Generator().manual_seed(2)
    anchors = _boxes(400, g, size=120)
    targets = [{"boxes": _boxes(k, g), "labels": torch.ones(k, dtype=torch.int64)} for k in (3, 0, 6)]
    for grids, max_elements in (([anchors] * 3, 2**24), ([anchors.clone() for _ in range(3)], 2**24),
                                ([anchors] * 3, 6 * 400)):  # the last one image at a time
        model.rpn.max_iou_elements = max_elements
        labels, matched = model.rpn.assign_targets_to_anchors(grids, targets)
        ref_labels, ref_matched = RegionProposalNetwork.assign_targets_to_anchors(model.rpn, grids, targets)
        for a, b in zip(labels + matched, ref_labels + ref_matched):
            assert a.dtype == b.dtype and torch.equal(a, b)
    assert (labels[1] == 0).all() and (labels[2] == 1).any() and (labels[2] == -1).any()


def test_roi_samples_are_torchvisions_when_all_are_kept_and_sized_like_torchvisions_otherwise():
    model = build_detector(preset_tiny().model, num_classes=3).train()
    heads = model.roi_heads
    g = torch.Generator().manual_seed(3)
    proposals = [_boxes(n, g) for n in (60, 0, 40, 90)]
    targets = [{"boxes": _boxes(k, g), "labels": torch.randint(1, 4, (k,), generator=g)}
               for k in (3, 2, 0, 5)]
    ref = RoIHeads.select_training_samples
    every = copy.copy(heads)
    every.fg_bg_sampler = BalancedPositiveNegativeSampler(10**6, 0.25)
    ours = every.select_training_samples([p.clone() for p in proposals], targets)
    theirs = ref(every, [p.clone() for p in proposals], targets)
    for a_list, b_list in zip(ours, theirs):
        for a, b in zip(a_list, b_list):
            assert a.dtype == b.dtype and torch.equal(a, b)
    # sampled: torchvision's counts per image, rows of the full assignment
    heads.fg_bg_sampler = BalancedPositiveNegativeSampler(16, 0.25)
    props, matched, labels, regression = heads.select_training_samples([p.clone() for p in proposals],
                                                                       targets)
    for i, lab in enumerate(theirs[2]):
        n_pos, n_neg = int((lab >= 1).sum()), int((lab == 0).sum())
        want_pos = min(n_pos, 4)
        assert int((labels[i] >= 1).sum()) == want_pos
        assert int((labels[i] == 0).sum()) == min(n_neg, 16 - want_pos)
        rows = {tuple(r.tolist()): (int(m), int(lb), t) for r, m, lb, t in
                zip(theirs[0][i], theirs[1][i], lab, theirs[3][i])}
        for r, m, lb, t in zip(props[i], matched[i], labels[i], regression[i]):
            m_ref, lb_ref, t_ref = rows[tuple(r.tolist())]
            assert (int(m), int(lb)) == (m_ref, lb_ref) and torch.equal(t, t_ref)


@pytest.fixture
def exact_float32():
    """Float32 arithmetic and fixed-order kernels on CUDA (the CPU has both already).

    TensorFloat-32 rounds the inputs of convolutions and products to 10 bits, which turns a
    last-bit difference between two gradients into one of about 1e-3 in a product, and cuDNN's
    fastest weight gradients add in an order that changes from call to call."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
            yield
    finally:
        torch.set_float32_matmul_precision(precision)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_detector_outputs_and_losses_are_torchvisions(device, exact_float32):
    torch.manual_seed(0)
    model = build_detector(preset_tiny().model, num_classes=3).to(device)
    ref = _torchvision_parts(model)
    images, targets = _scene()
    images = [im.to(device) for im in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    model.eval(), ref.eval()
    found = {}
    with torch.no_grad():
        for threshold in (0.0, 0.05, 0.3, 0.99):
            model.roi_heads.score_thresh = ref.roi_heads.score_thresh = threshold
            ours, theirs = model(images), ref(images)
            for a, b in zip(ours, theirs):
                assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores)
                assert torch.equal(a.labels, b.labels)
            found[threshold] = [len(d.boxes) for d in ours]
    assert min(found[0.0]) > 0 and max(found[0.99]) == 0  # full images and empty ones
    # training: with every anchor and proposal sampled the RoI classification loss is equal to the
    # last bit; both box terms sum over all sampled rows (zero where not positive), and the
    # objectness mean is taken over another layout of the same anchors, so those are equal up to the
    # order of a float sum (which the CPU's vector width changes: AVX2 against AVX-512)
    model.train(), ref.train()
    for m in (model, ref):
        m.rpn.fg_bg_sampler.batch_size_per_image = 10**7
        m.roi_heads.fg_bg_sampler = BalancedPositiveNegativeSampler(10**7, 0.25)
    ours, theirs = model(images, targets), ref(images, targets)
    assert ours.keys() == theirs.keys()
    for k in ours:
        if k in ("loss_box_reg", "loss_rpn_box_reg", "loss_objectness"):
            torch.testing.assert_close(ours[k], theirs[k], rtol=1e-6, atol=0)
        else:
            assert torch.equal(ours[k], theirs[k]), k
    sum(ours.values()).backward()
    sum(theirs.values()).backward()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        if a.grad is not None or b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_grouped_rpn_gives_each_group_the_losses_of_its_images_alone():
    torch.manual_seed(0)
    model = build_detector(preset_tiny().model, num_classes=3).train()
    model.rpn.fg_bg_sampler.batch_size_per_image = 10**7  # every anchor sampled: no randomness
    images, targets = _scene(5, (3, 2, 0, 5, 1))
    groups = [1, 0, 2, 1, 0]  # group 2: the image without ground truth, alone
    batch = model.preprocess(images)
    features = model.features(batch)
    proposals, objectness, box = model.rpn.forward_grouped(batch, features, targets, groups)
    assert objectness.shape == box.shape == (3,)
    assert box.detach()[2] == 0.0 and torch.isfinite(objectness).all()  # no positives, no box loss
    whole, _ = model.rpn(batch, features, targets)
    for a, b in zip(proposals, whole):
        assert torch.equal(a, b)
    for k in range(3):
        rows = [i for i, g in enumerate(groups) if g == k]
        sub = ImageList(batch.tensors[rows], [batch.image_sizes[i] for i in rows])
        _, alone = model.rpn(sub, {name: f[rows] for name, f in features.items()}, [targets[i] for i in rows])
        torch.testing.assert_close(objectness[k], alone["loss_objectness"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(box[k], alone["loss_rpn_box_reg"], rtol=1e-5, atol=1e-7)
    (objectness.sum() + box.sum()).backward()
    grads = [p.grad for p in model.rpn.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_grouped_rpn_normalises_each_group_by_its_own_sampled_anchors():
    # 256 anchors sampled per image: a group of two images divides by 512, a group of one by 256
    torch.manual_seed(0)
    model = build_detector(preset_tiny().model, num_classes=3).train()
    images, targets = _scene(3, (0, 0, 0))  # no ground truth: every sampled anchor is a negative
    batch = model.preprocess(images)
    features = model.features(batch)
    _, objectness, box = model.rpn.forward_grouped(batch, features, targets, [0, 0, 1])
    logits = torch.cat([o.flatten(1) for o in model.rpn.head(list(features.values()))[0]], 1)  # (B, A)
    assert logits.shape[1] > 256 and torch.equal(box, torch.zeros(2))
    # negative anchors: BCE(x, 0) = softplus(x); the group's loss lies between its smallest and largest
    # mean over 256 anchors of an image, and within the range of the softplus of its logits
    per_anchor = torch.nn.functional.softplus(logits.detach())
    for k, rows in ((0, [0, 1]), (1, [2])):
        lo, hi = per_anchor[rows].min(), per_anchor[rows].max()
        assert lo <= objectness[k] <= hi
    # with every anchor sampled, the mean over all the group's anchors, by hand
    model.rpn.fg_bg_sampler.batch_size_per_image = 10**7
    _, objectness, _ = model.rpn.forward_grouped(batch, features, targets, [0, 0, 1])
    torch.testing.assert_close(objectness, torch.stack([per_anchor[:2].mean(), per_anchor[2].mean()]))


def test_flat_fastrcnn_losses_are_torchvisions_without_reading_positive_rows():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(30, 4, generator=g, requires_grad=True)
    regression = torch.randn(30, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 4, (30,), generator=g)
    targets = torch.randn(30, 4, generator=g)
    targets[labels == 0] = float("-inf")  # negatives of an image without ground truth
    ours = fastrcnn_losses(logits, regression, labels, targets)
    theirs = fastrcnn_loss(logits, regression, [labels[:12], labels[12:]], [targets[:12], targets[12:]])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    grads = torch.autograd.grad(sum(ours), (logits, regression))
    want = torch.autograd.grad(sum(theirs), (logits, regression))
    for a, b in zip(grads, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)
    # by hand: one positive row of class 1 off by 1 in x1 (smooth L1, beta 1/9: 1 - 1/18), R = 2
    regression = torch.zeros(2, 8)
    regression[0, 4] = 1.0
    _, box = fastrcnn_losses(torch.zeros(2, 2), regression, torch.tensor([1, 0]), torch.zeros(2, 4))
    assert box.item() == pytest.approx((1 - 1 / 18) / 2)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (10.0, 20.0, 5.0, 4.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_box_coder_is_torchvisions_to_the_last_bit(weights, dtype):
    g = torch.Generator().manual_seed(4)
    ours, theirs = LeanBoxCoder(weights), BoxCoder(weights)
    boxes, gt = _boxes(30, g), _boxes(30, g)
    assert torch.equal(ours.encode_single(gt, boxes), theirs.encode_single(gt, boxes))
    codes = (torch.randn(30, 4 * 3, generator=g) * 3).to(dtype)  # three classes, some past the clip
    # bf16 codes (a head under autocast) decode in float32: torchvision's arithmetic on the same codes
    got, want = ours.decode_single(codes, boxes), theirs.decode_single(codes.float(), boxes)
    assert got.dtype == want.dtype == torch.float32 and got.shape == (30, 12) and torch.equal(got, want)
    empty = ours.decode(torch.zeros(0, 8, dtype=dtype), [torch.zeros(0, 4)])
    assert empty.shape == theirs.decode(torch.zeros(0, 8, dtype=dtype), [torch.zeros(0, 4)]).shape
    # a hand-computed pair: a 10x20 box at (0, 0) and its ground truth shifted by (1, 2), 1.5x wider
    box, target = torch.tensor([[0.0, 0.0, 10.0, 20.0]]), torch.tensor([[-1.5, 2.0, 13.5, 22.0]])
    code = LeanBoxCoder((1.0, 1.0, 1.0, 1.0)).encode_single(target, box)
    torch.testing.assert_close(code, torch.tensor([[0.1, 0.1, 0.4054651, 0.0]]))
    torch.testing.assert_close(LeanBoxCoder((1.0, 1.0, 1.0, 1.0)).decode_single(code, box), target)


def test_bfloat16_boxes_encode_in_float32_as_they_decode():
    box = torch.tensor([[1001.3, 600.7, 1101.9, 700.2]])
    target = torch.tensor([[1003.1, 598.2, 1110.6, 702.9]])
    coder = LeanBoxCoder((10.0, 10.0, 5.0, 5.0))
    code = coder.encode_single(target.bfloat16(), box)
    assert code.dtype == torch.float32
    torch.testing.assert_close(code, coder.encode_single(target.bfloat16().float(), box), rtol=0, atol=0)


def test_a_batch_without_proposals_detects_nothing():
    torch.manual_seed(0)
    heads = build_detector(preset_tiny().model, num_classes=3).roi_heads
    logits, deltas = torch.zeros(0, 4), torch.zeros(0, 16)
    boxes, scores, labels = heads.postprocess_detections(logits, deltas, [torch.zeros(0, 4)] * 2,
                                                         [(64, 64), (48, 80)])
    assert [b.shape for b in boxes] == [(0, 4)] * 2 and [s.shape for s in scores] == [(0,)] * 2
    assert [lb.dtype for lb in labels] == [torch.int64] * 2 and [len(lb) for lb in labels] == [0, 0]


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 20.0, 5.0, 4.0)])
def test_box_decoding_under_bfloat16_autocast_keeps_the_pixel(weights):
    # bf16 keeps 8 significant bits: 1001.3 would come back as 1000 (and 1101.9 as 1104)
    box = torch.tensor([[1001.3, 600.7, 1101.9, 700.2]])
    head = torch.nn.Linear(3, 4 * 2)
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)  # zero deltas: the box itself
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = head(torch.ones(1, 3))
        assert codes.dtype == torch.bfloat16
        decoded = LeanBoxCoder(weights).decode(codes, [box])
    assert decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, box.expand(2, 4)[None], rtol=0, atol=1e-4)
