"""Mesh rasteriser and SDF sphere tracer: analytic sphere depth, colour interpolation, background, Lambert."""

from __future__ import annotations


import pytest
import torch
import trimesh

from engine.records import EngineError
from engine.render.cameras import Camera, look_at_cameras, pan_cameras
from engine.render.rasterize import render_mesh, render_sdf

R = 0.8


def _sphere(subdivisions: int = 5):
    m = trimesh.creation.icosphere(subdivisions=subdivisions, radius=R)
    return torch.tensor(m.vertices, dtype=torch.float32), torch.tensor(m.faces, dtype=torch.int64)


def _analytic(camera: Camera):
    """Ray-sphere hit mask, z-depth and hit point per pixel."""
    o, d = camera.rays()
    b = (o * d).sum(-1)
    disc = b * b - ((o * o).sum(-1) - R * R)
    hit = disc > 0
    t = -b - disc.clamp(min=0).sqrt()
    zdir = camera.z / camera.z.norm(dim=-1, keepdim=True)
    depth = t * (d * zdir[:, None, None, :]).sum(-1)
    # Pixels well inside the silhouette: the tessellation's chord error stays tiny there.
    interior = disc > 0.05
    return hit, depth, o + t[..., None] * d, interior


def _cams(size=48):
    dirs = torch.tensor([[0.3, -1.0, 0.4], [1.0, 0.2, -0.3], [0.0, 0.0, 1.0]])
    return look_at_cameras(dirs, size)


def test_sphere_depth_alpha_and_colours_match_analytic():
    v, f = _sphere()
    colors = (v / R + 1) / 2  # linear in position: exact under perspective-correct interpolation
    cam = _cams()
    out = render_mesh(v, f, colors, cam)
    hit, depth, pts, interior = _analytic(cam)
    assert out["rgb"].shape == (3, 48, 48, 3) and out["depth"].shape == (3, 48, 48)
    # Coverage equals the analytic disc up to a few silhouette pixels.
    mismatch = (out["alpha"].bool() != hit).sum().item()
    assert mismatch <= 0.03 * hit.sum().item()
    assert interior.sum() > 500
    torch.testing.assert_close(out["depth"][interior], depth[interior], atol=2e-3, rtol=0)
    torch.testing.assert_close(out["rgb"][interior], ((pts / R + 1) / 2)[interior], atol=5e-3, rtol=0)
    assert torch.isinf(out["depth"][~out["alpha"].bool()]).all()


def test_background_and_face_order_independence():
    v, f = _sphere(3)
    colors = torch.full_like(v, 0.5)
    cam = pan_cameras(2, 32)
    bg = (0.1, 0.2, 0.3)
    out = render_mesh(v, f, colors, cam, background=bg)
    back = out["alpha"] == 0
    assert back.any() and (~back).any()
    torch.testing.assert_close(out["rgb"][back], torch.tensor(bg).expand(int(back.sum()), 3))
    perm = torch.randperm(f.shape[0], generator=torch.Generator().manual_seed(0))
    out2 = render_mesh(v, f[perm].flip(1), colors, cam, background=bg)  # shuffled and reversed winding
    assert torch.equal(out["alpha"], out2["alpha"])
    torch.testing.assert_close(out["depth"][~back], out2["depth"][~back], atol=1e-5, rtol=0)


def test_nearer_triangle_wins_and_large_triangles():
    # Two overlapping triangles covering the whole view: red at z=+0.5 (nearer to a camera on +Z), blue at z=-0.5.
    tri = torch.tensor([[-30.0, -30.0, 0.0], [30.0, -30.0, 0.0], [0.0, 40.0, 0.0]])
    v = torch.cat([tri + torch.tensor([0, 0, -0.5]), tri + torch.tensor([0, 0, 0.5])])
    colors = torch.tensor([[0.0, 0.0, 1.0]] * 3 + [[1.0, 0.0, 0.0]] * 3)
    cam = look_at_cameras(torch.tensor([[0.0, 0.0, 1.0]]), 40)
    for faces in (torch.tensor([[0, 1, 2], [3, 4, 5]]), torch.tensor([[3, 4, 5], [0, 1, 2]])):
        out = render_mesh(v, faces, colors, cam)
        assert out["alpha"].all()
        assert torch.allclose(out["rgb"][..., 0], torch.ones(1, 40, 40))
        # The camera axis pixel: depth = distance 4 minus the triangle's height 0.5.
        torch.testing.assert_close(out["depth"].min(), torch.tensor(3.5), atol=1e-4, rtol=0)


def test_lambert_follows_light_direction():
    v, f = _sphere(4)
    colors = torch.ones_like(v)
    cam = look_at_cameras(torch.tensor([[0.0, -1.0, 0.0]]), 64)
    light = (0.0, -1.0, 0.0)  # from the camera side: brightest at the disc centre
    out = render_mesh(v, f, colors, cam, shading="lambert", light_direction=light)
    lum = out["rgb"][0, ..., 0]
    assert lum.max() == pytest.approx(1.0, abs=2e-3)
    centre = torch.tensor(divmod(int(lum.argmax()), 64), dtype=torch.float32)
    assert (centre - 31.5).abs().max() <= 2
    covered = out["alpha"][0].bool()
    # Perspective from distance 4: at the silhouette |n·l| = R/4, so the rim is 0.3 + 0.7·0.2 = 0.44 at least.
    assert 0.44 - 1e-3 <= lum[covered].min() < 0.55
    side = render_mesh(v, f, colors, cam, shading="lambert", light_direction=(1.0, 0.0, 0.0))["rgb"][0, ..., 0]
    # Light from +X (two-sided): centre is dim, left/right rims bright.
    cols = covered[32].nonzero()[:, 0]
    assert side[32, 32] < 0.4 and side[32, cols.min()] > 0.8 and side[32, cols.max()] > 0.8
    flat = render_mesh(v, f, colors, cam, shading="flat")["rgb"][0, ..., 0]
    torch.testing.assert_close(flat[covered], torch.ones(int(covered.sum())))


