"""STF mesh extraction: official fixture meshes (fixtures README §5), dense vs narrowband, analytic SDFs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from engine.config import transmitter_from_official
from engine.geometry.extract import extract_mesh, extract_mesh_from_field, grid_points, marching_cubes, sdf_grid
from engine.models.implicit_decoder import ImplicitDecoder, transmitter_to_decoder_keys
from engine.records import EngineError, MeshRecord
from tests.refdata import load_config, load_npz, load_weights

NPZ = load_npz("decoder")


@pytest.fixture(scope="module")
def decoder() -> ImplicitDecoder:
    _, cfg = transmitter_from_official(load_config("decoder")["transmitter_config"])
    dec = ImplicitDecoder(cfg)
    dec.load_state_dict(transmitter_to_decoder_keys(load_weights("decoder_transmitter_layout.safetensors"))[0])
    return dec.eval()


def _nearest(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return cKDTree(b).query(a)


def _chamfer(a: np.ndarray, b: np.ndarray) -> float:
    return _nearest(a, b)[0].mean() + _nearest(b, a)[0].mean()


def _hausdorff(a: np.ndarray, b: np.ndarray) -> float:
    return max(_nearest(a, b)[0].max(), _nearest(b, a)[0].max())


def _edges_shared_twice(faces: np.ndarray) -> bool:
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    directed = {tuple(x) for x in e.tolist()}
    # Closed and consistently oriented: every directed edge appears once and its reverse once.
    return len(directed) == len(e) and all((b, a) in directed for a, b in directed)


def _signed_volume(m: MeshRecord) -> float:
    t = m.vertices[m.faces].astype(np.float64)
    return float(np.einsum("ij,ij->i", t[:, 0], np.cross(t[:, 1], t[:, 2])).sum() / 6)


def test_grid_points_are_official_order():
    pts = grid_points(32).numpy()
    np.testing.assert_allclose(pts, NPZ["grid32_points"], atol=1e-6)


@pytest.mark.parametrize("method,step", [("dense", None), ("narrowband", 2)])
def test_fixture_mesh32(decoder, method, step):
    stats = {}
    m = extract_mesh(decoder, torch.from_numpy(NPZ["latent"]), grid_size=32, method=method, official_scale=True,
                     coarse_step=step, stats=stats)
    ref_v, ref_f = NPZ["mesh32_verts"], NPZ["mesh32_faces"]
    assert abs(len(m.vertices) - len(ref_v)) <= 0.005 * len(ref_v)
    assert abs(len(m.faces) - len(ref_f)) <= 0.005 * len(ref_f)
    assert _chamfer(m.vertices, ref_v) < 1e-3
    dist, nearest = _nearest(m.vertices, ref_v)
    ref_rgb = np.stack([NPZ[f"mesh32_{c}"] for c in "RGB"], axis=1)
    np.testing.assert_allclose(m.vertex_colors, ref_rgb[nearest], atol=1e-3)
    assert ref_rgb.std() > 0.02  # the colours vary, so the comparison means something
    assert _signed_volume(m) == pytest.approx(_signed_volume(MeshRecord(ref_v, ref_f, ref_rgb)), rel=1e-3)
    if method == "narrowband":
        assert stats["queries"] < 32 ** 3


def test_fixture_mesh64_narrowband(decoder):
    m = extract_mesh(decoder, torch.from_numpy(NPZ["latent"]), grid_size=64, official_scale=True)
    ref_v = NPZ["mesh64_verts"]
    assert abs(len(m.vertices) - len(ref_v)) <= 0.005 * len(ref_v)
    assert abs(len(m.faces) - len(NPZ["mesh64_faces"])) <= 0.005 * len(NPZ["mesh64_faces"])
    assert _chamfer(m.vertices, ref_v) < 1e-3
    _, nearest = _nearest(m.vertices, ref_v)
    ref_rgb = np.stack([NPZ[f"mesh64_{c}"] for c in "RGB"], axis=1)
    np.testing.assert_allclose(m.vertex_colors, ref_rgb[nearest], atol=1e-3)
    assert m.latent is not None and m.latent.shape == (decoder.d_latent,)


@pytest.mark.slow
def test_fixture_dense_vs_narrowband_64(decoder):
    lat = torch.from_numpy(NPZ["latent"])
    dense = extract_mesh(decoder, lat, grid_size=64, method="dense")
    band = extract_mesh(decoder, lat, grid_size=64, method="narrowband")
    assert _hausdorff(dense.vertices, band.vertices) <= 2 / 63


def test_official_scale_is_the_padded_shrink(decoder):
    lat = torch.from_numpy(NPZ["latent"])
    true = extract_mesh(decoder, lat, grid_size=24, method="dense")
    shrunk = extract_mesh(decoder, lat, grid_size=24, method="dense", official_scale=True)
    # Same surface scaled by (G-1)/(G+1); the default also puts the padding caps onto the box faces.
    np.testing.assert_allclose(np.clip(shrunk.vertices * 25 / 23, -1, 1), true.vertices, atol=1e-6)
    assert np.abs(shrunk.vertices).max() <= 1.0
    assert np.array_equal(shrunk.faces, true.faces)


def _sphere(r: float, centre=(0.0, 0.0, 0.0)):
    c = torch.tensor(centre)
    return lambda p: r - (p - c).norm(dim=-1)


def _torus(big: float, small: float):
    def f(p):
        q = torch.stack([p[:, :2].norm(dim=-1) - big, p[:, 2]], dim=-1)
        return small - q.norm(dim=-1)
    return f


@pytest.mark.parametrize("method", ["dense", "narrowband"])
def test_sphere_closed_outward_right_size(method):
    g = 48
    m = extract_mesh_from_field(_sphere(0.6, (0.1, -0.05, 0.0)), g, method=method)
    assert not m.empty and _edges_shared_twice(m.faces)
    assert len(m.vertices) - (3 * len(m.faces) // 2) + len(m.faces) == 2  # Euler characteristic of a sphere
    assert _signed_volume(m) == pytest.approx(4 / 3 * np.pi * 0.6 ** 3, rel=0.01)
    radius = np.linalg.norm(m.vertices - np.array([0.1, -0.05, 0.0]), axis=1)
    assert np.abs(radius - 0.6).max() < 2 / (g - 1) * 0.1  # MC on an exact SDF: far below a voxel
    normals = np.cross(*(m.vertices[m.faces[:, 1:]] - m.vertices[m.faces[:, :1]]).transpose(1, 0, 2))
    outward = (normals * (m.vertices[m.faces].mean(1) - [0.1, -0.05, 0.0])).sum(1)
    assert (outward > 0).all()


@pytest.mark.parametrize("g", [40, 57])
def test_torus_dense_equals_narrowband(g):
    dense = extract_mesh_from_field(_torus(0.55, 0.22), g, method="dense")
    stats = {}
    band = extract_mesh_from_field(_torus(0.55, 0.22), g, method="narrowband", coarse_step=4, stats=stats)
    assert stats["queries"] < 0.6 * g ** 3
    for m in (dense, band):
        assert _edges_shared_twice(m.faces)
        assert len(m.vertices) - len(m.faces) // 2 == 0  # Euler characteristic 0 (genus 1)
        assert _signed_volume(m) == pytest.approx(2 * np.pi ** 2 * 0.55 * 0.22 ** 2, rel=0.02)
    assert _hausdorff(dense.vertices, band.vertices) <= 2 / (g - 1)
    assert len(dense.vertices) == len(band.vertices) and len(dense.faces) == len(band.faces)


def test_field_touching_the_box_is_closed_by_the_padding():
    m = extract_mesh_from_field(_sphere(1.3), 20, method="narrowband", coarse_step=2)
    assert _edges_shared_twice(m.faces)
    assert np.abs(m.vertices).max() <= 1.0 + 1e-6 and np.abs(m.vertices).max() > 0.99
    assert 0 < _signed_volume(m) < 8.0


def test_empty_field_gives_empty_record():
    for method in ("dense", "narrowband"):
        m = extract_mesh_from_field(lambda p: -torch.ones(len(p)), 16, method=method)
        assert m.empty and m.vertices.shape == (0, 3) and m.faces.shape == (0, 3)


def test_colours_are_queried_at_final_vertices():
    m = extract_mesh_from_field(_sphere(0.5), 24, color_fn=lambda p: (p + 1) / 2, official_scale=True)
    np.testing.assert_allclose(m.vertex_colors, np.clip((m.vertices + 1) / 2, 0, 1), atol=1e-6)


def test_narrowband_matches_dense_values_near_surface():
    f = _torus(0.5, 0.25)
    dense, _ = sdf_grid(f, 33, method="dense")
    band, evaluated = sdf_grid(f, 33, method="narrowband", coarse_step=4)
    assert torch.equal((dense > 0), (band > 0))
    near = dense.abs() < 2 / 32
    assert evaluated[near].all()
    torch.testing.assert_close(band[evaluated], dense[evaluated])


def test_bad_inputs(decoder):
    with pytest.raises(EngineError):
        extract_mesh(decoder, torch.zeros(10))
    with pytest.raises(EngineError):
        extract_mesh(decoder, torch.full((decoder.d_latent,), float("nan")))
    with pytest.raises(EngineError):
        extract_mesh_from_field(_sphere(0.5), 16, method="bogus")
    with pytest.raises(EngineError):
        marching_cubes(np.full((4, 4, 4), np.nan, np.float32))
