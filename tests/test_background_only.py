"""An image whose label list is empty (a crop with no object class) is a background-only
training image, not an error: step 2 writes a CAM file with no maps, steps 3 and 5 an
all-background mask (step 5's optional walked maps: none). Steps 3 and 5 run without any CAMs are one-line errors, not no-ops."""
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.irn_steps import cams_step, ir_labels_step, pseudo_masks_step
from model_training.common.config import ConfigError, load_config
from model_training.common.datasets.toy import ToySource
from model_training.common.models.classifier import build_cam_classifier
from model_training.common.models.irnet import build_irnet
from model_training.common.step_io import load_cams, load_png, read_done, step_dir

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "toy"
BACKBONE = "tf_efficientnet_lite0"
TINY_TOY = ["device=cpu", "num_workers=0", "dataset.toy.num_train=3", "dataset.toy.num_val=2",
            "dataset.toy.num_test=1", "dataset.toy.image_size=[40,56]"]


@pytest.fixture
def work_dir(tmp_path):
    """Untrained step-1 and step-4 checkpoints: enough to run steps 2-5 on the toy images."""
    torch.manual_seed(0)
    classifier = build_cam_classifier(BACKBONE, "none", 16, class_ids=range(1, 7))
    torch.save({"model": classifier.state_dict(), **classifier.checkpoint_fields()},
               step_dir(tmp_path, 1) / "best.pt")
    arch = {"backbone": BACKBONE, "weights": "none", "output_stride": 16,
            "with_displacement": False}
    torch.save({"model": build_irnet(arch).state_dict(), "arch": arch},
               step_dir(tmp_path, 4) / "best.pt")
    return tmp_path


def _config(name, module, work_dir, *overrides):
    return load_config(CONFIGS / name, [f"work_dir={work_dir}", *TINY_TOY, *overrides],
                       module.DEFAULTS)


def test_an_image_without_labels_becomes_background(work_dir, monkeypatch):
    first = ToySource.labels  # the first toy image keeps no label
    monkeypatch.setattr(ToySource, "labels",
                        lambda self, image_id: [] if image_id == self.ids[0] else first(self, image_id))
    source = ToySource(seed=0, num_images=3, image_size=(40, 56), split="train")
    empty, labelled = source.ids[0], source.ids[1]
    assert source.labels(labelled)  # the others keep theirs

    # input_long_side resizes the maps back to the image: the step that used to fail on K=0
    summary = cams_step.run(_config("2_cams.yaml", cams_step, work_dir, "cams.input_long_side=64",
                                   "cams.scales=[1.0]", "cams.labels=gt"))
    assert summary["written"] == 3 and not summary["failed"] and summary["background_only"] == 1
    cams = load_cams(work_dir / "2_cams" / f"{empty}.npz")
    assert cams["keys"].shape == (0,)
    assert cams["cam"].shape == (0, 10, 14) and cams["high_res"].shape == (0, 40, 56)
    assert len(load_cams(work_dir / "2_cams" / f"{labelled}.npz")["keys"]) > 0

    ir_labels_step.run(_config("3_ir_labels.yaml", ir_labels_step, work_dir, "ir_labels.num_workers=1"))
    pseudo_masks_step.run(_config("5_pseudo_masks.yaml", pseudo_masks_step, work_dir,
                                 "pseudo_masks.input_long_side=64", "pseudo_masks.save_rw=true"))
    with np.load(work_dir / "5_pseudo_masks" / f"{empty}.npz", allow_pickle=False) as walked:
        assert walked["keys"].shape == (0,) and len(walked["rw"]) == 0
    with np.load(work_dir / "5_pseudo_masks" / f"{labelled}.npz", allow_pickle=False) as walked:
        # the toy config walks the background with the classes: its map comes first
        keys = load_cams(work_dir / "2_cams" / f"{labelled}.npz")["keys"]
        assert walked["keys"].tolist() == [0, *keys.tolist()]
        assert walked["rw"].dtype == np.float16 and walked["rw"].shape[0] == len(keys) + 1
    for folder in ("3_ir_labels", "5_pseudo_masks"):
        mask = load_png(work_dir / folder / f"{empty}.png")
        assert mask.shape == (40, 56) and not mask.any(), folder  # all background
        assert read_done(work_dir / folder)["written"] == 3, folder


@pytest.mark.parametrize("name,module", [("3_ir_labels.yaml", ir_labels_step),
                                         ("5_pseudo_masks.yaml", pseudo_masks_step)])
def test_a_step_without_cams_is_one_error(work_dir, name, module):
    with pytest.raises(ConfigError, match=r"2_cams.*run step 2 first"):
        module.run(_config(name, module, work_dir))
    out_dir = work_dir / ("3_ir_labels" if module is ir_labels_step else "5_pseudo_masks")
    assert not out_dir.exists() or not any(out_dir.iterdir())  # nothing written, nothing marked done


def test_unsure_margin_leaves_close_calls_unlabelled(work_dir):
    """``pseudo_masks.unsure_margin`` only turns pixels to 255 (not trained on by step 6):
    every other pixel keeps the label of the run without it."""
    cams_step.run(_config("2_cams.yaml", cams_step, work_dir, "cams.scales=[1.0]", "cams.labels=gt"))
    step5 = ("5_pseudo_masks.yaml", pseudo_masks_step, work_dir, "pseudo_masks.input_long_side=64")
    pseudo_masks_step.run(_config(*step5))
    ids = ToySource(seed=0, num_images=3, image_size=(40, 56), split="train").ids
    labelled = {i: load_png(work_dir / "5_pseudo_masks" / f"{i}.png") for i in ids}
    pseudo_masks_step.run(_config(*step5, "pseudo_masks.unsure_margin=0.2", "overwrite=true"))
    unsure = 0
    for image_id, full in labelled.items():
        mask = load_png(work_dir / "5_pseudo_masks" / f"{image_id}.png")
        sure = mask != 255
        assert np.array_equal(mask[sure], full[sure])
        unsure += int((~sure).sum())
    assert 0 < unsure < 3 * 40 * 56
