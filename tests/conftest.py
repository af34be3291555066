"""Shared test fixtures (the loaders themselves live in tests/refdata.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.refdata import FIXTURES, MANIFESTS


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def manifests_dir() -> Path:
    return MANIFESTS
