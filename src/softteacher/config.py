"""Typed configuration: nested dataclasses, named presets, YAML and ``--set`` overrides.

Defaults are the paper's (../SPEC §1-6); presets change what a machine needs changed.
Field names follow the spec (``cls_pseudo_threshold``, ``unsup_weight``, ...).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class DataConfig:
    """Where the images and annotations are.

    ``train``/``val``: a COCO json, or a Pascal VOC root (a folder with ``Annotations/``).
    ``unlabeled``: a COCO json (``images`` only is enough) or a folder of images.
    ``*_images``: the folder COCO ``file_name``s are relative to (default: beside the json).
    ``*_split``: the VOC image set (``ImageSets/Main/{split}.txt``).
    ``unlabeled_gt``: optional hidden ground truth of the unlabeled pool, for diagnostics only
    (the unlabeled images under the same ids).
    ``class_names``: a VOC training set's classes in label order. Empty: the 20 VOC classes when
    every class found is one of them, else the sorted names found; a VOC val set always takes
    the training set's classes.
    ``group_by_aspect``: every batch of a rank holds images of one orientation (wider than
    tall, or not), labeled and unlabeled alike, so that it pads to less (as the reference's
    group sampler and torchvision's and detectron2's training do).
    """

    train: str = ""
    train_images: str = ""
    train_split: str = "trainval"
    val: str = ""
    val_images: str = ""
    val_split: str = "test"
    unlabeled: str = ""
    unlabeled_images: str = ""
    unlabeled_gt: str = ""
    class_names: tuple[str, ...] = ()
    num_workers: int = 2  # loader processes per rank: training, evaluation, eval and predict
    group_by_aspect: bool = True


@dataclass
class AugmentConfig:
    """Magnitudes of the views (SPEC §1, §10).

    Training resize: short side uniform in ``train_short_side`` (inclusive) or drawn from
    ``train_short_sides`` when that list is non-empty; long side capped at ``train_max_size``.
    """

    train_short_side: tuple[int, int] = (400, 1200)
    train_short_sides: tuple[int, ...] = ()
    train_max_size: int = 1333
    test_short_side: int = 800
    test_max_size: int = 1333
    flip_prob: float = 0.5
    color_level: tuple[int, int] = (1, 9)
    translate: float = 0.1
    rotate_deg: float = 30.0
    shear_deg: float = 30.0
    erase_count: tuple[int, int] = (1, 4)  # patches, an inclusive range (the reference's; SPEC §10)
    erase_max_frac: float = 0.2
    independent_views: bool = False
    min_box_size: float = 1.0
    # how pseudo boxes and proposals move between views through rotate and shear:
    # corners (the reference) | ellipse (see geometry.transform_boxes)
    box_mapping: str = "corners"


@dataclass
class ModelConfig:
    """Faster R-CNN + FPN (SPEC §5). ``weights``: a whole detector; ``backbone_weights``:
    ImageNet classification weights in torchvision naming; both local files.
    ``torchvision_weights``: a named torchvision weight enum to download (explicit opt-in)."""

    backbone: str = "resnet50"
    backbone_weights: str = ""
    weights: str = ""
    torchvision_weights: str = ""
    norm: str = "auto"  # auto (frozen_bn when pretrained, else gn) | frozen_bn | bn | gn
    sync_bn: bool = False  # SyncBatchNorm across processes (with norm=bn)
    trainable_layers: int = 3
    fpn_channels: int = 256
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_nms_thresh: float = 0.7
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    representation_size: int = 1024
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 100
    # backbone and FPN in NHWC memory: auto (with frozen BatchNorm under a ResNet) | true | false
    channels_last: str = "auto"
    # a torch.compile backend for backbone + FPN ("inductor"; compiles at the first steps), "" eager
    compile_backbone: str = ""


# model fields that change neither the weights nor the training: a run may resume with others
RUNTIME_MODEL_KEYS = frozenset({
    "box_score_thresh", "box_nms_thresh", "box_detections_per_img", "rpn_pre_nms_top_n_test",
    "rpn_post_nms_top_n_test", "channels_last", "compile_backbone", "sync_bn"})


@dataclass
class SolverConfig:
    """SGD with linear warm-up and step decay (SPEC §6)."""

    max_iter: int = 180_000
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 500
    warmup_factor: float = 0.001
    steps: tuple[int, ...] = (120_000, 160_000)
    gamma: float = 0.1
    clip_grad_norm: float = 0.0
    amp: str = "auto"  # auto (CUDA: bf16 when supported, else fp16; CPU: off) | bf16 | fp16 (CUDA) | off
    max_bad_steps: int = 5


@dataclass
class MethodConfig:
    """Soft Teacher (SPEC §1-4). ``enabled=False`` trains the supervised baseline."""

    enabled: bool = True
    sample_ratio: tuple[int, int] = (1, 4)
    unsup_weight: float = 4.0
    use_ema: bool = True
    ema_momentum: float = 0.999
    ema_schedule: str = "constant"  # constant | ramp: min(m, 1 - 1/(step+1))
    # after every this-many-th iteration of the run (N, 2N, ..., a run continued from a checkpoint
    # counting on from its iteration) the teacher becomes a copy of the student; 0: never. With
    # ema_momentum=1.0 (and the constant schedule: the ramp's stays under 1) the teacher is
    # frozen between refreshes: multi-stage training in rounds
    teacher_refresh: int = 0
    ema_buffers: str = "copy"  # copy | average: the student's buffers (BatchNorm statistics) into the teacher
    pseudo_threshold: float = 0.5
    cls_pseudo_threshold: float = 0.9
    rpn_pseudo_threshold: float = 0.9
    reg_pseudo_threshold: float = 0.02
    # a score floor for the regression pseudo boxes that jittering chooses (0: none beyond
    # pseudo_threshold, the reference's rule); a diagnostic, not part of the method
    reg_score_threshold: float = 0.0
    use_jitter: bool = True
    jitter_times: int = 10
    jitter_scale: float = 0.06
    jitter_noise: str = "gaussian"  # gaussian | uniform
    reliability: str = "bg_teacher"  # bg_teacher | bg_student | pred_diff | iou | reverse_iou | none
    report: str = "teacher"  # which model the headline numbers come from
    # where the pseudo boxes come from: the teacher, or (diagnostics) the unlabeled pool's hidden
    # ground truth, data.unlabeled_gt, with the teacher's soft weights kept: all of it (an upper
    # bound), or the objects the teacher's classification pseudo boxes find (its recall, exact
    # boxes); or the teacher's own boxes less the false ones (true_teacher)
    pseudo_source: str = "teacher"  # teacher | ground_truth | found_ground_truth | true_teacher


@dataclass
class TrainConfig:
    """The run: output folder, batch, logging, evaluation and checkpoint periods.

    ``eval_batch_size``: images per inference batch when evaluating. With 1 (the default, as in
    torchvision's and detectron2's evaluation) every image's detections are those ``predict``
    gives it alone; in a batch of several, each image is padded to the batch's largest, and the
    padding enters the features at its border and, with GroupNorm, every normalisation of the
    image, so its detections depend on the images it is batched with.
    """

    output_dir: str = "runs/default"
    seed: int = 0
    batch_size: int = 5
    device: str = "auto"
    num_threads: int = 0
    log_period: int = 20
    eval_period: int = 5000
    eval_batch_size: int = 1
    checkpoint_period: int = 5000
    keep_last: int = 3
    vis_period: int = 1000
    warn_empty_iters: int = 500  # warn after this many iterations in a row without a pseudo box; 0: never
    # DDP keeps its first gradient buckets (find_unused_parameters: a look over the graph each
    # step) rather than rebuilding them at each start, so that a run resumed by 3 or more
    # processes sums their gradients in the same order and trains to the bit as if never stopped
    exact_resume: bool = False


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(self.to_dict()), sort_keys=False)

    def fingerprint(self) -> dict:
        """The fields a checkpoint must agree on to be resumed: the model's architecture and what
        it trains (whether its backbone started pretrained: that sets ``norm: auto`` and the
        trainable layers), not where its weights came from nor how it detects or runs
        (``RUNTIME_MODEL_KEYS``)."""
        m = self.model
        fp = {k: v for k, v in _plain(dataclasses.asdict(m)).items() if k not in RUNTIME_MODEL_KEYS}
        return fp | {"backbone_weights": None, "weights": None, "torchvision_weights": None,
                     "pretrained_backbone": bool(m.backbone_weights or m.torchvision_weights)}


#: the settings that name a file or folder a run reads: its config.yaml names them absolute
PATH_SETTINGS = (("data", "train"), ("data", "train_images"), ("data", "val"), ("data", "val_images"),
                 ("data", "unlabeled"), ("data", "unlabeled_images"), ("data", "unlabeled_gt"),
                 ("model", "backbone_weights"), ("model", "weights"))


def relative_paths(cfg: Config) -> list[str]:
    """The settings of ``PATH_SETTINGS`` that hold a relative path, as ``section.key``."""
    values = {f"{section}.{key}": getattr(getattr(cfg, section), key) for section, key in PATH_SETTINGS}
    return [dotted for dotted, value in values.items() if value and not Path(value).is_absolute()]


def with_absolute_paths(cfg: Config) -> Config:
    """A copy of ``cfg`` whose relative paths (``PATH_SETTINGS``) are made absolute from the
    working directory, so that a run's config.yaml names the same files wherever the run is
    resumed from."""
    out = copy.deepcopy(cfg)
    for dotted in relative_paths(cfg):
        section, key = dotted.split(".")
        setattr(getattr(out, section), key, str(Path(getattr(getattr(cfg, section), key)).absolute()))
    return out


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _lean_cpu(cfg: Config) -> Config:
    """The lean head of SPEC §11: ResNet-18 FPN, 128 channels, 600/300 proposals, 128 RoIs."""
    m = cfg.model
    m.backbone = "resnet18"
    m.fpn_channels = 128
    m.rpn_pre_nms_top_n_train, m.rpn_post_nms_top_n_train = 600, 600
    m.rpn_pre_nms_top_n_test, m.rpn_post_nms_top_n_test = 300, 300
    m.box_batch_size_per_image = 128
    m.representation_size = 256
    m.anchor_sizes = (16, 32, 64, 128, 256)
    a = cfg.augment
    a.train_short_side = (224, 288)
    a.train_max_size = 480
    a.test_short_side = 256
    a.test_max_size = 427
    cfg.solver.amp = "off"
    return cfg


def preset_shapes_cpu() -> Config:
    """Quick preset for the embedded ``shapes`` data on a 2-core CPU."""
    cfg = _lean_cpu(Config())
    s = cfg.solver
    s.max_iter, s.lr, s.warmup_iters, s.steps = 2000, 0.02, 100, (1500, 1800)
    # a from-scratch backbone learning from one labeled image per Soft Teacher batch can take a
    # step large enough to diverge at this lr; clipping bounds every step
    s.clip_grad_norm = 10.0
    t = cfg.train
    t.output_dir = "runs/shapes-cpu"
    t.eval_period, t.checkpoint_period, t.log_period, t.vis_period = 500, 500, 10, 250
    cfg.data.num_workers = 1
    return cfg


def preset_tiny() -> Config:
    """Smallest working model for tests: a few iterations in seconds."""
    cfg = _lean_cpu(Config())
    m = cfg.model
    m.fpn_channels, m.representation_size = 32, 64
    m.rpn_pre_nms_top_n_train, m.rpn_post_nms_top_n_train = 100, 100
    m.rpn_pre_nms_top_n_test, m.rpn_post_nms_top_n_test = 50, 50
    m.box_batch_size_per_image, m.rpn_batch_size_per_image = 32, 64
    m.trainable_layers = 5
    a = cfg.augment
    a.train_short_side, a.train_max_size = (96, 128), 160
    a.test_short_side, a.test_max_size = 112, 160
    s = cfg.solver
    s.max_iter, s.warmup_iters, s.steps, s.lr = 4, 2, (3,), 0.01
    t = cfg.train
    t.batch_size, t.log_period, t.eval_period, t.checkpoint_period, t.vis_period = 2, 1, 0, 2, 0
    cfg.data.num_workers = 0
    return cfg


def preset_coco_paper() -> Config:
    """The paper's partial-label COCO schedule: 180k iterations, 1 labeled + 4 unlabeled images
    per GPU (the paper: 8 GPUs)."""
    cfg = Config()
    cfg.train.output_dir = "runs/coco-paper"
    return cfg


def preset_coco_full() -> Config:
    """The paper's fully-labeled schedule: 720k iterations, alpha 2.0, 8 images per GPU in
    1:1 (4 labeled + 4 unlabeled; a supervised run draws 8 labeled)."""
    cfg = Config()
    cfg.solver.max_iter, cfg.solver.steps = 720_000, (480_000, 680_000)
    cfg.method.sample_ratio, cfg.method.unsup_weight = (4, 4), 2.0
    cfg.train.batch_size = 8
    cfg.train.output_dir = "runs/coco-full"
    return cfg


def preset_default() -> Config:
    """The paper's settings: R50-FPN, multi-scale 400-1200, 180k iterations."""
    return Config()


