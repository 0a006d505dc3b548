"""Issue 15: bad inputs through the API and the ``veloxseg`` command each get an error naming the problem
(no traceback: the command exits 2) and write nothing."""

import hashlib
import json
import os
import re
import runpy
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import safetensors.torch
import torch
from accelerate.state import AcceleratorState, GradientState

import veloxseg
import veloxseg.data.demo
import veloxseg.training.data
from veloxseg.cli import main
from veloxseg.config import VeloxSegConfig
from veloxseg.data.datasets import DatasetError, read_dataset, validate_dataset
from veloxseg.data.demo import make_demo_dataset
from veloxseg.hub import read_config
from veloxseg.metadata import ChannelInfo, ModelMetadata
from veloxseg.predict import predict
from veloxseg.training import TrainConfig
from veloxseg.training.config import resolve

from .conftest import SMALL_ROI, tiny_model

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


@pytest.fixture(scope="module")
def model() -> veloxseg.VeloxSeg:
    channels = [ChannelInfo("PET", 0), ChannelInfo("CT", 1, "ct", (-1000.0, 1000.0), 0.0, 1000.0)]
    return tiny_model(ModelMetadata(channels, {"background": 0, "lesion": 1}))


@pytest.fixture
def case(tmp_path) -> list[Path]:
    """A two-channel case of smooth random images, ``in/scan_0000.nii.gz`` and ``in/scan_0001.nii.gz``."""
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    files = []
    for channel in range(2):
        path = tmp_path / "in" / f"scan_{channel:04d}.nii.gz"
        nib.save(nib.Nifti1Image(rng.normal(size=(20, 22, 18)).astype(np.float32), AFFINE), path)
        files.append(path)
    return files


def files_under(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*"))


def predict_cli(model_name: str, inputs: list[Path], output: Path, *options: str) -> int:
    return main(["predict", "--model", model_name, "-i", *map(str, inputs), "-o", str(output), *options])


# --- configuration fields ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "field, value, message",
    [
        ("n_classes", "two", "config field n_classes must be an int, e.g. 2; got 'two'"),
        ("base_ch", 16.5, "config field base_ch must be an int"),
        ("deep_supervision", "yes", "config field deep_supervision must be a bool"),
        ("attn_drop", "high", "config field attn_drop must be a number"),
        (
            "group_channels", 2,
            "config field group_channels must be a list of ints, e.g. [1, 1] (two single-channel modality groups) or [4]",
        ),
        ("big_windows", [2, 2, 2, 2], "config field big_windows must be a list of lists of 3 ints"),
        ("roi_size", [64, 64], "config field roi_size must be a list of 3 ints"),
        ("n_classes", 1, "n_classes counts the background: use 2 for one structure"),
    ],
)  # fmt: skip
def test_bad_config_field_is_named(model_dir, case, tmp_path, capsys, field, value, message):
    with pytest.raises((TypeError, ValueError), match=re.escape(message)):
        veloxseg.create_model("veloxseg_tiny", **{field: value})
    folder = tmp_path / "edited"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_args"][field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json"):
        read_config(folder / "config.json")
    before = files_under(tmp_path)
    assert predict_cli(f"local-dir:{folder}", case, tmp_path / "out" / "seg.nii.gz") == 2
    err = capsys.readouterr().err
    assert message in err and "config.json" in err and "Traceback" not in err
    assert files_under(tmp_path) == before


def test_roi_size_int_is_a_cube():
    assert VeloxSegConfig(roi_size=64, big_windows=SMALL_ROI["big_windows"]).roi_size == (64, 64, 64)


# --- model inputs -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "make, got",
    [
        (lambda: torch.zeros(1, 2, 64, 64, 64, dtype=torch.float64), "got torch.float64"),
        (lambda: torch.zeros(1, 2, 64, 64, 64, dtype=torch.float16), "got torch.float16"),
        (lambda: torch.zeros(1, 2, 64, 64, 64, dtype=torch.int64), "got torch.int64"),
        (lambda: np.zeros((1, 2, 64, 64, 64), dtype=np.float32), "got a numpy.ndarray"),
    ],
)
def test_model_names_the_input_it_takes(model, make, got):
    with pytest.raises(ValueError, match=f"takes a torch.Tensor of its weights' dtype torch.float32, {got}"):
        model(make())


