"""Step 2 throughput: images/s of multiscale Grad-CAM++ for a ResNet-50 (output stride 16,
random weights, GAP + 1x1 head with 20 outputs) on 320x320 images, scales (1.0, 0.5, 1.5, 2.0)
+ flip, 3 classes per image:

* fast      - `multiscale_cams`, closed form: one forward pass per scale for all classes;
* autograd  - `multiscale_cams` on target layer ``backbone.layer4`` (the same tensor, named as
              a layer, so the hook path runs): one forward pass per scale, one backward pass
              per class through the layers after the hook (here only the head);
* pytorch_grad_cam - `GradCAMPlusPlus` on ``backbone.layer4``: per scale and class one call
              (forward + backward through the whole network) on the image and its mirror.

Each path runs whole units of work (images; (image, class) pairs for pytorch-grad-cam, whose
calls are independent per class) until its time budget is spent, at least one unit.
"""
import json
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from inference.irn_steps.cam import CAM_STRIDE, DEFAULT_SCALES, multiscale_cams
from model_training.common.models.classifier import build_cam_classifier

SIZE = 320
NUM_OUTPUTS = 20
CLASSES = [3, 8, 15]
METHOD = "gradcam++"
BUDGET_S = 10.0


def pytorch_grad_cam_one_class(cam: GradCAMPlusPlus, image: torch.Tensor,
                               output: int) -> tuple[np.ndarray, np.ndarray]:
    """The same multiscale + flip sums for one class, each scale's map from pytorch-grad-cam."""
    height, width = image.shape[1:]
    sizes = {"cam": (-(-width // CAM_STRIDE), -(-height // CAM_STRIDE)),
             "high_res": (width, height)}
    totals = {name: np.zeros(size[::-1], np.float32) for name, size in sizes.items()}
    for scale in DEFAULT_SCALES:
        size = (round(height * scale), round(width * scale))
        scaled = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)
        maps = cam(input_tensor=torch.cat([scaled, scaled.flip(-1)]),
                   targets=[ClassifierOutputTarget(output)] * 2)
        for name, size in sizes.items():  # cv2 sizes are (w, h)
            totals[name] += cv2.resize(maps[0] + maps[1][:, ::-1], size)
    return tuple(total / max(total.max(), 1e-12) for total in totals.values())


def rate(run_unit, units_per_image: int = 1) -> tuple[float, int]:
    """(images/s, units run) running `run_unit(i)` until BUDGET_S is spent."""
    start, done = time.perf_counter(), 0
    while done == 0 or time.perf_counter() - start < BUDGET_S:
        run_unit(done)
        done += 1
    return done / units_per_image / (time.perf_counter() - start), done


def main() -> None:
    torch.manual_seed(0)
    model = build_cam_classifier("resnet50", "none", 16, list(range(1, NUM_OUTPUTS + 1))).eval()
    images = [torch.randn(3, SIZE, SIZE, generator=torch.Generator().manual_seed(i))
              for i in range(8)]
    warm = torch.randn(3, 64, 64)
    for layer in (None, "backbone.layer4"):
        multiscale_cams(model, warm, CLASSES, METHOD, target_layer=layer)

    fast, fast_n = rate(lambda i: multiscale_cams(model, images[i % 8], CLASSES, METHOD))
    autograd, autograd_n = rate(lambda i: multiscale_cams(
        model, images[i % 8], CLASSES, METHOD, target_layer="backbone.layer4"))
    with GradCAMPlusPlus(model=model, target_layers=[model.backbone.layer4]) as cam:
        pgc, pgc_n = rate(lambda i: pytorch_grad_cam_one_class(
            cam, images[i // len(CLASSES) % 8], CLASSES[i % len(CLASSES)]), len(CLASSES))

    print(json.dumps({
        "benchmark": "cam",
        "results": {
            "setup": {"backbone": "resnet50 os16 (random weights)", "image": f"{SIZE}x{SIZE}",
                      "scales": list(DEFAULT_SCALES), "flip": True, "classes": len(CLASSES),
                      "method": METHOD, "threads": torch.get_num_threads()},
            "fast_images_per_s": round(fast, 4), "fast_images": fast_n,
            "autograd_images_per_s": round(autograd, 4), "autograd_images": autograd_n,
            "pytorch_grad_cam_images_per_s": round(pgc, 4),
            "pytorch_grad_cam_image_classes": pgc_n,
        },
        "ratios": {"fast_vs_autograd": round(fast / autograd, 2),
                   "fast_vs_pytorch_grad_cam": round(fast / pgc, 2)},
    }))


if __name__ == "__main__":
    main()
