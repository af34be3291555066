"""Reference data copied from the official implementation: paths and loaders shared by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

REF = Path(__file__).parent / "reference"
FIXTURES = REF / "fixtures"
MANIFESTS = REF / "manifests"


def load_npz(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"{name}.npz") as f:
        return {k: f[k] for k in f.files}


def load_weights(name: str) -> dict:
    """Fixture weights are stored in fp16 (exactly representable); cast to fp32 like the fixtures README says."""
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(FIXTURES / name)).items()}


def load_config(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.config.json").read_text())


def load_manifest(name: str) -> dict:
    return json.loads((MANIFESTS / f"{name}.json").read_text())


def fixture_decoder():
    """The decoder fixture's ImplicitDecoder (transmitter layout loaded strictly), in eval mode."""
    from engine.config import transmitter_from_official
    from engine.models.implicit_decoder import ImplicitDecoder, transmitter_to_decoder_keys

    _, cfg = transmitter_from_official(load_config("decoder")["transmitter_config"])
    dec = ImplicitDecoder(cfg)
    dec.load_state_dict(transmitter_to_decoder_keys(load_weights("decoder_transmitter_layout.safetensors"))[0])
    return dec.eval()
