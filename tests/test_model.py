import pytest
import torch
import torchvision

from softteacher.config import preset_tiny
from softteacher.model import build_detector, load_state_file, resolve_channels_last, resolve_norm

from .conftest import count_cuda_waits


def _tiny(**changes):
    cfg = preset_tiny().model
    for k, v in changes.items():
        setattr(cfg, k, v)
    return cfg


def _batch(n=2, size=(96, 128)):
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, *size), generator=g, dtype=torch.uint8) for _ in range(n)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0], [60.0, 20.0, 100.0, 70.0]]),
                "labels": torch.tensor([1, 2])} for _ in range(n)]
    targets[-1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    return images, targets


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3"])
def test_factory_heads_match_class_count(backbone):
    torch.manual_seed(0)
    model = build_detector(_tiny(backbone=backbone), num_classes=6)
    assert model.roi_heads.box_predictor.cls_score.out_features == 7  # 6 + background
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 28
    # ResNet FPN: one of the 5 sizes per level (5 levels) x 3 ratios; MobileNet: its 4 maps
    # (3 and the pooled one) each take all 5 sizes x 3 ratios, as torchvision's MobileNet FPN
    expected = {"resnet18": [3] * 5, "mobilenet_v3": [15] * 4}[backbone]
    assert model.rpn.anchor_generator.num_anchors_per_location() == expected
    model.eval()
    with torch.no_grad():
        out = model([torch.zeros(3, 96, 128, dtype=torch.uint8), torch.zeros(3, 64, 80, dtype=torch.uint8)])
    assert len(out) == 2
    for o in out:
        assert o.boxes.shape[1] == 4 and o.boxes.shape[0] == o.scores.shape[0] == o.labels.shape[0]
        assert (o.labels >= 1).all() and (o.labels <= 6).all()


def test_five_anchor_sizes_three_ratios_on_resnet():
    model = build_detector(_tiny(), num_classes=3)
    gen = model.rpn.anchor_generator
    assert len(gen.sizes) == 5 and all(len(r) == 3 for r in gen.aspect_ratios)


def test_norm_is_frozen_bn_with_pretrained_backbone(tmp_path):
    assert resolve_norm(_tiny()) == "gn"
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    cfg = _tiny(backbone_weights=str(weights), trainable_layers=3)
    assert resolve_norm(cfg) == "frozen_bn"
    model = build_detector(cfg, num_classes=2)
    body = model.backbone.body
    assert not body.conv1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad
    ref = torch.load(weights, weights_only=True)
    assert torch.equal(body.layer3[0].conv1.weight, ref["layer3.0.conv1.weight"])


def test_frozen_layers_keep_their_batchnorm_statistics_and_scratch_trains_every_layer(tmp_path):
    from torchvision.ops.misc import FrozenBatchNorm2d

    weights = tmp_path / "r18.pth"
    r18 = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for m in r18.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    torch.save(r18.state_dict(), weights)
    model = build_detector(_tiny(backbone_weights=str(weights), norm="bn", trainable_layers=3), num_classes=2)
    body = model.backbone.body
    # the stem and layer1 are frozen: their norms too, with the file's statistics
    assert isinstance(body.bn1, FrozenBatchNorm2d) and isinstance(body.layer1[0].bn2, FrozenBatchNorm2d)
    assert isinstance(body.layer2[0].bn1, torch.nn.BatchNorm2d)  # trained: a BatchNorm
    assert torch.equal(body.bn1.running_var, r18.bn1.running_var)
    frozen = {k: v.clone() for k, v in body.state_dict().items() if k.startswith(("bn1.", "layer1."))}
    model.train()
    images, targets = _batch()
    model(images, targets)
    assert all(torch.equal(body.state_dict()[k], v) for k, v in frozen.items())
    assert not torch.equal(body.layer2[0].bn1.running_mean, r18.layer2[0].bn1.running_mean)  # moved
    # the file's keys load into it as into a BatchNorm (num_batches_tracked left aside)
    trained = model.state_dict()
    again = build_detector(_tiny(backbone_weights=str(weights), norm="bn", trainable_layers=3), num_classes=2,
                           load_weights=False)
    again.load_state_dict(trained)
    # from scratch every layer trains, a MobileNet's stem and first block among them
    scratch = build_detector(_tiny(backbone="mobilenet_v3"), num_classes=2)
    assert all(p.requires_grad for p in scratch.backbone.parameters())


def test_backbone_weights_of_another_architecture_are_refused(tmp_path):
    weights = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), weights)
    with pytest.raises(ValueError, match="r34.pth: backbone weights do not fit resnet18"):
        build_detector(_tiny(backbone_weights=str(weights)), num_classes=2)


