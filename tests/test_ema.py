import copy

import pytest
import torch
from torch import nn

from softteacher.ema import ModelEMA, ema_momentum, ema_update, unwrap


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_momentum_constant_and_ramp():
    assert ema_momentum(0, 0.999, "constant") == 0.999
    assert ema_momentum(12345, 0.999, "constant") == 0.999
    assert ema_momentum(0, 0.999, "ramp") == 0.0  # teacher = student at the first update
    assert ema_momentum(1, 0.999, "ramp") == 0.5
    assert ema_momentum(9, 0.999, "ramp") == pytest.approx(0.9)
    assert ema_momentum(49, 0.999, "ramp") == pytest.approx(0.98)
    assert ema_momentum(999, 0.999, "ramp") == pytest.approx(0.999)
    assert ema_momentum(10**6, 0.999, "ramp") == 0.999


def test_refresh_makes_every_nth_step_a_copy_and_leaves_the_others_to_the_schedule():
    # a frozen teacher (m = 1) refreshed every 250 steps: 0 at 250, 500, 1250; 1 elsewhere
    assert [ema_momentum(s, 1.0, "constant", 250) for s in (0, 1, 249, 250, 251, 500, 1249, 1250)] == [
        1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert ema_momentum(3, 0.999, "constant", 3) == 0.0
    assert ema_momentum(4, 0.999, "constant", 3) == 0.999
    assert ema_momentum(2, 0.999, "ramp", 4) == pytest.approx(2 / 3)  # ramp between refreshes
    assert ema_momentum(4, 0.999, "ramp", 4) == 0.0
    assert ema_momentum(4, 0.999, "ramp", 0) == pytest.approx(0.8)  # 0: never


@pytest.mark.parametrize("args", [(-1, 0.999, "ramp"), (0, 1.5, "constant"), (0, 0.9, "cosine"),
                                  (5, 0.999, "constant", -1)])
def test_momentum_errors(args):
    with pytest.raises(ValueError):
        ema_momentum(*args)


def test_update_averages_params_and_copies_buffers():
    teacher, student = _net(0), _net(1)
    student[1].running_mean.fill_(3.0)
    student[1].num_batches_tracked.fill_(7)
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 0.75)
    for name, p in teacher.named_parameters():
        expected = 0.75 * t0[name] + 0.25 * dict(student.named_parameters())[name]
        torch.testing.assert_close(p, expected)
    assert torch.equal(teacher[1].running_mean, torch.full((4,), 3.0))
    assert int(teacher[1].num_batches_tracked) == 7
    assert all(p.grad is None for p in teacher.parameters())


def test_update_averages_float_buffers_when_asked():
    teacher, student = _net(0), _net(1)
    teacher[1].running_mean.fill_(1.0)
    student[1].running_mean.fill_(3.0)
    student[1].num_batches_tracked.fill_(5)
    ema_update(teacher, student, 0.5, copy_buffers=False)
    assert torch.allclose(teacher[1].running_mean, torch.full((4,), 2.0))
    assert int(teacher[1].num_batches_tracked) == 5  # non-float: always copied


def test_momentum_zero_copies_exactly_and_one_keeps():
    teacher, student = _net(0), _net(1)
    with torch.no_grad():
        teacher[0].weight.fill_(1e8)
        student[0].weight.fill_(1e-8)
    keep = copy.deepcopy(teacher)
    ema_update(teacher, student, 1.0)
    for (_, a), (_, b) in zip(teacher.named_parameters(), keep.named_parameters()):
        assert torch.equal(a, b)
    ema_update(teacher, student, 0.0)
    for a, b in zip(teacher.state_dict().values(), student.state_dict().values()):
        assert torch.equal(a, b)


def test_unwrap_and_wrapped_student():
    teacher, student = _net(0), _net(1)
    wrapped = nn.DataParallel(student)  # without GPUs a plain holder of .module
    assert unwrap(wrapped) is student
    assert unwrap(student) is student
    ema_update(teacher, wrapped, 0.0)
    for a, b in zip(teacher.state_dict().values(), student.state_dict().values()):
        assert torch.equal(a, b)


