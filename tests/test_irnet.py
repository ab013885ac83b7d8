"""IRNet heads, path index, pair targets and losses (steps 4-5 library)."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from model_training.cam_generation.irn_targets import affinity_targets, irn_losses, label_to_stride
from model_training.common.models.irnet import IRNet, predict_boundary
from model_training.common.path_index import PathIndex, edge_to_affinity, line_path, search_offsets


def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU()
    )


class TinyMultiLevel(nn.Module):
    """Five levels at strides 4, 4, 8, 16, 16, like IRNet's dilated ResNet-50."""

    channels = [8, 8, 16, 16, 16]

    def __init__(self):
        super().__init__()
        self.stem = _stage(3, 8, 4)
        self.stages = nn.ModuleList(
            [_stage(8, 8, 1), _stage(8, 16, 2), _stage(16, 16, 2), _stage(16, 16, 1)]
        )

    def forward(self, x):
        levels = [self.stem(x)]
        for stage in self.stages:
            levels.append(stage(levels[-1]))
        return levels


def _model(with_displacement=True) -> IRNet:
    torch.manual_seed(0)
    return IRNet(TinyMultiLevel(), TinyMultiLevel.channels, with_displacement=with_displacement)


# ---------------------------------------------------------------- model


@pytest.mark.parametrize("size", [(64, 48), (50, 70)])
def test_forward_shapes_at_stride_4(size):
    model = _model()
    assert model.strides == [4, 4, 8, 16, 16]  # probed from the backbone
    out = model(torch.randn(2, 3, *size))
    h, w = -(-size[0] // 4), -(-size[1] // 4)
    assert out.edge_logits.shape == (2, 1, h, w)
    assert out.displacement.shape == (2, 2, h, w)
    assert torch.all((out.boundary > 0) & (out.boundary < 1))


def test_backbone_frozen_in_eval_without_grads():
    model = _model().train()
    assert model.edge_branch.training and model.displacement_branch.training
    assert not any(m.training for m in model.backbone.modules())
    bn = model.backbone.stem[1]
    stats_before = bn.running_mean.clone()

    out = model(torch.randn(2, 3, 32, 32))
    (out.edge_logits.mean() + out.displacement.abs().mean()).backward()

    assert torch.equal(bn.running_mean, stats_before)
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    edge, disp = model.trainable_parameters()
    assert all(p.grad is not None for p in edge + disp)
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    assert not backbone_ids & {id(p) for p in edge + disp}
    assert len(edge) + len(disp) == sum(p.requires_grad for p in model.parameters())
    groups = model.param_groups()
    assert [g["lr_mult"] for g in groups] == [1.0, 10.0]


def test_without_displacement_branch():
    model = _model(with_displacement=False)
    out = model(torch.randn(1, 3, 32, 32))
    assert out.displacement is None
    assert model.trainable_parameters()[1] == []
    assert len(model.param_groups()) == 1


def test_displacement_centred_by_training_mean_at_inference():
    model = _model().train()
    x = torch.randn(1, 3, 32, 32)
    raw = model(x).displacement
    centring = model.displacement_branch.predict[-1]
    assert torch.allclose(centring.running_mean, 0.1 * raw.mean(dim=(0, 2, 3)), atol=1e-6)
    model.eval()
    expected = raw - centring.running_mean.view(1, 2, 1, 1)
    assert torch.allclose(model(x).displacement, expected, atol=1e-5)


def test_predict_boundary_averages_flipped_logits():
    model = _model().eval()
    image = torch.randn(3, 40, 36)
    logits = model(torch.stack([image, image.flip(-1)])).edge_logits[:, 0]
    expected = torch.sigmoid((logits[0] + logits[1].flip(-1)) / 2)
    boundary = predict_boundary(model, image)
    assert boundary.shape == (10, 9)
    assert torch.allclose(boundary, expected, atol=1e-6)


# ---------------------------------------------------------------- path index


def test_search_offsets_cover_the_disc_once():
    for radius, count in [(5, 34), (10, 152)]:
        offsets = search_offsets(radius)
        assert len(offsets) == count
        both_halves = {tuple(o) for o in offsets} | {(-dy, -dx) for dy, dx in offsets}
        disc = {
            (dy, dx)
            for dy in range(-radius, radius + 1)
            for dx in range(-radius, radius + 1)
            if 0 < dy * dy + dx * dx < radius * radius
        }
        assert both_halves == disc and len(both_halves) == 2 * count


def test_line_paths_join_both_ends():
    def pixels(dy, dx):
        return sorted((int(y), int(x)) for y, x in line_path(dy, dx))

    assert pixels(0, 3) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    # a diagonal keeps the pixels beside it (closer than one pixel): no diagonal leak
    assert pixels(2, 2) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 1), (2, 2)]
    assert pixels(1, -2) == [(0, -2), (0, -1), (0, 0), (1, -2), (1, -1), (1, 0)]
    for dy, dx in search_offsets(10):
        path = {tuple(p) for p in line_path(dy, dx)}
        assert (0, 0) in path and (dy, dx) in path
        # consecutive rows/columns of the segment are all visited (no gaps a wall could slip through)
        assert {y for y, _ in path} == set(range(min(0, dy), max(0, dy) + 1))
        assert {x for _, x in path} == set(range(min(0, dx), max(0, dx) + 1))


