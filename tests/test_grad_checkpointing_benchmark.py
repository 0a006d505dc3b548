"""benchmarks/grad_checkpointing.py: its worker measures a real step, its table compares with checkpointing off."""

import pytest
import torch

from .conftest import benchmark_script


@pytest.fixture(scope="module")
def grad_checkpointing():  # noqa: ANN201 - the benchmark script as a module
    return benchmark_script("grad_checkpointing")


def test_worker_measures_a_training_step(grad_checkpointing) -> None:
    threads = torch.get_num_threads()
    try:
        result = grad_checkpointing.worker({"model": "veloxseg_tiny", "roi": 64, "batch_size": 1, "checkpointing": True, "threads": 1})
    finally:
        torch.set_num_threads(threads)
    assert result["cpu_s"] > 0 and result["peak_mb"] >= 0


def test_table_gives_each_setting_against_checkpointing_off(grad_checkpointing) -> None:
    rows = [
        {"model": "m", "roi": 128, "batch_size": 1, "checkpointing": False, "peak_mb": 400.0, "cpu_s": 2.0},
        {"model": "m", "roi": 128, "batch_size": 1, "checkpointing": True, "peak_mb": 100.0, "cpu_s": 3.0},
    ]
    table = grad_checkpointing.markdown(rows, "python benchmarks/grad_checkpointing.py")
    assert "| `m` | 1 x 2 x 128^3 | on | 100 | 3.0 | 0.25x | 1.50x |" in table
    assert "| `m` | 1 x 2 x 128^3 | off | 400 | 2.0 | 1.00x | 1.00x |" in table
