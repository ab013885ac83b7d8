"""The training loop shared by steps 1 (classifier), 4 (IRNet) and 6 (segmentation).

A step hands over its model, parameter groups, loader and two callbacks; the loop owns
everything else: optimizer, per-iteration LR schedule, AMP (CUDA only), gradient clipping,
validation, an exponential moving average of the weights (``train.ema_decay``),
``best.pt`` / ``last.pt`` checkpoints (atomic, loadable with
``weights_only=True``), ``resume=true``, seeding, tqdm, TensorBoard and ``metrics.csv``.

Distributed training (torchrun, see ``distributed.py``): pass a DDP-wrapped model and a
loader whose sampler has ``set_epoch``. Only rank 0 writes files; the logged training
losses are averaged over every rank's batches; rank 0 validates on the whole val set (the
numbers a single process gets) and shares the result, while the other ranks wait.
"""
from __future__ import annotations

import csv
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from model_training.common.progress import progress
from model_training.common.step_io import clear_done, mark_done, write_or_stop

from . import distributed
from .checkpoints import read_checkpoint
from .config import (AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE, ConfigError, Range, Schema,
                     StepError)
from .distributed import (barrier, broadcast_from_main, gather_from_ranks, is_main, mean_over_ranks,
                          rank, world_size)
from .folder_lock import release
from .provenance import claim_folder

# The checkpoints every training step writes, by the name a config picks one with
# (``cams.classifier_epoch``, step 6's ``export.epoch``): ``<name>.pt``.
CHECKPOINT_EPOCHS = ("best", "last")

# The ``train`` section every training step shares (plus the top-level ``resume`` key).
TRAIN_DEFAULTS = Schema({
    "resume": False,  # continue from <step dir>/last.pt
    "train": {
        "epochs": 5,
        # > 0: epochs are raised until they hold this many iterations, so that a small dataset
        # still gets a schedule's worth of updates (DeepLab and MMSegmentation count iterations)
        "min_iterations": 0,
        "batch_size": 16,
        "optimizer": "sgd",  # sgd | adamw
        "lr": 0.01,  # base LR: pretrained layers; new layers get lr * new_layer_lr_mult
        "new_layer_lr_mult": 10.0,
        "momentum": 0.9,  # sgd only
        "weight_decay": 1e-4,
        "lr_schedule": "poly",  # poly | step | constant, applied every iteration
        "poly_power": 0.9,
        "step_epochs": [],  # step schedule: LR x step_gamma at each of these epochs
        "step_gamma": 0.1,
        "amp": True,  # mixed precision, CUDA only (ignored on CPU)
        "grad_clip": 0.0,  # max gradient norm; 0 = no clipping
        "val_every": 1,  # validate every N epochs (and after the last)
        "sync_bn": False,  # torchrun on CUDA: BatchNorm statistics over every process's batch
        "ema_decay": 0.0,  # validate and save an EMA of the weights (e.g. 0.99), below 1; 0: the weights as trained
    },
}, ranges={
    "train.epochs": AT_LEAST_1,
    "train.min_iterations": NON_NEGATIVE,
    "train.batch_size": AT_LEAST_1,
    "train.lr": POSITIVE,
    "train.new_layer_lr_mult": POSITIVE,
    "train.momentum": FRACTION,
    "train.weight_decay": NON_NEGATIVE,
    "train.poly_power": NON_NEGATIVE,
    "train.step_epochs": AT_LEAST_1,
    "train.step_gamma": POSITIVE,
    "train.grad_clip": NON_NEGATIVE,
    "train.val_every": AT_LEAST_1,
    "train.ema_decay": Range(0, 1, open_high=True),  # 1 would never move the average
}, run_only={"resume"})

StepFn = Callable[[nn.Module, Any], Mapping[str, torch.Tensor]]
ValidateFn = Callable[[nn.Module], Mapping[str, Any]]


