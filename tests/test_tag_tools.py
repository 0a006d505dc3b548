"""The tools behind the published tags: hub/make_tag.py turns a training run into a publishable
hub/<tag>/ folder, and benchmarks/finetune.py compares fine-tuning from tags with training from scratch."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from veloxseg import hub
from veloxseg.data.demo import make_demo_dataset
from veloxseg.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


def load_script(path: Path):
    """A script as a module, its folder on the path for its neighbours (as when it is run)."""
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    """A small labelled task with test cases, named unlike any tag's training data."""
    data = make_demo_dataset(tmp_path_factory.mktemp("task") / "data", num_train=3, num_test=1, shape=(64, 64, 64))
    meta = json.loads((data / "dataset.json").read_text())
    (data / "dataset.json").write_text(json.dumps({**meta, "name": "UnseenTask"}))
    return data


@pytest.fixture(scope="module")
def run(task, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "tiny"
    train(TrainConfig(model="veloxseg_tiny", data=str(task), roi=(64,), max_steps=2, val_every=2, output_dir=str(out),
                      progress=False, command="python examples/train.py --model veloxseg_tiny --max-steps 2"))  # fmt: skip
    return out


def test_make_tag_writes_a_publishable_folder_with_its_registry_entry(run, task, tmp_path, capsys):
    make_tag = load_script(ROOT / "hub" / "make_tag.py")
    time_log = tmp_path / "run.log"
    time_log.write_text("\tUser time (seconds): 3000.0\n\tSystem time (seconds): 600.0\n")
    notice = tmp_path / "NOTICE.txt"
    notice.write_text("Synthetic data of veloxseg.data.demo.\n")
    name = "veloxseg_tiny.unseen_task"
    argv = [str(run), name, "--about", "A test tag.", "--test-data", str(task), "--notice", str(notice),
            "--time-log", str(time_log), "--data-command", "veloxseg demo-data DIR", "--hub-dir", str(tmp_path)]  # fmt: skip
    assert make_tag.main(argv) == 0
    folder = tmp_path / name
    assert sorted(p.name for p in folder.iterdir()) == ["NOTICE", "README.md", "config.json", "model.safetensors"]
    assert load_script(ROOT / "hub" / "publish.py").validate(folder) == []
    metrics = json.loads((folder / "config.json").read_text())["pretrained_cfg"]["veloxseg"]["metrics"]
    assert {"val_dice", "test_dice", "test_dice_lesion"} <= metrics.keys()
    card = (folder / "README.md").read_text()
    assert f"## This tag: `{name}`" in card and "1.00 CPU hours" in card and "veloxseg demo-data DIR" in card
    config = json.loads((folder / "config.json").read_text())["pretrained_cfg"]
    metadata = config["veloxseg"]  # the tag's one source: every fact the cards and tables are made from
    assert metadata["evaluation_cases"] == {"validation": 1, "test": 1} and metadata["license"] == "other"
    assert metadata["notice"] == notice.read_text() == (folder / "NOTICE").read_text()
    assert metadata["publication"]["cpu_hours"] == 1.0 and metadata["publication"]["budget"] == "2 steps of 2 patches of 64x64x64"
    assert config["description"].startswith("A test tag. 2 steps of 2 patches of 64x64x64, stage segment (1.00 CPU h)")
    printed = capsys.readouterr().out
    for filename in (hub.CONFIG_NAME, hub.WEIGHTS_NAME):
        assert f'"{filename}": "{hub.sha256_of(folder / filename)}"' in printed


def test_a_pretrain_run_is_scored_by_its_reconstruction_of_held_out_scans(task, tmp_path):
    run = tmp_path / "ssl"
    train(TrainConfig(model="veloxseg_tiny", stage="pretrain", data=str(task), roi=(64,), max_steps=2,
                      mask_ratio=0.5, output_dir=str(run), progress=False, command="examples/train.py --stage pretrain"))  # fmt: skip
    make_tag = load_script(ROOT / "hub" / "make_tag.py")
    argv = [str(run), "veloxseg_tiny.ssl_test", "--about", "A test tag.", "--test-data", str(task),
            "--hub-dir", str(tmp_path)]  # fmt: skip
    assert make_tag.main(argv) == 0
    metrics = json.loads((tmp_path / "veloxseg_tiny.ssl_test" / "config.json").read_text())
    metrics = metrics["pretrained_cfg"]["veloxseg"]["metrics"]
    assert list(metrics) == ["test_masked_rc_mse", "test_masked_input_mse"]
    assert 0.0 < metrics["test_masked_rc_mse"] < 100.0 and 0.0 < metrics["test_masked_input_mse"] < 100.0
    assert load_script(ROOT / "hub" / "publish.py").validate(tmp_path / "veloxseg_tiny.ssl_test") == []


def test_make_tag_refuses_a_log_without_cpu_times(tmp_path):
    make_tag = load_script(ROOT / "hub" / "make_tag.py")
    log = tmp_path / "run.log"
    log.write_text("step 10: loss 0.5\n")
    with pytest.raises(ValueError, match=r"run\.log: no GNU time report"):
        make_tag.cpu_hours(log)


def test_finetune_compares_tags_with_scratch_and_skips_their_own_task(task, tmp_path):
    finetune = load_script(ROOT / "benchmarks" / "finetune.py")
    assert finetune.starts("veloxseg_tiny")[0] == "scratch" and len(finetune.starts("veloxseg_tiny")) > 1
    out = tmp_path / "ft"
    argv = ["--data", str(task), "--variant", "veloxseg_tiny", "--starts", "scratch", "petct_lesions", "--steps", "2",
            "--out", str(out)]  # fmt: skip
    assert finetune.main(argv) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["start"] for r in rows] == ["scratch", "petct_lesions"]
    assert all(0.0 <= r["dice_mean"] <= 1.0 and r["task"] == "UnseenTask" for r in rows)
    assert "--stage finetune" in rows[1]["command"] and "--stage" not in rows[0]["command"]
    table = out.with_suffix(".md").read_text()
    assert "| UnseenTask | petct_lesions |" in table
    assert finetune.TRAINED_ON["petct_lesions"] == "VeloxSegSyntheticPETCT"  # its own task is not transfer


