"""Several processes: DDP training under torchrun (gloo, CPU) and sharded inference steps.

Two ranks must end an optimisation step with the same weights, equal to one process
training on both ranks' batches at once (the real step-1 classifier's ranks agree bit for
bit too); step 1 under torchrun writes the checkpoints a single process writes; step 2
under torchrun or with ``--shard i/n`` writes every CAM file exactly once, with the content
a single process writes.
"""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from inference.irn_steps import cams_step, multiscale_cam
from model_training.cam_generation import classifier_training
from model_training.cam_generation.classifier_training import DEFAULTS
from model_training.common import distributed
from model_training.common.config import ConfigError, load_config, merge_defaults
from model_training.common.step_io import clear_done, mark_done, read_done, shard_ids
from model_training.common.trainer import TRAIN_DEFAULTS, Trainer, seed_everything, unwrap
from tests.conftest import REPO

TINY_TOY = ["device=cpu", "num_workers=0", "dataset.toy.num_train=8", "dataset.toy.num_val=4",
            "dataset.toy.num_test=2", "dataset.toy.image_size=[32,48]"]
CLASSIFIER = [*TINY_TOY, "model.weights=none", "data.resize_long=[48,48]", "train.epochs=1",
              "train.batch_size=2", "val.batch_size=4"]
