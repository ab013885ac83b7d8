"""Step 5 library: spread the CAMs inside IRNet's class boundaries by a random walk.

IRNet's walk: affinities a_ij = 1 - max boundary between i and j (pairs within `radius`,
plus a_ii = 1), A = a^beta, T = A with every column divided by its sum, and
rw = x T^(2^exp_times) for the CAMs x damped by (1 - boundary). IRNet forms T as a dense
(hw)^2 matrix and squares it exp_times times (1.35 GB at 128x128, O((hw)^3) time).

Here the same product is 2^exp_times sparse steps. Since A is symmetric,
(x T^s)^T = M^s x^T with M = D^-1 A (D = row sums of A): each step averages a pixel's
neighbours, a CSR matrix with ~2 * #directions + 1 non-zeros a row (69 at radius 5).
"""
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from model_training.common.path_index import PathIndex, edge_to_affinity


def _neighbourhood(boundary: torch.Tensor, path_index: PathIndex, beta: float):
    """Every pixel's full neighbourhood, pixel-major: (steps (N,), weights (n, N), valid (n, N)).

    N = 2 D + 1 entries: the pairs a pixel starts (forward offsets), the pairs it ends (the
    same affinities read from the far end, at the negated offsets) and itself (weight 1).
    Entries are sorted by their flat step dy * w + dx, so each CSR row comes out sorted.
    """
    h, w = boundary.shape
    r = path_index.reach
    forward = edge_to_affinity(boundary[None], path_index)[0].pow_(beta)  # (D, h, w)
    forward_valid = path_index.valid_pairs((h, w), boundary.device)
    padded = F.pad(forward, (r, r, r, 0))  # room to read (y, x) - offset on top/left/right
    padded_valid = F.pad(forward_valid, (r, r, r, 0))
    entries = [(0, 0, torch.ones_like(forward[0]), torch.ones_like(forward_valid[0]))]
    for d, (dy, dx) in enumerate(path_index.offsets.tolist()):
        entries.append((dy, dx, forward[d], forward_valid[d]))
        window = (d, slice(r - dy, r - dy + h), slice(r - dx, r - dx + w))
        entries.append((-dy, -dx, padded[window], padded_valid[window]))
    entries.sort(key=lambda entry: entry[0] * w + entry[1])

    weights = forward.new_empty(h * w, len(entries))
    valid = forward_valid.new_empty(h * w, len(entries))
    for k, (_, _, weight, is_valid) in enumerate(entries):
        weights[:, k] = weight.reshape(-1)
        valid[:, k] = is_valid.reshape(-1)
    steps = [dy * w + dx for dy, dx, _, _ in entries]
    return steps, weights, valid


def transition_matrix(boundary: torch.Tensor, path_index: PathIndex, beta: float):
    """Sparse CSR (hw, hw) M = D^-1 A for an (h, w) boundary map; rows sum to 1.

    A holds affinity^beta for both directions of every pair and 1 on the diagonal. Built
    straight in CSR from the neighbourhood layout (no (hw)^2 array, no COO sort), int32
    indices: ~8 bytes a non-zero.
    """
    n = boundary.numel()
    device = boundary.device
    steps, weights, valid = _neighbourhood(boundary.float(), path_index, beta)
    weights /= weights.sum(dim=1, keepdim=True)  # row-normalise: D^-1 A
    values = weights.masked_select(valid)
    del weights
    steps = torch.as_tensor(steps, dtype=torch.int32, device=device)
    columns = (torch.arange(n, dtype=torch.int32, device=device)[:, None] + steps)
    columns = columns.masked_select(valid)
    crow = torch.zeros(n + 1, dtype=torch.int32, device=device)
    torch.cumsum(valid.sum(dim=1, dtype=torch.int32), dim=0, out=crow[1:])
    with warnings.catch_warnings():  # torch flags sparse CSR as "beta"; the ops used are stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, columns, values, (n, n))


def random_walk(
    cams: torch.Tensor,
    boundary: torch.Tensor,
    beta: float,
    exp_times: int,
    radius: int,
) -> torch.Tensor:
    """Propagate (K, h, w) maps over an (h, w) boundary map; returns (K, h, w) float32.

    `cams` are the maps to spread (IRNet walks the foreground CAMs of the image's classes
    and adds background afterwards, see `rw_scores`; AffinityNet walks a
    `background_seed` with them); `boundary` is IRNet's
    sigmoid edge output at the same stride. Runs on the device of `boundary`.
    """
    if cams.dim() != 3 or cams.shape[1:] != boundary.shape:
        raise ValueError(
            f"cams {tuple(cams.shape)} must be (K, h, w) with (h, w) = boundary "
            f"{tuple(boundary.shape)}"
        )
    num_maps, h, w = cams.shape
    boundary = boundary.float()
    x = cams.to(boundary.device, torch.float32) * (1 - boundary)
    if num_maps == 0:
        return x
    matrix = transition_matrix(boundary, PathIndex(radius), beta)
    walked = x.reshape(num_maps, h * w).T.contiguous()  # (hw, K): one column per map
    for _ in range(2**exp_times):
        walked = matrix @ walked
    return walked.T.reshape(num_maps, h, w)


