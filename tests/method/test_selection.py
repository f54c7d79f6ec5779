
import pytest
import torch

from softteacher.method.pseudo_labels import (
    PseudoLabels,
    candidate_pseudo_labels,
    candidate_pseudo_labels_batch,
    pseudo_label_sets,
    pseudo_label_sets_batch,
)
from softteacher.method.selection import indices_of, kept_rows

from ..conftest import count_cuda_waits


def test_indices_of_matches_boolean_indexing_for_every_mask():
    masks = [torch.tensor([True, False, True, True]), torch.zeros(0, dtype=torch.bool),
             torch.tensor([False, False]), torch.tensor([False, True])]
    idx = indices_of(masks)
    assert [i.tolist() for i in idx] == [[0, 2, 3], [], [], [1]]
    assert all(i.dtype == torch.int64 for i in idx)
    x = torch.arange(4.0)
    assert torch.equal(x[idx[0]], x[masks[0]])
    assert indices_of([]) == []
    assert [i.tolist() for i in indices_of([torch.zeros(3, dtype=torch.bool)])] == [[]]
    g = torch.Generator().manual_seed(0)
    many = [torch.rand(int(n), generator=g) > 0.6 for n in torch.randint(0, 9, (40,), generator=g)]
    for i, m in zip(indices_of(many), many):
        assert torch.equal(i, m.nonzero().squeeze(1))


def test_kept_rows_gives_the_true_rows_and_each_chunks_count():
    mask = torch.tensor([True, False, True, False, False, True, True])
    rows, counts = kept_rows(mask, [3, 0, 2, 2])
    assert rows.tolist() == [0, 2, 5, 6] and rows.dtype == torch.int64
    assert counts == [2, 0, 0, 2]
    rows, counts = kept_rows(torch.zeros(0, dtype=torch.bool), [0, 0])
    assert rows.tolist() == [] and counts == [0, 0]
    with pytest.raises(ValueError, match="1-D bool of 5 entries"):
        kept_rows(mask, [3, 2])


def test_indices_of_rejects_masks_that_are_not_1d_bool():
    with pytest.raises(ValueError, match="mask 1 must be 1-D bool"):
        indices_of([torch.tensor([True]), torch.tensor([1, 0])])
    with pytest.raises(ValueError, match="mask 0 must be 1-D bool"):
        indices_of([torch.ones(2, 2, dtype=torch.bool)])


def _detections(scores, labels):
    n = len(scores)
    boxes = torch.arange(4 * n, dtype=torch.float32).reshape(n, 4)
    return {"boxes": boxes, "scores": torch.tensor(scores), "labels": torch.tensor(labels)}


def test_batched_selection_equals_the_per_image_one():
    dets = [_detections([0.95, 0.4, 0.7, 0.91], [1, 2, 3, 1]), _detections([], []),
            _detections([0.5, 0.99], [2, 2])]
    dets[1]["boxes"] = torch.zeros((0, 4))
    dets[1]["labels"] = torch.zeros(0, dtype=torch.int64)
    batch = candidate_pseudo_labels_batch(dets, 0.5)
    one = [candidate_pseudo_labels(d["boxes"], d["scores"], d["labels"], 0.5) for d in dets]
    # strict threshold: a score of exactly 0.5 is not a candidate
    assert [c.scores.tolist() for c in batch] == [pytest.approx([0.95, 0.7, 0.91]), [], pytest.approx([0.99])]
    for b, o in zip(batch, one):
        assert torch.equal(b.boxes, o.boxes) and torch.equal(b.labels, o.labels)
    rels = [torch.tensor([0.01, 0.03, 0.019]), torch.zeros(0), torch.tensor([float("nan")])]
    thresholds = dict(cls_pseudo_threshold=0.9, rpn_pseudo_threshold=0.9, reg_pseudo_threshold=0.02)
    sets = pseudo_label_sets_batch(batch, rels, **thresholds)
    assert [s.cls.labels.tolist() for s in sets] == [[1, 1], [], [2]]
    assert [s.reg.scores.tolist() for s in sets] == [pytest.approx([0.95, 0.91]), [], []]  # NaN is never kept
    for b, r, s in zip(batch, rels, sets):
        single = pseudo_label_sets(b, r, **thresholds)
        for got, want in zip(s, single):
            assert torch.equal(got.boxes, want.boxes) and torch.equal(got.scores, want.scores)
    # without jittering the regression set is the classification rule
    assert [s.reg.labels.tolist() for s in pseudo_label_sets_batch(batch, [None] * 3, **thresholds)] == \
        [[1, 1], [], [2]]
    mixed = [rels[0], None, None]  # each image by its own rule
    for b, r, s in zip(batch, mixed, pseudo_label_sets_batch(batch, mixed, **thresholds)):
        for got, want in zip(s, pseudo_label_sets(b, r, **thresholds)):
            assert torch.equal(got.boxes, want.boxes) and torch.equal(got.labels, want.labels)
    assert pseudo_label_sets_batch([], []) == [] and candidate_pseudo_labels_batch([]) == []
    with pytest.raises(ValueError, match="3 candidate sets but 2 reliabilities"):
        pseudo_label_sets_batch(batch, rels[:2], **thresholds)
    assert isinstance(batch[0], PseudoLabels)


@pytest.mark.gpu
def test_indices_of_on_cuda_reads_the_device_once_and_matches_boolean_indexing():
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    masks = [torch.rand(n, generator=g, device=device) > 0.5 for n in (0, 7, 1000, 3)]
    x = torch.arange(1000, device=device)

    def select():
        idx = indices_of(masks)
        return idx, [x[:len(m)].index_select(0, i) for m, i in zip(masks, idx)]

    (idx, selected), waits = count_cuda_waits(select)
    assert len(waits) == 1, waits
    for m, i, s in zip(masks, idx, selected):
        assert i.device.type == "cuda"
        assert torch.equal(s, torch.arange(len(m), device=device)[m])
