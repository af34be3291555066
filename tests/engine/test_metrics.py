"""Evaluation metrics: voxelisation, shape/aspect classification, IoU, colour, R-precision plumbing."""

import numpy as np
import pytest
import torch
from skimage import measure

from engine.eval import metrics as M
from engine.training import world as W

RES = 48  # evaluation grid for the tests (the metric default is 64)


def _mc_mesh(spec, res=44):
    lin = torch.linspace(-1, 1, res, dtype=torch.float64)
    g = torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), -1).reshape(-1, 3)
    d = W.object_sdf(spec, g, fast=True).reshape(res, res, res).numpy()
    v, f, _, _ = measure.marching_cubes(d, 0.0, spacing=(2 / (res - 1),) * 3)
    v = v - 1
    col = np.tile(spec.linear_rgb().numpy(), (len(v), 1))
    return v, f, col


def test_voxelize_cube_and_open_mesh():
    # an axis-aligned box as 12 triangles: occupancy equals the analytic one
    h = np.array([0.5, 0.3, 0.6])
    corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float) * h
    faces = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                      [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]])
    occ = M.voxelize_mesh(corners, faces, RES)
    ref = (np.abs(M.grid_points(RES).numpy()) < h).all(1).reshape(RES, RES, RES)
    assert (occ == ref).all()
    # a sphere with holes punched in it: the 3-axis vote keeps the occupancy almost intact
    v, f, _ = _mc_mesh(W.ObjectSpec(1, 0, 0))
    full = M.voxelize_mesh(v, f, RES)
    holed = M.voxelize_mesh(v, f[np.random.default_rng(0).random(len(f)) > 0.01], RES)
    assert (full & holed).sum() / (full | holed).sum() > 0.97


@pytest.mark.parametrize("shape", range(8))
def test_marching_cubes_meshes_are_classified(shape):
    for aspect in range(3):
        color = (shape * 3 + aspect) % 12
        spec = W.ObjectSpec(shape, aspect, color, yaw=0.6 if shape in W.YAWED_SHAPES else 0.0)
        mesh = _mc_mesh(spec)
        s = M.score_mesh(mesh, spec, res=RES)
        assert s["shape_correct"], (W.SHAPES[shape], W.ASPECTS[aspect], s)
        assert s["iou"] > 0.9
        assert s["color_correct"]
        if shape in W.YAWED_SHAPES:  # yaw 0.6 rad = 34.4 deg -> the 35 deg candidate (or its 5 deg neighbour)
            assert abs(M.shape_scores(mesh, RES)["yaw_deg"] - 34.4) <= 5
            assert s["yaw_deg"] == M.shape_scores(mesh, RES)["yaw_deg"]  # the eval's seed-diversity input


def test_wrong_target_scores_low():
    mesh = _mc_mesh(W.ObjectSpec(1, 0, 0))  # a sphere
    assert M.iou_with_target(mesh, W.ObjectSpec(4, 2, 0), res=RES) < 0.3  # vs a flat torus
    s = M.score_mesh(mesh, W.ObjectSpec(1, 1, 0), res=RES)
    assert not s["shape_correct"] and s["pred_shape"] == 1 and s["pred_aspect"] == 0


def test_colors():
    for i, c in enumerate(W.COLORS):
        assert M.nearest_palette_color(c.srgb) == i
    # area weighting: a big red triangle and a tiny blue one average to (nearly) red
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [2, 0, 0], [2.01, 0, 0], [2, 0.01, 0]], float)
    f = np.array([[0, 1, 2], [3, 4, 5]])
    red, blue = np.array(W.COLORS[0].linear), np.array(W.COLORS[4].linear)
    col = np.stack([red] * 3 + [blue] * 3)
    out = M.mean_color_srgb((v, f, col))
    assert np.allclose(out, W.COLORS[0].srgb, atol=2e-3)
    assert M.nearest_palette_color(out) == 0
    lab = M.srgb_to_lab(np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    assert np.allclose(lab, [[100, 0, 0], [0, 0, 0]], atol=1e-3)


class _StubClip(torch.nn.Module):
    """Text features = one-hot caption index; image features = one-hot of the kind whose colour is nearest."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def encode_text(self, tokens):
        return torch.eye(W.N_KINDS)[: len(tokens)]

    def encode_image(self, x):
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        img = x * std + mean  # (B, 3, H, W) sRGB
        centre = img[:, :, 28:36, 28:36].mean((2, 3))  # the object covers the image centre
        pal = torch.tensor([c.srgb for c in W.COLORS])
        color = torch.cdist(centre, pal).argmin(1)
        return torch.nn.functional.one_hot(W.kind_index(1, 0, 0) + color, W.N_KINDS).float()


def test_r_precision_plumbing():
    good = W.ObjectSpec(1, 0, 9)  # green sphere: the stub retrieves 'a green sphere'
    meshes = [_mc_mesh(good, res=32), _mc_mesh(good, res=32)]
    targets = [good.kind, W.kind_index(1, 0, 3)]  # second target is wrong on purpose
    out = M.r_precision(meshes, targets, _StubClip(), views=1)
    assert out["predicted"] == [good.kind, good.kind]
    assert out["r_precision"] == 0.5
