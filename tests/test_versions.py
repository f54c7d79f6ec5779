import torch

from softteacher import versions


def test_an_in_place_write_or_a_replaced_tensor_is_seen_and_a_read_is_not():
    a, b = torch.zeros(3), torch.ones(2)
    before = versions.snapshot([a, b])
    assert versions.unchanged(before, [a, b])
    _ = (a + b.sum()).mul(2)  # reads leave the versions alone
    assert versions.unchanged(before, (a, b))
    assert not versions.unchanged(before, [b, a])  # same tensors, other order
    assert not versions.unchanged(before, [a])  # one missing
    assert not versions.unchanged(before, [a, b.clone()])  # equal values, another tensor
    b.add_(0)  # an in-place write, even of nothing, bumps the counter
    assert not versions.unchanged(before, [a, b])
    after = versions.snapshot([a, b])
    assert versions.unchanged(after, [a, b])
    a.copy_(torch.ones(3))
    assert not versions.unchanged(after, [a, b])


def test_inference_tensors_are_never_taken_as_unchanged():
    with torch.inference_mode():
        c = torch.zeros(2)
    a = torch.zeros(2)
    assert versions.snapshot([a, c]) is None
    assert not versions.unchanged(None, [a, c])
    assert not versions.unchanged(None, [a])
    assert not versions.unchanged(versions.snapshot([a]), [c])