# --- metadata -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "change, message",
    [
        ({"channels": [{"name": "PET", "group": 0, "normalisation": "zcore"}, {"name": "CT", "group": 1}]},
         "channel 'PET': unknown normalisation 'zcore'"),
        ({"channels": [{"name": "PET", "group": 0}, {"name": "CT", "group": 1, "normalisation": "ct"}]},
         "channel 'CT': 'ct' normalisation needs the dataset's mean and a nonzero std"),
        ({"spacing": [0, 2, 3]}, "metadata spacing must be three numbers > 0"),
        ({"spacing": [1.5, -2, 3]}, "metadata spacing must be three numbers > 0"),
        ({"orientation": "RAA"}, "metadata orientation must be three axis codes"),
    ],
)  # fmt: skip
def test_bad_metadata_is_refused_when_the_folder_loads(model_dir, case, tmp_path, capsys, change, message):
    folder = tmp_path / "edited"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_cfg"]["veloxseg"].update(change)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        veloxseg.create_model(f"local-dir:{folder}")
    before = files_under(tmp_path)
    assert predict_cli(f"local-dir:{folder}", case, tmp_path / "out" / "seg.nii.gz") == 2
    assert message in capsys.readouterr().err
    assert files_under(tmp_path) == before


# --- predict: model names, outputs, devices, inputs -------------------------------------------------

@pytest.mark.parametrize("name", ["local-dir:", "hf-hub:", "local-dir:  "])
def test_empty_model_location_is_named(case, tmp_path, capsys, name):
    with pytest.raises(ValueError, match="names no"):
        veloxseg.create_model(name)
    before = files_under(tmp_path)
    assert predict_cli(name, case, tmp_path / "seg.nii.gz") == 2
    err = capsys.readouterr().err
    assert "names no" in err and "local-dir:/path/to/folder" in err
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("output", ["out/seg.png", "seg.nii.gz.bak"])
def test_non_nifti_output_refused_by_cli_and_api_alike(model, model_dir, case, tmp_path, capsys, output):
    before = files_under(tmp_path)
    with pytest.raises(ValueError, match="must be a .nii or .nii.gz file"):
        predict(model, case, tmp_path / output)
    assert predict_cli(f"local-dir:{model_dir}", case, tmp_path / output) == 2
    assert "must be a .nii or .nii.gz file" in capsys.readouterr().err
    assert predict_cli(f"local-dir:{model_dir}", [case[0].parent], tmp_path / output) == 2  # a folder of cases
    assert "the output must be a folder" in capsys.readouterr().err
    assert files_under(tmp_path) == before


def test_output_folder_without_extension_still_works(model_dir, case, tmp_path):
    assert predict_cli(f"local-dir:{model_dir}", case, tmp_path / "predictions", "--device", "cpu") == 0
    assert [p.name for p in (tmp_path / "predictions").iterdir()] == ["scan.nii.gz"]


@pytest.mark.parametrize("device, message", [("cuda", "no usable CUDA GPU"), ("gpu0", "is not a torch device")])
def test_unavailable_device_is_named(model, model_dir, case, tmp_path, capsys, monkeypatch, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=message):
        predict(model, case, device=device)
    before = files_under(tmp_path)
    assert predict_cli(f"local-dir:{model_dir}", case, tmp_path / "out" / "seg.nii.gz", "--device", device) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert files_under(tmp_path) == before


def test_label_map_given_as_a_channel_is_warned_about(model, model_dir, case, tmp_path, capsys):
    label = tmp_path / "in" / "label.nii.gz"
    mask = np.zeros((20, 22, 18), dtype=np.uint8)
    mask[5:10, 5:10, 5:10] = 1
    nib.save(nib.Nifti1Image(mask, AFFINE), label)
    with pytest.warns(UserWarning, match=r"input channel 1 \(CT\) .*label.nii.gz.* holds only the values \[0, 1\]"):
        predict(model, [case[0], label])
    assert predict_cli(f"local-dir:{model_dir}", [case[0], label], tmp_path / "seg.nii.gz") == 0
    assert "veloxseg predict: warning: input channel 1 (CT)" in capsys.readouterr().err
    with warnings.catch_warnings():  # real images: no warning
        warnings.simplefilter("error", UserWarning)
        predict(model, case)


# --- datasets -----------------------------------------------------------------------------------------

