"""Exponential moving average of the student: the teacher (SPEC §1, §10).

``teacher = m * teacher + (1 - m) * student`` after every optimizer step, for the floating-point
parameters; buffers (BatchNorm statistics, counters) are copied unless configured otherwise.

Two momentum schedules:

- ``"constant"``: ``m`` every step (mmdetection 3.x, our default, ``m = 0.999``).
- ``"ramp"``: ``min(m, 1 - 1/(step + 1))`` (reference code). Step 0 gives 0, i.e. the teacher
  becomes an exact copy of the student; step 1 gives 0.5, step 9 gives 0.9, and from step
  ``1/(1 - m) - 1`` (999 for 0.999) on it is ``m``.

Either can be broken every ``refresh`` steps by a momentum of 0, an exact copy of the student:
with ``m = 1`` a frozen teacher renewed in rounds.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from softteacher import versions

SCHEDULES = ("constant", "ramp")


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel / DataParallel / ``torch.compile`` wrappers.

    Returns ``model`` itself when it is not wrapped. Wrappers nested in any order are peeled.
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            return model


def ema_momentum(step: int, momentum: float, schedule: str = "constant", refresh: int = 0) -> float:
    """Momentum ``m`` of the EMA update after the student's ``step``-th optimizer step.

    Args:
        step: optimizer steps the student has taken (>= 0), the reference's iteration index
            ``t`` of the update it makes before iteration ``t``.
        momentum: the target momentum ``m`` in [0, 1] (SPEC: 0.999).
        schedule: ``"constant"`` -> ``momentum``; ``"ramp"`` -> ``min(momentum, 1 - 1/(step+1))``,
            which is 0 at step 0 (teacher = student), 0.5 at step 1, ``momentum`` once
            ``step >= 1/(1 - momentum) - 1``.
        refresh: when > 0, every ``refresh``-th step (``step % refresh == 0``, step > 0) gives 0,
            a teacher that becomes the student; the schedule decides the other steps.
    Returns:
        The momentum as a Python float.
    Raises:
        ValueError: negative step or refresh, momentum outside [0, 1], or unknown schedule.
    """
    if step < 0:
        raise ValueError(f"ema_momentum: step must be >= 0, got {step}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"ema_momentum: momentum must be in [0, 1], got {momentum}")
    if refresh < 0:
        raise ValueError(f"ema_momentum: refresh must be >= 0, got {refresh}")
    if schedule not in SCHEDULES:
        raise ValueError(f"ema_momentum: unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    if refresh and step > 0 and step % refresh == 0:
        return 0.0
    if schedule == "constant":
        return float(momentum)
    return float(min(momentum, 1.0 - 1.0 / (step + 1)))  # ramp


def _paired(teacher_items: list[tuple[str, Tensor]], student_items: list[tuple[str, Tensor]],
            what: str) -> list[tuple[Tensor, Tensor]]:
    t_names = [n for n, _ in teacher_items]
    s_names = [n for n, _ in student_items]
    if t_names != s_names:
        missing = sorted(set(s_names) - set(t_names))[:5]
        extra = sorted(set(t_names) - set(s_names))[:5]
        raise ValueError(f"ema_update: teacher and student {what} differ "
                         f"(only in student: {missing}, only in teacher: {extra})")
    pairs = []
    for (name, t), (_, s) in zip(teacher_items, student_items):
        if t.shape != s.shape:
            raise ValueError(f"ema_update: {what[:-1]} {name!r} has shape {tuple(t.shape)} in the "
                             f"teacher and {tuple(s.shape)} in the student")
        pairs.append((t, s))
    return pairs


def _lerp_or_copy(pairs: list[tuple[Tensor, Tensor]], momentum: float) -> None:
    """Float tensors: t <- m t + (1 - m) s in one fused foreach pass; others: copied."""
    floats = [(t, s) for t, s in pairs if t.is_floating_point()]
    others = [(t, s) for t, s in pairs if not t.is_floating_point()]
    for t, s in others:
        t.copy_(s)
    if not floats:
        return
    dst = [t for t, _ in floats]
    src = [s.to(dtype=t.dtype, device=t.device) for t, s in floats]
    if momentum == 0.0:
        torch._foreach_copy_(dst, src)  # exact copy at ramp step 0
    elif momentum < 1.0:
        # lerp_(end, w): t + w (s - t) = (1 - w) t + w s, with w = 1 - m.
        torch._foreach_lerp_(dst, src, 1.0 - momentum)


class CopiedBuffers:
    """Which teacher buffers still hold what was copied into them from the student.

    A pair whose two tensors are the same objects at the same versions as right after the last
    copy (:mod:`softteacher.versions`) holds equal values: copying again would change nothing.
    Skipping it keeps the teacher's buffers untouched, and with them whatever the teacher
    derived from them and cached (the scale and shift of
    :class:`softteacher.model.CachedFrozenBatchNorm2d`). Frozen BatchNorm statistics never
    change, so after the first EMA step they are not copied again; BatchNorm statistics
    updated by a training step are.
    """

    def __init__(self) -> None:
        self._copied: dict[int, versions.Snapshot | None] = {}

    def unchanged(self, t: Tensor, s: Tensor) -> bool:
        return versions.unchanged(self._copied.get(id(t)), (t, s))

    def record(self, pairs: list[tuple[Tensor, Tensor]]) -> None:
        for t, s in pairs:
            self._copied[id(t)] = versions.snapshot((t, s))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float,
               copy_buffers: bool = True, copied: CopiedBuffers | None = None) -> None:
    """In-place EMA step of ``teacher`` towards ``student``.

    Floating-point parameters: ``teacher = momentum * teacher + (1 - momentum) * student``
    (one fused ``torch._foreach_lerp_`` pass; ``momentum == 0`` copies exactly, ``1`` keeps the
    teacher). Non-floating parameters are copied. Buffers are copied when ``copy_buffers``
    (SPEC §1 default), else floating buffers are averaged like parameters and the rest
    (e.g. BatchNorm's ``num_batches_tracked``) copied.

    Args:
        teacher: the EMA model (bare, not wrapped); its train/eval mode is left unchanged.
        student: the trained model, possibly wrapped in DDP/DataParallel (unwrapped here).
        momentum: in [0, 1], e.g. from :func:`ema_momentum`.
        copy_buffers: copy buffers instead of averaging them.
        copied: with ``copy_buffers``, skip the buffers that neither model changed since this
            record's last copy (the same values either way), and record the ones copied now.
    Raises:
        ValueError: momentum outside [0, 1], or the two models' parameter/buffer names or
            shapes differ.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"ema_update: momentum must be in [0, 1], got {momentum}")
    teacher, student = unwrap(teacher), unwrap(student)
    params = _paired(list(teacher.named_parameters()), list(student.named_parameters()),
                     "parameters")
    buffers = _paired(list(teacher.named_buffers()), list(student.named_buffers()), "buffers")
    _lerp_or_copy(params, momentum)
    if not copy_buffers:
        _lerp_or_copy(buffers, momentum)
        return
    if copied is not None:
        buffers = [(t, s) for t, s in buffers if not copied.unchanged(t, s)]
    _lerp_or_copy(buffers, 0.0)
    if copied is not None:
        copied.record(buffers)


