"""Predict a segmentation mask for every image of a folder (step 7, standalone).

    python generate_predictions.py SAVE_DIR DATA_DIR [--weights F] [--config F]
        [--device D] [--ids FILE] [--shard i/n] [--overwrite] [key=value ...]

Writes SAVE_DIR/<image name without extension>.png: uint8 class ids at the image's original
size. Flip + multi-scale test-time augmentation: softmax averaged over the views, each
view's logits upsampled bilinearly to the original size. Imports nothing from the training
repository (see INSTRUCTIONS.md), so this folder works when copied alone.

Checkpoint format (written by step 6, ``torch.save``; read with ``weights_only=True``)::

    {
        "model": state_dict,              # segmentation_models_pytorch model.state_dict()
        "model_config": {
            "arch": "DeepLabV3Plus",      # any smp architecture name (smp.create_model)
            "encoder_name": "resnet50",   # any smp encoder name, "tu-<timm name>" included
            "encoder_output_stride": 16,  # optional; only for archs that take it (DeepLabV3/V3+)
            "num_classes": 21,            # output channels, background (id 0) included
        },
        "class_names": ["background", ...],                 # len == num_classes
        "normalize": {"mean": [0.485, 0.456, 0.406],        # RGB, applied to pixels / 255
                      "std": [0.229, 0.224, 0.225]},
    }

Output channel ``c`` is class id ``c``. Extra top-level keys (e.g. ``epoch``) are ignored;
an unknown ``model_config`` key is an error, so a mismatch never builds the wrong network.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import nn
from tqdm import tqdm

if __package__:  # imported from the training repository
    from .runtime import UsageError, atomic_write, process_shard, resolve_device
else:  # run as a script, from this folder or a copy of it alone
    from runtime import UsageError, atomic_write, process_shard, resolve_device

HERE = Path(__file__).resolve().parent
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp"}
# Every key a config may set, with the value used when it does not (same as config.yaml).
DEFAULTS: dict[str, Any] = {
    "weights": "model.pt",
    "device": "auto",
    "scales": [0.75, 1.0, 1.25],
    "flip": True,
    "input_long_side": None,
    "amp": True,
    "recursive": False,
}


# ----------------------------------------------------------------------------- checkpoint


REQUIRED_MODEL_KEYS = ("arch", "encoder_name", "num_classes")
OPTIONAL_MODEL_KEYS = ("encoder_output_stride",)
REQUIRED_CHECKPOINT_KEYS = ("model", "model_config", "class_names", "normalize")


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line naming the problem."""


class LoadedModel(NamedTuple):
    model: nn.Module
    class_names: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    model_config: dict[str, Any]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_model_config(model_config: Any) -> None:
    if not isinstance(model_config, dict):
        raise CheckpointError(f"model_config must be a mapping, got {type(model_config).__name__}")
    missing = [key for key in REQUIRED_MODEL_KEYS if key not in model_config]
    if missing:
        raise CheckpointError(f"model_config is missing {', '.join(missing)}")
    unknown = set(model_config) - set(REQUIRED_MODEL_KEYS) - set(OPTIONAL_MODEL_KEYS)
    if unknown:
        raise CheckpointError(f"model_config has unknown key(s) {', '.join(sorted(unknown))}")
    for key in ("arch", "encoder_name"):
        if not isinstance(model_config[key], str):
            raise CheckpointError(f"model_config.{key} must be a string, got {model_config[key]!r}")
    if not _is_int(model_config["num_classes"]) or not 1 <= model_config["num_classes"] <= 256:
        raise CheckpointError("model_config.num_classes must be an integer in 1..256 (uint8 PNG "
                              f"output), got {model_config['num_classes']!r}")
    if not _is_int(model_config.get("encoder_output_stride", 16)):
        raise CheckpointError("model_config.encoder_output_stride must be an integer")