def test_labels_without_foreground_are_refused_for_segmentation(tmp_path):
    root = make_demo_dataset(tmp_path / "Dataset001_Empty", num_train=3, num_test=0, shape=(24, 24, 24))
    spec = read_dataset(root)
    validate_dataset(spec, require_foreground=True)  # the demo labels hold lesions
    for case in spec.training:
        img = nib.load(case.label)
        nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), case.label)
    validate_dataset(spec)  # a valid dataset, for self-supervised pretraining
    with pytest.raises(DatasetError, match="no training label holds a foreground voxel"):
        validate_dataset(spec, require_foreground=True)


# --- the trainer: examples/train.py and train() ---------------------------------------------------------

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train.py"
FAST_TRAIN = ["--model", "veloxseg_tiny", "--roi", "64", "--num-workers", "0", "--no-progress", "--max-steps", "1"]


def train_script(monkeypatch: pytest.MonkeyPatch, *args: str) -> int | str | None:
    """Run examples/train.py in this process; its exit code (a refusal exits with its message; 0: success;
    None: it returned without exiting)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    monkeypatch.setattr(sys, "argv", [str(TRAIN_SCRIPT), *FAST_TRAIN, *args])
    try:
        runpy.run_path(str(TRAIN_SCRIPT), run_name="__main__")
    except SystemExit as exit_info:
        return exit_info.code
    return None


def small_demo(out: Path) -> Path:
    return make_demo_dataset(out, num_train=3, num_test=0, shape=(40, 40, 32))


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    return small_demo(tmp_path_factory.mktemp("small") / "Dataset001_Small")


@pytest.fixture(scope="module")
def empty_labels(tmp_path_factory) -> Path:
    """A demo dataset whose labels hold no foreground voxel."""
    root = small_demo(tmp_path_factory.mktemp("empty") / "Dataset002_Empty")
    for path in (root / "labelsTr").iterdir():
        img = nib.load(path)
        nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), path)
    return root


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--crops-per-volume", "0"], "crops_per_volume must be >= 1, got 0"),
        (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
        (["--batch-size", "3", "--crops-per-volume", "2"], "crops_per_volume (2) must divide batch_size (3 patches)"),
        (["--spacing", "0", "2", "3"], "spacing must be three numbers > 0 (mm per voxel along X, Y, Z), got [0.0, 2.0, 3.0]"),
        (["--spacing", "1", "-2", "3"], "spacing must be three numbers > 0"),
        (["--roi", "48"], "each axis must be a multiple of [32, 32, 32]; roi sizes that work for veloxseg_tiny "
                          "include the cubes 64, 96, 128, 160"),
        (["--roi", "32"], "use at least 64 on some axis; roi sizes that work for veloxseg_tiny include the cubes 64"),
        (["--model", "local-dir:"], "names no folder"),
        (["--model", "veloxseg_tiny.no_such_tag", "--pretrained"], "unknown pretrained tag 'veloxseg_tiny.no_such_tag'"),
        (["--data", "EMPTY"], "no training label holds a foreground voxel"),
        (["--lr", "0"], "lr must be > 0, got 0.0"),
        (["--lr", "-1"], "lr must be > 0, got -1.0"),
        (["--lr", "nan"], "lr must be > 0, got nan"),
        (["--lr", "1e-3", "--min-lr", "1e-2"], "min_lr must be in [0, lr = 0.001] (the schedule decays to it), got 0.01"),
        (["--max-grad-norm", "-1"], "max_grad_norm must be > 0 (or 0: no clipping), got -1.0"),
        (["--weight-decay", "-0.1"], "weight_decay must be >= 0, got -0.1"),
        (["--warmup-steps", "-5"], "warmup_steps must be >= 0, got -5"),
        (["--sw-overlap", "1"], "sw_overlap must be in [0, 1), got 1.0"),
        (["--val-fraction", "0"], "val_fraction must be in (0, 1), got 0.0"),
        (["--fold", "-1"], "fold must be >= 0, got -1"),
        (["--threads", "0"], "threads must be >= 1, got 0"),
        (["--rc-weight", "-1"], "rc_weight must be >= 0, got -1.0"),
        (["--max-nonfinite-steps", "-1"], "max_nonfinite_steps must be >= 0, got -1"),
        (["--resume"], "holds no run to continue (no train_config.json); start without resume"),
        (["--data", "FILE"], "is a file: give the dataset's folder"),
        (["--data", "MISSING"], "does not exist: give the dataset's folder"),
    ],
)  # fmt: skip
def test_refused_training_run_names_the_problem_and_writes_nothing(
    monkeypatch, tmp_path, empty_labels, flags, message
):
    out = tmp_path / "out"
    monkeypatch.setattr(veloxseg.training.data, "make_demo_dataset", small_demo)  # the demo data, small
    (tmp_path / "file").write_text("not a dataset")
    paths = {"EMPTY": str(empty_labels), "FILE": str(tmp_path / "file"), "MISSING": str(tmp_path / "missing")}
    before = tree_state(tmp_path)
    code = train_script(monkeypatch, "--output-dir", str(out), *(paths.get(flag, flag) for flag in flags))
    assert isinstance(code, str) and code.startswith("error: ") and message in code, code
    assert not out.exists() and tree_state(tmp_path) == before


def test_refused_run_leaves_an_existing_output_folder_as_it_was(monkeypatch, tmp_path, empty_labels):
    out = tmp_path / "out"
    out.mkdir()
    code = train_script(monkeypatch, "--output-dir", str(out), "--data", str(empty_labels))
    assert "no training label holds a foreground voxel" in code
    assert list(out.iterdir()) == []  # no train_config.json


@pytest.mark.parametrize("batch_size, crops", [(1, 1), (2, 2), (3, 1), (4, 2)])
def test_crops_per_volume_defaults_to_a_divisor_of_the_batch(batch_size, crops):
    config = resolve(TrainConfig(model="veloxseg_tiny", batch_size=batch_size))
    assert config.crops_per_volume == crops and config.batch_size == batch_size


def test_batch_size_one_alone_trains(monkeypatch, tmp_path, small_data):
    out = tmp_path / "out"
    assert train_script(monkeypatch, "--output-dir", str(out), "--data", str(small_data), "--batch-size", "1") == 0
    assert json.loads((out / "train_config.json").read_text())["crops_per_volume"] == 1
    assert (out / "model.safetensors").is_file()


# --- issue 35: nothing lost. Every refusal leaves every file around it as it was (hashed). ------------

def tree_state(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder``: relative path -> SHA-256 of the content ("dir" for folders)."""
    return {
        str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture
def workspace(model_dir, tmp_path, monkeypatch) -> Path:
    """tmp_path/work/sub as the current folder, beside a copy of the model folder and a folder of the user's files."""
    shutil.copytree(model_dir, tmp_path / "work" / "model")
    (tmp_path / "work" / "sub").mkdir()
    (tmp_path / "work" / "notes").mkdir()
    (tmp_path / "work" / "notes" / "results.csv").write_text("case,dice\n1,0.8\n")
    (tmp_path / "work" / "notes.onnx").write_text("not an onnx file")
    monkeypatch.chdir(tmp_path / "work" / "sub")
    return tmp_path / "work"


@pytest.mark.parametrize(
    "format, output, message",
    [
        ("monai-bundle", "..", "is the current folder or one of its parents"),
        ("monai-bundle", ".", "is the current folder or one of its parents"),
        ("onnx", "..", "is the current folder or one of its parents"),
        ("monai-bundle", "../notes", "exists and is not a MONAI bundle written by veloxseg export"),
        ("monai-bundle", "../model", "is one of the inputs or would replace one"),
        ("onnx", "../model", "is one of the inputs or would replace one"),
        ("onnx", "../model/model.safetensors", "is one of the inputs or would replace one"),
        ("torchscript", "../model/config.json", "is one of the inputs or would replace one"),
        ("onnx", "../notes", "exists and is not an ONNX file written by veloxseg export"),
        ("onnx", "../notes.onnx", "exists and is not an ONNX file written by veloxseg export"),
        ("torchscript", "../notes.onnx", "exists and is not a TorchScript file written by veloxseg export"),
    ],
)
def test_export_overwrite_replaces_only_its_own_kind(workspace, capsys, format, output, message):
    before = tree_state(workspace.parent)
    command = ["export", "--model", "local-dir:../model", "--format", format, "-o", output, "--overwrite"]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert tree_state(workspace.parent) == before


def test_export_bundle_overwrite_replaces_a_bundle_only(workspace, model, capsys):
    out = workspace / "bundle"
    command = ["export", "--model", "local-dir:../model", "--format", "monai-bundle", "-o", str(out)]
    assert main(command) == 0
    assert main([*command, "--overwrite"]) == 0  # a bundle over a bundle
    assert sorted(p.name for p in workspace.iterdir()) == ["bundle", "model", "notes", "notes.onnx", "sub"]
    (out / "eval").mkdir()  # MONAI's runner wrote results into it: no longer only a bundle
    (out / "eval" / "case.nii.gz").write_bytes(b"results")
    before = tree_state(workspace)
    assert main([*command, "--overwrite"]) == 2
    assert "is not a MONAI bundle" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is not a MONAI bundle"):
        veloxseg.bundle.export_bundle(model, out, overwrite=True)
    assert tree_state(workspace) == before


def test_predict_output_folder_named_like_a_file_is_refused_before_inference(model_dir, case, tmp_path, capsys):
    (tmp_path / "seg.nii.gz").mkdir()
    (tmp_path / "seg.nii.gz" / "mine.txt").write_text("keep")
    before = tree_state(tmp_path)
    assert predict_cli(f"local-dir:{model_dir}", case, tmp_path / "seg.nii.gz", "--overwrite") == 2
    err = capsys.readouterr().err
    assert "seg.nii.gz exists and is not a file" in err and "Traceback" not in err
    assert tree_state(tmp_path) == before


# --- issue 35, the trainer: its folders, one writer, resume, splits, NaNs -------------------------------

def refused(code: int | str | None, message: str) -> None:
    assert isinstance(code, str) and code.startswith("error: ") and message in code, code
    assert "\n" not in code and "Traceback" not in code, code


def test_trainer_never_replaces_what_it_did_not_write(monkeypatch, tmp_path, small_data):
    monkeypatch.setattr(veloxseg.training.data, "make_demo_dataset", small_demo)
    (tmp_path / "cache" / "demo").mkdir(parents=True)  # the user's own folder, where the demo data would go
    (tmp_path / "cache" / "demo" / "notes.txt").write_text("mine")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "README.md").write_text("my folder")
    (tmp_path / "a_file").write_text("not a folder")
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    before = tree_state(tmp_path)
    cases = [
        (["--cache-dir", str(tmp_path / "cache")], "demo exists but holds no dataset.json"),
        (["--data", str(data), "--output-dir", str(data)], "is the data folder"),
        (["--data", str(data), "--output-dir", str(tmp_path / "mine")], "already holds files (README.md)"),
        (["--data", str(data), "--output-dir", str(tmp_path / "a_file" / "run")], "a_file is a file, not a folder"),
    ]
    for flags, message in cases:
        refused(train_script(monkeypatch, "--output-dir", str(tmp_path / "out"), *flags), message)
        assert tree_state(tmp_path) == before, flags


