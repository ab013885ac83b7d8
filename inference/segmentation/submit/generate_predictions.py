"""Predict a segmentation mask for every image of a folder (step 7, standalone).

    python generate_predictions.py SAVE_DIR DATA_DIR [--weights F] [--config F]
        [--device D] [--ids FILE] [--shard i/n] [--overwrite] [key=value ...]

Writes SAVE_DIR/<image name without extension>.png: uint8 class ids at the image's original
size. Flip + multi-scale test-time augmentation: softmax averaged over the views, each
view's logits upsampled bilinearly to the original size. Imports nothing from the training
repository (see INSTRUCTIONS.md), so this folder works when copied alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import nn
from tqdm import tqdm

if __package__:  # imported by the training repo (step 6 validates with this code)
    from .model import CheckpointError, LoadedModel, load_checkpoint, split_outputs
else:  # run as a script, from this folder or a copy of it
    from model import CheckpointError, LoadedModel, load_checkpoint, split_outputs

HERE = Path(__file__).resolve().parent
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp"}
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
# Every key a config may set, with the value used when it does not (same as config.yaml).
DEFAULTS: dict[str, Any] = {
    "weights": "model.pt",
    "device": "auto",
    "scales": [0.75, 1.0, 1.25],
    "flip": True,
    "input_long_side": None,
    "class_gate": None,
    "amp": True,
    "recursive": False,
}


class UsageError(Exception):
    """Bad input to the script as a whole; printed as one `error:` line."""


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
    gate = cfg["class_gate"]
    if gate is not None and (not isinstance(gate, (int, float)) or isinstance(gate, bool) or not 0 <= gate <= 1):
        fail("class_gate", "null or a number in [0, 1]")


def resolve_device(name: str) -> torch.device:
    """Under torchrun, auto / cuda mean this process's GPU (cuda:LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(f"unknown device {name!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name} requested but CUDA is not available")
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n): this process handles every n-th image starting at the i-th."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError as error:
        raise UsageError(f"--shard must look like i/n, got {text!r}") from error
    if not 0 <= index < count:
        raise UsageError(f"--shard {text}: need 0 <= i < n")
    return index, count


def process_shard(text: str) -> tuple[int, int]:
    """--shard i/n, split again among torchrun's processes (RANK r of WORLD_SIZE w): shard
    i + n*r of n*w, so the processes together still cover every image exactly once."""
    index, count = parse_shard(text)
    return (index + count * int(os.environ.get("RANK", 0)),
            count * int(os.environ.get("WORLD_SIZE", 1)))


# ----------------------------------------------------------------------------- images


def list_images(data_dir: Path, recursive: bool, ids_file: Path | None = None) -> list[tuple[str, Path]]:
    """(output name, image path) pairs, sorted by name.

    DATA_DIR is a folder of images, or a dataset folder holding JPEGImages/. The output name
    is the path below the image folder without its extension; an id list keeps only those.
    """
    image_dir = data_dir / "JPEGImages" if (data_dir / "JPEGImages").is_dir() else data_dir
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
    for image_id in ids_file.read_text().split():
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


TEMP_PREFIX = ".tmp."  # atomic_write's temporary files: hidden (the repo's done markers sweep them)


def atomic_write(path: str | os.PathLike, write_fn: Callable[[str], None]) -> Path:
    """Call ``write_fn(tmp_path)`` on a temporary file beside ``path`` (same suffix), then
    rename it onto ``path``: a reader never sees a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.stem}.", suffix=path.suffix,
                                         dir=path.parent)
    os.close(handle)
    try:
        write_fn(temp_name)
        os.chmod(temp_name, FILE_MODE)  # mkstemp creates 0600; give the usual permissions
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return path


def save_png(path: Path, mask: np.ndarray) -> None:
    atomic_write(path, lambda temp_name: Image.fromarray(mask).save(temp_name, format="PNG"))


# ----------------------------------------------------------------------------- prediction


def network_stride(model: nn.Module) -> int:
    """Input sides must be a multiple of this for the encoder/decoder shapes to line up."""
    return int(getattr(getattr(model, "encoder", None), "output_stride", 32))


def forward_padded(model: nn.Module, batch: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits, class logits or None) for any input size: zero-pad bottom/right to a
    multiple of stride, crop the logits back."""
    height, width = batch.shape[-2:]
    padded = F.pad(batch, (0, -width % stride, 0, -height % stride))
    logits, class_logits = split_outputs(model(padded))
    return logits[..., :height, :width], class_logits


def gate_classes(probabilities: torch.Tensor, class_probabilities: torch.Tensor,
                 threshold: float) -> torch.Tensor:
    """Zero the maps of the foreground classes the image-level head puts below
    ``threshold`` and renormalise: a class the image shows nowhere cannot win a pixel."""
    keep = torch.cat([class_probabilities.new_ones(1), (class_probabilities >= threshold).float()])
    gated = probabilities * keep[:, None, None]
    return gated / gated.sum(0, keepdim=True).clamp_min(1e-12)


@torch.inference_mode()
def predict_probabilities(
    model: nn.Module,
    image: torch.Tensor,
    scales: list[float],
    flip: bool,
    input_long_side: int | None = None,
    amp: bool = False,
    class_gate: float | None = None,
) -> torch.Tensor:
    """Class probabilities (K,H,W) at the image's size, averaged over scales (x flip).

    image: normalized (1,3,H,W). Each view is resized to (long side ->) input_long_side x
    scale, its logits upsampled bilinearly back to (H,W) before the softmax. With
    ``class_gate``, the model's class head (its sigmoids averaged over the views) removes
    the classes it rejects (``gate_classes``).
    """
    height, width = image.shape[-2:]
    stride = network_stride(model)
    base = 1.0 if input_long_side is None else input_long_side / max(height, width)
    total = class_total = None
    for scale in scales:
        size = (max(1, round(height * base * scale)), max(1, round(width * base * scale)))
        view = image
        if size != (height, width):
            view = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
        if flip:
            view = torch.cat([view, view.flip(-1)])
        with torch.autocast(device_type=image.device.type, enabled=amp):
            logits, class_logits = forward_padded(model, view, stride)
        if class_gate is not None:
            if class_logits is None:
                raise CheckpointError("class_gate needs a model with a class head (step 6 model.class_head)")
            class_probabilities = class_logits.float().sigmoid().sum(dim=0)
            class_total = class_probabilities if class_total is None else class_total.add_(class_probabilities)
        logits = logits.float()
        if flip:
            logits = torch.cat([logits[:1], logits[1:].flip(-1)])
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        probabilities = logits.softmax(dim=1).sum(dim=0)
        total = probabilities if total is None else total.add_(probabilities)
    views = len(scales) * (2 if flip else 1)
    if class_gate is not None:
        return gate_classes(total / views, class_total / views, class_gate)
    return total / views


def predict_mask(model: nn.Module, image: torch.Tensor, cfg: dict[str, Any], amp: bool) -> np.ndarray:
    """uint8 (H,W) class ids for one normalized image."""
    probabilities = predict_probabilities(
        model, image, cfg["scales"], cfg["flip"], cfg["input_long_side"], amp, cfg["class_gate"]
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
        save_png(save_dir / f"{name}.png", predict_mask(loaded.model, tensor, cfg, amp))
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
    if cfg["class_gate"] is not None and not loaded.model_config.get("class_head"):
        raise UsageError(f"class_gate: {weights} has no class head (train it with step 6 model.class_head: true)")

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