def test_one_training_step_lowers_the_loss():
    torch.manual_seed(0)
    model = build_detector(_tiny(), num_classes=2)
    images, targets = _batch()
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    torch.manual_seed(1)
    before = sum(model(images, targets).values())
    losses = []
    for _ in range(3):
        torch.manual_seed(1)  # same RPN/RoI sampling every time
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    torch.manual_seed(1)
    after = sum(model(images, targets).values()).item()
    assert abs(losses[0] - before.item()) < 1e-5
    assert after < before.item()


def test_whole_detector_weights_round_trip_and_refusals(tmp_path):
    torch.manual_seed(0)
    model = build_detector(_tiny(), num_classes=2)
    path = tmp_path / "det.pt"
    torch.save({"model": model.state_dict()}, path)
    again = build_detector(_tiny(weights=str(path)), num_classes=2)
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    # another class count: predictor re-initialised, the rest loaded
    other = build_detector(_tiny(weights=str(path)), num_classes=5)
    assert torch.equal(other.backbone.body.conv1.weight, model.backbone.body.conv1.weight)
    assert other.roi_heads.box_predictor.cls_score.out_features == 6
    # another architecture is an error
    with pytest.raises(ValueError, match="det.pt: backbone.fpn"):
        build_detector(_tiny(weights=str(path), fpn_channels=16), num_classes=2)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="corrupt.pt: cannot read weights"):
        load_state_file(str(corrupt))
    with pytest.raises(FileNotFoundError, match="missing.pt: no such weights file"):
        load_state_file(str(tmp_path / "missing.pt"))


