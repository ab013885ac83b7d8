import importlib
import os
import re
from pathlib import Path

import pytest
import yaml

from model_training.common import config as config_module
from model_training.common.config import ConfigError, load_config
from model_training.common.step_cli import parse_step_args
from model_training.common.step_io import save_config

STEP_DEFAULTS = {"train": {"epochs": 5, "lr": 0.01, "scales": [1.0]}, "model": {"name": "resnet50"}}


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_base_file_overrides_and_types(tmp_path):
    write(tmp_path / "common.yaml", {"work_dir": "runs/a", "dataset": {"name": "toy"}})
    step = write(tmp_path / "step.yaml", {"_base_": "common.yaml", "train": {"epochs": 3}})
    cfg = load_config(step, ["train.lr=1", "work_dir=/tmp/x", "train.scales=[0.5,1.0]"],
                      STEP_DEFAULTS)
    assert cfg.train.epochs == 3
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.work_dir == "/tmp/x"
    assert cfg.train.scales == [0.5, 1.0]
    assert cfg.model.name == "resnet50"  # untouched default
    assert cfg.dataset.toy.num_train > 0  # common defaults are there


@pytest.mark.parametrize("override, needle", [
    ("train.epocs=2", "train.epocs"),
    ("train.epochs=two", "train.epochs"),
    ("overwrite=3", "overwrite"),
    ("model=3", "model"),
])
def test_bad_overrides_name_the_key(tmp_path, override, needle):
    step = write(tmp_path / "step.yaml", {})
    with pytest.raises(ConfigError, match=needle):
        load_config(step, [override], STEP_DEFAULTS)


def test_misspelt_key_in_file(tmp_path):
    step = write(tmp_path / "step.yaml", {"trian": {"epochs": 1}})
    with pytest.raises(ConfigError, match="'trian'.*step.yaml"):
        load_config(step, [], STEP_DEFAULTS)


def test_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", [], STEP_DEFAULTS)
    step = write(tmp_path / "step.yaml", {"dataset": {"name": "voc", "root": str(tmp_path / "no")}})
    with pytest.raises(ConfigError, match="dataset.root"):
        load_config(step, [], STEP_DEFAULTS)


def test_saved_config_reloads_identically(tmp_path):
    step = write(tmp_path / "step.yaml", {"train": {"epochs": 2}})
    cfg = load_config(step, ["seed=7"], STEP_DEFAULTS)
    saved = save_config(cfg, tmp_path / "out")
    assert load_config(saved, [], STEP_DEFAULTS) == cfg


