"""``softteacher predict``: detections for image files as COCO results json and pictures."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from softteacher.data.datasets import check_image_files, read_image
from softteacher.data.transforms import test_view
from softteacher.engine import expand_images, model_from_checkpoint, to_original
from softteacher.evaluation import detections_to_results
from softteacher.io import save_image, write_json
from softteacher.model import check_score_threshold, score_threshold
from softteacher.visualize import draw_boxes

log = logging.getLogger(__name__)


@torch.no_grad()
def predict(checkpoint: str, images: list[str], out_dir: str, which: str | None = None,
            score_thresh: float = 0.3, device: torch.device | str = "cpu") -> dict:
    """Detect objects in ``images`` (files, folders, globs; see ``engine.expand_images``) with a
    checkpoint's model.

    Writes ``out_dir/results.json`` (COCO results: ``image_id`` indexes ``images.json``,
    original category ids, boxes in the image's pixels as a viewer shows them: turned as its
    EXIF orientation says, as detectron2 reads images) and one picture per image, ``<stem>.jpg``
    (``<stem>_1.jpg``, ... for a stem met again; ``images.json`` names each image's ``picture``).
    Every image's header is read first, so that unreadable images refuse the run (all listed in
    one ``DatasetError``) before anything is written.
    Returns a summary dict (model used, counts, paths).
    """
    check_score_threshold(score_thresh)
    device = torch.device(device)
    model, cfg, cats, which = model_from_checkpoint(checkpoint, which, device)
    paths = expand_images(images)  # resolved
    out = Path(out_dir)
    inside = [p for p in paths if out.resolve() in p.parents]
    if inside:
        more = f" and {len(inside) - 1} more" if len(inside) > 1 else ""
        raise ValueError(f"predict: the output folder {out} holds input images ({inside[0]}{more}); "
                         f"its pictures would replace them or be read as inputs next time: "
                         f"choose another --out")
    folders = [Path(i).resolve() for i in images if Path(i).is_dir()]
    holder = [d for d in folders if d == out.resolve() or d in out.resolve().parents]
    if holder:  # a folder read whole would read this run's pictures as inputs next time
        raise ValueError(f"predict: the output folder {out} is in the input folder {holder[0]}; "
                         f"its pictures would be read as inputs next time: choose another --out")
    check_image_files(paths, "predict")
    out.mkdir(parents=True, exist_ok=True)
    results, image_infos = [], []
    used_names: set[str] = set()
    for image_id, path in enumerate(paths, start=1):
        image = read_image(str(path), exif_orientation=True)  # upright, as a viewer shows it
        view = test_view(image, cfg.augment)
        with score_threshold(model, min(score_thresh, model.roi_heads.score_thresh)):
            det = model([view.image.to(device)])[0]  # below the model's own threshold when asked
        keep = det.scores > score_thresh
        size = (int(image.shape[-2]), int(image.shape[-1]))
        boxes = to_original(det.boxes[keep].float().cpu(), view.matrix, size)
        scores, labels = det.scores[keep].float().cpu(), det.labels[keep].cpu()
        results += detections_to_results(image_id, boxes, scores, labels, cats)
        name = path.stem
        k = 1
        while name in used_names:
            k, name = k + 1, f"{path.stem}_{k}"
        used_names.add(name)
        image_infos.append({"id": image_id, "file_name": str(path), "height": size[0], "width": size[1],
                            "picture": f"{name}.jpg"})
        picture = draw_boxes(image, boxes, labels.tolist(), scores.tolist(), cats.names)
        save_image(out / f"{name}.jpg", picture, quality=92)
    write_json(out / "results.json", results)
    write_json(out / "images.json", {"images": image_infos, "categories": cats.to_coco(),
                                     "model": which, "checkpoint": str(checkpoint),
                                     "score_thresh": score_thresh})
    log.info("%s: %d images, %d detections above %.2f, model: %s", out, len(paths), len(results),
             score_thresh, which)
    return {"model": which, "images": len(paths), "detections": len(results),
            "results": str(out / "results.json")}
