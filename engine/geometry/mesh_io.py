"""Mesh files: PLY / OBJ in the official Shap-E layouts, GLB with float linear vertex colours (SHAP-E.md §6.8, §6.1).

* PLY: binary little-endian, ``float x,y,z``, ``uchar red,green,blue`` = round(c·255.499) of the stored colours,
  faces ``list uchar int vertex_index`` (the official ``write_ply``).
* OBJ: ``v x y z r g b`` (float colours in [0, 1]) and 1-based ``f a b c``; no normals or materials (official
  ``write_obj``). Positions are written with 9 significant digits, enough to read float32 back exactly.
* GLB (glTF 2.0 binary), written by hand so COLOR_0 can be FLOAT VEC3 (linear, what glTF defines): one mesh, one
  triangle primitive with POSITION, COLOR_0 and uint32 indices. glTF is Y-up, Shap-E (= Blender) Z-up: the axis
  change (x, y, z) -> (x, z, −y) lives in ``_Z_UP_TO_Y_UP`` only, applied on write and inverted on read.

Writes are atomic (a temporary file in the target folder, then ``os.replace``); every failure is an EngineError.
Colours are written as stored in ``MeshRecord.vertex_colors`` (linear), like the official files.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from ..records import EngineError, MeshRecord

MESH_SUFFIXES = (".ply", ".obj", ".glb")
_Z_UP_TO_Y_UP = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=np.float32)  # rows: new x, y, z

_GLB_MAGIC, _JSON_CHUNK, _BIN_CHUNK = 0x46546C67, 0x4E4F534A, 0x004E4942
_FLOAT, _UBYTE, _USHORT, _UINT = 5126, 5121, 5123, 5125
_COMPONENT = {5120: np.int8, 5121: np.uint8, 5122: np.int16, 5123: np.uint16, 5125: np.uint32, 5126: np.float32}
_WIDTH = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT4": 16}


# ----------------------------------------------------------------------------------------------------------------
# Writing


def _atomic_write(path: Path, data: bytes) -> None:
    path = Path(path)
    if not path.parent.is_dir():
        raise EngineError(f"cannot write {path}: folder {path.parent} does not exist", "choose an existing folder")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise EngineError(f"cannot write {path}: {err.strerror or err}", "check the path and its permissions") from err


def _check(mesh: MeshRecord) -> None:
    if mesh.empty or len(mesh.faces) == 0:
        raise EngineError("the mesh is empty (the field had no surface); nothing to write",
                          "try another seed or prompt")
    if len(mesh.faces) and (mesh.faces.min() < 0 or mesh.faces.max() >= len(mesh.vertices)):
        raise EngineError("the mesh has face indices outside its vertex list", "this is a bug: please report it")


def ply_bytes(mesh: MeshRecord) -> bytes:
    _check(mesh)
    v, f = mesh.vertices, mesh.faces
    header = (f"ply\nformat binary_little_endian 1.0\nelement vertex {len(v)}\nproperty float x\nproperty float y\n"
              f"property float z\nproperty uchar red\nproperty uchar green\nproperty uchar blue\n"
              f"element face {len(f)}\nproperty list uchar int vertex_index\nend_header\n").encode("ascii")
    verts = np.empty(len(v), dtype=[("p", "<f4", 3), ("c", "u1", 3)])
    verts["p"] = v
    verts["c"] = np.round(np.clip(mesh.vertex_colors, 0.0, 1.0) * 255.499).astype(np.uint8)
    faces = np.empty(len(f), dtype=[("n", "u1"), ("i", "<i4", 3)])
    faces["n"] = 3
    faces["i"] = f
    return header + verts.tobytes() + faces.tobytes()


def obj_bytes(mesh: MeshRecord) -> bytes:
    _check(mesh)
    rows = np.concatenate([mesh.vertices.astype(np.float64), mesh.vertex_colors.astype(np.float64)], axis=1)
    vlines = ["v %.9g %.9g %.9g %.9g %.9g %.9g" % tuple(r) for r in rows.tolist()]
    flines = ["f %d %d %d" % tuple(t) for t in (mesh.faces.astype(np.int64) + 1).tolist()]
    return ("\n".join(vlines + flines) + "\n").encode("ascii")


def glb_bytes(mesh: MeshRecord) -> bytes:
    _check(mesh)
    pos = np.ascontiguousarray(mesh.vertices @ _Z_UP_TO_Y_UP.T, dtype="<f4")
    col = np.ascontiguousarray(np.clip(mesh.vertex_colors, 0.0, 1.0), dtype="<f4")
    idx = np.ascontiguousarray(mesh.faces.reshape(-1), dtype="<u4")
    blobs = [pos.tobytes(), col.tobytes(), idx.tobytes()]
    offsets = np.cumsum([0] + [len(b) for b in blobs[:-1]]).tolist()  # all lengths are multiples of 4
    binary = b"".join(blobs)
    doc = {
        "asset": {"version": "2.0", "generator": "shap-e engine"},
        "scene": 0, "scenes": [{"nodes": [0]}], "nodes": [{"mesh": 0, "name": "shap_e"}],
        "meshes": [{"primitives": [{"attributes": {"POSITION": 0, "COLOR_0": 1}, "indices": 2, "mode": 4}]}],
        "buffers": [{"byteLength": len(binary)}],
        "bufferViews": [
            {"buffer": 0, "byteOffset": offsets[0], "byteLength": len(blobs[0]), "target": 34962},
            {"buffer": 0, "byteOffset": offsets[1], "byteLength": len(blobs[1]), "target": 34962},
            {"buffer": 0, "byteOffset": offsets[2], "byteLength": len(blobs[2]), "target": 34963},
        ],
        "accessors": [
            {"bufferView": 0, "componentType": _FLOAT, "count": len(pos), "type": "VEC3",
             "min": pos.min(0).tolist(), "max": pos.max(0).tolist()},
            {"bufferView": 1, "componentType": _FLOAT, "count": len(col), "type": "VEC3"},
            {"bufferView": 2, "componentType": _UINT, "count": len(idx), "type": "SCALAR"},
        ],
    }
    js = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    js += b" " * (-len(js) % 4)
    binary += b"\0" * (-len(binary) % 4)
    total = 12 + 8 + len(js) + 8 + len(binary)
    return (struct.pack("<III", _GLB_MAGIC, 2, total) + struct.pack("<II", len(js), _JSON_CHUNK) + js
            + struct.pack("<II", len(binary), _BIN_CHUNK) + binary)


_WRITERS = {".ply": ply_bytes, ".obj": obj_bytes, ".glb": glb_bytes}


def _suffix(path: Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in MESH_SUFFIXES:
        raise EngineError(f"unknown mesh file type {suffix or '(none)'!r} for {path}",
                          f"use one of {', '.join(MESH_SUFFIXES)}")
    return suffix


def write_ply(path, mesh: MeshRecord) -> None:
    _atomic_write(Path(path), ply_bytes(mesh))


def write_obj(path, mesh: MeshRecord) -> None:
    _atomic_write(Path(path), obj_bytes(mesh))


def write_glb(path, mesh: MeshRecord) -> None:
    _atomic_write(Path(path), glb_bytes(mesh))


def write_mesh(path, mesh: MeshRecord) -> None:
    """Write by suffix (.ply / .obj / .glb)."""
    _atomic_write(Path(path), _WRITERS[_suffix(Path(path))](mesh))


# ----------------------------------------------------------------------------------------------------------------
# Reading


def read_mesh(path) -> MeshRecord:
    """.ply (binary little-endian or ascii) / .obj / .glb -> MeshRecord (polygons fan-triangulated; GLB converted
    back to Z up; uchar colours /255; missing colours -> grey 0.8)."""
    path = Path(path)
    suffix = _suffix(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise EngineError(f"cannot read {path}: {err.strerror or err}", "check the path") from err
    try:
        verts, faces, colors = {".ply": _parse_ply, ".obj": _parse_obj, ".glb": _parse_glb}[suffix](data)
    except EngineError:
        raise
    except Exception as err:  # any parse failure of a foreign file is a user-facing error
        raise EngineError(f"{path} is not a readable {suffix[1:].upper()} mesh ({type(err).__name__}: {err})",
                          "export it again as a triangle mesh") from err
    verts = np.asarray(verts, np.float32).reshape(-1, 3)
    faces = np.asarray(faces, np.int64).reshape(-1, 3)
    if len(verts) == 0 or len(faces) == 0:
        raise EngineError(f"{path} contains no triangles", "export a mesh with faces")
    if faces.min() < 0 or faces.max() >= len(verts):
        raise EngineError(f"{path} has face indices outside its vertex list", "export it again")
    if colors is None:
        colors = np.full_like(verts, 0.8)
    return MeshRecord(verts, faces.astype(np.int32), np.asarray(colors, np.float32).reshape(-1, 3))


def _fan(polys: list[list[int]]) -> np.ndarray:
    tris = [(p[0], p[i], p[i + 1]) for p in polys for i in range(1, len(p) - 1)]
    return np.asarray(tris, np.int64).reshape(-1, 3)


_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
              "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
              "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}


def _parse_ply(data: bytes):
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise EngineError("not a PLY file (no 'ply' magic / end_header)", "export it again as PLY")
    body_start = data.index(b"\n", end) + 1
    fmt, elements = None, []
    for line in data[:end].decode("ascii", "replace").splitlines()[1:]:
        tok = line.split()
        if not tok or tok[0] in ("comment", "obj_info"):
            continue
        if tok[0] == "format":
            fmt = tok[1]
        elif tok[0] == "element":
            elements.append((tok[1], int(tok[2]), []))
        elif tok[0] == "property":
            elements[-1][2].append(("list", tok[2], tok[3], tok[4]) if tok[1] == "list" else (tok[1], tok[2]))
    if fmt not in ("binary_little_endian", "ascii"):
        raise EngineError(f"PLY format {fmt!r} is not supported", "export as binary little-endian or ascii PLY")
    verts = colors = faces = None
    if fmt == "ascii":
        tokens = data[body_start:].split()
        pos = 0
        for name, count, props in elements:
            if name == "vertex":
                width = len(props)
                arr = np.asarray(tokens[pos:pos + count * width], dtype=np.float64).reshape(count, width)
                pos += count * width
                cols = {p[-1]: arr[:, i] for i, p in enumerate(props)}
                verts, colors = _ply_vertex_columns(cols, {p[-1]: p[0] for p in props})
            else:
                polys = []
                for _ in range(count):
                    row = []
                    for p in props:
                        if p[0] == "list":
                            n = int(tokens[pos]); row = [int(t) for t in tokens[pos + 1:pos + 1 + n]]; pos += 1 + n
                        else:
                            pos += 1
                    polys.append(row)
                if name == "face":
                    faces = _fan(polys)
        return verts, faces, colors
    offset = body_start
    for name, count, props in elements:
        if all(p[0] != "list" for p in props):
            dt = np.dtype([(p[1], "<" + _PLY_TYPES[p[0]]) for p in props])
            arr = np.frombuffer(data, dt, count, offset)
            offset += count * dt.itemsize
            if name == "vertex":
                verts, colors = _ply_vertex_columns({n: arr[n] for n in dt.names}, {p[1]: p[0] for p in props})
            continue
        if name != "face" or len(props) != 1:
            raise EngineError(f"PLY element {name!r} with list properties is not supported", "export it again")
        _, ctype, itype, _ = props[0]
        cdt, idt = np.dtype("<" + _PLY_TYPES[ctype]), np.dtype("<" + _PLY_TYPES[itype])
        tri = np.dtype([("n", cdt), ("i", idt, 3)])
        arr = np.frombuffer(data, tri, count, offset) if offset + count * tri.itemsize <= len(data) else None
        if arr is not None and (arr["n"] == 3).all():  # the common all-triangle layout: one vectorised read
            faces = arr["i"].astype(np.int64)
            offset += count * tri.itemsize
        else:
            polys = []
            for _ in range(count):
                n = int(np.frombuffer(data, cdt, 1, offset)[0]); offset += cdt.itemsize
                polys.append(np.frombuffer(data, idt, n, offset).astype(np.int64).tolist()); offset += n * idt.itemsize
            faces = _fan(polys)
    return verts, faces, colors


def _ply_vertex_columns(cols: dict, types: dict):
    verts = np.stack([cols["x"], cols["y"], cols["z"]], axis=1)
    names = [n for n in ("red", "green", "blue") if n in cols] or [n for n in ("r", "g", "b") if n in cols]
    if len(names) != 3:
        return verts, None
    rgb = np.stack([cols[n] for n in names], axis=1).astype(np.float64)
    if types[names[0]] in ("uchar", "uint8"):
        rgb = rgb / 255.0
    return verts, rgb


def _parse_obj(data: bytes):
    verts, colors, polys = [], [], []
    for line in data.decode("utf-8", "replace").splitlines():
        tok = line.split()
        if not tok:
            continue
        if tok[0] == "v":
            vals = [float(t) for t in tok[1:]]
            verts.append(vals[:3])
            colors.append(vals[3:6] if len(vals) >= 6 else None)
        elif tok[0] == "f":
            idx = [int(t.split("/")[0]) for t in tok[1:]]
            polys.append([i - 1 if i > 0 else len(verts) + i for i in idx])
    if not verts:
        raise EngineError("no vertices ('v' lines) found", "export it again as OBJ")
    has_color = all(c is not None for c in colors)
    return np.asarray(verts), _fan(polys), (np.asarray(colors) if has_color else None)


def _parse_glb(data: bytes):
    magic, version, _ = struct.unpack_from("<III", data, 0)
    if magic != _GLB_MAGIC or version != 2:
        raise EngineError("not a glTF 2.0 binary (GLB) file", "export it again as GLB")
    length, kind = struct.unpack_from("<II", data, 12)
    if kind != _JSON_CHUNK:
        raise EngineError("GLB without a JSON chunk", "export it again as GLB")
    doc = json.loads(data[20:20 + length])
    pos = 20 + length
    binary = b""
    if pos + 8 <= len(data):
        blen, bkind = struct.unpack_from("<II", data, pos)
        if bkind == _BIN_CHUNK:
            binary = data[pos + 8:pos + 8 + blen]

    def accessor(i: int) -> np.ndarray:
        acc = doc["accessors"][i]
        view = doc["bufferViews"][acc["bufferView"]]
        if view.get("buffer", 0) != 0 or "uri" in doc["buffers"][0]:
            raise EngineError("GLB with external buffers is not supported", "export a self-contained GLB")
        dt = np.dtype(_COMPONENT[acc["componentType"]]).newbyteorder("<")
        width = _WIDTH[acc["type"]]
        start = view.get("byteOffset", 0) + acc.get("byteOffset", 0)
        stride = view.get("byteStride", width * dt.itemsize)
        raw = np.frombuffer(binary, np.uint8, stride * (acc["count"] - 1) + width * dt.itemsize, start)
        rows = np.lib.stride_tricks.as_strided(raw, (acc["count"], width * dt.itemsize), (stride, 1))
        out = np.ascontiguousarray(rows).view(dt).reshape(acc["count"], width).astype(np.float64)
        if acc.get("normalized") and dt.kind in "ui":
            out = out / np.iinfo(dt).max
        return out

    verts, colors, faces, base = [], [], [], 0
    for matrix, mesh_i in _glb_mesh_nodes(doc):
        for prim in doc["meshes"][mesh_i]["primitives"]:
            if prim.get("mode", 4) != 4:
                continue
            p = accessor(prim["attributes"]["POSITION"])
            p = p @ matrix[:3, :3].T + matrix[:3, 3]
            c = accessor(prim["attributes"]["COLOR_0"])[:, :3] if "COLOR_0" in prim["attributes"] else None
            idx = accessor(prim["indices"])[:, 0].astype(np.int64) if "indices" in prim else np.arange(len(p))
            verts.append(p)
            colors.append(c if c is not None else np.full((len(p), 3), 0.8))
            faces.append(idx.reshape(-1, 3) + base)
            base += len(p)
    if not verts:
        raise EngineError("the GLB contains no triangle meshes", "export a triangle mesh")
    y_up = np.concatenate(verts)
    return y_up @ _Z_UP_TO_Y_UP, np.concatenate(faces), np.concatenate(colors)  # inverse (orthogonal) transform


def _glb_mesh_nodes(doc: dict):
    """(world matrix 4x4, mesh index) for every node with a mesh in the default scene."""
    nodes = doc.get("nodes", [])
    scenes = doc.get("scenes", [{"nodes": list(range(len(nodes)))}])
    roots = scenes[doc.get("scene", 0)].get("nodes", [])

    def local(node: dict) -> np.ndarray:
        if "matrix" in node:
            return np.asarray(node["matrix"], np.float64).reshape(4, 4).T  # glTF stores column-major
        x, y, z, w = node.get("rotation", [0, 0, 0, 1])
        rot = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
        m = np.eye(4)
        m[:3, :3] = rot * np.asarray(node.get("scale", [1, 1, 1]))[None, :]
        m[:3, 3] = node.get("translation", [0, 0, 0])
        return m

    stack = [(i, np.eye(4)) for i in roots]
    while stack:
        i, parent = stack.pop()
        world = parent @ local(nodes[i])
        if "mesh" in nodes[i]:
            yield world, nodes[i]["mesh"]
        stack.extend((c, world) for c in nodes[i].get("children", []))
