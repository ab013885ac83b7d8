"""Scoring every stage of a pipeline run into ``report.json`` (docs/design.md)."""
from __future__ import annotations

import json
from pathlib import Path

from model_training.common.datasets import build_source
from model_training.common.evaluation import evaluate_cam_folder, evaluate_label_folder
from model_training.common.step_io import STEP_DIRS, read_done, write_or_stop

# The stage each step's output is scored as (steps 4 and 6 train models: time only).
STAGE_OF_STEP = {STEP_DIRS[2]: "cam", STEP_DIRS[3]: "ir_label", STEP_DIRS[5]: "pseudo_mask",
                 STEP_DIRS[7]: "segmentation"}
# Where ``run_pipeline.py --gt-bound`` trains and predicts the same step-6 config on the
# ground-truth masks: the fully supervised bound the segmentation stage is judged against.
GT_BOUND_DIR = "gt_bound"
# Where ``run_pipeline.py --seeds N`` trains and predicts steps 6-7 again with seed <s>.
SEED_DIR_PREFIX = "seed_"
# Columns of the per-class table: the stages, then the bound.
STAGE_TITLES = {"cam": "CAM", "ir_label": "IR", "pseudo_mask": "pseudo", "segmentation": "seg",
                "gt_bound": "gt bound"}
# A class the pseudo masks hold at least this well (IoU on train) that the final model finds
# below DROPPED_BELOW on val was dropped by step 6 (camvid's bicyclist: 25.6 -> 0.0, or 9.4 in
# another seed; issue 32 counts a class below 10 in the final model as lost).
HELD_FROM = 15.0
DROPPED_BELOW = 10.0


def _stage(result: dict, **extra) -> dict:
    per_class = ("per_class_iou", "per_class_precision", "per_class_recall")
    return {"miou": result["miou"], "images": result["images"], "missing": result["missing"],
            **extra, **{key: result[key] for key in per_class}}


def score_stages(cfg, train_split: str, val_split: str, gt_bound: bool = False,
                 chosen_on: int = 0) -> dict:
    """mIoU and per-class IoU of each stage that has ground truth: CAM/IR/pseudo on train,
    predictions on val, and, with ``gt_bound`` (this run made it), the ground-truth bound: a
    ``gt_bound/`` left by an earlier run may come from other settings. Images a step
    left out (a bad image it skipped) are not scored: each stage records how many were
    ``missing`` beside the ``images`` scored. ``chosen_on``: step 6 chose its checkpoint on
    the first that many val images (``held_out_ids``)."""
    work_dir = Path(cfg.work_dir)
    train = build_source(cfg.dataset, train_split)
    stages: dict = {}
    if train.has_masks:
        n, names = train.num_classes, train.class_names
        cams = evaluate_cam_folder(work_dir / STEP_DIRS[2], train.load_mask, n, train.ids,
                                   class_names=names, allow_missing=True)
        stages["cam"] = _stage(cams, threshold=cams["threshold"])
        ir = evaluate_label_folder(work_dir / STEP_DIRS[3], train.load_mask, n, train.ids,
                                   unsure_label=255, class_names=names, allow_missing=True)
        stages["ir_label"] = _stage(ir, coverage=ir["coverage"],
                                    per_class_coverage=ir["per_class_coverage"])
        pseudo = evaluate_label_folder(work_dir / STEP_DIRS[5], train.load_mask, n, train.ids,
                                       unsure_label=255, class_names=names, allow_missing=True)
        unsure = pseudo["coverage"] is not None and pseudo["coverage"] < 100  # unsure_margin
        kept = ("coverage", "per_class_coverage") if unsure else ()
        stages["pseudo_mask"] = _stage(pseudo, **{key: pseudo[key] for key in kept})
    val = build_source(cfg.dataset, val_split)
    if val.has_masks:
        stages["segmentation"] = _score_predictions(work_dir, val, val_split, chosen_on)
        if gt_bound:
            stages["gt_bound"] = _score_predictions(work_dir / GT_BOUND_DIR, val, val_split,
                                                    chosen_on)
    if "segmentation" in stages and "gt_bound" in stages:
        seg, bound = stages["segmentation"], stages["gt_bound"]
        for part, part_bound in ((seg, bound), (seg.get("held_out"), bound.get("held_out"))):
            if part and part_bound and part_bound["miou"]:
                part["of_gt_bound"] = round(part["miou"] / part_bound["miou"], 4)
    return stages


def held_out_ids(ids: list[str], chosen_on: int) -> list[str]:
    """The val images step 6 never chose its checkpoint on: those after its first
    ``val.max_images`` (``chosen_on``). Scored apart, they are the part of val no choice was
    tuned to; none when step 6 chose on all of them."""
    return list(ids[chosen_on:]) if 0 < chosen_on < len(ids) else []


