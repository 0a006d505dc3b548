"""Hub I/O offline: save_pretrained, a real Hub cache layout read through hf_hub_download, push_to_hub
against HfApi's autospec, model cards read back by huggingface_hub, pretrained tags, and the errors a
bad download gives."""

import dataclasses
import importlib.util
import json
import re
import shutil
from pathlib import Path
from unittest.mock import call, create_autospec

import huggingface_hub
import pytest
import timm
import torch
from huggingface_hub import HfApi, ModelCard

import veloxseg
from veloxseg import hub
from veloxseg.metadata import ChannelInfo, ModelMetadata
from veloxseg.variants import VARIANTS

from .conftest import SMALL_ROI

REPO = "org/veloxseg-tiny"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def metadata() -> ModelMetadata:
    return ModelMetadata(
        channels=[ChannelInfo("PET", 0), ChannelInfo("CT", 1, "ct", clip=(-1000.0, 1000.0), mean=40.0, std=300.0)],
        labels={"background": 0, "lesion": 1},
        spacing=(2.0, 2.0, 3.0),
        training_data="synthetic PET/CT phantoms",
        metrics={"dice": 0.625},
        datasets=["org/petct-phantoms"],
        training_command="accelerate launch examples/train.py --model veloxseg_tiny",
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory, metadata) -> tuple[veloxseg.VeloxSeg, Path, torch.Tensor, torch.Tensor]:
    """(eval-mode tiny model, its saved folder, an input, the model's output on it)."""
    torch.manual_seed(3)
    model = veloxseg.create_model("veloxseg_tiny", **SMALL_ROI).eval()
    folder = hub.save_pretrained(model, tmp_path_factory.mktemp("saved") / "model", metadata=metadata)
    x = torch.randn(1, 2, *SMALL_ROI["roi_size"])
    with torch.no_grad():
        return model, folder, x, model(x)


@pytest.fixture
def cache(offline_hub) -> Path:
    """The test's empty, offline Hub cache (conftest's ``offline_hub``)."""
    return offline_hub


