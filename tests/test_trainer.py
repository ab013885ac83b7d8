"""The shared training loop: LR schedules, parameter groups, checkpoints and resume."""
import csv
import errno
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from model_training.common.config import ConfigError, StepError, merge_defaults
from model_training.common.trainer import (TRAIN_DEFAULTS, LRSchedule, Trainer, build_optimizer,
                                           check_resume, ema_average, epochs_for,
                                           flatten_metrics, seed_everything)


def test_poly_and_step_schedules():
    poly = LRSchedule("poly", epochs=4, poly_power=0.9)
    assert poly.factor(0) == 1.0
    assert poly.factor(2) == pytest.approx(0.5 ** 0.9)
    assert poly.factor(3.5) == pytest.approx(0.125 ** 0.9)
    assert poly.factor(4) == 0.0
    step = LRSchedule("step", epochs=10, step_epochs=[3, 6], step_gamma=0.1)
    assert [step.factor(e) for e in (0, 2.99, 3, 5.5, 6, 9)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])
    with pytest.raises(ConfigError, match="lr_schedule"):
        LRSchedule("cosine", epochs=1)


def test_optimizer_groups_scale_lr_and_schedule_applies_per_group():
    backbone, head = nn.Linear(2, 2), nn.Linear(2, 1)
    cfg = {**TRAIN_DEFAULTS["train"], "lr": 0.02}
    opt = build_optimizer([{"params": backbone.parameters(), "lr_mult": 1.0},
                           {"params": head.parameters(), "lr_mult": 10.0},
                           {"params": [], "lr_mult": 5.0}], cfg)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02, 0.2])
    LRSchedule("poly", epochs=2, poly_power=1.0).apply(opt, 1.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.1])


def test_flatten_metrics_nests_names_and_keeps_numbers():
    flat = flatten_metrics({"map": 0.5, "ap": {"car": 1, "pole": 0.25}, "note": "x"}, "val/")
    assert flat == {"val/map": 0.5, "val/ap/car": 1.0, "val/ap/pole": 0.25}


def _regression_data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, generator=gen)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 * torch.randn(24, 1, generator=gen)
    return TensorDataset(x, y)


def _train(out_dir, epochs, resume=False, scores=None, ema_decay=0.0, seen_weights=None,
           **train):
    """A linear regression trained by the shared loop; ``scores`` scripts validation;
    ``seen_weights`` (a list) collects the weights each optimisation step starts from."""
    seed_everything(0)
    data = _regression_data()
    loader = DataLoader(data, batch_size=4,
                        sampler=DistributedSampler(data, num_replicas=1, rank=0, seed=0))
    model = nn.Linear(3, 1)
    cfg = merge_defaults(TRAIN_DEFAULTS["train"], {"epochs": epochs, "lr": 0.05,
                                                   "lr_schedule": "constant", "ema_decay": ema_decay,
                                                   **train})
    calls = []

    def validate(net):
        assert not net.training and not torch.is_grad_enabled()
        calls.append(1)
        return {"score": scores[len(calls) - 1] if scores else -float(net.bias), "other": {"a": 1}}

    def step(net, batch):
        if seen_weights is not None:
            seen_weights.append(torch.cat([net.weight.detach().flatten(), net.bias.detach()]))
        return {"loss": nn.functional.mse_loss(net(batch[0]), batch[1])}

    trainer = Trainer(model, [{"params": model.parameters()}], loader, out_dir, cfg, "cpu",
                      step_fn=step, validate_fn=validate, best_metric="score",
                      checkpoint_fields={"class_ids": [1, 2]}, resume=resume)
    return model, trainer.fit()


def test_checkpoints_load_weights_only_and_best_follows_metric(tmp_path):
    _, summary = _train(tmp_path, epochs=3, scores=[0.5, 0.9, 0.7])
    assert summary["best_epoch"] == 2 and summary["best_score"] == 0.9
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert best["epoch"] == 2 and best["class_ids"] == [1, 2] and "optimizer" not in best
    assert last["epoch"] == 3 and {"optimizer", "scaler", "rng"} <= set(last)
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[1]["val/score"]) == 0.9 and "val/other/a" in rows[0]
    assert any((tmp_path / "tb").iterdir())


