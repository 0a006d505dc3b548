"""The published tags behind ``pretrained=True``: listed by both libraries, loaded offline from the
copy shipped with the package (after the Hub cache), trained (not the initialisation), and verified:
a changed or truncated file is an error naming it."""

import logging
import re
import shutil

import pytest
import timm
import torch
from safetensors.torch import load_file

import veloxseg
from veloxseg import hub
from veloxseg.variants import HUB_ORG, PUBLISHED, VARIANTS

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
    assert "from the Hugging Face Hub" in caplog.text and "shipped" not in caplog.text


@pytest.mark.parametrize("damage", ["flip a byte", "truncate"])
@pytest.mark.parametrize("filename", [hub.CONFIG_NAME, hub.WEIGHTS_NAME])
def test_a_changed_file_in_the_cache_is_an_error_naming_it(offline_hub, damage, filename):
    name = TAGS[0]
    path = cache_repo(offline_hub, f"{HUB_ORG}/{name}", hub.SHIPPED_MODELS / name) / filename
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 100]
    else:
        data[-2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: its SHA-256 is not the one registered"):
        veloxseg.create_model(name, pretrained=True)


def test_a_truncated_shipped_copy_is_an_error_naming_it(tmp_path, monkeypatch):
    name = TAGS[0]
    shutil.copytree(hub.SHIPPED_MODELS / name, tmp_path / name)
    weights = tmp_path / name / hub.WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-1000])
    monkeypatch.setattr(hub, "SHIPPED_MODELS", tmp_path)
    with pytest.raises(ValueError, match=rf"{re.escape(str(weights))}: its SHA-256 is not the one registered"):
        veloxseg.create_model(name, pretrained=True)
