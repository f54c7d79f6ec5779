"""torchvision's RPN and RoI heads with their per-image loops batched over the images.

torchvision matches anchors and proposals to ground truth, samples them, filters proposals and
post-processes detections one image at a time: some twenty to a hundred operators per image and
call, each a kernel launch on a GPU and some a wait for the device. A Soft Teacher step of 1 + 4
images runs these loops over 22 images (the student's RPN and RoI sampling of the labeled image
and of the strong views, the latter twice, for classification and regression pseudo boxes; the
teacher's proposals and detections), and a GPU step is bound by the host issuing operators
(``benchmarks/speed.md``). Here each call runs a fixed number of operators over all its images,
padded:

- ``BatchedRPN.assign_targets_to_anchors`` and ``BatchedRoIHeads.select_training_samples`` give
  torchvision's matches, labels and regression targets, bit for bit (same IoU arithmetic, same
  ``Matcher`` rules, low-quality matches included);
- ``balanced_sample`` draws torchvision's numbers of positives and negatives per image uniformly at
  random, from one sort of random keys instead of two ``randperm`` per image: the same distribution,
  a different stream of random numbers;
- ``BatchedRPN.filter_proposals`` and ``BatchedRoIHeads.postprocess_detections`` keep torchvision's
  boxes, bit for bit: clip, size and score filters over the batch, then torchvision's own NMS call
  per image (its groups are the FPN levels, the classes) and the top k of each image;
- ``fastrcnn_losses`` is torchvision's RoI loss without reading the positive rows from the device;
- ``BatchedRPN.forward_grouped`` runs the RPN once over images of several groups (a Soft Teacher
  step's labeled images and strong views) and returns each group's losses, equal to those of a
  pass over the group's images alone.
  ``BatchedRPN.forward`` in training is the same pass with all images in one group, so the
  supervised step's RPN loss does not wait for the device either.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers
from torchvision.ops import boxes as box_ops

from softteacher.cpu_ops import cpu_autocast_enabled, on_threads
from softteacher.method.selection import to_device

BELOW_LOW_THRESHOLD = -1  # torchvision's Matcher codes
BETWEEN_THRESHOLDS = -2


def _upcast(t: Tensor) -> Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def batched_box_iou(gt: Tensor, boxes: Tensor) -> Tensor:
    """IoU of every ground-truth box with every box of the same image, with the arithmetic of
    ``torchvision.ops.box_iou`` (so the same values to the last bit).

    Args:
        gt: (B, G, 4) xyxy.
        boxes: (B, N, 4) xyxy, or (N, 4) shared by all images (anchors).
    Returns:
        (B, G, N) float.
    """
    if boxes.dim() == 2:
        boxes = boxes.unsqueeze(0)
    g, b = gt.unsqueeze(2), boxes.unsqueeze(1)  # (B, G, 1, 4), (1 or B, 1, N, 4)
    area_gt = (gt[..., 2] - gt[..., 0]) * (gt[..., 3] - gt[..., 1])  # (B, G)
    area_boxes = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])  # (1 or B, N)
    w = _upcast(torch.min(g[..., 2], b[..., 2]) - torch.max(g[..., 0], b[..., 0])).clamp(min=0)
    h = _upcast(torch.min(g[..., 3], b[..., 3]) - torch.max(g[..., 1], b[..., 1])).clamp(min=0)
    inter = w * h
    union = area_gt[:, :, None] + area_boxes[:, None, :] - inter
    return inter / union


def match(iou: Tensor, gt_valid: Tensor, high: float, low: float, allow_low_quality: bool) -> Tensor:
    """torchvision's ``Matcher`` over a batch, padded ground truth excluded.

    Args:
        iou: (B, G, N) quality of each (ground truth, box) pair.
        gt_valid: (B, G) bool, False for padding rows.
    Returns:
        (B, N) int64: the matched ground truth, ``BELOW_LOW_THRESHOLD`` (-1) or
        ``BETWEEN_THRESHOLDS`` (-2). An image without ground truth matches nothing (-1).
    """
    iou = iou.masked_fill(~gt_valid[:, :, None], -1.0)  # below any real IoU (>= 0)
    vals, all_matches = iou.max(dim=1)  # (B, N)
    below = vals < low
    between = (vals >= low) & (vals < high)
    matches = torch.where(below, BELOW_LOW_THRESHOLD, torch.where(between, BETWEEN_THRESHOLDS, all_matches))
    if allow_low_quality:
        # every box that is (one of) the best for some ground truth keeps its best match
        best_per_gt = iou.max(dim=2, keepdim=True).values  # (B, G, 1)
        is_best = ((iou == best_per_gt) & gt_valid[:, :, None]).any(dim=1)  # (B, N)
        matches = torch.where(is_best, all_matches, matches)
    return matches


def balanced_sample(labels: Tensor, batch_size_per_image: int, positive_fraction: float
                    ) -> tuple[Tensor, Tensor]:
    """torchvision's ``BalancedPositiveNegativeSampler`` over a batch.

    Each image keeps ``min(#positives, int(batch_size_per_image * positive_fraction))`` positives
    and ``min(#negatives, batch_size_per_image - that)`` negatives, each set drawn uniformly at
    random (the first of one random order per image).

    Args:
        labels: (B, N): >= 1 positive, 0 negative, -1 ignored.
    Returns:
        (pos, neg): (B, N) bool masks of the sampled positives and negatives.
    """
    pos, neg = labels >= 1, labels == 0
    num_pos_all = pos.sum(1, keepdim=True)  # (B, 1)
    num_pos = num_pos_all.clamp(max=int(batch_size_per_image * positive_fraction))
    num_neg = torch.minimum(neg.sum(1, keepdim=True), batch_size_per_image - num_pos)
    # positives first, then negatives, then the ignored, each in random order
    keys = torch.rand(labels.shape, dtype=torch.float64, device=labels.device)
    keys = keys + 2.0 * (~pos) + 2.0 * (~pos & ~neg)
    order = keys.argsort(dim=1)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(labels.shape[1], device=labels.device).expand_as(order))
    return pos & (rank < num_pos), neg & (rank < num_pos_all + num_neg)


def padding_rows(counts: list[int], width: int, device: torch.device) -> Tensor:
    """(sum counts,) int64: where the rows of B blocks (block b has ``counts[b]`` rows, laid end
    to end) go in a (B * width) padded batch: row j of block b to ``b * width + j``."""
    sizes = np.asarray(counts, dtype=np.int64)
    shift = np.repeat(np.arange(len(sizes), dtype=np.int64) * width - (np.cumsum(sizes) - sizes), sizes)
    return to_device(torch.from_numpy(np.arange(int(sizes.sum()), dtype=np.int64) + shift), device)


def pad_rows(tensors: list[Tensor], width: int, rows: Tensor | None = None) -> Tensor:
    """(B, width, ...) batch of B tensors of (n_b, ...) rows, n_b <= width, zeros after each
    block's rows: one copy of all rows into place, whatever B (``pad_sequence`` copies per
    tensor). ``rows``: ``padding_rows`` of the blocks, when the caller has it."""
    first = tensors[0]
    padded = first.new_zeros((len(tensors) * width, *first.shape[1:]))
    if rows is None:
        rows = padding_rows([len(t) for t in tensors], width, first.device)
    if len(rows):
        padded.index_put_((rows,), torch.cat(tensors))
    return padded.view(len(tensors), width, *first.shape[1:])


def pad_ground_truth(boxes: list[Tensor], labels: list[Tensor] | None = None
                     ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Ground truth of B images as (B, G, 4) boxes (zero rows pad), a (B, G) validity mask and
    (B, G) labels (0 pads); G >= 1, so an image without boxes has one invalid zero row."""
    counts = [len(b) for b in boxes]
    g = max(max(counts), 1)
    rows = padding_rows(counts, g, boxes[0].device)
    padded_labels = None if labels is None else pad_rows(labels, g, rows)
    return pad_rows(boxes, g, rows), lengths_mask(counts, g, boxes[0].device), padded_labels


def lengths_mask(counts: list[int], width: int, device: torch.device) -> Tensor:
    """(B, width) bool, row b True in its first ``counts[b]`` entries: the real rows of padding."""
    return to_device(torch.arange(width)[None, :] < torch.tensor(counts)[:, None], device)


def image_bounds(image_shapes: list[tuple[int, int]], dtype: torch.dtype, device: torch.device) -> Tensor:
    """(B, 4) ``[W, H, W, H]`` of each image, to clip xyxy boxes with one ``minimum``."""
    return to_device(torch.tensor([[w, h, w, h] for h, w in image_shapes], dtype=dtype), device)


def nonzero(mask: Tensor, size: int) -> Tensor:
    """(size,) int64 indices of the True entries of the 1-D ``mask``, known to hold ``size``
    of them: no wait for the device where ``torch.nonzero_static`` runs (CPU, CUDA)."""
    if mask.device.type in ("cpu", "cuda"):
        try:
            return torch.nonzero_static(mask, size=size).squeeze(1)
        except NotImplementedError:  # a build without it for this device
            pass
    return mask.nonzero().squeeze(1)


def rows_of_images(counts: list[int], device: torch.device, owners: list[int] | None = None) -> Tensor:
    """(sum counts,) int64: the image of each row of blocks laid end to end, block k holding
    ``counts[k]`` rows of image ``owners[k]`` (default: block k is image k)."""
    images = torch.arange(len(counts)) if owners is None else torch.tensor(owners, dtype=torch.int64)
    return to_device(torch.repeat_interleave(images, torch.tensor(counts, dtype=torch.int64)), device)


def nms_per_image(boxes: Tensor, scores: Tensor, groups: Tensor, counts: list[int], iou_threshold: float,
                  k: int) -> tuple[Tensor, list[int]]:
    """torchvision's ``batched_nms`` on each image's rows, then its first ``k`` survivors.

    The rows of an image are a block, the images' blocks one after the other. Each image gets
    the very call torchvision makes for it (NMS within each of its groups; one NMS call with
    offset boxes, or one per group for large inputs), without torchvision's other per-image work.

    Args:
        boxes: (N, 4), scores: (N,), groups: (N,) int64 group within its image (level, class).
        counts: rows of each image on the host, ``sum(counts) == N``.
    Returns:
        (indices of the kept rows, image after image, each image's by decreasing score; the
        number kept of each image).
    """
    starts = list(itertools.accumulate(counts, initial=0))[:-1]
    threads = torch.get_num_threads() if boxes.device.type == "cpu" else 1
    if threads > 1 and cpu_autocast_enabled():  # the pool's threads run without autocast:
        boxes, scores = boxes.float(), scores.float()     # cast as torchvision's rule for nms does

    def one_image(block: tuple[int, int]) -> Tensor:
        start, n = block
        if not n:
            return groups.new_zeros(0)
        return box_ops.batched_nms(boxes[start:start + n], scores[start:start + n], groups[start:start + n],
                                   iou_threshold)[:k] + start

    # each image's NMS is a one-thread kernel: on the CPU the images go over the threads
    kept = on_threads(one_image, list(zip(starts, counts)), threads)
    return torch.cat(kept), [len(keep) for keep in kept]


def fastrcnn_losses(class_logits: Tensor, box_regression: Tensor, labels: Tensor, regression_targets: Tensor
                    ) -> tuple[Tensor, Tensor]:
    """torchvision's ``fastrcnn_loss`` on the rows of all images laid end to end, without
    reading the device (torchvision finds the positive rows with ``torch.where``).

    Args:
        class_logits: (R, C + 1); box_regression: (R, (C + 1) * 4); labels: (R,) int64, 0 for
        background; regression_targets: (R, 4), used for the positive rows only.
    Returns:
        (cross-entropy averaged over the R rows, smooth L1 (beta 1/9) of each positive row's
        regression for its class, summed and divided by R).
    """
    r = labels.shape[0]
    classification = F.cross_entropy(class_logits, labels)
    picked = box_regression.reshape(r, -1, 4)[torch.arange(r, device=labels.device), labels]  # (R, 4)
    return classification, positive_box_loss(picked, regression_targets, labels > 0).sum() / r


def positive_box_loss(deltas: Tensor, targets: Tensor, positive: Tensor) -> Tensor:
    """Smooth L1 (beta 1/9, torchvision's for RPN and RoI boxes) of each coordinate, 0 where
    ``positive`` is False. deltas, targets: (..., 4); positive: (...) bool. The targets of
    rows that are not positive are not read (they may be infinite: an image without ground
    truth), so the loss and its gradient stay finite."""
    positive = positive[..., None]
    box = F.smooth_l1_loss(deltas, torch.where(positive, targets, 0.0), beta=1 / 9, reduction="none")
    return torch.where(positive, box, 0.0)


class LeanBoxCoder(BoxCoder):
    """torchvision's ``BoxCoder`` with its arithmetic unchanged (the same values to the last bit)
    on x and y, and on width and height, as pairs: about 15 operators per call instead of 45.

    Weights whose x and y (or w and h) differ fall back to torchvision's code, which divides by
    each as a Python number (a CUDA kernel multiplies by its reciprocal, a tensor divisor would not).
    """

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        # in float32 at least, as decode_single: the targets of the boxes it decodes
        dtype = torch.promote_types(torch.promote_types(reference_boxes.dtype, proposals.dtype),
                                    torch.float32)
        reference_boxes, proposals = reference_boxes.to(dtype), proposals.to(dtype)
        w = self._weight_tensor(reference_boxes)
        ex_size = proposals[:, 2:] - proposals[:, :2]  # (N, 2) widths, heights
        ex_ctr = proposals[:, :2] + 0.5 * ex_size
        gt_size = reference_boxes[:, 2:] - reference_boxes[:, :2]
        gt_ctr = reference_boxes[:, :2] + 0.5 * gt_size
        return torch.cat([w[:2] * (gt_ctr - ex_ctr) / ex_size, w[2:] * torch.log(gt_size / ex_size)], dim=1)

    def _weight_tensor(self, like: Tensor) -> Tensor:
        """The weights as a tensor of ``like``'s dtype and device, made once for each pair: making
        it copies from the host, which on an accelerator waits for the device."""
        made = self.__dict__.setdefault("_weight_tensors", {})
        key = (like.dtype, like.device)
        if key not in made:
            made[key] = torch.as_tensor(self.weights, dtype=like.dtype, device=like.device)
        return made[key]

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        # in float32 at least: under bf16 autocast the head's outputs are bf16, whose 8-bit
        # significand would round a coordinate near 1,000 to a multiple of 4 or 8 pixels
        dtype = torch.promote_types(rel_codes.dtype, torch.float32)
        rel_codes, boxes = rel_codes.to(dtype), boxes.to(dtype)
        wx, wy, ww, wh = self.weights
        if wx != wy or ww != wh:
            return super().decode_single(rel_codes, boxes)
        size = boxes[:, 2:] - boxes[:, :2]  # (N, 2)
        ctr = boxes[:, :2] + 0.5 * size
        rel = rel_codes.reshape(rel_codes.shape[0], rel_codes.shape[1] // 4, 4)  # (N, K, 4)
        pred_ctr = rel[..., :2] / wx * size[:, None] + ctr[:, None]
        half = 0.5 * (torch.exp(torch.clamp(rel[..., 2:] / ww, max=self.bbox_xform_clip)) * size[:, None])
        return torch.cat([pred_ctr - half, pred_ctr + half], dim=-1).flatten(1)


class BatchedRPN(RegionProposalNetwork):
    """torchvision's ``RegionProposalNetwork`` (same parameters, same outputs) whose target
    assignment, sampling, losses and proposal filtering run over all images at once."""

    #: largest IoU matrix (images x ground truth x anchors) matched in one piece; larger batches
    #: (many ground-truth boxes at large image sizes) are matched a few images at a time
    max_iou_elements = 2**24

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.box_coder = LeanBoxCoder(self.box_coder.weights, self.box_coder.bbox_xform_clip)

    def assign_targets_to_anchors(self, anchors: list[Tensor], targets: list[dict[str, Tensor]]
                                  ) -> tuple[list[Tensor], list[Tensor]]:
        per_image = max(1, max(len(t["boxes"]) for t in targets)) * len(anchors[0])
        step = max(1, self.max_iou_elements // per_image)
        if step < len(targets):
            labels, matched = [], []
            for i in range(0, len(targets), step):
                part = self.assign_targets_to_anchors(anchors[i:i + step], targets[i:i + step])
                labels += part[0]
                matched += part[1]
            return labels, matched
        shared = all(a is anchors[0] for a in anchors)
        grid = anchors[0] if shared else torch.stack(anchors)
        gt, valid, _ = pad_ground_truth([t["boxes"] for t in targets])
        matcher = self.proposal_matcher
        matches = match(batched_box_iou(gt, grid), valid, matcher.high_threshold, matcher.low_threshold,
                        matcher.allow_low_quality_matches)  # (B, A)
        labels = torch.where(matches >= 0, 1.0, torch.where(matches == BETWEEN_THRESHOLDS, -1.0, 0.0))
        matched = torch.gather(gt, 1, matches.clamp(min=0)[..., None].expand(-1, -1, 4))  # (B, A, 4)
        return list(labels.unbind(0)), list(matched.unbind(0))

    def filter_proposals(self, proposals: Tensor, objectness: Tensor, image_shapes: list[tuple[int, int]],
                         num_anchors_per_level: list[int]) -> tuple[list[Tensor], list[Tensor]]:
        num_images, device = proposals.shape[0], proposals.device
        objectness = objectness.detach().reshape(num_images, -1)
        levels = to_device(torch.repeat_interleave(torch.arange(len(num_anchors_per_level)),
                                                   torch.tensor(num_anchors_per_level)), device)
        top_n_idx = self._get_top_n_idx(objectness, num_anchors_per_level)  # (B, K)
        batch_idx = torch.arange(num_images, device=device)[:, None]
        scores = torch.sigmoid(objectness[batch_idx, top_n_idx])
        levels = levels[top_n_idx]
        boxes = proposals[batch_idx, top_n_idx]
        boxes = torch.minimum(boxes.clamp(min=0), image_bounds(image_shapes, boxes.dtype, device)[:, None, :])
        ok = ((boxes[..., 2] - boxes[..., 0]) >= self.min_size) & \
             ((boxes[..., 3] - boxes[..., 1]) >= self.min_size) & (scores >= self.score_thresh)
        counts = ok.sum(1).tolist()  # the one wait for the device
        rows = nonzero(ok.flatten(), sum(counts))  # image after image
        boxes, scores = boxes.reshape(-1, 4)[rows], scores.flatten()[rows]
        keep, counts = nms_per_image(boxes, scores, levels.flatten()[rows], counts, self.nms_thresh,
                                     self.post_nms_top_n())
        return list(boxes[keep].split(counts)), list(scores[keep].split(counts))

    def forward(self, images: ImageList, features: dict[str, Tensor],
                targets: list[dict[str, Tensor]] | None = None) -> tuple[list[Tensor], dict[str, Tensor]]:
        """torchvision's ``forward``. In training its two losses are ``forward_grouped``'s with all
        images in one group: torchvision's values up to the order of float sums, without the
        two waits for the device of torchvision's ``compute_loss``."""
        if not self.training:
            return self.propose(images, features)[0], {}
        if targets is None:
            raise ValueError("BatchedRPN in training mode needs targets")
        boxes, objectness, box = self.forward_grouped(images, features, targets, [0] * len(targets))
        return boxes, {"loss_objectness": objectness[0], "loss_rpn_box_reg": box[0]}

    def propose(self, images: ImageList, features: dict[str, Tensor]
                ) -> tuple[list[Tensor], Tensor, Tensor, list[Tensor]]:
        """The RPN head on every FPN level and the filtered proposals of each image.

        Returns:
            (proposals per image, objectness logits (B * A, 1), box deltas (B * A, 4), anchors
            per image (A, 4)), the logits and deltas with the gradients of the head.
        """
        head_features = list(features.values())
        objectness, deltas = self.head(head_features)
        anchors = self.anchor_generator(images, head_features)
        num_anchors_per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = self.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        boxes, _ = self.filter_proposals(proposals, objectness, images.image_sizes, num_anchors_per_level)
        return boxes, objectness, deltas, anchors

    def forward_grouped(self, images: ImageList, features: dict[str, Tensor],
                        targets: list[dict[str, Tensor]], groups: list[int]
                        ) -> tuple[list[Tensor], Tensor, Tensor]:
        """One training pass over images of several groups (the labeled images and the strong
        views of a Soft Teacher step), with each group's own losses.

        The proposals are ``forward``'s. Group k's losses are those ``forward`` gives on group
        k's images alone: the objectness cross-entropy averaged over the group's sampled anchors,
        the box loss summed over its sampled positives and divided by the same count.

        Args:
            groups: the group (0 .. G-1) of each image.
        Returns:
            (proposals per image, objectness losses (G,), box regression losses (G,)).
        """
        boxes, objectness, deltas, anchors = self.propose(images, features)
        b = len(anchors)
        labels, matched = self.assign_targets_to_anchors(anchors, targets)
        labels = torch.stack(labels)  # (B, A): 1 positive, 0 negative, -1 ignored
        regression_targets = self.box_coder.encode_single(torch.cat(matched), torch.cat(anchors))
        regression_targets = regression_targets.view(b, -1, 4)
        sampler = self.fg_bg_sampler
        pos, neg = balanced_sample(labels, sampler.batch_size_per_image, sampler.positive_fraction)
        sampled = (pos | neg).float()
        group = to_device(torch.tensor(groups, dtype=torch.int64), labels.device)
        num_groups = max(groups) + 1
        count = sampled.new_zeros(num_groups).index_add_(0, group, sampled.sum(1))
        weight = sampled / count.clamp(min=1)[group][:, None]  # (B, A): 1 / (group's sampled anchors)
        objectness_loss = F.binary_cross_entropy_with_logits(
            objectness.float().view(b, -1), labels.clamp(min=0), weight=weight, reduction="none").sum(1)
        box_loss = (positive_box_loss(deltas.float().view(b, -1, 4), regression_targets, pos).sum(2)
                    * weight).sum(1)
        per_image = torch.stack([objectness_loss, box_loss], 1)
        per_group = sampled.new_zeros((num_groups, 2)).index_add_(0, group, per_image)
        return boxes, per_group[:, 0], per_group[:, 1]


class BatchedRoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` (same parameters, same outputs) whose proposal sampling and
    detection post-processing run over all images at once, and whose training losses
    (``fastrcnn_losses``) do not wait for the device; the box term sums over every sampled row,
    so it equals torchvision's up to the order of a float sum."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.box_coder = LeanBoxCoder(self.box_coder.weights, self.box_coder.bbox_xform_clip)

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor],
                image_shapes: list[tuple[int, int]], targets: list[dict[str, Tensor]] | None = None
                ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """torchvision's; in training (boxes only) the sampled RoIs stay one tensor and the losses
        come from ``fastrcnn_losses``, which does not read the device."""
        if not self.training or self.has_mask() or self.has_keypoint():
            return super().forward(features, proposals, image_shapes, targets)
        self.check_targets(targets)
        assert targets is not None
        for t in targets:
            if not t["boxes"].is_floating_point() or t["labels"].dtype != torch.int64:
                raise TypeError(f"targets need float boxes and int64 labels, got {t['boxes'].dtype} and "
                                f"{t['labels'].dtype}")
        boxes, _, labels, regression_targets, counts = self.sample_rois(proposals, targets)
        pooled = self.box_roi_pool(features, list(boxes.split(counts)), image_shapes)
        class_logits, box_regression = self.box_predictor(self.box_head(pooled))
        classification, box = fastrcnn_losses(class_logits, box_regression, labels, regression_targets)
        return [], {"loss_classifier": classification, "loss_box_reg": box}

    def select_training_samples(self, proposals: list[Tensor], targets: list[dict[str, Tensor]] | None
                                ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        self.check_targets(targets)
        assert targets is not None
        *sampled, counts = self.sample_rois(proposals, targets)
        return tuple(list(t.split(counts)) for t in sampled)

    def sample_rois(self, proposals: list[Tensor], targets: list[dict[str, Tensor]]
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, list[int]]:
        """``select_training_samples`` with the images' rows laid end to end.

        Returns:
            (boxes (R, 4), matched ground truth (R,), labels (R,), regression targets (R, 4),
            the number of rows of each image).
        """
        dtype, device = proposals[0].dtype, proposals[0].device
        gt, gt_valid, gt_labels = pad_ground_truth([t["boxes"].to(dtype) for t in targets],
                                                   [t["labels"] for t in targets])
        # each image's proposals then its ground truth, as torchvision appends them
        num_props = [len(p) for p in proposals]
        rows = torch.cat([pad_rows(proposals, max(num_props)), gt], dim=1)  # (B, P + G, 4)
        valid = torch.cat([lengths_mask(num_props, max(num_props), device), gt_valid], dim=1)
        matcher = self.proposal_matcher
        matches = match(batched_box_iou(gt, rows), gt_valid, matcher.high_threshold, matcher.low_threshold,
                        matcher.allow_low_quality_matches)  # (B, P + G)
        matched = matches.clamp(min=0)
        labels = torch.gather(gt_labels, 1, matched).to(torch.int64)
        labels = torch.where(matches == BELOW_LOW_THRESHOLD, 0,
                             torch.where(matches == BETWEEN_THRESHOLDS, -1, labels))
        labels = labels.masked_fill(~valid, -1)  # padding is never sampled
        pos, neg = balanced_sample(labels, self.fg_bg_sampler.batch_size_per_image,
                                   self.fg_bg_sampler.positive_fraction)
        sampled = pos | neg
        counts = sampled.sum(1).tolist()  # the one wait for the device
        flat = nonzero(sampled.flatten(), sum(counts))
        image = flat // rows.shape[1]
        matched = matched.flatten()[flat]
        sampled_props = rows.flatten(0, 1)[flat]
        matched_gt = gt.flatten(0, 1)[image * gt.shape[1] + matched]
        regression = self.box_coder.encode_single(matched_gt, sampled_props)
        return sampled_props, matched, labels.flatten()[flat], regression, counts

    def postprocess_detections(self, class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor],
                               image_shapes: list[tuple[int, int]]
                               ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        device, num_classes = class_logits.device, class_logits.shape[-1]
        counts = [len(p) for p in proposals]
        if not sum(counts):  # no proposal in the whole batch (torchvision's decode cannot shape it)
            n = len(proposals)
            return ([proposals[0].new_zeros((0, 4))] * n, [class_logits.new_zeros((0,))] * n,
                    [torch.zeros(0, dtype=torch.int64, device=device)] * n)
        boxes = self.box_coder.decode(box_regression, proposals)  # (R, C + 1, 4)
        scores = torch.softmax(class_logits, -1)
        image = rows_of_images(counts, device)
        bounds = image_bounds(image_shapes, boxes.dtype, device)[image]  # (R, 4)
        boxes = torch.minimum(boxes.clamp(min=0), bounds[:, None, :])
        # every (box, foreground class) a candidate, background dropped
        boxes, scores = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1)
        ok = (scores > self.score_thresh) & ((boxes[:, 2] - boxes[:, 0]) >= 1e-2) & \
             ((boxes[:, 3] - boxes[:, 1]) >= 1e-2)
        per_image = torch.zeros(len(proposals), dtype=torch.int64, device=device).index_add_(
            0, image, ok.view(len(image), -1).sum(1))
        counts = per_image.tolist()  # the one wait for the device
        rows = nonzero(ok, sum(counts))  # image after image
        labels = rows % (num_classes - 1) + 1
        boxes, scores = boxes[rows], scores[rows]
        keep, counts = nms_per_image(boxes, scores, labels, counts, self.nms_thresh, self.detections_per_img)
        return (list(boxes[keep].split(counts)), list(scores[keep].split(counts)),
                list(labels[keep].split(counts)))