def test_resume_continues_where_it_stopped_and_matches_an_uninterrupted_run(tmp_path):
    straight, _ = _train(tmp_path / "straight", epochs=3)
    _train(tmp_path / "split", epochs=2)
    with pytest.raises(ConfigError, match="resume=true"):
        check_resume(tmp_path / "split", resume=False, overwrite=False)
    resumed, summary = _train(tmp_path / "split", epochs=3, resume=True)
    assert summary["epochs"] == 3
    assert torch.load(tmp_path / "split" / "last.pt", weights_only=True)["epoch"] == 3
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b)
    with open(tmp_path / "split" / "metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3]


def test_min_iterations_raises_the_epochs_of_a_small_dataset_only():
    cfg = {**TRAIN_DEFAULTS["train"], "epochs": 3, "min_iterations": 500}
    assert epochs_for(cfg, 45) == 12  # 3 epochs of 45 batches are 135 iterations; 12 are 540
    assert epochs_for(cfg, 183) == 3  # 549 iterations already
    assert epochs_for({**cfg, "min_iterations": 0}, 45) == 3


def test_a_run_raised_by_min_iterations_trains_and_logs_every_epoch(tmp_path, capsys):
    _, summary = _train(tmp_path, epochs=1, min_iterations=14)  # 6 batches an epoch
    assert summary["epochs"] == 3
    assert "train.epochs 1 -> 3" in capsys.readouterr().err
    with open(tmp_path / "metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3]


def test_epoch_lines_name_a_best_epoch_only_once_one_was_validated(tmp_path, capsys):
    _train(tmp_path, epochs=3, val_every=2)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 3 and "best" not in lines[0] and "-inf" not in lines[0]
    assert "best" in lines[1] and "@ 2" in lines[1]


def _flat_weights(state):
    return torch.cat([state["weight"].flatten(), state["bias"]])


def test_ema_is_what_validation_scores_and_the_checkpoints_hold(tmp_path):
    seen = []
    model, summary = _train(tmp_path, epochs=2, ema_decay=0.9, seen_weights=seen)
    trained = torch.cat([model.weight.detach().flatten(), model.bias.detach()])
    # The average by hand: the first update copies, then decay (1 + n) / (10 + n), at most 0.9.
    updated = seen[1:] + [trained]  # the weights after each optimisation step
    average = updated[0].clone()
    for n, weights in enumerate(updated[1:], start=1):
        rate = min(0.9, (1 + n) / (10 + n))
        average = rate * average + (1 - rate) * weights
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    torch.testing.assert_close(_flat_weights(last["model"]), average)
    torch.testing.assert_close(_flat_weights(last["trained_model"]), trained)
    assert int(last["ema_updates"]) == len(updated) == 12
    assert not torch.allclose(average, trained, atol=1e-3)  # the average is not the last weights
    assert summary["metrics"]["score"] == pytest.approx(-float(average[-1]))  # -bias of the EMA
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert "trained_model" not in best and best["epoch"] in (1, 2)


def test_ema_resumes_where_it_stopped(tmp_path):
    _train(tmp_path / "straight", epochs=3, ema_decay=0.9)
    _train(tmp_path / "split", epochs=2, ema_decay=0.9)
    _train(tmp_path / "split", epochs=3, ema_decay=0.9, resume=True)
    straight, split = (torch.load(tmp_path / name / "last.pt", weights_only=True)
                       for name in ("straight", "split"))
    for key in ("model", "trained_model"):
        torch.testing.assert_close(_flat_weights(straight[key]), _flat_weights(split[key]))
    assert int(split["ema_updates"]) == int(straight["ema_updates"]) == 18


def test_ema_average_ramps_its_decay_and_keeps_integer_buffers():
    update = ema_average(0.99)
    averaged, current = torch.zeros(3), torch.ones(3)
    # After the first update (a copy), the rate is 2/11, then 3/12, ... up to 0.99.
    torch.testing.assert_close(update(averaged, current, torch.tensor(1)), torch.full((3,), 9 / 11))
    torch.testing.assert_close(update(averaged, current, torch.tensor(10**6)), torch.full((3,), 0.01))
    count = update(torch.tensor(5), torch.tensor(9), torch.tensor(3))
    assert count.dtype == torch.int64 and int(count) == 9


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    data = _regression_data()
    model = nn.Linear(3, 1)
    trainer = Trainer(model, [{"params": model.parameters()}], DataLoader(data, batch_size=8),
                      tmp_path, merge_defaults(TRAIN_DEFAULTS["train"], {"epochs": 1}), "cpu",
                      step_fn=lambda net, b: {"loss": net(b[0]).sum() * math.nan})
    with pytest.raises(StepError, match="train.lr"):
        trainer.fit()


def test_resume_drops_a_best_pt_that_last_pt_does_not_name(tmp_path):
    """Issue 15 case 2: a killed run wrote best.pt of epoch 2 but not last.pt (an older
    version saved best.pt first); the resumed run's epochs score lower, so best.pt was never
    replaced and done.json named epoch 1 while step 2 loaded the orphan."""
    _train(tmp_path, epochs=1, scores=[0.9])
    epoch1 = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    orphan = torch.load(tmp_path / "best.pt", weights_only=True)
    torch.save({**orphan, "epoch": 2, "model": {k: v + 1 for k, v in orphan["model"].items()}},
               tmp_path / "best.pt")
    _, summary = _train(tmp_path, epochs=3, resume=True, scores=[0.5, 0.6])
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert summary["best_epoch"] == best["epoch"] == 1 and summary["best_score"] == 0.9
    for name, value in epoch1.items():
        torch.testing.assert_close(best["model"][name], value)


def test_resume_rewrites_best_pt_when_killed_between_last_and_best(tmp_path):
    _train(tmp_path, epochs=1, scores=[0.5])
    stale_best = (tmp_path / "best.pt").read_bytes()
    _train(tmp_path, epochs=2, resume=True, scores=[0.9])
    (tmp_path / "best.pt").write_bytes(stale_best)  # epoch 2's best.pt never written
    _, summary = _train(tmp_path, epochs=3, resume=True, scores=[0.7])
    assert summary["best_epoch"] == 2
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] == 2


@pytest.mark.parametrize("name", ["last.pt", "best.pt"])  # best.pt: issue 30
def test_resume_from_a_truncated_checkpoint_is_one_line(tmp_path, name):
    _train(tmp_path, epochs=1)
    path = tmp_path / name
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(StepError, match=f"^{re.escape(str(path))}: not a checkpoint this toolkit "
                                        f"wrote, or truncated: start this step over with "
                                        f"overwrite=true$"):
        _train(tmp_path, epochs=2, resume=True)


@pytest.mark.parametrize("kill_before_last_pt", [True, False])
def test_a_run_killed_around_an_epoch_end_resumes_with_every_epoch_logged(
        tmp_path, monkeypatch, kill_before_last_pt):
    """Issue 30: killed after last.pt of epoch 2 was written but before its row reached
    metrics.csv, the resumed run's log held epochs 1 and 3 only."""
    save = Trainer._save

    def killed_at_epoch_2(self, name, full, rng_states=None):
        if name == "last.pt" and self.epoch == 2 and kill_before_last_pt:
            raise KeyboardInterrupt
        save(self, name, full, rng_states)
        if name == "last.pt" and self.epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save", killed_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, epochs=3)
    monkeypatch.undo()
    _train(tmp_path, epochs=3, resume=True)
    with open(tmp_path / "metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3]


def test_a_validation_score_that_is_never_a_number_is_a_failure(tmp_path):
    """Issue 30: NaN (a val split without one positive label) never beat -inf, so the step
    finished without best.pt and the next step said 'run step 1 first'."""
    with pytest.raises(StepError, match="^validation gave no 'score' .* in 2 epochs"):
        _train(tmp_path, epochs=2, scores=[math.nan, math.nan])
    assert not (tmp_path / "best.pt").exists()


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\n"
                 "PytorchStreamWriter failed writing file data/0: file write failed"),
    OSError(errno.ENOSPC, "No space left on device")])
def test_a_full_disk_while_saving_a_checkpoint_is_one_line(tmp_path, monkeypatch, error):
    """Issue 30: torch.save raises RuntimeError, not OSError, on a full disk: a traceback."""
    def full_disk(state, path):
        Path(path).write_bytes(b"partial")
        raise error

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(StepError, match=r"^cannot write .*last\.pt: .*: stopped$"):
        _train(tmp_path, epochs=1)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp.")]
    assert not (tmp_path / "last.pt").exists()

