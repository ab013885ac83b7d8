"""Settings that can only be found wrong at run time (a weights file that does not fit the
backbone, a step run before the one that feeds it) end a step's script with one line that
names the key or folder, and exit code 2, instead of a traceback. So does a full disk or a
read-only folder while a step writes its outputs, which a bad image does not."""
import errno
import os

import numpy as np
import pytest
import torch

from inference.common import ir_labels, step_io
from inference.common.step_io import read_done, run_over_images, save_cams, save_png, step_dir
from inference.irn_steps import crf_cam_processing, irn_inference, multiscale_cam
from model_training.cam_generation import train_classifier, train_irn
from model_training.common.config import StepError
from tests.conftest import REPO

CONFIGS = REPO / "configs" / "toy"
TINY_TOY = ["device=cpu", "num_workers=0", "dataset.toy.num_train=2", "dataset.toy.num_val=2",
            "dataset.toy.num_test=1", "dataset.toy.image_size=[32,48]"]


@pytest.fixture
def mismatched_weights(tmp_path):
    path = tmp_path / "not_this_backbone.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    return path


def _fails_with_one_line(script, config, work_dir, capsys, *overrides) -> str:
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--config", str(CONFIGS / config), f"work_dir={work_dir}", *TINY_TOY,
                     *overrides])
    assert exit_info.value.code == 2
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
    err = _fails_with_one_line(multiscale_cam, "2_cam.yaml", tmp_path, capsys,
                               f"cam.extra_checkpoints=[{tmp_path / 'person.pt'}]")
    assert "'cam.extra_checkpoints'" in err and "person.pt" in err


@pytest.mark.parametrize("script,config,overrides", [
    (crf_cam_processing, "3_crf.yaml", []),
    (irn_inference, "5_irn_inference.yaml", ["pseudo.checkpoint=__ckpt__"]),
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
    ir_labels._init_worker(_no_space)
    with pytest.raises(StepError, match="ENOSPC"):
        ir_labels._run_one("a")


def test_step3_on_a_full_disk_exits_2_and_is_not_marked_done(tmp_path, capsys, monkeypatch):
    for image_id in ("train_00000", "train_00001"):  # no class: labels without a CRF
        save_cams(step_dir(tmp_path, 2) / f"{image_id}.npz", [],
                  np.zeros((0, 8, 12), np.float32), np.zeros((0, 32, 48), np.float32))
    monkeypatch.setattr(step_io, "save_png", _no_space)
    err = _fails_with_one_line(crf_cam_processing, "3_crf.yaml", tmp_path, capsys,
                               "crf.num_workers=1")
    assert "train_00000" in err and "ENOSPC" in err and "/full/disk/out.png" in err
    assert read_done(tmp_path / "3_ir_labels") is None