@dataclass
class TrainingParts:
    """What a training step (1, 4, 6) hands the loop: its ``training_parts(cfg, device)``
    builds them, ``run`` trains them, and ``benchmarks/bench_steps.py`` times them against
    the same model on batches already in memory."""

    model: nn.Module  # unwrapped, on the device
    param_groups: list[dict]
    loader: Any  # DataLoader of training batches
    step_fn: StepFn
    validate_fn: ValidateFn | None = None


def seed_everything(seed: int) -> None:
    """Python, numpy and torch (all devices) from one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: numpy/python RNGs follow torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel/DataParallel wrapper (or the model)."""
    return getattr(model, "module", model)


def move_to(batch: Any, device: torch.device) -> Any:
    """Tensors anywhere in a batch (dict/list/tuple) moved to ``device``; the rest kept."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """{"ap": {"car": 0.9}, "map": 0.8} -> {"ap/car": 0.9, "map": 0.8} (numbers only)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, name + "/"))
        elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
            flat[name] = float(value)
        elif isinstance(value, torch.Tensor) and value.numel() == 1:
            flat[name] = float(value)
    return flat


def start_training_step(cfg, out_dir: Path, defaults: Mapping, inputs: Mapping) -> torch.device:
    """What a training step (1, 4, 6) does once its dataset settings are checked (a wrong one
    must not leave a recipe that refuses the corrected command) and before it builds its
    model: claim the folder (``provenance``), refuse to start over on a previous run unless
    told (``check_resume``), join torchrun's processes and seed, each rank its own
    augmentations. Returns this process's device."""
    claim_folder(out_dir, cfg, inputs, defaults)
    check_resume(out_dir, cfg.resume, cfg.overwrite)
    device = distributed.setup(cfg)
    if device.type == "cuda":  # crops of a few fixed sizes: cuDNN times its kernels once a size
        torch.backends.cudnn.benchmark = True
    seed_everything(cfg.seed + rank())
    return device


def finish_training_step(out_dir: Path, summary: dict, started: float) -> dict:
    """The step's summary with its seconds, recorded (rank 0) in its done marker."""
    summary = {**summary, "seconds": round(time.time() - started, 2)}
    if is_main():
        mark_done(out_dir, summary)
    release(out_dir)
    return summary


def epochs_for(train_cfg: Mapping, batches_per_epoch: int) -> int:
    """``train.epochs``, or more where ``train.min_iterations`` needs more epochs of
    ``batches_per_epoch`` batches (a loader's length)."""
    epochs = int(train_cfg["epochs"])
    floor = int(train_cfg["min_iterations"])
    if floor and batches_per_epoch:
        epochs = max(epochs, math.ceil(floor / batches_per_epoch))
    return epochs


class LRSchedule:
    """LR factor as a function of training progress in (fractional) epochs.

    Working in epochs, not iterations, keeps the schedule right when an epoch's length
    varies (repeat-factor sampling) or when ``epochs`` is raised on resume.
    """

    def __init__(self, kind: str, epochs: int, poly_power: float = 0.9,
                 step_epochs: Iterable[int] = (), step_gamma: float = 0.1):
        if kind not in ("poly", "step", "constant"):
            raise ConfigError(f"key 'train.lr_schedule' must be poly, step or constant, got {kind!r}")
        self.kind, self.epochs, self.poly_power = kind, epochs, poly_power
        self.step_epochs, self.step_gamma = sorted(step_epochs), step_gamma

    def factor(self, progress: float) -> float:
        if self.kind == "poly":
            return max(0.0, 1.0 - progress / self.epochs) ** self.poly_power
        if self.kind == "step":
            return self.step_gamma ** sum(progress >= milestone for milestone in self.step_epochs)
        return 1.0

    def apply(self, optimizer: torch.optim.Optimizer, progress: float) -> None:
        factor = self.factor(progress)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor


def ema_average(decay: float) -> Callable:
    """``AveragedModel``'s ``avg_fn`` for an EMA whose decay ramps up as (1 + n) / (10 + n) up
    to ``decay`` (n: updates so far), so a short run's first, untrained weights fade fast.
    Integer buffers (BatchNorm's batch count) follow the model."""
    def update(averaged: torch.Tensor, current: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        if not averaged.is_floating_point():
            return current
        rate = torch.clamp((1 + updates) / (10 + updates), max=decay).to(averaged.dtype)
        return averaged + (current - averaged) * (1 - rate)
    return update


def build_optimizer(param_groups: Iterable[Mapping], train_cfg: Mapping) -> torch.optim.Optimizer:
    """SGD or AdamW over groups ``{"params", "lr_mult", ...}``; lr = train.lr * lr_mult."""
    groups = []
    for group in param_groups:
        params = [p for p in group["params"] if p.requires_grad]
        if params:
            lr = float(train_cfg["lr"]) * float(group.get("lr_mult", 1.0))
            groups.append({"params": params, "lr": lr, "initial_lr": lr,
                           "name": group.get("name", f"group{len(groups)}")})
    if not groups:
        raise ValueError("no trainable parameters")
    kind = train_cfg["optimizer"]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=train_cfg["momentum"],
                               weight_decay=train_cfg["weight_decay"])
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=groups[0]["lr"], weight_decay=train_cfg["weight_decay"])
    raise ConfigError(f"key 'train.optimizer' must be sgd or adamw, got {kind!r}")


def check_resume(out_dir: str | os.PathLike, resume: bool, overwrite: bool) -> None:
    """Refuse to silently start over on top of a previous run: call before any heavy work."""
    last = Path(out_dir) / "last.pt"
    if last.is_file() and not resume and not overwrite:
        raise ConfigError(f"{last} exists: set resume=true to continue it or "
                          f"overwrite=true to start over")


def _rng_state() -> dict:
    # Lists and tensors only, so last.pt stays loadable with weights_only=True.
    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: Mapping) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())  # map_location may have moved it
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class MetricsLog:
    """metrics.csv (one row per epoch, columns growing as new metrics appear) + TensorBoard."""

    def __init__(self, out_dir: Path, start_epoch: int, start_iteration: int):
        self.path = out_dir / "metrics.csv"
        self.rows = self._read(start_epoch)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed run logged past the checkpoint we resume from.
        self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=start_iteration or None)

    def _read(self, start_epoch: int) -> list[dict]:
        if start_epoch == 0 or not self.path.is_file():
            return []
        with open(self.path, newline="") as f:
            return [row for row in csv.DictReader(f) if int(row["epoch"]) <= start_epoch]

    def scalar(self, name: str, value: float, step: int) -> None:
        self.writer.add_scalar(name, value, step)

    def epoch(self, row: dict, iteration: int) -> None:
        self.rows.append(row)
        for key, value in row.items():
            if key != "epoch":
                self.writer.add_scalar(key, value, iteration)
        self.writer.flush()
        columns = list(dict.fromkeys(k for r in self.rows for k in r))

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(self.rows)

        write_or_stop(self.path, write)

    def close(self) -> None:
        self.writer.close()


