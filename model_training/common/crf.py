"""Dense-CRF inference (pydensecrf2): step 3's two CRFs per image and step 5's optional one."""
from collections.abc import Sequence

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_labels, unary_from_softmax

# IRNet's CRF: iterations, label confidence, (sxy, compat) and (sxy, srgb, compat) kernels
IRNET_PARAMS = {"t": 10, "gt_prob": 0.7, "gaussian": (3, 3), "bilateral": (50, 5, 10)}


def crf_inference(
    image: np.ndarray,
    probs_or_labels: np.ndarray,
    n_labels: int,
    *,
    t: int,
    gt_prob: float,
    gaussian: Sequence[float],
    bilateral: Sequence[float],
) -> np.ndarray:
    """Refine a label map (H,W ints in [0, n_labels)) or probabilities (n_labels,H,W)
    with a fully connected CRF on the RGB image; returns the (H,W) label indices.

    `gaussian` is (sxy, compat) of the smoothness kernel, `bilateral` (sxy, srgb, compat)
    of the appearance kernel (IRNet's: ``IRNET_PARAMS``). A label map is trusted with `gt_prob` everywhere (no "unsure" label),
    as IRNet does; `gt_prob` is unused for probabilities.
    """
    return crf_inference_many(image, [probs_or_labels], n_labels, t=t, gt_prob=gt_prob,
                              gaussian=gaussian, bilateral=bilateral)[0]


def crf_inference_many(
    image: np.ndarray,
    inputs: Sequence[np.ndarray],
    n_labels: int,
    *,
    t: int,
    gt_prob: float,
    gaussian: Sequence[float],
    bilateral: Sequence[float],
) -> list[np.ndarray]:
    """``crf_inference`` of several label maps (or probabilities) of one image: the kernels'
    lattices over its pixels and colours are built once, not once a map. Inference reads
    only the unary and the kernels, so each result is the one ``crf_inference`` gives."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 HxWx3, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    for probs_or_labels in inputs:
        if probs_or_labels.shape[-2:] != (h, w):
            raise ValueError(f"scores {probs_or_labels.shape} do not match image {image.shape}")
    if n_labels < 2:  # nothing to decide (and the label unary divides by n_labels - 1)
        return [np.zeros((h, w), np.int64) for _ in inputs]

    crf = dcrf.DenseCRF2D(w, h, n_labels)
    gauss_sxy, gauss_compat = gaussian
    crf.addPairwiseGaussian(sxy=gauss_sxy, compat=gauss_compat)
    bil_sxy, bil_srgb, bil_compat = bilateral
    crf.addPairwiseBilateral(
        sxy=bil_sxy, srgb=bil_srgb, rgbim=np.ascontiguousarray(image), compat=bil_compat
    )
    labels = []
    for probs_or_labels in inputs:
        if probs_or_labels.ndim == 2:
            unary = unary_from_labels(probs_or_labels, n_labels, gt_prob=gt_prob, zero_unsure=False)
        else:
            unary = unary_from_softmax(probs_or_labels)
        crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
        q = np.asarray(crf.inference(t), dtype=np.float32)
        labels.append(q.reshape(n_labels, h, w).argmax(axis=0))
    return labels
