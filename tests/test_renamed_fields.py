"""The config field ``group_channels`` was ``in_ch``: a caller's old keyword works with a DeprecationWarning,
a stored file (config.json) holding the old name loads silently, and the shipped tags hold the new name."""

import json
import warnings
from pathlib import Path

import pytest
import timm
import torch

import veloxseg
from veloxseg import hub
from veloxseg.config import VeloxSegConfig
from veloxseg.metadata import ModelMetadata
from veloxseg.variants import PUBLISHED, SHIPPED_MODELS

from .conftest import SMALL_ROI, tiny_model

DEPRECATED = "in_ch is deprecated: use group_channels"

# Each entry point a caller passes config fields to: fields -> the config it builds.
ENTRY_POINTS = {
    "VeloxSegConfig": lambda fields: VeloxSegConfig(**fields),
    "from_dict": VeloxSegConfig.from_dict,
    "replace": lambda fields: VeloxSegConfig().replace(**fields),
    "VeloxSeg": lambda fields: veloxseg.VeloxSeg(**fields, **SMALL_ROI).config,
    "create_model": lambda fields: veloxseg.create_model("veloxseg_tiny", **fields, **SMALL_ROI).config,
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_old_keyword_warns_at_the_callers_line_and_sets_group_channels(entry):
    with pytest.warns(DeprecationWarning, match=DEPRECATED) as caught:
        config = ENTRY_POINTS[entry]({"in_ch": [1, 2]})
    assert config.group_channels == (1, 2)
    assert [w.filename for w in caught if DEPRECATED in str(w.message)] == [__file__]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_old_and_new_keyword_together_is_an_error(entry):
    with pytest.raises(TypeError, match="in_ch and group_channels name the same config field: give group_channels"):
        ENTRY_POINTS[entry]({"in_ch": [1], "group_channels": [1]})


def test_old_attribute_warns_and_reads_group_channels():
    config = VeloxSegConfig(group_channels=(3, 1))
    with pytest.warns(DeprecationWarning, match=DEPRECATED):
        assert config.in_ch == (3, 1)
    assert config.in_channels == 4


def test_a_typo_suggests_the_new_name_never_the_old():
    with pytest.raises(TypeError, match="'in_chan' \\(did you mean 'group_channels'\\?\\)"):
        VeloxSegConfig.from_dict({"in_chan": [1]})
    with pytest.raises(TypeError) as error:
        VeloxSegConfig.from_dict({"group_channel": [1], "in_c": [1]})
    assert "in_ch'" not in str(error.value) and "did you mean 'group_channels'?" in str(error.value)


def test_new_config_json_holds_group_channels(tmp_path):
    folder = tiny_model(ModelMetadata.default((1, 1), 2)).save_pretrained(tmp_path / "new")
    model_args = json.loads((folder / hub.CONFIG_NAME).read_text())["model_args"]
    assert model_args["group_channels"] == [1, 1] and "in_ch" not in model_args


@pytest.fixture
def old_format(tmp_path) -> tuple[veloxseg.VeloxSeg, Path]:
    """A tiny model and its saved folder, whose config.json holds ``in_ch`` as files written before the rename."""
    model = tiny_model(ModelMetadata.default((1, 1), 2))
    folder = model.save_pretrained(tmp_path / "old")
    values = json.loads((folder / hub.CONFIG_NAME).read_text())
    values["model_args"]["in_ch"] = values["model_args"].pop("group_channels")
    (folder / hub.CONFIG_NAME).write_text(json.dumps(values))
    return model, folder


@pytest.mark.parametrize("create", [veloxseg.create_model, timm.create_model])
def test_old_config_json_loads_silently_as_the_same_model(old_format, create):
    model, folder = old_format
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = create(f"local-dir:{folder}", pretrained=True)
    assert not [w for w in caught if "in_ch" in str(w.message)]
    assert loaded.config == model.config and hub.read_config(folder / hub.CONFIG_NAME).config == model.config
    expected, found = model.state_dict(), loaded.state_dict()
    assert found.keys() == expected.keys() and all(torch.equal(found[k], expected[k]) for k in expected)


@pytest.mark.parametrize("create", [veloxseg.create_model, timm.create_model])
def test_a_saved_model_takes_either_name_as_an_override(old_format, create):
    _, folder = old_format
    assert create(f"local-dir:{folder}", pretrained=False, group_channels=[2]).config.group_channels == (2,)
    with pytest.warns(DeprecationWarning, match=DEPRECATED) as caught:
        assert create(f"local-dir:{folder}", pretrained=False, in_ch=[3]).config.group_channels == (3,)
    assert [w.filename for w in caught if DEPRECATED in str(w.message)] == [__file__]


@pytest.mark.parametrize("tag", PUBLISHED)
def test_shipped_tags_hold_group_channels(tag):
    model_args = json.loads((SHIPPED_MODELS / tag / hub.CONFIG_NAME).read_text())["model_args"]
    assert "group_channels" in model_args and "in_ch" not in model_args