class Trainer:
    """Runs epochs of ``step_fn`` over ``train_loader`` and keeps the checkpoints.

    ``step_fn(model, batch)`` gets the batch already on the device and returns a dict of
    scalar tensors; ``"loss"`` is optimised, every entry is averaged into the logs.
    ``validate_fn(model)`` (optional) gets the unwrapped model in eval mode under
    ``torch.inference_mode`` and returns metrics (numbers, or dicts of numbers such as
    per-class AP); ``best_metric`` names the one, higher is better, that picks ``best.pt``.
    Without validation ``best.pt`` is the latest epoch. ``checkpoint_fields`` are stored in
    both checkpoints (class ids, architecture, config): plain values only.
    """

    def __init__(self, model: nn.Module, param_groups: Iterable[Mapping], train_loader,
                 out_dir: str | os.PathLike, train_cfg: Mapping, device: torch.device, *,
                 step_fn: StepFn, validate_fn: ValidateFn | None = None,
                 best_metric: str | None = None, checkpoint_fields: Mapping | None = None,
                 resume: bool = False):
        if validate_fn is not None and best_metric is None:
            raise ValueError("validate_fn needs best_metric: the metric that picks best.pt")
        self.model = model
        self.loader = train_loader
        self.out_dir = Path(out_dir)
        self.cfg = train_cfg
        self.device = torch.device(device)
        self.step_fn, self.validate_fn, self.best_metric = step_fn, validate_fn, best_metric
        self.fields = dict(checkpoint_fields or {})
        self.resume = resume
        self.is_main = is_main()
        batches = len(train_loader)
        self.epochs = epochs_for(train_cfg, batches)
        if self.epochs != int(train_cfg["epochs"]):
            self._note(f"train.epochs {train_cfg['epochs']} -> {self.epochs}: "
                       f"{batches} batches an epoch, train.min_iterations "
                       f"{train_cfg['min_iterations']}")
        self.optimizer = build_optimizer(param_groups, train_cfg)
        self.schedule = LRSchedule(train_cfg["lr_schedule"], self.epochs, train_cfg["poly_power"],
                                   train_cfg["step_epochs"], train_cfg["step_gamma"])
        self.amp = bool(train_cfg["amp"]) and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        decay = float(train_cfg["ema_decay"])
        # The average is what validation scores and the checkpoints' "model" holds; last.pt
        # also keeps the trained weights ("trained_model") to resume from.
        self.ema = (torch.optim.swa_utils.AveragedModel(unwrap(model), avg_fn=ema_average(decay),
                                                        use_buffers=True) if decay > 0 else None)
        self.epoch = 0  # epochs completed
        self.iteration = 0
        self.best_score = -math.inf
        self.best_epoch = 0
        self.last_metrics: dict = {}

    # ---- checkpoints -------------------------------------------------------------------
    def _save(self, name: str, full: bool, rng_states: list | None = None) -> None:
        """``rng_states``: every rank's RNG state (``gather_from_ranks``), for last.pt."""
        state = {"model": self.evaluated_model().state_dict(), "epoch": self.epoch,
                 "metrics": self.last_metrics, **self.fields}
        if full:
            state.update(optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
                         scheduler={"iteration": self.iteration}, best_score=self.best_score,
                         best_epoch=self.best_epoch, rng=rng_states)
            if self.ema is not None:
                state.update(trained_model=unwrap(self.model).state_dict(),
                             ema_updates=self.ema.n_averaged)
        write_or_stop(self.out_dir / name, lambda tmp: torch.save(state, tmp))

    def _restore(self) -> None:
        last = self.out_dir / "last.pt"
        if not last.is_file():
            self._note(f"resume: {last} not found, starting from epoch 0")
            return
        ema_keys = ("trained_model", "ema_updates") if self.ema is not None else ()
        state = read_checkpoint(last, "start this step over with overwrite=true", self.device,
                                keys=("model", "optimizer", "scaler", "epoch", "scheduler",
                                      "best_score", "best_epoch", "metrics", "rng", *ema_keys))
        if self.ema is None:
            unwrap(self.model).load_state_dict(state["model"])
        else:
            unwrap(self.model).load_state_dict(state["trained_model"])
            self.ema.module.load_state_dict(state["model"])
            self.ema.n_averaged.copy_(state["ema_updates"])
        configured = [group["initial_lr"] for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, initial_lr in zip(self.optimizer.param_groups, configured):
            group["initial_lr"] = initial_lr  # the LR in the config wins over the saved one
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.iteration = state["epoch"], state["scheduler"]["iteration"]
        self.best_score, self.best_epoch = state["best_score"], state["best_epoch"]
        self.last_metrics = state["metrics"]
        # One state per rank: each rank continues its own augmentation stream.
        states = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        if len(states) != world_size():
            self._note(f"resume: {last} was written by {len(states)} process(es), not "
                       f"{world_size()}: rank r continues the random stream of rank r % {len(states)}")
        _set_rng_state(states[rank() % len(states)])
        self._note(f"resume: continuing after epoch {self.epoch} of {last}")
        self._reconcile_best()

    def _reconcile_best(self) -> None:
        """Make ``best.pt`` the epoch that the restored ``last.pt`` names as best. A run killed
        between writing ``last.pt`` and ``best.pt`` of one epoch left last.pt's model as the
        best: write it again. A ``best.pt`` of another epoch (an older version wrote best.pt
        first, so a killed run could leave an epoch this run does not continue) is dropped,
        and the best is chosen again from last.pt's epoch on. Every rank keeps the same best;
        only rank 0 touches the files."""
        path = self.out_dir / "best.pt"
        on_disk = (read_checkpoint(path, "start this step over with overwrite=true",
                                   keys=("epoch",))["epoch"] if path.is_file() else 0)
        if on_disk == self.best_epoch:
            return
        if self.best_epoch != self.epoch:
            self._note(f"resume: {path} holds epoch {on_disk}, not the best epoch "
                       f"{self.best_epoch} that last.pt names: dropped; the best is chosen "
                       f"again from epoch {self.epoch} on")
            if self.is_main:
                path.unlink(missing_ok=True)
            self.best_score, self.best_epoch = -math.inf, 0
            last_validated = self.validate_fn is None or self._validation_due()
            if not self._update_best(self.last_metrics if last_validated else None):
                return
        if self.is_main:
            self._save("best.pt", full=False)
        self._note(f"resume: {path} rewritten from epoch {self.epoch} of last.pt")

    def _clear_previous_run(self) -> None:
        """Starting over (overwrite=true): no stale checkpoint or curve may outlive it."""
        for name in ("best.pt", "last.pt", "metrics.csv"):
            (self.out_dir / name).unlink(missing_ok=True)
        for events in (self.out_dir / "tb").glob("events.out.tfevents.*"):
            events.unlink()

    def _note(self, text: str) -> None:
        if self.is_main:
            tqdm.write(text, file=sys.stderr)

    # ---- loop --------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train up to ``train.epochs``; returns best score/epoch and the last metrics."""
        if self.is_main:
            clear_done(self.out_dir)  # done again only when the step's mark_done says so
        if self.resume:
            self._restore()
        elif self.is_main:
            self._clear_previous_run()
        log = MetricsLog(self.out_dir, self.epoch, self.iteration) if self.is_main else None
        try:
            while self.epoch < self.epochs:
                started = time.time()
                train_logs = self._train_epoch(log)
                self.epoch += 1
                row = {"epoch": self.epoch, **{f"train/{k}": v for k, v in train_logs.items()}}
                metrics = dict(self._validate()) if self._validation_due() else None
                if metrics is not None:
                    self.last_metrics = metrics
                    row.update(flatten_metrics(metrics, "val/"))
                improved = self._update_best(metrics)
                row["seconds"] = time.time() - started
                rng_states = gather_from_ranks(_rng_state())  # a collective: every rank calls it
                # The row first: a resumed run drops rows after last.pt's epoch and logs them
                # again. Then last.pt: a kill before best.pt is repaired on resume.
                if self.is_main:
                    log.epoch(row, self.iteration)
                    self._save("last.pt", full=True, rng_states=rng_states)
                    if improved:
                        self._save("best.pt", full=False)
                    self._note(self._summary_line(row))
        finally:
            if log is not None:
                log.close()
        barrier()  # rank 0's checkpoints exist for every rank once fit returns
        if self.validate_fn is not None and self.best_epoch == 0:
            raise StepError(f"validation gave no '{self.best_metric}' that is a number in "
                            f"{self.epoch} epochs (NaN: e.g. no val image has a positive "
                            f"label); no best.pt was written")
        return {"best_metric": self.best_metric, "best_score": self.best_score,
                "best_epoch": self.best_epoch, "epochs": self.epoch, "metrics": self.last_metrics}

    def _validation_due(self) -> bool:
        if self.validate_fn is None:
            return False
        return self.epoch % int(self.cfg["val_every"]) == 0 or self.epoch == self.epochs

    def _update_best(self, metrics: Mapping[str, Any] | None) -> bool:
        if self.validate_fn is None:
            self.best_epoch = self.epoch
            return True
        if metrics is None:
            return False
        flat = flatten_metrics(metrics)
        if self.best_metric not in flat:
            raise KeyError(f"validation returned no '{self.best_metric}' (got {sorted(flat)})")
        score = flat[self.best_metric]
        if score > self.best_score:
            self.best_score, self.best_epoch = score, self.epoch
            return True
        return False

    def _summary_line(self, row: dict) -> str:
        parts = [f"epoch {row['epoch']}/{self.epochs}"]
        parts += [f"{k} {v:.4f}" for k, v in row.items()
                  if k.startswith("train/") or k == f"val/{self.best_metric}"]
        if self.best_metric is not None and self.best_epoch:  # none before a validation
            parts.append(f"best {self.best_score:.4f} @ {self.best_epoch}")
        parts.append(f"{row['seconds']:.1f}s")
        return " | ".join(parts)

    def _train_epoch(self, log: MetricsLog | None) -> dict[str, float]:
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        self.model.train()
        sums: dict[str, float] = {}
        count = 0
        num_batches = max(1, len(self.loader))
        bar = progress(self.loader, f"epoch {self.epoch + 1}/{self.epochs}", leave=False,
                       disable=not self.is_main)
        for index, batch in enumerate(bar):
            self.schedule.apply(self.optimizer, self.epoch + index / num_batches)
            logs = self.train_step(move_to(batch, self.device))
            self.iteration += 1
            count += 1
            for key, value in logs.items():
                sums[key] = sums.get(key, 0.0) + value
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
            if log is not None:
                log.scalar("iter/loss", logs["loss"], self.iteration)
                log.scalar("iter/lr", self.optimizer.param_groups[0]["lr"], self.iteration)
        means = mean_over_ranks(sums, count)
        means["lr"] = self.optimizer.param_groups[0]["lr"]
        return means

    def train_step(self, batch) -> dict[str, float]:
        """One optimisation step on a batch already on the device; the logged values."""
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            outputs = self.step_fn(self.model, batch)
        loss = outputs["loss"]
        if not torch.isfinite(loss).item() and not self.amp:
            raise StepError(f"loss is {loss.item()} in epoch {self.epoch + 1} "
                            f"(iteration {self.iteration + 1}): try a lower train.lr")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg["grad_clip"] > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], self.cfg["grad_clip"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update_parameters(unwrap(self.model))
        return {k: float(v.detach() if isinstance(v, torch.Tensor) else v)
                for k, v in outputs.items()}

    def _validate(self) -> Mapping[str, Any]:
        """Rank 0's metrics on every rank, so all agree on the best epoch."""
        return broadcast_from_main(self.validate_here() if self.is_main else None)

    def evaluated_model(self) -> nn.Module:
        """What validation scores and the checkpoints hold: the EMA of the weights where
        ``train.ema_decay`` asks for one, else the unwrapped model."""
        return unwrap(self.model) if self.ema is None else self.ema.module

    def validate_here(self) -> Mapping[str, Any]:
        """This process's validation: the evaluated model in eval mode, no autograd."""
        model = self.evaluated_model()
        model.eval()
        try:
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.float16,
                                                        enabled=self.amp):
                return self.validate_fn(model)
        finally:
            model.train()
