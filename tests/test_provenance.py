"""Provenance: a step folder records what made it, and a run with other settings or inputs
stops with one line instead of skipping or mixing outputs."""
import fcntl
import importlib
import json
import os
import re

import pytest
import torch

from model_training.common.config import (COMMON_DEFAULTS, ConfigError, Schema, StepError,
                                          load_config, merge_defaults)
from model_training.common.folder_lock import LOCK_FILE, release
from model_training.common.provenance import (PROVENANCE_FILE, claim_folder, input_identity,
                                              output_settings, stale_reasons)
from model_training.common.steps import STEPS
from model_training.common.step_io import mark_done, read_done, remove_temp_files

DEFAULTS = Schema({"resume": False, "ir_labels": {"conf_fg_thres": 0.55, "num_workers": 1},
                   "train": {"epochs": 3}}, run_only={"resume", "ir_labels.num_workers"})


def _cfg(tmp_path, *overrides):
    return load_config(None, [f"work_dir={tmp_path}", *overrides], DEFAULTS)


def test_first_claim_records_settings_without_run_only_keys(tmp_path):
    folder = tmp_path / "3_ir_labels"
    claim_folder(folder, _cfg(tmp_path), {"cams": tmp_path / "2_cams"}, DEFAULTS)
    recipe = json.loads((folder / PROVENANCE_FILE).read_text())
    assert recipe["settings"]["ir_labels.conf_fg_thres"] == 0.55
    assert not {"work_dir", "device", "num_workers", "ir_labels.num_workers", "overwrite",
                "shard"} & set(recipe["settings"])
    assert recipe["inputs"] == {"cams": "missing"}
    assert (folder / "config.yaml").is_file()


def test_changed_setting_stops_with_one_line_and_keeps_the_folder(tmp_path):
    folder = tmp_path / "3_ir_labels"
    claim_folder(folder, _cfg(tmp_path), {}, DEFAULTS)
    mark_done(folder, {"written": 1})
    config_before = (folder / "config.yaml").read_text()
    with pytest.raises(ConfigError) as err:
        claim_folder(folder, _cfg(tmp_path, "ir_labels.conf_fg_thres=0.9"), {}, DEFAULTS)
    message = str(err.value)
    assert "\n" not in message
    assert "ir_labels.conf_fg_thres: 0.55 -> 0.9" in message
    assert "overwrite=true" in message and "work_dir" in message
    assert (folder / "config.yaml").read_text() == config_before
    assert read_done(folder) == {"written": 1}


def test_run_only_keys_do_not_count_and_an_unchanged_recipe_rewrites_nothing(tmp_path):
    folder = tmp_path / "3_ir_labels"
    claim_folder(folder, _cfg(tmp_path), {}, DEFAULTS)
    mark_done(folder, {"written": 1})
    (folder / "config.yaml").write_text("left alone\n")
    claim_folder(folder, _cfg(tmp_path, "num_workers=0", "ir_labels.num_workers=3", "device=cpu",
                              "on_error=stop"), {}, DEFAULTS)
    assert (folder / "config.yaml").read_text() == "left alone\n"
    assert read_done(folder) == {"written": 1}


def test_overwrite_records_the_new_recipe_and_forgets_the_old_finish(tmp_path):
    folder = tmp_path / "3_ir_labels"
    claim_folder(folder, _cfg(tmp_path), {}, DEFAULTS)
    mark_done(folder, {"written": 1})
    claim_folder(folder, _cfg(tmp_path, "ir_labels.conf_fg_thres=0.9", "overwrite=true"), {}, DEFAULTS)
    assert read_done(folder) is None
    assert json.loads((folder / PROVENANCE_FILE).read_text())["settings"]["ir_labels.conf_fg_thres"] == 0.9
    assert "conf_fg_thres: 0.9" in (folder / "config.yaml").read_text()


