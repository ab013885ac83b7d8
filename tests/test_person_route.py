""""No people allowed" from configs alone: a ``1_classifier_person.yaml`` beside the seven
step files makes run_pipeline train the binary person classifier after step 1, on the toy's
verified quarter, and step 2 merge its CAMs through ``cams.extra_classifiers``."""
import shutil

import numpy as np
import pytest
import yaml

import run_pipeline
from inference.scoring.report import build_report, format_report
from model_training.common.config import Config, ConfigError
from model_training.common.datasets import build_source
from model_training.common.step_io import load_cams
from tests.conftest import REPO

TINY = ["device=cpu", "num_workers=0", "dataset.toy.num_train=8", "dataset.toy.num_val=4",
        "dataset.toy.image_size=[48,64]", "train.epochs=1", "train.batch_size=4",
        "data.resize_long=[64,64]", "cams.scales=[1.0]", "cams.input_long_side=64"]
PERSON = """_base_: common.yaml
variant: person
dataset:
  toy:
    verified_only: true
data:
  target_classes: [person]
  resize_long: [128, 160]
"""


@pytest.fixture
def npa_configs(tmp_path):
    folder = tmp_path / "configs"
    shutil.copytree(REPO / "configs" / "toy", folder)
    main = yaml.safe_load((folder / "1_classifier.yaml").read_text())
    del main["loss"]  # no down-weighting: the person leaves the main classifier instead
    main["data"].update(exclude_classes=["person"], drop_images_with=["person"])
    (folder / "1_classifier.yaml").write_text(yaml.safe_dump(main))
    cam = yaml.safe_load((folder / "2_cams.yaml").read_text())
    cam["cams"]["extra_classifiers"] = ["person"]
    (folder / "2_cams.yaml").write_text(yaml.safe_dump(cam))
    (folder / "1_classifier_person.yaml").write_text(PERSON)
    return folder


def test_verified_quarter_has_complete_labels_of_the_same_images():
    full = build_source(Config(name="toy", toy={"num_train": 40}), "train")
    verified = build_source(Config(name="toy", toy={"num_train": 40, "verified_only": True}), "train")
    assert verified.ids == full.ids[::4]
    assert all(verified.labels(i) == full.true_labels(i) for i in verified.ids)
    assert any(full.labels(i) != full.true_labels(i) for i in full.ids)
    np.testing.assert_array_equal(verified.load_image(verified.ids[1]), full.load_image(full.ids[4]))


def test_extra_classifier_runs_after_step_1_and_step_2_merges_its_cams(npa_configs, tmp_path):
    work_dir = tmp_path / "run"
    steps = run_pipeline.load_step_configs(npa_configs, [f"work_dir={work_dir}", *TINY])
    assert [name for name, *_ in steps][:3] == ["1_classifier", "1_classifier_person", "2_cams"]
    seconds = run_pipeline.run_steps(steps[:3])
    person = steps[1][2]
    assert (work_dir / "1_classifier_person" / "best.pt").is_file()
    assert person.dataset.toy.verified_only and not steps[0][2].dataset.toy.verified_only
    keys = [load_cams(path)["keys"] for path in sorted((work_dir / "2_cams").glob("*.npz"))]
    assert any(1 in k for k in keys), "no image got the person classifier's CAM"  # 1: person
    report = build_report(steps[-1][2], {}, seconds)
    assert set(report["extra_classifiers"]) == {"person"}
    assert 0.0 <= report["extra_classifiers"]["person"]["val_map"] <= 1.0
    row = next(l for l in format_report(report).splitlines() if l.startswith("1_classifier_person"))
    assert "person classifier (val mAP x100)" in row


def test_extra_classifier_file_must_name_its_variant(npa_configs, tmp_path):
    (npa_configs / "1_classifier_person.yaml").write_text(PERSON.replace("variant: person", "variant: cat"))
    with pytest.raises(ConfigError, match="'variant'.*must be 'person'.*got 'cat'"):
        run_pipeline.load_step_configs(npa_configs, [f"work_dir={tmp_path}", *TINY])
