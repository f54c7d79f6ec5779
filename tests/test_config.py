import re

import pytest

from softteacher.config import (
    Config,
    apply_dict,
    apply_overrides,
    check_config,
    config_from_dict,
    get_preset,
    load_config,
)


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


def test_null_words_unset_an_optional_path_and_nothing_else():
    cfg = Config()
    cfg.model.weights = cfg.model.backbone_weights = "a.pt"
    apply_overrides(cfg, ["model.weights=null", "model.backbone_weights=None", "data.train=~"])
    assert (cfg.model.weights, cfg.model.backbone_weights, cfg.data.train) == ("", "", "")
    # a list that is empty by default, too (a YAML file's null empties it already)
    assert apply_overrides(cfg, ["data.class_names=[a, b]"]).data.class_names == ("a", "b")
    assert apply_overrides(cfg, ["data.class_names=null"]).data.class_names == ()
    # a field with a default of its own keeps the word, and its check names it
    with pytest.raises(ValueError, match="model.norm 'none': expected auto, frozen_bn, bn or gn"):
        apply_overrides(cfg, ["model.norm=none"])
    assert apply_overrides(cfg, ["train.output_dir=None"]).train.output_dir == "None"
    with pytest.raises(ValueError, match=r"x.yaml: solver.amp: got the boolean False \(YAML reads "
                                         r"unquoted .*\): quote the word, as in amp: 'off'"):
        apply_dict(cfg, {"solver": {"amp": False}}, source="x.yaml")
    # YAML's null there is refused: it would write into the current folder, or drop the decay
    for section, key in (("train", "output_dir"), ("solver", "steps"), ("model", "norm")):
        with pytest.raises(ValueError, match=rf"x.yaml: {section}.{key}: null unsets only a setting "
                                             rf"that is empty by default; this one is .* by default"):
            apply_dict(cfg, {section: {key: None}}, source="x.yaml")
    assert apply_dict(cfg, {"model": {"weights": None}}).model.weights == ""
    # a refused value leaves the config as it was
    assert cfg.model.norm == "auto"
    with pytest.raises(ValueError, match="solver.lr must be at least 0"):
        apply_dict(cfg, {"train": {"seed": 9}, "solver": {"lr": -1}})
    assert (cfg.train.seed, cfg.solver.lr) == (Config().train.seed, Config().solver.lr)
    solver = cfg.solver
    with pytest.raises(ValueError, match="--set solver.gamma=x: solver.gamma: expected float, got .x."):
        apply_overrides(cfg, ["solver.lr=0.5", "solver.gamma=x"])
    assert cfg.solver.lr == Config().solver.lr
    apply_overrides(cfg, ["solver.lr=0.5"])
    assert solver.lr == 0.5 and cfg.solver is solver


def test_a_yaml_boolean_is_true_false_0_or_1():
    assert apply_dict(Config(), {"method": {"enabled": 0}}).method.enabled is False
    assert apply_dict(Config(), {"method": {"use_ema": 1}}).method.use_ema is True
    for value in (2, 0.5, [True]):
        with pytest.raises(ValueError, match=rf"config: method.enabled: expected a boolean, got "
                                             rf"{re.escape(repr(value))}$"):
            apply_dict(Config(), {"method": {"enabled": value}})


def test_channels_last_takes_a_word_and_the_booleans_it_was_once():
    assert Config().model.channels_last == "auto"
    # a YAML boolean (a config or checkpoint written when the field was one) is its word
    assert apply_dict(Config(), {"model": {"channels_last": True}}).model.channels_last == "true"
    assert config_from_dict({"model": {"channels_last": False}}).model.channels_last == "false"
    assert apply_overrides(Config(), ["model.channels_last=true"]).model.channels_last == "true"
    with pytest.raises(ValueError, match="model.channels_last 'yes': expected auto, true or false"):
        apply_overrides(Config(), ["model.channels_last=yes"])
    with pytest.raises(ValueError, match="solver.amp: got the boolean True"):  # only where a word is
        apply_dict(Config(), {"solver": {"amp": True}})


