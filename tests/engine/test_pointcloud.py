"""Surface sampling, farthest-point sampling and the encoder inputs built from an analytic sphere mesh."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from engine.records import EngineError, MeshRecord
from engine.render.pointcloud import (MAX_DEPTH, farthest_point_sampling, linear_to_srgb, mesh_to_encoder_inputs,
                                      sample_surface, srgb_to_linear)

R = 0.7


def _sphere_mesh(subdivisions: int = 4) -> MeshRecord:
    m = trimesh.creation.icosphere(subdivisions=subdivisions, radius=R)
    v = np.asarray(m.vertices, dtype=np.float32)
    return MeshRecord(vertices=v, faces=np.asarray(m.faces), vertex_colors=(v / R + 1) / 2)


def _official_fps(coords: np.ndarray, k: int, start: int) -> np.ndarray:
    """The official greedy loop (float64), written out as the reference."""
    idx = np.zeros(k, dtype=np.int64)
    idx[0] = start
    d = ((coords - coords[start]) ** 2).sum(-1)
    for i in range(1, k):
        j = int(np.argmax(d))
        idx[i] = j
        d[j] = -1
        d = np.minimum(d, ((coords - coords[j]) ** 2).sum(-1))
    return idx


def test_fps_matches_the_greedy_reference():
    g = torch.Generator().manual_seed(3)
    pts = torch.rand(3000, 3, generator=g) * 2 - 1
    ours = farthest_point_sampling(pts, 500, start=17).numpy()
    np.testing.assert_array_equal(ours, _official_fps(pts.double().numpy(), 500, 17))
    assert len(set(ours.tolist())) == 500


def test_fps_prefix_is_spread_and_never_repeats_duplicates():
    pts = torch.cat([torch.zeros(50, 3), torch.ones(50, 3)])  # two clusters of exact duplicates
    idx = farthest_point_sampling(pts, 100)
    assert len(set(idx.tolist())) == 100
    assert {0, 1} == {int(pts[i, 0]) for i in idx[:2]}
    with pytest.raises(EngineError):
        farthest_point_sampling(pts, 101)


def test_sample_surface_on_sphere():
    mesh = _sphere_mesh()
    g = torch.Generator().manual_seed(0)
    pts, col = sample_surface(mesh.vertices, mesh.faces, mesh.vertex_colors, 20000, generator=g)
    r = pts.norm(dim=-1)
    assert (r <= R + 1e-5).all() and (r > R * 0.995).all()
    # Uniform on the sphere: the mean is ~0 and each octant holds ~1/8.
    assert pts.mean(0).abs().max() < 0.02
    octant = ((pts > 0).long() * torch.tensor([1, 2, 4])).sum(-1)
    frac = torch.bincount(octant, minlength=8).float() / 20000
    assert (frac - 0.125).abs().max() < 0.015
    # Colours are linear in position, so barycentric interpolation reproduces them exactly.
    torch.testing.assert_close(col, (pts / R + 1) / 2, atol=1e-5, rtol=0)


def test_srgb_round_trip():
    x = torch.linspace(0, 1, 101)
    torch.testing.assert_close(srgb_to_linear(linear_to_srgb(x)), x, atol=1e-6, rtol=0)
    assert linear_to_srgb(torch.tensor(0.5)).item() == pytest.approx(0.7354, abs=1e-4)


def test_encoder_inputs_from_sphere():
    mesh = _sphere_mesh()
    out = mesh_to_encoder_inputs(mesh, n_points=512, n_views=3, image_size=32,
                                 generator=torch.Generator().manual_seed(0), normalize=False)
    pts, views, depths, alphas, rays = (out[k] for k in ("points", "views", "depths", "alphas", "rays"))
    assert pts.shape == (1, 6, 512) and views.shape == (1, 3, 3, 32, 32)
    assert depths.shape == (1, 3, 1, 32, 32) and alphas.shape == (1, 3, 1, 32, 32)
    assert rays.shape == (1, 3, 32, 32, 2, 3) and out["camera_z"].shape == (1, 3, 3)
    xyz, rgb = pts[0, :3].T, pts[0, 3:].T
    assert (xyz.norm(dim=-1) - R).abs().max() < 2e-3
    # Point colours: sRGB of the linear vertex colour, byte-quantised.
    lin = (xyz / R + 1) / 2
    torch.testing.assert_close(rgb, linear_to_srgb(lin), atol=1 / 255 + 1e-3, rtol=0)
    torch.testing.assert_close(rgb * 255, (rgb * 255).round(), atol=1e-4, rtol=0)
    # The first points are spread out: min pairwise distance of the first 32 far above the sampling spacing.
    head = xyz[:32]
    dist = torch.cdist(head, head) + torch.eye(32) * 10
    assert dist.min() > 0.3
    # Cameras at distance 4, fov 0.7, unit ray directions; views composited onto black (-1) off the object.
    cam = out["camera"]
    torch.testing.assert_close(cam.origin.norm(dim=-1), torch.full((3,), 4.0))
    torch.testing.assert_close(rays[..., 1, :].norm(dim=-1), torch.ones(1, 3, 32, 32))
    bg = alphas[0, :, 0] == 0
    assert bg.any() and (alphas[0, :, 0] == 1).any()
    assert (views[0].permute(0, 2, 3, 1)[bg] == -1).all()
    assert (depths[0, :, 0][bg] == MAX_DEPTH).all()
    # Depth: the sphere's near side; the camera-axis ray hits at 4 - R.
    full = alphas[0, :, 0] == 1
    assert depths[0, :, 0][full].min() == pytest.approx(4 - R, abs=5e-3)
    # Position from depth lies on the sphere (what the encoder reconstructs from depth and rays).
    o, d = rays[0, ..., 0, :], rays[0, ..., 1, :]
    cos = (d * out["camera_z"][0][:, None, None, :]).sum(-1)
    p = o + (depths[0, :, 0] / cos)[..., None] * d
    err = (p[full].norm(dim=-1) - R).abs()  # grazing silhouette pixels average curved sub-pixel depths
    assert err.max() < 1e-2 and err.median() < 3e-3


def test_normalize_and_empty_mesh():
    m = _sphere_mesh(2)
    shifted = MeshRecord(vertices=m.vertices * 0.3 + np.array([5.0, 0, 0], np.float32), faces=m.faces,
                         vertex_colors=m.vertex_colors)
    out = mesh_to_encoder_inputs(shifted, n_points=64, n_views=1, image_size=16,
                                 generator=torch.Generator().manual_seed(1))
    v = out["vertices"]
    torch.testing.assert_close(v.amax(0) - v.amin(0), torch.full((3,), 2.0), atol=1e-5, rtol=0)
    empty = MeshRecord(vertices=np.zeros((0, 3)), faces=np.zeros((0, 3)), vertex_colors=np.zeros((0, 3)), empty=True)
    with pytest.raises(EngineError):
        mesh_to_encoder_inputs(empty, n_points=8, n_views=1, image_size=8)
