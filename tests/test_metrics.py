"""mIoU from hand-made confusion matrices, including ignore pixels and absent classes; the
folder scores and evaluate.py, which refuse with one line what they could only score wrong."""
import errno
import json
import subprocess
import sys

import numpy as np
import pytest

from model_training.common.config import ConfigError
from model_training.common.evaluation import (evaluate_cam_folder, evaluate_label_folder,
                                              format_table, png_folder_loader)
from model_training.common.metrics import (ConfusionMatrix, average_precision,
                                           classification_metrics)
from model_training.common.step_io import save_cams, save_png
from tests.conftest import REPO


def test_known_confusion_matrix():
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 0, 2]])
    m = ConfusionMatrix(4)  # class 3 absent from both: NaN, not in the mean
    m.update(pred, gt)
    # class 0: tp 3, gt 4, pred 4 -> 3/5 ; class 1: tp 2, gt 3, pred 3 -> 2/4 ; class 2: never
    # in gt, predicted only on an ignored pixel -> absent from both after ignoring.
    iou = m.iou()
    assert iou[0] == pytest.approx(3 / 5)
    assert iou[1] == pytest.approx(2 / 4)
    assert np.isnan(iou[2]) and np.isnan(iou[3])
    assert m.miou() == pytest.approx((3 / 5 + 2 / 4) / 2)
    assert m.pixel_accuracy() == pytest.approx(5 / 7)


def test_class_predicted_but_absent_from_gt_counts_zero():
    gt = np.zeros((2, 2), np.uint8)
    pred = np.array([[0, 0], [0, 2]])
    m = ConfusionMatrix(3)
    m.update(pred, gt)
    assert m.iou()[2] == 0.0
    assert m.miou() == pytest.approx((3 / 4 + 0.0) / 2)


def test_out_of_range_prediction_is_wrong_not_a_crash():
    gt = np.array([[1, 1]])
    pred = np.array([[1, 200]])
    m = ConfusionMatrix(3)
    m.update(pred, gt)
    assert m.iou()[1] == pytest.approx(1 / 2)
    assert m.pixel_accuracy() == pytest.approx(1 / 2)


def test_label_folder_with_unsure_pixels(tmp_path):
    gt = np.array([[0, 1], [1, 1]], np.uint8)
    save_png(tmp_path / "pred" / "a.png", np.array([[0, 1], [255, 0]], np.uint8))
    save_png(tmp_path / "gt" / "a.png", gt)
    result = evaluate_label_folder(tmp_path / "pred", png_folder_loader(tmp_path / "gt"), 2,
                                   unsure_label=255)
    assert result["coverage"] == pytest.approx(75.0)
    # confident: (0,0) right, (0,1) right, (1,1) 1->0 wrong: class 0 iou 1/2, class 1 iou 1/2
    assert result["miou"] == pytest.approx(50.0)
    # of class 1's three ground-truth pixels one is unsure; class 0's one is labelled
    assert result["per_class_coverage"] == {"0": pytest.approx(100.0), "1": pytest.approx(200 / 3)}
    assert "labelled" in format_table(result).splitlines()[0]


def test_cam_threshold_sweep_finds_the_separating_threshold(tmp_path):
    gt = np.zeros((4, 4), np.uint8)
    gt[:2] = 3
    cams = np.zeros((1, 4, 4), np.float32)
    cams[0, :2] = 0.6
    cams[0, 2:] = 0.3  # background scores 0.3: thresholds in [0.3, 0.6) are perfect
    save_cams(tmp_path / "cams" / "a.npz", [3], cams[:, ::4, ::4], cams)
    save_png(tmp_path / "gt" / "a.png", gt)
    result = evaluate_cam_folder(tmp_path / "cams", png_folder_loader(tmp_path / "gt"), 4)
    assert result["miou"] == pytest.approx(100.0)
    assert 0.3 <= result["threshold"] < 0.6
    assert result["sweep"][0.1] < 100.0


def test_evaluate_cli(tmp_path):
    save_png(tmp_path / "pred" / "a.png", np.array([[0, 1]], np.uint8))
    save_png(tmp_path / "gt" / "a.png", np.array([[0, 0]], np.uint8))
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(REPO / "inference" / "evaluate.py"), "--pred",
                           str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
                           "--num-classes", "2", "--json", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["miou"] == pytest.approx(25.0)  # class 0: 1/2, class 1: 0
    missing = subprocess.run([sys.executable, str(REPO / "inference" / "evaluate.py"), "--pred",
                              str(tmp_path / "nope"), "--gt", str(tmp_path / "gt"),
                              "--num-classes", "2"], capture_output=True, text=True)
    assert missing.returncode == 2
    assert len(missing.stderr.strip().splitlines()) == 1 and "nope" in missing.stderr


