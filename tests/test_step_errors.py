"""Settings that can only be found wrong at run time (a weights file that does not fit the
backbone, a step run before the one that feeds it, a checkpoint file that is not one) end a
step's script, or the pipeline, with one line that names the key or file, and exit code 2,
instead of a traceback. So does a full disk or a read-only folder while a step writes its
outputs, which a bad image does not."""
import errno
import importlib
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import run_pipeline
from inference.irn_steps import crf_cam_processing, irn_inference, multiscale_cam
from inference.segmentation import predict
from model_training.cam_generation import classifier_training, train_classifier, train_irn
from model_training.common import step_io, worker_pool
from model_training.common.checkpoints import read_checkpoint
from model_training.common.config import Config, ConfigError, StepError
from model_training.common.models.irnet import load_irnet
from model_training.common.provenance import claim_folder
from model_training.common.step_io import (mark_done, read_done, run_over_images, save_cams,
                                           save_png, step_dir)
from tests.conftest import REPO

CONFIGS = REPO / "configs" / "toy"
# the script, not the function of the same name that the package exports
train_segmentation = importlib.import_module("model_training.segmentation.train_segmentation")
TINY_TOY = ["device=cpu", "num_workers=0", "dataset.toy.num_train=2", "dataset.toy.num_val=2",
            "dataset.toy.num_test=1", "dataset.toy.image_size=[32,48]"]


@pytest.fixture
def mismatched_weights(tmp_path):
    path = tmp_path / "not_this_backbone.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    return path


def _exits_2(script, config, work_dir, *overrides) -> None:
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--config", str(CONFIGS / config), f"work_dir={work_dir}", *TINY_TOY,
                     *overrides])
    assert exit_info.value.code == 2


def _fails_with_one_line(script, config, work_dir, capsys, *overrides) -> str:
    _exits_2(script, config, work_dir, *overrides)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


def test_step1_weights_that_do_not_fit(tmp_path, mismatched_weights, capsys):
    err = _fails_with_one_line(train_classifier, "1_classifier.yaml", tmp_path / "run", capsys,
                               f"model.weights={mismatched_weights}")
    assert "'model.weights'" in err and "does not match" in err
    assert not list((tmp_path / "run").rglob("*.pt"))


def test_step2_missing_extra_classifier(tmp_path, capsys):
    torch.save({}, step_dir(tmp_path, 1) / "best.pt")
    err = _fails_with_one_line(multiscale_cam, "2_cams.yaml", tmp_path, capsys,
                               f"cams.extra_checkpoints=[{tmp_path / 'person.pt'}]")
    assert "'cams.extra_checkpoints'" in err and "person.pt" in err


@pytest.mark.parametrize("script,config,overrides", [
    (crf_cam_processing, "3_ir_labels.yaml", []),
    (irn_inference, "5_pseudo_masks.yaml", ["pseudo_masks.checkpoint=__ckpt__"]),
])
def test_steps_3_and_5_before_step_2(tmp_path, capsys, script, config, overrides):
    checkpoint = tmp_path / "irn.pt"
    checkpoint.touch()
    overrides = [o.replace("__ckpt__", str(checkpoint)) for o in overrides]
    err = _fails_with_one_line(script, config, tmp_path, capsys, *overrides)
    assert "2_cams" in err and "run step 2 first" in err


def test_step4_weights_missing_or_not_fitting(tmp_path, mismatched_weights, capsys):
    err = _fails_with_one_line(train_irn, "4_irn.yaml", tmp_path, capsys,
                               f"irn.weights={tmp_path / 'nothing.pt'}")
    assert "'irn.weights'" in err and "not found" in err
    for image_id in ("train_00000", "train_00001"):  # labels, so the step gets to the model
        save_png(step_dir(tmp_path, 3) / f"{image_id}.png", np.zeros((32, 48), np.uint8))
    err = _fails_with_one_line(train_irn, "4_irn.yaml", tmp_path, capsys,
                               f"irn.weights={mismatched_weights}")
    assert "'irn.weights'" in err and "does not match" in err
    assert not list(step_dir(tmp_path, 4).glob("*.pt"))


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "/full/disk/out.png")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                                  errno.EPERM, errno.EIO])
def test_machine_error_stops_the_loop_with_one_line(code):
    def write(image_id):
        raise OSError(code, os.strerror(code), f"/out/{image_id}.png")

    with pytest.raises(StepError, match=rf"^a: .*/out/a\.png.*\({errno.errorcode[code]}\)"):
        run_over_images(["a", "b"], write, "test")