def test_sdf_sphere_matches_analytic():
    cam = _cams(40)
    out = render_sdf(lambda p: p.norm(dim=-1) - R, lambda p: (p / R + 1) / 2, cam, shading="flat")
    hit, depth, pts, interior = _analytic(cam)
    assert (out["alpha"].bool() != hit).sum() <= 0.02 * hit.sum()
    torch.testing.assert_close(out["depth"][interior], depth[interior], atol=1e-3, rtol=0)
    torch.testing.assert_close(out["rgb"][interior], ((pts / R + 1) / 2)[interior], atol=2e-3, rtol=0)
    n = out["normal"][interior]
    torch.testing.assert_close(n, pts[interior] / R, atol=2e-3, rtol=0)
    # Same picture as the mesh render where both are well inside the disc.
    v, f = _sphere()
    mesh = render_mesh(v, f, (v / R + 1) / 2, cam, shading="lambert")
    sdf = render_sdf(lambda p: p.norm(dim=-1) - R, lambda p: (p / R + 1) / 2, cam, shading="lambert")
    torch.testing.assert_close(mesh["rgb"][interior], sdf["rgb"][interior], atol=2e-2, rtol=0)


def test_bad_inputs_raise():
    cam = pan_cameras(1, 8)
    with pytest.raises(EngineError):
        render_mesh(torch.zeros(3, 3), torch.tensor([[0, 1, 5]]), torch.zeros(3, 3), cam)
    with pytest.raises(EngineError):
        render_mesh(torch.zeros(3, 3), torch.tensor([[0, 1, 2]]), torch.zeros(2, 3), cam)
    with pytest.raises(EngineError):
        render_mesh(torch.zeros(3, 3), torch.tensor([[0, 1, 2]]), torch.zeros(3, 3), cam, shading="phong")
    empty = render_mesh(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.int64), torch.zeros(0, 3), cam)
    assert empty["alpha"].sum() == 0


def test_perspective_correct_interpolation_on_a_receding_plane():
    """One big quad tilted away from the camera: colour and depth must follow the 3D hit point, not screen space."""
    v = torch.tensor([[-3.0, -1.0, -1.0], [3.0, -1.0, -1.0], [3.0, 6.0, 1.0], [-3.0, 6.0, 1.0]])
    f = torch.tensor([[0, 1, 2], [0, 2, 3]])
    colors = ((v[:, 1:2] + 1) / 7).expand(4, 3).contiguous()  # grows with world y: along the depth direction
    cam = look_at_cameras(torch.tensor([[0.0, -1.0, 0.0]]), 32)
    out = render_mesh(v, f, colors, cam)
    o, d = cam.rays()
    normal = torch.cross(v[1] - v[0], v[3] - v[0], dim=0)
    t = ((v[0] - o) @ normal) / (d @ normal)  # (1, H, W)
    p = o + t[..., None] * d
    inside = (p[..., 0].abs() < 2.9) & (p[..., 1] > -0.9) & (p[..., 1] < 5.9)
    assert inside.sum() > 300 and (out["alpha"][inside] == 1).all()
    zdir = cam.z[0] / cam.z[0].norm()
    torch.testing.assert_close(out["depth"][inside], (t * (d @ zdir))[inside], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out["rgb"][..., 0][inside], ((p[..., 1] + 1) / 7)[inside], atol=1e-4, rtol=0)


def test_supersampling_blocks_average_to_the_pixel_rays():
    from engine.render.rasterize import supersampled_camera

    cam = pan_cameras(2, 9)
    big = supersampled_camera(cam, 3)
    _, d = cam.rays()
    _, db = big.rays()
    # Unnormalised image-plane coordinates: the mean of each 3×3 block equals the coarse pixel's.
    plane = lambda dirs, c: dirs / (dirs * c.z[:, None, None, :]).sum(-1, keepdim=True)  # noqa: E731
    blocks = plane(db, big).reshape(2, 9, 3, 9, 3, 3).mean(dim=(2, 4))
    torch.testing.assert_close(blocks, plane(d, cam), atol=1e-6, rtol=0)
    v, f = _sphere(3)
    one = render_mesh(v, f, torch.ones_like(v), cam)
    aa = render_mesh(v, f, torch.ones_like(v), cam, supersample=3)
    frac = (aa["alpha"] > 0) & (aa["alpha"] < 1)
    assert frac.any()  # antialiased silhouette
    full = aa["alpha"] == 1
    torch.testing.assert_close(aa["depth"][full & (one["alpha"] == 1)], one["depth"][full & (one["alpha"] == 1)],
                               atol=2e-2, rtol=0)
    assert torch.isinf(aa["depth"][aa["alpha"] == 0]).all()