def _score_predictions(work_dir: Path, val, val_split: str, chosen_on: int = 0) -> dict:
    """Step 7's masks in ``<work_dir>/7_predictions`` against the val masks, and apart on the
    images step 6's checkpoint choice never saw (``held_out``)."""
    def score(ids):
        return evaluate_label_folder(work_dir / STEP_DIRS[7], val.load_mask, val.num_classes, ids,
                                     class_names=val.class_names, allow_missing=True)
    stage = _stage(score(val.ids), split=val_split)
    held_out = held_out_ids(val.ids, chosen_on)
    if held_out:
        rest = score(held_out)
        stage["held_out"] = {"first": chosen_on + 1, "last": len(val.ids), "miou": rest["miou"],
                             "images": rest["images"], "per_class_iou": rest["per_class_iou"]}
    return stage


def seed_dir(work_dir, seed: int) -> Path:
    return Path(work_dir) / f"{SEED_DIR_PREFIX}{seed}"


def _over_seeds(runs: dict[int, dict]) -> dict:
    """mIoU per seed, their mean and spread (max - min), and each class's mean IoU."""
    mious = [run["miou"] for run in runs.values()]
    names = list(next(iter(runs.values()))["per_class_iou"])
    per_class = {}
    for name in names:
        values = [run["per_class_iou"].get(name) for run in runs.values()]
        values = [v for v in values if v is not None]
        per_class[name] = round(sum(values) / len(values), 2) if values else None
    block = {"miou": {str(seed): run["miou"] for seed, run in runs.items()},
             "mean": round(sum(mious) / len(mious), 2), "spread": round(max(mious) - min(mious), 2),
             "per_class_iou": per_class,
             "per_seed_iou": {str(seed): run["per_class_iou"] for seed, run in runs.items()}}
    if all("held_out" in run for run in runs.values()):
        held = {str(seed): run["held_out"]["miou"] for seed, run in runs.items()}
        block["held_out"] = {"miou": held, "mean": round(sum(held.values()) / len(held), 2),
                             "spread": round(max(held.values()) - min(held.values()), 2)}
    return block


def score_seeds(cfg, val_split: str, seeds: list[int], stages: dict, gt_bound: bool = False,
                chosen_on: int = 0) -> dict:
    """The segmentation (and with ``gt_bound`` the bound) of every seed: ``seeds[0]`` is the
    run's own (``stages``), each other one's steps 6-7 are in ``seed_<s>/``. Empty without
    val masks: a spread of nothing scored would say nothing. ``chosen_on``: as ``score_stages``."""
    if "segmentation" not in stages:
        return {}
    val = build_source(cfg.dataset, val_split)
    block: dict = {"seeds": list(seeds)}
    for key, sub in (("segmentation", ""), ("gt_bound", GT_BOUND_DIR)):
        if key == "gt_bound" and not gt_bound:
            continue
        runs = {seeds[0]: stages[key]}
        for seed in seeds[1:]:
            runs[seed] = _score_predictions(seed_dir(cfg.work_dir, seed) / sub, val, val_split,
                                            chosen_on)
        block[key] = _over_seeds(runs)
    dropped = {seed: dropped_classes(stages, iou)
               for seed, iou in block["segmentation"]["per_seed_iou"].items()}
    block["dropped_classes"] = {seed: found for seed, found in dropped.items() if found}
    if "gt_bound" in block and block["gt_bound"]["mean"]:
        block["of_gt_bound"] = round(block["segmentation"]["mean"] / block["gt_bound"]["mean"], 4)
    held = [block[key].get("held_out") for key in ("segmentation", "gt_bound") if key in block]
    if len(held) == 2 and all(held) and held[1]["mean"]:
        held[0]["of_gt_bound"] = round(held[0]["mean"] / held[1]["mean"], 4)
    return block


def dropped_classes(stages: dict, final: dict | None = None) -> dict:
    """{class: {"pseudo_mask": IoU, "segmentation": IoU}} of the classes the pseudo masks hold
    (``HELD_FROM``) and the final model loses (``DROPPED_BELOW``): step 6 did not learn them,
    a loss no earlier stage explains. ``final``: another model's per-class IoU (another seed)."""
    pseudo = stages.get("pseudo_mask", {}).get("per_class_iou") or {}
    if final is None:
        final = stages.get("segmentation", {}).get("per_class_iou") or {}
    return {name: {"pseudo_mask": iou, "segmentation": final[name]}
            for name, iou in pseudo.items() if name != "background" and iou is not None
            and iou >= HELD_FROM and final.get(name) is not None and final[name] < DROPPED_BELOW}


