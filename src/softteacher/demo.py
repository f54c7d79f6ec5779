"""``softteacher demo``: the whole product on the embedded ``shapes`` data in minutes on a CPU.

Generates the data (once), splits 10 % of the train set as labels (STAC protocol, fold 1),
trains Soft Teacher on them with the unlabeled pool as unlabeled data (the rest of the train
set is left out), evaluates teacher and student on val, and draws predictions. The preset's
schedule is shortened to ``--iters`` (steps, warm-up, checkpoints and pictures scaled to it;
evaluation at the end only) and the run writes to ``<out>/train``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from softteacher.config import Config
from softteacher.data import shapes
from softteacher.data.splits import write_split
from softteacher.engine import train
from softteacher.evaluation import format_metrics
from softteacher.predict import predict

log = logging.getLogger(__name__)

DEMO_ITERS = 150
DEMO_PERCENT = 10.0
#: the settings the demo makes itself (its data, folder and schedule): a ``--set`` of one is refused
DEMO_SETS = ("data.train", "data.train_images", "data.val", "data.val_images", "data.unlabeled",
             "data.unlabeled_images", "data.unlabeled_gt", "solver.max_iter", "solver.steps",
             "train.output_dir", "train.eval_period", "train.checkpoint_period", "train.vis_period")


def run_demo(cfg: Config, root: str | None = None, out_dir: str = "runs/demo",
             iters: int | None = None, progress: bool = True,
             paths: shapes.ShapesPaths | None = None) -> dict:
    """Run the demo; ``paths`` (an already generated shapes set) replaces generation."""
    if iters is not None and iters < 1:
        raise ValueError(f"demo --iters {iters}: expected at least 1")
    if paths is None and root and Path(shapes.shapes_paths(root).train_json).is_file():
        paths = shapes.shapes_paths(root)  # a set `data generate` wrote, not a cache folder
    paths = paths or shapes.generate_shapes(root or shapes.default_root())
    print(shapes.describe(paths))
    out = Path(out_dir)
    labeled, _ = write_split(paths.train_json, percent=DEMO_PERCENT, fold=1, seed=1,
                             out_dir=str(out / "splits"))
    d = cfg.data
    d.train, d.train_images = labeled, paths.train_images
    d.val, d.val_images = paths.val_json, paths.val_images
    d.unlabeled, d.unlabeled_images = paths.unlabeled_json, paths.unlabeled_images
    d.unlabeled_gt = paths.unlabeled_gt_json
    s = cfg.solver
    s.max_iter = DEMO_ITERS if iters is None else iters
    s.warmup_iters = min(s.warmup_iters, s.max_iter // 4)
    s.steps = (int(s.max_iter * 0.8),)
    cfg.train.output_dir = str(out / "train")
    cfg.train.eval_period = 0
    cfg.train.checkpoint_period = max(s.max_iter // 2, 1)
    cfg.train.vis_period = max(s.max_iter // 3, 1)
    result = train(cfg, progress=progress)
    report = cfg.method.report if cfg.method.enabled else "student"
    for model in ("teacher", "student") if cfg.method.enabled else ("student",):
        m = {k.split("/", 1)[1]: v for k, v in result.metrics.items() if k.startswith(model + "/")}
        print(f"\n{model}{' (reported)' if model == report else ''} on val after {s.max_iter} "
              f"iterations:\n{format_metrics(m)}")
    final = result.output_dir / "model_final.pt"
    val_images = sorted(Path(paths.val_images).glob("*.jpg"))[:8]
    summary = predict(str(final), [str(p) for p in val_images], str(out / "predictions"))
    print(f"\npictures of {summary['model']} predictions: {out / 'predictions'}")
    print(f"pictures of pseudo labels (weak | strong view): {result.output_dir / 'pseudo_labels'}")
    print(f"pictures of the first val image at each evaluation (teacher | student): "
          f"{result.output_dir / 'val_predictions'}")
    print(f"TensorBoard: tensorboard --logdir {result.output_dir / 'tensorboard'}")
    print(f"from Python: softteacher.Detector.load({str(final)!r})(image)")
    if s.max_iter < 1000:
        print(f"\n{s.max_iter} iterations from scratch are a smoke run of the whole pipeline: expect an "
              f"AP near 0 and few or no boxes in the pictures. Trained numbers, with the commands "
              f"that produce them: docs/results.md and benchmarks/.")
    return {"metrics": result.metrics, "predictions": summary}
