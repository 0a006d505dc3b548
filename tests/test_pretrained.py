"""The published tags behind ``pretrained=True``: listed by both libraries, loaded offline from the
copy shipped with the package (after the Hub cache), trained (not the initialisation), and verified:
a changed or truncated file is an error naming it."""

import logging
import re
import shutil
import socket
import sys
import threading
import warnings
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from safetensors.torch import load_file

import veloxseg
from veloxseg import hub
from veloxseg.variants import HUB_ORG, PUBLISHED, VARIANTS

from .conftest import SMALL_ROI
from .test_hub import cache_repo

TAGS = list(PUBLISHED)


def default_tag(variant: str) -> str:
    return next(name for name in PUBLISHED if name.split(".")[0] == variant)


def assert_holds(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == tensors.keys()
    for key, value in tensors.items():
        assert torch.equal(state[key], value), key


def test_published_tags_name_known_variants_both_libraries_list():
    assert {name.split(".")[0] for name in TAGS} == set(VARIANTS)  # every variant has trained weights
    for variant in VARIANTS:  # a lesion model on the paper's two-group PET/CT shape, and a self-supervised one
        assert {f"{variant}.petct_lesions", f"{variant}.ssl_generalist"} <= set(TAGS)
    assert set(timm.list_pretrained("veloxseg*")) == set(veloxseg.list_models(pretrained=True)) == set(TAGS)
    for name in TAGS:
        assert timm.models.get_pretrained_cfg(name).hf_hub_id == f"{HUB_ORG}/{name}"


@pytest.mark.parametrize("name", TAGS)
def test_a_tag_loads_its_shipped_trained_weights_offline(name, caplog):
    shipped = load_file(hub.SHIPPED_MODELS / name / hub.WEIGHTS_NAME)
    with caplog.at_level(logging.INFO, logger="veloxseg.hub"):
        model = veloxseg.create_model(name, pretrained=True)
    assert_holds(model, shipped)
    assert "from the copy shipped with veloxseg" in caplog.text
    assert_holds(timm.create_model(name, pretrained=True), shipped)
    registered = timm.models.get_pretrained_cfg(name)
    for key in ("input_size", "num_classes", "label_names", "channel_names", "normalisation", "spacing", "orientation"):
        assert model.pretrained_cfg[key] == getattr(registered, key), key  # the registry describes the network built
    untrained = veloxseg.create_model(name).state_dict()  # the tag's network, initialised
    assert untrained.keys() == shipped.keys()
    trained = [k for k, v in shipped.items() if v.is_floating_point() and not torch.equal(untrained[k], v)]
    assert len(trained) > len(shipped) // 2, "the shipped weights are mostly the initialisation"


@pytest.mark.parametrize("variant", sorted({name.split(".")[0] for name in PUBLISHED}))
def test_pretrained_without_a_tag_is_the_default_tag(variant):
    model = veloxseg.create_model(variant, pretrained=True)
    assert f"{variant}.{model.pretrained_cfg['tag']}" == default_tag(variant)
    assert_holds(model, load_file(hub.SHIPPED_MODELS / default_tag(variant) / hub.WEIGHTS_NAME))
    assert veloxseg.create_model(variant).config.roi_size == (96, 96, 96)  # without weights: the paper's network


def test_the_hub_cache_comes_before_the_shipped_copy(offline_hub, caplog):
    name = TAGS[0]
    snapshot = cache_repo(offline_hub, f"{HUB_ORG}/{name}", hub.SHIPPED_MODELS / name)
    with caplog.at_level(logging.INFO, logger="veloxseg.hub"):
        veloxseg.create_model(name, pretrained=True)
    assert f"{name}: loaded {snapshot / hub.WEIGHTS_NAME}" in caplog.text
    assert "from the Hugging Face cache" in caplog.text and "shipped" not in caplog.text


def damaged_cache_copy(cache: Path, name: str, filename: str, damage: str) -> Path:
    """The cache's copy of ``filename`` of tag ``name``, changed as an earlier release or a broken download is."""
    path = cache_repo(cache, f"{HUB_ORG}/{name}", hub.SHIPPED_MODELS / name) / filename
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 100]
    else:
        data[-2] ^= 1
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("route", ["registry", "hf-hub"])
@pytest.mark.parametrize("filename", [hub.CONFIG_NAME, hub.WEIGHTS_NAME])
def test_a_changed_file_in_the_cache_is_skipped_for_a_verified_copy_with_a_warning(
    offline_hub, route, filename, caplog
):
    name = TAGS[0]
    path = damaged_cache_copy(offline_hub, name, filename, "flip a byte")
    with caplog.at_level(logging.WARNING, logger="veloxseg.hub"):
        model = veloxseg.create_model(name if route == "registry" else f"hf-hub:{HUB_ORG}/{name}", pretrained=True)
    assert f"{path}: its SHA-256 is not the one registered for {name}" in caplog.text
    assert_holds(model, load_file(hub.SHIPPED_MODELS / name / hub.WEIGHTS_NAME))


