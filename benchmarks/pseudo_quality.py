"""Quality of a teacher's pseudo boxes on the unlabeled pool (the paper's Fig. 3, on ``shapes``).

The embedded unlabeled pool keeps its ground truth apart for diagnostics; this script runs a
checkpoint's teacher (or student) on the pool's test views, as the teacher labels weak views, and
measures:

- precision and recall at IoU 0.5 of the pseudo boxes above each score threshold;
- for every candidate above ``method.pseudo_threshold`` (0.5): its IoU with the best-matching
  ground-truth box of its class, its score, and its box-jitter reliability (the spread of the
  teacher's refinements of 10 jittered copies). The paper's claim is that the reliability
  predicts localisation better than the score: the rank correlation of IoU with
  ``-reliability`` should exceed that with ``score``;
- what the classification and regression pseudo boxes that match no object are (duplicate,
  wrong class, loose, background: ``method.pseudo_labels.false_box_kinds``; of those above the
  checkpoint's own ``pseudo_threshold``, as in training), which classes the
  wrong-class ones confuse, and why the objects the classification pseudo boxes miss are missed
  (below the score threshold, taken by another class, loose, not detected:
  ``missed_object_kinds``), over all objects, per class and per COCO size range of the
  object's box in the image as annotated (``found_by_class``, ``found_by_size``: found, of
  all, share).

    python benchmarks/pseudo_quality.py CKPT [--images 300] [--model teacher|student]

Writes ``runs/bench/pseudo_quality/TAG.json`` (every candidate and the summary) and a PNG
(``docs/img/pseudo_quality_TAG.png`` unless ``--png``); prints the summary as JSON lines.

``--compare`` sets such results side by side (a supervised start, the teacher trained from it, a
student taught by it): precision and recall against the threshold, one colour a result, and what
their classification pseudo boxes are, in one PNG and a markdown table:

    python benchmarks/pseudo_quality.py --compare A.json B.json --labels start teacher --png P.png
"""

from __future__ import annotations

import argparse
import copy
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from common import command_line, commit
from torchvision.ops import box_area, box_iou