def _evaluate_fails(capsys, *argv) -> str:
    """evaluate.py's one error line, after checking it exits 2 without a traceback."""
    from inference import evaluate

    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(list(argv))
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in stderr, stderr
    return err[0]


def test_evaluate_cli_scores_masks_beside_walked_maps_and_names_classes(tmp_path, capsys):
    """A step-5 folder with ``pseudo_masks.save_rw`` holds masks and .npz walks: the masks are scored."""
    from inference import evaluate

    save_png(tmp_path / "pred" / "a.png", np.array([[0, 1]], np.uint8))
    np.savez(tmp_path / "pred" / "a.npz", keys=np.array([0, 1]), rw=np.zeros((2, 1, 1)))
    save_png(tmp_path / "gt" / "a.png", np.array([[0, 1]], np.uint8))
    (tmp_path / "classes.txt").write_text("background\ncar\n")
    out = tmp_path / "r.json"
    assert evaluate.main(["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
                          "--num-classes", "2", "--class-names", str(tmp_path / "classes.txt"),
                          "--json", str(out)]) == 0
    assert json.loads(out.read_text())["miou"] == pytest.approx(100.0)
    assert "car" in capsys.readouterr().out
    assert "none.txt" in _evaluate_fails(capsys, "--pred", str(tmp_path / "pred"), "--gt",
                                         str(tmp_path / "gt"), "--num-classes", "2",
                                         "--class-names", str(tmp_path / "none.txt"))


def test_precision_and_recall_per_class():
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 0, 2]])
    m = ConfusionMatrix(4)
    m.update(pred, gt)
    # class 0: predicted on 4 counted pixels, 3 right; 4 gt pixels, 3 found
    # class 1: predicted 3, 2 right; 3 gt pixels, 2 found; classes 2, 3: neither
    np.testing.assert_allclose(m.precision()[:2], [3 / 4, 2 / 3])
    np.testing.assert_allclose(m.recall()[:2], [3 / 4, 2 / 3])
    assert np.isnan(m.precision()[2:]).all() and np.isnan(m.recall()[2:]).all()
    summary = m.summary(["bg", "a", "b", "c"])
    assert summary["per_class_precision"]["a"] == pytest.approx(100 * 2 / 3, abs=1e-3)
    assert summary["per_class_recall"]["c"] is None


def test_pixels_labelled_out_of_range_lower_recall_not_precision():
    m = ConfusionMatrix(3)
    m.update(np.array([[1, 200]]), np.array([[1, 1]]))
    assert m.precision()[1] == 1.0 and m.recall()[1] == pytest.approx(1 / 2)


