"""Shared fixtures: an isolated Prefect home and one Prefect server for the whole session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before anything imports prefect: private home, no analytics, no hub downloads.
_HOME = tempfile.mkdtemp(prefix="pedsynth-tests-")
os.environ["PREFECT_HOME"] = str(Path(_HOME) / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_TO_API_BATCH_INTERVAL"] = "0.3"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HOME"] = str(Path(_HOME) / "hf")
os.environ["PEDSYNTH_CACHE"] = str(Path(_HOME) / "cache")  # tiny models built per session
os.environ["MPLBACKEND"] = "Agg"

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def prefect_server():
    """One ephemeral Prefect server for the session; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def procedural_small(tmp_path_factory) -> Path:
    """A small procedural benchmark (CUHK-PEDES layout), generated once per session."""
    from pedsynth.procedural import generate

    root = tmp_path_factory.mktemp("procedural") / "bench"
    generate(root, identities=40, images_per_identity=3, seed=7, workers=2)
    return root