def test_demo_data_refuses_a_folder_that_is_not_empty(tmp_path, capsys):
    (tmp_path / "README.md").write_text("my notes")
    before = tree_state(tmp_path)
    assert main(["demo-data", str(tmp_path), "--num-train", "2", "--num-test", "0"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert tree_state(tmp_path) == before


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, small_data) -> Path:
    """A finished one-step run (its folder is copied by the tests that change it)."""
    out = tmp_path_factory.mktemp("run") / "out"
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert train_script(monkeypatch, "--output-dir", str(out), "--data", str(small_data)) == 0
    return out


def test_a_run_folder_has_one_writer(monkeypatch, tmp_path, small_data, finished_run):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    assert not (out / "run.lock").exists()  # released at the end
    host = socket.gethostname()
    (out / "run.lock").write_text(json.dumps({"pid": os.getppid(), "host": host}))  # a live process holds it
    before = tree_state(tmp_path)
    code = train_script(monkeypatch, "--output-dir", str(out), "--data", str(small_data), "--resume")
    refused(code, f"is in use by another run (pid {os.getppid()} on {host}")
    assert tree_state(tmp_path) == before
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / "run.lock").write_text(json.dumps({"pid": int(gone.stdout), "host": host}))  # a crashed run's lock
    watched = ["--val-every", "7", "--log-every", "3", "--num-workers", "0", "--keep-checkpoints", "1"]  # may change
    assert train_script(monkeypatch, "--output-dir", str(out), "--data", str(small_data), "--resume", *watched) == 0
    assert not (out / "run.lock").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "1e-3"], "--lr 0.008 -> 0.001"),
        (["--data", "OTHER"], "--data"),
        (["--model", "veloxseg_small"], "--model veloxseg_tiny -> veloxseg_small"),
        (["--recipe", "paper", "--lr", "8e-3"], "--recipe default -> paper"),
        (["--max-steps", "2", "--seed", "1"], "--max-steps 1 -> 2; --seed 0 -> 1"),
    ],
)
def test_resume_refuses_changes_that_alter_the_run(monkeypatch, tmp_path, small_data, finished_run, flags, message):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    shutil.copytree(small_data, tmp_path / "other")
    flags = [str(tmp_path / "other") if flag == "OTHER" else flag for flag in flags]
    before = tree_state(tmp_path)
    code = train_script(monkeypatch, "--output-dir", str(out), "--data", str(small_data), "--resume", *flags)
    refused(code, "resume: these settings differ from the run in")
    assert message in code and "train_config.json" in code
    assert tree_state(tmp_path) == before  # train_config.json included


