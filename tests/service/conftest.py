"""Fixtures of the service tests: a session-wide template of real bundles, and a private copy per test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from models.bundle import save_bundle
from tests.service.helpers import BUNDLE_A, BUNDLE_B, BUNDLE_ID_ONLY, WORKER_MODES, make_parts
from tests.tiny_llm import build_tiny_llama


@pytest.fixture(scope="session")
def template(tmp_path_factory) -> Path:
    """artifacts/ with bundles A (CURRENT) and B (same catalog, other weights), and a separate ID-only root."""
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("service-template")
    llm_dir = build_tiny_llama(work / "llm")
    art = work / "artifacts"
    save_bundle(art, make_parts(work, llm_dir, seed=1), bundle_id=BUNDLE_B, set_current=False)
    save_bundle(art, make_parts(work, llm_dir, seed=0), bundle_id=BUNDLE_A)
    save_bundle(work / "idonly", make_parts(work, llm_dir, seed=2, with_llm=False), bundle_id=BUNDLE_ID_ONLY)
    return work


@pytest.fixture
def artifacts(template, tmp_path) -> Path:
    """A private copy of the template artifacts root (bundle A current)."""
    dst = tmp_path / "artifacts"
    shutil.copytree(template / "artifacts", dst)
    return dst


@pytest.fixture
def idonly_artifacts(template, tmp_path) -> Path:
    dst = tmp_path / "idonly"
    shutil.copytree(template / "idonly", dst)
    return dst


@pytest.fixture(params=WORKER_MODES)
def worker_mode(request) -> str:
    """Where the recommend path runs (LLMEMB_RECOMMEND_WORKER): in the server process or a worker process. The
    register, reload and overload tests put the embed path there too (LLMEMB_EMBED_WORKER)."""
    return request.param
