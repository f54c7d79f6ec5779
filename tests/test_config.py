import pytest

from softteacher.config import Config, apply_overrides, config_from_dict, get_preset, load_config


def test_defaults_follow_the_spec():
    cfg = Config()
    m = cfg.method
    assert (m.unsup_weight, m.ema_momentum, m.pseudo_threshold) == (4.0, 0.999, 0.5)
    assert (m.cls_pseudo_threshold, m.rpn_pseudo_threshold, m.reg_pseudo_threshold) == (0.9, 0.9, 0.02)
    assert (m.jitter_times, m.jitter_scale, m.reliability) == (10, 0.06, "bg_teacher")
    assert m.sample_ratio == (1, 4)
    s = cfg.solver
    assert (s.max_iter, s.lr, s.momentum, s.weight_decay, s.steps) == (180_000, 0.01, 0.9, 1e-4,
                                                                       (120_000, 160_000))
    md = cfg.model
    assert (md.rpn_nms_thresh, md.rpn_post_nms_top_n_train, md.rpn_post_nms_top_n_test) == (0.7, 2000, 1000)
    assert (md.box_batch_size_per_image, md.box_positive_fraction) == (512, 0.25)
    assert len(md.anchor_sizes) == 5 and len(md.aspect_ratios) == 3
    assert cfg.augment.train_short_side == (400, 1200) and cfg.augment.train_max_size == 1333


def test_full_label_preset():
    cfg = get_preset("coco-full")
    # 8 images per GPU in 1:1 (SPEC §6): both sources' share of a Soft Teacher batch
    assert cfg.method.unsup_weight == 2.0 and cfg.method.sample_ratio == (4, 4)
    assert sum(cfg.method.sample_ratio) == cfg.train.batch_size == 8
    assert cfg.solver.max_iter == 720_000 and cfg.solver.steps == (480_000, 680_000)


def test_set_overrides_coerce_types():
    cfg = apply_overrides(Config(), ["method.unsup_weight=2", "method.use_ema=false",
                                     "solver.steps=100,200", "method.sample_ratio=[1,1]",
                                     "solver.max_iter=1e3"])
    assert cfg.method.unsup_weight == 2.0 and isinstance(cfg.method.unsup_weight, float)
    assert cfg.method.use_ema is False
    assert cfg.solver.steps == (100, 200)
    assert cfg.method.sample_ratio == (1, 1)
    assert cfg.solver.max_iter == 1000


@pytest.mark.parametrize("item, message", [
    ("method.nope=1", "unknown key method.nope"),
    ("nosection.x=1", "unknown section 'nosection'"),
    ("method.use_ema=maybe", "expected a boolean"),
    ("solver.max_iter=abc", "expected int"),
    ("solver.max_iter=2.5", "expected int"),
    ("noequals", "expected section.key=value"),
])
def test_bad_overrides_name_the_key(item, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(Config(), [item])


def test_yaml_file_with_preset_and_unknown_key(tmp_path):
    good = tmp_path / "a.yaml"
    good.write_text("preset: shapes-cpu\nmethod:\n  unsup_weight: 3.0\n")
    cfg = load_config("default", str(good), ["train.seed=7"])
    assert cfg.model.backbone == "resnet18" and cfg.method.unsup_weight == 3.0 and cfg.train.seed == 7
    bad = tmp_path / "b.yaml"
    bad.write_text("train:\n  sed: 1\n")
    with pytest.raises(ValueError, match=r"b\.yaml: unknown key train\.sed"):
        load_config("default", str(bad))


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        get_preset("nope")


def test_round_trip_through_dict():
    cfg = load_config("shapes-cpu", overrides=["method.reliability=iou"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
