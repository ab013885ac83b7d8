"""Step 3 throughput: images/s of the IR-label worker (two dense CRFs + npz/png I/O) with
1 and with 2 worker processes, on 240x180 and 500x375 synthetic images with 2-3 classes.

Pool start-up (forked workers on Linux, spawned elsewhere) is included: it is what a step run pays.
"""
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from inference.irn_steps.ir_labels import process_image
from model_training.common import step_io
from model_training.common.auto_thresholds import IRNET_VALUES
from model_training.common.crf import IRNET_PARAMS
from model_training.common.worker_pool import run_pool

SIZES = {"240x180": (180, 240, 32), "500x375": (375, 500, 16)}  # h, w, number of images


class SyntheticPhotos:
    """Picklable `load_image`: a smooth background with 2-3 coloured ellipses and sensor
    noise (CRF cost grows with colour entropy, so uniform noise images would mislead)."""

    def __init__(self, h: int, w: int):
        self.h, self.w = h, w

    def scene(self, image_id: str):
        h, w = self.h, self.w
        rng = np.random.default_rng(int(image_id))
        yy, xx = np.mgrid[:h, :w].astype(np.float32)
        image = (rng.uniform(60, 200, 3) + rng.uniform(-40, 40, 3) * (xx / w)[..., None]
                 + rng.uniform(-40, 40, 3) * (yy / h)[..., None])
        masks = []
        for _ in range(rng.integers(2, 4)):
            cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
            ry, rx = rng.uniform(0.1, 0.3) * h, rng.uniform(0.1, 0.3) * w
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            image[mask] = rng.uniform(0, 255, 3)
            masks.append(mask)
        image += rng.normal(0, 6, image.shape)
        return np.clip(image, 0, 255).astype(np.uint8), masks

    def __call__(self, image_id: str) -> np.ndarray:
        return self.scene(image_id)[0]


def write_cams(photos: SyntheticPhotos, ids, cam_dir: Path) -> None:
    for image_id in ids:
        masks = photos.scene(image_id)[1]
        rng = np.random.default_rng(int(image_id))
        cams = []
        for mask in masks:
            cam = ndimage.gaussian_filter(mask.astype(np.float32), photos.w / 40)
            cam = np.clip(cam + rng.normal(0, 0.05, cam.shape), 0, None)
            cams.append(cam / cam.max())
        cams = np.stack(cams).astype(np.float32)
        class_ids = list(range(1, len(cams) + 1))
        step_io.save_cams(cam_dir / f"{image_id}.npz", class_ids, cams[:, ::4, ::4], cams)


def images_per_second(photos, ids, cam_dir, out_dir, num_workers) -> float:
    for png in out_dir.glob("*.png"):
        png.unlink()
    worker = functools.partial(process_image, load_image=photos, cam_dir=cam_dir, out_dir=out_dir,
                               conf_fg_thres=IRNET_VALUES["conf_fg_thres"],
                               conf_bg_thres=IRNET_VALUES["conf_bg_thres"], crf_params=IRNET_PARAMS)
    start = time.perf_counter()
    done, failed = run_pool(ids, worker, num_workers=num_workers, desc=f"{num_workers} workers")
    seconds = time.perf_counter() - start
    if failed or done != len(ids):
        sys.exit(f"error: {failed} of {len(ids)} images failed")
    return done / seconds


def main() -> None:
    results, ratios = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for size, (h, w, count) in SIZES.items():
            photos = SyntheticPhotos(h, w)
            ids = [str(i) for i in range(count)]
            cam_dir, out_dir = Path(tmp, size, "cams"), Path(tmp, size, "labels")
            cam_dir.mkdir(parents=True)
            out_dir.mkdir()
            write_cams(photos, ids, cam_dir)
            for num_workers in (1, 2):
                rate = images_per_second(photos, ids, cam_dir, out_dir, num_workers)
                results[f"{size}_workers{num_workers}_images_per_s"] = round(rate, 3)
            ratios[f"{size}_workers2_vs_1"] = round(
                results[f"{size}_workers2_images_per_s"] / results[f"{size}_workers1_images_per_s"], 3)
    ratios["workers2_vs_1"] = ratios["500x375_workers2_vs_1"]
    results["cpu_count"] = os.cpu_count()
    print(json.dumps({"benchmark": "crf", "results": results, "ratios": ratios}))


if __name__ == "__main__":
    main()