def cache_repo(cache: Path, repo_id: str, folder: Path, revision: str = "main", sha: str = "a" * 40) -> Path:
    """Put a model folder into the cache as the Hub client leaves it: snapshots/<sha>/ plus refs/<revision>."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / sha
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(sha)
    return snapshot


def outputs(model: veloxseg.VeloxSeg, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_save_pretrained_writes_a_hub_folder(saved, metadata):
    model, folder, _, _ = saved
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "veloxseg_tiny"
    assert config["model_args"] == model.config.to_dict()
    assert config["pretrained_cfg"]["veloxseg"] == metadata.to_dict()
    assert not {"hf_hub_id", "file", "source", "tag"} & set(config["pretrained_cfg"])
    assert hub.read_weights(folder / "model.safetensors").keys() == model.state_dict().keys()

    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "apache-2.0" and card.data.library_name == "veloxseg"
    assert "veloxseg" in card.data.tags and card.data.datasets == ["org/petct-phantoms"]
    assert card.data.metrics == ["dice"] and "| dice | 0.625 |" in card.text
    assert card.data.pipeline_tag == "image-segmentation"
    results = [(r.task_type, r.dataset_type, r.metric_type, r.metric_value) for r in card.data.eval_results]
    assert results == [("image-segmentation", "org/petct-phantoms", "dice", 0.625)]  # the card's model-index
    assert metadata.training_command in card.text and metadata.training_data in card.text
    assert f"{model.inference_parameters():,}" in card.text and "2 x 2 x 3 mm" in card.text


def test_round_trip_through_the_offline_hub_cache(saved, cache, metadata):
    model, folder, x, expected = saved
    cache_repo(cache, REPO, folder)
    loaded = veloxseg.create_model(f"hf-hub:{REPO}", pretrained=True)
    assert torch.equal(outputs(loaded, x), expected)
    assert loaded.config == model.config and loaded.pretrained_cfg["hf_hub_id"] == REPO
    assert loaded.pretrained_cfg["veloxseg"] == metadata.to_dict()
    through_timm = timm.create_model(f"hf-hub:{REPO}", pretrained=True)  # timm's own hf-hub: loader
    assert all(torch.equal(a, b) for a, b in zip(through_timm.state_dict().values(), loaded.state_dict().values()))


def test_explicit_cache_dir(saved, tmp_path, monkeypatch):
    model, folder, _, _ = saved
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache_repo(tmp_path, REPO, folder)
    loaded = veloxseg.create_model(f"hf-hub:{REPO}", pretrained=True, cache_dir=tmp_path)
    assert torch.equal(loaded.decoder.head.weight, model.decoder.head.weight)


def test_revision_selects_its_snapshot(saved, cache, tmp_path):
    _, folder, _, _ = saved
    cache_repo(cache, REPO, folder)
    other = veloxseg.create_model("veloxseg_tiny", n_classes=3, **SMALL_ROI)
    cache_repo(cache, REPO, hub.save_pretrained(other, tmp_path / "v2"), revision="v2", sha="b" * 40)
    loaded = veloxseg.create_model(f"hf-hub:{REPO}@v2", pretrained=True)
    assert loaded.config.n_classes == 3
    assert torch.equal(loaded.decoder.head.weight, other.decoder.head.weight)


def test_local_dir_round_trip(saved):
    _, folder, x, expected = saved
    assert torch.equal(outputs(veloxseg.create_model(f"local-dir:{folder}", pretrained=True), x), expected)


def test_pretrained_tag_downloads_through_the_cache(saved, cache, metadata):
    model, folder, _, _ = saved
    cache_repo(cache, REPO, folder)
    overlay = dict(hf_hub_id=REPO)  # a repo of its own: the published files' hashes do not apply
    for create in (timm.create_model, veloxseg.create_model):
        loaded = create("veloxseg_tiny", pretrained=True, pretrained_cfg_overlay=overlay, **SMALL_ROI)
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
        assert loaded.pretrained_cfg["veloxseg"] == metadata.to_dict()  # the repo's, not the tag's generic one


def test_pretrained_with_overrides_adapts(saved):
    model, folder, _, _ = saved
    loaded = veloxseg.create_model(f"local-dir:{folder}", pretrained=True, group_channels=[4], n_classes=4)
    assert loaded.config.group_channels == (4,) and loaded.config.roi_size == model.config.roi_size
    assert torch.equal(loaded.encoder.stages[2][0].expand.weight, model.encoder.stages[2][0].expand.weight)
    assert len(loaded.pretrained_cfg["veloxseg"]["channels"]) == 4  # the PET/CT metadata no longer applies


def test_a_tag_without_published_weights_says_so():
    tag = next(n for n in veloxseg.list_models("veloxseg_small.*", pretrained=True))
    unpublished = dict(hf_hub_id=None, sha256=None)
    with pytest.raises(ValueError, match=rf"no trained weights are published for {re.escape(tag)} yet"):
        veloxseg.create_model(tag, pretrained=True, pretrained_cfg_overlay=unpublished)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_weights_name_the_file(saved, cache, damage):
    _, folder, _, _ = saved
    weights = cache_repo(cache, REPO, folder) / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x13" * 4096)
    with pytest.raises(ValueError, match=rf"{weights}: not a readable safetensors file, corrupt or truncated"):
        veloxseg.create_model(f"hf-hub:{REPO}", pretrained=True)


def test_weights_from_another_config_name_the_file(saved, cache, tmp_path):
    _, folder, _, _ = saved
    snapshot = cache_repo(cache, REPO, folder)
    other = hub.save_pretrained(veloxseg.create_model("veloxseg_tiny", n_classes=3, **SMALL_ROI), tmp_path / "o")
    shutil.copy(other / "model.safetensors", snapshot / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors: the weights do not match the config they came with"):
        veloxseg.create_model(f"hf-hub:{REPO}", pretrained=True)


def test_config_from_another_architecture_names_the_file(saved, cache):
    _, folder, _, _ = saved
    snapshot = cache_repo(cache, REPO, folder)
    resnet = timm.create_model("resnet18", pretrained=False)
    timm_config = {"architecture": "resnet18", "num_classes": 1000, "pretrained_cfg": resnet.pretrained_cfg}
    (snapshot / "config.json").write_text(json.dumps(timm_config))
    with pytest.raises(ValueError, match=rf"{snapshot / 'config.json'}: architecture 'resnet18' is not a VeloxSeg"):
        veloxseg.create_model(f"hf-hub:{REPO}", pretrained=True)
    (snapshot / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not a valid JSON file"):
        veloxseg.create_model(f"hf-hub:{REPO}")


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_file_missing_from_the_offline_cache_is_named(saved, cache, missing):
    _, folder, _, _ = saved
    (cache_repo(cache, REPO, folder) / missing).unlink()
    message = rf"{missing} of Hub repo {REPO}: not in the Hub cache .*HF_HUB_OFFLINE"
    with pytest.raises(FileNotFoundError, match=message):
        veloxseg.create_model(f"hf-hub:{REPO}", pretrained=True)


class FakeHub:
    """HfApi replaced by its autospec (the real signatures: a misspelt or missing argument fails) in
    veloxseg.hub; upload_folder keeps what the uploaded folder held."""

    def __init__(self, monkeypatch):
        self.api_class = create_autospec(HfApi)
        self.api, self.files = self.api_class.return_value, {}
        self.api.upload_folder.side_effect = self.upload_folder
        monkeypatch.setattr(hub, "HfApi", self.api_class)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        self.files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        return f"commit to {repo_id}"

    @property
    def calls(self) -> list[str]:
        return [name for name, _, _ in self.api.method_calls]


def test_push_to_hub_uploads_the_saved_folder(saved, monkeypatch, metadata):
    model, _, _, _ = saved
    fake = FakeHub(monkeypatch)
    assert model.push_to_hub("org/pushed", private=True, token="hf_x") == "commit to org/pushed"
    assert fake.api_class.call_args == call(token="hf_x")
    assert fake.calls == ["create_repo", "upload_folder"]
    assert fake.api.create_repo.call_args == call("org/pushed", private=True, exist_ok=True)
    upload = fake.api.upload_folder.call_args.kwargs
    assert upload["repo_id"] == "org/pushed" and upload["revision"] is None and not upload["create_pr"]
    assert upload["allow_patterns"] == ["config.json", "model.safetensors", "README.md", "NOTICE"]
    uploaded = json.loads(fake.files["config.json"])["pretrained_cfg"]["veloxseg"]
    assert uploaded == model.pretrained_cfg["veloxseg"]  # the model's own (generic) metadata
    assert 'create_model("hf-hub:org/pushed"' in fake.files["README.md"].decode()
    veloxseg.hub.push_to_hub(model, "org/pushed", metadata=metadata)
    assert json.loads(fake.files["config.json"])["pretrained_cfg"]["veloxseg"] == metadata.to_dict()


def test_license_notice_base_model_and_splits_travel_with_the_weights(saved, metadata, tmp_path, monkeypatch):
    model = saved[0]
    notice = "Derived from the Example Atlas (C) its authors: keep this notice with all copies.\n"
    kept = dataclasses.replace(
        metadata, license="other", notice=notice, base_model="veloxseg/veloxseg_small.mni152_tissue",
        metrics={"val_dice": 0.7, "test_dice": 0.6}, evaluation_cases={"validation": 4, "test": 8},
    )  # fmt: skip
    folder = hub.save_pretrained(model, tmp_path / "kept", metadata=kept)
    assert (folder / "NOTICE").read_text() == notice
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "other" and card.data.base_model == "veloxseg/veloxseg_small.mni152_tissue"
    results = {(r.dataset_split, r.metric_type, r.dataset_args["cases"], r.metric_value) for r in card.data.eval_results}
    assert results == {("validation", "dice", 4, 0.7), ("test", "dice", 8, 0.6)}  # never one split for both
    assert "not an independent test" in card.text
    # loaded and adapted to other channels, the weights still derive from that data: license and notice stay
    with pytest.warns(UserWarning, match="dropped"):
        adapted = veloxseg.create_model(f"local-dir:{folder}", pretrained=True, group_channels=[3])
    assert (tmp_path / "again" / "NOTICE").exists() is False
    assert (adapted.save_pretrained(tmp_path / "again") / "NOTICE").read_text() == notice
    fake = FakeHub(monkeypatch)
    adapted.push_to_hub("org/adapted")
    assert fake.files["NOTICE"].decode() == notice and "license: other" in fake.files["README.md"].decode()


def test_writes_are_atomic(saved, tmp_path, monkeypatch):
    model, folder, _, _ = saved
    target = shutil.copytree(folder, tmp_path / "copy")
    before = (target / "model.safetensors").read_bytes()

    def fail(tensors, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(hub, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        hub.save_pretrained(model, target)
    assert (target / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_metadata_that_does_not_fit_is_refused(saved, tmp_path):
    model, _, _, _ = saved
    wrong = ModelMetadata.default((1, 1, 1), 2)
    with pytest.raises(ValueError, match=r"groups \[0, 1, 2\] but the model's group_channels is \[1, 1\]"):
        hub.save_pretrained(model, tmp_path, metadata=wrong)


def load_publish():
    spec = importlib.util.spec_from_file_location("publish", ROOT / "hub" / "publish.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_publish_validates_then_pushes_only_when_asked(saved, tmp_path, monkeypatch, capsys):
    _, folder, _, _ = saved
    publish, fake = load_publish(), FakeHub(monkeypatch)
    assert publish.main([str(folder), "--repo-id", "org/published"]) == 0
    assert fake.calls == [] and "dry run" in capsys.readouterr().out
    assert publish.main([str(folder), "--repo-id", "org/published", "--push"]) == 0
    assert fake.calls == ["create_repo", "upload_folder"]
    assert fake.files["model.safetensors"] == (folder / "model.safetensors").read_bytes()

    bare = hub.save_pretrained(veloxseg.create_model("veloxseg_tiny", **SMALL_ROI), tmp_path / "bare")
    assert publish.main([str(bare), "--repo-id", "org/bare", "--push"]) == 1
    problems = capsys.readouterr().out
    assert "datasets" in problems and "metrics" in problems and "training command" in problems
    assert len(fake.calls) == 2
    assert ModelCard.load(bare / "README.md").data.eval_results is None  # no metrics, no model-index

    card = (folder / "README.md").read_text()
    (folder / "README.md").write_text(card.replace("value: 0.625", "value: 0.9"))
    try:
        problems = load_publish().validate(folder)
    finally:
        (folder / "README.md").write_text(card)
    assert problems == ["README.md model-index results {'dice': 0.9} are not config.json's metrics {'dice': 0.625}"]


# hub/'s model folders (<variant>.<tag>), beside the weights package's veloxseg_weights/
MODEL_FOLDERS = sorted(p for p in (ROOT / "hub").iterdir() if (p / "config.json").is_file())


@pytest.mark.parametrize("folder", MODEL_FOLDERS, ids=lambda p: p.name)
def test_shipped_model_folders_are_publishable(folder):
    """Every model folder under hub/ loads exactly as saved, runs, and has a complete card."""
    assert load_publish().validate(folder) == []


def test_recorded_architecture_is_the_variant_of_the_widths(tmp_path):
    def architecture(model: veloxseg.VeloxSeg) -> str:
        folder = hub.save_pretrained(model, tmp_path / str(len(list(tmp_path.iterdir()))))
        assert veloxseg.create_model(f"local-dir:{folder}").config == model.config
        return json.loads((folder / "config.json").read_text())["architecture"]

    direct = veloxseg.VeloxSeg(veloxseg.VeloxSegConfig(**VARIANTS["veloxseg_tiny"], **SMALL_ROI))  # no registry
    assert architecture(direct) == "veloxseg_tiny"
    assert architecture(veloxseg.create_model("veloxseg_base", **VARIANTS["veloxseg_tiny"], **SMALL_ROI)) == (
        "veloxseg_tiny"
    )
    # widths of no variant: the registry entrypoint it was built with, overridden by model_args
    assert architecture(veloxseg.create_model("veloxseg_tiny", base_ch=16, **SMALL_ROI)) == "veloxseg_tiny"
    custom = veloxseg.VeloxSeg(veloxseg.VeloxSegConfig(base_ch=8, **SMALL_ROI))
    with pytest.raises(ValueError, match="widths of no registered variant .* veloxseg.create_model"):
        hub.save_pretrained(custom, tmp_path / "custom")


def test_from_pretrained_loads_a_folder_a_hub_repo_and_a_tag(saved, cache, tmp_path):
    """VeloxSeg.from_pretrained, symmetric with save_pretrained, as huggingface_hub's ModelHubMixin."""
    model, folder, x, expected = saved
    assert torch.equal(outputs(veloxseg.VeloxSeg.from_pretrained(folder), x), expected)
    assert torch.equal(outputs(veloxseg.VeloxSeg.from_pretrained(str(folder)), x), expected)
    cache_repo(cache, REPO, folder)
    other = veloxseg.create_model("veloxseg_tiny", n_classes=3, **SMALL_ROI)
    cache_repo(cache, REPO, hub.save_pretrained(other, tmp_path / "v2"), revision="v2", sha="b" * 40)
    assert torch.equal(outputs(veloxseg.VeloxSeg.from_pretrained(REPO), x), expected)
    assert veloxseg.VeloxSeg.from_pretrained(REPO, revision="v2").num_classes == 3
    adapted = veloxseg.VeloxSeg.from_pretrained(folder, n_classes=4)
    assert adapted.num_classes == 4 and torch.equal(adapted.encoder.downs[0].weight, model.encoder.downs[0].weight)
    tag = veloxseg.list_models("veloxseg_tiny.*", pretrained=True)[0]
    assert veloxseg.VeloxSeg.from_pretrained(tag).pretrained_cfg["tag"] == tag.split(".", 1)[1]
    with pytest.raises(FileNotFoundError, match="config.json of Hub repo org/missing"):
        veloxseg.VeloxSeg.from_pretrained("org/missing")
    with pytest.raises(ValueError, match="local folder: it takes no revision"):
        veloxseg.VeloxSeg.from_pretrained(folder, revision="v2")
