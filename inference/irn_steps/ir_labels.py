"""Step 3 library: CAMs -> IRNet training labels (IRNet `cam_to_ir_label`).

Two dense CRFs on the original image: one on the CAMs cut at a high background score
(`conf_fg_thres`) finds confident foreground, one cut at a low score (`conf_bg_thres`)
finds confident background; whatever neither is sure of becomes 255 ("unsure"), which
IRNet's training ignores.
"""
import multiprocessing
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from model_training.common import step_io
from model_training.common.config import StepError
from model_training.common.crf import crf_inference
from model_training.common.metrics import IGNORE_INDEX
from model_training.common.progress import progress

UNSURE = IGNORE_INDEX  # IRNet learns nothing from these pixels


def _crf_labels(image, cams, background_score, crf_params) -> np.ndarray:
    """CRF-refined argmax of [background_score, cams...]; label indices 0..K.

    A tie with the background score goes to background, as argmax over the padded stack does.
    """
    labels = np.where(cams.max(axis=0) > background_score, cams.argmax(axis=0) + 1, 0)
    return crf_inference(image, labels, n_labels=len(cams) + 1, **crf_params)


def cams_to_ir_label(
    image: np.ndarray,
    keys: Iterable[int],
    high_res_cams: np.ndarray,
    conf_fg_thres: float,
    conf_bg_thres: float,
    crf_params: Mapping,
) -> np.ndarray:
    """uint8 HxW label: 0 confident background, class id confident foreground, 255 unsure.

    `keys` are the class ids of the (K,H,W) `high_res_cams` (image size, per-class max 1);
    only these classes and background are CRF labels, which keeps the CRF cheap.
    `crf_params` are keyword arguments of `crf_inference` (t, gt_prob, gaussian, bilateral).
    """
    class_ids = np.asarray(list(keys), dtype=np.int64)
    cams = np.asarray(high_res_cams, dtype=np.float32)
    if cams.ndim != 3 or len(cams) != len(class_ids) or cams.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"CAMs {cams.shape} do not match {len(class_ids)} keys and image {image.shape}"
        )
    if np.any((class_ids < 1) | (class_ids >= UNSURE)):
        raise ValueError(f"class ids must be in 1..{UNSURE - 1}, got {class_ids.tolist()}")
    if len(class_ids) == 0:  # both CRFs could only say background
        return np.zeros(image.shape[:2], np.uint8)

    label_to_class = np.concatenate([[0], class_ids]).astype(np.uint8)
    fg = label_to_class[_crf_labels(image, cams, conf_fg_thres, crf_params)]
    bg = label_to_class[_crf_labels(image, cams, conf_bg_thres, crf_params)]

    ir_label = np.where(fg == 0, UNSURE, fg).astype(np.uint8)
    ir_label[(fg == 0) & (bg == 0)] = 0
    return ir_label


def process_image(
    image_id: str,
    load_image: Callable[[str], np.ndarray],
    cam_dir: str | Path,
    out_dir: str | Path,
    conf_fg_thres: float,
    conf_bg_thres: float,
    crf_params: Mapping,
) -> None:
    """Read `<cam_dir>/<id>.npz` and the image, write `<out_dir>/<id>.png` atomically."""
    cams = step_io.load_cams(Path(cam_dir) / f"{image_id}.npz")
    ir_label = cams_to_ir_label(
        load_image(image_id), cams["keys"], cams["high_res"],
        conf_fg_thres, conf_bg_thres, crf_params,
    )
    step_io.save_png(Path(out_dir) / f"{image_id}.png", ir_label)


_worker_fn: Callable[[str], object] | None = None


def _init_worker(worker_fn: Callable[[str], object]) -> None:
    """Receive the per-image function once per process rather than with every task."""
    global _worker_fn
    _worker_fn = worker_fn


def _run_one(image_id: str) -> tuple[str, bool]:
    """(id, succeeded); the failure is reported here, where the exception is."""
    try:
        _worker_fn(image_id)
    except Exception as error:  # noqa: BLE001 - one bad image must not end the step
        step_io.stop_on_machine_error(image_id, error)
        step_io.report_failure(image_id, error)
        return image_id, False
    return image_id, True


def run_pool(
    ids: Iterable[str],
    worker_fn: Callable[[str], object],
    num_workers: int | None = None,
    desc: str = "ir labels",
    on_error: str = "skip",
) -> tuple[int, list[str]]:
    """Call `worker_fn(id)` for every id in `num_workers` processes; returns (done, failed ids)
    like `step_io.run_over_images`, which runs the in-process case (`num_workers` 0 or 1).

    `worker_fn` must pickle (a module-level function or a functools.partial of one):
    processes are spawned, so the pool is also safe after torch/CUDA are initialised.
    `num_workers` None = CPU count. A failing image is reported as one line
    `warning: <id>: <error>` and skipped; `on_error="stop"` ends the run at the first one,
    and so does a full disk or read-only folder (`step_io.stop_on_machine_error`).
    """
    ids = list(ids)
    if num_workers is None:
        num_workers = os.cpu_count() or 1
    num_workers = min(num_workers, len(ids))
    if num_workers <= 1:
        return step_io.run_over_images(ids, worker_fn, desc, on_error=on_error)

    chunksize = max(1, min(8, len(ids) // (4 * num_workers)))
    done, failed = 0, []
    context = multiprocessing.get_context("spawn")
    with context.Pool(num_workers, initializer=_init_worker, initargs=(worker_fn,)) as pool:
        results = pool.imap_unordered(_run_one, ids, chunksize=chunksize)
        for image_id, succeeded in progress(results, desc, total=len(ids), unit="img"):
            if succeeded:
                done += 1
                continue
            failed.append(image_id)
            if on_error == "stop":
                raise StepError(f"{image_id}: failed, see the warning above (on_error=stop)")
    return done, failed
