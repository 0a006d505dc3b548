"""The package as a user installs it: the core without its extras, the extras each command names, the
``veloxseg`` command's entry points, and the core wheel without the weights."""

import importlib.util
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

import veloxseg
from veloxseg import cli
from veloxseg.variants import PUBLISHED, VARIANTS

from .conftest import SMALL_ROI

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter with every extra's packages made uninstalled by a meta-path hook.
CORE_ONLY = textwrap.dedent(
    """
    import importlib.abc, sys

    EXTRAS = {"monai", "nibabel", "scipy", "accelerate", "datasets", "matplotlib", "tensorboard", "ninja"}

    class NotInstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in EXTRAS:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, NotInstalled())

    import torch
    import veloxseg
    from veloxseg import cli

    windows = [[2, 2, 2], [4, 4, 4], [2, 2, 2], [2, 2, 2]]
    model = veloxseg.create_model("veloxseg_tiny", roi_size=(64, 64, 64), big_windows=windows).eval()
    with torch.no_grad():
        print("logits", tuple(model(torch.randn(1, 2, 64, 64, 64)).shape))
    print("loaded", sorted({m.split(".")[0] for m in sys.modules} & EXTRAS))
    for command in (["predict", "-i", "scan.nii.gz", "-o", "out"], ["train", "--help"], ["demo-data"]):
        print("exit", cli.main(command))
    """
)


def test_the_core_creates_and_runs_a_model_without_any_extra_and_commands_name_theirs():
    run = subprocess.run(
        [sys.executable, "-c", CORE_ONLY], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "logits (1, 2, 64, 64, 64)" in run.stdout and "loaded []" in run.stdout
    assert run.stdout.count("exit 2") == 3
    errors = run.stderr.strip().splitlines()
    assert errors == [
        'veloxseg predict: error: needs nibabel, which is not installed: pip install "veloxseg[predict]"',
        'veloxseg train: error: needs accelerate, which is not installed: pip install "veloxseg[train]"',
        'veloxseg demo-data: error: needs nibabel, which is not installed: pip install "veloxseg[predict]"',
    ]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"veloxseg {veloxseg.__version__}\n"


@pytest.mark.parametrize("entry", ["veloxseg train", "python -m veloxseg.train"])
def test_train_command_help_lists_the_trainer_flags(entry, capsys):
    from veloxseg.train import main

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"]) if entry == "veloxseg train" else main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith(f"usage: {entry} ")
    for flag in ("--model", "--data", "--stage", "--recipe", "--max-steps", "--resume", "--output-dir"):
        assert flag in out, flag
    assert "accelerate launch" in out  # the module's description: how to launch it


def test_train_command_reports_bad_data_without_a_traceback(tmp_path, capsys):
    assert cli.main(["train", "--data", str(tmp_path), "--output-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("veloxseg train: error: ") and "dataset.json not found" in error
    assert "Traceback" not in error and not (tmp_path / "out").exists()


def sdist_files(folder: str, names: list[str]) -> list[str]:
    """shutil.copytree's ``ignore``: what an sdist leaves out of veloxseg/, whose hub_models (a link to hub/)
    it holds the package data of only: each tag's config.json."""
    if "hub_models" not in Path(folder).parts:
        return ["__pycache__"]
    return [n for n in names if n != "config.json" and not ((Path(folder) / n).is_dir() and "." in n)]  # <variant>.<tag>


def test_the_core_wheel_holds_the_code_without_weights_under_1_mb(tmp_path):
    """The wheel of a copy of the package's sources (as an sdist would hold them); hub/ builds the weights'."""
    setuptools = pytest.importorskip("setuptools", reason="building the wheel needs setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"building the wheel needs setuptools >= 77, found {setuptools.__version__}")
    source = tmp_path / "src"
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (source / name).parent.mkdir(exist_ok=True)
        (source / name).write_bytes((ROOT / name).read_bytes())
    shutil.copytree(ROOT / "veloxseg", source / "veloxseg", ignore=sdist_files)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp_path,
         source], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if build.returncode != 0:
        pytest.skip(f"the wheel could not be built here: {build.stderr.strip().splitlines()[-1:]}")
    wheel = next(tmp_path.glob("veloxseg-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert wheel.stat().st_size < 1_000_000 and wheel.name == f"veloxseg-{veloxseg.__version__}-py3-none-any.whl"
    assert not [n for n in names if n.endswith((".safetensors", ".pt", ".pth", ".ckpt"))]
    assert {n for n in names if n.startswith("veloxseg/hub_models/")} == {
        f"veloxseg/hub_models/{tag}/config.json" for tag in PUBLISHED
    }  # the registry describes the tags from them
    for expected in ("veloxseg/train.py", "veloxseg/py.typed", "veloxseg/csrc/window_attention.cpp"):
        assert expected in names, expected
    metadata = zipfile.ZipFile(wheel).read(f"veloxseg-{veloxseg.__version__}.dist-info/METADATA").decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    core = sorted(r.split()[1].split(">")[0] for r in requires if "extra ==" not in r)
    assert core == ["huggingface_hub", "numpy", "safetensors", "timm", "torch"]
    assert "License-Expression: Apache-2.0" in metadata
    for extra in ("predict", "train", "optimize", "export", "weights", "all", "test"):
        assert f"Provides-Extra: {extra}" in metadata, extra


def test_the_weights_distribution_is_the_version_veloxseg_pins():
    """hub/ builds veloxseg-weights at veloxseg's version (the one whose registry records its files'
    SHA-256), and the [weights] extra pins exactly that version."""
    spec = importlib.util.spec_from_file_location("weights_init", ROOT / "hub" / "veloxseg_weights" / "__init__.py")
    weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(weights)
    assert weights.__version__ == veloxseg.__version__
    assert weights.MODELS.resolve() == (ROOT / "hub").resolve()  # the tag folders, in a checkout
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["optional-dependencies"]["weights"] == [f"veloxseg-weights=={veloxseg.__version__}"]
    hub_project = tomllib.loads((ROOT / "hub" / "pyproject.toml").read_text())
    assert hub_project["project"]["name"] == "veloxseg-weights" and hub_project["project"]["dependencies"] == []
    assert hub_project["tool"]["setuptools"]["packages"] == ["veloxseg_weights"]


def test_torch_hub_lists_and_loads_the_variants():
    spec = importlib.util.spec_from_file_location("hubconf", ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    # torch.hub.list's rule (it takes GitHub repos only): every public callable is an entry point
    entry_points = [name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")]
    assert sorted(entry_points) == sorted([*VARIANTS, "create_model"])
    assert set(hubconf.dependencies) <= {"torch", "timm", "huggingface_hub", "safetensors", "numpy"}
    model = torch.hub.load(str(ROOT), "veloxseg_tiny", source="local", verbose=False, n_classes=3, **SMALL_ROI)
    assert isinstance(model, veloxseg.VeloxSeg) and model.num_classes == 3 and model.config.roi_size == (64, 64, 64)


def test_citation_and_changelog_describe_this_version():
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["version"] == veloxseg.__version__ and citation["license"] == "Apache-2.0"
    assert citation["preferred-citation"]["title"].startswith("VeloxSeg: Johnson-Lindenstrauss Lemma Guided")
    assert f"## [{veloxseg.__version__}]" in (ROOT / "CHANGELOG.md").read_text()
    assert (ROOT / "LICENSE").read_text().split()[:4] == ["Apache", "License", "Version", "2.0,"]