def auto_thresholds(work_dir) -> dict:
    """The values steps 3 and 5 derived for their ``auto`` keys (from their done.json)."""
    derived: dict = {}
    for step in (3, 5):
        derived.update((read_done(Path(work_dir) / STEP_DIRS[step]) or {}).get("auto", {}))
    return derived


def build_report(cfg, stages: dict, seconds: dict, seeds: dict | None = None) -> dict:
    classifier = read_done(Path(cfg.work_dir) / STEP_DIRS[1]) or {}
    report = {
        "dataset": cfg.dataset.name if cfg.dataset.name != "voc" else Path(cfg.dataset.root).name,
        "num_classes": build_source(cfg.dataset, cfg.dataset.val_split).num_classes,
        "classifier": {"val_map": classifier.get("val_map")},
        "stages": stages,
        "seconds": seconds,
    }
    extra = [name for name in seconds if name.startswith(f"{STEP_DIRS[1]}_")]
    if extra:
        report["extra_classifiers"] = {
            _variant(name): {"val_map": (read_done(Path(cfg.work_dir) / name) or {}).get("val_map")}
            for name in extra}
    derived = auto_thresholds(cfg.work_dir)
    if derived:
        report["auto_thresholds"] = derived
    dropped = dropped_classes(stages)
    if dropped:
        report["dropped_classes"] = dropped
    if seeds:
        report["seeds"] = seeds
    return report


def _variant(folder: str) -> str:
    """``person`` of ``1_classifier_person``."""
    return folder[len(STEP_DIRS[1]) + 1:]


def write_report(report: dict, work_dir) -> Path:
    path = Path(work_dir) / "report.json"
    return write_or_stop(path, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))


def _stage_cell(key: str, stage: dict) -> str:
    """What a stage's mIoU was measured on, e.g. ``CAM (train, threshold 0.60)``."""
    if key == "cam":
        return f"CAM (train, best threshold {stage['threshold']:.2f})"
    if key == "ir_label":
        return f"IR labels (train, confident; coverage {stage['coverage']:.1f} %)"
    if key == "pseudo_mask":
        coverage = f", labelled; coverage {stage['coverage']:.1f} %" if "coverage" in stage else ""
        return f"pseudo masks (train{coverage})"
    if key == "gt_bound":
        return f"same step 6 on ground truth ({stage.get('split', 'val')})"
    ratio = stage.get("of_gt_bound")
    bound = f"; {100 * ratio:.0f} % of gt bound" if ratio is not None else ""
    return f"segmentation ({stage.get('split', 'val')}{bound})"


def _table(header: tuple, rows: list[tuple], left: int) -> list[str]:
    """Columns padded to their widest cell: the first ``left`` to the left, the rest right."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(f"{c:<{w}}" if i < left else f"{c:>{w}}"
                         for i, (c, w) in enumerate(zip(cells, widths)))
    return [line(header), "-" * (sum(widths) + 2 * (len(widths) - 1)), *map(line, rows)]


def _number(value) -> str:
    return f"{value:.2f}" if value is not None else "-"


def format_report(report: dict) -> str:
    """The tables the runner prints: one row per step with its stage's mIoU and seconds, then
    each class's IoU at every scored stage (where the mIoU is lost)."""
    rows = []
    for name, seconds in report["seconds"].items():
        title, score = "", None
        if name == STEP_DIRS[1] and report["classifier"].get("val_map") is not None:
            title, score = "classifier (val mAP x100)", 100 * report["classifier"]["val_map"]
        extra = report.get("extra_classifiers", {}).get(_variant(name), {})
        if name.startswith(f"{STEP_DIRS[1]}_") and extra.get("val_map") is not None:
            title, score = f"{_variant(name)} classifier (val mAP x100)", 100 * extra["val_map"]
        key = STAGE_OF_STEP.get(name) or ("gt_bound" if name == GT_BOUND_DIR else None)
        stage = report["stages"].get(key) if key else None
        if stage and stage.get("miou") is not None:
            title, score = _stage_cell(key, stage), stage["miou"]
        if name.startswith(SEED_DIR_PREFIX) and report.get("seeds"):
            title, score = _seed_cell(name, report["seeds"])
        rows.append((name, title, _number(score), f"{seconds:.1f}"))
    rows.append(("total", "", "", f"{sum(report['seconds'].values()):.1f}"))
    lines = _table(("step", "stage", "mIoU", "seconds"), rows, left=2)
    stages = report["stages"]
    scored = [k for k in STAGE_TITLES if stages.get(k, {}).get("per_class_iou")]
    if scored:
        # then the share of each class's pixels the IR labels / pseudo masks label (not 255)
        covered = [k for k in scored if stages[k].get("per_class_coverage")]
        names = list(stages[scored[0]]["per_class_iou"])
        per_class = [(name, *(_number(stages[k]["per_class_iou"].get(name)) for k in scored),
                      *(_number(stages[k]["per_class_coverage"].get(name)) for k in covered))
                     for name in names]
        per_class.append(("mIoU", *(_number(stages[k]["miou"]) for k in scored),
                          *(_number(stages[k]["coverage"]) for k in covered)))
        header = ("class IoU", *(STAGE_TITLES[k] for k in scored),
                  *(f"{STAGE_TITLES[k]} labelled %" for k in covered))
        lines += ["", *_table(header, per_class, 1)]
    derived = dict(report.get("auto_thresholds", {}))
    if derived:
        threshold, images = derived.pop("cam_threshold"), derived.pop("images")
        source = f"best CAM threshold {threshold:.2f} on {images} images" if images else \
            "no masks: IRNet's values"
        lines += ["", "auto: " + ", ".join(f"{k}={v:g}" for k, v in derived.items())
                  + f" ({source})"]
    seeds = report.get("seeds")
    dropped = {None: report.get("dropped_classes", {})}
    summary = [line for line in (_seeds_line(seeds) if seeds else None, _held_out_line(report))
               if line]
    if summary:
        lines += ["", *summary]
    if seeds:
        dropped.update((seed, found) for seed, found in seeds["dropped_classes"].items()
                       if seed != str(seeds["seeds"][0]))
    for seed, found in dropped.items():
        which = f" (seed {seed})" if seed is not None else ""
        for name, iou in found.items():
            lines.append(f"warning: step 6 dropped '{name}'{which}: {iou['pseudo_mask']:.1f} IoU "
                         f"in the pseudo masks, {iou['segmentation']:.1f} in the final model")
    return "\n".join(lines)