PRESETS = {
    "default": preset_default,
    "shapes-cpu": preset_shapes_cpu,
    "coco-paper": preset_coco_paper,
    "coco-full": preset_coco_full,
    "tiny": preset_tiny,
}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


#: the values of each enumerated string field, as the code that reads it knows them
#: (``geometry.BOX_MAPPINGS``, ``model.BACKBONES``, ``ema.SCHEDULES``, ``box_jitter.NOISES``,
#: ``method.soft_teacher.INDICATORS``, ``soft_teacher.PSEUDO_SOURCES``; the others are read in
#: ``model.resolve_norm``, ``model.resolve_channels_last``, ``engine.amp_dtype``,
#: ``ema.ema_update`` and ``engine.train``)
CHOICES: dict[str, tuple[str, ...]] = {
    "augment.box_mapping": ("corners", "ellipse"),
    "model.backbone": ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3"),
    "model.norm": ("auto", "frozen_bn", "bn", "gn"),
    "model.channels_last": ("auto", "true", "false"),
    "solver.amp": ("auto", "bf16", "fp16", "off"),
    "method.ema_schedule": ("constant", "ramp"),
    "method.ema_buffers": ("copy", "average"),
    "method.jitter_noise": ("gaussian", "uniform"),
    "method.reliability": ("bg_teacher", "bg_student", "pred_diff", "iou", "reverse_iou", "none"),
    "method.report": ("teacher", "student"),
    "method.pseudo_source": ("teacher", "ground_truth", "found_ground_truth", "true_teacher"),
}


