"""Row selection for a whole batch with one wait for the device.

``x[mask]`` on an accelerator waits for the device to finish everything queued before it: the
number of kept rows decides the result's shape, so the host has to read the mask first. A
Soft Teacher step selects rows many times per image (candidates, three pseudo-label sets, boxes
that survive the strong view, background RoIs). :func:`indices_of` reads all the masks of one
stage in a single device-to-host copy and sends the indices back without waiting, so the host
keeps queueing work while the device runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor`` (on the host) on ``device`` without waiting for the device's queue.

    On CUDA the tensor goes through pinned memory with ``non_blocking=True``; elsewhere it is a
    plain ``.to(device)``.
    """
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def indices_of(masks: Sequence[Tensor]) -> list[Tensor]:
    """Indices of the True entries of each mask, one device-to-host copy for all of them.

    Args:
        masks: M tensors (N_i,) bool, all on one device (N_i == 0 allowed).
    Returns:
        M tensors (K_i,) int64 on the masks' device, increasing: ``x[indices[i]]`` equals
        ``x[masks[i]]``. [] for M == 0.
    Raises:
        ValueError: a mask that is not 1-D bool.
    """
    if len(masks) == 0:
        return []
    for i, m in enumerate(masks):
        if m.dtype != torch.bool or m.dim() != 1:
            raise ValueError(f"indices_of: mask {i} must be 1-D bool, got {m.dtype} "
                             f"{tuple(m.shape)}")
    device = masks[0].device
    lengths = [int(m.shape[0]) for m in masks]
    flat = torch.cat(list(masks)).cpu()  # the one wait
    on_host = [chunk.nonzero()[:, 0] for chunk in flat.split(lengths)]
    counts = [int(i.shape[0]) for i in on_host]
    return list(to_device(torch.cat(on_host), device).split(counts))