from softteacher.data import shapes
from softteacher.data.datasets import load_dataset
from softteacher.data.loading import test_loader
from softteacher.engine import model_from_checkpoint, resolve_device
from softteacher.geometry import clip_boxes, transform_boxes
from softteacher.io import write_json
from softteacher.method.pseudo_labels import (
    FALSE_BOX_KINDS,
    MISSED_OBJECT_KINDS,
    PseudoLabels,
    false_box_kinds,
    missed_object_kinds,
    pseudo_label_quality,
    score_mask,
)
from softteacher.soft_teacher import teacher_pseudo_boxes

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def size_range(area: float) -> str:
    """COCO's size range (its bounds: 32^2 and 96^2) of an object of ``area`` square pixels."""
    return "small" if area < 32 ** 2 else "medium" if area < 96 ** 2 else "large"


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 0, tied values sharing the mean of their ranks (IoU is exactly 0 for every
    candidate on clutter or of the wrong class: ordering those by position would rank them by
    the order they were collected in, which is by score)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation, ties given their mean rank (NaN below 3 values or where one
    side is constant)."""
    if len(a) < 3:
        return float("nan")
    ra, rb = _ranks(np.asarray(a, dtype=float)), _ranks(np.asarray(b, dtype=float))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def trained_on(boxes: PseudoLabels, pseudo_threshold: float) -> PseudoLabels:
    """The pseudo boxes of a set that training used: those above the checkpoint's own candidate
    threshold (the candidates here go down to the lowest of ``THRESHOLDS``, for the curve)."""
    return boxes.select(score_mask(boxes.scores, pseudo_threshold))


@torch.no_grad()
def collect(ckpt: str, which: str | None, num_images: int, device: torch.device, seed: int) -> dict:
    started_at = commit()
    model, cfg, _, which = model_from_checkpoint(ckpt, which, device)
    method = copy.deepcopy(cfg.method)
    paths = shapes.generate_shapes(shapes.default_root())
    pool = load_dataset(paths.unlabeled_gt_json, images=paths.unlabeled_images)
    indices = list(range(min(num_images, len(pool))))
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    low = min(THRESHOLDS)
    method.pseudo_threshold = min(low, method.pseudo_threshold)
    counts = {t: [0, 0, 0] for t in THRESHOLDS}  # tp, pred, gt
    cand = {"score": [], "reliability": [], "iou": []}
    errors = {"cls": Counter(), "reg": Counter(), "missed": Counter(), "cls_confusions": Counter()}
    by_class, by_size = defaultdict(Counter), defaultdict(Counter)  # why objects are missed
    for batch in test_loader(pool, cfg.augment, batch_size=4, indices=indices):
        images = [im.to(device) for im in batch.images]
        pseudo, _, _ = teacher_pseudo_boxes(model, images, method, generator)
        for p, target, m, im in zip(pseudo, batch.targets, batch.matrices, images):
            gt = clip_boxes(transform_boxes(target["boxes"].to(device), m.to(device)),
                            tuple(im.shape[-2:]))
            gt_labels = target["labels"].to(device)
            c = p.candidates
            for name, boxes in (("cls", p.sets.cls), ("reg", p.sets.reg)):
                boxes = trained_on(boxes, cfg.method.pseudo_threshold)
                kinds, other = false_box_kinds(boxes.boxes, boxes.labels, gt, gt_labels,
                                               pred_scores=boxes.scores)
                errors[name].update(kinds)
                if name == "cls":
                    errors["cls_confusions"].update(
                        f"{shapes.CLASSES[int(a) - 1]} on a {shapes.CLASSES[int(b) - 1]}"
                        for kind, a, b in zip(kinds, boxes.labels.tolist(), other.tolist())
                        if kind == "wrong_class")
            keep_cls = score_mask(c.scores, cfg.method.cls_pseudo_threshold)
            kinds = missed_object_kinds(c.boxes, c.labels, c.scores, keep_cls, gt, gt_labels)
            errors["missed"].update(kinds)
            areas = box_area(target["boxes"].float()).tolist()  # boxes in the image as annotated
            for kind, label, area in zip(kinds, gt_labels.tolist(), areas):
                by_class[shapes.CLASSES[label - 1]][kind] += 1
                by_size[size_range(area)][kind] += 1
            for t in THRESHOLDS:
                keep = c.scores > t
                tp, n_p, n_g = pseudo_label_quality(c.boxes[keep], c.labels[keep], gt, gt_labels,
                                                    pred_scores=c.scores[keep])
                for k, v in enumerate((tp, n_p, n_g)):
                    counts[t][k] += v
            if len(c.boxes):
                same = c.labels[:, None] == gt_labels[None, :]
                iou = box_iou(c.boxes.float(), gt.float()) * same if len(gt) else \
                    torch.zeros(len(c.boxes), 0, device=device)
                best = iou.max(dim=1).values if iou.shape[1] else torch.zeros(len(c.boxes), device=device)
                keep = c.scores > cfg.method.pseudo_threshold
                cand["score"] += c.scores[keep].tolist()
                cand["reliability"] += p.reliability[keep].tolist()
                cand["iou"] += best[keep].tolist()
    curve = [{"threshold": t, "precision": tp / n_p if n_p else float("nan"),
              "recall": tp / n_g if n_g else float("nan"), "pseudo_boxes": n_p, "gt_boxes": n_g}
             for t, (tp, n_p, n_g) in counts.items()]
    summary = {
        "checkpoint": ckpt, "model": which, "images": len(indices),
        "reg_pseudo_threshold": cfg.method.reg_pseudo_threshold,
        "cls_pseudo_threshold": cfg.method.cls_pseudo_threshold,
        "commit": started_at, "command": command_line(),
    }
    errors = {k: dict(v.most_common()) for k, v in errors.items()}
    errors["missed_by_class"] = {k: dict(by_class[k].most_common()) for k in sorted(by_class)}
    errors["missed_by_size"] = {k: dict(by_size[k].most_common())
                                for k in ("small", "medium", "large") if k in by_size}
    return {"summary": summary, "curve": curve, "candidates": cand, "errors": errors}


def summarize(result: dict) -> dict:
    """Rank correlations of IoU with the score and with ``-reliability``, over every candidate
    and over the candidates that overlap a ground-truth box of their class (IoU > 0: the
    localisation question without the wrong-class and clutter boxes), and the mean IoU of the
    classification (score) and regression pseudo boxes. A model that ran without jittering has
    no reliability: its correlations with it are NaN, and its regression pseudo boxes are those
    of the classification threshold, as training takes them."""
    s, c = result["summary"], result["candidates"]
    score, rel, iou = (np.asarray(c[k], dtype=float) for k in ("score", "reliability", "iou"))
    ok = np.isfinite(rel)
    hit = iou > 0
    reg = ok & (rel < s["reg_pseudo_threshold"]) if ok.any() else score > s["cls_pseudo_threshold"]

    def mean(mask: np.ndarray) -> float:
        return float(iou[mask].mean()) if mask.any() else float("nan")

    meta = ("checkpoint", "model", "images", "reg_pseudo_threshold", "cls_pseudo_threshold",
            "commit", "command")
    return {**{k: s[k] for k in meta}, "candidates": int(len(score)),
            "overlapping_their_class": int(hit.sum()),
            "spearman_iou_score": spearman(iou, score),
            "spearman_iou_neg_reliability": spearman(iou[ok], -rel[ok]),
            "spearman_iou_score_overlapping": spearman(iou[hit], score[hit]),
            "spearman_iou_neg_reliability_overlapping": spearman(iou[ok & hit], -rel[ok & hit]),
            "mean_iou_cls_pseudo": mean(score > s["cls_pseudo_threshold"]),
            "mean_iou_reg_pseudo": mean(reg),
            **_error_shares(result.get("errors"))}


def _error_shares(errors: dict | None) -> dict:
    """Counts and shares of the kinds of pseudo boxes and missed objects (results written
    before the breakdown existed have none)."""
    if not errors:
        return {}
    out = {}
    for name in ("cls", "reg", "missed"):
        counts = errors[name]
        total = sum(counts.values())
        out[f"{name}_kinds"] = {k: [v, round(v / total, 3)] for k, v in counts.items()}
    out["cls_confusions"] = errors["cls_confusions"]
    for name in ("class", "size"):  # objects found, of all, per class and per size range
        groups = errors.get(f"missed_by_{name}", {})
        out[f"found_by_{name}"] = {k: [v.get("found", 0), sum(v.values()),
                                       round(v.get("found", 0) / sum(v.values()), 3)]
                                   for k, v in groups.items()}
    return out


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, c = result["summary"], result["candidates"]
    errors = result.get("errors")
    by_class = (errors or {}).get("missed_by_class")
    panels = 3 + bool(errors) + bool(by_class)
    fig, axes = plt.subplots(1, panels, figsize=(4.75 * panels, 4))
    ts = [r["threshold"] for r in result["curve"]]
    axes[0].plot(ts, [r["precision"] for r in result["curve"]], marker="o", label="precision")
    axes[0].plot(ts, [r["recall"] for r in result["curve"]], marker="o", label="recall")
    axes[0].set_xlabel("score threshold")
    axes[0].set_title("pseudo boxes vs hidden ground truth (IoU 0.5)")
    axes[0].legend()
    axes[1].scatter(c["score"], c["iou"], s=4, alpha=0.4)
    axes[1].set_xlabel("teacher score")
    axes[1].set_ylabel("IoU with ground truth")
    axes[1].set_title(f"Spearman {s['spearman_iou_score']:.2f} "
                      f"({s['spearman_iou_score_overlapping']:.2f} where IoU > 0)")
    rel = np.asarray(c["reliability"], dtype=float)
    axes[2].scatter(rel, c["iou"], s=4, alpha=0.4)
    axes[2].axvline(s["reg_pseudo_threshold"], color="k", linestyle="--", linewidth=1)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("box-jitter reliability (lower: steadier)")
    axes[2].set_title(f"Spearman with -reliability {s['spearman_iou_neg_reliability']:.2f} "
                      f"({s['spearman_iou_neg_reliability_overlapping']:.2f} where IoU > 0)")
    if errors:
        _plot_kinds(axes[3], errors)
    if by_class:
        _stack(axes[4], by_class, labels=False)
        axes[4].tick_params(axis="x", labelrotation=45)
        axes[4].set_title("objects per class: found, or why not")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{s['model']} of {s['checkpoint']} on {s['images']} unlabeled shapes images")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def _plot_kinds(ax, errors: dict) -> None:
    """Stacked shares: what the classification and regression pseudo boxes are, and what
    became of the objects (found by the classification pseudo boxes, or why not)."""
    _stack(ax, {"cls pseudo boxes": errors["cls"], "reg pseudo boxes": errors["reg"],
                "objects": errors["missed"]}, labels=True)
    ax.set_title("what the pseudo boxes are; why objects are missed")


def _stack(ax, bars: dict[str, dict[str, int]], labels: bool) -> None:
    """One bar per entry of ``bars``, its kinds' shares stacked (named inside where ``labels``,
    else in a legend)."""
    colours = {"true": "tab:green", "found": "tab:green", "duplicate": "tab:purple",
               "wrong_class": "tab:red", "loose": "tab:orange", "background": "tab:brown",
               "low_score": "tab:pink", "not_detected": "tab:gray"}
    kinds = list(dict.fromkeys(("true", "found", *FALSE_BOX_KINDS, *MISSED_OBJECT_KINDS)))
    for x, (name, counts) in enumerate(bars.items()):
        total = sum(counts.values()) or 1
        bottom = 0.0
        for kind in kinds:
            share = counts.get(kind, 0) / total
            if share:
                ax.bar(x, share, bottom=bottom, color=colours[kind], width=0.6,
                       label=None if labels or kind in ax.get_legend_handles_labels()[1] else kind)
                if labels and share > 0.04:
                    ax.text(x, bottom + share / 2, f"{kind} {share:.0%}", ha="center", va="center",
                            fontsize=7)
                bottom += share
    ax.set_xticks(range(len(bars)), list(bars), fontsize=8)
    ax.set_ylabel("share")
    if not labels:
        ax.legend(fontsize=7)


def compare_table(results: dict[str, dict]) -> list[str]:
    """Markdown rows: each result's precision / recall at every threshold of its curve and what
    its classification pseudo boxes are (counts, of those above its own threshold)."""
    ts = sorted({r["threshold"] for res in results.values() for r in res["curve"]})
    kinds = ("true", *FALSE_BOX_KINDS)
    lines = ["| result | model | " + " | ".join(f"P / R at {t:g}" for t in ts)
             + " | cls pseudo boxes: " + " / ".join(k.replace("_", " ") for k in kinds)
             + " | most frequent wrong class |",
             "|---|---|" + "---|" * (len(ts) + 2)]
    for name, res in results.items():
        at = {r["threshold"]: r for r in res["curve"]}
        pr = [" / ".join("-" if at[t][k] is None or at[t][k] != at[t][k] else f"{at[t][k]:.2f}"
                         for k in ("precision", "recall")) if t in at else "-" for t in ts]
        errors = res.get("errors") or {}
        cls = errors.get("cls", {})
        counts = " / ".join(str(cls.get(k, 0)) for k in kinds) if cls else "-"
        confusions = errors.get("cls_confusions", {})
        top = ", ".join(f"{k} {n}" for k, n in list(confusions.items())[:2]) or "-"
        lines.append(f"| {name} | {res['summary']['model']} | {' | '.join(pr)} | {counts} | {top} |")
    return lines


def compare(paths: list[str], labels: list[str], png: Path) -> None:
    """Several results of this script in one plot and one table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if labels and len(labels) != len(paths):
        raise SystemExit(f"--labels names {len(labels)} results, --compare gives {len(paths)}")
    results = {}
    for i, path in enumerate(paths):
        try:
            res = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"{path}: not a result json of this script ({e})") from None
        if "curve" not in res or "summary" not in res:
            raise SystemExit(f"{path}: not a result json of this script (no curve or summary)")
        results[labels[i] if labels else Path(path).stem] = res
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, res) in enumerate(results.items()):
        ts = [r["threshold"] for r in res["curve"]]
        colour = f"C{i}"
        axes[0].plot(ts, [r["precision"] for r in res["curve"]], marker="o", color=colour,
                     label=f"{name}: precision")
        axes[0].plot(ts, [r["recall"] for r in res["curve"]], marker="o", color=colour, linestyle="--",
                     label=f"{name}: recall")
    axes[0].set_xlabel("score threshold")
    axes[0].set_title("pseudo boxes vs hidden ground truth (IoU 0.5)")
    axes[0].legend(fontsize=7)
    axes[0].grid(alpha=0.3)
    _stack(axes[1], {name: (res.get("errors") or {}).get("cls", {}) for name, res in results.items()},
           labels=True)
    axes[1].tick_params(axis="x", labelrotation=20)
    axes[1].set_title("classification pseudo boxes (above each one's threshold)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print("\n".join(compare_table(results)))
    print(f"\nplot: {png}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="a checkpoint, or a result json of this script to "
                                                 "summarise and plot again")
    p.add_argument("--compare", nargs="+", default=[], metavar="JSON",
                   help="result jsons of this script to set side by side (instead of a checkpoint)")
    p.add_argument("--labels", nargs="+", default=[], help="a name for each --compare result")
    p.add_argument("--model", choices=("teacher", "student"), default=None,
                   help="default: the model the checkpoint reports")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="jitter noise seed")
    p.add_argument("--tag", default="", help="result name (default: the checkpoint's folder)")
    p.add_argument("--png", default="")
    args = p.parse_args()
    if args.compare:
        if args.checkpoint:
            p.error("give a checkpoint or --compare, not both")
        compare(args.compare, args.labels, Path(args.png or "docs/img/pseudo_quality_compare.png"))
        return
    if not args.checkpoint:
        p.error("a checkpoint (or --compare JSON ...) is needed")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint.endswith(".json"):
        result = json.loads(Path(args.checkpoint).read_text())
        tag = args.tag or Path(args.checkpoint).stem
    else:
        result = collect(args.checkpoint, args.model, args.images, resolve_device(args.device),
                         args.seed)
        tag = args.tag or Path(args.checkpoint).parent.name
    result["summary"] = summarize(result)
    write_json(Path("runs/bench/pseudo_quality") / f"{tag}.json", result)
    plot(result, Path(args.png or f"docs/img/pseudo_quality_{tag}.png"))
    for row in result["curve"]:
        print(json.dumps(row))
    print(json.dumps(result["summary"]))


if __name__ == "__main__":
    main()