def _folders(tmp_path, preds: dict, gts: dict) -> list[str]:
    """``--pred`` and ``--gt`` folders of the given masks, as evaluate.py arguments."""
    for folder, masks in (("pred", preds), ("gt", gts)):
        (tmp_path / folder).mkdir(exist_ok=True)
        for image_id, mask in masks.items():
            save_png(tmp_path / folder / f"{image_id}.png", np.asarray(mask, np.uint8))
    return ["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]


@pytest.mark.parametrize("pred,gt,where", [
    ([[0, 2]], [[0, 1]], "pred"),  # --num-classes below a predicted value
    ([[0, 1]], [[0, 5]], "gt"),    # ... or a ground-truth value: once left out silently
])
def test_values_that_are_no_class_are_an_error_naming_the_file(tmp_path, capsys, pred, gt, where):
    folders = _folders(tmp_path, {"a": pred}, {"a": gt})
    err = _evaluate_fails(capsys, *folders, "--num-classes", "2")
    assert str(tmp_path / where / "a.png") in err and "not classes 0..1" in err


def test_ignore_and_unsure_values_are_not_classes_but_allowed(tmp_path, capsys):
    from inference import evaluate

    folders = _folders(tmp_path, {"a": [[0, 1, 255, 7]]}, {"a": [[0, 1, 1, 255]]})
    assert evaluate.main([*folders, "--num-classes", "2", "--unsure", "7"]) == 0
    assert '"coverage": 75.0' in capsys.readouterr().out


def test_missing_predictions_are_an_error_unless_allowed_then_counted(tmp_path, capsys):
    from inference import evaluate

    gts = {image_id: [[0, 1]] for image_id in "abcde"}
    folders = _folders(tmp_path, {"b": [[0, 1]], "d": [[0, 1]]}, gts)
    err = _evaluate_fails(capsys, *folders, "--num-classes", "2")
    assert "3 images with ground truth have no .png prediction" in err and "(first: a)" in err
    assert "--allow-missing" in err
    assert evaluate.main([*folders, "--num-classes", "2", "--allow-missing"]) == 0
    out = capsys.readouterr().out
    assert "mIoU 100.00" in out and "images 2 | missing 3 | skipped 0" in out


def test_prediction_without_ground_truth_is_counted_skipped(tmp_path, capsys):
    from inference import evaluate

    folders = _folders(tmp_path, {"a": [[0, 1]], "extra": [[1, 1]]}, {"a": [[0, 1]]})
    assert evaluate.main([*folders, "--num-classes", "2"]) == 0
    assert "images 1 | missing 0 | skipped 1" in capsys.readouterr().out


def test_ids_file_scores_one_split_of_a_shared_ground_truth_folder(tmp_path, capsys):
    """VOC and camvid keep every split's masks in one folder: --ids names the scored one."""
    from inference import evaluate

    folders = _folders(tmp_path, {"v1": [[0, 1]]}, {"t1": [[1, 1]], "v1": [[0, 1]]})
    (tmp_path / "val.txt").write_text("v1\n")
    assert "(first: t1)" in _evaluate_fails(capsys, *folders, "--num-classes", "2")
    assert evaluate.main([*folders, "--num-classes", "2", "--ids", str(tmp_path / "val.txt")]) == 0
    assert "images 1 | missing 0 | skipped 0" in capsys.readouterr().out
    assert "--ids" in _evaluate_fails(capsys, *folders, "--num-classes", "2",
                                      "--ids", str(tmp_path / "none.txt"))


def test_wrong_size_prediction_is_an_error_with_both_sizes(tmp_path, capsys):
    folders = _folders(tmp_path, {"a": [[0, 1]], "b": [[0, 1, 1]]},
                       {"a": [[0, 1]], "b": [[0, 1]]})
    err = _evaluate_fails(capsys, *folders, "--num-classes", "2")
    assert str(tmp_path / "pred" / "b.png") in err and "(1, 3)" in err and "(1, 2)" in err


def test_unreadable_prediction_is_an_error_naming_it(tmp_path, capsys):
    folders = _folders(tmp_path, {"a": [[0, 1]]}, {"a": [[0, 1]]})
    (tmp_path / "pred" / "a.png").write_bytes(b"not a png")
    err = _evaluate_fails(capsys, *folders, "--num-classes", "2")
    assert f"cannot read {tmp_path / 'pred' / 'a.png'}" in err


@pytest.mark.parametrize("flags,message", [
    (["--num-classes", "0"], "--num-classes must be at least 2"),
    (["--num-classes", "1"], "--num-classes must be at least 2"),
    (["--num-classes", "-2"], "--num-classes must be at least 2"),
    (["--num-classes", "2", "--unsure", "1"], "--unsure must lie in 2..255"),
])
def test_class_counts_that_cannot_be_scored_are_one_line_errors(tmp_path, capsys, flags, message):
    folders = _folders(tmp_path, {"a": [[0, 0]]}, {"a": [[0, 0]]})
    assert message in _evaluate_fails(capsys, *folders, *flags)


def test_class_names_must_name_every_class(tmp_path, capsys):
    folders = _folders(tmp_path, {"a": [[0, 1]]}, {"a": [[0, 1]]})
    (tmp_path / "classes.txt").write_text("background\n")
    err = _evaluate_fails(capsys, *folders, "--num-classes", "2", "--class-names",
                          str(tmp_path / "classes.txt"))
    assert "names 1 classes" in err


def test_json_folder_is_created_and_a_folder_refused_before_scoring(tmp_path, capsys):
    from inference import evaluate

    folders = _folders(tmp_path, {"a": [[0, 1]]}, {"a": [[0, 1]]})
    out = tmp_path / "new" / "deeper" / "r.json"
    assert evaluate.main([*folders, "--num-classes", "2", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["images"] == 1
    capsys.readouterr()
    err = _evaluate_fails(capsys, *folders, "--num-classes", "2", "--json", str(tmp_path / "new"))
    assert "--json" in err and "is a folder" in err


def test_cam_folder_missing_file_and_foreign_keys(tmp_path):
    gt = np.zeros((4, 4), np.uint8)
    cams = np.ones((1, 4, 4), np.float32)
    for image_id in ("a", "b"):
        save_png(tmp_path / "gt" / f"{image_id}.png", gt)
    save_cams(tmp_path / "cams" / "a.npz", [1], cams[:, ::4, ::4], cams)
    load_gt = png_folder_loader(tmp_path / "gt")
    with pytest.raises(ConfigError, match=r"1 images with ground truth have no \.npz.*first: b"):
        evaluate_cam_folder(tmp_path / "cams", load_gt, 2, ["a", "b"])
    result = evaluate_cam_folder(tmp_path / "cams", load_gt, 2, ["a", "b"], allow_missing=True)
    assert (result["images"], result["missing"], result["skipped"]) == (1, 1, 0)
    save_cams(tmp_path / "cams" / "b.npz", [4], cams[:, ::4, ::4], cams)
    with pytest.raises(ConfigError, match=r"b\.npz \(keys\): values \[4\] are not classes 0\.\.1"):
        evaluate_cam_folder(tmp_path / "cams", load_gt, 2, ["a", "b"])


def test_report_scores_what_a_step_wrote_and_records_what_it_left_out(tmp_path):
    """Step 5 skipped a bad image: its stage is scored on the rest and says one is missing."""
    from inference.irn_steps import pseudo_masks_step
    from inference.scoring.report import score_stages
    from model_training.common.config import load_config
    from model_training.common.datasets import build_source

    cfg = load_config(REPO / "configs" / "toy" / "5_pseudo_masks.yaml",
                      [f"work_dir={tmp_path}", "dataset.toy.num_train=3", "dataset.toy.num_val=2",
                       "dataset.toy.image_size=[32,48]"], pseudo_masks_step.DEFAULTS)
    train, val = build_source(cfg.dataset, "train"), build_source(cfg.dataset, "val")
    for image_id in train.ids:  # every stage's output is the ground truth itself
        gt = train.load_mask(image_id)
        keys = [c for c in np.unique(gt).tolist() if c not in (0, 255)]
        cams = np.stack([(gt == k).astype(np.float32) for k in keys])
        save_cams(tmp_path / "2_cams" / f"{image_id}.npz", keys, cams[:, ::4, ::4], cams)
        save_png(tmp_path / "3_ir_labels" / f"{image_id}.png", gt)
        if image_id != train.ids[1]:
            save_png(tmp_path / "5_pseudo_masks" / f"{image_id}.png", gt)
    for image_id in val.ids:
        save_png(tmp_path / "7_predictions" / f"{image_id}.png", val.load_mask(image_id))
    stages = score_stages(cfg, "train", "val")
    pseudo = stages["pseudo_mask"]
    assert (pseudo["images"], pseudo["missing"], pseudo["miou"]) == (2, 1, pytest.approx(100.0))
    assert [(stages[k]["images"], stages[k]["missing"]) for k in ("cam", "ir_label", "segmentation")] \
        == [(3, 0), (3, 0), (2, 0)]
    assert "coverage" not in pseudo  # every pixel labelled: scored as before
    # a gt_bound/ an earlier run left is scored only when this run made it (issue 30)
    for image_id in val.ids:
        save_png(tmp_path / "gt_bound" / "7_predictions" / f"{image_id}.png", val.load_mask(image_id))
    assert "gt_bound" not in score_stages(cfg, "train", "val")
    assert score_stages(cfg, "train", "val", gt_bound=True)["gt_bound"]["miou"] == pytest.approx(100.0)

    # pseudo_masks.unsure_margin: 255 pixels are left out of the score, their share reported
    gt = train.load_mask(train.ids[0])
    gt[:8] = 255
    save_png(tmp_path / "5_pseudo_masks" / f"{train.ids[0]}.png", gt)
    pseudo = score_stages(cfg, "train", "val")["pseudo_mask"]
    assert pseudo["miou"] == pytest.approx(100.0) and 0 < pseudo["coverage"] < 100
    # per class: the classes under the unsure rows lose exactly those pixels
    masks = [train.load_mask(image_id) for image_id in train.ids if image_id != train.ids[1]]
    for c, name in enumerate(train.class_names):
        pixels = sum(int((m == c).sum()) for m in masks)
        lost = int((masks[0][:8] == c).sum())
        expected = None if pixels == 0 else pytest.approx(100.0 * (pixels - lost) / pixels)
        assert pseudo["per_class_coverage"][name] == expected


def test_report_scores_the_val_images_step_6_never_chose_on_apart(tmp_path):
    """Issue 32: step 6 keeps its best val epoch, so val both chose the model and scored it;
    with val.max_images the images after the first N are scored apart (``held_out``)."""
    from inference.irn_steps import pseudo_masks_step
    from inference.scoring.report import score_seeds, score_stages
    from model_training.common.config import load_config
    from model_training.common.datasets import build_source

    cfg = load_config(REPO / "configs" / "toy" / "5_pseudo_masks.yaml",
                      [f"work_dir={tmp_path}", "dataset.toy.num_train=2", "dataset.toy.num_val=4",
                       "dataset.toy.image_size=[32,48]"], pseudo_masks_step.DEFAULTS)
    val = build_source(cfg.dataset, "val")
    # seed 0 right on the first two val images and all background on the last two; its bound
    # right everywhere; seed 1 and its bound all background on the last two
    for folder, wrong_from in (("", 2), ("gt_bound", 4), ("seed_1", 2), ("seed_1/gt_bound", 2)):
        for i, image_id in enumerate(val.ids):
            mask = val.load_mask(image_id)
            save_png(tmp_path / folder / "7_predictions" / f"{image_id}.png",
                     mask if i < wrong_from else np.zeros_like(mask))

    def miou(folder, ids):
        return evaluate_label_folder(tmp_path / folder / "7_predictions", val.load_mask,
                                     val.num_classes, ids)["miou"]

    rest = val.ids[2:]
    stages = score_stages(cfg, "train", "val", gt_bound=True, chosen_on=2)
    held = stages["segmentation"]["held_out"]
    assert (held["first"], held["last"], held["images"]) == (3, 4, 2)
    assert held["miou"] == pytest.approx(miou("", rest)) and held["miou"] < stages["segmentation"]["miou"]
    assert stages["gt_bound"]["held_out"]["miou"] == pytest.approx(100.0)
    assert held["of_gt_bound"] == pytest.approx(held["miou"] / 100.0, abs=1e-4)
    assert stages["segmentation"]["miou"] == pytest.approx(miou("", val.ids))  # all of val as before
    for chosen_on in (0, 4, 9):  # step 6 chose on every val image: nothing held out
        assert "held_out" not in score_stages(cfg, "train", "val", chosen_on=chosen_on)["segmentation"]

    seeds = score_seeds(cfg, "val", [0, 1], stages, gt_bound=True, chosen_on=2)
    over = seeds["segmentation"]["held_out"]
    assert over["miou"] == {"0": held["miou"], "1": pytest.approx(miou("seed_1", rest))}
    assert over["mean"] == pytest.approx((over["miou"]["0"] + over["miou"]["1"]) / 2, abs=0.01)
    bound = seeds["gt_bound"]["held_out"]
    assert bound["miou"]["1"] == pytest.approx(miou("seed_1/gt_bound", rest))
    assert over["of_gt_bound"] == pytest.approx(over["mean"] / bound["mean"], abs=1e-4)


def test_json_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    from inference import evaluate

    folders = _folders(tmp_path, {"a": [[0, 1]]}, {"a": [[0, 1]]})
    (tmp_path / "file").write_text("")
    err = _evaluate_fails(capsys, *folders, "--num-classes", "2", "--json",
                          str(tmp_path / "file" / "r.json"))  # its folder would be a file
    assert "--json: cannot create folder" in err and "file" in err

    def full_disk(path, write_fn):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(evaluate, "atomic_write", full_disk)
    err = _evaluate_fails(capsys, *folders, "--num-classes", "2", "--json", str(tmp_path / "r.json"))
    assert "--json: cannot write" in err and "No space left" in err


def test_average_precision_matches_hand_computed_values():
    # Ranked hits 1,0,1,0: AP = (1/1 + 2/3) / 2.
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0])) == \
        pytest.approx((1 + 2 / 3) / 2)
    # A tie between a hit and a miss counts as one threshold: precision 1/2 at recall 1.
    assert average_precision(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(0.5)
    assert np.isnan(average_precision(np.array([0.3]), np.array([0])))
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    scores, hits = rng.random(50).round(1), rng.random(50) < 0.3
    assert average_precision(scores, hits) == pytest.approx(
        sklearn_metrics.average_precision_score(hits, scores))


def test_classification_metrics_skip_classes_without_positives():
    scores = np.array([[0.9, 0.2, 0.6], [0.1, 0.8, 0.4], [0.7, 0.3, 0.1]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0]], np.float32)
    metrics = classification_metrics(scores, targets, ["a", "b", "c"], threshold=0.5)
    assert metrics["map"] == 1.0 and set(metrics["ap"]) == {"a", "b"}
    # TP 3 (a twice, b once), FP 1 (c on image 0), FN 0.
    assert metrics["f1_micro"] == pytest.approx(6 / 7)
    assert metrics["f1_macro"] == 1.0
