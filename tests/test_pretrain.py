"""benchmarks/pretrain.py: its augmentation, its crop cache, and weights that load as a
detector's backbone."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import pretrain  # noqa: E402

from softteacher.config import PRESETS  # noqa: E402
from softteacher.data import shapes  # noqa: E402
from softteacher.engine import cpu_has_amx, cpu_has_bf16  # noqa: E402
from softteacher.model import build_backbone, resolve_norm  # noqa: E402


def test_augment_flips_and_shifts_each_image_within_an_eighth():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16) + 1  # no zeros
    y = pretrain.augment(x, g)
    assert y.shape == x.shape
    pad = 2  # 16 // 8
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    padded_flipped = torch.nn.functional.pad(x.flip(3), (pad,) * 4)
    for n in range(2):
        found = [(f, dy, dx) for f, src in ((0, padded), (1, padded_flipped))
                 for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                 if torch.equal(y[n], src[n, :, dy:dy + 16, dx:dx + 16])]
        assert len(found) == 1, found
    # over many images both flips and shifts in both directions occur
    many = torch.rand(64, 3, 16, 16) + 1
    out = pretrain.augment(many, g)
    zero_cols = (out == 0).all(2).all(1)  # (64, 16): columns of padding
    assert zero_cols[:, 0].any() and zero_cols[:, -1].any()


def test_crops_are_drawn_once_then_read_from_the_cache(tmp_path, monkeypatch):
    images, labels = pretrain.draw_crops(0, 10, 4, 24, tmp_path)
    assert images.shape == (4, 24, 24, 3) and images.dtype == np.uint8
    image, label = shapes.render_pretrain_crop(0, 12, 24)
    np.testing.assert_array_equal(images[2], np.asarray(image))
    assert labels[2] == label

    def boom(*a, **k):
        raise AssertionError("drew a crop although the cache holds them")

    monkeypatch.setattr(shapes, "render_pretrain_crop", boom)
    again, again_labels = pretrain.draw_crops(0, 10, 4, 24, tmp_path)
    np.testing.assert_array_equal(again, images)
    np.testing.assert_array_equal(again_labels, labels)


def test_fingerprint_changes_with_one_pixel_or_one_label():
    images = np.zeros((3, 4, 4, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2])
    base = pretrain.fingerprint(images, labels)
    assert base == pretrain.fingerprint(images.copy(), labels.copy())
    assert len(base) == 64
    changed = images.copy()
    changed[2, 3, 3, 2] = 1
    assert pretrain.fingerprint(changed, labels) != base
    assert pretrain.fingerprint(images, np.array([0, 1, 3])) != base
    # the same bytes in another shape are other crops
    assert pretrain.fingerprint(images.reshape(3, 2, 8, 3), labels) != base


def test_pretrained_weights_load_as_the_detector_backbone(tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "r18.pt"
    record = pretrain.pretrain("resnet18", num_train=24, num_val=8, size=32, epochs=1, batch=12,
                               out=out, log=lambda *_: None)
    assert record["epochs"] == 1 and len(record["curve"]) == 1
    assert 0.0 <= record["val_accuracy"] <= 1.0
    assert Path(str(out.with_suffix(".json"))).is_file()
    # the record names the crops it trained on and what decided its arithmetic
    train_x, train_y = pretrain.draw_crops(0, 0, 24, 32, None)
    assert record["crops_sha256"]["train"] == pretrain.fingerprint(train_x, train_y)
    assert record["crops_sha256"]["val"] != record["crops_sha256"]["train"]
    assert record["software"]["torch"] == torch.__version__
    assert record["software"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["software"]["cpu_bf16"] is cpu_has_bf16()
    assert record["software"]["cpu_amx"] is cpu_has_amx()
    state = torch.load(out, weights_only=True)
    assert not any(k.startswith("fc.") for k in state) and "layer4.1.bn2.running_var" in state

    cfg = PRESETS["shapes-cpu"]().model
    cfg.backbone_weights = str(out)
    assert resolve_norm(cfg) == "frozen_bn"  # as over ImageNet weights
    backbone, _ = build_backbone(cfg)
    body = backbone.body
    assert torch.equal(body.layer2[0].conv1.weight, state["layer2.0.conv1.weight"])
    # frozen BN takes the trained running statistics
    assert torch.equal(body.layer3[1].bn1.running_mean, state["layer3.1.bn1.running_mean"])
    # stem and layer1 frozen as over ImageNet weights (model.trainable_layers = 3)
    assert not body.conv1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad


def test_rejects_a_backbone_that_is_no_resnet(tmp_path):
    with pytest.raises(ValueError, match="expected a ResNet"):
        pretrain.pretrain("mobilenet_v3", num_train=4, num_val=4, out=tmp_path / "x.pt")


def test_a_stopped_pretraining_resumes_to_the_same_weights(tmp_path):
    args = dict(backbone="resnet18", num_train=24, num_val=8, size=32, epochs=3, batch=12)
    whole = pretrain.pretrain(**args, out=tmp_path / "whole" / "r18.pt", log=lambda *_: None)

    class Stop(Exception):
        pass

    def stop_after_epoch_2(line):
        if line.startswith("epoch 2/3"):
            raise Stop

    out = tmp_path / "parts" / "r18.pt"
    state_file = pretrain.resume_path(out)
    assert state_file.name == "r18.resume.pt"
    with pytest.raises(Stop):
        pretrain.pretrain(**args, out=out, log=stop_after_epoch_2)
    assert state_file.is_file() and not out.exists()

    with pytest.raises(ValueError, match=r"r18.resume.pt: saved by a run with other settings "
                                         r"\(lr 0.05 there, 0.1 here\)"):
        pretrain.pretrain(**args, lr=0.1, out=out, log=lambda *_: None)

    lines = []
    parts = pretrain.pretrain(**args, out=out, log=lines.append)
    assert lines[1].startswith("resuming after epoch 2/3 from ") and lines[2].startswith("epoch 3/3")
    assert parts["resumed"][0]["threads"] == torch.get_num_threads()
    assert not state_file.exists()
    assert [r["after_epoch"] for r in parts["resumed"]] == [2] and whole["resumed"] == []
    assert [c["train_loss"] for c in parts["curve"]] == [c["train_loss"] for c in whole["curve"]]
    a = torch.load(tmp_path / "whole" / "r18.pt", weights_only=True)
    b = torch.load(out, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_unreadable_pretraining_state_is_named(tmp_path):
    out = tmp_path / "r18.pt"
    pretrain.resume_path(out).write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"r18.resume.pt: not a readable pretraining state.*delete it"):
        pretrain.pretrain("resnet18", num_train=4, num_val=2, size=16, epochs=2, batch=2, out=out,
                          log=lambda *_: None)


def test_a_resume_with_other_threads_is_warned_of(tmp_path):
    args = dict(backbone="resnet18", num_train=8, num_val=4, size=16, epochs=2, batch=4,
                out=tmp_path / "r18.pt")

    def stop_after_epoch_1(line):
        if line.startswith("epoch 1/2"):
            raise KeyboardInterrupt

    threads = torch.get_num_threads()
    other = 1 if threads > 1 else 2
    try:
        torch.set_num_threads(other)
        with pytest.raises(KeyboardInterrupt):
            pretrain.pretrain(**args, log=stop_after_epoch_1)
    finally:
        torch.set_num_threads(threads)
    lines = []
    pretrain.pretrain(**args, log=lines.append)
    assert f"warning: {other} threads before, {threads} now" in "\n".join(lines)


def test_a_finished_pretraining_is_not_trained_again(tmp_path):
    args = dict(backbone="resnet18", num_train=8, num_val=4, size=16, epochs=1, batch=4)
    out = tmp_path / "r18.pt"
    first = pretrain.pretrain(**args, out=out, log=lambda *_: None)
    written = out.stat().st_mtime_ns
    lines = []
    again = pretrain.pretrain(**args, out=out, log=lines.append)
    assert again == json.loads(out.with_suffix(".json").read_text())
    assert again["curve"] == first["curve"] and out.stat().st_mtime_ns == written
    assert lines[-1] == (f"{out}: already trained with these settings (val accuracy "
                         f"{first['val_accuracy']:.3f}); delete it to train again")
    assert not any(line.startswith("epoch ") for line in lines)
    with pytest.raises(ValueError, match=r"r18.pt: trained with other settings \(epochs 1 there, "
                                         r"2 here\); choose another --out, or delete it and "
                                         r"r18.json to train again"):
        pretrain.pretrain(**{**args, "epochs": 2}, out=out, log=lambda *_: None)
    assert out.stat().st_mtime_ns == written