def test_whole_detector_weights_follow_the_classes_by_name(tmp_path, caplog):
    """A checkpoint trained for [bar, circle, square] loaded for [square, circle, bar] (the same
    data read as VOC, whose classes sort by name, and as COCO): each class keeps its own rows of
    the box predictor; a class the file lacks keeps its initial rows."""
    torch.manual_seed(0)
    model = build_detector(_tiny(), num_classes=3)
    path = tmp_path / "det.pt"
    names = ["bar", "circle", "square"]
    torch.save({"student": model.state_dict(), "teacher": model.state_dict(),
                "categories": [{"id": i, "name": n} for i, n in enumerate(names, start=1)]}, path)
    theirs = model.roi_heads.box_predictor
    caplog.set_level("INFO")
    again = build_detector(_tiny(weights=str(path)), num_classes=3, class_names=["square", "circle", "bar"])
    ours = again.roi_heads.box_predictor
    for i, j in enumerate([0, 3, 2, 1]):  # background, square, circle, bar
        assert torch.equal(ours.cls_score.weight[i], theirs.cls_score.weight[j])
        assert torch.equal(ours.cls_score.bias[i], theirs.cls_score.bias[j])
        assert torch.equal(ours.bbox_pred.weight[4 * i:4 * i + 4], theirs.bbox_pred.weight[4 * j:4 * j + 4])
        assert torch.equal(ours.bbox_pred.bias[4 * i:4 * i + 4], theirs.bbox_pred.bias[4 * j:4 * j + 4])
    assert torch.equal(again.backbone.body.conv1.weight, model.backbone.body.conv1.weight)
    assert "put in this data's class order by name (the file's: bar, circle, square)" in caplog.text
    # the same classes in the same order: loaded as they are
    same = build_detector(_tiny(weights=str(path)), num_classes=3, class_names=names)
    assert torch.equal(same.roi_heads.box_predictor.cls_score.weight, theirs.cls_score.weight)
    # a class the file lacks: its rows stay as initialised (seeded alike), the others follow names
    torch.manual_seed(1)
    fresh = build_detector(_tiny(), num_classes=3).roi_heads.box_predictor
    torch.manual_seed(1)
    part = build_detector(_tiny(weights=str(path)), num_classes=3,
                          class_names=["circle", "star", "bar"]).roi_heads.box_predictor
    assert torch.equal(part.cls_score.weight[1], theirs.cls_score.weight[2])
    assert torch.equal(part.cls_score.weight[2], fresh.cls_score.weight[2])
    assert torch.equal(part.bbox_pred.weight[8:12], fresh.bbox_pred.weight[8:12])
    assert torch.equal(part.cls_score.weight[3], theirs.cls_score.weight[1])
    assert "star keep(s) initial box predictor weights" in caplog.text
    # fewer and more classes than the file: resized, each class's rows still its own
    two = build_detector(_tiny(weights=str(path)), num_classes=2, class_names=["square", "bar"])
    p2 = two.roi_heads.box_predictor
    assert p2.cls_score.out_features == 3 and p2.bbox_pred.out_features == 12
    assert torch.equal(p2.cls_score.weight[1], theirs.cls_score.weight[3])
    assert torch.equal(p2.bbox_pred.bias[8:12], theirs.bbox_pred.bias[4:8])
    four = build_detector(_tiny(weights=str(path)), num_classes=4,
                          class_names=["bar", "circle", "square", "star"]).roi_heads.box_predictor
    assert torch.equal(four.cls_score.weight[:4], theirs.cls_score.weight)
    assert torch.equal(four.bbox_pred.weight[:16], theirs.bbox_pred.weight)
    caplog.clear()
    torch.manual_seed(2)
    fresh = build_detector(_tiny(), num_classes=2).roi_heads.box_predictor
    torch.manual_seed(2)
    none = build_detector(_tiny(weights=str(path)), num_classes=2,
                          class_names=["star", "cross"]).roi_heads.box_predictor
    assert torch.equal(none.cls_score.weight[1:], fresh.cls_score.weight[1:])
    assert torch.equal(none.cls_score.weight[0], theirs.cls_score.weight[0])  # background is background
    assert "trained for other classes (bar, circle, square); the box predictor's class rows " \
           "keep" in caplog.text


def test_weights_of_the_wrong_kind_say_which_setting_takes_them(tmp_path, monkeypatch):
    backbone = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), backbone)
    with pytest.raises(ValueError, match=r"r18.pth: no detector in it .* give them as --backbone-weights"):
        build_detector(_tiny(weights=str(backbone)), num_classes=2)
    with pytest.raises(ValueError, match=r"model.torchvision_weights 'bogus': "):
        build_detector(_tiny(torchvision_weights="bogus"), num_classes=2)

    def offline(self, *args, **kwargs):
        import urllib.error

        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(ValueError, match=r"model.torchvision_weights ResNet18_Weights.IMAGENET1K_V1: "
                                         r"cannot download \(.*Name or service not known.*\); without a "
                                         r"network, give a local copy"):
        build_detector(_tiny(torchvision_weights="ResNet18_Weights.IMAGENET1K_V1"), num_classes=2)


def test_downloaded_weights_are_read_as_tensors_alone_and_checked(monkeypatch):
    asked = []

    def cached(self, *args, **kwargs):  # what the hub cache holds, read as torchvision is asked
        asked.append(kwargs)
        return torchvision.models.resnet18(weights=None).state_dict()
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", cached)
    build_detector(_tiny(torchvision_weights="ResNet18_Weights.IMAGENET1K_V1"), num_classes=2)
    assert asked and asked[0]["weights_only"] is True and asked[0]["check_hash"] is True


def test_untrusted_pickle_is_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(ValueError, match="evil.pt: cannot read weights"):
        load_state_file(str(path))


