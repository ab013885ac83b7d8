"""Each step against its compute floor on this machine.

Training steps (1, 4, 6): iterations through the step's own loader, model and optimizer
(``training_parts`` + ``Trainer.train_step``, as ``run`` trains them) against the same model
and optimizer stepping on one batch kept on the device: seconds per iteration, their ratio,
the system-time share and the minor page faults per iteration (the process and its loader
workers together), and one validation pass.

Image steps (2, 3, 5, 7): seconds per image of the step's per-image work in this process
(reading the image and its inputs, the network, the walk, the CRF) against the seconds spent
inside the network's forward passes alone (hooks around the network; step 3 has none: all
of it is its two CRFs, which the step spreads over ``ir_labels.num_workers`` processes).

    python benchmarks/bench_steps.py configs/camvid [--steps 1 2 3 4 5 6 7] [--iterations 30]

Steps 2-7 read a finished run's outputs under the config's work_dir (run the pipeline
first); a step without its inputs is skipped with a line. Linux only (/proc). Ends with one
JSON line, as the other benchmarks.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model_training.common.allocator import tune_allocator  # noqa: E402
from model_training.common.config import StepError, load_config, resolve_device  # noqa: E402
from model_training.common.steps import STEPS  # noqa: E402
from model_training.common.trainer import Trainer, move_to, seed_everything  # noqa: E402

TRAINING_STEPS = (1, 4, 6)
TICKS = os.sysconf("SC_CLK_TCK")


def _tree_pids() -> list[int]:
    """This process and its children (the loader workers)."""
    pids = [os.getpid()]
    for task in Path("/proc/self/task").iterdir():
        children = (task / "children").read_text().split()
        pids += [int(pid) for pid in children]
    return pids


def cpu_counters() -> tuple[float, float, int]:
    """(user s, system s, minor page faults) summed over this process and its workers."""
    user = system = faults = 0
    for pid in _tree_pids():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:  # a worker that just ended
            continue
        faults += int(fields[7])
        user += int(fields[11])
        system += int(fields[12])
    return user / TICKS, system / TICKS, faults


def timed(run_one, iterations: int, device: torch.device) -> dict:
    """Seconds, system share and faults per iteration of ``run_one()``."""
    user0, system0, faults0 = cpu_counters()
    start = time.perf_counter()
    for _ in range(iterations):
        run_one()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    user1, system1, faults1 = cpu_counters()
    cpu = (user1 - user0) + (system1 - system0)
    return {"s_per_iter": round(seconds / iterations, 4),
            "cpu_s_per_iter": round(cpu / iterations, 4),
            "system_share": round((system1 - system0) / max(cpu, 1e-9), 4),
            "faults_per_iter": round((faults1 - faults0) / iterations)}


def measure(config_dir: Path, number: int, iterations: int, warmup: int,
            overrides: list[str]) -> dict:
    step = next(s for s in STEPS if s.number == number)
    module = importlib.import_module(step.module)
    cfg = load_config(config_dir / f"{step.folder}.yaml", overrides, module.DEFAULTS)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    parts = module.training_parts(cfg, device)
    with tempfile.TemporaryDirectory() as out_dir:  # only fit() writes there: nothing does
        trainer = Trainer(parts.model, parts.param_groups, parts.loader, out_dir, cfg.train, device,
                          step_fn=parts.step_fn, validate_fn=parts.validate_fn,
                          best_metric="unused" if parts.validate_fn else None)
    parts.model.train()
    batches = iter(parts.loader)
    kept = {}

    def real_step() -> None:
        nonlocal batches
        try:
            batch = next(batches)
        except StopIteration:  # an epoch shorter than the run: the next epoch's batches
            batches = iter(parts.loader)
            batch = next(batches)
        kept["batch"] = move_to(batch, device)
        trainer.train_step(kept["batch"])

    for _ in range(warmup):
        real_step()
    real = timed(real_step, iterations, device)
    del batches  # no batch is fetched from here on: the workers idle
    floor = timed(lambda: trainer.train_step(kept["batch"]), iterations, device)
    result = {"step": step.folder, "threads": torch.get_num_threads(),
              "num_workers": cfg.num_workers, "batches_per_epoch": len(parts.loader),
              "real": real, "floor": floor,
              "ratio": round(real["s_per_iter"] / floor["s_per_iter"], 3)}
    if parts.validate_fn is not None:
        start = time.perf_counter()
        trainer.validate_here()
        result["validation_s"] = round(time.perf_counter() - start, 2)
    return result


class ForwardClock:
    """Seconds spent inside a module's forward calls, from hooks around them."""

    def __init__(self, module: torch.nn.Module | None):
        self.seconds, self._start = 0.0, 0.0
        if module is not None:
            module.register_forward_pre_hook(self._enter)
            module.register_forward_hook(self._leave)

    def _enter(self, *_) -> None:
        self._start = time.perf_counter()

    def _leave(self, *_) -> None:
        self.seconds += time.perf_counter() - self._start