@pytest.mark.parametrize("item, message", [
    ("method.nope=1", "unknown key method.nope; known"),
    ("model.backbon=resnet18", r"unknown key model.backbon \(did you mean model.backbone\?\); known"),
    ("train.lr=0.1", r"unknown key train.lr \(did you mean solver.lr\?\); known"),
    ("solver.learning_rate=0.1", r"solver.learning_rate \(did you mean solver.lr\?\); known"),
    ("train.max_iters=10", r"train.max_iters \(did you mean solver.max_iter\?\); known"),
    ("model.ema_momentun=0.9", r"model.ema_momentun \(did you mean method.ema_momentum\?\); known"),
    ("lr=0.1", r"expected section.key=value \(did you mean solver.lr\?\)$"),
    ("method.zzz=1", r"unknown key method.zzz; known"),
    ("modle.norm=gn", r"unknown section 'modle' \(did you mean model\?\); known"),
    ("nosection.x=1", "unknown section 'nosection'"),
    ("method.use_ema=maybe", "expected a boolean"),
    ("solver.max_iter=abc", "expected int"),
    ("solver.max_iter=2.5", "solver.max_iter: expected an integer, got 2.5"),
    ("noequals", "expected section.key=value"),
])
def test_bad_overrides_name_the_key(item, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(Config(), [item])


@pytest.mark.parametrize("item, message", [
    ("solver.lr=-1", "solver.lr must be at least 0, got -1.0"),
    ("solver.lr=nan", "solver.lr must be a finite number, got nan"),
    ("train.batch_size=0", "train.batch_size must be at least 1, got 0"),
    ("method.ema_momentum=1.5", "method.ema_momentum must be between 0 and 1, got 1.5"),
    ("method.reg_score_threshold=2", "method.reg_score_threshold must be between 0 and 1, got 2.0"),
    ("augment.flip_prob=2", "augment.flip_prob must be between 0 and 1, got 2.0"),
    ("model.box_nms_thresh=7", "model.box_nms_thresh must be between 0 and 1, got 7.0"),
    ("model.aspect_ratios=[]", "model.aspect_ratios must hold at least one value"),
    ("model.aspect_ratios=[1.0,0]", r"model.aspect_ratios must be above 0, got \(1.0, 0.0\)"),
    ("augment.train_short_side=[0,400]", r"augment.train_short_side must be at least 1, got \(0, 400\)"),
    ("train.keep_last=-5", "train.keep_last must be at least 0, got -5"),
    ("method.jitter_times=1", "method.jitter_times must be at least 2, got 1"),  # a std of one copy
    ("solver.max_iter=2.5e0", "solver.max_iter: expected an integer, got 2.5"),
    ("solver.max_iter=1e400", "solver.max_iter: expected int, got inf"),
])
def test_numbers_out_of_their_range_name_the_key(item, message):
    with pytest.raises(ValueError, match=f"--set {re.escape(item)}: {message}"):
        apply_overrides(Config(), [item])


def test_ranges_cover_every_number_and_a_file_and_a_program_are_checked(tmp_path):
    import typing

    from softteacher.config import RANGES

    numeric = set()
    for name, section in typing.get_type_hints(Config).items():
        for f, tp in typing.get_type_hints(section).items():
            item = (typing.get_args(tp) or (tp,))[0]
            if item in (int, float):
                numeric.add(f"{name}.{f}")
    assert numeric == set(RANGES)  # a new number gets a range
    bad = tmp_path / "c.yaml"
    bad.write_text("solver:\n  max_iter: true\nmethod:\n  enabled:\n")
    with pytest.raises(ValueError, match=r"c\.yaml: solver\.max_iter: expected int, got True"):
        load_config("default", str(bad))
    bad.write_text("preset: tiny\nmethod:\n  enabled: false\ntrain:\n")  # a section left empty
    assert load_config(None, str(bad)).train.batch_size == get_preset("tiny").train.batch_size
    bad.write_text("method:\n  enabled:\n")
    with pytest.raises(ValueError, match=r"c\.yaml: method\.enabled: expected a boolean, got nothing"):
        load_config("default", str(bad))
    cfg = Config()
    cfg.method.jitter_times = 0
    with pytest.raises(ValueError, match="method.jitter_times must be at least 2, got 0"):
        check_config(cfg)


def test_yaml_file_with_preset_and_unknown_key(tmp_path):
    good = tmp_path / "a.yaml"
    good.write_text("preset: shapes-cpu\nmethod:\n  unsup_weight: 3.0\n")
    cfg = load_config(None, str(good), ["train.seed=7"])
    assert cfg.model.backbone == "resnet18" and cfg.method.unsup_weight == 3.0 and cfg.train.seed == 7
    assert load_config("shapes-cpu", str(good)).model.backbone == "resnet18"  # the same one twice
    with pytest.raises(ValueError, match=r"a\.yaml: names preset 'shapes-cpu', and 'default' was given "
                                         r"too: keep one of them"):
        load_config("default", str(good))
    plain = tmp_path / "c.yaml"
    plain.write_text("train:\n  seed: 3\n")  # names no preset: the command's default
    cfg = load_config(None, str(plain), fallback="tiny")
    assert cfg.solver.max_iter == get_preset("tiny").solver.max_iter and cfg.train.seed == 3
    bad = tmp_path / "b.yaml"
    bad.write_text("train:\n  sed: 1\n")
    with pytest.raises(ValueError, match=r"b\.yaml: unknown key train\.sed"):
        load_config("default", str(bad))


def test_a_config_file_that_is_no_yaml_or_cannot_be_read_gives_one_line(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("solver:\n  lr: [0.1\n  max_iter: 3\n")  # the list is never closed
    with pytest.raises(ValueError) as e:
        load_config("tiny", str(broken))
    assert str(e.value) == (f"{broken}: not valid YAML: line 3, column 11: expected ',' or ']', but got "
                            "':' (while parsing a flow sequence at line 2, column 7)")
    tab = tmp_path / "tab.yaml"
    tab.write_text("solver:\n\tlr: 1\n")
    with pytest.raises(ValueError) as e:
        load_config("tiny", str(tab))
    assert str(e.value) == (f"{tab}: not valid YAML: line 2, column 1: found character '\\t' that cannot "
                            "start any token")
    with pytest.raises(ValueError) as e:
        load_config("tiny", str(tmp_path / "none.yaml"))
    assert str(e.value) == f"{tmp_path / 'none.yaml'}: cannot read config: No such file or directory"


def test_unknown_preset(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        get_preset("nope")
    named = tmp_path / "c.yaml"
    named.write_text("preset: nope\n")
    with pytest.raises(ValueError, match=r"c\.yaml: unknown preset 'nope'; known: "):
        load_config(None, str(named))
    with pytest.raises(ValueError, match=r"^unknown preset 'nope'"):  # given on the command line
        load_config("nope", None)


def test_round_trip_through_dict():
    cfg = load_config("shapes-cpu", overrides=["method.reliability=iou"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize("item, allowed", [
    ("method.report=Teacher", "teacher or student"),
    ("method.ema_schedule=linear", "constant or ramp"),
    ("method.ema_buffers=lerp", "copy or average"),
    ("method.reliability=entropy", "bg_teacher, bg_student, pred_diff, iou, reverse_iou or none"),
    ("method.jitter_noise=laplace", "gaussian or uniform"),
    ("method.pseudo_source=oracle", "teacher, ground_truth, found_ground_truth or true_teacher"),
    ("augment.box_mapping=circle", "corners or ellipse"),
    ("model.norm=ln", "auto, frozen_bn, bn or gn"),
    ("model.backbone=vgg16", "resnet18, resnet34, resnet50, resnet101 or mobilenet_v3"),
    ("solver.amp=fp8", "auto, bf16, fp16 or off"),
])
def test_enumerated_fields_refuse_other_values(item, allowed):
    key, value = item.split("=")
    with pytest.raises(ValueError) as e:
        load_config("default", overrides=[item])
    assert str(e.value) == f"--set {item}: {key} {value!r}: expected {allowed}"


def test_enumerated_fields_in_a_file_and_a_saved_config(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("method:\n  report: Teacher\n")
    with pytest.raises(ValueError, match=r"c\.yaml: method\.report 'Teacher': expected teacher or student"):
        load_config("default", str(bad))
    saved = Config().to_dict()
    saved["method"]["reliability"] = "entropy"
    with pytest.raises(ValueError, match="saved config: method.reliability 'entropy'"):
        config_from_dict(saved)
    assert load_config("default", overrides=["method.report=student"]).method.report == "student"


def test_choices_are_those_the_code_knows():
    from softteacher import ema, geometry, model, soft_teacher
    from softteacher.config import CHOICES, PRESETS
    from softteacher.method import box_jitter
    from softteacher.method import soft_teacher as indicators

    assert CHOICES["method.ema_schedule"] == ema.SCHEDULES
    assert CHOICES["method.jitter_noise"] == box_jitter.NOISES
    assert CHOICES["method.reliability"] == indicators.INDICATORS
    assert CHOICES["method.pseudo_source"] == soft_teacher.PSEUDO_SOURCES
    assert CHOICES["augment.box_mapping"] == geometry.BOX_MAPPINGS
    assert CHOICES["model.backbone"] == model.BACKBONES
    for name in PRESETS:  # every preset's values are allowed
        config_from_dict(get_preset(name).to_dict())


def test_class_names_stay_the_words_written(tmp_path):
    cfg = load_config("default", overrides=["data.class_names=[on,no,null,1,true]"])
    assert cfg.data.class_names == ("on", "no", "null", "1", "true")
    cfg = load_config("default", overrides=["data.class_names=yes,off"])
    assert cfg.data.class_names == ("yes", "off")
    quoted = tmp_path / "q.yaml"
    quoted.write_text("data:\n  class_names: ['on', 'no']\n")
    assert load_config("default", str(quoted)).data.class_names == ("on", "no")
    bare = tmp_path / "b.yaml"
    bare.write_text("data:\n  class_names: [cat, on]\n")
    with pytest.raises(ValueError, match=r"b\.yaml: data\.class_names: True is not a string"):
        load_config("default", str(bare))


@pytest.mark.parametrize("item, message", [
    ("augment.color_level=[5]", "augment.color_level: expected 2 values, got 1"),
    ("method.sample_ratio=1,2,3", "method.sample_ratio: expected 2 values, got 3"),
    ("augment.erase_count=4", "augment.erase_count: expected 2 values, got 1"),
])
def test_fixed_length_tuples_refuse_other_lengths(item, message):
    with pytest.raises(ValueError, match=message):
        load_config("default", overrides=[item])
    cfg = load_config("default", overrides=["augment.train_short_sides=[640]"])
    assert cfg.augment.train_short_sides == (640,)  # any number of values


def test_an_integer_written_as_a_float_is_taken_as_a_yaml_file_takes_it():
    assert apply_overrides(Config(), ["solver.max_iter=2000.0"]).solver.max_iter == 2000
    assert apply_overrides(Config(), ["solver.max_iter=2e3"]).solver.max_iter == 2000
    with pytest.raises(ValueError, match="solver.max_iter: expected an integer, got 2000.5"):
        apply_overrides(Config(), ["solver.max_iter=2000.5"])



@pytest.mark.parametrize("item, message", [
    ("train.seed=-1", "train.seed must be between 0 and 9223372036854775807, got -1"),
    ("train.seed=9223372036854775808", "train.seed must be between 0 and 9223372036854775807"),
    ("augment.color_level=[9,1]", r"color_level must be \(low, high\) with low <= high, got \(9, 1\)"),
    ("augment.train_short_side=[1200,400]", r"train_short_side must be \(low, high\) with low <= high"),
    ("augment.erase_count=[4,1]", r"augment.erase_count must be \(low, high\) with low <= high"),
    ("model.compile_backbone=inducter", "model.compile_backbone 'inducter': not a torch.compile backend "
                                        r"\(did you mean inductor\?\); known: .*eager"),
])
def test_values_that_would_fail_later_are_refused_naming_the_key(item, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(Config(), [item])
    assert apply_overrides(Config(), ["augment.color_level=[5,5]"]).augment.color_level == (5, 5)
    assert apply_overrides(Config(), ["model.compile_backbone=eager"]).model.compile_backbone == "eager"


def test_config_files_with_a_key_twice_numbers_as_names_or_in_utf16(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("solver:\n  lr: 0.002\n  max_iter: 500\nmethod:\n  unsup_weight: 2.0\nsolver:\n"
                    "  steps: [400]\n")
    with pytest.raises(ValueError, match=r"c\.yaml: not valid YAML: line 6, column 1: key 'solver' given "
                                         r"twice \(first at line 1\): keep one \(while reading the mapping "
                                         r"at line 1"):
        load_config("tiny", str(path))
    path.write_text("solver:\n  lr: 0.002\n  lr: 0.003\n")
    with pytest.raises(ValueError, match=r"line 3, column 3: key 'lr' given twice \(first at line 2\)"):
        load_config("tiny", str(path))
    path.write_text("data:\n  class_names: [01, b]\n")
    with pytest.raises(ValueError, match=r"c\.yaml: data.class_names: 1 is a number, not a name as written"):
        load_config("tiny", str(path))
    path.write_text("data:\n  class_names: ['01', b]\n")
    assert load_config("tiny", str(path)).data.class_names == ("01", "b")
    path.write_text("data:\n  train: [a.json, b.json]\n")
    with pytest.raises(ValueError, match=r"c\.yaml: data.train: expected one value, got \['a.json', "):
        load_config("tiny", str(path))
    path.write_text("preset: [tiny]\n")
    with pytest.raises(ValueError, match=r"c\.yaml: preset must be a preset's name, got \['tiny'\]"):
        load_config(None, str(path))
    path.write_text("preset: tiny\nsolver:\n  lr: 0.002\n", encoding="utf-16")  # PowerShell's `>`
    cfg = load_config(None, str(path))
    assert cfg.solver.lr == 0.002 and cfg.model.backbone == get_preset("tiny").model.backbone
    path.write_bytes(b"solver:\n  lr: 0.002 \xff\n")
    with pytest.raises(ValueError, match=r"c\.yaml: cannot read config: not UTF-8 text \(invalid start "
                                         r"byte at byte 20\)"):
        load_config("tiny", str(path))