def _naive_affinity(edge: np.ndarray, radius: int) -> np.ndarray:
    """Per-pair loop: 1 - max edge on the path, 0 when the far end leaves the image."""
    batch, h, w = edge.shape
    offsets = search_offsets(radius)
    out = np.zeros((batch, len(offsets), h, w))
    for d, (dy, dx) in enumerate(offsets):
        path = line_path(dy, dx)
        for y in range(h):
            for x in range(w):
                if y + dy < h and 0 <= x + dx < w:
                    out[:, d, y, x] = 1 - edge[:, y + path[:, 0], x + path[:, 1]].max(axis=1)
    return out


def test_edge_to_affinity_matches_per_pair_loop():
    edge = torch.rand(2, 9, 11, generator=torch.Generator().manual_seed(1))
    affinity = edge_to_affinity(edge[:, None], PathIndex(5))
    np.testing.assert_allclose(affinity.numpy(), _naive_affinity(edge.numpy(), 5), atol=1e-6)


def test_edge_to_affinity_gradient_equals_autograd_through_max():
    path_index = PathIndex(4)
    edge = torch.rand(1, 7, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
    weights = torch.randn(1, path_index.num_directions, 7, 8)
    (edge_to_affinity(edge, path_index) * weights).sum().backward()

    reference = edge.detach().clone().requires_grad_(True)
    padded = torch.nn.functional.pad(reference, (3, 3, 0, 3), value=1.0)
    total = 0
    for d, path in enumerate(path_index.paths):
        along = torch.stack([padded[:, py : py + 7, 3 + px : 3 + px + 8] for py, px in path])
        total = total + ((1 - along.amax(dim=0)) * weights[:, d]).sum()
    total.backward()
    assert torch.allclose(edge.grad, reference.grad, atol=1e-6)


@pytest.mark.parametrize("radius", [5, 10])
def test_wall_cuts_affinity_between_regions(radius):
    """Two flat regions split by a one-pixel boundary column."""
    h, w, wall = 20, 24, 11
    edge = torch.zeros(1, h, w)
    edge[:, :, wall] = 1.0
    path_index = PathIndex(radius)
    affinity = edge_to_affinity(edge, path_index)[0]
    valid = path_index.valid_pairs((h, w))
    x_near = torch.arange(w).view(1, 1, w).expand(len(path_index.offsets), h, w)
    x_far = x_near + torch.as_tensor(path_index.offsets[:, 1]).view(-1, 1, 1)
    left = (x_near < wall) & (x_far < wall)
    right = (x_near > wall) & (x_far > wall)
    across = ((x_near < wall) & (x_far > wall)) | ((x_near > wall) & (x_far < wall))
    assert across[valid].any() and left[valid].any()
    assert torch.all(affinity[valid & across] == 0)
    assert torch.all(affinity[valid & (left | right)] == 1)
    assert torch.all(affinity[~valid] == 0)


# ---------------------------------------------------------------- targets and losses


def test_affinity_targets_on_hand_made_labels():
    label = torch.tensor([[0, 0, 1, 1], [0, 255, 1, 1], [2, 2, 1, 0]])[None]
    path_index = PathIndex(2)  # offsets (0,1) (1,-1) (1,0) (1,1)
    assert [tuple(o) for o in path_index.offsets] == [(0, 1), (1, -1), (1, 0), (1, 1)]
    t = affinity_targets(label, path_index)
    right, down_left, down, down_right = range(4)
    assert t.bg_pos[0, right, 0, 0] == 1  # 0 - 0
    assert t.neg[0, right, 0, 1] == 1  # 0 - 1
    assert t.fg_pos[0, down, 0, 2] == 1  # 1 - 1
    assert t.neg[0, down, 1, 0] == 1  # 0 - 2
    assert t.fg_pos[0, right, 2, 0] == 1  # 2 - 2
    assert t.fg_pos[0, down_left, 1, 3] == 1  # 1 - 1
    assert t.neg[0, down_right, 1, 2] == 1  # 1 - 0
    for d, y, x in [(down_right, 0, 0), (down_left, 0, 2), (right, 2, 3), (down, 2, 0)]:
        # unsure pixel or far end outside the image: no target at all
        assert t.bg_pos[0, d, y, x] == t.fg_pos[0, d, y, x] == t.neg[0, d, y, x] == 0

    # every pair is in at most one class, and all valid ones in exactly one
    labelled = t.bg_pos + t.fg_pos + t.neg
    far = path_index.neighbours(label, pad_value=255)
    valid = (label[:, None] != 255) & (far != 255)
    assert torch.equal(labelled, valid.float())


def test_label_to_stride_keeps_ids():
    label = torch.zeros(1, 64, 48, dtype=torch.uint8)
    label[:, 16:48, 8:24] = 3
    label[:, :4] = 255
    small = label_to_stride(label, (16, 12))
    assert small.shape == (1, 16, 12)
    assert set(small.unique().tolist()) == {0, 3, 255}
    assert small[0, 8, 4] == 3 and small[0, 0, 0] == 255


def _toy_batch():
    """Two 64x64 images: a bright square (class 1) on a dark noisy background."""
    g = torch.Generator().manual_seed(3)
    images = 0.3 * torch.randn(2, 3, 64, 64, generator=g)
    label = torch.zeros(2, 64, 64, dtype=torch.long)
    for b, (y, x) in enumerate([(12, 20), (28, 8)]):
        images[b, :, y : y + 24, x : x + 24] += 2.0
        label[b, y : y + 24, x : x + 24] = 1
        label[b, y - 2 : y + 26, x - 2 : x - 2 + 4] = 255  # unsure band on one side
    return images, label


def test_losses_finite_and_decrease():
    images, label = _toy_batch()
    model = _model().train()
    path_index = PathIndex(10)
    targets = affinity_targets(label_to_stride(label, (16, 16)), path_index)
    assert targets.bg_pos.sum() > 0 and targets.fg_pos.sum() > 0 and targets.neg.sum() > 0
    optimizer = torch.optim.Adam(model.param_groups(), lr=0.005)
    history = []
    for _ in range(10):
        out = model(images)
        affinity = edge_to_affinity(out.boundary, path_index)
        losses = irn_losses(affinity, targets, path_index, out.displacement)
        assert set(losses) == {
            "bg_pos_aff", "fg_pos_aff", "pos_aff", "neg_aff", "dp_fg", "dp_bg", "total"
        }
        assert all(torch.isfinite(v) for v in losses.values())
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in losses.items()})
    assert history[-1]["total"] < 0.85 * history[0]["total"]
    assert history[-1]["pos_aff"] < history[0]["pos_aff"]
    assert history[-1]["dp_fg"] < history[0]["dp_fg"]


def test_losses_without_displacement():
    images, label = _toy_batch()
    model = _model(with_displacement=False).train()
    path_index = PathIndex(10)
    targets = affinity_targets(label_to_stride(label, (16, 16)), path_index)
    out = model(images)
    losses = irn_losses(edge_to_affinity(out.boundary, path_index), targets, path_index)
    assert "dp_fg" not in losses
    assert torch.isclose(losses["total"], (losses["pos_aff"] + losses["neg_aff"]) / 2)
    losses["total"].backward()