@pytest.mark.parametrize(
    "splits, message",
    [
        ([{"train": ["case_0000", "case_0001"], "val": ["case_0001", "case_0002"]}],
         "1 case(s) in both train and val (case_0001): validation would score cases the model trained on"),
        ([{"train": ["case_0000", "case_0001", "case_0002"], "val": []}], "fold 0: its val list is empty"),
        ([{"train": [], "val": ["case_0000"]}], "fold 0: its train list is empty"),
    ],
)  # fmt: skip
def test_bad_splits_are_refused_before_training(monkeypatch, tmp_path, small_data, splits, message):
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    (data / "splits_final.json").write_text(json.dumps(splits))
    before = tree_state(tmp_path)
    code = train_script(monkeypatch, "--output-dir", str(tmp_path / "out"), "--data", str(data))
    assert isinstance(code, str) and message in code, code
    assert tree_state(tmp_path) == before


def test_nonfinite_step_leaves_the_weights_and_stops_after_the_limit(model):
    from accelerate import Accelerator

    from veloxseg.losses import VeloxSegLoss
    from veloxseg.training.loop import count_nonfinite_step
    from veloxseg.training.step import train_step

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True)
    network = veloxseg.create_model("veloxseg_tiny", **SMALL_ROI)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    network, optimizer, scheduler = accelerator.prepare(network, optimizer, scheduler)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    image = torch.randn(1, 2, 64, 64, 64)
    image[0, 0, 3, 3, 3] = 3e38  # finite (a NaN is refused by the forward), but overflows inside the network
    batch = {"image": image, "label": torch.zeros(1, 1, 64, 64, 64)}
    terms = train_step(network, batch, VeloxSegLoss(1.0, 0.0, 0.0), optimizer, scheduler, accelerator)
    assert not torch.isfinite(terms["grad_norm"])
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())  # no update
    state = {"step": 7, "nonfinite_steps": 2}
    count_nonfinite_step(state, 3, float("nan"), accelerator)  # the third: skipped
    with pytest.raises(FloatingPointError, match=r"step 7: NaN or infinite loss or gradients in 4 steps, more than "):
        count_nonfinite_step(state, 3, float("nan"), accelerator)


