"""The segmentation network of steps 6 and 7: an smp model from its ``model_config`` (the
submission checkpoint's format), its encoder filled from ImageNet weights (offline for
EfficientNet-Lite) or from a backbone state-dict file."""
from __future__ import annotations

import inspect
from typing import Any, Mapping

import segmentation_models_pytorch as smp
from torch import nn

from ..config import Config, ConfigError
from ..step_io import first_line
from .backbones import weights_error_names
from .weights import (LITE_HEAD_PREFIXES, efficientnet_lite_state_dict, is_efficientnet_lite,
                      load_matching, read_state_dict, rename_efficientnet_lite_keys)

# ImageNet heads a backbone state-dict file may carry; smp encoders have none of them.
HEAD_PREFIXES = ("fc.", "classifier.", "head.", "last_linear.") + LITE_HEAD_PREFIXES


def model_config_from(model_cfg: Config, num_classes: int) -> dict[str, Any]:
    """The ``model_config`` of the submission checkpoint format, checked against smp."""
    arch_class = smp.MODEL_ARCHITECTURES_MAPPING.get(str(model_cfg.arch).lower())
    if arch_class is None:
        names = ", ".join(sorted(smp.MODEL_ARCHITECTURES_MAPPING))
        raise ConfigError(f"key 'model.arch': unknown architecture {model_cfg.arch!r} ({names})")
    config = {"arch": model_cfg.arch, "encoder_name": model_cfg.encoder_name,
              "num_classes": int(num_classes)}
    stride = model_cfg.encoder_output_stride
    if stride is not None:
        if "encoder_output_stride" not in inspect.signature(arch_class).parameters:
            raise ConfigError(f"key 'model.encoder_output_stride': {model_cfg.arch} does not "
                              f"take an output stride, set it to null")
        if stride not in (8, 16):
            raise ConfigError(f"key 'model.encoder_output_stride' must be 8, 16 or null, got {stride!r}")
        config["encoder_output_stride"] = int(stride)
    return config


def build_model(model_config: Mapping[str, Any], encoder_weights: str = "none") -> nn.Module:
    """An smp network from a ``model_config``, its encoder initialised from ``encoder_weights``."""
    kwargs = {}
    if "encoder_output_stride" in model_config:
        kwargs["encoder_output_stride"] = model_config["encoder_output_stride"]
    encoder_name = model_config["encoder_name"]
    offline_lite = encoder_weights == "imagenet" and _lite_name(encoder_name) is not None
    smp_weights = "imagenet" if encoder_weights == "imagenet" and not offline_lite else None
    try:
        model = smp.create_model(model_config["arch"], encoder_name=encoder_name,
                                 encoder_weights=smp_weights, classes=model_config["num_classes"],
                                 **kwargs)
    except (KeyError, ValueError) as err:  # smp: unknown encoder / weights / stride
        raise ConfigError(f"key 'model': {first_line(err)}") from None
    except RuntimeError as err:  # timm: unknown model name
        raise ConfigError(f"key 'model.encoder_name': {first_line(err)}") from None
    except Exception as err:  # noqa: BLE001 - offline / DNS / HTTP errors of the download
        if smp_weights is None:
            raise
        raise ConfigError(f"key 'model.encoder_weights': cannot download ImageNet weights for "
                          f"{encoder_name} ({first_line(err)}); use a state-dict file or "
                          f"'none'") from None
    with weights_error_names("model.encoder_weights"):
        if offline_lite:
            load_matching(model.encoder.model, efficientnet_lite_state_dict(
                _lite_name(encoder_name), with_head=False), source=f"{encoder_name} ImageNet weights")
        elif encoder_weights not in ("imagenet", "none"):
            load_encoder_file(model, encoder_name, encoder_weights)
    return model


def load_encoder_file(model: nn.Module, encoder_name: str, path: str) -> None:
    """A backbone state dict (timm / torchvision naming, ImageNet head ignored) into the encoder.

    ``tu-`` encoders wrap a timm features model (``encoder.model``); smp's own encoders
    subclass the torchvision network, so both take the backbone's usual key names.
    """
    module = model.encoder.model if encoder_name.startswith("tu-") else model.encoder
    state = read_state_dict(path)
    lite = _lite_name(encoder_name)
    if lite is not None and "_conv_stem.weight" in state:
        state = rename_efficientnet_lite_keys(state, lite)
    own = module.state_dict()
    heads = tuple(p for p in HEAD_PREFIXES if not any(k.startswith(p) for k in own))
    load_matching(module, state, source=f"encoder weights {path}", ignore_prefixes=heads)


def _lite_name(encoder_name: str) -> str | None:
    """``tu-tf_efficientnet_lite0`` -> ``tf_efficientnet_lite0`` (offline weights exist)."""
    name = encoder_name.removeprefix("tu-")
    return name if encoder_name.startswith("tu-") and is_efficientnet_lite(name) else None
