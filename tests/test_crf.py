"""Step 3 CRF refinement: on a synthetic image whose true shapes are known, the two-CRF
procedure must recover them from blurred, shifted, noisy CAMs better than the CAMs do."""
import functools
import sys

import numpy as np
import pytest
from scipy import ndimage

from inference.irn_steps import ir_labels
from inference.irn_steps.ir_labels import UNSURE, cams_to_ir_label, process_image
from inference.irn_steps.ir_labels_step import DEFAULTS, crf_params
from model_training.common import step_io
from model_training.common.config import StepError, load_config
from model_training.common.crf import IRNET_PARAMS, crf_inference, crf_inference_many
from model_training.common.worker_pool import pool_context, run_pool

CLASS_IDS = (3, 5)  # deliberately not 1..K: labels must map back to the dataset's ids
STEP = load_config(None, [], DEFAULTS).ir_labels  # step 3's defaults: IRNet's thresholds and CRF
IRNET = {"conf_fg_thres": STEP.conf_fg_thres, "conf_bg_thres": STEP.conf_bg_thres,
         "crf_params": crf_params(STEP)}


def ir_label(image, keys, cams, **changes):
    """``cams_to_ir_label`` with step 3's defaults, except ``changes``."""
    return cams_to_ir_label(image, keys, cams, **{**IRNET, **changes})