def test_nonfinite_weights_are_never_saved_loaded_or_predicted_with(model, model_dir, case, tmp_path, capsys):
    from accelerate import Accelerator

    from veloxseg.training.checkpoints import save_model

    broken = veloxseg.create_model(f"local-dir:{model_dir}", pretrained=True)
    with torch.no_grad():
        broken.decoder.head.weight[0].fill_(float("nan"))
    with pytest.raises(ValueError, match=r"the model's output of .*scan_0000.nii.gz.* holds \d+ NaN or infinite"):
        predict(broken, case, tmp_path / "seg.nii.gz")
    with pytest.raises(FloatingPointError, match="the model's weights hold NaN or infinite values"):
        save_model(Accelerator(cpu=True), broken, tmp_path / "best", ModelMetadata.default((1, 1), 2), {})
    assert not (tmp_path / "best").exists() and not (tmp_path / "seg.nii.gz").exists()
    folder = tmp_path / "nan_model"
    shutil.copytree(model_dir, folder)
    weights = veloxseg.hub.read_weights(folder / "model.safetensors")
    weights["decoder.head.weight"][0] = float("inf")
    safetensors.torch.save_file(weights, folder / "model.safetensors")
    with pytest.raises(ValueError, match="weight tensor.s. hold NaN or infinite values .e.g. decoder.head.weight."):
        veloxseg.create_model(f"local-dir:{folder}", pretrained=True)
    before = tree_state(tmp_path)
    assert predict_cli(f"local-dir:{folder}", case, tmp_path / "out.nii.gz") == 2
    err = capsys.readouterr().err
    assert "hold NaN or infinite values" in err and len(err.strip().splitlines()) == 1
    assert tree_state(tmp_path) == before


