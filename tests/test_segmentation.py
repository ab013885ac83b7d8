"""Step 6: training on pseudo masks or ground truth, full-size validation, step-7 export."""
from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from inference.segmentation.submit import generate_predictions as step7
from inference.segmentation.submit import generate_predictions as submit_model
from model_training.common.config import Config, ConfigError, load_config
from model_training.common.datasets import build_source
from model_training.common.models.segmentation import build_model, model_config_from
from model_training.common.step_io import load_png, save_png
from model_training.common.transforms import image_to_tensor
from model_training.segmentation import segmentation_training as seg
from model_training.segmentation.segmentation_training import (DEFAULTS, SegmentationDataset,
                                                               evaluate)
from tests.test_submit import IMPORT_PROBE, SUBMIT_DIR, run_isolated

REPO = Path(__file__).resolve().parents[1]

# A few small toy images, a network sized for seconds on a shared 2-core CPU.
TINY = [
    "dataset.toy.num_train=4", "dataset.toy.num_val=2", "dataset.toy.image_size=[48,64]",
    "data.input_long_side=64", "data.crop_size=64", "data.scale_range=[1.0,1.0]",
    "model.encoder_weights=none", "train.epochs=1", "train.batch_size=2", "num_workers=0",
    "val.max_images=0",
]


def tiny_config(work_dir: Path, *extra: str):
    return load_config(REPO / "configs" / "toy" / "6_segmentation.yaml",
                       [f"work_dir={work_dir}", *TINY, *extra], DEFAULTS)


def write_pseudo_masks(cfg, skip: int = 0) -> Path:
    """Fake step-5 output: the toy ground truth with the last ``skip`` images left out."""
    source = build_source(cfg.dataset, "train")
    folder = Path(cfg.work_dir) / "5_pseudo_masks"
    for image_id in source.ids[: len(source.ids) - skip]:
        save_png(folder / f"{image_id}.png", source.load_mask(image_id))
    return folder


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny epoch of step 6 on pseudo masks (one training image has none), shared by
    the tests of its checkpoints and of the step-7 export: config, summary, stderr, folder."""
    work_dir = tmp_path_factory.mktemp("step6")
    cfg = tiny_config(work_dir)
    write_pseudo_masks(cfg, skip=1)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        result = seg.run(cfg)
    return SimpleNamespace(cfg=cfg, result=result, stderr=stderr.getvalue(),
                           out=work_dir / "6_segmentation")


def test_one_tiny_epoch_on_pseudo_masks_writes_checkpoints_and_export(tiny_run):
    cfg, result, out = tiny_run.cfg, tiny_run.result, tiny_run.out
    for name in ("best.pt", "last.pt", "model.pt", "metrics.csv", "config.yaml", "export_config.yaml"):
        assert (out / name).is_file(), name
    assert "1 of 4 training images have no mask" in tiny_run.stderr
    assert 0.0 <= result["miou"] <= 100.0 and result["epochs"] == 1
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["mask_source"] == "pseudo" and best["model_config"]["arch"] == "DeepLabV3Plus"
    exported = torch.load(out / "model.pt", weights_only=True)
    assert set(exported) >= {"model", "model_config", "class_names", "normalize"}
    assert exported["class_names"][0] == "background" and exported["model_config"]["num_classes"] == 7
    assert exported["model_config"]["encoder_output_stride"] == 16

    exported_cfg = yaml.safe_load((out / "export_config.yaml").read_text())
    assert exported_cfg["weights"] == "model.pt" and exported_cfg["input_long_side"] == 64

    # The submission folder's own loader rebuilds the same network: same logits.
    loaded = submit_model.load_checkpoint(out / "model.pt")
    trained = build_model(best["model_config"])
    trained.load_state_dict(best["model"])
    trained.eval()
    image = image_to_tensor(build_source(cfg.dataset, "val").load_image("val_00000"))[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(image), trained(image))
    assert list(loaded.mean) == pytest.approx([0.485, 0.456, 0.406])


def test_export_epoch_last_exports_the_final_epoch_whatever_val_chose(tiny_run, tmp_path):
    """export.epoch: last makes model.pt the final epoch's weights (IRNet's choice), not the
    best val epoch's; best (the default) keeps best.pt."""
    out = tmp_path / "6_segmentation"
    shutil.copytree(tiny_run.out, out)
    best = torch.load(out / "best.pt", weights_only=True)
    best["model"] = {k: torch.zeros_like(v) for k, v in best["model"].items()}
    best["epoch"] = 7  # a best epoch other than the last one's
    torch.save(best, out / "best.pt")
    last = torch.load(out / "last.pt", weights_only=True)
    for choice, source, epoch in (("last", last, 1), ("best", best, 7)):
        cfg = tiny_config(tmp_path, f"export.epoch={choice}")
        assert seg.export_chosen_epoch(out, cfg) == epoch
        exported = torch.load(out / "model.pt", weights_only=True)
        for key, value in source["model"].items():
            torch.testing.assert_close(exported["model"][key], value)
    assert tiny_run.result["exported_epoch"] == 1
    with pytest.raises(ConfigError, match=r"key 'export\.epoch' must be one of best, last, got 'first'"):
        seg.run(tiny_config(tmp_path / "other", "export.epoch=first", "mask_source=gt"))