def test_channels_last_model_computes_the_same_losses_in_nhwc_memory():
    torch.manual_seed(0)
    plain = build_detector(_tiny(), num_classes=3)
    nhwc = build_detector(_tiny(channels_last=True), num_classes=3)
    nhwc.load_state_dict(plain.state_dict())
    conv = next(m for m in nhwc.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    images, targets = _batch()
    x = nhwc.preprocess(images).tensors.contiguous(memory_format=torch.channels_last)
    assert all(f.is_contiguous(memory_format=torch.channels_last) and not f.is_contiguous()
               for f in nhwc.backbone(x).values())  # backbone and FPN convolve in NHWC
    # and the heads get them as they are
    assert all(f.is_contiguous(memory_format=torch.channels_last)
               for f in nhwc.features(nhwc.preprocess(images)).values())
    torch.manual_seed(1)
    want = plain(images, targets)
    torch.manual_seed(1)
    got = nhwc(images, targets)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)


def test_channels_last_auto_takes_nhwc_with_frozen_batchnorm_under_a_resnet():
    def nhwc(**changes):
        cfg = _tiny(**changes)
        model = build_detector(cfg, num_classes=3)
        conv = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) == resolve_channels_last(cfg)
        return model.channels_last

    assert _tiny().channels_last == "auto" and resolve_norm(_tiny()) == "gn"
    assert nhwc() is False  # GroupNorm (from scratch): NCHW
    assert nhwc(norm="frozen_bn") is True
    assert nhwc(norm="frozen_bn", channels_last="false") is False
    assert nhwc(channels_last="true") is True
    assert nhwc(norm="bn") is False
    assert resolve_channels_last(_tiny(norm="frozen_bn", backbone="mobilenet_v3")) is False
    assert resolve_channels_last(_tiny(channels_last=True)) is True  # a boolean set in Python


def _counted(fn, calls):
    def counted(*args):
        calls.append(len(args))
        return fn(*args)
    return counted


