"""Shared fixtures: the authors' reference vectors (read-only, beside the checkout) and small configs."""

import importlib
import sys
from pathlib import Path
from types import ModuleType

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch

import veloxseg
from veloxseg.metadata import ModelMetadata

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "reference_autopetii.safetensors"

# Overrides that make a model small and fast enough for unit tests (64^3 tiles with these windows).
SMALL_ROI = dict(roi_size=(64, 64, 64), big_windows=[[2, 2, 2], [4, 4, 4], [2, 2, 2], [2, 2, 2]])

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_script(name: str) -> ModuleType:
    """The script benchmarks/<name>.py as a module (its folder on sys.path while it imports its siblings)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))



def tiny_model(metadata: ModelMetadata, seed: int = 0) -> veloxseg.VeloxSeg:
    """An eval-mode ``veloxseg_tiny`` at :data:`SMALL_ROI` (random weights from ``seed``) carrying ``metadata``."""
    torch.manual_seed(seed)
    model = veloxseg.create_model("veloxseg_tiny", **SMALL_ROI).eval()
    model.pretrained_cfg["veloxseg"] = metadata.to_dict()
    return model


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory) -> Path:
    """The requesting module's ``model`` fixture saved as a model folder (``local-dir:`` loads it)."""
    return model.save_pretrained(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def reference() -> dict:
    """Tensors and metadata of the authors' AutoPET-II run: {"tensors": {...}, "metadata": {...}}."""
    if not REFERENCE.exists():
        pytest.fail(f"reference vectors not found at {REFERENCE} (../shared must sit beside the checkout)")
    from safetensors import safe_open

    with safe_open(REFERENCE, "pt") as f:
        return {"tensors": {k: f.get_tensor(k) for k in f.keys()}, "metadata": f.metadata()}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def offline_hub(tmp_path_factory, monkeypatch) -> Path:
    """Every test runs as on a machine without network and with an empty Hub cache (the CI's): Hub
    downloads fail at once instead of retrying. huggingface_hub reads both variables at import, so its
    constants are patched too. Returns the cache folder."""
    path = tmp_path_factory.mktemp("hub-cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(path))
    return path
