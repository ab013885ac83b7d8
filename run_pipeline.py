"""Run all seven steps on one dataset, score every stage, write report.json and a figure.

    python run_pipeline.py configs/toy [key=value ...] [--gt-bound] [--seeds N]

Each step runs through the same function its own script calls, with the config file
``configs/<dataset>/<n>_<step>.yaml``. A step whose folder says it finished, by the same settings
and from the same inputs, is skipped, so a second run only re-scores. A finished or partial
step whose settings or inputs changed stops the run with one line naming what differs;
``overwrite=true`` redoes those steps and, since their outputs change, the ones after them.
``key=value`` overrides go to every step whose config has that key (``train.epochs=1``
shortens all training).
``--gt-bound`` also trains step 6 on the ground-truth masks with the same settings and
predicts with step 7 (into ``<work_dir>/gt_bound/``), so the report shows how much of the
fully supervised result the pseudo masks reach.
``--seeds N`` trains steps 6-7 (and the bound) again with the N-1 seeds after the config's, each
in ``<work_dir>/seed_<s>/`` on the same pseudo masks, and reports their mean and spread: a
3-epoch step 6 moves by a few points between seeds, more than many levers are worth.
"""
from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path
from types import ModuleType

from inference.scoring.examples import write_examples
from inference.scoring.report import (GT_BOUND_DIR, build_report, format_report, score_seeds,
                                      score_stages, seed_dir, write_report)
from model_training.common import steps
from model_training.common.allocator import tune_allocator
from model_training.common.config import (COMMON_DEFAULTS, ConfigError, StepError, load_config,
                                          merge_defaults, parse_override)
from model_training.common.datasets import build_source
from model_training.common.provenance import stale_message, stale_reasons
from model_training.common.step_cli import error_line, exit_on_config_error
from model_training.common.step_io import STEP_DIRS, read_done

# The step modules in running order (model_training/common/steps.py): step n's config is
# ``<STEP_DIRS[n]>.yaml``, its outputs go to ``<work_dir>/<STEP_DIRS[n]>/``.
STEPS = [importlib.import_module(step.module) for step in steps.STEPS]


def _has_key(defaults: dict, dotted: str) -> bool:
    node = defaults
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def step_files(config_dir: Path) -> list[tuple[str, str, ModuleType]]:
    """(step folder, config file, step module) in running order: the seven steps, and after step 1
    every extra classifier the folder holds (``1_classifier_<variant>.yaml``, e.g. the binary
    person model of "no people allowed", which step 2 merges through ``cams.extra_classifiers``)."""
    files = [(STEP_DIRS[n], f"{STEP_DIRS[n]}.yaml", step) for n, step in enumerate(STEPS, 1)]
    extras = [(path.stem, path.name, STEPS[0])
              for path in sorted(config_dir.glob(f"{STEP_DIRS[1]}_*.yaml"))]
    return files[:1] + extras + files[1:]


def load_step_configs(config_dir: Path, overrides: list[str]) -> list[tuple]:
    """(step folder, step module, validated config) of every step, before anything runs; an
    override no step knows is an error."""
    if not config_dir.is_dir():
        raise ConfigError(f"config folder not found: {config_dir}")
    loaded, used = [], set()
    for name, file_name, module in step_files(config_dir):
        defaults = merge_defaults(COMMON_DEFAULTS, module.DEFAULTS)
        mine = [o for o in overrides if _has_key(defaults, parse_override(o)[0])]
        used.update(mine)
        cfg = load_config(config_dir / file_name, mine, module.DEFAULTS)
        variant = name[len(STEP_DIRS[1]) + 1:] if name.startswith(f"{STEP_DIRS[1]}_") else None
        if variant is not None and cfg.variant != variant:
            raise ConfigError(f"key 'variant' in {config_dir / file_name} must be {variant!r} "
                              f"(the file's name), got {cfg.variant!r}")
        loaded.append((name, module, cfg))
    unknown = [o for o in overrides if o not in used]
    if unknown:
        raise ConfigError(f"override '{unknown[0]}' matches no key of any step's config")
    return loaded


def run_steps(step_configs, label: str = "") -> dict:
    """Run, in order, the steps not finished by the same recipe (``provenance``); one whose
    folder holds another recipe's outputs is a ConfigError unless ``overwrite``. Returns
    seconds per step (a skipped step's own time).

    A StepError of a step comes out with the step's folder in front (``[2_cams] ...``), so
    the one line the pipeline prints says which of the seven steps stopped."""
    seconds = {}
    for name, step, cfg in step_configs:
        shown = f"{label}/{name}" if label else name
        folder = Path(cfg.work_dir) / name
        reasons = stale_reasons(folder, cfg, step.step_inputs(cfg), step.DEFAULTS)
        done = read_done(folder)
        if done is not None and not reasons:
            print(f"[{shown}] finished earlier: skipped")
            seconds[name] = float(done.get("seconds", 0.0))
            continue
        if reasons and not cfg.overwrite:
            raise ConfigError(stale_message(folder, reasons))
        print(f"[{shown}] running" + (f" again: {reasons[0]}" if reasons else ""))
        start = time.time()
        try:
            summary = step.run(cfg)
        except StepError as err:
            raise StepError(f"[{shown}] {error_line(err)}") from None
        print(f"[{shown}] {step.summary_line(summary)}")
        seconds[name] = round(time.time() - start, 2)
    return seconds