def test_parse_step_args_exits_2(tmp_path, capsys):
    step = write(tmp_path / "step.yaml", {})
    with pytest.raises(SystemExit) as exit_info:
        parse_step_args(STEP_DEFAULTS, "test", ["--config", str(step), "train.nope=1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.nope" in err


def test_shard_flag_only_for_inference_steps(tmp_path, capsys):
    step = write(tmp_path / "step.yaml", {})
    argv = ["--config", str(step), "--shard", "1/2"]
    assert parse_step_args(STEP_DEFAULTS, "test", argv, shardable=True).shard == "1/2"
    with pytest.raises(SystemExit) as exit_info:
        parse_step_args(STEP_DEFAULTS, "test", argv)
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --shard" in capsys.readouterr().err


@pytest.mark.parametrize("step, script, section", [
    (1, "model_training.cam_generation.train_classifier", "model: backbone="),
    (2, "inference.irn_steps.multiscale_cam", "cams: split="),
    (3, "inference.irn_steps.crf_cam_processing", "ir_labels: split="),
    (4, "model_training.cam_generation.train_irn", "irn: split="),
    (5, "inference.irn_steps.irn_inference", "pseudo_masks: split="),
    (6, "model_training.segmentation.train_segmentation", "loss: class_weights="),
    (7, "inference.segmentation.predict", "predictions: split="),
])
def test_each_step_help_is_its_own(step, script, section, capsys):
    """What the step does, its own toy config as the example, its keys, --shard where it
    splits images."""
    from tests.conftest import REPO

    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert module.__doc__.splitlines()[0] in out
    example = re.search(r"e\.g\.\s+(\S+)", out)[1]
    assert example.startswith(f"configs/toy/{step}_") and (REPO / example).is_file()
    assert f"\n  {section}" in out
    assert ("--shard" in out) == (step in (2, 3, 5, 7))


@pytest.mark.parametrize("override, needle", [
    ("ir_labels.conf_fg_thress=0.3", "ir_labels.conf_fg_thress"),
    ("dataset.root=/no/such/folder", "dataset.root"),
    ("ir_labels.iterations=0", "key 'ir_labels.iterations' must be >= 1, got 0"),
])
def test_step_script_exits_2_with_one_line(tmp_path, override, needle):
    """A real entry point: a misspelt key or a missing dataset root, before any work starts."""
    import subprocess
    import sys

    from tests.conftest import REPO

    proc = subprocess.run(
        [sys.executable, str(REPO / "inference" / "irn_steps" / "crf_cam_processing.py"),
         "--config", str(REPO / "configs" / "camvid" / "3_ir_labels.yaml"), f"work_dir={tmp_path}",
         override], capture_output=True, text=True)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def step_defaults():
    """Two real steps' keys: the training section and step 3's thresholds (some take auto)."""
    from inference.irn_steps.cams_step import DEFAULTS as CAM_DEFAULTS
    from inference.irn_steps.ir_labels_step import DEFAULTS as CRF_DEFAULTS
    from model_training.common.config import merge_defaults
    from model_training.common.trainer import TRAIN_DEFAULTS

    return merge_defaults(TRAIN_DEFAULTS, CAM_DEFAULTS, CRF_DEFAULTS)


@pytest.mark.parametrize("override, message", [
    ("train.epochs=0", "key 'train.epochs' must be >= 1, got 0"),
    ("train.epochs=-1", "key 'train.epochs' must be >= 1, got -1"),
    ("train.batch_size=0", "key 'train.batch_size' must be >= 1, got 0"),
    ("num_workers=-1", "key 'num_workers' must be >= 0, got -1"),
    ("ir_labels.num_workers=-1", "key 'ir_labels.num_workers' must be >= 0, got -1"),
    ("train.lr=0", "key 'train.lr' must be > 0, got 0.0"),
    ("ir_labels.conf_fg_thres=1.5", "key 'ir_labels.conf_fg_thres' must be in [0, 1], got 1.5"),
    ("ir_labels.gt_prob=1", "key 'ir_labels.gt_prob' must be in (0, 1), got 1.0"),
    ("cams.scales=[1.0,-0.5]", "key 'cams.scales' must be > 0, got -0.5"),
    ("dataset.toy.num_train=0", "key 'dataset.toy.num_train' must be >= 1, got 0"),
])
def test_out_of_range_values_name_key_value_and_range(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override], step_defaults())
    assert str(err.value) == message


def test_range_checks_in_a_file_keep_bounds_and_auto(tmp_path):
    step = write(tmp_path / "step.yaml", {"train": {"epochs": 1}, "num_workers": 0,
                                          "ir_labels": {"conf_bg_thres": 0.0, "conf_fg_thres": "auto"}})
    cfg = load_config(step, [], step_defaults())
    assert cfg.train.epochs == 1 and cfg.num_workers == 0
    assert cfg.ir_labels.conf_bg_thres == 0.0 and cfg.ir_labels.conf_fg_thres == "auto"
    step = write(tmp_path / "step.yaml", {"train": {"batch_size": 0}})
    with pytest.raises(ConfigError, match=r"'train.batch_size' must be >= 1, got 0"):
        load_config(step, [], step_defaults())


def test_exponent_numbers_yaml_reads_as_text_are_numbers(tmp_path):
    """YAML 1.1 reads 1e-3 (no dot) as a string, in a file and on the command line alike."""
    step = tmp_path / "step.yaml"
    step.write_text("train:\n  lr: 1e-3\n  weight_decay: 5e-4\n")
    cfg = load_config(step, ["cams.scales=[1e0,2]"], step_defaults())
    assert cfg.train.lr == 0.001 and cfg.train.weight_decay == 0.0005
    assert cfg.cams.scales == [1.0, 2]
    assert load_config(None, ["train.lr=1e-3"], step_defaults()).train.lr == 0.001
    for text in ("1e-3x", "nan", "inf"):
        with pytest.raises(ConfigError, match=f"key 'train.lr' must be a number, got '{text}'"):
            load_config(None, [f"train.lr={text}"], step_defaults())


def test_unknown_dataset_name_comes_before_its_root():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["dataset.name=vox"], STEP_DEFAULTS)
    assert str(err.value) == "key 'dataset.name': unknown dataset 'vox' (known: toy, voc, lid)"


@pytest.mark.parametrize("work_dir", ["null", "''"])
def test_work_dir_must_be_set(work_dir):
    with pytest.raises(ConfigError, match="key 'work_dir' must be set"):
        load_config(None, [f"work_dir={work_dir}"], STEP_DEFAULTS)


def test_work_dir_that_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("")
    for work_dir in (tmp_path / "taken", tmp_path / "taken" / "run"):
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"work_dir={work_dir}"], STEP_DEFAULTS)
        assert str(err.value) == f"key 'work_dir': {tmp_path / 'taken'} is a file, not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any folder")
def test_work_dir_in_a_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"work_dir={locked / 'run'}"], STEP_DEFAULTS)
    finally:
        locked.chmod(0o700)
    assert str(err.value) == f"key 'work_dir': folder {locked} is not writable"