def test_a_diverged_run_stops_naming_the_step_and_saves_no_model(monkeypatch, tmp_path, small_data):
    from veloxseg.losses import VeloxSegLoss

    real_loss = VeloxSegLoss.forward
    def nan_loss(self: VeloxSegLoss, *args, **kwargs) -> dict:
        return {name: value * float("nan") for name, value in real_loss(self, *args, **kwargs).items()}

    monkeypatch.setattr(VeloxSegLoss, "forward", nan_loss)
    out = tmp_path / "out"
    code = train_script(monkeypatch, "--output-dir", str(out), "--data", str(small_data), "--max-nonfinite-steps", "0")
    refused(code, "step 1: NaN or infinite loss or gradients in 1 steps, more than max_nonfinite_steps (0)")
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "train_config.json"]  # no model, best/, lock


# --- issue 35, predict: heads that never learnt to segment, inputs that ended in tracebacks ----------

@pytest.mark.parametrize(
    "name, flags, message",
    [
        ("veloxseg_tiny", [], "veloxseg_tiny without --pretrained has random weights"),
        ("veloxseg_tiny.petct_lesions", [], "veloxseg_tiny.petct_lesions without --pretrained has random weights"),
        ("veloxseg_tiny.ssl_generalist", ["--pretrained"], "holds self-supervised weights: its segmentation head"),
    ],
)
def test_predict_refuses_an_untrained_head_unless_allowed(case, tmp_path, capsys, name, flags, message):
    before = tree_state(tmp_path)
    assert predict_cli(name, case, tmp_path / "seg.nii.gz", *flags) == 2
    err = capsys.readouterr().err
    assert message in err and "--allow-untrained-head" in err and len(err.strip().splitlines()) == 1, err
    assert tree_state(tmp_path) == before


def test_predict_with_an_allowed_untrained_head_warns(model_dir, case, tmp_path, capsys):
    folder = tmp_path / "ssl"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_cfg"]["veloxseg"]["training_command"] = "python examples/train.py --stage=pretrain --data d"
    (folder / "config.json").write_text(json.dumps(config))
    assert predict_cli(f"local-dir:{folder}", case, tmp_path / "seg.nii.gz") == 2
    assert "its segmentation head was never trained" in capsys.readouterr().err
    assert predict_cli(f"local-dir:{folder}", case, tmp_path / "seg.nii.gz", "--allow-untrained-head") == 0
    assert "warning: local-dir:" in capsys.readouterr().err and (tmp_path / "seg.nii.gz").is_file()


def test_former_tracebacks_are_one_line_errors(model, model_dir, case, tmp_path, capsys):
    from veloxseg.convert import load_reference

    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    before = tree_state(tmp_path)
    assert predict_cli(f"local-dir:{model_dir}", [tmp_path / "x.png"], tmp_path / "seg.nii.gz") == 2
    err = capsys.readouterr().err
    assert "x.png: not NIfTI (.nii or .nii.gz)" in err and len(err.strip().splitlines()) == 1, err
    assert tree_state(tmp_path) == before
    with pytest.raises(ValueError, match="input 0 is a numpy.ndarray: give a NIfTI path or a nibabel image"):
        predict(model, np.zeros((20, 20, 20), np.float32))
    with pytest.raises(ValueError, match="config 'cfg.json' is neither a JSON object nor the path of a JSON file"):
        load_reference({}, "cfg.json")
    for out_indices in ((), (4,), 0):
        with pytest.raises(ValueError, match="out_indices must name encoder levels among 0..3"):
            veloxseg.create_model("veloxseg_tiny", features_only=True, out_indices=out_indices)


def test_hf_dataset_offline_is_one_line(monkeypatch, tmp_path):
    code = train_script(
        monkeypatch, "--output-dir", str(tmp_path / "out"), "--hf-dataset", "someone/no-such-dataset",
        "--hf-image-columns", "ct", "--hf-labels", '{"background": 0, "lesion": 1}',
    )  # fmt: skip
    refused(code, "hf_dataset someone/no-such-dataset (split train) cannot be loaded")
    assert not (tmp_path / "out").exists()


