"""Feature extractors by name: torchvision ResNet-50, the seed's VGG16 GAP, any timm CNN.

``build_backbone`` gives the last feature map (what a CAM classifier pools),
``build_multilevel_backbone`` the maps of every stage, shallow to deep (what IRNet's
boundary and displacement branches read). ``weights`` is "imagenet", "none" or a file.
CAM resolution decides much of the result, so every backbone takes an output stride:
8, 16 (IRNet's, the default) or 32.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
import torchvision
from torchvision.models.vgg import cfgs, make_layers

from ..config import ConfigError
from .weights import (WeightsError, efficientnet_lite_state_dict,
                      is_efficientnet_lite, load_matching, read_state_dict,
                      rename_efficientnet_lite_keys)

TORCHVISION_BACKBONES = ("resnet50", "vgg16")
OUTPUT_STRIDES = (8, 16, 32)


def backbone_exists(name: str) -> bool:
    """A name ``build_backbone`` accepts: a torchvision one here or any timm model."""
    import timm

    return name in TORCHVISION_BACKBONES or timm.is_model(name)


def check_backbone_keys(section: str, backbone: str, weights: str, output_stride: int) -> None:
    """A config section's backbone, weights and output stride, checked before any work:
    a ConfigError naming ``<section>.<key>``."""
    if not backbone_exists(backbone):
        raise ConfigError(f"key '{section}.backbone': unknown backbone {backbone!r} "
                          f"(resnet50, vgg16 or a timm model name)")
    if output_stride not in OUTPUT_STRIDES:
        raise ConfigError(f"key '{section}.output_stride' must be 8, 16 or 32, got {output_stride}")
    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        raise ConfigError(f"key '{section}.weights': 'imagenet', 'none' or a file; not found: {weights}")


@contextmanager
def weights_error_names(key: str):
    """Weights that exist but do not fit (found only when loading) become a ConfigError
    naming ``key``: one line for the user, not a traceback."""
    try:
        yield
    except WeightsError as err:
        raise ConfigError(f"key '{key}': {err}") from None


def _check_output_stride(output_stride: int) -> None:
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")


def _download_failed(name: str, err: Exception) -> WeightsError:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return WeightsError(f"cannot download ImageNet weights for {name} ({reason}); "
                        f"set weights to a state-dict file or 'none'")


def _torchvision_imagenet(name: str) -> dict[str, torch.Tensor]:
    # IMAGENET1K_V1: the weights IRNet's reference numbers were made with.
    enum = {"resnet50": torchvision.models.ResNet50_Weights,
            "vgg16": torchvision.models.VGG16_Weights}[name].IMAGENET1K_V1
    try:
        return enum.get_state_dict(progress=False)
    except Exception as err:  # noqa: BLE001 - offline/DNS/HTTP errors all mean the same here
        raise _download_failed(name, err) from None


class ResNet50Backbone(nn.Module):
    """torchvision ResNet-50 without pool/fc; last stage dilated for output stride 16 (8).

    Keeps torchvision's module names, so a torchvision state-dict file loads as it is.
    """

    def __init__(self, output_stride: int = 16, multilevel: bool = False):
        super().__init__()
        _check_output_stride(output_stride)
        dilate = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}
        net = torchvision.models.resnet50(weights=None,
                                          replace_stride_with_dilation=dilate[output_stride])
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1, net.layer2, net.layer3, net.layer4)
        self.multilevel = multilevel
        self.channels = [64, 256, 512, 1024, 2048]
        self.reductions = [4, 4, 8, min(16, output_stride), output_stride]

    def load_weights(self, weights: str) -> None:
        state = _torchvision_imagenet("resnet50") if weights == "imagenet" else read_state_dict(weights)
        load_matching(self, state, source=f"resnet50 weights {weights}", ignore_prefixes=("fc.",))

    def forward(self, x: torch.Tensor):
        stem = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        levels = [stem]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            levels.append(layer(levels[-1]))
        return levels if self.multilevel else levels[-1]


class VGG16GAPBackbone(nn.Module):
    """The seed's VGG16 GAP: VGG16 conv layers with pool5 removed (and pool4 for stride 8,
    conv5 then dilated by 2), plus new 3x3 conv layers 512->1024->1024 that the GAP head reads.

    ``features`` keeps torchvision's indices, so its weights load from torchvision files;
    ``extra`` is newly initialised and trained with the head's larger learning rate.
    """

    _POOL_INDICES = (4, 9, 16, 23, 30)
    _CONV5_INDICES = (24, 26, 28)
    _STAGE_ENDS = (5, 10, 17, 24, 31)  # slice ends of conv1..conv5 in ``features``

    def __init__(self, output_stride: int = 16, multilevel: bool = False):
        super().__init__()
        _check_output_stride(output_stride)
        # VGG16's conv layers alone: building the whole model made its 120M-parameter
        # classifier too (1.8 s on a CPU), only to drop it. Initialised as torchvision does.
        features = make_layers(cfgs["D"])
        for layer in features:
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(layer.bias)
        drop = {32: (), 16: (30,), 8: (23, 30)}[output_stride]
        for index in drop:
            features[index] = nn.Identity()
        if output_stride == 8:
            for index in self._CONV5_INDICES:
                features[index].dilation, features[index].padding = (2, 2), (2, 2)
        self.features = features
        self.extra = nn.Sequential(
            nn.Conv2d(512, 1024, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(1024, 1024, 3, padding=1), nn.ReLU(inplace=True),
        )
        self.new_modules = [self.extra]
        self.multilevel = multilevel
        self.channels = [64, 128, 256, 512, 1024]
        self.reductions = [2, 4, 8, min(16, output_stride), output_stride]

    def load_weights(self, weights: str) -> None:
        state = _torchvision_imagenet("vgg16") if weights == "imagenet" else read_state_dict(weights)
        conv_state = {k.removeprefix("features."): v for k, v in state.items()
                      if k.startswith("features.")}
        load_matching(self.features, conv_state, source=f"vgg16 weights {weights}")

    def forward(self, x: torch.Tensor):
        levels, start = [], 0
        for end in self._STAGE_ENDS:
            x = self.features[start:end](x)
            levels.append(x)
            start = end
        levels[-1] = self.extra(levels[-1])
        return levels if self.multilevel else levels[-1]


class TimmBackbone(nn.Module):
    """Any timm CNN. Last map: the full trunk (``forward_features``: for EfficientNets that
    includes the ImageNet head conv) followed by a ReLU, because CAM maths needs a
    non-negative map and a trunk may end in a norm layer (a no-op after ReLU/ReLU6).
    Multilevel: timm's ``features_only`` maps.
    """

    def __init__(self, name: str, output_stride: int = 16, multilevel: bool = False):
        super().__init__()
        import timm

        _check_output_stride(output_stride)
        self.model_name = name
        self.multilevel = multilevel
        self.model = timm.create_model(name, **self._create_kwargs(output_stride))
        if multilevel:
            self.channels = list(self.model.feature_info.channels())
            self.reductions = list(self.model.feature_info.reduction())
        else:
            self.channels = [self.model.num_features]
            self.reductions = [output_stride]
            self.activation = nn.ReLU()
        self._output_stride = output_stride

    def _create_kwargs(self, output_stride: int) -> dict:
        kwargs: dict = {"pretrained": False}
        if output_stride != 32:  # not every timm model takes the argument
            kwargs["output_stride"] = output_stride
        if self.multilevel:
            kwargs["features_only"] = True
        else:
            kwargs.update(num_classes=0, global_pool="")
        return kwargs

    def load_weights(self, weights: str) -> None:
        source = f"{self.model_name} weights {weights}"
        if weights == "imagenet" and is_efficientnet_lite(self.model_name):
            state = efficientnet_lite_state_dict(self.model_name, with_head=not self.multilevel)
            load_matching(self.model, state, source=source, ignore_prefixes=("classifier.",))
        elif weights == "imagenet":
            self._download_imagenet()
        else:
            state = read_state_dict(weights)
            if "_conv_stem.weight" in state and is_efficientnet_lite(self.model_name):
                state = rename_efficientnet_lite_keys(state, self.model_name)
            head = getattr(self.model, "pretrained_cfg", {}).get("classifier", "classifier")
            load_matching(self.model, state, source=source, ignore_prefixes=(f"{head}.",),
                          allow_unused=self.multilevel)

    def _download_imagenet(self) -> None:
        import timm

        try:
            pretrained = timm.create_model(
                self.model_name, **{**self._create_kwargs(self._output_stride), "pretrained": True})
        except Exception as err:  # noqa: BLE001 - hub/network errors all mean the same here
            raise _download_failed(self.model_name, err) from None
        self.model.load_state_dict(pretrained.state_dict())

    def forward(self, x: torch.Tensor):
        if self.multilevel:
            return self.model(x)
        return self.activation(self.model.forward_features(x))


def _build(name: str, weights: str, output_stride: int, multilevel: bool) -> nn.Module:
    if name == "resnet50":
        backbone: nn.Module = ResNet50Backbone(output_stride, multilevel)
    elif name == "vgg16":
        backbone = VGG16GAPBackbone(output_stride, multilevel)
    elif backbone_exists(name):
        backbone = TimmBackbone(name, output_stride, multilevel)
    else:
        raise ValueError(f"unknown backbone {name!r}: use resnet50, vgg16 or a timm model name")
    if weights != "none":
        if weights != "imagenet" and not Path(weights).is_file():
            raise WeightsError(f"weights must be 'imagenet', 'none' or a file; not found: {weights}")
        backbone.load_weights(weights)
    return backbone


def build_backbone(name: str, weights: str = "imagenet",
                   output_stride: int = 16) -> tuple[nn.Module, int]:
    """(module mapping images to the last feature map (B,C,h,w), C >= 0 everywhere, C)."""
    backbone = _build(name, weights, output_stride, multilevel=False)
    return backbone, backbone.channels[-1]


def build_multilevel_backbone(name: str, weights: str = "imagenet",
                              output_stride: int = 16) -> tuple[nn.Module, list[int]]:
    """(module mapping images to a list of maps shallow -> deep, their channel counts).

    The module's ``reductions`` attribute gives each map's stride.
    """
    backbone = _build(name, weights, output_stride, multilevel=True)
    return backbone, list(backbone.channels)