def _seed_cell(name: str, seeds: dict) -> tuple[str, float | None]:
    """``seed_1`` -> (``segmentation, seed 1``, its mIoU); ``seed_1/gt_bound`` alike."""
    seed, _, sub = name[len(SEED_DIR_PREFIX):].partition("/")
    key = "gt_bound" if sub == GT_BOUND_DIR else "segmentation"
    title = "same step 6 on ground truth" if key == "gt_bound" else "segmentation"
    return f"{title}, seed {seed}", seeds.get(key, {}).get("miou", {}).get(seed)


def _held_out_line(report: dict) -> str | None:
    """``held out from step 6's checkpoint choice (val images 201-404): segmentation 26.78;
    gt bound 48.75; 55 % of gt bound``, over the seeds where there are several."""
    segmentation = report["stages"].get("segmentation", {}).get("held_out")
    if not segmentation:
        return None
    where = f"held out from step 6's checkpoint choice (val images {segmentation['first']}-" \
            f"{segmentation['last']})"
    seeds = report.get("seeds")
    if seeds and "held_out" in seeds["segmentation"]:
        parts = [f"{title} {_spread(seeds[key]['held_out'])}"
                 for key, title in (("segmentation", "segmentation"), ("gt_bound", "gt bound"))
                 if "held_out" in seeds.get(key, {})]
        ratio = seeds["segmentation"]["held_out"].get("of_gt_bound")
        where += f", seeds {', '.join(map(str, seeds['seeds']))}"
    else:
        bound = report["stages"].get("gt_bound", {}).get("held_out")
        parts = [f"segmentation {_number(segmentation['miou'])}"]
        parts += [f"gt bound {_number(bound['miou'])}"] if bound else []
        ratio = segmentation.get("of_gt_bound")
    parts += [f"{100 * ratio:.0f} % of gt bound"] if ratio is not None else []
    return f"{where}: " + "; ".join(parts)


def _spread(over: dict) -> str:
    """``mean 29.22, spread 2.24 (30.34 / 28.10)``."""
    each = " / ".join(_number(v) for v in over["miou"].values())
    return f"mean {over['mean']:.2f}, spread {over['spread']:.2f} ({each})"


def _seeds_line(seeds: dict) -> str:
    """``seeds 0, 1: segmentation mean 29.22, spread 2.24 (30.34 / 28.10); ...``."""
    parts = []
    for key, title in (("segmentation", "segmentation"), ("gt_bound", "gt bound")):
        if key in seeds:
            parts.append(f"{title} {_spread(seeds[key])}")
    ratio = f"; {100 * seeds['of_gt_bound']:.0f} % of gt bound" if "of_gt_bound" in seeds else ""
    return f"seeds {', '.join(map(str, seeds['seeds']))}: " + "; ".join(parts) + ratio