# --- issue 35 leftovers -------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_nonfinite_voxel_is_named_not_turned_into_nan_logits(model, value):
    x = torch.randn(2, 2, 64, 64, 64)
    x[1, 1, 3, 4, 5] = value
    with pytest.raises(ValueError, match=r"input holds 1 non-finite voxels \(NaN/inf\) in channel\(s\) CT \(1\)"):
        model(x)
    with pytest.raises(ValueError, match="non-finite voxels"):
        model.forward_features(x)
    x[1, 1] = 0  # the same voxel in a group the sample lacks is never read
    x[0, 1, 0, 0, 0] = value
    assert torch.isfinite(model(x, present=torch.tensor([[True, False], [True, True]]))).all()
    assert torch.isfinite(model(x, present=["PET"])).all()


def test_nonfinite_check_stays_out_of_traced_graphs(model, monkeypatch):
    calls = []
    monkeypatch.setattr(model, "check_finite", lambda x, groups: calls.append(x.shape))
    x = torch.randn(1, 2, 64, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x, check_trace=False)
    assert calls == []  # a data-dependent check has no place in a graph (ONNX, TorchScript, torch.export)
    model(x)
    assert calls == [x.shape]
    x[0, 0, 1, 2, 3] = float("nan")
    assert torch.isnan(traced(x)).all()


def test_demo_data_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    before = tree_state(tmp_path)
    generate_case = veloxseg.data.demo.generate_case

    def crash_on_the_second_case(seed, index, *args, **kwargs):
        if index == 1:
            raise MemoryError("killed")
        return generate_case(seed, index, *args, **kwargs)

    monkeypatch.setattr(veloxseg.data.demo, "generate_case", crash_on_the_second_case)
    with pytest.raises(MemoryError):
        make_demo_dataset(tmp_path / "demo", num_train=2, num_test=0, shape=(24, 24, 24))
    assert tree_state(tmp_path) == before  # no half-written dataset, no temporary folder


@pytest.mark.parametrize("script", ["prepare_brain_templates", "prepare_brain_contrasts", "prepare_ssl_corpus"])
def test_prepare_scripts_never_replace_what_they_did_not_write(tmp_path, capsys, script):
    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    try:
        main_of_script = runpy.run_path(str(Path(__file__).parents[1] / "examples" / f"{script}.py"))["main"]
    finally:
        sys.path.pop(0)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "dataset.json").write_text('{"name": "my own dataset"}')
    (tmp_path / "a_file").write_text("not a folder")
    before = tree_state(tmp_path)
    for out, message in (("mine", "mine is not empty"), ("a_file", "a_file is a file")):
        for flags in ([], ["--overwrite"]):
            with pytest.raises(SystemExit) as exit_info:
                main_of_script([str(tmp_path / out), *flags])
            err = capsys.readouterr().err.strip().splitlines()
            assert exit_info.value.code == 2 and message in err[-1] and "Traceback" not in "".join(err), err
            assert tree_state(tmp_path) == before


def test_timm_checkpoint_path_takes_a_tag_file_or_says_in_one_line_why_not():
    import timm

    tag = Path(__file__).parents[1] / "hub" / "veloxseg_tiny.petct_lesions"
    weights, model_args = str(tag / "model.safetensors"), json.loads((tag / "config.json").read_text())["model_args"]
    with pytest.raises(ValueError) as refused_load:  # the variant's default ROI: other attention tables
        timm.create_model("veloxseg_tiny", checkpoint_path=weights)
    assert "\n" not in str(refused_load.value) and "of another shape (e.g. attention." in str(refused_load.value)
    with pytest.warns(UserWarning, match="training-only tensors .* keep their initialisation"):
        training = timm.create_model("veloxseg_tiny", checkpoint_path=weights, **{**model_args, "teachers": True})
    exact = timm.create_model("veloxseg_tiny", checkpoint_path=weights, **model_args)
    published = veloxseg.create_model("veloxseg_tiny.petct_lesions", pretrained=True).state_dict()
    assert exact.state_dict().keys() == published.keys()
    assert all(torch.equal(published[k], v) for k, v in [*exact.state_dict().items()])
    assert all(torch.equal(published[k], v) for k, v in training.state_dict().items() if k in published)
