"""VeloxSeg through timm's own entry points: features_only backbones, timm's argument names, and
timm's Hub helpers (save_for_hf, push_to_hf_hub) loaded back by both libraries."""

import shutil
from pathlib import Path
from unittest.mock import create_autospec

import pytest
import timm
import torch
from huggingface_hub import HfApi, RepoUrl
from timm.models import push_to_hf_hub, save_for_hf

import veloxseg

from .conftest import SMALL_ROI


@pytest.fixture(scope="module")
def model() -> veloxseg.VeloxSeg:
    torch.manual_seed(5)
    return timm.create_model("veloxseg_tiny", **SMALL_ROI).eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(1, 2, *SMALL_ROI["roi_size"])


@pytest.mark.parametrize("out_indices", [None, (1, 3), (0, 2)])
def test_features_only_gives_the_encoder_levels_feature_info_describes(model, x, tmp_path, out_indices):
    folder = model.save_pretrained(tmp_path / "model")
    kwargs = {} if out_indices is None else {"out_indices": out_indices}
    backbone = timm.create_model(f"local-dir:{folder}", pretrained=True, features_only=True, **kwargs).eval()
    with torch.no_grad():
        features = backbone(x)
        _, expected = model.encode(model.attention.embed(x), model.encoder.stem(x))
    levels = list(out_indices or range(4))
    assert list(backbone.feature_info.out_indices) == levels
    assert backbone.feature_info.channels() == [t.shape[1] for t in features] == [8 * 2**i for i in levels]
    for tensor, reduction in zip(features, backbone.feature_info.reduction()):
        assert tensor.ndim == 5 and tuple(tensor.shape[2:]) == tuple(s // reduction for s in SMALL_ROI["roi_size"])
    for tensor, level in zip(features, levels):
        assert torch.equal(tensor, expected[level])  # the pretrained encoder weights were loaded
    names = {name.split(".")[1] for name, _ in backbone.named_parameters()}
    assert names == {"attention", "encoder"}  # decoder and teachers pruned
    assert len(backbone.model.encoder.stages) == levels[-1] + 1  # nothing computed past the deepest level


def test_features_only_through_veloxseg_create_model(x):
    backbone = veloxseg.create_model("veloxseg_tiny", features_only=True, out_indices=[-1], **SMALL_ROI)
    assert backbone.feature_info.channels() == [64] and backbone.feature_info.reduction() == [32]
    assert backbone(x)[0].shape == (1, 64, 2, 2, 2)


def test_timm_argument_names():
    model = timm.create_model("veloxseg_tiny", num_classes=3, in_chans=4, **SMALL_ROI)
    assert model.config.n_classes == model.num_classes == 3 and model.config.group_channels == (4,)
    two = veloxseg.create_model("veloxseg_tiny", in_chans=2, group_channels=[1, 1], **SMALL_ROI)
    assert two.config.group_channels == (1, 1)
    with pytest.raises(ValueError, match=r"in_chans=3 disagrees with group_channels=\[1, 1\].*=\[4\] for one 4-channel"):
        timm.create_model("veloxseg_tiny", in_chans=3, group_channels=[1, 1])
    with pytest.raises(ValueError, match="num_classes=3 and n_classes=2 disagree"):
        timm.create_model("veloxseg_tiny", num_classes=3, n_classes=2)


def loads_back(folder: Path, expected: veloxseg.VeloxSeg, x: torch.Tensor) -> None:
    """Both libraries rebuild ``expected`` from ``folder`` with its config and outputs."""
    ours = veloxseg.create_model(f"local-dir:{folder}").eval()
    theirs = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        want = expected(x)
        for loaded in (ours, theirs):
            assert loaded.config == expected.config
            assert torch.equal(loaded(x), want)
            assert loaded.pretrained_cfg["veloxseg"] == expected.pretrained_cfg["veloxseg"]


def test_save_for_hf_round_trip(model, x, tmp_path):
    save_for_hf(model, tmp_path / "a", safe_serialization=True)
    loads_back(tmp_path / "a", model, x)
    four = timm.create_model("veloxseg_tiny", num_classes=3, in_chans=4, **SMALL_ROI).eval()
    save_for_hf(four, tmp_path / "b", safe_serialization=True)
    loads_back(tmp_path / "b", four, torch.randn(1, 4, *SMALL_ROI["roi_size"]))
    save_for_hf(model, tmp_path / "c")  # timm's default: a pickle only, which VeloxSeg never loads
    with pytest.raises(FileNotFoundError, match="safetensors weights only.*safe_serialization=True"):
        veloxseg.create_model(f"local-dir:{tmp_path / 'c'}")


def test_push_to_hf_hub_uploads_a_folder_both_libraries_load(model, x, tmp_path, monkeypatch):
    api_class = create_autospec(HfApi)  # HfApi's real signatures: a misspelt argument fails
    api = api_class.return_value
    api.create_repo.return_value = RepoUrl("https://huggingface.co/org/veloxseg-tiny")
    api.file_exists.return_value = False
    api.upload_folder.side_effect = lambda **kwargs: shutil.copytree(kwargs["folder_path"], tmp_path / "uploaded")
    monkeypatch.setattr(timm.models._hub, "HfApi", api_class)
    push_to_hf_hub(model, "org/veloxseg-tiny")
    assert api.upload_folder.call_args.kwargs["repo_id"] == "org/veloxseg-tiny"
    loads_back(tmp_path / "uploaded", model, x)


# --- timm's model API --------------------------------------------------------------------------------


@pytest.mark.parametrize("detail_ch", [0, 8])
def test_forward_features_then_forward_head_is_forward(x, detail_ch):
    model = veloxseg.create_model("veloxseg_tiny", detail_ch=detail_ch, **SMALL_ROI).eval()
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (1, model.num_features, 16, 16, 16)
        assert torch.equal(model.forward_head(features, pre_logits=True), features)
        stem = model.decoder.detail.stem(x) if detail_ch else None
        torch.testing.assert_close(model.forward_head(features, detail_stem=stem), model(x))
        if detail_ch:
            with pytest.raises(ValueError, match="detail path .* pass detail_stem"):
                model.forward_head(features)


def test_reset_classifier_replaces_the_class_layers_only(model, x):
    model = veloxseg.create_model("veloxseg_tiny", detail_ch=8, deep_supervision=True, **SMALL_ROI)
    ladder = {k: v.clone() for k, v in model.decoder.ladder.state_dict().items()}
    encoder = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    old_head = model.get_classifier()
    model.reset_classifier(5)
    assert model.num_classes == model.config.n_classes == 5 and model.get_classifier() is not old_head
    assert model.get_classifier().out_channels == 5 * 2**3 and model.decoder.detail.out.out_channels == 8 * 5
    assert [h.out_channels for h in model.decoder.aux_heads] == [5, 5, 5]
    assert len(model.pretrained_cfg["veloxseg"]["labels"]) == 5  # the metadata of 5 classes
    for saved, now in ((ladder, model.decoder.ladder), (encoder, model.encoder)):
        assert all(torch.equal(v, now.state_dict()[k]) for k, v in saved.items())
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (1, 5, *SMALL_ROI["roi_size"])
    with pytest.raises(ValueError, match="n_classes must be >= 2"):
        model.reset_classifier(0)
    with pytest.raises(ValueError, match="no global pooling"):
        model.reset_classifier(3, global_pool="avg")


def test_grad_checkpointing_recomputes_blocks_with_the_same_gradients(x):
    model = veloxseg.create_model("veloxseg_tiny", teachers=True, **SMALL_ROI).train()
    calls = []
    model.encoder.stages[0][0].register_forward_pre_hook(lambda *_: calls.append(1))

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(0)
        out = model(x)
        (out.logits[0].square().mean() + out.reconstruction.square().mean()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    assert len(calls) == 1
    model.set_grad_checkpointing()
    checkpointed = gradients()
    assert len(calls) == 3  # forward, then again in the backward pass
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)
    with torch.no_grad():
        model(x)
    assert len(calls) == 4  # no recomputation without gradients


def test_weight_decay_and_layer_groups_follow_timm():
    model = veloxseg.create_model("veloxseg_tiny", **SMALL_ROI)
    tables = model.no_weight_decay()
    assert tables and all(name.endswith("relative_position_bias_table") for name in tables)
    assert len(tables) == sum(model.config.depths)  # one per PWA block
    groups = timm.models.group_parameters(model, model.group_matcher())
    names = [set(g) for g in groups.values()]
    assert len(names) == 6  # input convs, four encoder levels, decoder
    assert "encoder.downs.0.weight" in names[0] and "attention.patch_embeds.1.weight" in names[0]
    assert any(n.startswith("attention.levels.3.") for n in names[4]) and "encoder.downs.3.weight" in names[4]
    assert all(n.startswith(("decoder.", "teachers.")) for n in names[5])

    from veloxseg.training import TrainConfig, build_optimizer

    optimizer = build_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.05))
    names_of = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names_of[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert tables <= no_decay and any(".norms." in n for n in no_decay) and "encoder.downs.0.bias" in no_decay
    assert all(".bias" in n or n in tables or ".norm" in n for n in no_decay)


def test_drop_path_rate_is_timm_stochastic_depth_in_training_only(x):
    no_dropout = dict(attn_drop=0.0, proj_drop=0.0, conv_drop=0.0, teachers=False, deep_supervision=False)
    model = timm.create_model("veloxseg_tiny", drop_path_rate=0.3, depths=[1, 1, 2, 1], **no_dropout, **SMALL_ROI)
    attention = [block.drop_path for level in model.attention.levels for block in level]
    conv = [block.drop_path for stage in model.encoder.stages for block in stage]
    assert isinstance(attention[0], torch.nn.Identity) and isinstance(conv[0], torch.nn.Identity)  # rate 0
    assert [m.drop_prob for m in attention[1:]] == pytest.approx([0.075, 0.15, 0.225, 0.3])  # 5 PWA blocks
    assert [m.drop_prob for m in conv[1:]] == pytest.approx([0.1, 0.2, 0.3])  # 4 JLC blocks
    plain = timm.create_model("veloxseg_tiny", depths=[1, 1, 2, 1], **no_dropout, **SMALL_ROI)
    plain.load_state_dict(model.state_dict())  # the same parameters: drop path has none
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), plain.eval()(x))  # identity at inference
        model.train()
        first, second = model(x).logits[0], model(x).logits[0]
    assert not torch.allclose(first, second)  # branches dropped at random while training
    with pytest.raises(ValueError, match=r"drop_path_rate must be in \[0, 1\)"):
        veloxseg.create_model("veloxseg_tiny", drop_path_rate=1.0)