#: the range of each numeric field (of each item, for a tuple): (low, high), inclusive, None
#: unbounded; the fields of ``ABOVE_LOW`` must exceed their low. A pseudo-box threshold has no
#: upper bound: one above 1 keeps no box (scores reach 1.0), which tests and diagnostics use.
RANGES: dict[str, tuple[float | None, float | None]] = {
    "data.num_workers": (0, None),
    "augment.train_short_side": (1, None), "augment.train_short_sides": (1, None),
    "augment.train_max_size": (1, None), "augment.test_short_side": (1, None),
    "augment.test_max_size": (1, None), "augment.flip_prob": (0, 1), "augment.color_level": (0, 10),
    "augment.translate": (0, 1), "augment.rotate_deg": (0, 180), "augment.shear_deg": (0, 89),
    "augment.erase_count": (0, None), "augment.erase_max_frac": (0, 1), "augment.min_box_size": (0, None),
    "model.trainable_layers": (0, 6), "model.fpn_channels": (1, None), "model.anchor_sizes": (1, None),
    "model.aspect_ratios": (0, None), "model.rpn_nms_thresh": (0, 1),
    "model.rpn_pre_nms_top_n_train": (1, None), "model.rpn_post_nms_top_n_train": (1, None),
    "model.rpn_pre_nms_top_n_test": (1, None), "model.rpn_post_nms_top_n_test": (1, None),
    "model.rpn_batch_size_per_image": (1, None), "model.box_batch_size_per_image": (1, None),
    "model.box_positive_fraction": (0, 1), "model.representation_size": (1, None),
    "model.box_score_thresh": (0, 1), "model.box_nms_thresh": (0, 1),
    "model.box_detections_per_img": (1, None),
    "solver.max_iter": (0, None), "solver.lr": (0, None), "solver.momentum": (0, 1),
    "solver.weight_decay": (0, None), "solver.warmup_iters": (0, None), "solver.warmup_factor": (0, 1),
    "solver.steps": (0, None), "solver.gamma": (0, None), "solver.clip_grad_norm": (0, None),
    "solver.max_bad_steps": (1, None),
    "method.sample_ratio": (0, None), "method.unsup_weight": (0, None), "method.ema_momentum": (0, 1),
    "method.teacher_refresh": (0, None),
    "method.pseudo_threshold": (0, None), "method.cls_pseudo_threshold": (0, None),
    "method.rpn_pseudo_threshold": (0, None), "method.reg_pseudo_threshold": (0, None),
    "method.reg_score_threshold": (0, 1),
    "method.jitter_times": (2, None), "method.jitter_scale": (0, None),
    "train.batch_size": (1, None), "train.num_threads": (0, None), "train.log_period": (0, None),
    "train.eval_period": (0, None), "train.eval_batch_size": (1, None),
    "train.checkpoint_period": (0, None), "train.keep_last": (0, None), "train.vis_period": (0, None),
    "train.warn_empty_iters": (0, None), "train.seed": (0, 2**63 - 1),
}
ABOVE_LOW = frozenset({"model.aspect_ratios"})
#: (low, high) pairs, both ends drawn from
ORDERED = frozenset({"augment.train_short_side", "augment.color_level", "augment.erase_count"})
NOT_EMPTY = frozenset({"model.anchor_sizes", "model.aspect_ratios"})


