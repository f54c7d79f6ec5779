import os

import pytest
import torch

# Two cores on CI: keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def count_cuda_waits(fn):
    """``fn()`` and the messages of the times it made the host wait for the CUDA device (work
    queued before the call is finished first, so that it is not counted)."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return out, [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory):
    """A few images of the embedded dataset, generated once per test session."""
    from softteacher.data.shapes import generate_shapes

    root = tmp_path_factory.mktemp("shapes")
    return generate_shapes(root, seed=0, num_train=10, num_val=4, num_unlabeled=8)


@pytest.fixture
def tiny_cfg(tiny_shapes, tmp_path):
    """The `tiny` preset pointed at the tiny shapes data, writing into tmp_path."""
    from softteacher.config import preset_tiny

    cfg = preset_tiny()
    d = cfg.data
    d.train, d.train_images = tiny_shapes.train_json, tiny_shapes.train_images
    d.val, d.val_images = tiny_shapes.val_json, tiny_shapes.val_images
    d.unlabeled, d.unlabeled_images = tiny_shapes.unlabeled_json, tiny_shapes.unlabeled_images
    d.unlabeled_gt = tiny_shapes.unlabeled_gt_json
    cfg.train.output_dir = str(tmp_path / "run")
    return cfg