def test_a_changed_upstream_checkpoint_makes_the_next_step_stale(tmp_path):
    upstream, folder = tmp_path / "1_classifier", tmp_path / "2_cams"
    claim_folder(upstream, _cfg(tmp_path), {}, DEFAULTS)
    torch.save({"w": torch.zeros(2)}, upstream / "best.pt")
    assert input_identity(upstream) == "unfinished"
    mark_done(upstream, {})
    claim_folder(folder, _cfg(tmp_path), {"classifier": upstream}, DEFAULTS)
    (folder / "a.npz").touch()
    assert stale_reasons(folder, _cfg(tmp_path), {"classifier": upstream}, DEFAULTS) == []
    torch.save({"w": torch.ones(2)}, upstream / "best.pt")  # step 1 redone, same settings
    reasons = stale_reasons(folder, _cfg(tmp_path), {"classifier": upstream}, DEFAULTS)
    assert len(reasons) == 1 and reasons[0].startswith("input classifier: step ")


def test_a_key_added_to_the_code_since_counts_only_off_its_default(tmp_path):
    """A folder recorded before the step gained ``ir_labels.new_key`` stays finished while the key
    holds its default; set to another value, the key makes the folder stale."""
    folder = tmp_path / "3_ir_labels"
    claim_folder(folder, _cfg(tmp_path), {}, DEFAULTS)
    (folder / "a.png").touch()
    grown = {**DEFAULTS, "ir_labels": {**DEFAULTS["ir_labels"], "new_key": 0.5}}
    at_default = load_config(None, [f"work_dir={tmp_path}"], grown)
    assert stale_reasons(folder, at_default, {}, grown) == []
    changed = load_config(None, [f"work_dir={tmp_path}", "ir_labels.new_key=0.7"], grown)
    assert stale_reasons(folder, changed, {}, grown) == ["ir_labels.new_key: <unset> -> 0.7"]


def test_outputs_without_a_record_are_refused(tmp_path):
    folder = tmp_path / "5_pseudo_masks"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"made by an older version")
    with pytest.raises(ConfigError, match="no provenance.json"):
        claim_folder(folder, _cfg(tmp_path), {}, DEFAULTS)
    claim_folder(tmp_path / "empty", _cfg(tmp_path), {}, DEFAULTS)  # nothing there yet: fine



def test_a_claim_in_progress_is_not_an_output(tmp_path):
    """Every torchrun rank claims the folder as a training step starts: what another rank's
    claim has written so far (its config, its record, the temporary file of one) is not an
    output of an older version."""
    folder = tmp_path / "1_classifier"
    claim_folder(folder, _cfg(tmp_path), {}, DEFAULTS)
    (folder / PROVENANCE_FILE).rename(folder / f".tmp.{PROVENANCE_FILE}")
    claim_folder(folder, _cfg(tmp_path), {}, DEFAULTS)  # config.yaml and a temp file: fine
    (folder / "best.pt").write_bytes(b"")
    (folder / PROVENANCE_FILE).unlink()
    with pytest.raises(ConfigError, match="no provenance.json"):
        claim_folder(folder, _cfg(tmp_path), {}, DEFAULTS)

def test_a_recipe_that_wrote_nothing_binds_no_rerun(tmp_path):
    """Issue 30: a start that failed after its claim (e.g. on weights that do not fit) left a
    recipe that refused the corrected command as 'made by other settings'."""
    folder = tmp_path / "3_ir_labels"
    claim_folder(folder, _cfg(tmp_path, "ir_labels.conf_fg_thres=0.9"), {}, DEFAULTS)
    claim_folder(folder, _cfg(tmp_path), {}, DEFAULTS)
    assert json.loads((folder / PROVENANCE_FILE).read_text())["settings"]["ir_labels.conf_fg_thres"] == 0.55
    assert "conf_fg_thres: 0.55" in (folder / "config.yaml").read_text()