def test_bad_image_is_still_skipped(capsys):
    def read(image_id):
        if image_id == "bad":
            raise FileNotFoundError(errno.ENOENT, "No such file", "/data/bad.jpg")
        if image_id == "corrupt":
            raise OSError("cannot identify image file '/data/corrupt.jpg'")

    assert run_over_images(["bad", "corrupt", "good"], read, "test") == (1, ["bad", "corrupt"])
    assert "bad.jpg" in capsys.readouterr().err


def test_pool_worker_stops_on_a_machine_error():
    """Step 3's process pool reports a worker's full disk as the in-process loop does."""
    worker_pool._init_worker(_no_space)
    with pytest.raises(StepError, match="ENOSPC"):
        worker_pool._run_one("a")


def test_step3_on_a_full_disk_exits_2_and_is_not_marked_done(tmp_path, capsys, monkeypatch):
    for image_id in ("train_00000", "train_00001"):  # no class: labels without a CRF
        save_cams(step_dir(tmp_path, 2) / f"{image_id}.npz", [],
                  np.zeros((0, 8, 12), np.float32), np.zeros((0, 32, 48), np.float32))
    monkeypatch.setattr(step_io, "save_png", _no_space)
    err = _fails_with_one_line(crf_cam_processing, "3_ir_labels.yaml", tmp_path, capsys,
                               "ir_labels.num_workers=1")
    assert "train_00000" in err and "ENOSPC" in err and "/full/disk/out.png" in err
    assert read_done(tmp_path / "3_ir_labels") is None


@pytest.mark.parametrize("script,config,override,needle", [
    (train_classifier, "1_classifier.yaml", "dataset.train_split=nosuch", "'nosuch'"),
    (train_irn, "4_irn.yaml", "seed=1", "run step 3 first"),
    (train_segmentation, "6_segmentation.yaml", "seed=1", "run step 5 first"),
])
def test_a_training_step_checks_its_data_before_it_claims_its_folder(
        tmp_path, capsys, script, config, override, needle):
    """Issue 30: the recipe written before the dataset settings were checked refused the
    corrected command as 'made by other settings'."""
    err = _fails_with_one_line(script, config, tmp_path, capsys, override)
    assert needle in err
    assert not [path for path in tmp_path.rglob("*") if path.is_file()]


def test_a_full_disk_while_a_step_records_its_settings_is_one_line(tmp_path, capsys, monkeypatch):
    """Issue 30: the writes around the image loop (config.yaml, provenance.json, done.json,
    checkpoints, the report) were tracebacks on a full disk."""
    save_cams(step_dir(tmp_path, 2) / "train_00000.npz", [], np.zeros((0, 8, 12), np.float32),
              np.zeros((0, 32, 48), np.float32))
    monkeypatch.setattr(step_io, "atomic_write", _no_space)
    err = _fails_with_one_line(crf_cam_processing, "3_ir_labels.yaml", tmp_path, capsys)
    assert err == (f"error: cannot write {tmp_path / '3_ir_labels' / 'config.yaml'}: No space "
                   f"left on device: stopped")


@pytest.mark.parametrize("num_workers", [0, 1])
def test_step4_on_ir_labels_of_other_images_is_one_line(tmp_path, capsys, num_workers):
    """A label whose size is not its image's (step 3 ran on other images): one line, from
    the main process or a DataLoader worker, instead of a traceback."""
    for image_id in ("train_00000", "train_00001"):
        save_png(step_dir(tmp_path, 3) / f"{image_id}.png", np.zeros((10, 10), np.uint8))
    err = _fails_with_one_line(train_irn, "4_irn.yaml", tmp_path, capsys, "train.batch_size=2",
                               f"num_workers={num_workers}")
    assert err.startswith(f"error: {step_dir(tmp_path, 3) / 'train_0000'}")
    assert err.endswith("label (10, 10) vs image (32, 48) (step 3 ran on other images): re-run "
                        "step 3 with overwrite=true")


def test_a_step_whose_every_image_failed_is_not_marked_done(tmp_path, capsys, monkeypatch):
    """Issue 30: marked done with nothing written, it sent step 4 to an empty folder."""
    for image_id in ("train_00000", "train_00001"):
        save_cams(step_dir(tmp_path, 2) / f"{image_id}.npz", [],
                  np.zeros((0, 8, 12), np.float32), np.zeros((0, 32, 48), np.float32))

    def bad_image(*args, **kwargs):
        raise ValueError("cannot encode this mask")

    monkeypatch.setattr(step_io, "save_png", bad_image)
    err = _fails_with_one_line(crf_cam_processing, "3_ir_labels.yaml", tmp_path, capsys,
                               "ir_labels.num_workers=1")
    assert err == ("error: 3_ir_labels: all 2 images failed (the first: train_00000, see the "
                   "warnings above): the step is not marked done")
    assert read_done(tmp_path / "3_ir_labels") is None