def image_work(number: int, cfg, device: torch.device):
    """(per-image function of an id, the network it runs or None, the ids it can do)."""
    from model_training.common.auto_thresholds import resolve_auto
    from model_training.common.config import ConfigError
    from model_training.common.datasets import build_source
    from model_training.common.step_io import classifier_dir, load_cams, step_dir

    def with_cams(ids):
        return [i for i in ids if (step_dir(cfg.work_dir, 2) / f"{i}.npz").is_file()]

    if number == 2:
        from inference.irn_steps.cams_step import CamExtractor
        source = build_source(cfg.dataset, cfg.cams.split)
        checkpoint = Path(cfg.cams.checkpoint or classifier_dir(cfg.work_dir)
                          / f"{cfg.cams.classifier_epoch}.pt")
        if not checkpoint.is_file():
            raise ConfigError(f"classifier checkpoint not found: {checkpoint}")
        extractor = CamExtractor(checkpoint, device, cfg.cams, source.class_names)
        return (lambda i: extractor(source.load_image(i), source.labels(i), cfg.cams.labels),
                extractor.model.backbone, source.ids)  # the CAMs read its features
    if number == 3:
        from inference.irn_steps.ir_labels import cams_to_ir_label
        from inference.irn_steps.ir_labels_step import crf_params
        source = build_source(cfg.dataset, cfg.ir_labels.split)
        resolve_auto(cfg, "ir_labels", ("conf_fg_thres", "conf_bg_thres"), cfg.ir_labels.split)
        section, params = cfg.ir_labels, crf_params(cfg.ir_labels)

        def ir_label(image_id):
            cams = load_cams(step_dir(cfg.work_dir, 2) / f"{image_id}.npz")
            return cams_to_ir_label(source.load_image(image_id), cams["keys"], cams["high_res"],
                                    section.conf_fg_thres, section.conf_bg_thres, params)
        return ir_label, None, with_cams(source.ids)
    if number == 5:
        from inference.irn_steps.pseudo_masks_step import PseudoMaskMaker
        source = build_source(cfg.dataset, cfg.pseudo_masks.split)
        checkpoint = Path(cfg.pseudo_masks.checkpoint or step_dir(cfg.work_dir, 4) / "best.pt")
        if not checkpoint.is_file():
            raise ConfigError(f"IRNet checkpoint not found: {checkpoint}")
        resolve_auto(cfg, "pseudo_masks", ("bg_thres", "bg_power"), cfg.pseudo_masks.split)
        maker = PseudoMaskMaker(checkpoint, device, cfg.pseudo_masks)
        return (lambda i: maker(source.load_image(i),
                                load_cams(step_dir(cfg.work_dir, 2) / f"{i}.npz")),
                maker.model, with_cams(source.ids))
    from inference.segmentation.predictions_step import predicted_split
    from inference.segmentation.submit import generate_predictions as submit
    folder = step_dir(cfg.work_dir, 6)
    if not (folder / "export_config.yaml").is_file():
        raise ConfigError(f"no exported model in {folder}: run step 6 first")
    settings = submit.load_config(folder / "export_config.yaml")
    loaded = submit.load_checkpoint(folder / settings["weights"], device)
    source = build_source(cfg.dataset, predicted_split(cfg))
    amp = settings["amp"] and device.type == "cuda"

    def predict(image_id):
        tensor = submit.image_to_tensor(source.load_image(image_id), loaded.mean, loaded.std, device)
        return submit.predict_mask(loaded.model, tensor, settings, amp)
    return predict, loaded.model, source.ids


def measure_images(config_dir: Path, number: int, images: int, warmup: int,
                   overrides: list[str]) -> dict:
    step = next(s for s in STEPS if s.number == number)
    module = importlib.import_module(step.module)
    cfg = load_config(config_dir / f"{step.folder}.yaml", overrides, module.DEFAULTS)
    device = resolve_device(cfg.device)
    work, network, ids = image_work(number, cfg, device)
    if len(ids) < warmup + images:
        raise StepError(f"{step.folder}: {len(ids)} images have the step's inputs, "
                        f"{warmup + images} wanted")
    clock = ForwardClock(network)
    with torch.inference_mode():
        for image_id in ids[:warmup]:
            work(image_id)
        clock.seconds = 0.0
        timing = timed(lambda it=iter(ids[warmup:]): work(next(it)), images, device)
    forward = clock.seconds / images
    return {"step": step.folder, "threads": torch.get_num_threads(), "images": images,
            "real": timing, "forward_s_per_image": round(forward, 4),
            "ratio": round(timing["s_per_iter"] / forward, 3) if forward else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config_dir", type=Path, help="a config folder, e.g. configs/camvid")
    parser.add_argument("--steps", type=int, nargs="+", default=list(range(1, 8)),
                        choices=range(1, 8))
    parser.add_argument("--iterations", type=int, default=30,
                        help="training iterations, or images of an image step, timed")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="applied to every step's config (e.g. num_workers=1)")
    args = parser.parse_intermixed_args()
    tune_allocator()  # as every entry point does
    results = []
    for number in args.steps:
        kind = measure if number in TRAINING_STEPS else measure_images
        try:
            result = kind(args.config_dir, number, args.iterations, args.warmup, args.overrides)
        except StepError as err:
            print(f"step {number} skipped: {err}", file=sys.stderr)
            continue
        real = result["real"]
        line = (f"{result['step']:16s} {real['s_per_iter']:.3f} s/"
                f"{'it' if number in TRAINING_STEPS else 'img'} (system "
                f"{real['system_share']:.1%}, {real['faults_per_iter']} faults)  ")
        if number in TRAINING_STEPS:
            line += (f"floor {result['floor']['s_per_iter']:.3f} s/it  ratio {result['ratio']:.2f}"
                     f"  validation {result.get('validation_s', '-')} s")
        else:
            line += f"forward passes {result['forward_s_per_image']:.3f} s/img"
        print(line, flush=True)
        results.append(result)
    print(json.dumps({"benchmark": "steps", "config": str(args.config_dir),
                      "cpu_count": os.cpu_count(), "results": results}))


if __name__ == "__main__":
    main()
