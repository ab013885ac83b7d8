"""Sparse random walk against IRNet's dense formula, and the pseudo-mask step."""
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.irn_steps import pseudo_masks_step
from inference.irn_steps.random_walk import (background_seed, random_walk,
                                             random_walk_dense_reference, rw_scores,
                                             transition_matrix, unsure_pixels)
from model_training.common.config import ConfigError, load_config
from model_training.common.path_index import PathIndex

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STEP = load_config(None, [], pseudo_masks_step.DEFAULTS).pseudo_masks  # step 5's defaults: IRNet's
WALK = {"beta": STEP.beta, "exp_times": STEP.exp_times, "radius": STEP.radius}


def pseudo_mask_from_rw(rw, keys, bg_thres, **placement) -> np.ndarray:
    """The mask step 5 writes without CRF or margin: the argmax of `rw_scores` as class ids."""
    scores, class_of_channel = rw_scores(rw, keys, bg_thres, **placement)
    return class_of_channel[scores.argmax(dim=0).numpy()]


def _inputs(seed: int, size: tuple[int, int], num_maps: int = 3):
    """CAM-like maps in [0, 1] and a boundary map with a few strong ridges."""
    g = torch.Generator().manual_seed(seed)
    cams = torch.rand(num_maps, *size, generator=g) ** 2
    boundary = torch.rand(*size, generator=g) ** 4
    return cams, boundary


@pytest.mark.parametrize("seed,size", [(0, (12, 15)), (1, (9, 20)), (2, (16, 16))])
def test_sparse_walk_equals_dense_reference(seed, size):
    cams, boundary = _inputs(seed, size)
    sparse = random_walk(cams, boundary, beta=10, exp_times=8, radius=5)
    dense = random_walk_dense_reference(cams, boundary, 10, 8, 5, dtype=torch.float64)
    assert sparse.shape == cams.shape and sparse.dtype == torch.float32
    assert (sparse.double() - dense).abs().max() < 1e-4
    assert (sparse.argmax(0) == dense.argmax(0)).double().mean() >= 0.999
    keys = [3, 5, 9]
    mask_sparse = pseudo_mask_from_rw(sparse, keys, STEP.bg_thres)
    mask_dense = pseudo_mask_from_rw(dense, keys, STEP.bg_thres)
    assert (mask_sparse == mask_dense).mean() >= 0.999


def test_sparse_walk_equals_dense_reference_other_parameters():
    cams, boundary = _inputs(4, (10, 13), num_maps=2)
    sparse = random_walk(cams, boundary, beta=4, exp_times=5, radius=3)
    dense = random_walk_dense_reference(cams, boundary, 4, 5, 3, dtype=torch.float64)
    assert (sparse.double() - dense).abs().max() < 1e-4


def test_transition_matrix_is_sparse_and_row_stochastic():
    _, boundary = _inputs(5, (14, 11))
    path_index = PathIndex(5)
    matrix = transition_matrix(boundary, path_index, beta=10)
    n = boundary.numel()
    assert matrix.layout == torch.sparse_csr and matrix.shape == (n, n)
    per_row = matrix.crow_indices().diff()
    assert per_row.max() == 2 * path_index.num_directions + 1  # 69: interior pixels
    valid_pairs = int(path_index.valid_pairs(boundary.shape).sum())
    assert matrix.values().numel() == n + 2 * valid_pairs
    dense = matrix.to_dense()
    assert torch.allclose(dense.sum(dim=1), torch.ones(n), atol=1e-5)
    # D^-1 A with A symmetric: D M is symmetric
    degree_scaled = dense / dense.diagonal()[:, None]  # a_ii = 1, so D = 1 / M_ii
    assert torch.allclose(degree_scaled, degree_scaled.T, atol=1e-5)


def test_walk_stays_inside_a_boundary_wall():
    h, w, wall = 12, 16, 8
    boundary = torch.zeros(h, w)
    boundary[:, wall] = 1.0
    cams = torch.zeros(1, h, w)
    cams[0, 5, 2] = 1.0  # one confident pixel on the left
    walked = random_walk(cams, boundary, **WALK)[0]
    left, right = walked[:, :wall], walked[:, wall:]
    assert right.abs().max() < 1e-6
    assert left.min() > 0.5 * left.max() > 0  # spread over the whole left region


def test_pseudo_mask_from_rw_maps_channels_to_class_ids():
    rw = torch.zeros(2, 4, 4)
    rw[0, :2, :2] = 1.0
    rw[1, 2:, 2:] = 0.5
    mask = pseudo_mask_from_rw(rw, keys=[3, 7], bg_thres=0.25, out_size=(14, 15))
    assert mask.shape == (14, 15) and mask.dtype == np.uint8
    assert set(np.unique(mask).tolist()) == {0, 3, 7}
    assert mask[0, 0] == 3 and mask[13, 14] == 7 and mask[0, 14] == 0 and mask[13, 0] == 0
    # a background threshold above class 7's normalised score (0.5) removes it
    assert 7 not in pseudo_mask_from_rw(rw, keys=[3, 7], bg_thres=0.6, out_size=(14, 15))
    assert pseudo_mask_from_rw(rw, keys=[3, 7], bg_thres=0.25).shape == (16, 16)