def test_tags_table_has_every_published_tag_with_its_budget_cost_and_held_out_numbers():
    from veloxseg.variants import PUBLISHED

    rows = load_script(ROOT / "hub" / "tags_table.py").table().splitlines()[2:]
    assert all(row.endswith(" | apache-2.0 |") for row in rows)
    assert [row.split("`")[1] for row in rows] == list(PUBLISHED)
    for row, name in zip(rows, PUBLISHED):
        metrics = json.loads((hub.SHIPPED_MODELS / name / hub.CONFIG_NAME).read_text())
        metrics = metrics["pretrained_cfg"]["veloxseg"]["metrics"]
        assert "?" not in row and " steps of " in row, row
        number = metrics.get("test_dice", metrics.get("test_masked_rc_mse"))
        assert f"{number:.3f}" in row, row
    assert sum("(default)" in row for row in rows) == len({name.split(".")[0] for name in PUBLISHED})


def test_tissue_tags_show_their_numbers_on_a_brain_of_another_source():
    from veloxseg.provenance import held_out
    from veloxseg.variants import PUBLISHED

    tissue = [name for name in PUBLISHED if name.endswith(".mni152_tissue")]
    assert tissue
    for name in tissue:
        metrics = json.loads((hub.SHIPPED_MODELS / name / hub.CONFIG_NAME).read_text())
        metrics = metrics["pretrained_cfg"]["veloxseg"]["metrics"]
        unseen = sorted(v for k, v in metrics.items() if k.startswith("colin27_dice_"))
        assert len(unseen) >= 3, name  # without fine-tuning, at several resolutions
        words = held_out(metrics)
        assert f"unseen Colin27 T1 {unseen[0]:.3f}-{unseen[-1]:.3f} at 1/" in words, words
        assert f"fine-tuned on it {metrics['colin27_finetune_dice']:.3f}" in words, words
        assert metrics["colin27_finetune_dice"] > metrics["colin27_scratch_dice"], name
        index = ModelCard.load(hub.SHIPPED_MODELS / name / hub.CARD_NAME).data.eval_results
        on_colin27 = {r.metric_type for r in index if r.dataset_type == "colin27"}
        assert on_colin27 == {k.removeprefix("colin27_") for k in metrics if k.startswith("colin27_")}, name


def test_unseen_source_names_the_mirrored_numbers_apart():
    from veloxseg.provenance import unseen_source

    plain = {"colin27_dice_1mm": 0.71, "colin27_dice_1_5mm": 0.73, "colin27_dice_3mm": 0.72}
    assert unseen_source(plain) == ["unseen Colin27 T1 0.710-0.730 at 1/1.5/3 mm"]
    mirrored = plain | {"colin27_tta_dice_1mm": 0.75, "colin27_tta_dice_3mm": 0.74}
    assert unseen_source(mirrored) == ["unseen Colin27 T1 0.710-0.730 at 1/1.5/3 mm (with --tta 0.740-0.750)"]


def test_every_tag_file_and_table_is_made_from_the_tags_metadata(tmp_path):
    tags_table = load_script(ROOT / "hub" / "tags_table.py")
    assert tags_table.check() == []  # cards, NOTICEs, config.json descriptions, hashes, tags.md, MODEL_CARD.md
    name = "veloxseg_small.mni152_tissue"
    shutil.copytree(hub.SHIPPED_MODELS / name, tmp_path / name)
    config = json.loads((tmp_path / name / hub.CONFIG_NAME).read_text())
    config["pretrained_cfg"]["veloxseg"]["metrics"]["test_dice"] = 0.5  # a fact changed at its source
    (tmp_path / name / hub.CONFIG_NAME).write_text(json.dumps(config))
    files = tags_table.tag_files(name, tmp_path)
    assert files["README.md"] != (tmp_path / name / hub.CARD_NAME).read_text()
    cases = config["pretrained_cfg"]["veloxseg"]["evaluation_cases"]["test"]
    assert f"| test_dice | 0.5 | test | {cases} |" in files["README.md"]
    assert f"test ({cases} cases): Dice 0.500" in json.loads(files["config.json"])["pretrained_cfg"]["description"]
    budget = config["pretrained_cfg"]["veloxseg"]["publication"]["budget"]
    assert tags_table.row(name, tmp_path).startswith(f"| `{name}` (default) | MNI152BrainTissue | {budget} |")
    hd95 = config["pretrained_cfg"]["veloxseg"]["metrics"]["test_hd95"]
    assert f" | Dice 0.500, HD95 {hd95:.1f} mm; unseen Colin27 T1 " in tags_table.row(name, tmp_path)
