"""Fixtures for FER tests: the real converted model and a real face frame (both made by `make setup`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from emili_core.settings import REPO_ROOT
from emili_fer.engine import FerEngine
from emili_fer.settings import FerOptions

ARTIFACTS = REPO_ROOT / "var" / "artifacts"


@pytest.fixture(scope="session")
def face_jpeg() -> bytes:
    path = ARTIFACTS / "samples" / "face_640x480.jpg"
    if not path.exists():
        pytest.fail(f"{path} is missing; run `make setup`")
    return path.read_bytes()


@pytest.fixture(scope="session")
def fer_options() -> FerOptions:
    if not (ARTIFACTS / "fer" / "mini_xception.onnx").exists():
        pytest.fail("the converted FER model is missing; run `make setup`")
    return FerOptions()


@pytest.fixture(scope="session")
def loaded_engine(fer_options: FerOptions) -> FerEngine:
    engine = FerEngine(fer_options, ARTIFACTS)
    engine.load()
    return engine


def artifacts_dir() -> Path:
    return ARTIFACTS