# Two ranks x one batch of 2 = the 4 training images: exactly one optimisation step each.
ONE_STEP_PER_RANK = [*CLASSIFIER, "dataset.toy.num_train=4", "train.batch_size=2"]
CAMS = [*TINY_TOY, "cams.scales=[1.0]", "cams.flip=false", "cams.input_long_side=null"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread, as torchrun gives each rank: two threads per process on this
    2-core machine under load run tiny batches many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torchrun(script: str, *args: str) -> subprocess.CompletedProcess:
    """``script`` on two gloo ranks of one machine, from the repo root."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--standalone", script, *args]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# ---- shards -------------------------------------------------------------------------------
def test_shards_and_torchrun_ranks_cover_every_id_once(monkeypatch):
    ids = [f"im{i}" for i in range(11)]
    assert shard_ids(ids, "") == ids
    assert shard_ids(ids, "1/3") == ids[1::3]
    monkeypatch.setenv("WORLD_SIZE", "2")
    seen = []
    for shard in ("0/2", "1/2"):
        for rank in ("0", "1"):
            monkeypatch.setenv("RANK", rank)
            seen += shard_ids(ids, shard)
    assert sorted(seen) == sorted(ids)


@pytest.mark.parametrize("shard", ["3/2", "x", "1/0", "-1/2", "1/2/3"])
def test_bad_shard_is_one_line_and_exit_2(shard, capsys):
    with pytest.raises(SystemExit) as stop:
        multiscale_cam.main(["--config", str(REPO / "configs/toy/2_cams.yaml"), f"--shard={shard}"])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.startswith("error: key 'shard'") and err.strip().count("\n") == 0


def test_training_steps_refuse_a_shard():
    cfg = load_config(None, ["shard=0/2"], DEFAULTS)
    with pytest.raises(ConfigError, match="torchrun"):
        distributed.setup(cfg)


def test_a_shard_does_not_mark_the_step_done(tmp_path):
    mark_done(tmp_path, {"written": 3, "failed": ["a"], "seconds": 2.0}, "0/2")
    assert read_done(tmp_path) is None
    mark_done(tmp_path, {"written": 2, "failed": [], "seconds": 5.0}, "1/2")
    assert read_done(tmp_path) == {"shards": 2, "written": 5, "failed": ["a"], "seconds": 5.0}
    clear_done(tmp_path, "1/2")  # shard 1 starts again: the step is not done until it ends
    assert read_done(tmp_path) is None and not (tmp_path / "done.1-of-2.json").exists()
    assert (tmp_path / "done.0-of-2.json").is_file()


# ---- the training loop on two ranks -------------------------------------------------------
def _train_linear(out_dir, batch_size: int):
    """One epoch of linear regression on 8 samples; returns (model, summary, validations)."""
    seed_everything(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, generator=gen)
    data = TensorDataset(x, x @ torch.tensor([[1.0], [-2.0], [0.5]]))
    model = nn.Linear(3, 1)
    loader = DataLoader(data, batch_size=batch_size, sampler=distributed.train_sampler(data, 0))
    cfg = merge_defaults(TRAIN_DEFAULTS["train"], {"epochs": 1, "lr": 0.1, "momentum": 0.0,
                                                   "lr_schedule": "constant"})
    validations = []

    def validate(net):
        validations.append(1)
        return {"score": -float(net.bias)}

    trainer = Trainer(distributed.wrap_model(model, torch.device("cpu")),
                      [{"params": model.parameters()}], loader, out_dir, cfg, "cpu",
                      step_fn=lambda net, b: {"loss": nn.functional.mse_loss(net(b[0]), b[1])},
                      validate_fn=validate, best_metric="score")
    return model, trainer.fit(), len(validations)


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _rank_worker(rank: int, init_file: str, out_dir: str, report: str) -> None:
    """A gloo rank of ``_train_linear`` (batch 4 of 8); rank 1 saves what every rank holds."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model, summary, validations = _train_linear(out_dir, batch_size=4)
        gathered = [torch.zeros_like(_flat(model)) for _ in range(2)]
        dist.all_gather(gathered, _flat(model))
        if rank == 1:
            torch.save({"params": torch.stack(gathered), "best_score": summary["best_score"],
                        "validations": validations}, report)
    finally:
        dist.destroy_process_group()


def test_two_ranks_step_together_like_one_process_on_both_batches(tmp_path):
    report = tmp_path / "rank1.pt"
    mp.spawn(_rank_worker, args=(str(tmp_path / "init"), str(tmp_path / "ddp"), str(report)),
             nprocs=2)
    single, summary, _ = _train_linear(tmp_path / "single", batch_size=8)
    seen = torch.load(report, weights_only=True)
    torch.testing.assert_close(seen["params"][0], seen["params"][1], rtol=0, atol=0)
    torch.testing.assert_close(seen["params"][0], _flat(single))
    assert not torch.equal(_flat(single), _flat(nn.Linear(3, 1)))  # it did learn
    checkpoint = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert set(checkpoint["model"]) == {"weight", "bias"}  # unwrapped: no "module." prefix
    torch.testing.assert_close(torch.cat([checkpoint["model"]["weight"].flatten(),
                                          checkpoint["model"]["bias"]]), seen["params"][1])
    # Rank 0 alone validated; rank 1 got its score. The logged loss covers both ranks.
    assert seen["validations"] == 0 and seen["best_score"] == summary["best_score"]
    losses = [float(_rows(tmp_path / name / "metrics.csv")[0]["train/loss"])
              for name in ("ddp", "single")]
    assert losses[0] == pytest.approx(losses[1])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _step1_rank_worker(rank: int, port: int, work_dir: str, report: str) -> None:
    """Step 1 as torchrun's rank ``rank`` of 2 would run it; saves this rank's weights.

    Only rank 0 writes checkpoints, so the Trainer that step 1 builds is swapped (in this
    process only) for one that keeps a copy of the parameters before and after ``fit``.
    """
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    seen = {}

    class WeightKeepingTrainer(Trainer):
        def fit(self) -> dict:
            model = unwrap(self.model)
            seen["names"] = [name for name, _ in model.named_parameters()]
            seen["before"] = _flat(model)
            summary = super().fit()
            seen["after"], seen["steps"] = _flat(model), self.iteration
            return summary

    classifier_training.Trainer = WeightKeepingTrainer
    try:
        classifier_training.run(load_config(REPO / "configs/toy/1_classifier.yaml",
                                     [f"work_dir={work_dir}", *ONE_STEP_PER_RANK], DEFAULTS))
        torch.save(seen, f"{report}.{rank}")
    finally:
        distributed.cleanup()


def test_step1_ranks_hold_the_same_weights_after_one_step(tmp_path):
    """The real step 1 (the CAM classifier, not a toy layer) on two gloo ranks."""
    report = tmp_path / "weights"
    mp.spawn(_step1_rank_worker, args=(_free_port(), str(tmp_path / "ddp"), str(report)),
             nprocs=2)
    ranks = [torch.load(f"{report}.{rank}", weights_only=True) for rank in (0, 1)]
    assert [seen["steps"] for seen in ranks] == [1, 1]
    # DDP starts every rank from rank 0's weights (each rank seeded its own model) ...
    torch.testing.assert_close(ranks[0]["before"], ranks[1]["before"], rtol=0, atol=0)
    # ... and averaged gradients keep them equal, bit for bit, after the step.
    torch.testing.assert_close(ranks[0]["after"], ranks[1]["after"], rtol=0, atol=0)
    assert not torch.equal(ranks[1]["after"], ranks[1]["before"])  # it did learn
    # What rank 0 saved is what rank 1 holds.
    last = torch.load(tmp_path / "ddp" / "1_classifier" / "last.pt", weights_only=True)
    torch.testing.assert_close(torch.cat([last["model"][name].flatten() for name in ranks[1]["names"]]),
                               ranks[1]["after"], rtol=0, atol=0)
    # Each rank's own random stream is kept for resuming (ranks augment differently).
    assert len(last["rng"]) == 2
    assert not torch.equal(last["rng"][0]["torch"], last["rng"][1]["torch"])


# ---- steps 1 and 2 under torchrun -----------------------------------------------------------
@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    """Step 1 in one process and under torchrun: their output folders."""
    root = tmp_path_factory.mktemp("classifier")
    classifier_training.run(load_config(REPO / "configs/toy/1_classifier.yaml",
                                 [f"work_dir={root / 'single'}", *CLASSIFIER], DEFAULTS))
    torchrun("model_training/cam_generation/train_classifier.py", "--config",
             "configs/toy/1_classifier.yaml", f"work_dir={root / 'ddp'}", *CLASSIFIER)
    return root / "single" / "1_classifier", root / "ddp" / "1_classifier"


def test_step1_under_torchrun_writes_the_single_process_checkpoints(classifiers):
    single, ddp = classifiers
    for name in ("best.pt", "last.pt"):
        ours = torch.load(ddp / name, weights_only=True)["model"]
        theirs = torch.load(single / name, weights_only=True)["model"]
        assert list(ours) == list(theirs)
        assert all(ours[k].shape == theirs[k].shape for k in ours)
    assert [row["epoch"] for row in _rows(ddp / "metrics.csv")] == ["1"]  # one writer
    assert json.loads((ddp / "done.json").read_text())["epochs"] == 1
    assert (ddp / "config.yaml").is_file()


def _cams(folder) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for path in sorted(folder.glob("*.npz")):
        with np.load(path, allow_pickle=False) as data:
            out[path.name] = {key: data[key] for key in data.files}
    return out


def test_step2_ranks_and_shards_write_the_single_process_files(classifiers, tmp_path):
    checkpoint = f"cams.checkpoint={classifiers[1] / 'best.pt'}"
    config = "configs/toy/2_cams.yaml"
    cams_step.run(load_config(REPO / config, [f"work_dir={tmp_path / 'single'}", checkpoint,
                                             *CAMS], cams_step.DEFAULTS))
    torchrun("inference/irn_steps/multiscale_cam.py", "--config", config,
             f"work_dir={tmp_path / 'ranks'}", checkpoint, *CAMS)
    sharded = ["--config", str(REPO / config), f"work_dir={tmp_path / 'shards'}", checkpoint, *CAMS]
    multiscale_cam.main([*sharded, "--shard", "0/2"])
    assert read_done(tmp_path / "shards" / "2_cams") is None  # half the images: not done
    multiscale_cam.main([*sharded, "--shard", "1/2"])

    expected = _cams(tmp_path / "single" / "2_cams")
    assert len(expected) == 8
    for name in ("ranks", "shards"):
        got = _cams(tmp_path / name / "2_cams")
        assert list(got) == list(expected), name
        for file_name, arrays in expected.items():
            for key, value in arrays.items():
                assert np.allclose(got[file_name][key], value, atol=1e-3), (name, file_name, key)
        assert read_done(tmp_path / name / "2_cams")["written"] == 8