def _range_error(dotted: str, value: Any) -> str | None:
    """What is wrong with ``value`` of the field ``dotted`` (``RANGES``), or None."""
    low, high = RANGES[dotted]
    items = value if isinstance(value, tuple) else (value,)
    if not items and dotted in NOT_EMPTY:
        return f"{dotted} must hold at least one value"
    above = dotted in ABOVE_LOW
    for v in items:
        if not math.isfinite(v):
            return f"{dotted} must be a finite number, got {value!r}"
        if low is not None and (v <= low if above else v < low):
            if high is not None:
                return f"{dotted} must be between {low} and {high}, got {value!r}"
            return f"{dotted} must be {'above' if above else 'at least'} {low}, got {value!r}"
        if high is not None and v > high:
            return f"{dotted} must be between {low} and {high}, got {value!r}"
    if dotted in ORDERED and items[0] > items[1]:
        return f"{dotted} must be (low, high) with low <= high, got {value!r}"
    return None


def _one_of(values: tuple[str, ...]) -> str:
    return " or ".join([", ".join(values[:-1]), values[-1]] if len(values) > 1 else list(values))


def check_config(cfg: Config, source: str = "") -> None:
    """Refuse a value of an enumerated string field (``CHOICES``) that no code reads, naming
    ``source``, the key, the value and the allowed ones: a misspelt ``method.report`` would
    otherwise choose no model, and others would fail only at the step that reads them. Refuse
    a numeric field out of its range (``RANGES``) too: a negative learning rate or a flip
    probability of 2 would train without a word, and others fail deep in a step."""
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ValueError(f"{source + ': ' if source else ''}{dotted} {value!r}: "
                             f"expected {_one_of(allowed)}")
    for dotted in RANGES:  # and the numeric fields' ranges
        section, key = dotted.split(".")
        error = _range_error(dotted, getattr(getattr(cfg, section), key))
        if error:
            raise ValueError(f"{source + ': ' if source else ''}{error}")
    backend = cfg.model.compile_backbone
    if backend:  # else a misspelt one fails at the first step, after the data loads
        import torch._dynamo

        known = torch._dynamo.list_backends(exclude_tags=())
        if backend not in known:
            raise ValueError(f"{source + ': ' if source else ''}model.compile_backbone {backend!r}: "
                             f"not a torch.compile backend{_did_you_mean(backend, known)}; known: "
                             f"{', '.join(known)}")


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML parse error in one line: where it is, what is wrong, and where the construct it
    breaks began (PyYAML's own message spans four or more lines)."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is None or not problem:
        return " ".join(str(e).split())
    text = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and start is not None:
        text += f" ({context} at line {start.line + 1}, column {start.column + 1})"
    return text


def _tuple_items(value: Any, of_str: bool, where: str) -> list:
    """The items of a tuple field's value: a list, a ``[a, b]`` or ``a,b`` string, or one value.

    A string's items stay the words written (``[on, no, null]`` are three names, not YAML 1.1's
    booleans and null); items of a YAML file's list must then already be strings.
    """
    if value is None:  # an empty YAML value
        value = []
    elif isinstance(value, str):
        if value.strip().startswith("["):
            try:
                value = yaml.load(value, Loader=yaml.BaseLoader) if of_str else yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise ValueError(f"{where}: not a list: {value!r} ({e})") from None
        else:
            value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        value = [value]
    if of_str:
        for v in value:
            if v is None or isinstance(v, bool):
                raise ValueError(f"{where}: {v!r} is not a string (YAML reads unquoted yes, no, on, "
                                 f"off, true, false and null as booleans or null): quote each name")
            if isinstance(v, (int, float)):
                raise ValueError(f"{where}: {v!r} is a number, not a name as written (YAML reads "
                                 f"unquoted 01 as 1 and 1.50 as 1.5): quote each name")
    return list(value)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        variable = len(args) == 2 and args[1] is Ellipsis
        items = _tuple_items(value, args[0] is str, where)
        if not variable and len(items) != len(args):
            raise ValueError(f"{where}: expected {len(args)} values, got {len(items)}: {value!r}")
        types = [args[0]] * len(items) if variable else list(args)
        return tuple(_coerce(v, t, where) for v, t in zip(items, types))
    if tp is bool:
        if value is None:
            raise ValueError(f"{where}: expected a boolean, got nothing")
        if isinstance(value, str):
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{where}: expected a boolean, got {value!r}")
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        raise ValueError(f"{where}: expected a boolean, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):  # YAML's true is no number
            raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}")
        try:
            if isinstance(value, str):  # 2e5 and 2000.0 are integers written as floats
                value = float(value) if tp is float or any(c in value.lower() for c in "e.") else int(value)
            out = tp(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and out != value:
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, bool):  # amp: off in a YAML file
            raise ValueError(f"{where}: got the boolean {value} (YAML reads unquoted yes, no, on, off, "
                             f"true and false as booleans): quote the word, as in amp: 'off'")
        if isinstance(value, (list, tuple, dict)):
            raise ValueError(f"{where}: expected one value, got {value!r:.100}")
        return "" if value is None else str(value)
    return value


#: words that unset a field that is empty by default (``--set model.weights=null``)
NULL_WORDS = ("null", "none", "~")


def _did_you_mean(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


# names other detection libraries give settings of ours
KEY_SYNONYMS = {
    "learning_rate": "solver.lr", "base_lr": "solver.lr", "max_iters": "solver.max_iter",
    "iters": "solver.max_iter", "iterations": "solver.max_iter", "warmup": "solver.warmup_iters",
    "ims_per_batch": "train.batch_size", "samples_per_gpu": "train.batch_size",
    "output": "train.output_dir", "work_dir": "train.output_dir", "workers": "data.num_workers",
    "workers_per_gpu": "data.num_workers", "ema_decay": "method.ema_momentum",
    "score_thresh": "model.box_score_thresh", "score_threshold": "model.box_score_thresh",
    "classes": "data.class_names",
}


def _all_keys() -> dict[str, str]:
    """Every ``key`` of the config, to its ``section.key``."""
    names = {}
    for section, kind in typing.get_type_hints(Config).items():
        for key in typing.get_type_hints(kind):
            names.setdefault(key, f"{section}.{key}")
    return names


def _key_hint(section: str, key: str, known_here) -> str:
    """A guess at the setting meant by ``section.key``: a close name in the section, the same
    name in another section, another library's name for it, or a close name elsewhere."""
    close = difflib.get_close_matches(key, list(known_here), n=1)
    if close:
        return f" (did you mean {section}.{close[0]}?)"
    everywhere = _all_keys()
    word = key.lower().replace("-", "_")
    guess = everywhere.get(word) or KEY_SYNONYMS.get(word)
    if guess is None:
        close = difflib.get_close_matches(word, list(everywhere), n=1)
        guess = everywhere[close[0]] if close else None
    return f" (did you mean {guess}?)" if guess and guess != f"{section}.{key}" else ""


def apply_dict(cfg: Config, updates: dict, source: str = "config") -> Config:
    """Override fields from a nested dict; unknown sections or keys raise naming ``source``,
    and leave ``cfg`` as it was."""
    target, cfg = cfg, copy.deepcopy(cfg)
    hints = typing.get_type_hints(Config)
    for section, values in updates.items():
        if section not in hints:
            raise ValueError(f"{source}: unknown section {section!r}{_did_you_mean(section, hints)}; "
                             f"known: {', '.join(hints)}")
        if values is None:  # a section with every key commented out
            continue
        if not isinstance(values, dict):
            raise ValueError(f"{source}: section {section!r} must be a mapping")
        sub = getattr(cfg, section)
        sub_hints = typing.get_type_hints(type(sub))
        for key, value in values.items():
            if key not in sub_hints:
                hint = _key_hint(section, key, sub_hints)
                raise ValueError(f"{source}: unknown key {section}.{key}{hint}; "
                                 f"known: {', '.join(sub_hints)}")
            default = type(sub).__dataclass_fields__[key].default
            if value is None and isinstance(default, (str, tuple)) and default not in ("", ()):
                # YAML's null for an output folder or a schedule: no "unset" to fall back to (a
                # null word given with --set is taken as the word, and checked as one)
                raise ValueError(f"{source}: {section}.{key}: null unsets only a setting that is empty "
                                 f"by default; this one is {default!r} by default: give a value, or "
                                 f"leave the key out")
            if value is None or (isinstance(value, str) and value.strip().lower() in NULL_WORDS):
                if default in ("", ()):
                    value = default  # an optional path, name or list, unset as YAML's null unsets it
            if isinstance(value, bool) and "true" in CHOICES.get(f"{section}.{key}", ()):
                value = "true" if value else "false"  # a word field that was a boolean once
            setattr(sub, key, _coerce(value, sub_hints[key], f"{source}: {section}.{key}"))
    check_config(cfg, source)
    return _update(target, cfg)


def _update(target: Config, new: Config) -> Config:
    """``new``'s values into ``target``'s sections, the objects a caller may hold."""
    for section in typing.get_type_hints(Config):
        getattr(target, section).__dict__.update(getattr(new, section).__dict__)
    return target


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings (the CLI's ``--set``); one refused leaves ``cfg`` as
    it was."""
    work = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            word = item.split("=", 1)[0].strip()
            hint = _key_hint("", word, ()) if "=" in item and word else ""
            raise ValueError(f"--set {item!r}: expected section.key=value{hint}")
        dotted, value = item.split("=", 1)
        section, key = dotted.split(".", 1)
        apply_dict(work, {section: {key: value}}, source=f"--set {item}")
    return _update(cfg, work)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader refusing a key given twice in one mapping (where PyYAML keeps the
    last: a second ``solver:`` section would drop the first one's settings without a word)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # a key that is a list or a mapping: the constructor says so
                break
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    f"while reading the mapping at line {node.start_mark.line + 1}", node.start_mark,
                    f"key {key!r} given twice (first at line {first.line + 1}): keep one",
                    key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_config(preset: str | None = None, path: str | None = None,
                overrides: list[str] | None = None, fallback: str = "default") -> Config:
    """Preset, then YAML file, then ``--set`` overrides.

    The file may name its own ``preset``; ``preset`` None takes the file's, or ``fallback``
    where it names none. A file whose preset is not an explicitly given one is refused: one of
    the two would be ignored without a word.
    """
    data: dict = {}
    named = None
    if path:
        try:
            raw = Path(path).read_bytes()
            # yaml reads UTF-8 and, with its byte-order mark, UTF-16 (PowerShell's `>`)
            data = yaml.load(raw, Loader=_UniqueKeyLoader) or {}
        except OSError as e:
            raise ValueError(f"{path}: cannot read config: {e.strerror or e}") from None
        except yaml.reader.ReaderError as e:
            raise ValueError(f"{path}: cannot read config: not UTF-8 text ({e.reason} at byte "
                             f"{e.position})") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {yaml_problem(e)}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config file must be a mapping of sections")
        data = dict(data)
        named = data.pop("preset", None)
        if named is not None and not isinstance(named, str):
            raise ValueError(f"{path}: preset must be a preset's name, got {named!r:.100}")
        if named is not None and preset is not None and named != preset:
            raise ValueError(f"{path}: names preset {named!r}, and {preset!r} was given too: "
                             f"keep one of them")
        preset = preset or named
    try:
        cfg = get_preset(preset or fallback)
    except ValueError as e:
        from_file = named is not None and preset == named  # the file's own preset: name the file
        raise ValueError(f"{path}: {e}" if from_file else str(e)) from None
    apply_dict(cfg, data, source=path or "config")
    apply_overrides(cfg, overrides or [])
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a config saved with ``to_dict`` (e.g. from a checkpoint)."""
    return apply_dict(Config(), copy.deepcopy(data), source="saved config")


def dumps_json(cfg: Config) -> str:
    return json.dumps(_plain(cfg.to_dict()), indent=2)