@pytest.mark.parametrize("damage", ["flip a byte", "truncate"])
@pytest.mark.parametrize("filename", [hub.CONFIG_NAME, hub.WEIGHTS_NAME])
def test_a_changed_file_with_no_verified_copy_is_an_error_naming_it(
    offline_hub, damage, filename, tmp_path, monkeypatch
):
    name = TAGS[0]
    path = damaged_cache_copy(offline_hub, name, filename, damage)
    monkeypatch.setattr(hub, "SHIPPED_MODELS", tmp_path)  # no shipped copy, no weights package, offline
    monkeypatch.setattr(hub, "weights_package_file", lambda tag, filename: None)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: its SHA-256 is not the one registered for {name}"):
        veloxseg.create_model(name, pretrained=True)


def test_a_truncated_shipped_copy_is_an_error_naming_it(tmp_path, monkeypatch):
    name = TAGS[0]
    shutil.copytree(hub.SHIPPED_MODELS / name, tmp_path / name)
    weights = tmp_path / name / hub.WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-1000])
    monkeypatch.setattr(hub, "SHIPPED_MODELS", tmp_path)
    with pytest.raises(ValueError, match=rf"{re.escape(str(weights))}: its SHA-256 is not the one registered"):
        veloxseg.create_model(name, pretrained=True)


@pytest.mark.parametrize("name", timm.list_pretrained("veloxseg*"))
def test_every_tags_pretrained_cfg_describes_a_3d_segmentation_model(name):
    cfg = timm.models.get_pretrained_cfg(name)
    config = veloxseg.create_model(name).config  # the tag's network, initialised
    assert cfg.input_size == (config.in_channels, *config.roi_size)  # (C, D, H, W)
    assert cfg.num_classes == config.n_classes > 0 and len(cfg.label_names) == cfg.num_classes
    assert cfg.label_names[0] == "background" and len(cfg.channel_names) == len(cfg.normalisation) == cfg.input_size[0]
    assert len(cfg.spacing) == 3 and all(s > 0 for s in cfg.spacing)  # the spacing the tag was trained at
    assert len(cfg.orientation) == 3
    assert (cfg.interpolation, cfg.crop_pct, cfg.crop_mode, cfg.mean, cfg.std) == (None,) * 5  # no 2-D preprocessing


def test_pretrained_cfg_follows_the_network_and_its_metadata():
    model = timm.create_model("veloxseg_tiny", in_chans=4, num_classes=5, **SMALL_ROI)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (4, *SMALL_ROI["roi_size"]) and cfg["num_classes"] == 5
    assert cfg["label_names"] == ["background", "class_1", "class_2", "class_3", "class_4"]
    assert cfg["channel_names"] == [f"group0_channel{c}" for c in range(4)] and cfg["normalisation"] == ["zscore"] * 4


def test_the_weights_source_is_one_warning_line_the_first_time(monkeypatch, caplog):
    monkeypatch.setattr(hub, "_ANNOUNCED", set())
    with caplog.at_level(logging.WARNING, logger="veloxseg.hub"):
        for _ in range(2):
            veloxseg.create_model(TAGS[0], pretrained=True)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    shipped = hub.SHIPPED_MODELS / TAGS[0] / hub.WEIGHTS_NAME
    assert lines == [f"{TAGS[0]}: pretrained weights from the copy shipped with veloxseg (SHA-256 verified), {shipped}"]


