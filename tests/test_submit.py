"""Step 7 submission folder: standalone run, TTA maths, checkpoint format."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from inference.segmentation.submit import generate_predictions as gp

SUBMIT_DIR = Path(__file__).resolve().parents[1] / "inference" / "segmentation" / "submit"
MODEL_CONFIG = {
    "arch": "DeepLabV3Plus",
    "encoder_name": "tu-tf_efficientnet_lite0",
    "encoder_output_stride": 16,
    "num_classes": 4,
}
CLASS_NAMES = ["background", "circle", "square", "triangle"]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# (height, width) of the test images, odd sizes included.
IMAGE_SIZES = {"odd": (37, 53), "wide": (48, 80), "tall": (70, 41)}


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    return gp.build_model(MODEL_CONFIG).eval()


@pytest.fixture(scope="module")
def checkpoint_file(network, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    checkpoint = gp.make_checkpoint(network.state_dict(), MODEL_CONFIG, CLASS_NAMES, MEAN, STD)
    torch.save(checkpoint, path)
    return path


def write_images(folder: Path) -> dict[str, tuple[int, int]]:
    """A few random images of odd sizes and formats plus one corrupt file."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    suffixes = {"odd": ".jpg", "wide": ".png", "tall": ".bmp"}
    for name, (height, width) in IMAGE_SIZES.items():
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{name}{suffixes[name]}")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return IMAGE_SIZES


def isolated_env() -> dict[str, str]:
    """Environment for `python -S`: site-packages only, no .pth files (so no editable repo)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    site_dirs = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    env["PYTHONPATH"] = os.pathsep.join(site_dirs)
    env["OMP_NUM_THREADS"] = "1"  # tiny inputs: threads only add contention on a shared CPU
    return env


IMPORT_PROBE = """
for package in ("model_training", "inference"):
    try:
        __import__(package)
        print(package + ":importable")
    except ModuleNotFoundError:
        print(package + ":missing")
