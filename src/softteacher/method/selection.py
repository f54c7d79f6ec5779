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

import numpy as np
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


def _true_rows(flat: Tensor, lengths: list[int]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The True rows of ``flat`` (one wait, then numpy on the host: a fixed number of torch
    operators whatever the number of chunks), the chunks' starts and their True counts."""
    starts = np.cumsum([0] + lengths)
    rows = np.flatnonzero(flat.cpu().numpy())  # the one wait
    return rows, starts, np.diff(np.searchsorted(rows, starts)).tolist()


def kept_rows(mask: Tensor, lengths: list[int]) -> tuple[Tensor, list[int]]:
    """The True entries of a 1-D bool ``mask`` made of chunks of ``lengths``, one wait.

    Returns:
        (indices into ``mask`` (K,) int64 on its device, increasing; the number of each chunk's).
    """
    if mask.dtype != torch.bool or mask.dim() != 1 or mask.shape[0] != sum(lengths):
        raise ValueError(f"kept_rows: mask must be 1-D bool of {sum(lengths)} entries, got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    rows, _, counts = _true_rows(mask, lengths)
    return to_device(torch.from_numpy(rows.astype(np.int64)), mask.device), counts


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
    rows, starts, counts = _true_rows(torch.cat(list(masks)), [int(m.shape[0]) for m in masks])
    local = rows - np.repeat(starts[:-1], counts)
    return list(to_device(torch.from_numpy(local.astype(np.int64)), masks[0].device).split(counts))
