"""Shared fixtures: phantoms are generated (deterministic per seed), never downloaded."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ARTIFACTS = REPO / "Testing" / "artifacts"


@functools.lru_cache(maxsize=8)
def phantom(seed: int):
    from FemurSegLib.synthetic.phantom import generate_phantom

    return generate_phantom(seed)


@pytest.fixture(scope="session")
def phantom_factory():
    return phantom


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