class ModelEMA:
    """A teacher kept as the EMA of a student, with its step count for exact resume.

    ``ModelEMA(student)`` deep-copies the (unwrapped) student into ``self.teacher``, puts it in
    eval mode and turns its gradients off. ``update(student)``, called after each optimizer
    step of the student, counts that step in ``self.step`` and applies one EMA step with
    ``ema_momentum(self.step, momentum, schedule, refresh)``, as training does: with
    ``refresh=N`` the teacher becomes a copy of the student after every N-th step.
    """

    def __init__(self, student: nn.Module, momentum: float = 0.999, schedule: str = "constant",
                 copy_buffers: bool = True, refresh: int = 0):
        ema_momentum(0, momentum, schedule, refresh)  # validates momentum, schedule and refresh
        self.teacher = copy.deepcopy(unwrap(student)).eval()
        self.teacher.requires_grad_(False)
        self.momentum = momentum
        self.schedule = schedule
        self.refresh = refresh
        self.copy_buffers = copy_buffers
        self.step = 0
        self._copied = CopiedBuffers()

    def update(self, student: nn.Module) -> float:
        """One EMA step towards ``student``. Returns the momentum that was used."""
        self.step += 1  # the student's steps so far, this one's included
        m = ema_momentum(self.step, self.momentum, self.schedule, self.refresh)
        ema_update(self.teacher, student, m, copy_buffers=self.copy_buffers, copied=self._copied)
        return m

    def state_dict(self) -> dict[str, Any]:
        """``{"step": int, "teacher": teacher.state_dict()}``."""
        return {"step": self.step, "teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.step = int(state["step"])
