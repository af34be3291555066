"""Preview thumbnails: orientation (Z up, front from -Y), colour space, empty meshes, latent thumbnails."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from engine.records import EngineError, MeshRecord
from engine.render.preview import latent_preview, preview_image


def _marked_sphere() -> MeshRecord:
    """Sphere coloured by region: top (z > 0.3) red, bottom (z < -0.3) blue, +X side green, rest grey."""
    m = trimesh.creation.icosphere(subdivisions=4, radius=0.8)
    v = np.asarray(m.vertices, dtype=np.float32)
    c = np.full_like(v, 0.2)
    c[v[:, 2] > 0.3] = (1, 0, 0)
    c[v[:, 2] < -0.3] = (0, 0, 1)
    c[(np.abs(v[:, 2]) <= 0.3) & (v[:, 0] > 0.3)] = (0, 1, 0)
    return MeshRecord(vertices=v, faces=np.asarray(m.faces), vertex_colors=c)


def _dominant(img: np.ndarray, rows: slice, cols: slice) -> int:
    region = img[rows, cols].reshape(-1, 3).astype(np.float64)
    region = region[region.sum(1) > 30]  # ignore background
    return int(region.mean(0).argmax())


def test_front_view_is_upright_with_plus_x_on_the_right():
    img = preview_image(_marked_sphere(), size=96)
    assert img.shape == (96, 96, 3) and img.dtype == np.uint8
    assert _dominant(img, slice(5, 30), slice(30, 66)) == 0  # top of the image: red (+Z)
    assert _dominant(img, slice(70, 92), slice(30, 66)) == 2  # bottom: blue (-Z)
    assert _dominant(img, slice(42, 54), slice(70, 92)) == 1  # right: green (+X)
    assert img[0, 0].tolist() == [0, 0, 0] and img[-1, -1].tolist() == [0, 0, 0]
    back = preview_image(_marked_sphere(), size=96, view="back")
    assert _dominant(back, slice(42, 54), slice(4, 26)) == 1  # seen from +Y, +X is on the left


def test_colours_are_encoded_srgb_and_background_is_applied():
    m = _marked_sphere()
    grey = MeshRecord(vertices=m.vertices, faces=m.faces, vertex_colors=np.full_like(m.vertices, 0.5))
    img = preview_image(grey, size=64, view=(0.0, -1.0, 0.0), background=(1.0, 1.0, 1.0))
    # Facing the camera with the light from the (two-sided) UNIFORM direction: shaded linear 0.5·k, then sRGB.
    centre = img[32, 32].astype(int)
    assert (centre == centre[0]).all() and centre[0] > 0.5 * 255 * 0.6  # sRGB brightens linear mid-grey
    assert img[0, 0].tolist() == [255, 255, 255]


def test_empty_mesh_and_bad_arguments():
    empty = MeshRecord(vertices=np.zeros((0, 3)), faces=np.zeros((0, 3)), vertex_colors=np.zeros((0, 3)), empty=True)
    img = preview_image(empty, size=16, background=(0.2, 0.2, 0.2))
    assert img.shape == (16, 16, 3) and (img == 51).all()
    with pytest.raises(EngineError):
        preview_image(_marked_sphere(), size=16, view="sideways")


@pytest.fixture(scope="module")
def fixture_decoder():
    from engine.config import transmitter_from_official
    from engine.models.implicit_decoder import ImplicitDecoder, transmitter_to_decoder_keys
    from tests.refdata import load_config, load_npz, load_weights

    _, cfg = transmitter_from_official(load_config("decoder")["transmitter_config"])
    decoder = ImplicitDecoder(cfg).eval()
    state, _ = transmitter_to_decoder_keys(load_weights("decoder_transmitter_layout.safetensors"))
    decoder.load_state_dict(state, strict=True)
    return decoder, torch.from_numpy(load_npz("decoder")["latent"])


def test_latent_preview_mesh_and_nerf(fixture_decoder):
    decoder, latent = fixture_decoder
    img = latent_preview(decoder, latent, size=48)
    assert img.shape == (48, 48, 3) and img.dtype == np.uint8
    covered = img.sum(-1) > 0
    assert 0.05 < covered.mean() < 0.95  # the fixture blob is visible and does not fill the frame
    nerf = latent_preview(decoder, latent, size=8, method="nerf", generator=torch.Generator().manual_seed(0))
    assert nerf.shape == (8, 8, 3) and nerf.dtype == np.uint8
    with pytest.raises(EngineError):
        latent_preview(decoder, latent, size=8, method="stf")