def test_work_dir_refused_by_the_system_whoever_runs(tmp_path, monkeypatch):
    """The same refusal where the test runs as root (as CI does), whom mode bits do not stop:
    the answer of os.access (a read-only mount answers no even to root) decides."""
    monkeypatch.setattr(config_module.os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"work_dir={tmp_path / 'run'}"], STEP_DEFAULTS)
    assert str(err.value) == f"key 'work_dir': folder {tmp_path} is not writable"


def _step_schema(step: int):
    from model_training.common.config import COMMON_DEFAULTS, merge_defaults
    from model_training.common.steps import STEPS

    return merge_defaults(COMMON_DEFAULTS, importlib.import_module(STEPS[step - 1].module).DEFAULTS)


def _null_keys(defaults, prefix=""):
    for key, value in defaults.items():
        if isinstance(value, dict) and value:
            yield from _null_keys(value, f"{prefix}{key}.")
        elif value is None:
            yield f"{prefix}{key}"


@pytest.mark.parametrize("step", range(1, 8))
def test_every_key_whose_default_is_null_declares_its_type(step):
    """Issue 30: null said nothing of the type, so any value passed."""
    schema = _step_schema(step)
    untyped = [key for key in _null_keys(schema) if key not in schema.types]
    assert not untyped and set(_null_keys(schema)), untyped


@pytest.mark.parametrize("step, override, message", [
    (1, "dataset.class_names=background,car,dog",  # was a 17-class dataset of single letters
     "key 'dataset.class_names' must be a list, got 'background,car,dog'"),
    (1, "dataset.class_names=[background]",
     "key 'dataset.class_names' must be a list of >= 2 items, got ['background']"),
    (2, "cams.scales=[]", "key 'cams.scales' must be a list of >= 1 items, got []"),
    (2, "cams.input_long_side=1.5", "key 'cams.input_long_side' must be an integer, got 1.5"),
    (3, "ir_labels.num_workers=two", "key 'ir_labels.num_workers' must be an integer, got 'two'"),
    (4, "irn.radius=1", "key 'irn.radius' must be >= 2, got 1"),
    (4, "data.resize_long=[320]", "key 'data.resize_long' must be a list of 2 items, got [320]"),
    (5, "pseudo_masks.radius=1", "key 'pseudo_masks.radius' must be >= 2, got 1"),
    (5, "pseudo_masks.exp_times=40", "key 'pseudo_masks.exp_times' must be in [0, 12], got 40"),
    (6, "export.scales=[]", "key 'export.scales' must be a list of >= 1 items, got []"),
    (6, "data.scale_range=[0.5]", "key 'data.scale_range' must be a list of 0 or 2 items, got [0.5]"),
    (6, "loss.class_weights=2", "key 'loss.class_weights' must be a list, got 2"),
    (6, "train.ema_decay=1", "key 'train.ema_decay' must be in [0, 1), got 1.0"),
])
def test_settings_are_typed_and_sized_by_what_the_code_needs(step, override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override], _step_schema(step))
    assert str(err.value) == message


@pytest.mark.parametrize("override, key, value", [
    ("work_dir=runs/exp #2", "work_dir", "runs/exp #2"),  # YAML cut it at the comment
    ("dataset.labels_file=2012", "dataset.labels_file", "2012"),  # was the number 2012
    ("predictions.split='007'", "predictions.split", "007"),
    ("predictions.split=null", "predictions.split", None),
    ("dataset.class_names=[bg, 'car #1']", "dataset.class_names", ["bg", "car #1"]),
])
def test_an_override_of_a_string_key_keeps_its_text(tmp_path, monkeypatch, override, key, value):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "2012").touch()
    node = load_config(None, [override], _step_schema(7))
    for part in key.split("."):
        node = node[part]
    assert node == value


def test_a_string_key_set_to_a_list_in_a_file_is_one_line(tmp_path):
    step = write(tmp_path / "step.yaml", {"model": {"init_from": ["a.pt"]}})
    with pytest.raises(ConfigError, match=r"^key 'model.init_from' must be a string, got \['a.pt'\]$"):
        load_config(step, [], _step_schema(1))


def test_a_dataset_root_that_reads_as_a_number_is_a_folder_name(tmp_path, monkeypatch):
    """Issue 30: dataset.root=2012 was Path(2012), a traceback."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="^key 'dataset.root': folder does not exist: 2012$"):
        load_config(None, ["dataset.name=voc", "dataset.root=2012"], _step_schema(1))
    (tmp_path / "2012").mkdir()
    assert load_config(None, ["dataset.name=voc", "dataset.root=2012"],
                       _step_schema(1)).dataset.root == "2012"
