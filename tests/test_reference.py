"""The network reproduces the authors' implementation, through load_reference."""

import json

import pytest
import torch

import veloxseg
from veloxseg.convert import config_from_reference, convert_reference_state_dict

TOLERANCE = 1e-5


def relative_errors(ours: torch.Tensor, ref: torch.Tensor) -> list[float]:
    """Per-sample ||ours - ref|| / ||ref||."""
    return [(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item() for a, b in zip(ours, ref)]


def authors_state_dict(reference: dict) -> dict[str, torch.Tensor]:
    return {k.removeprefix("weights."): v for k, v in reference["tensors"].items() if k.startswith("weights.")}


@pytest.fixture(scope="module")
def reference_model(reference):
    return veloxseg.load_reference(authors_state_dict(reference), reference["metadata"]["config"])


def test_parameter_counts(reference, reference_model):
    assert sum(p.numel() for p in reference_model.parameters()) == int(reference["metadata"]["params_total"])
    assert reference_model.inference_parameters() == 1_669_185


def test_eval_logits_match(reference, reference_model):
    t, stride = reference["tensors"], int(reference["metadata"]["stride"])
    reference_model.eval()
    with torch.no_grad():
        logits = reference_model(t["input"])
    assert list(logits.shape) == json.loads(reference["metadata"]["eval_logits_shape"])
    s = slice(None, None, stride)
    assert max(relative_errors(logits[:, :, s, s, s], t["eval.logits.strided"])) < TOLERANCE
    full_sum = float(reference["metadata"]["eval_logits_sum"])
    assert logits.double().abs().sum().item() == pytest.approx(float(reference["metadata"]["eval_logits_abs_sum"]), rel=1e-5)
    assert logits.double().sum().item() == pytest.approx(full_sum, rel=1e-4)


def test_training_outputs_match(reference, reference_model):
    t, stride = reference["tensors"], int(reference["metadata"]["stride"])
    reference_model.train()
    with torch.no_grad():
        out = reference_model(t["input"])
    s = slice(None, None, stride)
    assert len(out.logits) == 4
    for i, logits in enumerate(out.logits):
        assert max(relative_errors(logits[:, :, s, s, s], t[f"train.seg{i}.strided"])) < TOLERANCE, f"seg{i}"
    assert out.reconstruction.shape == t["input"].shape
    assert max(relative_errors(out.reconstruction[:, :, s, s, s], t["train.reconstruction.strided"])) < TOLERANCE
    assert max(relative_errors(out.gram, t["train.gram.seg"])) < TOLERANCE
    assert len(out.teacher_grams) == 2
    for m, gram in enumerate(out.teacher_grams):
        assert max(relative_errors(gram, t[f"train.gram.teacher{m}"])) < TOLERANCE


def test_wrong_epsilon_would_be_caught(reference, reference_model):
    """The comparison is sharp enough to see a layer-norm epsilon off by 10x (second, small sample)."""
    t, stride = reference["tensors"], int(reference["metadata"]["stride"])
    norms = [m for m in reference_model.modules() if isinstance(m, torch.nn.LayerNorm)]
    reference_model.eval()
    try:
        for norm in norms:
            norm.eps = 1e-5
        with torch.no_grad():
            logits = reference_model(t["input"][1:])
    finally:
        for norm in norms:
            norm.eps = 1e-6
    s = slice(None, None, stride)
    assert relative_errors(logits[:, :, s, s, s], t["eval.logits.strided"][1:])[0] > 10 * TOLERANCE


def test_load_reference_is_strict(reference):
    state = authors_state_dict(reference)
    config = reference["metadata"]["config"]
    missing = {k: v for k, v in state.items() if k != "decoder.out_conv1.0.bias"}
    with pytest.raises(ValueError, match="missing decoder.head.bias"):
        veloxseg.load_reference(missing, config)
    extra = {**state, "encoder.not_a_layer.weight": torch.zeros(1)}
    with pytest.raises(KeyError, match="not_a_layer"):
        veloxseg.load_reference(extra, config)
    with pytest.raises(ValueError, match=r"has shape \(16, 2, 7, 7, 7\), the model needs \(16, 3, 7, 7, 7\)"):
        veloxseg.load_reference(state, {**json.loads(config), "in_ch": [1, 2]})


def test_qkv_projections_are_fused_in_order(reference):
    state = authors_state_dict(reference)
    ours = convert_reference_state_dict(state)
    prefix = "encoder.encoder_attn.layers.2.blocks.0.attn.qkv_proj.1"
    fused = ours["attention.levels.2.0.attn.qkv.1.weight"]
    expected = torch.cat([state[f"{prefix}.{i}.weight"] for i in range(3)])
    assert torch.equal(fused, expected)


@pytest.mark.parametrize(
    "changes, tokens",
    [
        (dict(in_ch=[4], n_classes=4), (3, 3, 3)),  # BraTS 2021 (the authors' argument names)
        (dict(input_size=[128, 128, 64], min_big_window_sizes=[[4, 4, 2], [8, 8, 4], [4, 4, 2], [4, 4, 2]]), (4, 4, 2)),
    ],
)
def test_other_author_configs_build_and_run(reference, changes, tokens):
    config = config_from_reference({**json.loads(reference["metadata"]["config"]), **changes})
    model = veloxseg.VeloxSeg(config).eval()
    assert model.attention.levels[0][0].attn.tokens == tokens
    x = torch.randn(1, config.in_channels, *config.roi_size)
    with torch.no_grad():
        assert model(x).shape == (1, config.n_classes, *config.roi_size)


def test_portable_conv_path_matches(reference, reference_model):
    """The oneDNN head conv (default on CPU) and PyTorch's portable conv path compute the same logits."""
    x = reference["tensors"]["input"][:1]
    reference_model.eval()
    with torch.no_grad():
        fast = reference_model(x)
        with torch.backends.mkldnn.flags(enabled=False):
            portable = reference_model(x)
    assert max(relative_errors(fast, portable)) < 1e-6