def _validate_metadata(model_config: Any, class_names: Any, normalize: Any) -> None:
    """The checkpoint's metadata as this script reads it: a wrong type is one line, never a
    traceback, and never a silently wrong reading (a string of class names is no list)."""
    _validate_model_config(model_config)
    if not isinstance(class_names, (list, tuple)) or not all(isinstance(n, str) for n in class_names):
        raise CheckpointError("class_names must be a list of strings")
    if len(class_names) != model_config["num_classes"]:
        raise CheckpointError(
            f"class_names has {len(class_names)} entries, num_classes is {model_config['num_classes']}"
        )
    if not isinstance(normalize, dict):
        raise CheckpointError("normalize must be a mapping with mean and std")
    for key in ("mean", "std"):
        values = normalize.get(key)
        if not (isinstance(values, (list, tuple)) and len(values) == 3
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
            raise CheckpointError(f"normalize.{key} must be a list of 3 numbers (RGB)")


def build_model(model_config: dict[str, Any]) -> nn.Module:
    """Build the smp network described by a checkpoint's ``model_config`` (random weights)."""
    _validate_model_config(model_config)
    kwargs = {}
    if "encoder_output_stride" in model_config:
        arch_class = smp.MODEL_ARCHITECTURES_MAPPING.get(model_config["arch"].lower())
        if arch_class is None or "encoder_output_stride" not in inspect.signature(arch_class).parameters:
            raise CheckpointError(f"arch {model_config['arch']} does not take encoder_output_stride")
        kwargs["encoder_output_stride"] = int(model_config["encoder_output_stride"])
    try:
        return smp.create_model(
            model_config["arch"],
            encoder_name=model_config["encoder_name"],
            encoder_weights=None,
            classes=int(model_config["num_classes"]),
            **kwargs,
        )
    except (KeyError, RuntimeError) as error:  # smp / timm: unknown arch or encoder
        reason = str(error).strip("'\"")[:200]
        raise CheckpointError(
            f"cannot build {model_config['arch']} with encoder {model_config['encoder_name']}: {reason}"
        ) from error


def checkpoint_metadata(model_config: dict[str, Any], class_names: list[str], mean: list[float],
                        std: list[float]) -> dict[str, Any]:
    """Everything but the weights that a checkpoint for this folder holds, validated exactly
    as it will be read (step 6 stores it in best.pt / last.pt too)."""
    normalize = {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    model_config = dict(model_config)
    _validate_metadata(model_config, list(class_names), normalize)
    return {"model_config": model_config, "class_names": list(class_names), "normalize": normalize}


def make_checkpoint(state_dict: dict[str, torch.Tensor], model_config: dict[str, Any],
                    class_names: list[str], mean: list[float], std: list[float]) -> dict[str, Any]:
    """The dict to ``torch.save`` for this folder (step 6 exports its best network so)."""
    return {"model": state_dict, **checkpoint_metadata(model_config, class_names, mean, std)}


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the network from a checkpoint file, in eval mode on ``device``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # pickle / zip errors of many kinds; torch's text would advise the unsafe
        # weights_only=False, so the message says only what the file is not
        raise CheckpointError(f"{path}: not a checkpoint step 6 exported, or truncated") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint")
    missing = [key for key in REQUIRED_CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: checkpoint is missing {', '.join(missing)}")
    model_config, class_names, normalize = (checkpoint[key] for key in REQUIRED_CHECKPOINT_KEYS[1:])
    try:
        _validate_metadata(model_config, class_names, normalize)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    model_config, class_names = dict(model_config), list(class_names)

    model = build_model(model_config)
    try:
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, TypeError) as error:  # TypeError: "model" is no state dict
        first_line = str(error).splitlines()[0]
        raise CheckpointError(f"{path}: weights do not match model_config: {first_line}") from error
    model.to(device).eval()
    return LoadedModel(
        model=model,
        class_names=class_names,
        mean=tuple(float(v) for v in normalize["mean"]),
        std=tuple(float(v) for v in normalize["std"]),
        model_config=model_config,
    )


# ----------------------------------------------------------------------------- config


def load_config(path: Path) -> dict[str, Any]:
    """DEFAULTS updated by the YAML file; unknown keys and wrong types are errors."""
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise UsageError(f"cannot read config {path}: {error}".splitlines()[0]) from error
    if not isinstance(loaded, dict):
        raise UsageError(f"{path}: expected a mapping of keys to values")
    unknown = sorted(set(loaded) - set(DEFAULTS))
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {', '.join(unknown)}")
    cfg = {**DEFAULTS, **loaded}
    _check_config(cfg, path)
    # A relative weights path means: beside the config file that sets it, else this script.
    cfg["weights"] = str((path.parent if "weights" in loaded else HERE) / cfg["weights"])
    return cfg


def _check_config(cfg: dict[str, Any], path: Path) -> None:
    def fail(key: str, expected: str) -> None:
        raise UsageError(f"{path}: {key} must be {expected}, got {cfg[key]!r}")

    for key in ("flip", "amp", "recursive"):
        if not isinstance(cfg[key], bool):
            fail(key, "true or false")
    for key in ("weights", "device"):
        if not isinstance(cfg[key], str):
            fail(key, "a string")
    scales = cfg["scales"]
    if not isinstance(scales, list) or not scales or not all(
        isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in scales
    ):
        fail("scales", "a non-empty list of positive numbers")
    long_side = cfg["input_long_side"]
    if long_side is not None and (not isinstance(long_side, int) or isinstance(long_side, bool) or long_side < 1):
        fail("input_long_side", "null or a positive integer")


# ----------------------------------------------------------------------------- images


def image_folder(data_dir: Path) -> Path:
    """Where DATA_DIR's images are: its JPEGImages/ where it has one (a dataset folder)."""
    return data_dir / "JPEGImages" if (data_dir / "JPEGImages").is_dir() else data_dir


def check_save_dir(save_dir: Path, data_dir: Path, recursive: bool) -> None:
    """SAVE_DIR may not be the image folder (nor below it, when read recursively): a mask
    would replace a .png image of the same name, and the next run would read the masks as
    images. It must also take files, before any image is predicted."""
    images, target = image_folder(data_dir).resolve(), save_dir.resolve()
    if target == images or (recursive and images in target.parents):
        raise UsageError(f"SAVE_DIR {save_dir} is {'inside ' if target != images else ''}the "
                         f"image folder {images}: masks would replace or join the images; "
                         f"choose another folder")
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create SAVE_DIR {save_dir}: {error.strerror or error}") from None
    if not os.access(save_dir, os.W_OK | os.X_OK):
        raise UsageError(f"SAVE_DIR {save_dir} is not writable")


def list_images(data_dir: Path, recursive: bool, ids_file: Path | None = None) -> list[tuple[str, Path]]:
    """(output name, image path) pairs, sorted by name.

    DATA_DIR is a folder of images, or a dataset folder holding JPEGImages/. The output name
    is the path below the image folder without its extension; an id list keeps only those.
    """
    image_dir = image_folder(data_dir)
    found: dict[str, Path] = {}
    for path in sorted(image_dir.glob("**/*" if recursive else "*")):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            continue
        name = path.relative_to(image_dir).with_suffix("").as_posix()
        if name in found:
            print(f"warning: {path}: same name as {found[name]}, skipped", file=sys.stderr)
            continue
        found[name] = path
    if ids_file is None:
        return list(found.items())
    selected = []
    ids = [line.strip() for line in ids_file.read_text(encoding="utf-8").splitlines()]
    for image_id in filter(None, ids):  # whole lines: an id may hold a space
        if image_id in found:
            selected.append((image_id, found[image_id]))
        else:
            print(f"warning: {image_id}: no image named so in {image_dir}", file=sys.stderr)
    return selected


def read_image(path: Path) -> np.ndarray:
    """uint8 HxWx3 RGB; raises (OSError, ...) for a corrupt or unreadable file."""
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


def image_to_tensor(image: np.ndarray, mean, std, device: torch.device) -> torch.Tensor:
    """uint8 HxWx3 -> normalized float (1,3,H,W) on device."""
    tensor = torch.from_numpy(image).to(device).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(mean, device=device).view(3, 1, 1)
    std = torch.tensor(std, device=device).view(3, 1, 1)
    return ((tensor - mean) / std).unsqueeze(0)


def save_png(path: Path, mask: np.ndarray) -> None:
    atomic_write(path, lambda temp_name: Image.fromarray(mask).save(temp_name, format="PNG"))


# ----------------------------------------------------------------------------- prediction


def network_stride(model: nn.Module) -> int:
    """Input sides must be a multiple of this for the encoder/decoder shapes to line up."""
    return int(getattr(getattr(model, "encoder", None), "output_stride", 32))


def forward_padded(model: nn.Module, batch: torch.Tensor, stride: int) -> torch.Tensor:
    """Logits for any input size: zero-pad bottom/right to a multiple of stride, crop the
    logits back."""
    height, width = batch.shape[-2:]
    padded = F.pad(batch, (0, -width % stride, 0, -height % stride))
    return model(padded)[..., :height, :width]


@torch.inference_mode()
def predict_probabilities(
    model: nn.Module,
    image: torch.Tensor,
    scales: list[float],
    flip: bool,
    input_long_side: int | None = None,
    amp: bool = False,
) -> torch.Tensor:
    """Class probabilities (K,H,W) at the image's size, averaged over scales (x flip).

    image: normalized (1,3,H,W). Each view is resized to (long side ->) input_long_side x
    scale, its logits upsampled bilinearly back to (H,W) before the softmax.
    """
    height, width = image.shape[-2:]
    stride = network_stride(model)
    base = 1.0 if input_long_side is None else input_long_side / max(height, width)
    total = None
    for scale in scales:
        size = (max(1, round(height * base * scale)), max(1, round(width * base * scale)))
        view = image
        if size != (height, width):
            view = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
        if flip:
            view = torch.cat([view, view.flip(-1)])
        with torch.autocast(device_type=image.device.type, enabled=amp):
            logits = forward_padded(model, view, stride).float()
        if flip:
            logits = torch.cat([logits[:1], logits[1:].flip(-1)])
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        probabilities = logits.softmax(dim=1).sum(dim=0)
        total = probabilities if total is None else total.add_(probabilities)
    return total / (len(scales) * (2 if flip else 1))


def predict_mask(model: nn.Module, image: torch.Tensor, cfg: dict[str, Any], amp: bool) -> np.ndarray:
    """uint8 (H,W) class ids for one normalized image."""
    probabilities = predict_probabilities(
        model, image, cfg["scales"], cfg["flip"], cfg["input_long_side"], amp
    )
    return probabilities.argmax(dim=0).to(torch.uint8).cpu().numpy()


# ----------------------------------------------------------------------------- script


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("save_dir", type=Path, help="folder for the <image name>.png masks")
    parser.add_argument("data_dir", type=Path, help="folder of images, or a folder with JPEGImages/")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help=f"config values over the file's ({', '.join(DEFAULTS)}), e.g. flip=false")
    parser.add_argument("--weights", type=Path, help="checkpoint (default: config's weights)")
    parser.add_argument("--config", type=Path, help="YAML config (default: config.yaml beside this script)")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: config's device)")
    parser.add_argument("--ids", type=Path, help="text file of image ids to predict (others skipped)")
    parser.add_argument("--shard", default="0/1", help="i/n: handle every n-th image from the i-th")
    parser.add_argument("--overwrite", action="store_true", help="redo images whose mask exists")
    return parser.parse_intermixed_args(argv)  # key=value items also after the options


def read_settings(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """(config, weights path): CLI options win over the config file, which wins over DEFAULTS."""
    if args.config is not None and not args.config.is_file():
        raise UsageError(f"config file not found: {args.config}")
    config_path = args.config or HERE / "config.yaml"
    if config_path.is_file():
        cfg = load_config(config_path)
    else:  # the folder was copied without its config.yaml
        cfg = {**DEFAULTS, "weights": str(HERE / DEFAULTS["weights"])}
    cfg = apply_overrides(cfg, args.overrides)
    if args.device:
        cfg["device"] = args.device
    return cfg, args.weights or Path(cfg["weights"])


def apply_overrides(cfg: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``key=value`` items (values in YAML: ``scales=[1.0,1.5]``) over ``cfg``, checked again;
    a relative ``weights`` is relative to the current folder, as on any command line."""
    cfg = dict(cfg)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or key not in DEFAULTS:
            raise UsageError(f"override {item!r}: expected key=value with key one of "
                             f"{', '.join(DEFAULTS)}")
        try:
            cfg[key] = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise UsageError(f"override {item!r}: not a YAML value") from error
    _check_config(cfg, Path("command line"))
    return cfg


def find_inputs(args: argparse.Namespace, recursive: bool) -> list[tuple[str, Path]]:
    if not args.data_dir.is_dir():
        raise UsageError(f"data folder not found: {args.data_dir}")
    ids_file = args.ids
    if ids_file is not None and not ids_file.is_file():
        ids_file = args.data_dir / ids_file
        if not ids_file.is_file():
            raise UsageError(f"id list not found: {args.ids}")
    images = list_images(args.data_dir, recursive, ids_file)
    if not images:
        raise UsageError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {args.data_dir}")
    return images


def predict_folder(
    images: list[tuple[str, Path]], save_dir: Path, loaded: LoadedModel, cfg: dict[str, Any], device: torch.device
) -> tuple[int, int]:
    """Write one mask per image; a bad image is one warning line. Returns (done, failed)."""
    amp = cfg["amp"] and device.type == "cuda"
    done = failed = 0
    # no bar in a log file (its redraws would pile up): the lines before and after suffice
    for name, path in tqdm(images, desc="predict", unit="img", disable=not sys.stderr.isatty()):
        try:
            image = read_image(path)
        except Exception as error:  # PIL raises many types for corrupt files
            tqdm.write(f"warning: {path}: cannot read image: {error}", file=sys.stderr)
            failed += 1
            continue
        tensor = image_to_tensor(image, loaded.mean, loaded.std, device)
        mask_path = save_dir / f"{name}.png"
        try:
            save_png(mask_path, predict_mask(loaded.model, tensor, cfg, amp))
        except OSError as error:  # a full or read-only disk: every later image would fail too
            raise UsageError(f"cannot write {mask_path}: {error.strerror or error}: stopped") from None
        done += 1
    return done, failed


def run(args: argparse.Namespace) -> int:
    cfg, weights = read_settings(args)
    shard_index, shard_count = process_shard(args.shard)
    images = find_inputs(args, cfg["recursive"])
    if not weights.is_file():
        raise UsageError(f"weights file not found: {weights}")
    device = resolve_device(cfg["device"])
    loaded = load_checkpoint(weights, device)
    check_save_dir(args.save_dir, args.data_dir, cfg["recursive"])  # creates it: inputs first

    shard = images[shard_index::shard_count]
    pending = [
        (name, path) for name, path in shard
        if args.overwrite or not (args.save_dir / f"{name}.png").exists()
    ]
    print(
        f"{len(shard)} images in shard {shard_index}/{shard_count}, "
        f"{len(shard) - len(pending)} already done; "
        f"{len(loaded.class_names)} classes, device {device}",
        file=sys.stderr,
    )
    done, failed = predict_folder(pending, args.save_dir, loaded, cfg, device)
    print(f"wrote {done} masks to {args.save_dir}; {failed} image(s) failed", file=sys.stderr)
    if shard and failed == len(shard):
        raise UsageError("no image could be processed")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (UsageError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