def test_ema_weights_are_exported_and_the_trained_ones_kept_to_resume(tmp_path):
    """train.ema_decay: step 7 gets the average (last.pt's and model.pt's "model"), last.pt
    also holds the weights as trained."""
    cfg = tiny_config(tmp_path, "mask_source=gt", "train.ema_decay=0.5", "export.epoch=last")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        seg.run(cfg)
    assert "weights averaged (ema_decay 0.5)" in stderr.getvalue()
    out = tmp_path / "6_segmentation"
    last = torch.load(out / "last.pt", weights_only=True)
    exported = torch.load(out / "model.pt", weights_only=True)["model"]
    assert int(last["ema_updates"]) == 2  # 4 images, batches of 2
    weights = [key for key, value in exported.items() if value.is_floating_point()]
    for key in weights:
        torch.testing.assert_close(exported[key], last["model"][key])
    assert any(not torch.allclose(exported[key], last["trained_model"][key]) for key in weights)


def write_step7_images(cfg, folder: Path) -> dict[str, np.ndarray]:
    """A toy val image at its own size, cropped to an odd size and stretched to a portrait."""
    image = build_source(cfg.dataset, "val").load_image("val_00000")  # 48x64
    portrait = Image.fromarray(np.ascontiguousarray(image.transpose(1, 0, 2))).resize((41, 70))
    images = {"native": image, "odd": np.ascontiguousarray(image[5:42, 3:56]),
              "portrait": np.array(portrait)}
    folder.mkdir()
    for name, pixels in images.items():
        Image.fromarray(pixels).save(folder / f"{name}.png")
    return images


def in_process_mask(model: nn.Module, image: np.ndarray, export_config: Path) -> np.ndarray:
    """The mask step 7's code gives in this process, with step 6's export config."""
    tensor = image_to_tensor(image)[None]
    return step7.predict_mask(model, tensor, step7.load_config(export_config), amp=False)