def _held_by_another_run(path, kind=fcntl.LOCK_EX) -> int:
    """A lock on ``path`` as another process holds it (flock: another open file is another
    holder, in this process too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(descriptor, kind | fcntl.LOCK_NB)
    return descriptor


def test_a_second_run_on_a_folder_in_use_is_refused_and_deletes_nothing(tmp_path):
    """Issue 30: nothing locked a step folder; a second run's end swept the first one's
    temporary files."""
    folder = tmp_path / "3_ir_labels"
    other = _held_by_another_run(folder / LOCK_FILE)
    in_flight = folder / ".tmp.a.x1y2z3.png"
    in_flight.write_bytes(b"being written")
    try:
        with pytest.raises(StepError, match=f"^{re.escape(str(folder))} is being written by "
                                            f"another run .*: wait for it to end, or use another "
                                            f"work_dir$"):
            claim_folder(folder, _cfg(tmp_path), {}, DEFAULTS)
    finally:
        os.close(other)
    assert in_flight.is_file() and not (folder / PROVENANCE_FILE).exists()
    claim_folder(folder, _cfg(tmp_path), {}, DEFAULTS)  # the other run has ended


def test_shards_share_a_folder_but_not_a_shard(tmp_path):
    folder = tmp_path / "2_cams"
    claim_folder(folder, _cfg(tmp_path, "shard=0/2"), {}, DEFAULTS)
    release(folder)  # shard 0 goes on in another process; this one becomes shard 1
    others = [_held_by_another_run(folder / LOCK_FILE, fcntl.LOCK_SH),
              _held_by_another_run(folder / f"{LOCK_FILE}.0-of-2")]
    try:
        claim_folder(folder, _cfg(tmp_path, "shard=1/2"), {}, DEFAULTS)
        release(folder)
        with pytest.raises(StepError, match="^shard 0/2 of .* is being written by another run"):
            claim_folder(folder, _cfg(tmp_path, "shard=0/2"), {}, DEFAULTS)
        with pytest.raises(StepError, match="is being written by another run"):
            claim_folder(folder, _cfg(tmp_path), {}, DEFAULTS)
        # shard 0 has written nothing yet, but its recipe binds a shard of other settings
        with pytest.raises(ConfigError, match="made by other settings"):
            claim_folder(folder, _cfg(tmp_path, "shard=1/2", "ir_labels.conf_fg_thres=0.9"), {},
                         DEFAULTS)
    finally:
        for descriptor in others:
            os.close(descriptor)


def test_resume_may_raise_the_epochs_but_not_change_other_settings(tmp_path):
    folder = tmp_path / "1_classifier"
    claim_folder(folder, _cfg(tmp_path), {}, DEFAULTS)
    (folder / "last.pt").touch()
    claim_folder(folder, _cfg(tmp_path, "resume=true", "train.epochs=6"), {}, DEFAULTS)
    assert json.loads((folder / PROVENANCE_FILE).read_text())["settings"]["train.epochs"] == 6
    with pytest.raises(ConfigError, match="ir_labels.conf_fg_thres"):
        claim_folder(folder, _cfg(tmp_path, "resume=true", "ir_labels.conf_fg_thres=0.1"), {}, DEFAULTS)


def test_finishing_a_step_removes_the_temp_files_of_killed_runs(tmp_path):
    (tmp_path / "round1").mkdir()
    leftovers = [tmp_path / ".tmp.a.k2j3h4g5.png", tmp_path / "round1" / ".tmp.best.x8d7s6a5.pt",
                 tmp_path / ".tmp.config.x1y2z3.yaml"]
    for path in leftovers:
        path.write_bytes(b"half")
    (tmp_path / "a.png").write_bytes(b"kept")
    mark_done(tmp_path, {})
    assert not any(path.exists() for path in leftovers)
    assert (tmp_path / "a.png").is_file() and remove_temp_files(tmp_path) == []


@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.folder)
def test_each_step_declares_the_run_only_keys_its_recipes_always_left_out(step):
    """Each schema names its own run-only keys; the recipes stay those of the central list the
    core held before (so folders made then are not taken as stale)."""
    before = {"work_dir", "device", "num_workers", "ir_labels.num_workers", "overwrite",
              "on_error", "shard", "resume", "val.batch_size"}
    defaults = merge_defaults(COMMON_DEFAULTS, importlib.import_module(step.module).DEFAULTS)
    keys = set(_dotted(defaults))
    assert defaults.run_only & keys == before & keys
    assert not set(output_settings(load_config(None, [], defaults), defaults)) & before


def _dotted(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict) and value:
            yield from _dotted(value, f"{prefix}{key}.")
        yield f"{prefix}{key}"
