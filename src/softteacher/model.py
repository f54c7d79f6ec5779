"""Faster R-CNN + FPN composed from torchvision's parts.

Images reach the detector already resized by our views (``data/transforms.py``), so the
detector only normalises, pads and batches them: torchvision's ``GeneralizedRCNNTransform``
(which would resize a second time) is not used, and every box the detector sees or
returns is in the frame of the view it was given.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.poolers import _setup_scales

from softteacher import versions
from softteacher.checkpoint import load_error_detail
from softteacher.config import ModelConfig
from softteacher.cpu_ops import MaxPool2d, pools_sparse, roi_align, sparse_roi_align
from softteacher.detection import BatchedRoIHeads, BatchedRPN, rows_of_images

log = logging.getLogger(__name__)

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CachedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """torchvision's ``FrozenBatchNorm2d`` with its scale and shift computed once, not per call.

    torchvision derives ``scale = weight / sqrt(running_var + eps)`` and
    ``shift = bias - running_mean * scale`` from the four buffers at every forward: seven
    kernels, four views and their dispatch, of which only ``x * scale + shift`` depends on the
    input. Here the two are kept until a buffer changes: a buffer replaced (``.to()``) or
    written in place (``load_state_dict``, an EMA copy: PyTorch bumps the tensor's version
    counter) is seen at the next call. In float32 the output
    and its gradient are bit for bit torchvision's (the same operations in the same order).

    A bfloat16 / float16 input (under autocast, from the convolution before) is scaled by
    scale and shift rounded to its dtype, and the output keeps that dtype, as detectron2's
    ``FrozenBatchNorm2d`` does and as autocast's own batch norm behaves. torchvision's would
    promote the activation to float32, so that every following convolution casts it back:
    one more kernel per layer forward and backward, at twice the memory traffic.
    State dict, ``isinstance`` checks and buffers are the parent's; the cache is never saved.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps)
        self._cache: tuple[versions.Snapshot, dict[torch.dtype | None, tuple[Tensor, Tensor]]] | None = None

    def _stats(self) -> tuple[Tensor, ...]:
        return (self.weight, self.bias, self.running_mean, self.running_var)

    def _derive(self, dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
        """torchvision's scale and shift, (1, C, 1, 1) each, by the same operations; rounded to
        ``dtype`` unless it is None (the buffers' own dtype)."""
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        shift = b - rm * scale
        if dtype is not None:
            scale, shift = scale.to(dtype), shift.to(dtype)
        return scale, shift

    def _scale_shift(self, low: torch.dtype | None) -> tuple[Tensor, Tensor]:
        if torch.compiler.is_compiling():  # traced by torch.compile, which fuses it
            return self._derive(low)
        bufs = self._stats()
        if self._cache is None or not versions.unchanged(self._cache[0], bufs):
            key = versions.snapshot(bufs)
            if key is None:  # inference-mode buffers keep no version counter
                return self._derive(low)
            self._cache = (key, {})
        by_dtype = self._cache[1]
        if low not in by_dtype:
            # Outside inference mode, so that what the teacher's call caches under
            # torch.inference_mode() can still be saved for backward by a training step.
            with torch.inference_mode(False), torch.no_grad():
                by_dtype[low] = self._derive(low)
        return by_dtype[low]

    def forward(self, x: Tensor) -> Tensor:
        # None: the buffers' own dtype, which float32 (or float64) inputs are scaled in
        low = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else None
        scale, shift = self._scale_shift(low)
        return x * scale + shift

    def _apply(self, fn, recurse=True):
        self._cache = None
        return super()._apply(fn, recurse)


def _norm_layer(kind: str):
    if kind == "frozen_bn":
        return CachedFrozenBatchNorm2d
    if kind == "bn":
        return nn.BatchNorm2d
    if kind == "gn":
        return lambda c: nn.GroupNorm(math.gcd(c, 32), c)
    raise ValueError(f"model.norm {kind!r}: expected auto, frozen_bn, bn or gn")


def _pretrained(cfg: ModelConfig) -> bool:
    return bool(cfg.backbone_weights or cfg.torchvision_weights)


def resolve_norm(cfg: ModelConfig) -> str:
    """``auto``: FrozenBN over a pretrained backbone (the paper's), GroupNorm from scratch."""
    if cfg.norm != "auto":
        return cfg.norm
    return "frozen_bn" if _pretrained(cfg) else "gn"


def resolve_channels_last(cfg: ModelConfig) -> bool:
    """``auto``: NHWC memory with frozen BatchNorm under a ResNet, where it makes both kinds of
    step faster on the CPU (in bf16 most) and on the GPU (``benchmarks/speed.md``); not with
    GroupNorm, whose CPU backward in NHWC takes what the convolutions gain."""
    value = cfg.channels_last
    if isinstance(value, bool):
        return value
    if value == "auto":
        return resolve_norm(cfg) == "frozen_bn" and cfg.backbone.startswith("resnet")
    return value == "true"


def _load_backbone_weights(body: nn.Module, cfg: ModelConfig) -> None:
    if cfg.torchvision_weights:
        source = cfg.torchvision_weights
        try:
            weights = torchvision.models.get_weight(source)
        except (ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"model.torchvision_weights {source!r}: {e}") from None
        try:
            # tensors alone, and the file checked against the hash in its name
            state = weights.get_state_dict(progress=True, weights_only=True, check_hash=True)
        except OSError as e:  # no network (URLError), a full disk
            raise ValueError(f"model.torchvision_weights {source}: cannot download ({e}); without a "
                             f"network, give a local copy of the weights with --backbone-weights "
                             f"FILE (model.backbone_weights)") from None
    elif cfg.backbone_weights:
        source = cfg.backbone_weights
        state = load_state_file(source)
    else:
        return
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}
    own = body.state_dict()
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise ValueError(f"{source}: backbone weights do not fit {cfg.backbone}: "
                         f"shape mismatch in {bad[:5]}")
    missing, unexpected = body.load_state_dict(state, strict=False)
    missing = [k for k in missing
               if not k.endswith("num_batches_tracked") and not k.startswith(("fc.", "classifier."))]
    if missing or unexpected:
        raise ValueError(f"{source}: backbone weights do not fit {cfg.backbone}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    log.info("loaded backbone weights from %s", source)


def _freeze(body: nn.Module, names_to_train: list[str]) -> None:
    for name, p in body.named_parameters():
        if not any(name.startswith(n) for n in names_to_train):
            p.requires_grad_(False)


def _freeze_batch_norms(module: nn.Module) -> None:
    """Every BatchNorm of ``module`` whose scale and shift do not train becomes a frozen one,
    its statistics as they are: in training mode a BatchNorm would still normalise by each
    batch's statistics and move its running ones, in layers meant to stay as they were."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and child.affine and not child.weight.requires_grad:
            frozen = CachedFrozenBatchNorm2d(child.num_features, child.eps).to(child.weight.device)
            with torch.no_grad():
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(frozen, key).copy_(getattr(child, key))
            setattr(module, name, frozen)
        else:
            _freeze_batch_norms(child)


def build_backbone(cfg: ModelConfig, load_weights: bool = True) -> tuple[nn.Module, int]:
    """Backbone + FPN. Returns the module and the number of feature levels (incl. ``pool``).

    A pretrained backbone (``backbone_weights`` or ``torchvision_weights``) sets the norm and
    the trainable layers; its weights are read with ``load_weights`` and without a whole
    detector's ``weights`` (which replace them)."""
    load_weights = load_weights and not cfg.weights
    norm = _norm_layer(resolve_norm(cfg))
    # from scratch (None): every layer trains, each backbone's stem among them
    trainable = cfg.trainable_layers if _pretrained(cfg) else None
    if cfg.backbone.startswith("resnet"):
        if cfg.backbone not in BACKBONES:
            raise ValueError(f"model.backbone {cfg.backbone!r}: expected one of {BACKBONES}")
        body = getattr(torchvision.models, cfg.backbone)(weights=None, norm_layer=norm)
        stem = body.maxpool  # the same pooling, in the CPU's fast layout (no parameters)
        body.maxpool = MaxPool2d(stem.kernel_size, stem.stride, stem.padding, stem.dilation,
                                 ceil_mode=stem.ceil_mode)
        if load_weights:
            _load_backbone_weights(body, cfg)
        trainable = 5 if trainable is None else trainable
        if not 0 <= trainable <= 5:
            raise ValueError(f"model.trainable_layers {trainable}: expected 0..5")
        layers = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable]
        if trainable == 5:
            layers.append("bn1")
        _freeze(body, layers)
        _freeze_batch_norms(body)
        stage2 = body.inplanes // 8
        in_channels = [stage2 * 2 ** i for i in range(4)]
        return_layers = {f"layer{i + 1}": str(i) for i in range(4)}
    elif cfg.backbone == "mobilenet_v3":
        net = torchvision.models.mobilenet_v3_large(weights=None, norm_layer=norm)
        if load_weights:
            _load_backbone_weights(net, cfg)
        body = net.features
        stages = [0] + [i for i, b in enumerate(body) if getattr(b, "_is_cn", False)] + [len(body) - 1]
        trainable = len(stages) if trainable is None else trainable
        if not 0 <= trainable <= len(stages):
            raise ValueError(f"model.trainable_layers {trainable}: expected 0..{len(stages)}")
        freeze_before = len(body) if trainable == 0 else stages[len(stages) - trainable]
        for block in list(body)[:freeze_before]:
            for p in block.parameters():
                p.requires_grad_(False)
        _freeze_batch_norms(body)
        returned = stages[-3:]
        in_channels = [body[i].out_channels for i in returned]
        return_layers = {str(i): str(k) for k, i in enumerate(returned)}
    else:
        raise ValueError(f"model.backbone {cfg.backbone!r}: expected one of {BACKBONES}")
    backbone = BackboneWithFPN(body, return_layers, in_channels, cfg.fpn_channels,
                               extra_blocks=LastLevelMaxPool())
    return backbone, len(in_channels) + 1


class LevelBatchedRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` (same levels, scales and output) that waits for the
    device once per call instead of once per FPN level.

    torchvision finds each level's boxes with ``torch.where``, which reads the device for every
    level. Here the boxes are sorted by level on the device and the four level counts come back
    in one copy; each level's boxes are then a slice of that order. On the CPU (a fixed
    sampling ratio, 16 boxes or more) all levels are pooled at once, with no sort, by
    ``cpu_ops.sparse_roi_align``: one sparse matrix over every level's pixels, torchvision's
    values to float rounding.
    """

    #: what the batch's sides are padded to a multiple of (the detector's ``size_divisible``)
    size_divisible = 32

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor],
                image_shapes: list[tuple[int, int]], owners: list[int] | None = None) -> Tensor:
        """As torchvision's, plus ``owners``: the image of each box set (default: set k belongs
        to image k), so that several sets of one image go through one call.

        Each level's scale is its map's size over the padded batch's, exact where torchvision's
        (over the largest image's, rounded to a power of 2) is half the true one for a batch of
        small images, whose padding is over 40 % of their height (and keeps it for good)."""
        feats = [v for k, v in x.items() if k in self.featmap_names]
        if self.scales is None or self.map_levels is None:
            padded = padded_size(image_shapes, self.size_divisible)
            self.scales, self.map_levels = _setup_scales(feats, [padded], self.canonical_scale,
                                                         self.canonical_level)
        flat = torch.cat(boxes)
        owner = rows_of_images([len(b) for b in boxes], flat.device, owners)
        rois = torch.cat([owner[:, None].to(flat.dtype), flat], dim=1)
        if len(feats) == 1:
            return roi_align(feats[0], rois, self.output_size, self.scales[0], self.sampling_ratio)
        levels = self.map_levels([flat])  # (R,) int64 in [0, len(feats)), the same for one list or many
        # a box of negative area (one side inverted) has no level (its NaN size casts to any integer):
        # it goes last and, as in torchvision, is pooled from no level (zeros)
        levels = torch.where((levels >= 0) & (levels < len(feats)), levels, len(feats))
        if pools_sparse(feats, len(rois), self.sampling_ratio):  # all levels in one product, no wait
            return sparse_roi_align(feats, rois, levels, self.scales, self.output_size, self.sampling_ratio)
        order = torch.argsort(levels, stable=True)
        # rows per level by comparison: bincount on a device reads the largest level back first
        counts = (levels[:, None] == torch.arange(len(feats) + 1, device=levels.device)).sum(0)
        result = feats[0].new_zeros((len(rois), feats[0].shape[1], *self.output_size))
        for feat, scale, idx in zip(feats, self.scales, order.split(counts.tolist())):  # the one wait
            pooled = roi_align(feat, rois[idx], self.output_size, scale, self.sampling_ratio)
            result[idx] = pooled.to(result.dtype)
        return result


def padded_size(sizes: list[tuple[int, int]], divisible: int) -> tuple[int, int]:
    """(H, W) of the batch that holds images of ``sizes`` (H, W): each side the largest,
    rounded up to a multiple of ``divisible``."""
    return tuple(-(-max(s[k] for s in sizes) // divisible) * divisible for k in (0, 1))


class CachedAnchorGenerator(AnchorGenerator):
    """torchvision's ``AnchorGenerator`` (the same anchors, bit for bit) that keeps the anchors
    of the batch shapes it saw last, up to ``max_bytes`` of them.

    Anchors depend on the padded batch size, the feature map sizes, dtype and device, never on
    the pixels, and every image of a batch gets the same ones. torchvision rebuilds them on
    every call (about 20 operators per FPN level, each a kernel launch on a GPU) and copies
    them once per image. Here the RPN calls of one step over batches of one padded size (the
    student's labeled and strong rows; the teacher's weak views when they pad alike) share one
    tensor, as do steps at a size seen recently. All images of a batch get that one tensor:
    it is read, never written, by torchvision's RPN. ``hits`` and ``misses`` count the calls.
    """

    def __init__(self, sizes: tuple[tuple[int, ...], ...], aspect_ratios: tuple[tuple[float, ...], ...],
                 max_bytes: int = 64 * 2**20):
        super().__init__(sizes, aspect_ratios)
        if max_bytes < 0:
            raise ValueError(f"CachedAnchorGenerator: max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.hits = self.misses = 0
        self._cache: OrderedDict[tuple, Tensor] = OrderedDict()

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        ref = feature_maps[0]
        # in float32 at least: under bf16 autocast torchvision would build them in the maps'
        # bf16, which holds only every 4th pixel from 512 on (an anchor near 1,000 moved by up
        # to 7 pixels, its width by a quarter)
        dtype = torch.promote_types(ref.dtype, torch.float32)
        key = (tuple(image_list.tensors.shape[-2:]), tuple(tuple(f.shape[-2:]) for f in feature_maps),
               dtype, ref.device, torch.is_inference_mode_enabled())
        anchors = self._cache.get(key)
        if anchors is None:
            self.misses += 1
            one = ImageList(image_list.tensors, image_list.image_sizes[:1])
            # torchvision reads the maps' sizes, dtype and device alone: stand-ins of no memory
            shapes = [torch.empty((), dtype=dtype, device=f.device).expand(f.shape) for f in feature_maps]
            anchors = super().forward(one, shapes)[0]
            self._cache[key] = anchors
            held = sum(a.nbytes for a in self._cache.values())
            while held > self.max_bytes and self._cache:  # the oldest go first
                held -= self._cache.popitem(last=False)[1].nbytes
        else:
            self.hits += 1
            self._cache.move_to_end(key)
        return [anchors] * len(image_list.image_sizes)

    def _apply(self, fn, *args, **kwargs):
        self._cache.clear()  # .to(), .half(), ...: anchors are rebuilt for the new device or dtype
        return super()._apply(fn, *args, **kwargs)


@dataclass
class DetectorOutput:
    """Detections of one image, in the frame of the view the detector was given."""

    boxes: Tensor  # (N, 4) float xyxy
    scores: Tensor  # (N,)
    labels: Tensor  # (N,) int64, 1..C


class Detector(nn.Module):
    """Faster R-CNN + FPN over torchvision's ``RegionProposalNetwork`` and ``RoIHeads``.

    Input images are (3, H, W) uint8 (or float in [0, 1]) tensors already resized by the
    views. Targets are dicts with ``boxes`` (N, 4) float xyxy in the view's pixels and
    ``labels`` (N,) int64 in 1..C; N == 0 is allowed.
    In training mode ``forward`` returns torchvision's loss dict (``loss_objectness``,
    ``loss_rpn_box_reg``, ``loss_classifier``, ``loss_box_reg``); in eval mode a list of
    ``DetectorOutput``.
    """

    def __init__(self, backbone: nn.Module, rpn: RegionProposalNetwork, roi_heads: RoIHeads,
                 num_classes: int, size_divisible: int = 32, channels_last: bool = False,
                 compile_backbone: str = ""):
        super().__init__()
        self.channels_last = channels_last
        self.compile_backbone = compile_backbone
        self._compiled_backbone = None
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.num_classes = num_classes
        self.size_divisible = size_divisible
        if isinstance(getattr(roi_heads, "box_roi_pool", None), LevelBatchedRoIAlign):
            roi_heads.box_roi_pool.size_divisible = size_divisible
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255.0,
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255.0,
                             persistent=False)

    def preprocess(self, images: list[Tensor]) -> ImageList:
        """Normalise with ImageNet statistics and pad into one (B, 3, H', W') batch.

        Images may be uint8 in [0, 255] or float in [0, 1]; padding (zeros after
        normalisation) goes right and bottom, so box coordinates are unchanged.
        """
        if not images:
            raise ValueError("preprocess: no images")
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        h, w = padded_size(sizes, self.size_divisible)
        # the padding holds the mean, which the one normalisation of the batch maps to exactly 0;
        # each image is one copy into the batch, to float on the device (an image still on the host
        # crosses as it is, uint8 if it is)
        batch = self.pixel_mean.expand(len(images), 3, h, w).clone()
        for region, im in zip(batch, images):
            im = im.to(batch.device, non_blocking=True)
            region = region[:, : im.shape[-2], : im.shape[-1]].copy_(im)
            if im.dtype != torch.uint8:
                region.mul_(255.0)
        return ImageList(batch.sub_(self.pixel_mean).div_(self.pixel_std), sizes)

    def features(self, image_list: ImageList) -> "OrderedDict[str, Tensor]":
        x = image_list.tensors
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # NHWC levels go to the heads as they are: the CPU's sparse RoIAlign reads them without a
        # transpose (benchmarks/speed.md)
        if not self.compile_backbone:
            return self.backbone(x)
        if self._compiled_backbone is None:
            # the bound forward, not the module: the compiled function is no submodule, so
            # parameters, state dict and checkpoints stay those of the eager model
            self._compiled_backbone = torch.compile(self.backbone.forward, backend=self.compile_backbone,
                                                    dynamic=True)
        return self._compiled_backbone(x)

    def __getstate__(self) -> dict:
        # A copy (the EMA teacher is a deep copy of the student) compiles its own backbone:
        # the compiled function holds the original's.
        state = self.__dict__.copy()
        state["_compiled_backbone"] = None
        return state

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None,
                compute=None, **kwargs):
        """The standard pass, or ``compute(self, images, targets, **kwargs)`` when given.

        Training code that drives the detector's parts itself (Soft Teacher) goes through
        ``compute`` so that a ``DistributedDataParallel`` wrapper sees a forward pass and
        synchronises the gradients of its backward.
        """
        if compute is not None:
            return compute(self, images, targets, **kwargs)
        if self.training and targets is None:
            raise ValueError("Detector in training mode needs targets")
        image_list = self.preprocess(images)
        features = self.features(image_list)
        proposals, rpn_losses = self.rpn(image_list, features, targets)
        detections, roi_losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)
        if self.training:
            return {**rpn_losses, **roi_losses}
        return [DetectorOutput(d["boxes"], d["scores"], d["labels"]) for d in detections]


def check_score_threshold(value: float) -> float:
    """A detection score threshold, refused unless a number from 0 to 1: above 1 (a percent,
    say) or NaN, no detection would pass, without a word."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"score threshold {value}: expected a number from 0 to 1")
    return value


@contextmanager
def score_threshold(model: Detector, value: float | None) -> Iterator[None]:
    """Inside the block ``model`` keeps the detections scored above ``value`` (``None``: its
    own threshold); its threshold is restored on leaving, whatever happens."""
    heads = model.roi_heads
    old = heads.score_thresh
    if value is not None:
        heads.score_thresh = value
    try:
        yield
    finally:
        heads.score_thresh = old


def build_detector(cfg: ModelConfig, num_classes: int, class_names: list[str] | None = None,
                   load_weights: bool = True) -> Detector:
    """Faster R-CNN + FPN for ``num_classes`` foreground classes (background added).

    Loads ``cfg.weights`` (a whole detector) if given, its box predictor's classes matched to
    ``class_names`` by name where the file names its own, else the backbone's weights; nothing
    downloads unless ``cfg.torchvision_weights`` names torchvision weights explicitly.
    ``load_weights=False`` reads no file (a checkpoint's weights follow: a resumed run).
    """
    if num_classes < 1:
        raise ValueError(f"build_detector: need at least one class, got {num_classes}")
    backbone, levels = build_backbone(cfg, load_weights)
    sizes = tuple(cfg.anchor_sizes)
    ratios = tuple(float(r) for r in cfg.aspect_ratios)
    if levels == len(sizes):
        anchor_sizes = tuple((s,) for s in sizes)
    else:
        anchor_sizes = (sizes,) * levels
    anchors = CachedAnchorGenerator(anchor_sizes, (ratios,) * levels)
    rpn = BatchedRPN(
        anchors, RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0]),
        fg_iou_thresh=0.7, bg_iou_thresh=0.3,
        batch_size_per_image=cfg.rpn_batch_size_per_image, positive_fraction=0.5,
        pre_nms_top_n=dict(training=cfg.rpn_pre_nms_top_n_train, testing=cfg.rpn_pre_nms_top_n_test),
        post_nms_top_n=dict(training=cfg.rpn_post_nms_top_n_train,
                            testing=cfg.rpn_post_nms_top_n_test),
        nms_thresh=cfg.rpn_nms_thresh,
    )
    feature_names = [str(i) for i in range(levels - 1)]
    pool = LevelBatchedRoIAlign(featmap_names=feature_names, output_size=7, sampling_ratio=2)
    head = TwoMLPHead(backbone.out_channels * 7 * 7, cfg.representation_size)
    predictor = FastRCNNPredictor(cfg.representation_size, num_classes + 1)
    roi_heads = BatchedRoIHeads(
        pool, head, predictor, fg_iou_thresh=0.5, bg_iou_thresh=0.5,
        batch_size_per_image=cfg.box_batch_size_per_image,
        positive_fraction=cfg.box_positive_fraction, bbox_reg_weights=None,
        score_thresh=cfg.box_score_thresh, nms_thresh=cfg.box_nms_thresh,
        detections_per_img=cfg.box_detections_per_img,
    )
    nhwc = resolve_channels_last(cfg)
    model = Detector(backbone, rpn, roi_heads, num_classes, channels_last=nhwc,
                     compile_backbone=cfg.compile_backbone)
    if cfg.weights and load_weights:
        load_detector_weights(model, cfg.weights, cfg, class_names)
    if nhwc:
        model.to(memory_format=torch.channels_last)  # 4-D weights; loading keeps the layout
    return model


def _read_weights(path: str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle with code, truncated zip ...
        raise ValueError(f"{path}: cannot read weights ({load_error_detail(e)}); only tensors and "
                         f"plain data are loaded, as unpickling other objects can run code") from None


def _state_of(obj: Any, path: str) -> dict[str, Tensor]:
    if isinstance(obj, dict):
        for key in ("teacher", "model", "state_dict", "student"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return obj


def load_state_file(path: str) -> dict[str, Tensor]:
    """A state dict from a local file, read with ``weights_only=True``.

    Accepts a plain state dict or a dict holding one under ``model``, ``state_dict``,
    ``teacher`` or ``student`` (our checkpoints).
    """
    return _state_of(_read_weights(path), path)


def _class_names_of(obj: Any) -> list[str] | None:
    """The class names a checkpoint of this project was trained for, by label (None: not said)."""
    from softteacher.data.records import CategoryMap

    cats = obj.get("categories") if isinstance(obj, dict) else None
    if not isinstance(cats, list):
        return None
    try:
        return CategoryMap.from_coco(cats).names
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _predictor_by_name(state: dict[str, Tensor], own: dict[str, Tensor], theirs: list[str],
                       ours: list[str], path: str) -> dict[str, Tensor]:
    """The box predictor's class rows of ``state`` (trained for classes ``theirs``) put where
    this model's classes ``ours`` have them, matched by name; a class the file lacks keeps this
    model's initial rows. Background (row 0) is background in both."""
    keys = {k: f"roi_heads.box_predictor.{k}" for k in ("cls_score.weight", "cls_score.bias",
                                                        "bbox_pred.weight", "bbox_pred.bias")}
    if not all(k in state for k in keys.values()) or \
            state[keys["cls_score.bias"]].shape[0] != len(theirs) + 1:
        return state
    where = {name: j for j, name in enumerate(theirs, start=1)}
    rows = [0] + [where.get(name, -1) for name in ours]  # -1: keep ours
    state = dict(state)
    for short, key in keys.items():
        per = 4 if short.startswith("bbox_pred") else 1
        out = own[key].detach().clone()
        for i, j in enumerate(rows):
            if j >= 0:
                out[i * per:(i + 1) * per] = state[key][j * per:(j + 1) * per]
        state[key] = out
    missing = [name for name in ours if name not in where]
    if not missing:
        log.info("%s: box predictor rows put in this data's class order by name (the file's: %s)",
                 path, ", ".join(theirs))
    elif len(missing) == len(ours):
        log.warning("%s: trained for other classes (%s); the box predictor's class rows keep their "
                    "initial weights", path, ", ".join(theirs))
    else:
        log.warning("%s: trained for classes %s; matched by name, %s keep(s) initial box predictor "
                    "weights", path, ", ".join(theirs), ", ".join(missing))
    return state


def load_detector_weights(model: Detector, path: str, cfg: ModelConfig,
                          class_names: list[str] | None = None) -> None:
    """Load a whole detector. When the file is a checkpoint of this project and
    ``class_names`` are given, the box predictor's rows follow the classes by name (a class
    the file lacks keeps its initial rows); else a box predictor of another class count is left
    at its initialisation with a warning (fine-tuning to new classes). Any other mismatch is an
    error."""
    obj = _read_weights(path)
    state = _state_of(obj, path)
    if state and not any(k.startswith(("backbone.", "rpn.", "roi_heads.")) for k in state):
        raise ValueError(f"{path}: no detector in it (no backbone., rpn. or roi_heads. weights): a "
                         f"classification network's weights start the backbone alone: give them as "
                         f"--backbone-weights FILE (model.backbone_weights)")
    own = model.state_dict()
    theirs = _class_names_of(obj)
    if class_names is not None and theirs is not None and list(theirs) != list(class_names):
        state = _predictor_by_name(state, own, theirs, list(class_names), path)
    skipped = []
    for k in list(state):
        if k in own and own[k].shape != state[k].shape:
            if k.startswith("roi_heads.box_predictor."):
                skipped.append(k)
                del state[k]
            else:
                raise ValueError(f"{path}: {k} has shape {tuple(state[k].shape)}, "
                                 f"the model needs {tuple(own[k].shape)}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in skipped]
    if missing or unexpected:
        stats = [k for k in missing + unexpected if k.endswith(("running_mean", "running_var"))]
        hint = (f"; its normalisation layers are not this model's ({resolve_norm(cfg)}): set "
                f"model.norm to the one it was trained with (norm auto: frozen_bn over a pretrained "
                f"backbone, gn from scratch)") if stats else ""
        raise ValueError(f"{path}: does not fit this detector: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}{hint}")
    if skipped:
        log.warning("%s: box predictor is for another class count; re-initialised %s", path, skipped)
    log.info("detector weights from %s", path)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all, trainable) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)