def test_copied_submission_folder_predicts_from_the_step6_export(tiny_run, tmp_path):
    """Step 6's model.pt + export_config.yaml drive the submission folder copied alone."""
    folder = tmp_path / "submit"
    shutil.copytree(SUBMIT_DIR, folder, ignore=shutil.ignore_patterns("__pycache__", "*.pt"))
    images = write_step7_images(tiny_run.cfg, tmp_path / "images")
    probe = run_isolated(["-c", IMPORT_PROBE], cwd=tmp_path)
    assert probe.stdout.split() == ["model_training:missing", "inference:missing"], probe.stderr

    result = run_isolated([str(folder / "generate_predictions.py"), "out", "images",
                           "--weights", str(tiny_run.out / "model.pt"),
                           "--config", str(tiny_run.out / "export_config.yaml"),
                           "--device", "cpu"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    export_config = tiny_run.out / "export_config.yaml"
    exported_cfg = yaml.safe_load(export_config.read_text())
    assert exported_cfg["scales"] == [0.75, 1.0, 1.25] and exported_cfg["flip"]
    assert exported_cfg["input_long_side"] == 64
    best = torch.load(tiny_run.out / "best.pt", weights_only=True)
    trained = build_model(best["model_config"])
    trained.load_state_dict(best["model"])
    trained.eval()
    num_classes = best["model_config"]["num_classes"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(f"{n}.png" for n in images)
    for name, image in images.items():
        with Image.open(tmp_path / "out" / f"{name}.png") as png:
            assert png.mode == "L"
            mask = np.array(png)
        assert mask.shape == image.shape[:2] and mask.dtype == np.uint8, name
        assert mask.max() < num_classes, name
        # The same pixels as step 6's network and view code give. Not bit-exact by contract
        # (thread counts and batching reorder float sums: a near tie may flip), but a
        # missed resize, scale, flip or weight gives 3 % to 75 % of the pixels wrong.
        assert (mask == in_process_mask(trained, image, export_config)).mean() >= 0.999, name


def test_gt_mask_source_needs_no_pseudo_masks_and_resume_finishes(tmp_path):
    cfg = tiny_config(tmp_path, "mask_source=gt")
    result = seg.run(cfg)
    assert result["miou"] is not None
    best = torch.load(tmp_path / "6_segmentation" / "best.pt", weights_only=True)
    assert best["mask_source"] == "gt"

    with pytest.raises(ConfigError, match="resume=true"):
        seg.run(cfg)
    resumed = seg.run(tiny_config(tmp_path, "mask_source=gt", "resume=true"))
    assert resumed["miou"] == pytest.approx(result["miou"])


def test_pseudo_source_without_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="5_pseudo_masks"):
        seg.run(tiny_config(tmp_path))


def test_dataset_reads_pseudo_masks_at_image_size(tmp_path):
    cfg = tiny_config(tmp_path)
    folder = write_pseudo_masks(cfg)
    source = build_source(cfg.dataset, "train")
    dataset = SegmentationDataset(source, folder, transform=lambda image, mask: (image, mask))
    image, mask = dataset.load_pair(source.ids[0])
    assert mask.shape == image.shape[:2] == (48, 64)
    np.testing.assert_array_equal(mask, load_png(folder / f"{source.ids[0]}.png"))


def test_repeat_threshold_draws_the_images_of_a_rare_mask_class_more_often(tmp_path):
    """t = 1: class 1 is in every mask (drawn once), class 3 in one of four (sqrt(1 / 0.25) =
    2 draws an epoch); unsure pixels (255) hold no class."""
    cfg = tiny_config(tmp_path, "data.repeat_threshold=1.0", f"pseudo_mask_dir={tmp_path / 'masks'}")
    source = build_source(cfg.dataset, "train")
    for n, image_id in enumerate(source.ids):
        mask = np.ones((48, 64), np.uint8)
        mask[:4] = 255
        mask[10:20, 10:20] = 3 if n == 0 else 1
        save_png(tmp_path / "masks" / f"{image_id}.png", mask)
    dataset = SegmentationDataset(source, tmp_path / "masks", transform=None)
    expected = np.zeros((4, 6))
    expected[:, 0] = 1
    expected[0, 2] = 1
    np.testing.assert_array_equal(dataset.mask_classes(), expected)

    parts = seg.training_parts(cfg, torch.device("cpu"))
    first_epoch = list(parts.loader.sampler)
    assert sorted(first_epoch) == [0, 0, 1, 2, 3]
    parts.loader.sampler.set_epoch(1)
    assert sorted(parts.loader.sampler) == [0, 0, 1, 2, 3] and list(parts.loader.sampler) != first_epoch


def test_class_crop_reaches_the_training_crops(tmp_path):
    """``data.class_crop`` = 1: every training crop holds the small class-3 patch of its mask."""
    cfg = tiny_config(tmp_path, "data.class_crop=1.0", "data.crop_size=16", "data.hflip=false",
                      f"pseudo_mask_dir={tmp_path / 'masks'}")
    source = build_source(cfg.dataset, "train")
    for image_id in source.ids:
        mask = np.zeros(source.load_image(image_id).shape[:2], np.uint8)
        mask[-3:, -3:] = 3
        save_png(tmp_path / "masks" / f"{image_id}.png", mask)
    dataset = seg.training_parts(cfg, torch.device("cpu")).loader.dataset
    assert all(bool((dataset[n][1] == 3).any()) for n in range(len(dataset)))


def test_repeat_threshold_out_of_range_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="data.repeat_threshold"):
        tiny_config(tmp_path, "data.repeat_threshold=1.5")


class FixedLogits(nn.Module):
    """A stand-in network: the same hand-made logits whatever the (2x2) input."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = nn.Parameter(logits, requires_grad=False)
        self.seen_sizes: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_sizes.append(tuple(x.shape[-2:]))
        return self.logits.expand(x.shape[0], -1, -1, -1)


def test_validation_upsamples_logits_bilinearly_to_the_original_size():
    # Columns of a 2x2 logit map: class 1 wins the left, class 2 the right; class 3 wins
    # nowhere at low resolution but wins the two middle columns once the logits are
    # interpolated bilinearly to 4x4 (nearest upsampling would give [1, 1, 2, 2]).
    low = torch.zeros(1, 4, 2, 2)
    low[0, 1] = torch.tensor([2.0, -2.0])
    low[0, 2] = torch.tensor([-2.0, 2.0])
    low[0, 3] = 1.5
    model = FixedLogits(low)
    model.encoder = type("Encoder", (), {"output_stride": 1})()

    probabilities = step7.predict_probabilities(model, torch.zeros(1, 3, 4, 4), [1.0], False,
                                                input_long_side=2)
    assert model.seen_sizes == [(2, 2)] and probabilities.shape == (4, 4, 4)
    expected = np.tile(np.array([1, 3, 3, 2], np.uint8), (4, 1))
    np.testing.assert_array_equal(probabilities.argmax(0).numpy(), expected)

    class Source:  # ground truth = the bilinear answer, with one ignored pixel
        num_classes, class_names, ids = 4, ["bg", "a", "b", "c"], ["x"]

        def load_image(self, image_id):
            return np.zeros((4, 4, 3), np.uint8)

        def load_mask(self, image_id):
            mask = expected.copy()
            mask[0, 0] = 255
            return mask

    scores = evaluate(model, Source(), ["x"], input_long_side=2)
    assert scores["miou"] == pytest.approx(100.0) and scores["per_class_iou"]["bg"] is None


def test_offline_imagenet_weights_fill_the_tu_encoder():
    from model_training.common.models.weights import efficientnet_lite_state_dict

    model = build_model({"arch": "DeepLabV3Plus", "encoder_name": "tu-tf_efficientnet_lite0",
                         "encoder_output_stride": 16, "num_classes": 3}, "imagenet")
    reference = efficientnet_lite_state_dict("tf_efficientnet_lite0", with_head=False)
    encoder = model.encoder.model.state_dict()
    assert set(encoder) == set(reference)
    torch.testing.assert_close(encoder["conv_stem.weight"], reference["conv_stem.weight"])


def test_encoder_weights_file_in_efficientnet_pytorch_naming_is_renamed(tmp_path):
    from model_training.common.models.weights import (efficientnet_lite_package_file,
                                                      efficientnet_lite_state_dict)

    path = tmp_path / "lite0.pth"
    torch.save(torch.load(efficientnet_lite_package_file("tf_efficientnet_lite0"),
                          weights_only=True), path)
    model = build_model({"arch": "FPN", "encoder_name": "tu-tf_efficientnet_lite0",
                         "num_classes": 2}, str(path))
    reference = efficientnet_lite_state_dict("tf_efficientnet_lite0", with_head=False)
    torch.testing.assert_close(model.encoder.model.state_dict()["blocks.6.0.conv_pwl.weight"],
                               reference["blocks.6.0.conv_pwl.weight"])
    with pytest.raises(ConfigError, match="encoder_weights"):
        build_model({"arch": "FPN", "encoder_name": "tu-tf_efficientnet_lite0",
                     "num_classes": 2}, str(tmp_path / "missing.pth"))


def test_model_settings_are_checked():
    with pytest.raises(ConfigError, match="model.arch"):
        model_config_from(Config({"arch": "NoSuchNet", "encoder_name": "resnet50",
                                  "encoder_output_stride": None}), 3)
    with pytest.raises(ConfigError, match="encoder_output_stride"):
        model_config_from(Config({"arch": "Unet", "encoder_name": "resnet50",
                                  "encoder_output_stride": 16}), 3)
    config = model_config_from(Config({"arch": "Unet", "encoder_name": "resnet18",
                                       "encoder_output_stride": None}), 3)
    assert "encoder_output_stride" not in config
    with pytest.raises(ConfigError, match="encoder_name"):
        build_model({**config, "encoder_name": "tu-no_such_net"})


def _one_bad_val_mask(monkeypatch) -> str:
    """The first toy val image gets a mask of the wrong size; returns its id."""
    from model_training.common.datasets.toy import ToySource

    load_mask = ToySource.load_mask
    monkeypatch.setattr(ToySource, "load_mask", lambda self, image_id: np.zeros((3, 5), np.uint8)
                        if self.split == "val" and image_id == self.ids[0] else load_mask(self, image_id))
    return "val_00000"


def test_a_bad_val_mask_is_left_out_before_training(tmp_path, monkeypatch, capsys):
    """Once a crash in the first validation, after a whole epoch of training."""
    bad = _one_bad_val_mask(monkeypatch)
    cfg = tiny_config(tmp_path)
    val = build_source(cfg.dataset, "val")
    assert seg.usable_val_ids(val, val.ids) == val.ids[1:]
    assert f"warning: {bad}: mask of {bad} has shape (3, 5), image (48, 64)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=rf"val: mask of {bad} has shape \(3, 5\).*on_error=stop"):
        seg.usable_val_ids(val, val.ids, on_error="stop")


def test_training_with_a_bad_val_mask_validates_on_the_rest(tmp_path, monkeypatch):
    _one_bad_val_mask(monkeypatch)
    cfg = tiny_config(tmp_path, "mask_source=gt")
    assert seg.run(cfg)["miou"] is not None
    with pytest.raises(ConfigError, match="on_error=stop"):  # refused before any epoch
        seg.run(tiny_config(tmp_path / "stop", "mask_source=gt", "on_error=stop"))
    assert not (tmp_path / "stop" / "6_segmentation" / "last.pt").exists()