@pytest.mark.parametrize("copies", [1, 3])  # 7 boxes: a level at a time; 21: all levels in one product
def test_level_batched_roi_align_pools_exactly_what_torchvision_pools(copies, monkeypatch):
    from collections import OrderedDict

    from torchvision.ops import MultiScaleRoIAlign

    from softteacher import cpu_ops
    from softteacher.model import LevelBatchedRoIAlign

    g = torch.Generator().manual_seed(0)
    names = ["0", "1", "2", "3"]
    shapes = [(64, 96), (32, 48), (16, 24), (8, 12)]  # strides 4..32 of a 256 x 384 image
    feats = OrderedDict((n, torch.randn(2, 5, h, w, generator=g, requires_grad=True))
                        for n, (h, w) in zip(names, shapes))
    feats["pool"] = torch.randn(2, 5, 4, 6, generator=g)  # not pooled
    # boxes of every size, so that all four levels (sizes ~ 224 * 2^(k-4)) receive some
    boxes = []
    for n in (7 * copies, 0):
        xy = torch.rand(n, 2, generator=g) * 150
        wh = torch.tensor([4.0, 30.0, 60.0, 120.0, 300.0, 480.0, 16.0]).repeat(copies)[:n, None].expand(n, 2)
        boxes.append(torch.cat([xy, xy + wh], dim=1))
    boxes[0][6, 2] = boxes[0][6, 0] - 5.0  # inverted in x: negative area, no FPN level
    sizes = [(256, 384), (256, 384)]
    ours = LevelBatchedRoIAlign(featmap_names=names, output_size=7, sampling_ratio=2)
    theirs = MultiScaleRoIAlign(featmap_names=names, output_size=7, sampling_ratio=2)
    calls = []
    monkeypatch.setattr(cpu_ops._SparseRoIAlign, "apply", _counted(cpu_ops._SparseRoIAlign.apply, calls))
    got, want = ours(feats, boxes, sizes), theirs(feats, boxes, sizes)
    assert got.shape == (7 * copies, 5, 7, 7)
    assert len(calls) == (1 if copies == 3 else 0)  # 21 boxes: one product; 7: torchvision, level by level
    assert len(set(ours.map_levels(boxes[:1])[:6].tolist())) == 4
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # sparse products: float rounding
    assert not got[6].any()
    weights = torch.randn(got.shape, generator=g)
    grads_ours = torch.autograd.grad((got * weights).sum(), [feats[n] for n in names])
    grads_theirs = torch.autograd.grad((want * weights).sum(), [feats[n] for n in names])
    for a, b in zip(grads_ours, grads_theirs):
        torch.testing.assert_close(a, b)
    empty = ours(feats, [torch.zeros(0, 4), torch.zeros(0, 4)], sizes)
    assert empty.shape == (0, 5, 7, 7)
    # a first batch of one short image, 40 x 160 padded to 64 x 160: the stride-4 map is 16 rows,
    # 16 / 40 rounds to 1/2 (torchvision's), 16 / 64 is the true 1/4
    short = OrderedDict((n, torch.zeros(1, 5, 64 // s, 160 // s)) for n, s in zip(names, (4, 8, 16, 32)))
    first = LevelBatchedRoIAlign(featmap_names=names, output_size=7, sampling_ratio=2)
    first(short, [torch.tensor([[0.0, 0.0, 20.0, 20.0]])], [(40, 160)])
    assert first.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    tv = MultiScaleRoIAlign(featmap_names=names, output_size=7, sampling_ratio=2)
    tv(short, [torch.tensor([[0.0, 0.0, 20.0, 20.0]])], [(40, 160)])
    assert tv.scales == [1 / 2, 1 / 4, 1 / 8, 1 / 16]


@pytest.mark.gpu
def test_roi_pooling_waits_once_and_box_encoding_never_on_cuda():
    from softteacher.detection import LeanBoxCoder
    from softteacher.model import LevelBatchedRoIAlign

    g = torch.Generator().manual_seed(0)
    names = ["0", "1", "2", "3"]
    feats = {n: torch.randn(2, 5, h, w, generator=g) for n, (h, w) in
             zip(names, [(64, 96), (32, 48), (16, 24), (8, 12)])}
    xy = torch.rand(6, 2, generator=g) * 150
    wh = torch.tensor([4.0, 30.0, 60.0, 120.0, 300.0, 480.0])[:, None].expand(6, 2)
    boxes = [torch.cat([xy, xy + wh], dim=1)[:4], torch.cat([xy, xy + wh], dim=1)[4:]]
    sizes = [(256, 384), (256, 384)]
    pool = LevelBatchedRoIAlign(featmap_names=names, output_size=7, sampling_ratio=2)
    want = pool(feats, boxes, sizes)
    on_gpu = {n: f.cuda() for n, f in feats.items()}, [b.cuda() for b in boxes]  # copies wait: not counted
    got, waits = count_cuda_waits(lambda: pool(*on_gpu, sizes))
    assert len(waits) == 1, waits  # the rows per level, read once to split the boxes
    torch.testing.assert_close(got.cpu(), want)

    coder = LeanBoxCoder((10.0, 10.0, 5.0, 5.0))
    gt, proposals = torch.cat(boxes).cuda(), torch.cat(boxes).flip(0).cuda()
    first = coder.encode_single(gt, proposals)  # makes the weight tensor: one copy to the device
    again, waits = count_cuda_waits(lambda: coder.encode_single(gt, proposals))
    assert waits == [] and torch.equal(first, again)
    torch.testing.assert_close(again.cpu(), coder.encode_single(gt.cpu(), proposals.cpu()))


def _feature_maps(batch, image, dtype=torch.float32):
    h, w = image
    return [torch.zeros(batch, 2, h // s, w // s, dtype=dtype) for s in (4, 8, 16, 32, 64)]


def test_cached_anchors_are_torchvisions_and_built_once_per_batch_shape(monkeypatch):
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    from softteacher.model import CachedAnchorGenerator

    sizes, ratios = ((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5
    one = 4 * 4 * 3 * (32 * 48 + 16 * 24 + 8 * 12 + 4 * 6 + 2 * 3)  # bytes: 128 x 192, float32
    ours = CachedAnchorGenerator(sizes, ratios, max_bytes=4 * one)  # room for 128 x 192 f32 + f64
    theirs = AnchorGenerator(sizes, ratios)
    builds = []
    grid = CachedAnchorGenerator.grid_anchors
    monkeypatch.setattr(CachedAnchorGenerator, "grid_anchors",
                        lambda self, *a: builds.append(1) or grid(self, *a))

    def both(batch, image, dtype=torch.float32):
        images = ImageList(torch.zeros(batch, 3, *image), [image] * batch)
        feats = _feature_maps(batch, image, dtype)
        return ours(images, feats), theirs(images, feats)

    got, want = both(3, (128, 192))
    assert len(got) == 3 and len(builds) == 1
    assert got[0].nbytes == one
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    again, _ = both(2, (128, 192))  # another batch of the same padded size: no build
    assert len(builds) == 1 and again[0] is got[0]
    wide, want = both(2, (128, 256))
    assert len(builds) == 2 and all(torch.equal(g, w) for g, w in zip(wide, want))
    double, want = both(2, (128, 192), torch.float64)  # dtype is part of the key
    assert len(builds) == 3 and double[0].dtype == torch.float64 and torch.equal(double[0], want[0])
    both(2, (128, 192))  # (128, 192) float32 was evicted to make room: rebuilt, same values
    assert len(builds) == 4 and len(ours._cache) == 2
    assert (ours.hits, ours.misses) == (1, 4)
    # bf16 maps (autocast): the float32 anchors, torchvision's for float32 maps, not its bf16 ones
    bf16 = _feature_maps(1, (128, 192), torch.bfloat16)
    half = ours(ImageList(torch.zeros(1, 3, 128, 192), [(128, 192)]), bf16)
    assert half[0].dtype == torch.float32 and torch.equal(half[0], got[0]) and ours.hits == 2
    rounded = theirs(ImageList(torch.zeros(1, 3, 128, 192), [(128, 192)]), bf16)[0]
    assert rounded.dtype == torch.bfloat16 and not torch.equal(rounded.float(), got[0])
    ours.to(torch.float64)  # moving the module forgets every entry
    assert len(ours._cache) == 0
    with pytest.raises(ValueError, match="max_bytes"):
        CachedAnchorGenerator(sizes, ratios, max_bytes=-1)


def test_cached_anchors_leave_the_training_losses_unchanged():
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    from softteacher.model import CachedAnchorGenerator

    torch.manual_seed(0)
    model = build_detector(_tiny(), num_classes=3)
    cached = model.rpn.anchor_generator
    assert isinstance(cached, CachedAnchorGenerator)
    images, targets = _batch(n=3)
    runs = []
    for generator in (cached, cached, AnchorGenerator(cached.sizes, cached.aspect_ratios)):
        model.rpn.anchor_generator = generator
        torch.manual_seed(1)
        runs.append(model(images, targets))
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[2][k]) and torch.equal(runs[1][k], runs[2][k]), k


def test_padded_size_is_the_largest_side_rounded_up_to_the_divisor():
    from softteacher.model import padded_size

    assert padded_size([(96, 128), (64, 130)], 32) == (96, 160)
    assert padded_size([(1, 33)], 32) == (32, 64)
    model = build_detector(_tiny(), num_classes=3)
    images = [torch.zeros(3, 96, 128, dtype=torch.uint8), torch.zeros(3, 64, 130, dtype=torch.uint8)]
    batch = model.preprocess(images)
    assert tuple(batch.tensors.shape[-2:]) == (96, 160)


def test_preprocess_normalises_uint8_and_float_images_alike_and_pads_with_zeros():
    model = build_detector(_tiny(), num_classes=3)
    image = torch.zeros(3, 2, 3, dtype=torch.uint8)
    image[:, 0, 0] = torch.tensor([255, 0, 116], dtype=torch.uint8)
    batch = model.preprocess([image, image.float() / 255.0, torch.zeros(3, 4, 1, dtype=torch.uint8)])
    x = batch.tensors
    assert x.shape == (3, 3, 32, 32) and batch.image_sizes == [(2, 3), (2, 3), (4, 1)]
    # (v - 255 mean) / (255 std), ImageNet statistics: (255 - 123.675) / 58.395,
    # (0 - 116.28) / 57.12, (116 - 103.53) / 57.375
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([2.2489083, -2.0357143, 0.2173420]), atol=1e-6)
    assert torch.allclose(x[1], x[0], atol=1e-5)  # float in [0, 1] is the same image
    black = torch.tensor([-2.1179039, -2.0357143, -1.8044444])  # (0 - 255 mean) / (255 std)
    assert torch.allclose(x[2, :, :4, 0], black[:, None], atol=1e-6)
    for i, (h, w) in enumerate(batch.image_sizes):  # everything outside an image is exactly zero
        outside = torch.ones(32, 32, dtype=torch.bool)
        outside[:h, :w] = False
        assert torch.equal(x[i][:, outside], torch.zeros(3, int(outside.sum())))


def _frozen_bn_pair(c=6, seed=0):
    from torchvision.ops import FrozenBatchNorm2d

    from softteacher.model import CachedFrozenBatchNorm2d
    g = torch.Generator().manual_seed(seed)
    ref, ours = FrozenBatchNorm2d(c), CachedFrozenBatchNorm2d(c)
    state = {"weight": torch.rand(c, generator=g) + 0.5, "bias": torch.randn(c, generator=g),
             "running_mean": torch.randn(c, generator=g), "running_var": torch.rand(c, generator=g) + 0.1}
    ref.load_state_dict(state)
    ours.load_state_dict(state)
    return ref, ours


def _count_ops(fn):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        out = fn()
    return out, Count.n


def test_cached_frozen_bn_is_torchvisions_bit_for_bit_with_gradients():
    ref, ours = _frozen_bn_pair()
    x = torch.randn(2, 6, 5, 7, generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # the second call reads the cache
        xr, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        yr, yo = ref(xr), ours(xo)
        assert torch.equal(yr, yo)
        (yr * torch.arange(yr.numel()).view_as(yr)).sum().backward()
        (yo * torch.arange(yo.numel()).view_as(yo)).sum().backward()
        assert torch.equal(xr.grad, xo.grad)


def test_cached_frozen_bn_keeps_a_bfloat16_activation_in_bfloat16():
    ref, ours = _frozen_bn_pair()
    x = torch.randn(2, 6, 5, 7, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(x)
        promoted = ref(x)  # torchvision's: float32, which the next convolution casts back
    assert y.dtype == torch.bfloat16 and promoted.dtype == torch.float32
    w, b = ref.weight.view(1, -1, 1, 1), ref.bias.view(1, -1, 1, 1)
    scale = w / (ref.running_var.view(1, -1, 1, 1) + ref.eps).sqrt()
    shift = b - ref.running_mean.view(1, -1, 1, 1) * scale
    by_hand = x * scale.to(torch.bfloat16) + shift.to(torch.bfloat16)  # bf16 arithmetic
    torch.testing.assert_close(y, by_hand, rtol=0, atol=0.02)
    torch.testing.assert_close(y.float(), promoted, rtol=0.02, atol=0.05)  # bf16 rounding only
    xg = x.clone().requires_grad_(True)
    ours(xg).float().sum().backward()
    assert xg.grad.dtype == torch.bfloat16
    torch.testing.assert_close(xg.grad.float(), scale.expand_as(x), rtol=0.01, atol=0)


def test_cached_frozen_bn_issues_two_operators_and_sees_every_buffer_change():
    ref, ours = _frozen_bn_pair()
    x = torch.randn(1, 6, 3, 3)
    _, first = _count_ops(lambda: ours(x))
    _, again = _count_ops(lambda: ours(x))
    _, theirs = _count_ops(lambda: ref(x))
    assert (first, again, theirs) == (11, 2, 11)  # 4 views, 5 on buffers, x * scale + shift
    # an in-place write (load_state_dict, an EMA copy) bumps the version: recomputed
    with torch.no_grad():
        ours.running_var.mul_(4.0)
        ref.running_var.mul_(4.0)
    assert torch.equal(ours(x), ref(x))
    ours.load_state_dict(_frozen_bn_pair(seed=3)[0].state_dict())
    ref.load_state_dict(ours.state_dict())
    assert torch.equal(ours(x), ref(x))
    # a new tensor (.to()) replaces the buffers: recomputed in the new dtype
    ours.double()
    ref.double()
    assert torch.equal(ours(x.double()), ref(x.double())) and ours(x.double()).dtype == torch.float64
    assert set(ours.state_dict()) == {"weight", "bias", "running_mean", "running_var"}


def test_cached_frozen_bn_filled_in_inference_mode_serves_a_training_step():
    ref, ours = _frozen_bn_pair()
    x = torch.randn(2, 6, 4, 4)
    with torch.inference_mode():
        ours(x)  # the teacher's call fills the cache
    xr, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ref(xr).sum().backward()
    ours(xo).sum().backward()
    assert torch.equal(xr.grad, xo.grad)


def _resnet18_file(tmp_path) -> str:
    """A ResNet-18 state dict on disk (random weights), as a pretrained backbone file; seeds after."""
    weights = tmp_path / "r18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    torch.manual_seed(1)
    return str(weights)


def test_frozen_bn_detector_uses_the_cache_and_keeps_its_losses(tmp_path):
    from torchvision.ops import FrozenBatchNorm2d

    from softteacher.model import CachedFrozenBatchNorm2d
    model = build_detector(_tiny(backbone_weights=_resnet18_file(tmp_path)), num_classes=3)
    bns = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert bns and all(type(m) is CachedFrozenBatchNorm2d for m in bns)
    images, targets = _batch()

    def losses():
        torch.manual_seed(2)
        return model(images, targets)

    with_cache = losses()
    for m in bns:  # torchvision's forward on the same modules
        m.forward = FrozenBatchNorm2d.forward.__get__(m)
    plain = losses()
    assert with_cache.keys() == plain.keys()
    for k in plain:
        assert torch.equal(with_cache[k], plain[k]), k


def test_compiled_backbone_keeps_losses_gradients_and_checkpoints(tmp_path):
    import copy
    weights = _resnet18_file(tmp_path)
    eager = build_detector(_tiny(backbone_weights=weights), num_classes=3)
    # aot_eager: dynamo's graph and AOTAutograd's backward, without generating kernels
    compiled = build_detector(_tiny(backbone_weights=weights, compile_backbone="aot_eager"), num_classes=3)
    compiled.load_state_dict(eager.state_dict())
    assert list(compiled.state_dict()) == list(eager.state_dict())  # nothing compiled is saved
    images, targets = _batch()
    losses = []
    for m in (eager, compiled):
        torch.manual_seed(2)
        out = m(images, targets)
        sum(out.values()).backward()
        losses.append({k: v.detach() for k, v in out.items()})
    assert compiled._compiled_backbone is not None
    for k in losses[0]:
        assert torch.equal(losses[0][k], losses[1][k]), k
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)
    # the EMA teacher is a deep copy: it must run its own backbone, not the student's
    teacher = copy.deepcopy(compiled).eval()
    assert teacher._compiled_backbone is None
    with torch.no_grad():
        teacher.backbone.fpn.layer_blocks[0][0].weight.add_(1.0)
        f_teacher = teacher.features(teacher.preprocess(images))["0"]
        f_student = compiled.features(compiled.preprocess(images))["0"]
    assert not torch.equal(f_teacher, f_student)


def test_whole_detector_weights_of_another_norm_name_the_setting(tmp_path):
    scratch = build_detector(_tiny(backbone="resnet18"), num_classes=3)  # GroupNorm
    torch.save(scratch.state_dict(), tmp_path / "scratch.pt")
    with pytest.raises(ValueError, match=r"scratch.pt: does not fit.*running_mean.*set model.norm"):
        build_detector(_tiny(backbone="resnet18", norm="frozen_bn", weights=str(tmp_path / "scratch.pt")),
                       num_classes=3)
