"""Smoke test of benchmarks/accuracy.py: two training steps and test-set scoring on a tiny demo dataset."""

import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_accuracy_benchmark_rows(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import accuracy
    finally:
        sys.path.remove(str(BENCHMARKS))
    from veloxseg.data.demo import make_demo_dataset

    data = make_demo_dataset(tmp_path / "data", num_train=4, num_test=2, shape=(32, 32, 32))
    # VeloxSeg needs 64 voxels on some axis: the 32^3 volumes are padded to the ROI.
    models = ["UNet", "veloxseg_tiny"]
    out = tmp_path / "results" / "accuracy"
    rows = accuracy.run_benchmark(models, data, steps=2, roi=(64, 32, 32), out=out, command="pytest", cpu=True)

    assert [r["model"] for r in rows] == models
    for row in rows:
        assert list(row["dice"]) == ["lesion"]
        assert 0.0 <= row["dice"]["lesion"] <= 1.0 and 0.0 <= row["dice_mean"] <= 1.0
        assert row["hd95_mm"] is None or row["hd95_mm"] >= 0.0
        assert row["params_m"] <= row["trained_params_m"] and row["step_s"] > 0.0
    velox = rows[1]
    assert velox["params_m"] < velox["trained_params_m"]  # teachers and aux heads only train

    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["rows"] == rows and saved["run"]["steps"] == 2 and saved["run"]["test_cases"] == 2
    table = [line for line in out.with_suffix(".md").read_text().splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header[:5] == ["model", "loss", "Dice lesion", "Dice mean", "HD95 (mm)"]
    assert [line.split("|")[1].strip() for line in table[2:]] == models
    assert out.with_suffix(".png").stat().st_size > 0