def _pair_affinities(boundary: torch.Tensor, path_index: PathIndex):
    """Flat (source, target, affinity) of the valid forward pairs of an (h, w) boundary map.

    The dense reference's own pair list, independent of the CSR layout it checks.
    """
    h, w = boundary.shape
    affinity = edge_to_affinity(boundary[None], path_index)[0]  # (D, h, w)
    valid = path_index.valid_pairs((h, w), boundary.device)
    offsets = torch.as_tensor(path_index.offsets, device=boundary.device)
    source = torch.arange(h * w, device=boundary.device).view(1, h, w)
    target = source + (offsets[:, 0] * w + offsets[:, 1]).view(-1, 1, 1)
    source = source.expand_as(target)
    return source[valid], target[valid], affinity[valid]


def random_walk_dense_reference(
    cams: torch.Tensor,
    boundary: torch.Tensor,
    beta: float,
    exp_times: int,
    radius: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """IRNet's dense formula, for tests and the benchmark only: O((hw)^2) memory.

    Dense A (affinity^beta, 1 on the diagonal), columns normalised, squared `exp_times`
    times, applied as x @ T.
    """
    num_maps, h, w = cams.shape
    n = h * w
    source, target, affinity = _pair_affinities(boundary.float(), PathIndex(radius))
    dense = torch.eye(n, dtype=dtype, device=boundary.device)
    dense[source, target] = affinity.to(dtype)
    dense[target, source] = affinity.to(dtype)
    dense = dense.pow(beta)
    trans = dense / dense.sum(dim=0, keepdim=True)
    del dense
    for _ in range(exp_times):
        trans = trans @ trans
    x = cams.to(boundary.device, dtype) * (1 - boundary.to(dtype))
    return (x.reshape(num_maps, n) @ trans).reshape(num_maps, h, w)


def background_seed(cams: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """(1, h, w) background map (1 - max_c CAM)^power of (K, h, w) max-normalised CAMs.

    AffinityNet's background for walking it with the classes; all ones when K = 0.
    """
    if len(cams) == 0:
        return torch.ones(1, *cams.shape[1:], dtype=cams.dtype, device=cams.device)
    return (1 - cams.amax(dim=0, keepdim=True)).clamp_min(0).pow(power)


def rw_scores(
    rw: torch.Tensor | np.ndarray,
    keys: Sequence[int] | np.ndarray,
    bg_thres: float | None,
    out_size: tuple[int, int] | None = None,
    stride: int | None = 4,
    walked_background: bool = False,
) -> tuple[torch.Tensor, np.ndarray]:
    """Walked maps (K, h, w) of classes `keys` -> ((K + 1, H, W) scores, class id of each).

    As IRNet's make_sem_seg_labels: upsample by `stride` (bilinear), crop to `out_size`,
    divide by the global max, add a constant background channel `bg_thres`.
    ``stride=None`` resizes straight to `out_size` (maps on another grid than the image's).
    With ``walked_background`` the first of K + 1 maps is a walked background
    (`background_seed`): every map is divided by its own max (`bg_thres` unused: None).
    """
    rw = torch.as_tensor(rw, dtype=torch.float32)
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    num_maps = len(keys) + int(walked_background)
    if rw.dim() != 3 or len(rw) != num_maps:
        raise ValueError(f"rw {tuple(rw.shape)} must be (K, h, w) with K = {num_maps} maps")
    if np.any((keys < 1) | (keys > 254)):
        raise ValueError(f"keys must be foreground class ids in 1..254, got {keys.tolist()}")
    if stride is None:
        if out_size is None:
            raise ValueError("stride=None needs out_size")
        height, width = out_size
    else:
        height, width = out_size or (rw.shape[1] * stride, rw.shape[2] * stride)
        if rw.shape[1] * stride < height or rw.shape[2] * stride < width:
            raise ValueError(f"rw {tuple(rw.shape)} at stride {stride} cannot cover {out_size}")
    class_of_channel = np.concatenate([[0], keys]).astype(np.uint8)
    if len(keys) == 0:
        return torch.ones(1, height, width), class_of_channel
    up = F.interpolate(rw[None], size=(height, width) if stride is None else None,
                       scale_factor=stride, mode="bilinear", align_corners=False)
    up = up[0, :, :height, :width]
    if walked_background:
        return up / up.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12), class_of_channel
    up = up / up.max().clamp_min(1e-12)
    return F.pad(up, (0, 0, 0, 0, 1, 0), value=bg_thres), class_of_channel


def unsure_pixels(scores: torch.Tensor, margin: float) -> np.ndarray:
    """(H, W) bool: where the best of `rw_scores` leads the second by less than `margin`
    (the walk's class borders); nothing with one channel or margin 0."""
    if len(scores) < 2 or margin <= 0:
        return np.zeros(scores.shape[1:], bool)
    top2 = scores.topk(2, dim=0).values
    return ((top2[0] - top2[1]) < margin).cpu().numpy()
