"""Whether tensors still hold what they held: the same objects at the same version counters.

PyTorch bumps a tensor's version counter at every in-place write (an optimiser or EMA step,
``copy_``, ``load_state_dict``), so tensors that are the same objects at the same versions as
when a :func:`snapshot` was taken hold the same values, and whatever was derived from them (a
cached scale, a copy, an evaluation's metrics) still stands. A tensor replaced (``.to()``, a
new parameter) is a different object and is seen too.

Inference tensors (made under ``torch.inference_mode()``) keep no version counter: a snapshot
of them is None, which :func:`unchanged` never takes as unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

Snapshot = tuple[tuple[Tensor, int], ...]


def snapshot(tensors: Sequence[Tensor]) -> Snapshot | None:
    """The tensors with their version counters now; None if one is an inference tensor."""
    if any(t.is_inference() for t in tensors):
        return None
    return tuple((t, t._version) for t in tensors)


def unchanged(before: Snapshot | None, tensors: Sequence[Tensor]) -> bool:
    """True if ``tensors`` are, in order, the tensors of ``before`` at the versions it saw."""
    return (before is not None and len(before) == len(tensors)
            and all(t is s and t._version == v for t, (s, v) in zip(tensors, before)))
