"""Shared fixtures: one tiny random Wan2.1 pipeline and its saved checkpoint per test session.

Treat both as read-only: copy the checkpoint (shutil.copytree) before damaging it, and do not
replace components of `tiny_pipe` (build a fresh one with build_tiny_pipeline instead).
"""

from __future__ import annotations

import shutil

import pytest

from tests.support.wan_original import save_original_checkpoint
from wan_nabla.models import save_tiny_checkpoint
from wan_nabla.tiny import build_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_pipe():
    """build_tiny_pipeline(seed=0): float32, CPU."""
    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Directory holding save_tiny_checkpoint(seed=0): diffusers layout, safetensors weights."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-wan") / "Wan2.1-T2V-tiny-Diffusers", seed=0)


@pytest.fixture(scope="session")
def tiny_original_checkpoint(tmp_path_factory, tiny_pipe):
    """The tiny transformer's weights in Wan's original layout: original key names, 2 shards, index
    json, and a decoy Wan2.1_VAE.pth that must never be opened."""
    return save_original_checkpoint(tiny_pipe.transformer.state_dict(), tmp_path_factory.mktemp("orig") / "Wan-tiny")


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """add(repo_id, directory): serve `directory` as hub repo `repo_id` from a private HF cache,
    with HF_HUB_OFFLINE=1 (nothing is downloaded; a repo not added is a cache miss)."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HOME once at import, so the constant itself must be patched.
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))

    def add(repo_id: str, directory) -> None:
        repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
        shutil.copytree(directory, repo_dir / "snapshots" / ("0" * 40))
        (repo_dir / "refs").mkdir()
        (repo_dir / "refs" / "main").write_text("0" * 40)

    return add
