"""Mesh files: official PLY/OBJ parity (fixtures README §5), GLB float colours and Y-up, round trips, bad input."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from engine.geometry.mesh_io import read_mesh, write_glb, write_mesh, write_ply
from engine.records import EngineError, MeshRecord
from tests.refdata import FIXTURES, load_npz

NPZ = load_npz("decoder")


def _fixture_mesh() -> MeshRecord:
    rgb = np.stack([NPZ[f"mesh32_{c}"] for c in "RGB"], axis=1)
    return MeshRecord(NPZ["mesh32_verts"], NPZ["mesh32_faces"], rgb)


def test_ply_bytes_equal_official(tmp_path):
    write_ply(tmp_path / "m.ply", _fixture_mesh())
    assert (tmp_path / "m.ply").read_bytes() == (FIXTURES / "decoder_mesh32.ply").read_bytes()


@pytest.mark.parametrize("suffix", [".ply", ".obj"])
def test_our_files_parse_like_official(tmp_path, suffix):
    ours = tmp_path / f"m{suffix}"
    write_mesh(ours, _fixture_mesh())
    a, b = read_mesh(ours), read_mesh(FIXTURES / f"decoder_mesh32{suffix}")
    assert np.array_equal(a.faces, b.faces)
    np.testing.assert_array_equal(a.vertices, b.vertices)
    np.testing.assert_allclose(a.vertex_colors, b.vertex_colors, atol=1e-7)


@pytest.mark.parametrize("suffix,color_tol", [(".ply", 1 / 255 + 1e-6), (".obj", 1e-7), (".glb", 0.0)])
def test_round_trip(tmp_path, suffix, color_tol):
    m = _fixture_mesh()
    write_mesh(tmp_path / f"m{suffix.upper()}", m)  # suffix match is case-insensitive
    r = read_mesh(tmp_path / f"m{suffix.upper()}")
    assert np.array_equal(r.faces, m.faces)
    np.testing.assert_array_equal(r.vertices, m.vertices)
    np.testing.assert_allclose(r.vertex_colors, m.vertex_colors, atol=color_tol)  # PLY bytes: round(c·255.499)
    assert [p.name for p in tmp_path.iterdir()] == [f"m{suffix.upper()}"]  # no temp files left


def test_glb_layout_float_colour_and_y_up(tmp_path):
    m = MeshRecord([[0, 0, 0], [1, 0, 0], [0, 0, 1]], [[0, 1, 2]], [[0.1, 0.2, 0.3], [1, 0, 0], [0, 1, 0.5]])
    write_glb(tmp_path / "t.glb", m)
    data = (tmp_path / "t.glb").read_bytes()
    magic, version, total = struct.unpack_from("<III", data)
    assert magic == 0x46546C67 and version == 2 and total == len(data) and len(data) % 4 == 0
    n = struct.unpack_from("<I", data, 12)[0]
    doc = json.loads(data[20:20 + n])
    attrs = doc["meshes"][0]["primitives"][0]["attributes"]
    color = doc["accessors"][attrs["COLOR_0"]]
    assert color["componentType"] == 5126 and color["type"] == "VEC3"  # FLOAT linear colours
    pos = doc["accessors"][attrs["POSITION"]]
    # Z-up (0, 0, 1) becomes glTF Y-up (0, 1, 0): max y = 1, z range [0, 0].
    assert pos["max"] == [1.0, 1.0, 0.0] and pos["min"] == [0.0, 0.0, 0.0]
    trimesh = pytest.importorskip("trimesh")
    loaded = trimesh.load(tmp_path / "t.glb", force="mesh", process=False)
    np.testing.assert_allclose(loaded.vertices, [[0, 0, 0], [1, 0, 0], [0, 1, 0]], atol=1e-7)
    back = read_mesh(tmp_path / "t.glb")
    np.testing.assert_allclose(back.vertices, m.vertices)
    np.testing.assert_allclose(back.vertex_colors, m.vertex_colors)


def test_foreign_files_read(tmp_path):
    (tmp_path / "q.obj").write_text("# quad\nv 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nvn 0 0 1\nf 1//1 2//1 3//1 -1//1\n")
    q = read_mesh(tmp_path / "q.obj")
    assert q.faces.tolist() == [[0, 1, 2], [0, 2, 3]] and np.allclose(q.vertex_colors, 0.8)
    (tmp_path / "a.ply").write_text("ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\n"
                                    "property float z\nelement face 1\nproperty list uchar int vertex_index\n"
                                    "end_header\n0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n")
    assert read_mesh(tmp_path / "a.ply").faces.tolist() == [[0, 1, 2]]


def test_bad_paths_and_files(tmp_path):
    m = _fixture_mesh()
    with pytest.raises(EngineError):
        write_mesh(tmp_path / "m.stl", m)
    with pytest.raises(EngineError):
        write_mesh(tmp_path / "missing_dir" / "m.ply", m)
    with pytest.raises(EngineError):
        write_ply(tmp_path / "e.ply", MeshRecord(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0, 3)), empty=True))
    assert not (tmp_path / "e.ply").exists()
    with pytest.raises(EngineError):
        read_mesh(tmp_path / "nope.ply")
    with pytest.raises(EngineError):
        read_mesh(tmp_path / "m.fbx")
    for name, content in (("junk.ply", b"hello world"), ("junk.glb", b"\x00" * 40), ("junk.obj", b"# nothing\n"),
                          ("cut.ply", (FIXTURES / "decoder_mesh32.ply").read_bytes()[:3000])):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(EngineError):
            read_mesh(tmp_path / name)