def run_gt_bound(config_dir: Path, overrides: list[str], work_dir,
                 label: str = GT_BOUND_DIR) -> float:
    """Steps 6-7 again with ``mask_source=gt`` in ``<work_dir>/gt_bound``, their log lines
    prefixed with ``label``; returns their seconds."""
    bound_overrides = [*overrides, f"work_dir={Path(work_dir) / GT_BOUND_DIR}", "mask_source=gt"]
    step_configs = exit_on_config_error(load_step_configs, config_dir, bound_overrides)
    seconds = exit_on_config_error(
        run_steps, [s for s in step_configs if s[0] in (STEP_DIRS[6], STEP_DIRS[7])],
        label=label)
    return round(sum(seconds.values()), 2)


def run_extra_seeds(config_dir: Path, overrides: list[str], segmentation, seeds: list[int],
                    gt_bound: bool) -> dict[str, float]:
    """Steps 6-7 (and with ``gt_bound`` the bound) again for each of ``seeds`` in
    ``<work_dir>/seed_<s>/``, trained on the run's own pseudo masks; seconds per folder.
    ``segmentation`` is the run's step-6 config."""
    masks = segmentation.pseudo_mask_dir or Path(segmentation.work_dir) / STEP_DIRS[5]
    seconds = {}
    for seed in seeds:
        folder = seed_dir(segmentation.work_dir, seed)
        seed_overrides = [*overrides, f"work_dir={folder}", f"seed={seed}",
                          f"pseudo_mask_dir={masks}"]
        step_configs = exit_on_config_error(load_step_configs, config_dir, seed_overrides)
        done = exit_on_config_error(
            run_steps, [s for s in step_configs if s[0] in (STEP_DIRS[6], STEP_DIRS[7])],
            label=folder.name)
        seconds[folder.name] = round(sum(done.values()), 2)
        if gt_bound:
            bound = f"{folder.name}/{GT_BOUND_DIR}"
            seconds[bound] = run_gt_bound(config_dir, seed_overrides, folder, label=bound)
    return seconds


def _seed_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of seeds, at least 1, got {text!r}")
    return int(text)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config_dir", type=Path, help="e.g. configs/toy")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--gt-bound", action="store_true",
                        help="also train step 6 on ground-truth masks (same config) and score it")
    parser.add_argument("--seeds", type=_seed_count, default=1, metavar="N",
                        help="train steps 6-7 with N seeds (the config's and the next N-1, in "
                             "<work_dir>/seed_<s>/) and report their mean and spread")
    args = parser.parse_args(argv)
    tune_allocator()
    step_configs = exit_on_config_error(load_step_configs, args.config_dir, args.overrides)
    seconds = exit_on_config_error(run_steps, step_configs)
    cfg = step_configs[-1][2]
    cam_split = next(c for name, _, c in step_configs if name == STEP_DIRS[2]).cams.split
    if args.gt_bound:
        seconds[GT_BOUND_DIR] = run_gt_bound(args.config_dir, args.overrides, cfg.work_dir)
    segmentation = next(c for name, _, c in step_configs if name == STEP_DIRS[6])
    seeds = [segmentation.seed + n for n in range(args.seeds)]
    seconds.update(run_extra_seeds(args.config_dir, args.overrides, segmentation, seeds[1:],
                                   args.gt_bound))
    val_split = STEPS[6].predicted_split(cfg)
    # step 6 chose its checkpoint on its first val.max_images: the rest of its split is held out
    chosen_on = segmentation.val.max_images if val_split == segmentation.dataset.val_split else 0
    stages = exit_on_config_error(score_stages, cfg, cam_split, val_split, args.gt_bound, chosen_on)
    over_seeds = exit_on_config_error(score_seeds, cfg, val_split, seeds, stages, args.gt_bound,
                                      chosen_on) if len(seeds) > 1 else {}
    report = build_report(cfg, stages, seconds, over_seeds)
    write_report(report, cfg.work_dir)
    print(format_report(report))
    figure = write_examples(build_source(cfg.dataset, cam_split), cfg.work_dir,
                            Path(cfg.work_dir) / "examples.png")
    if figure is not None:
        print(f"examples: {figure}")
    print(f"report: {Path(cfg.work_dir) / 'report.json'}")
    return report


if __name__ == "__main__":
    main()