def test_the_adaptation_report_is_on_the_model_and_dropped_tensors_warn():
    name = "veloxseg_small.petct_lesions"  # two modality groups, CT and PET
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loaded as saved: no warning
        exact = veloxseg.create_model(name, pretrained=True)
    assert exact.adaptation_report.exact and veloxseg.create_model(name).adaptation_report is None
    with pytest.warns(UserWarning, match=r"pretrained tensor\(s\) dropped.*modality group 1 has no counterpart") as caught:
        model = timm.create_model(name, pretrained=True, in_chans=4)  # one 4-channel group: PET's stream goes
    report = model.adaptation_report
    assert report.dropped and all(key.split(".")[2] == "1" or ".1." in key for key in report.dropped)
    assert f"{len(report.dropped)} pretrained tensor(s) dropped" in str(caught[0].message)


class SilentServer:
    """A loopback server that accepts connections and never answers (a Hub behind a dead proxy)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port, self.connections = self.sock.getsockname()[1], []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.connections.append(self.sock.accept()[0])  # held open, never read or answered
            except OSError:
                return


def test_a_verified_local_copy_is_used_before_any_network_call(monkeypatch):
    server = SilentServer()
    endpoint = f"http://127.0.0.1:{server.port}"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    loaded = {}
    for name in ("veloxseg_small", f"hf-hub:{HUB_ORG}/{default_tag('veloxseg_small')}"):
        thread = threading.Thread(target=lambda n=name: loaded.update({n: veloxseg.create_model(n, pretrained=True)}))
        thread.start()
        thread.join(timeout=20)  # a Hub call would wait on the silent server for far longer (timeouts, retries)
        assert name in loaded, f"{name} did not load within 20 s"
        assert_holds(loaded[name], load_file(hub.SHIPPED_MODELS / default_tag("veloxseg_small") / hub.WEIGHTS_NAME))
    assert server.connections == []  # the shipped copy was used, the Hub never asked
    socket.create_connection(("127.0.0.1", server.port)).close()  # the server was there to be asked
    for _ in range(100):
        if server.connections:
            break
        threading.Event().wait(0.05)
    assert len(server.connections) == 1


def test_the_mni152_tags_notice_travels_with_every_copy(tmp_path):
    name = "veloxseg_small.mni152_tissue"
    shipped = (hub.SHIPPED_MODELS / name / hub.NOTICE_NAME).read_text()
    assert "Louis Collins" in shipped  # the MNI152 templates' notice asks to be kept with all copies
    model = veloxseg.create_model(name, pretrained=True)
    assert (model.save_pretrained(tmp_path / "copy") / hub.NOTICE_NAME).read_text() == shipped


@pytest.fixture
def weights_package(tmp_path, monkeypatch):
    """An installed veloxseg-weights package on sys.path, holding a copy of TAGS[0]'s folder."""
    package = tmp_path / "site" / "veloxseg_weights"
    shutil.copytree(hub.SHIPPED_MODELS / TAGS[0], package / "models" / TAGS[0])
    shutil.copy(hub.SHIPPED_MODELS.resolve() / "veloxseg_weights" / "__init__.py", package / "__init__.py")
    monkeypatch.syspath_prepend(str(package.parent))
    monkeypatch.delitem(sys.modules, "veloxseg_weights", raising=False)
    return package / "models"


def test_the_weights_package_comes_before_the_shipped_copy(weights_package, caplog):
    with caplog.at_level(logging.INFO, logger="veloxseg.hub"):
        veloxseg.create_model(TAGS[0], pretrained=True)
    assert f"from the veloxseg-weights package, {weights_package / TAGS[0] / hub.WEIGHTS_NAME}" in caplog.text
    assert "shipped" not in caplog.text


def test_the_hub_cache_comes_before_the_weights_package(weights_package, offline_hub, caplog):
    cache_repo(offline_hub, f"{HUB_ORG}/{TAGS[0]}", hub.SHIPPED_MODELS / TAGS[0])
    with caplog.at_level(logging.INFO, logger="veloxseg.hub"):
        veloxseg.create_model(TAGS[0], pretrained=True)
    assert "from the Hugging Face cache" in caplog.text and "veloxseg-weights" not in caplog.text


def test_without_any_copy_the_error_says_how_to_install_the_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "SHIPPED_MODELS", tmp_path)  # an installed veloxseg: no checkout
    monkeypatch.setitem(sys.modules, "veloxseg_weights", None)  # and no weights package
    with pytest.raises(FileNotFoundError, match=r'not in the Hub cache .* pip install "veloxseg\[weights\]"'):
        veloxseg.create_model(TAGS[0], pretrained=True)
