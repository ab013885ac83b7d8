"""CAM library: closed form == autograd == pytorch-grad-cam (CAM, Grad-CAM, Grad-CAM++,
LayerCAM), multiscale maps, labels, merging."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from inference.irn_steps.cam import (METHODS, autograd_class_maps, class_maps, fast_class_maps,
                                     geometric_mean, merge_cams, multiscale_cams, predicted_outputs,
                                     select_outputs, uses_fast_path)

NUM_OUTPUTS = 4
REFERENCE = {"cam": HiResCAM, "gradcam": GradCAM, "gradcam++": GradCAMPlusPlus,
             "layercam": LayerCAM}


class TinyCamNet(nn.Module):
    """CamClassifier-shaped: in-place ReLUs, features = last ReLU output, GAP + 1x1 head.

    Head weights are drawn away from zero (|W| in [4, 8]): pytorch-grad-cam's Grad-CAM++ adds
    1e-6 to 2 g^2 with g = W/(hw), which would otherwise shift its maps by more than 1e-4."""

    def __init__(self, bias: bool = False, inplace: bool = True):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=inplace),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(inplace=inplace),
            nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(inplace=inplace),
        )
        self.classifier = nn.Conv2d(16, NUM_OUTPUTS, 1, bias=bias)
        with torch.no_grad():
            magnitude = torch.empty_like(self.classifier.weight).uniform_(4, 8)
            k, c = torch.meshgrid(torch.arange(NUM_OUTPUTS), torch.arange(16), indexing="ij")
            sign = torch.where((k + c) % 3 == 0, -1.0, 1.0)[..., None, None]  # 2/3 positive
            self.classifier.weight.copy_(magnitude * sign)
        self.class_ids = list(range(1, NUM_OUTPUTS + 1))

    def features(self, x):
        return self.backbone(x)

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1)).flatten(1)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyCamNet().eval()


@pytest.fixture
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def normalized(maps: torch.Tensor) -> torch.Tensor:
    """ReLU and per-(image, class) max normalisation."""
    maps = maps.relu()
    return maps / maps.amax((-2, -1), keepdim=True).clamp_min(1e-12)


def as_pytorch_grad_cam(maps: np.ndarray, size=(32, 32)) -> np.ndarray:
    """pytorch-grad-cam's post-processing of ReLU'd (B, h, w) maps of one layer."""
    return scale_cam_image(scale_cam_image(maps, size))


def no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


@pytest.mark.parametrize("method", METHODS)
def test_fast_path_equals_autograd(model, images, method):
    outputs = list(range(NUM_OUTPUTS))
    fast = fast_class_maps(model, images, outputs, method)
    slow = autograd_class_maps(model, images, outputs, method, target_layer="backbone")
    assert fast.shape == slow.shape == (2, NUM_OUTPUTS, 8, 8)
    assert (fast.relu().amax((-2, -1)) > 0).all()  # every map has something to compare
    assert (normalized(fast) - normalized(slow)).abs().max() <= 1e-4
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4 * fast.abs().max().item())
    assert no_hooks_left(model)


@pytest.mark.parametrize("method", METHODS)
def test_both_paths_match_pytorch_grad_cam(model, images, method):
    """pytorch-grad-cam ReLUs, min-max normalises per image, resizes (cv2) to the input and
    min-max normalises again: `as_pytorch_grad_cam` scales our raw maps alike."""
    outputs = [0, 2, 3]
    fast = fast_class_maps(model, images, outputs, method).relu().numpy()
    slow = autograd_class_maps(model, images, outputs, method, "backbone").relu().numpy()
    reference_model = copy.deepcopy(model)
    target_layers = [reference_model.backbone[-1]]
    with REFERENCE[method](model=reference_model, target_layers=target_layers) as ref:
        for j, k in enumerate(outputs):
            expected = ref(images, targets=[ClassifierOutputTarget(k)] * len(images))
            for ours in (fast, slow):
                np.testing.assert_allclose(as_pytorch_grad_cam(ours[:, j]), expected, atol=1e-4)


def test_inplace_relu_after_target_layer(model, images):
    """The target conv's output is overwritten by ReLU(inplace=True) downstream; the hook's
    copy must keep the pre-ReLU activation: same maps as with out-of-place ReLUs, and
    Grad-CAM equal to pytorch-grad-cam on the out-of-place model."""
    out_of_place = copy.deepcopy(model)
    for m in out_of_place.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    for method in METHODS:
        torch.testing.assert_close(
            autograd_class_maps(model, images, [0, 1], method, "backbone.4"),
            autograd_class_maps(out_of_place, images, [0, 1], method, "backbone.4"))
    ours = autograd_class_maps(model, images, [1], "gradcam", "backbone.4")[:, 0].relu().numpy()
    with GradCAM(model=out_of_place, target_layers=[out_of_place.backbone[4]]) as ref:
        expected = ref(images, targets=[ClassifierOutputTarget(1)] * len(images))
    np.testing.assert_allclose(as_pytorch_grad_cam(ours), expected, atol=1e-4)


def test_dispatch_picks_fast_path_when_the_head_allows(model, images):
    assert uses_fast_path(model) and uses_fast_path(model, "backbone")
    assert not uses_fast_path(model, "backbone.4")
    biased = TinyCamNet(bias=True).eval()
    biased.load_state_dict(model.state_dict(), strict=False)
    assert not uses_fast_path(biased)
    # a bias shifts scores, not gradients: autograd on the biased head == closed form without
    torch.testing.assert_close(class_maps(biased, images, [0, 3], "gradcam++"),
                               fast_class_maps(model, images, [0, 3], "gradcam++"),
                               rtol=1e-4, atol=1e-4)
    assert no_hooks_left(biased)


def test_hooks_removed_after_error(model):
    with pytest.raises(RuntimeError):
        autograd_class_maps(model, torch.randn(1, 5, 32, 32), [0], "gradcam", "backbone.4")
    assert no_hooks_left(model)


def test_large_logits_give_finite_gradcam_plus_plus(model, images):
    with torch.no_grad():
        model.classifier.weight.mul_(100 / model(images).abs().max())
        assert model(images).abs().max() > 99  # exp(S) would be inf in float32 here
    fast = fast_class_maps(model, images, [0, 1, 2, 3], "gradcam++")
    slow = autograd_class_maps(model, images, [0, 1, 2, 3], "gradcam++", "backbone")
    assert torch.isfinite(fast).all() and torch.isfinite(slow).all()
    assert (normalized(fast) - normalized(slow)).abs().max() <= 1e-4
    cams = multiscale_cams(model, images[0], [0, 1], "gradcam++")
    assert np.isfinite(cams.cam).all() and np.isfinite(cams.high_res).all()


@pytest.mark.parametrize("method", METHODS)
def test_multiscale_shapes_normalisation_and_paths(model, method):
    image = torch.randn(3, 37, 45, generator=torch.Generator().manual_seed(2))
    fast = multiscale_cams(model, image, [0, 2], method)
    slow = multiscale_cams(model, image, [0, 2], method, target_layer="backbone.5")
    for cams in (fast, slow):
        assert cams.cam.shape == (2, 10, 12) and cams.high_res.shape == (2, 37, 45)
        assert cams.cam.dtype == cams.high_res.dtype == np.float32
        for maps in (cams.cam, cams.high_res):
            assert maps.min() >= 0
            assert np.all(maps.reshape(2, -1).max(1) == 1)
    assert np.abs(fast.cam - slow.cam).max() <= 1e-4
    assert np.abs(fast.high_res - slow.high_res).max() <= 1e-4
    assert no_hooks_left(model)


def test_multiscale_single_scale_matches_manual_resize(model):
    image = torch.randn(3, 30, 26, generator=torch.Generator().manual_seed(3))
    cams = multiscale_cams(model, image, [1, 3], "cam", scales=(1.0,), flip=False)
    raw = fast_class_maps(model, image[None], [1, 3], "cam").relu()
    for got, size in ((cams.cam, (8, 7)), (cams.high_res, (30, 26))):
        resized = F.interpolate(raw, size=size, mode="bilinear", align_corners=False)
        expected = normalized(resized)[0]
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-6)


def test_multiscale_flip_symmetry_and_global_normalisation(model):
    image = torch.randn(3, 28, 36, generator=torch.Generator().manual_seed(4))
    cams = multiscale_cams(model, image, [0, 1, 3], "gradcam")
    mirrored = multiscale_cams(model, image.flip(-1), [0, 1, 3], "gradcam")
    np.testing.assert_allclose(mirrored.high_res, cams.high_res[..., ::-1], atol=1e-5)
    np.testing.assert_allclose(mirrored.cam, cams.cam[..., ::-1], atol=1e-5)
    global_cams = multiscale_cams(model, image, [0, 1, 3], "gradcam", normalize="global")
    for maps, per_class in ((global_cams.cam, cams.cam), (global_cams.high_res, cams.high_res)):
        assert maps.max() == 1 and np.all(maps.reshape(3, -1).max(1) <= 1)
        peaks = maps.reshape(3, -1).max(1)[:, None, None]
        np.testing.assert_allclose(maps / peaks, per_class, atol=1e-5)


def test_multiscale_no_outputs_and_bad_input(model):
    cams = multiscale_cams(model, torch.zeros(3, 20, 20), [])
    assert cams.cam.shape == (0, 5, 5) and cams.high_res.shape == (0, 20, 20)
    with pytest.raises(ValueError, match="eval mode"):
        multiscale_cams(model.train(), torch.zeros(3, 20, 20), [0])
    with pytest.raises(ValueError, match="unknown CAM method"):
        multiscale_cams(model.eval(), torch.zeros(3, 20, 20), [0], "scorecam")


def test_select_outputs():
    class_ids = [1, 2, 3, 5]  # class 4 is excluded from this classifier
    logits = torch.tensor([-3.0, 2.0, -1.0, 0.5])
    assert predicted_outputs(logits) == [1, 3]
    assert predicted_outputs(torch.tensor([-3.0, -0.2, -1.0, -5.0])) == [1]  # top-1 fallback
    assert select_outputs("gt", [5, 2, 4], class_ids) == [1, 3]
    assert select_outputs("gt", [4], class_ids) == []
    assert select_outputs("pred", [5], class_ids, logits, threshold=0.7) == [1]
    assert select_outputs("union", [1], class_ids, logits.numpy()) == [0, 1, 3]
    assert select_outputs("gt", [1, 3], [3, 9, 1]) == [2, 0]  # ascending class ids
    with pytest.raises(ValueError, match="logits"):
        select_outputs("pred", [], class_ids)
    with pytest.raises(ValueError, match="label mode"):
        select_outputs("all", [], class_ids)


def test_merge_cams():
    def cams(keys, h=4, w=6):
        keys = np.asarray(keys)
        fill = keys[:, None, None].astype(np.float32)
        return {"keys": keys, "cam": np.ones((len(keys), h, w), np.float32) * fill,
                "high_res": np.ones((len(keys), 4 * h, 4 * w), np.float32) * fill}

    merged = merge_cams(cams([1, 3, 7]), cams([4]))
    assert merged["keys"].tolist() == [1, 3, 4, 7] and merged["keys"].dtype == np.int64
    for name in ("cam", "high_res"):
        assert merged[name][:, 0, 0].tolist() == [1, 3, 4, 7]
    assert merge_cams(cams([]), cams([2]))["keys"].tolist() == [2]
    with pytest.raises(ValueError, match=r"\[3\]"):
        merge_cams(cams([1, 3]), cams([3]))
    with pytest.raises(ValueError, match="sizes differ"):
        merge_cams(cams([1]), cams([2], h=5))


def test_step2_takes_the_classifier_epoch_it_is_told(tmp_path):
    from inference.irn_steps import cams_step
    from model_training.common.config import ConfigError, load_config

    for folder in ("1_classifier", "1_classifier_person"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "best.pt").write_bytes(b"")
    (tmp_path / "1_classifier" / "last.pt").write_bytes(b"")

    def checkpoints(*overrides):
        return cams_step._check(load_config(None, [f"work_dir={tmp_path}", *overrides], cams_step.DEFAULTS))

    assert checkpoints() == [tmp_path / "1_classifier" / "best.pt"]  # the default: best val mAP
    assert checkpoints("cams.classifier_epoch=last") == [tmp_path / "1_classifier" / "last.pt"]
    with pytest.raises(ConfigError, match="cams.extra_classifiers.*1_classifier_person/last.pt"):
        checkpoints("cams.classifier_epoch=last", "cams.extra_classifiers=[person]")
    with pytest.raises(ConfigError, match="key 'cams.classifier_epoch' must be one of best, last"):
        checkpoints("cams.classifier_epoch=final")


def test_geometric_mean_keeps_only_what_both_maps_show(model):
    image = torch.randn(3, 32, 40, generator=torch.Generator().manual_seed(6))
    coarse = multiscale_cams(model, image, [0, 1], "cam")
    fine = multiscale_cams(model, image, [0, 1], "layercam", target_layer="backbone.3")
    fused = geometric_mean(coarse, fine)
    for c, f, g in zip(coarse, fine, fused):
        expected = np.sqrt(c * f)
        np.testing.assert_allclose(g, expected / expected.max((1, 2), keepdims=True), atol=1e-6)
        assert np.all(g[(c == 0) | (f == 0)] == 0) and np.all(g.reshape(2, -1).max(1) == 1)
        assert np.abs(g - c).max() > 0.05  # the fine map moved it


def test_step2_fine_layer_multiplies_in_a_finer_layercam(tmp_path):
    """``cams.fine_layer``: step 2's maps are the geometric mean of ``cams.method``'s maps and
    the LayerCAM maps of that layer; a layer the classifier lacks is a one-line error."""
    from inference.irn_steps.cams_step import DEFAULTS, CamExtractor
    from model_training.common.config import ConfigError, load_config
    from model_training.common.models import build_cam_classifier
    from model_training.common.transforms import network_input

    torch.manual_seed(0)
    classifier = build_cam_classifier("tf_efficientnet_lite0", "none", 16, class_ids=[1, 2, 3])
    torch.save({"model": classifier.state_dict(), **classifier.checkpoint_fields()},
               tmp_path / "last.pt")
    layer = "backbone.model.blocks.2"  # stride 8

    def extractor(fine_layer):
        cfg = load_config(None, [f"work_dir={tmp_path}", "cams.method=cam", "cams.scales=[1.0]",
                                 f"cams.fine_layer={fine_layer}"], DEFAULTS).cams
        return CamExtractor(tmp_path / "last.pt", torch.device("cpu"), cfg)

    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    got = extractor(layer)(image, [1, 3], "gt")
    model, tensor = classifier.eval(), network_input(image, None)
    coarse = multiscale_cams(model, tensor, [0, 2], "cam", [1.0])
    fine = multiscale_cams(model, tensor, [0, 2], "layercam", [1.0], target_layer=layer)
    assert got["keys"].tolist() == [1, 3]
    np.testing.assert_allclose(got["high_res"], geometric_mean(coarse, fine).high_res, atol=1e-5)
    assert np.abs(got["high_res"] - coarse.high_res).max() > 0.05
    with pytest.raises(ConfigError, match="key 'cams.fine_layer': .* has no layer 'backbone.nope'"):
        extractor("backbone.nope")