"""


def run_isolated(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-S", *args], cwd=cwd, env=isolated_env(),
        capture_output=True, text=True, timeout=300,
    )


def test_copied_folder_predicts_alone(checkpoint_file, tmp_path):
    folder = tmp_path / "submit"
    shutil.copytree(SUBMIT_DIR, folder, ignore=shutil.ignore_patterns("__pycache__", "*.pt"))
    shutil.copy(checkpoint_file, folder / "model.pt")
    sizes = write_images(tmp_path / "images")
    script = str(folder / "generate_predictions.py")

    # Nothing of the repository is importable in the environment the script runs in.
    probe = run_isolated(["-c", IMPORT_PROBE], cwd=tmp_path)
    assert probe.stdout.split() == ["model_training:missing", "inference:missing"], probe.stderr

    result = run_isolated([script, "out", "images"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "broken.jpg" in line]
    assert len(warnings) == 1 and warnings[0].lstrip().count("warning:") == 1, result.stderr

    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{name}.png" for name in sizes)
    network = gp.load_checkpoint(checkpoint_file).model
    shipped_cfg = gp.load_config(SUBMIT_DIR / "config.yaml")
    masks = {}
    for name, (height, width) in sizes.items():
        with Image.open(out / f"{name}.png") as png:
            assert png.mode == "L"
            masks[name] = np.array(png)
        assert masks[name].shape == (height, width)
        assert masks[name].max() < len(CLASS_NAMES)
    # Same prediction as the in-process TTA with the shipped config (thread counts may
    # reorder float sums, so allow a near-tie pixel or two).
    image = gp.image_to_tensor(gp.read_image(tmp_path / "images" / "odd.jpg"), MEAN, STD, "cpu")
    expected = gp.predict_mask(network, image, shipped_cfg, amp=False)
    assert (masks["odd"] == expected).mean() > 0.99

    # A re-run (in-process: isolation is shown above) rewrites nothing.
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert gp.main([str(out), str(tmp_path / "images"), "--weights", str(checkpoint_file)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_missing_inputs_fail_with_one_line(checkpoint_file, tmp_path, capsys):
    write_images(tmp_path / "images")
    cases = {
        "data folder not found": ["out", str(tmp_path / "nowhere"), "--weights", str(checkpoint_file)],
        "weights file not found": ["out", str(tmp_path / "images"), "--weights", str(tmp_path / "x.pt")],
        "no images": ["out", str(tmp_path), "--weights", str(checkpoint_file)],
    }
    for message, argv in cases.items():
        assert gp.main(argv) == 1
        stderr = capsys.readouterr().err.strip().splitlines()
        assert len(stderr) == 1 and stderr[0].startswith("error: ") and message in stderr[0]


def test_voc_folder_with_id_list_and_shard(checkpoint_file, tmp_path, capsys):
    """JPEGImages/ + an id list relative to DATA_DIR; shard 1/2 takes every other listed id.
    In a log (stderr not a terminal) no bar: just the line before and the line after."""
    dataset = tmp_path / "voc"
    write_images(dataset / "JPEGImages")
    (dataset / "ImageSets").mkdir()
    (dataset / "ImageSets" / "test.txt").write_text("odd\ntall\nwide\n")
    config = tmp_path / "fast.yaml"
    config.write_text("scales: [1.0]\nflip: false\n")
    argv = [str(tmp_path / "out"), str(dataset), "--weights", str(checkpoint_file),
            "--config", str(config), "--ids", "ImageSets/test.txt", "--shard", "1/2"]
    assert gp.main(argv) == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["tall.png"]
    err = capsys.readouterr().err
    assert "\r" not in err and len(err.splitlines()) == 2
    assert err.splitlines()[-1] == f"wrote 1 masks to {tmp_path / 'out'}; 0 image(s) failed"


def test_config_rejects_unknown_key(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("scales: [1.0]\nflip_horizontal: true\n")
    with pytest.raises(gp.UsageError, match="flip_horizontal"):
        gp.load_config(config)


def test_single_view_equals_plain_forward(network):
    image = torch.randn(1, 3, 64, 96)
    probabilities = gp.predict_probabilities(network, image, [1.0], flip=False, input_long_side=48)

    with torch.no_grad():
        resized = F.interpolate(image, size=(32, 48), mode="bilinear", align_corners=False, antialias=True)
        logits = F.interpolate(network(resized), size=(64, 96), mode="bilinear", align_corners=False)
    expected = logits.softmax(dim=1)[0]
    torch.testing.assert_close(probabilities, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(probabilities.argmax(0), expected.argmax(0))


def test_flip_tta_is_mirror_symmetric(network):
    image = torch.randn(1, 3, 48, 64)  # width a multiple of the stride: padding is symmetric too
    forward = gp.predict_probabilities(network, image, [1.0], flip=True)
    mirrored = gp.predict_probabilities(network, image.flip(-1), [1.0], flip=True)
    torch.testing.assert_close(forward, mirrored.flip(-1), rtol=1e-4, atol=1e-5)


def test_any_size_gives_a_distribution_at_that_size(network):
    image = torch.randn(1, 3, 37, 53)
    probabilities = gp.predict_probabilities(network, image, [0.75, 1.25], flip=True)
    assert probabilities.shape == (len(CLASS_NAMES), 37, 53)
    torch.testing.assert_close(probabilities.sum(0), torch.ones(37, 53))


def test_checkpoint_round_trip(network, checkpoint_file):
    loaded = gp.load_checkpoint(checkpoint_file)
    assert loaded.class_names == CLASS_NAMES and list(loaded.mean) == MEAN and list(loaded.std) == STD
    image = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(image), network(image))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"arch": "Unet"}, "encoder_output_stride"),
        ({"decoder_channels": 64}, "unknown key"),
        ({"num_classes": 5}, "class_names"),
        ({"encoder_name": "no_such_encoder"}, "no_such_encoder"),
    ],
)
def test_bad_checkpoint_metadata_is_a_clear_error(network, tmp_path, change, message):
    checkpoint = gp.make_checkpoint(network.state_dict(), MODEL_CONFIG, CLASS_NAMES, MEAN, STD)
    checkpoint["model_config"].update(change)
    path = tmp_path / "bad.pt"
    torch.save(checkpoint, path)
    with pytest.raises(gp.CheckpointError, match=message):
        gp.load_checkpoint(path)


@pytest.mark.parametrize("key, value, message", [
    ("model_config", ["DeepLabV3Plus"], "model_config must be a mapping, got list"),
    ("model_config", {**MODEL_CONFIG, "num_classes": "4"}, "num_classes must be an integer"),
    ("model_config", {**MODEL_CONFIG, "arch": None}, "model_config.arch must be a string"),
    ("class_names", "bcst", "class_names must be a list of strings"),  # 4 letters, 4 classes
    ("normalize", [0.5, 0.5, 0.5], "normalize must be a mapping"),
    ("normalize", {"mean": 0.5, "std": STD}, "normalize.mean must be a list of 3 numbers"),
    ("model", [1, 2], "weights do not match model_config"),
])
def test_wrongly_typed_checkpoint_metadata_is_one_line(network, tmp_path, capsys, key, value,
                                                      message):
    """Issue 30: these were tracebacks (or, for the class names, a silently wrong list)."""
    checkpoint = gp.make_checkpoint(network.state_dict(), MODEL_CONFIG, CLASS_NAMES, MEAN, STD)
    checkpoint[key] = value
    torch.save(checkpoint, tmp_path / "bad.pt")
    write_images(tmp_path / "images")
    assert gp.main([str(tmp_path / "out"), str(tmp_path / "images"),
                    "--weights", str(tmp_path / "bad.pt")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'bad.pt'}: ") and message in err[0]


@pytest.mark.parametrize("layout", ["plain", "voc"])
def test_save_dir_may_not_be_the_image_folder(checkpoint_file, tmp_path, capsys, layout):
    """Issue 30: SAVE_DIR = DATA_DIR found each .png image 'already done' (with --overwrite,
    replaced it by its mask)."""
    data_dir = tmp_path / "data"
    images = data_dir / "JPEGImages" if layout == "voc" else data_dir
    write_images(images)
    before = {path.name: path.read_bytes() for path in images.iterdir()}
    for extra in ([], ["--overwrite"]):
        assert gp.main([str(images), str(data_dir), "--weights", str(checkpoint_file), *extra]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is the image folder" in err[0] and "choose another folder" in err[0]
    assert {path.name: path.read_bytes() for path in images.iterdir()} == before


def test_a_save_dir_that_cannot_take_files_is_one_line(checkpoint_file, tmp_path, capsys,
                                                       monkeypatch):
    """Issue 30: a full or unwritable SAVE_DIR was a traceback."""
    write_images(tmp_path / "images")
    (tmp_path / "a_file").write_text("")
    assert gp.main([str(tmp_path / "a_file" / "out"), str(tmp_path / "images"),
                    "--weights", str(checkpoint_file)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot create SAVE_DIR")

    def full_disk(path, mask):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(gp, "save_png", full_disk)
    assert gp.main([str(tmp_path / "out"), str(tmp_path / "images"),
                    "--weights", str(checkpoint_file)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].endswith(".png: No space left on device: stopped")


def test_key_value_overrides_win_over_the_config_and_are_checked(tmp_path):
    args = gp.parse_args(["out", "data", "scales=[1.0, 1.5]", "flip=false",
                                 "input_long_side=64", "weights=w.pt"])
    cfg, weights = gp.read_settings(args)
    assert cfg["scales"] == [1.0, 1.5] and cfg["flip"] is False and cfg["input_long_side"] == 64
    assert weights == Path("w.pt")  # relative to the current folder, as typed
    for bad, message in (("flip=maybe", "flip must be true or false"),
                         ("scale=[1.0]", "override 'scale=[1.0]'"),
                         ("input_long_side=-3", "input_long_side must be")):
        with pytest.raises(gp.UsageError, match=re.escape(message)):
            gp.read_settings(gp.parse_args(["out", "data", bad]))
