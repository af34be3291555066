"""Latent <-> text: a safetensors file (one float32 tensor 'latent' + string metadata), base64 in 76-char lines.

Why a Text datablock and not an ID property: a latent is 4,096 (mini) to 1,048,576 (official) floats. As an ID
property array it would be drawn in the Object > Custom Properties panel (a 1M-entry array freezes the UI) and
copied on every object duplicate; a Text datablock is saved in the .blend, survives save/reopen, is shared by
duplicates (they reference it by name), can be inspected or deleted in the Text Editor, and is created in the
same undo step as the object. Safetensors is the engine's weight format, so a latent pasted out of the .blend
opens with ``safetensors.numpy.load`` after base64 decoding; float32 keeps re-decoding bit-exact (a 1M latent is
5.6 MB of text; mini latents are 22 KB). One format for every model keeps the code path single.
This module writes the safetensors container by hand (8-byte header length, JSON header, raw little-endian
data) so that it needs only numpy, which Blender bundles.
"""

from __future__ import annotations

import base64
import json
import struct

import numpy as np

MAGIC = "# shap_e latent v1 (base64 safetensors, tensor 'latent')"


def encode(latent: np.ndarray, metadata: dict[str, str] | None = None) -> str:
    arr = np.ascontiguousarray(np.asarray(latent, dtype="<f4").reshape(-1))
    header = {"latent": {"dtype": "F32", "shape": [int(arr.size)], "data_offsets": [0, int(arr.nbytes)]}}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)  # the format pads the header to 8 bytes
    blob = struct.pack("<Q", len(hjson)) + hjson + arr.tobytes()
    return MAGIC + "\n" + base64.encodebytes(blob).decode("ascii")


def decode(text: str) -> tuple[np.ndarray, dict[str, str]]:
    """Inverse of ``encode``; raises ValueError with a readable message on anything else."""
    lines = text.strip().splitlines()
    if not lines or lines[0].strip() != MAGIC:
        raise ValueError("this text block is not a Shap-E latent")
    try:
        blob = base64.b64decode("".join(lines[1:]), validate=False)
        (n,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8:8 + n])
        info = header["latent"]
        start, end = info["data_offsets"]
        if info["dtype"] != "F32":
            raise ValueError(f"unsupported dtype {info['dtype']}")
        data = np.frombuffer(blob[8 + n + start: 8 + n + end], dtype="<f4").astype(np.float32)
        if data.size != int(np.prod(info["shape"])):
            raise ValueError("truncated latent data")
    except (KeyError, struct.error, json.JSONDecodeError, ValueError) as err:
        raise ValueError(f"the stored latent is damaged ({err})") from err
    return data, dict(header.get("__metadata__", {}))