def _spoil(path, how: str) -> None:
    """Turn a real checkpoint at ``path`` into what a crash, a full disk or a mix-up leaves."""
    if how == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(512))
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:-64])
    else:  # another tool's weights: a state dict without the toolkit's keys
        torch.save({"conv1.weight": torch.zeros(1)}, path)


@pytest.mark.parametrize("how", ["random bytes", "truncated", "without arch"])
def test_unreadable_checkpoint_is_one_line_without_unsafe_advice(tmp_path, how):
    path = tmp_path / "best.pt"
    torch.save({"model": {"w": torch.zeros(256)}, "arch": {}}, path)
    _spoil(path, how)
    with pytest.raises(StepError) as error:
        read_checkpoint(path, "re-run step 1 with overwrite=true", keys=("model", "arch"))
    assert str(error.value) == (f"{path}: not a checkpoint this toolkit wrote, or truncated: "
                                f"re-run step 1 with overwrite=true")


def test_missing_checkpoint_says_which_step_writes_it(tmp_path):
    path = tmp_path / "best.pt"
    with pytest.raises(StepError) as error:
        read_checkpoint(path, "re-run step 6 with overwrite=true")
    assert str(error.value) == f"checkpoint not found: {path}: re-run step 6 with overwrite=true"


def test_step2_classifier_checkpoint_of_garbage(tmp_path, capsys):
    best = step_dir(tmp_path, 1) / "best.pt"
    _spoil(best, "random bytes")
    err = _fails_with_one_line(multiscale_cam, "2_cams.yaml", tmp_path, capsys)
    assert err == (f"error: {best}: not a checkpoint this toolkit wrote, or truncated: "
                   f"re-run step 1 with overwrite=true")


def test_step1_weights_file_of_garbage(tmp_path, capsys):
    weights = tmp_path / "weights.pt"
    _spoil(weights, "random bytes")
    err = _fails_with_one_line(train_classifier, "1_classifier.yaml", tmp_path / "run", capsys,
                               f"model.weights={weights}")
    assert err.startswith(f"error: key 'model.weights': {weights}: not a checkpoint")
    assert "weights_only" not in err


def test_step5_irnet_checkpoint_cut_short(tmp_path):
    path = tmp_path / "best.pt"
    torch.save({"model": {"w": torch.zeros(256)}, "arch": {}}, path)
    _spoil(path, "truncated")
    with pytest.raises(StepError, match="truncated: re-run step 4 with overwrite=true$"):
        load_irnet(path, "cpu")


def test_step7_exported_model_of_garbage(tmp_path, capfd):
    """Step 7 reads the exported model's classes before it starts the submission script:
    one line naming model.pt."""
    exported = step_dir(tmp_path, 6)
    _spoil(exported / "model.pt", "random bytes")
    (exported / "export_config.yaml").write_text("weights: model.pt\ndevice: cpu\n")
    _exits_2(predict, "7_predictions.yaml", tmp_path)
    err = capfd.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: {exported / 'model.pt'}: not a checkpoint this toolkit wrote, or truncated: "
        f"export it again with step 6"]
    assert "Traceback" not in err


def _failing_step(error) -> SimpleNamespace:
    """A step module whose run raises ``error``."""
    def run(cfg):
        raise error
    return SimpleNamespace(DEFAULTS={}, run=run, step_inputs=lambda cfg: {}, summary_line=str)


def test_pipeline_puts_the_step_folder_before_a_step_error(tmp_path):
    cfg = Config(work_dir=str(tmp_path), overwrite=False)
    with pytest.raises(StepError, match=r"^\[3_ir_labels\] 2_cams is empty: run step 2 first$"):
        run_pipeline.run_steps([("3_ir_labels",
                                 _failing_step(ConfigError("2_cams is empty: run step 2 first")), cfg)])
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_pipeline.run_steps([("3_ir_labels", _failing_step(ZeroDivisionError()), cfg)])


def test_pipeline_exits_2_with_one_line_and_no_report(tmp_path, capsys):
    step1 = run_pipeline.load_step_configs(CONFIGS, [f"work_dir={tmp_path}", *TINY_TOY])[0][2]
    claim_folder(step_dir(tmp_path, 1), step1, {}, classifier_training.DEFAULTS)  # finished, same settings
    mark_done(step_dir(tmp_path, 1), {"seconds": 1.0})
    best = step_dir(tmp_path, 1) / "best.pt"
    _spoil(best, "random bytes")
    with pytest.raises(SystemExit) as exit_info:
        run_pipeline.main([str(CONFIGS), f"work_dir={tmp_path}", *TINY_TOY])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: [2_cams] {best}: not a checkpoint this toolkit wrote, or truncated: "
        f"re-run step 1 with overwrite=true"]
    assert "Traceback" not in err and "report" not in out