def synthetic_scene(seed: int = 0, h: int = 48, w: int = 64):
    """A red rectangle (class 3) and a blue disc (class 5) on a background with a colour
    ramp, and CAMs that are shifted, blurred, noisy versions of the true masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    truth = np.zeros((h, w), np.uint8)
    truth[8:30, 6:26] = CLASS_IDS[0]
    truth[(yy - 28) ** 2 + (xx - 45) ** 2 <= 12**2] = CLASS_IDS[1]

    palette = {0: (90, 90, 90), CLASS_IDS[0]: (220, 40, 40), CLASS_IDS[1]: (40, 60, 220)}
    image = np.zeros((h, w, 3), np.float32)
    for class_id, colour in palette.items():
        image[truth == class_id] = colour
    ramp = np.linspace(-60, 60, w, dtype=np.float32)[:, None] * np.float32([1, 0.5, -0.5])
    image += np.where((truth == 0)[..., None], ramp[None], 0)
    image += rng.normal(0, 6, image.shape)
    image = np.clip(image, 0, 255).astype(np.uint8)

    cams = []
    for class_id, shift in zip(CLASS_IDS, ((3, 4), (-3, -2))):
        cam = ndimage.shift((truth == class_id).astype(np.float32), shift, order=0)
        cam = ndimage.gaussian_filter(cam, 4) + rng.normal(0, 0.08, (h, w))
        cam = np.clip(cam, 0, None)
        cams.append(cam / cam.max())
    return image, truth, np.stack(cams).astype(np.float32)


def thresholded_cams(cams, fg_thres=0.30, bg_thres=0.05):
    """The same fg / bg / unsure combination without the CRF: the baseline to beat."""
    class_ids = np.array((0,) + CLASS_IDS, np.uint8)
    best = cams.argmax(axis=0) + 1
    fg = class_ids[np.where(cams.max(axis=0) > fg_thres, best, 0)]
    bg = class_ids[np.where(cams.max(axis=0) > bg_thres, best, 0)]
    label = np.where(fg == 0, UNSURE, fg).astype(np.uint8)
    label[(fg == 0) & (bg == 0)] = 0
    return label


def confident_accuracy(label, truth):
    confident = label != UNSURE
    return (label[confident] == truth[confident]).mean()


def class_iou(label, truth, class_id):
    pred, true = label == class_id, truth == class_id
    return (pred & true).sum() / (pred | true).sum()


def fg_pixels(label):
    return int(((label != 0) & (label != UNSURE)).sum())


def test_crf_recovers_shapes_better_than_thresholded_cams():
    image, truth, cams = synthetic_scene()
    refined = ir_label(image, CLASS_IDS, cams)
    baseline = thresholded_cams(cams)

    assert confident_accuracy(refined, truth) > 0.97
    assert confident_accuracy(refined, truth) > confident_accuracy(baseline, truth) + 0.1
    for class_id in CLASS_IDS:
        assert class_iou(refined, truth, class_id) > 0.9
        assert class_iou(refined, truth, class_id) > class_iou(baseline, truth, class_id) + 0.1


def test_crf_inference_label_and_probability_inputs():
    image, truth, cams = synthetic_scene(seed=1)
    truth_index = np.searchsorted((0,) + CLASS_IDS, truth)
    scores = np.concatenate([np.full_like(cams[:1], 0.3), cams])  # background score 0.3
    noisy_labels = scores.argmax(axis=0)
    probs = np.exp(8 * scores) / np.exp(8 * scores).sum(axis=0)

    from_labels = crf_inference(image, noisy_labels, n_labels=3, **IRNET_PARAMS)
    from_probs = crf_inference(image, probs, n_labels=3, **IRNET_PARAMS)
    assert from_labels.shape == from_probs.shape == truth.shape
    raw_accuracy = (noisy_labels == truth_index).mean()
    assert (from_labels == truth_index).mean() > max(0.95, raw_accuracy + 0.05)
    assert (from_probs == truth_index).mean() > max(0.95, raw_accuracy + 0.05)


def test_output_holds_only_background_image_classes_and_unsure(monkeypatch):
    label_counts = []

    def recording_crf(image, inputs, n_labels, **params):
        label_counts.append((len(inputs), n_labels))
        return crf_inference_many(image, inputs, n_labels, **params)

    monkeypatch.setattr(ir_labels, "crf_inference_many", recording_crf)
    image, _, cams = synthetic_scene()
    label = ir_label(image, CLASS_IDS, cams)

    assert label.dtype == np.uint8 and label.shape == image.shape[:2]
    assert set(np.unique(label)) == {0, *CLASS_IDS, UNSURE}
    assert label_counts == [(2, len(CLASS_IDS) + 1)]  # fg and bg maps: background + 3 and 5 only


def test_one_crf_of_several_maps_gives_each_map_its_own_crf_result():
    """Step 3's two CRFs share the image's kernels: the labels must be those of two CRFs."""
    image, _, cams = synthetic_scene(seed=2)
    scores = np.concatenate([np.full_like(cams[:1], 0.3), cams])
    maps = [scores.argmax(axis=0), np.where(cams.max(axis=0) > 0.6, cams.argmax(axis=0) + 1, 0),
            np.exp(8 * scores) / np.exp(8 * scores).sum(axis=0)]
    together = crf_inference_many(image, maps, 3, **IRNET_PARAMS)
    for labels, one_map in zip(together, maps, strict=True):
        assert np.array_equal(labels, crf_inference(image, one_map, 3, **IRNET_PARAMS))
    assert not np.array_equal(together[0], together[1])  # the maps differ, and so do the results


def test_raising_fg_threshold_shrinks_confident_foreground():
    image, _, cams = synthetic_scene()
    coverage = [fg_pixels(ir_label(image, CLASS_IDS, cams, conf_fg_thres=t))
                for t in (0.1, 0.3, 0.6, 0.8)]
    assert coverage == sorted(coverage, reverse=True)
    assert coverage[-1] < coverage[1]


def test_raising_bg_threshold_grows_confident_background():
    image, _, cams = synthetic_scene()
    labels = [ir_label(image, CLASS_IDS, cams, conf_bg_thres=t)
              for t in (0.01, 0.05, 0.1, 0.2)]
    background = [int((label == 0).sum()) for label in labels]
    assert background == sorted(background)
    assert background[0] < background[-1]
    assert len({fg_pixels(label) for label in labels}) == 1  # the fg CRF does not move


def test_crf_params_are_passed_through():
    image, _, cams = synthetic_scene()
    default = ir_label(image, CLASS_IDS, cams)
    no_pairwise = {**IRNET_PARAMS, "t": 1, "gaussian": [3, 0], "bilateral": [50, 5, 0]}
    weak_pairwise = ir_label(image, CLASS_IDS, cams, crf_params=no_pairwise)
    # without pairwise terms the CRF keeps the thresholded CAMs' labels
    assert np.array_equal(weak_pairwise, thresholded_cams(cams))
    assert not np.array_equal(weak_pairwise, default)


def test_image_without_classes_is_background_and_bad_shapes_are_rejected():
    image, _, cams = synthetic_scene()
    empty = ir_label(image, [], np.zeros((0,) + image.shape[:2], np.float32))
    assert empty.dtype == np.uint8 and not empty.any()
    with pytest.raises(ValueError):
        ir_label(image, CLASS_IDS, cams[:, :-1])
    with pytest.raises(ValueError):
        ir_label(image, CLASS_IDS[:1], cams)


def write_synthetic_cams(cam_dir, ids):
    cam_dir.mkdir(exist_ok=True)
    for image_id in ids:
        cams = synthetic_scene(seed=int(image_id))[2]
        step_io.save_cams(cam_dir / f"{image_id}.npz", list(CLASS_IDS), cams[:, ::4, ::4], cams)


class SyntheticImages:
    """Picklable `load_image` for the pool: image i is synthetic_scene(seed=i)."""

    def __call__(self, image_id: str) -> np.ndarray:
        return synthetic_scene(seed=int(image_id))[0]


@pytest.mark.parametrize("num_workers", [1, 2])
def test_process_image_pool_writes_labels_and_skips_broken_images(tmp_path, capfd, num_workers):
    cam_dir, out_dir = tmp_path / "2_cams", tmp_path / "3_ir_labels"
    ids = ["0", "1", "2"]
    write_synthetic_cams(cam_dir, ids)

    worker = functools.partial(process_image, load_image=SyntheticImages(),
                               cam_dir=cam_dir, out_dir=out_dir, **IRNET)
    done, failed = run_pool(ids + ["7"], worker, num_workers=num_workers)  # 7 has no CAMs

    assert (done, failed) == (3, ["7"])
    assert "warning: 7:" in capfd.readouterr().err
    assert sorted(p.name for p in out_dir.iterdir()) == ["0.png", "1.png", "2.png"]
    for image_id in ids:
        image, _, cams = synthetic_scene(seed=int(image_id))
        cams = cams.astype(np.float16).astype(np.float32)  # as stored
        expected = ir_label(image, CLASS_IDS, cams)
        assert np.array_equal(step_io.load_png(out_dir / f"{image_id}.png"), expected)


@pytest.mark.parametrize("num_workers", [1, 2])
def test_pool_stops_at_first_failure_when_asked(tmp_path, num_workers):
    write_synthetic_cams(tmp_path, ["0", "1"])
    worker = functools.partial(process_image, load_image=SyntheticImages(),
                               cam_dir=tmp_path, out_dir=tmp_path, **IRNET)
    with pytest.raises(StepError, match=r"^7: .*\(on_error=stop\)$"):  # 7 has no CAMs: one line
        run_pool(["0", "7", "1"], worker, num_workers=num_workers, on_error="stop")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork is chosen on Linux only")
def test_the_pool_forks_on_linux_without_cuda():
    """Spawned workers import torch and the calling script again (seconds of step 3); a
    forked one starts at once. With a CUDA context the pool must spawn."""
    assert pool_context().get_start_method() == "fork"
