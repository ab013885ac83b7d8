"""mIoU from hand-made confusion matrices, including ignore pixels and absent classes."""
import json
import subprocess
import sys

import numpy as np
import pytest

from inference.common.evaluation import evaluate_cam_folder, evaluate_label_folder, png_folder_loader
from inference.common.metrics import ConfusionMatrix
from inference.common.step_io import save_cams, save_png
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


def test_evaluate_cli_scores_masks_beside_walked_maps_and_names_classes(tmp_path, capsys):
    """A step-5 folder with ``pseudo.save_rw`` holds masks and .npz walks: the masks are scored."""
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
    assert evaluate.main(["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
                          "--num-classes", "2", "--class-names", str(tmp_path / "none.txt")]) == 2
    assert "none.txt" in capsys.readouterr().err


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
