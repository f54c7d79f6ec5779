"""What a training draw does with an image file that cannot be read."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from softteacher.config import AugmentConfig
from softteacher.data.datasets import load_coco, load_unlabeled
from softteacher.data.loading import LABELED, UNLABELED, MixedDataset
from softteacher.data.records import DatasetError

from .conftest import cut_short, write_image


@pytest.fixture
def sets(tmp_path, make_coco):
    labeled = load_coco(make_coco([(1, "a.jpg", 48, 40)], [(1, 1, 1, [4, 4, 20, 20])]))
    for i in range(3):
        write_image(tmp_path / "unl" / f"u{i}.jpg", 40, 32, seed=i)
    unlabeled = load_unlabeled(tmp_path / "unl")
    return labeled, unlabeled


def test_an_unlabeled_image_that_cannot_be_decoded_gives_its_draw_to_the_next(sets, caplog):
    labeled, unlabeled = sets
    bad = unlabeled.records[1]
    cut_short(Path(bad.path))
    ds = MixedDataset(labeled, unlabeled, AugmentConfig())
    with caplog.at_level(logging.WARNING, logger="softteacher.data.loading"):
        first = ds[(UNLABELED, 1, 7)]
        again = ds[(UNLABELED, 1, 7)]
    assert first.image_id == again.image_id == unlabeled.records[2].image_id
    # the same draw gives the same views (a resumed run draws what the first did)
    assert first.weak.equal(again.weak) and first.strong.equal(again.strong)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "u1.jpg" in warned[0] and "skipped" in warned[0]
    assert ds[(UNLABELED, 0, 7)].image_id == unlabeled.records[0].image_id


def test_the_last_unlabeled_image_passes_its_draw_to_the_first(sets):
    labeled, unlabeled = sets
    Path(unlabeled.records[2].path).unlink()
    ds = MixedDataset(labeled, unlabeled, AugmentConfig())
    assert ds[(UNLABELED, 2, 0)].image_id == unlabeled.records[0].image_id


def test_a_labeled_image_that_cannot_be_decoded_stops_training_with_its_name(sets):
    labeled, unlabeled = sets
    cut_short(Path(labeled.records[0].path))
    with pytest.raises(DatasetError, match=r"a\.jpg.*cannot read image file"):
        MixedDataset(labeled, unlabeled, AugmentConfig())[(LABELED, 0, 0)]


def test_an_unlabeled_set_whose_files_are_gone_is_an_error(sets, monkeypatch):
    labeled, unlabeled = sets
    for r in unlabeled.records:
        Path(r.path).unlink()
    with pytest.raises(DatasetError, match=r"3 unlabeled images in a row cannot be read, from image 2 on "
                                           r"\(the last: image file not found: .*u0\.jpg\)"):
        MixedDataset(labeled, unlabeled, AugmentConfig())[(UNLABELED, 1, 0)]
    # a long run of unreadable files stops at the limit, not after the whole set
    monkeypatch.setattr("softteacher.data.loading.MAX_UNREADABLE_IN_A_ROW", 2)
    with pytest.raises(DatasetError, match=r"2 unlabeled images in a row .* \(the last: .*u1\.jpg\)"):
        MixedDataset(labeled, unlabeled, AugmentConfig())[(UNLABELED, 0, 0)]


def test_batches_are_pinned_where_a_loader_pins_them(monkeypatch):
    """A DataLoader with ``pin_memory`` leaves a batch type without a ``pin_memory`` method as it
    is; each batch pins its tensors for the device and keeps the rest."""
    import torch
    from torch.utils.data._utils.pin_memory import pin_memory

    from softteacher.data.loading import LabeledBatch, MixedBatch, UnlabeledBatch

    pinned = []

    def fake_pin(t, *args, **kwargs):  # page-locking needs a GPU; mark the copy instead
        pinned.append(t)
        return t.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    im, boxes, labels, m = torch.rand(3, 4, 5), torch.rand(2, 4), torch.tensor([1, 2]), torch.eye(3)
    labeled = LabeledBatch([im], [{"boxes": boxes, "labels": labels}], [m], [7], [(4, 5)], dropped=1)
    weak, strong = torch.rand(3, 4, 5), torch.rand(3, 4, 5)
    unlabeled = UnlabeledBatch([weak], [strong], [m], [m], [8], [(4, 5)], [boxes], [labels])
    out = pin_memory(MixedBatch(labeled, unlabeled))
    assert isinstance(out, MixedBatch)
    assert [id(t) for t in pinned] == [id(t) for t in (im, boxes, labels, weak, strong)]
    assert torch.equal(out.labeled.images[0], im) and out.labeled.images[0] is not im
    assert torch.equal(out.labeled.targets[0]["boxes"], boxes) and out.labeled.dropped == 1
    assert out.labeled.matrices[0] is m and (out.labeled.image_ids, out.unlabeled.image_ids) == ([7], [8])
    assert out.unlabeled.strong[0] is not strong and torch.equal(out.unlabeled.strong[0], strong)
    assert out.unlabeled.gt_boxes[0] is boxes  # diagnostics stay where they are