def test_ddp_student(tmp_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        teacher, student = _net(0), _net(1)
        ddp = nn.parallel.DistributedDataParallel(student)
        assert unwrap(ddp) is student
        ema_update(teacher, ddp, 0.5)
        torch.testing.assert_close(teacher[2].bias, 0.5 * _net(0)[2].bias + 0.5 * student[2].bias)
    finally:
        dist.destroy_process_group()


def test_mismatched_models_raise():
    with pytest.raises(ValueError, match="parameters differ"):
        ema_update(_net(0), nn.Linear(3, 4), 0.5)
    with pytest.raises(ValueError):
        ema_update(_net(0), _net(1), 1.5)


def test_model_ema_ramp_and_exact_resume():
    student = _net(0)
    ema = ModelEMA(student, momentum=0.9, schedule="ramp")
    assert not ema.teacher.training
    assert not any(p.requires_grad for p in ema.teacher.parameters())
    moms = []
    for step in range(3):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.1 * (step + 1))
        moms.append(ema.update(student))
    assert moms == [0.5, pytest.approx(2 / 3), 0.75]  # after steps 1, 2, 3: 1 - 1/(k+1), as training
    state = copy.deepcopy(ema.state_dict())
    resumed = ModelEMA(_net(5), momentum=0.9, schedule="ramp")
    resumed.load_state_dict(state)
    assert resumed.step == 3
    for _ in range(2):
        ema.update(student)
        resumed.update(student)
    for a, b in zip(ema.teacher.state_dict().values(), resumed.teacher.state_dict().values()):
        assert torch.equal(a, b)


def test_model_ema_with_refresh_freezes_and_copies_by_hand():
    # a frozen teacher (m = 1) refreshed every 2nd step: the parameter a = 1.0 in the teacher,
    # the student's a after steps 1, 2, 3, 4, 5 is 2, 3, 4, 5, 6; the teacher keeps 1.0 after
    # step 1 (m 1), copies 3.0 after step 2 (m 0), keeps it after step 3 and copies 5.0 after 4
    from softteacher.ema import ema_momentum

    student = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        student.weight.fill_(1.0)
    ema = ModelEMA(student, momentum=1.0, refresh=2)
    seen, moms = [], []
    for _ in range(5):
        with torch.no_grad():
            student.weight.add_(1.0)  # the optimizer's step
        moms.append(ema.update(student))
        seen.append(ema.teacher.weight.item())
    assert moms == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert moms == [ema_momentum(k, 1.0, "constant", 2) for k in range(1, 6)]  # the training loop's
    assert seen == [1.0, 3.0, 3.0, 5.0, 5.0]
    with pytest.raises(ValueError, match="refresh"):
        ModelEMA(student, refresh=-1)


def test_ema_step_with_half_momentum_by_hand():
    class Two(nn.Module):
        def __init__(self, a: float, b: float):
            super().__init__()
            self.a = nn.Parameter(torch.tensor(a))
            self.b = nn.Parameter(torch.tensor(b))

    teacher, student = Two(2.0, -4.0), Two(6.0, 0.0)
    ema_update(teacher, student, 0.5)
    # 0.5 * 2 + 0.5 * 6 = 4 ; 0.5 * -4 + 0.5 * 0 = -2
    assert teacher.a.item() == 4.0 and teacher.b.item() == -2.0
    assert student.a.item() == 6.0 and student.b.item() == 0.0


def test_buffers_the_student_did_not_change_are_not_copied_again():
    from softteacher.ema import CopiedBuffers
    teacher, student = _net(0), _net(1)
    copied = CopiedBuffers()
    student[1].running_mean.fill_(3.0)
    ema_update(teacher, student, 0.5, copied=copied)
    assert torch.equal(teacher[1].running_mean, student[1].running_mean)
    version = teacher[1].running_mean._version
    ema_update(teacher, student, 0.5, copied=copied)
    assert teacher[1].running_mean._version == version  # untouched: it holds the student's values
    student[1].running_mean.fill_(5.0)  # a training step's BatchNorm update
    ema_update(teacher, student, 0.5, copied=copied)
    assert torch.equal(teacher[1].running_mean, torch.full((4,), 5.0))
    with torch.no_grad():
        teacher[1].running_mean.zero_()  # e.g. a resume loading another state into the teacher
    ema_update(teacher, student, 0.5, copied=copied)
    assert torch.equal(teacher[1].running_mean, torch.full((4,), 5.0))
    student[1] = nn.BatchNorm1d(4)  # a new tensor object is never taken for the old one
    student[1].running_mean.fill_(7.0)
    ema_update(teacher, student, 0.5, copied=copied)
    assert torch.equal(teacher[1].running_mean, torch.full((4,), 7.0))