def test_background_seed_is_one_minus_the_strongest_cam():
    cams = torch.tensor([[[1.0, 0.5], [0.0, 0.2]], [[0.0, 0.75], [0.0, 0.1]]])
    expected = torch.tensor([[[0.0, 0.25], [1.0, 0.8]]])
    assert torch.allclose(background_seed(cams), expected)
    assert torch.allclose(background_seed(cams, power=2.0), expected**2)
    assert torch.equal(background_seed(torch.zeros(0, 2, 3)), torch.ones(1, 2, 3))


def test_walked_background_scores_every_map_on_its_own_scale():
    rw = torch.zeros(3, 4, 4)  # background, class 3, class 7
    rw[0] = 0.5
    rw[0, :2, :2] = rw[0, 2:, 2:] = 0.1
    rw[1, :2, :2] = 2.0
    rw[2, 2:, 2:] = 0.01  # weak in absolute terms, but its own maximum
    mask = pseudo_mask_from_rw(rw, keys=[3, 7], bg_thres=None, out_size=(14, 15), stride=None,
                               walked_background=True)
    assert mask.shape == (14, 15)
    assert mask[0, 0] == 3 and mask[13, 14] == 7 and mask[0, 14] == 0
    # IRNet's global max would drop class 7 below any background threshold
    assert 7 not in pseudo_mask_from_rw(rw[1:], keys=[3, 7], bg_thres=0.25, out_size=(14, 15))
    with pytest.raises(ValueError):  # K + 1 maps are needed
        pseudo_mask_from_rw(rw[1:], keys=[3, 7], bg_thres=None, walked_background=True)


def test_walked_background_stops_at_a_wall():
    h, w, wall = 12, 16, 8
    boundary = torch.zeros(h, w)
    boundary[:, wall] = 1.0
    cams = torch.zeros(1, h, w)
    cams[0, 2:10, 1:7] = 1.0  # the class sits left of the wall
    cams[0, 3:9, 9:14] = 0.3  # a weak, wide response spills over it
    seeds = torch.cat([background_seed(cams), cams])
    walked = random_walk(seeds, boundary, **WALK)
    mask = pseudo_mask_from_rw(walked, keys=[5], bg_thres=None, stride=1, walked_background=True)
    assert (mask[:, wall + 1:] == 0).all()
    assert (mask[4:8, 2:6] == 5).all()
    # without the wall the same seeds spill the class over to the right
    open_walk = random_walk(seeds, torch.zeros(h, w), **WALK)
    leaky = pseudo_mask_from_rw(open_walk, keys=[5], bg_thres=None, stride=1, walked_background=True)
    assert (leaky[:, wall + 1:] == 5).any()


def test_pseudo_mask_without_classes_is_background():
    empty = pseudo_mask_from_rw(torch.zeros(0, 3, 4), keys=[], bg_thres=0.25, out_size=(10, 13))
    assert empty.shape == (10, 13) and not empty.any()
    walked = random_walk(torch.zeros(0, 3, 4), torch.zeros(3, 4), **WALK)
    assert walked.shape == (0, 3, 4)


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        random_walk(torch.zeros(2, 5, 5), torch.zeros(5, 6), **WALK)
    with pytest.raises(ValueError):
        pseudo_mask_from_rw(torch.zeros(2, 5, 5), keys=[1], bg_thres=0.25)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sparse_walk_on_cuda_matches_cpu():
    cams, boundary = _inputs(6, (12, 12))
    cpu = random_walk(cams, boundary, **WALK)
    gpu = random_walk(cams.cuda(), boundary.cuda(), **WALK)
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-5)


def test_step_rejects_an_unknown_background_mode(tmp_path):
    cfg = load_config(CONFIGS / "toy" / "5_pseudo_masks.yaml",
                      [f"work_dir={tmp_path}", "pseudo_masks.background=flood"], pseudo_masks_step.DEFAULTS)
    with pytest.raises(ConfigError, match="pseudo_masks.background.*'flood'"):
        pseudo_masks_step.run(cfg)
    assert not any(tmp_path.iterdir())  # nothing written before the check


def test_unsure_pixels_are_the_close_calls():
    rw = torch.zeros(3, 2, 3)  # background, class 3, class 7; each map's max is 1
    rw[0] = torch.tensor([[1.0, 0.5, 0.1], [0.2, 0.0, 0.0]])
    rw[1] = torch.tensor([[0.0, 0.45, 1.0], [0.3, 0.6, 0.0]])
    rw[2] = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.55, 0.0]])
    scores, classes = rw_scores(rw, keys=[3, 7], bg_thres=None, stride=1, walked_background=True)
    assert classes.tolist() == [0, 3, 7]
    unsure = unsure_pixels(scores, margin=0.1)
    # leads of 1.0, 0.05, 0.9 / 0.7, 0.05, 0.0 (a three-way tie at zero)
    assert unsure.tolist() == [[False, True, False], [False, True, True]]
    assert not unsure_pixels(scores, margin=0.0).any()
    assert not unsure_pixels(scores[:1], margin=0.5).any()  # one channel: nothing to compare
