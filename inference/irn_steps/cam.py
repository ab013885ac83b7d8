"""Class activation maps for step 2: CAM, Grad-CAM and Grad-CAM++, one scale or many.

Two ways to get a class's map:

* the closed form for a GAP + bias-free linear head (``CamClassifier``):
  S_c = sum_k W_ck mean_ij A_k(ij), so dS_c/dA_k(ij) = W_ck / (hw) at every position and the
  maps of all classes follow from ONE forward pass, without autograd;
* the general autograd path: a forward hook on any named layer, one gradient per class.
  It serves any model and layer, and is the reference the closed form is tested against.

`class_maps` picks the closed form whenever the model and target layer allow it.

Conventions shared by both paths (A the target activation (C,h,w), g = dS_c/dA, n = hw):

  cam        n * sum_k g_k A_k     (HiResCAM; exactly W_c . A for a GAP-linear head)
  gradcam    sum_k (sum_ij g_k) A_k
  gradcam++  sum_k (sum_ij alpha_k relu(g_k)) A_k,
             alpha = g^2 / (2 g^2 + g^3 sum_ab A_k(ab))   (pytorch-grad-cam's form)
  layercam   n * sum_k relu(g_k) A_k   (Jiang et al. 2021: each position its own weight, so a
             shallow, finer layer keeps its detail; relu(W_c) . A for a GAP-linear head)

Grad-CAM sums the gradient where the paper averages it: the multi-scale sum adds maps of
feature maps of different sizes, and the mean would weigh a 2x scale 16 times less than a
0.5x one. For a GAP-linear head Grad-CAM then equals CAM. Grad-CAM++ is written as
alpha = 1 / (2 + g sum_ab A(ab)) for g > 0, which needs neither the seed's exp(S) (overflows
float32 past S ~ 29.6) nor an epsilon (pytorch-grad-cam's 1e-6 swamps g^2 when g is small).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("cam", "gradcam", "gradcam++", "layercam")
DEFAULT_SCALES = (1.0, 0.5, 1.5, 2.0)
NORMALIZATIONS = ("class", "global")
LABEL_MODES = ("gt", "pred", "union")
CAM_STRIDE = 4  # stride of the `cam` array, as IRNet's strided CAMs


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; expected one of {', '.join(METHODS)}")


# ----------------------------------------------------------------------------- fast path

def linear_head_weight(model: nn.Module) -> torch.Tensor | None:
    """The (K, C) weight of a bias-free 1x1-conv or linear ``model.classifier`` on
    ``model.features``, or None when the model has no such head. A model that names its CAM
    weight (``cam_weight``, e.g. ReCAM's product of two heads) is taken at its word."""
    if not callable(getattr(model, "features", None)):
        return None
    if callable(getattr(model, "cam_weight", None)):
        return model.cam_weight()
    head = getattr(model, "classifier", None)
    if isinstance(head, nn.Conv2d):
        plain_1x1 = (head.kernel_size == (1, 1) and head.groups == 1
                     and head.padding == (0, 0) and head.bias is None)
        return head.weight.flatten(1) if plain_1x1 else None
    if isinstance(head, nn.Linear) and head.bias is None:
        return head.weight
    return None


def uses_fast_path(model: nn.Module, target_layer: str | None = None) -> bool:
    """True when the closed form applies: a GAP + bias-free linear head, and the target layer
    is the features output (None, or the ``backbone`` whose output ``features`` returns)."""
    if linear_head_weight(model) is None:
        return False
    if target_layer is None:
        return True
    backbone = getattr(model, "backbone", None)
    return isinstance(backbone, nn.Module) and model.get_submodule(target_layer) is backbone


@torch.no_grad()
def fast_class_maps(model: nn.Module, images: torch.Tensor, output_indices: Sequence[int],
                    method: str = "cam") -> torch.Tensor:
    """Raw (pre-ReLU) maps (B, len(output_indices), h, w) of the chosen outputs, all from one
    forward pass of ``model.features``."""
    _check_method(method)
    weight = linear_head_weight(model)
    if weight is None:
        raise ValueError("the closed-form CAM needs model.features and a bias-free "
                         "1x1-conv or linear model.classifier")
    feats = model.features(images)
    weight = weight[list(output_indices)].to(feats.dtype)  # (n, C)
    if method == "layercam":
        return torch.einsum("kc,bchw->bkhw", weight.relu(), feats)
    if method != "gradcam++":  # cam and gradcam coincide: sum_ij W/(hw) * hw = W
        return torch.einsum("kc,bchw->bkhw", weight, feats)
    # sum_ij alpha relu(g) with g = W/(hw) and sum_ab A = hw mean(A): relu(W) / (2 + W mean(A))
    denom = 2 + weight[None] * feats.mean((2, 3))[:, None]  # (B, n, C)
    usable = (weight > 0) & (denom > 0)
    weights = torch.where(usable, weight / torch.where(usable, denom, 1), 0)
    return torch.einsum("bkc,bchw->bkhw", weights, feats)


# ------------------------------------------------------------------------- autograd path

def _target_module(model: nn.Module, target_layer: str | None) -> nn.Module:
    if target_layer is not None:
        return model.get_submodule(target_layer)
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise ValueError("name a target layer: the model has neither a GAP + bias-free linear "
                         "head nor a `backbone` module")
    return backbone


def _map_from_gradient(method: str, act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """One class's (B, h, w) map from the activation and dS/dA, both (B, C, h, w)."""
    if method in ("cam", "layercam"):
        grad = grad if method == "cam" else grad.relu()
        return (grad * act).sum(1) * (act.shape[2] * act.shape[3])
    if method == "gradcam":
        weights = grad.sum((2, 3), keepdim=True)
    else:  # alpha = g^2 / (2 g^2 + g^3 sum A) = 1 / (2 + g sum A) where relu(g) > 0
        denom = 2 + grad * act.sum((2, 3), keepdim=True)
        usable = (grad > 0) & (denom > 0)
        weights = torch.where(usable, grad / torch.where(usable, denom, 1), 0)
        weights = weights.sum((2, 3), keepdim=True)
    return (weights * act).sum(1)


def autograd_class_maps(model: nn.Module, images: torch.Tensor, output_indices: Sequence[int],
                        method: str = "cam", target_layer: str | None = None) -> torch.Tensor:
    """Raw maps (B, len(output_indices), h, w) at any layer ``model.get_submodule(target_layer)``
    (default ``model.backbone``): one forward pass, then one backward pass per output.

    The hook hands later layers a copy of the layer's output, so an in-place op downstream
    (ReLU(inplace=True)) cannot alter the saved activation, and cuts the graph there, so the
    backward passes only run through the layers after the target. The hook is removed
    before returning, also on error. Parameter ``.grad`` fields are left untouched.
    """
    _check_method(method)
    output_indices = list(output_indices)
    module = _target_module(model, target_layer)
    saved: list[torch.Tensor] = []

    def save_activation(_module, _inputs, output):
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            raise TypeError(f"target layer {target_layer!r} must output a (B,C,h,w) tensor")
        act = output.detach().requires_grad_(True)
        saved.append(act)
        return act.clone()

    handle = module.register_forward_hook(save_activation)
    try:
        with torch.enable_grad():
            logits = model(images)
    finally:
        handle.remove()
    if len(saved) != 1:
        raise RuntimeError(f"target layer {target_layer!r} ran {len(saved)} times in one "
                           "forward pass, expected once")
    act = saved[0]
    maps = []
    for i, k in enumerate(output_indices):
        (grad,) = torch.autograd.grad(logits[:, k].sum(), act,
                                      retain_graph=i < len(output_indices) - 1)
        maps.append(_map_from_gradient(method, act.detach(), grad))
    if not maps:
        return act.new_zeros((act.shape[0], 0, *act.shape[2:]))
    return torch.stack(maps, 1)


def class_maps(model: nn.Module, images: torch.Tensor, output_indices: Sequence[int],
               method: str = "cam", target_layer: str | None = None) -> torch.Tensor:
    """Raw maps (B, n, h, w): the closed form when `uses_fast_path`, else autograd."""
    if uses_fast_path(model, target_layer):
        return fast_class_maps(model, images, output_indices, method)
    if getattr(model, "recam_head", None) is not None:
        raise ValueError("a ReCAM classifier's maps come from its features (cams.target_layer: "
                         "null): its CAM weight is no gradient autograd could follow")
    return autograd_class_maps(model, images, output_indices, method, target_layer)


# ---------------------------------------------------------------------------- multiscale

class MultiscaleCams(NamedTuple):
    cam: np.ndarray  # (n, ceil(H/4), ceil(W/4)) float32, stride 4
    high_res: np.ndarray  # (n, H, W) float32, image size


def _normalize(maps: torch.Tensor, mode: str) -> torch.Tensor:
    """Divide by the per-class max ("class") or the max over all classes ("global", the
    seed's); all-zero maps stay zero."""
    if maps.numel() == 0:
        return maps
    peak = maps.amax((1, 2), keepdim=True) if mode == "class" else maps.amax()
    return maps / torch.where(peak > 0, peak, 1)


def multiscale_cams(model: nn.Module, image: torch.Tensor, output_indices: Sequence[int],
                    method: str = "cam", scales: Sequence[float] = DEFAULT_SCALES,
                    flip: bool = True, target_layer: str | None = None,
                    normalize: str = "class") -> MultiscaleCams:
    """IRNet-style CAMs of one normalised (3, H, W) image for the given classifier outputs.

    At each scale the image and its mirror go through the model as one batch; the ReLU'd
    maps (mirror flipped back) are resized bilinearly to stride 4 (ceil(H/4), ceil(W/4)) and to
    (H, W), summed over scales and flips, and normalised (`normalize`: "class" or "global").
    The model must be in eval mode (the batch holds an image and its mirror).
    """
    _check_method(method)
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalisation {normalize!r}; "
                         f"expected one of {', '.join(NORMALIZATIONS)}")
    if model.training:
        raise ValueError("CAMs need the model in eval mode (call model.eval())")
    if image.dim() != 3 or not image.is_floating_point():
        raise ValueError(f"expected a normalised float (3,H,W) image, "
                         f"got {image.dtype} {tuple(image.shape)}")
    output_indices = list(output_indices)
    height, width = image.shape[1:]
    strided = (math.ceil(height / CAM_STRIDE), math.ceil(width / CAM_STRIDE))
    device = next(model.parameters()).device
    image = image.to(device)
    cam = torch.zeros((len(output_indices), *strided), device=device)
    high_res = torch.zeros((len(output_indices), height, width), device=device)
    if not output_indices:
        return MultiscaleCams(cam.cpu().numpy(), high_res.cpu().numpy())
    for scale in scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        batch = image[None] if size == (height, width) else F.interpolate(
            image[None], size=size, mode="bilinear", align_corners=False)
        if flip:
            batch = torch.cat([batch, batch.flip(-1)])
        maps = class_maps(model, batch, output_indices, method, target_layer).float().relu()
        maps = (maps[:1] + maps[1:].flip(-1)) if flip else maps
        for total, out_size in ((cam, strided), (high_res, (height, width))):
            total += F.interpolate(maps, size=out_size, mode="bilinear", align_corners=False)[0]
    return MultiscaleCams(_normalize(cam, normalize).cpu().numpy(),
                          _normalize(high_res, normalize).cpu().numpy())


def geometric_mean(coarse: MultiscaleCams, fine: MultiscaleCams,
                   normalize: str = "class") -> MultiscaleCams:
    """sqrt(coarse * fine) of two normalised map sets of the same classes, normalised again:
    high only where both are, so a finer layer's detail trims the coarse map's blobs (step 2's
    ``cams.fine_layer``)."""
    return MultiscaleCams(*(_normalize(torch.from_numpy(np.sqrt(a * b)), normalize).numpy()
                            for a, b in zip(coarse, fine)))


# ------------------------------------------------------------------- labels and merging

def predicted_outputs(logits: torch.Tensor | np.ndarray, threshold: float = 0.5) -> list[int]:
    """Outputs whose sigmoid probability reaches `threshold`; the top-1 output when none does
    (an image is assumed to show at least one class)."""
    probs = torch.as_tensor(logits).detach().float().flatten().sigmoid()
    chosen = torch.nonzero(probs >= threshold).flatten().tolist()
    return chosen or [int(probs.argmax())]


def select_outputs(mode: str, labels: Sequence[int], class_ids: Sequence[int],
                   logits: torch.Tensor | np.ndarray | None = None,
                   threshold: float = 0.5) -> list[int]:
    """Classifier outputs to extract CAMs for, in ascending class-id order.

    mode "gt": the image's labels (class ids); "pred": `predicted_outputs(logits)`; "union":
    both. Labels of classes the classifier lacks (excluded classes, served by `merge_cams`)
    are skipped, so "gt" may return an empty list.
    """
    if mode not in LABEL_MODES:
        raise ValueError(f"unknown label mode {mode!r}; expected one of {', '.join(LABEL_MODES)}")
    output_of = {class_id: i for i, class_id in enumerate(class_ids)}
    chosen = {output_of[c] for c in labels if c in output_of} if mode != "pred" else set()
    if mode != "gt":
        if logits is None:
            raise ValueError(f"label mode {mode!r} needs the classifier's logits")
        if torch.as_tensor(logits).numel() != len(class_ids):
            raise ValueError(f"{torch.as_tensor(logits).numel()} logits for "
                             f"{len(class_ids)} class ids")
        chosen.update(predicted_outputs(logits, threshold))
    return sorted(chosen, key=lambda i: class_ids[i])


def merge_cams(main: dict[str, np.ndarray], extra: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Add the classes of `extra` (e.g. the excluded class's binary classifier) to `main`.

    Both hold ``keys`` (n,), ``cam`` (n,h,w) and ``high_res`` (n,H,W), as `step_io.load_cams`
    returns; the result has the same layout with keys ascending.
    """
    main_keys, extra_keys = (np.asarray(d["keys"], dtype=np.int64).reshape(-1)
                             for d in (main, extra))
    keys = np.concatenate([main_keys, extra_keys])
    if np.unique(keys).size != keys.size:
        shared = sorted(set(main_keys.tolist()) & set(extra_keys.tolist()))
        raise ValueError(f"class ids {shared} are in both CAM sets")
    order = np.argsort(keys, kind="stable")
    merged = {"keys": keys[order]}
    for name in ("cam", "high_res"):
        if main[name].shape[1:] != extra[name].shape[1:]:
            raise ValueError(f"{name} sizes differ: "
                             f"{main[name].shape[1:]} vs {extra[name].shape[1:]}")
        merged[name] = np.concatenate([main[name], extra[name]])[order]
    return merged
