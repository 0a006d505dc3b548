"""The registered VeloxSeg variants and their pretrained configs.

A leaf module (it imports nothing of veloxseg but the config and the metadata), so that the model,
the registry, the Hub I/O and the card read one table without importing each other.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from timm.models import PretrainedCfg, generate_default_cfgs

from .config import VeloxSegConfig, renamed_fields
from .metadata import ModelMetadata

PAPER_TITLE = "VeloxSeg: Johnson-Lindenstrauss Lemma Guided Network for Efficient 3D Medical Segmentation"

# Width settings per variant; everything else is the paper's configuration (VeloxSegConfig defaults).
VARIANTS: dict[str, dict[str, Any]] = {
    "veloxseg_tiny": dict(
        base_ch=8, attn_base_ch=8, min_dim_group=(4, 4, 8, 8), num_heads=(1, 1, 2, 2), min_dim_head=(4, 4, 8, 8)
    ),
    "veloxseg_small": dict(),  # the paper's AutoPET-II network
    "veloxseg_base": dict(
        base_ch=32, attn_base_ch=32, min_dim_group=(8, 16, 16, 32), num_heads=(2, 4, 4, 8), min_dim_head=(8, 16, 16, 32)
    ),
    # Not in the paper: small with a half-resolution head and a detail path that takes its logits to full
    # resolution (layers/detail.py), the recommended variant (benchmarks/experiments/equal-cpu-5min/: it learns
    # sub-patch detail that small cannot).
    "veloxseg_small_hr": dict(detail_ch=8),
}


@dataclass
class VeloxSegPretrainedCfg(PretrainedCfg):
    """timm's pretrained config for a 3-D segmentation model.

    The 3-D metadata (:class:`veloxseg.metadata.ModelMetadata` as a dict) is under ``veloxseg``; the
    fields timm users read are lifted from it and from the network's config (:func:`describe_3d`):
    ``input_size`` (C, D, H, W: all input channels and the ROI the network takes), ``num_classes``,
    ``label_names`` (by label value), ``channel_names`` and ``normalisation`` (per input channel:
    "ct", "zscore" or "none"), ``spacing`` (mm, or None: native grids) and ``orientation``. timm's 2-D
    image fields (``interpolation``, ``crop_pct``, ``crop_mode``, ``mean``, ``std``) are None: the
    per-channel normalisation, resampling and sliding windows of a 3-D volume are not theirs, and
    timm's 2-D data-config helpers (``timm.data.resolve_data_config``, ``create_transform``,
    ``save_for_hf``'s data config) cannot describe them: they read ``input_size[-2:]`` as an image
    size and fill ImageNet defaults. Preprocess with :func:`veloxseg.predict.predict` (or
    :mod:`veloxseg.data.transforms`) instead. ``sha256``: for a published tag, the SHA-256 of each of
    its files (checked on every load).
    """

    veloxseg: dict[str, Any] | None = None
    channel_names: list[str] | None = None
    normalisation: list[str] | None = None
    spacing: tuple[float, float, float] | None = None
    orientation: str | None = None
    sha256: dict[str, str] | None = None


def variant_cfg(**kwargs: Any) -> VeloxSegPretrainedCfg:
    """A pretrained config: never 2-D image preprocessing (see :class:`VeloxSegPretrainedCfg`), the 3-D
    fields as given (the registry sets them from the network built, :func:`describe_3d`). Weights
    come from ``hf_hub_id`` ("org/name" or "org/name@revision"), file ``hf_hub_filename`` (default
    model.safetensors; safetensors only), or from a local folder in ``file``.
    """
    return VeloxSegPretrainedCfg(
        **{
            "license": "apache-2.0",
            "first_conv": "attention.patch_embeds.0",
            "classifier": "decoder.head",
            "paper_name": PAPER_TITLE,
            **kwargs,
            # whatever a config.json says (timm's save_for_hf writes 2-D defaults): no 2-D image preprocessing,
            # and the network takes its ROI only (whole scans go through sliding windows)
            **dict.fromkeys(("interpolation", "crop_pct", "crop_mode", "mean", "std")),
            "fixed_input_size": True,
        }
    )


def describe_3d(config: VeloxSegConfig, metadata: dict[str, Any]) -> dict[str, Any]:
    """The pretrained-config fields of a network with ``config`` and 3-D ``metadata`` (a
    :class:`ModelMetadata` dict that fits it): ``input_size`` (C, D, H, W), ``num_classes``,
    ``label_names``, ``channel_names``, ``normalisation``, ``spacing``, ``orientation``, ``license``."""
    return {
        "input_size": (config.in_channels, *config.roi_size),
        "num_classes": config.n_classes,
        "label_names": [name for name, _ in sorted(metadata["labels"].items(), key=lambda kv: kv[1])],
        "channel_names": [c["name"] for c in metadata["channels"]],
        "normalisation": [c["normalisation"] for c in metadata["channels"]],
        "spacing": None if metadata["spacing"] is None else tuple(metadata["spacing"]),
        "orientation": metadata["orientation"],
        "license": metadata["license"],
    }


HUB_ORG = "veloxseg"  # the Hub organisation of the published tags: <HUB_ORG>/<variant>.<tag>
# The published tags' folders as shipped with the package (hub/<variant>.<tag>/, linked into it): every file
# in a checkout, the config.json files only in the wheel (the weights are the veloxseg-weights package's).
SHIPPED_MODELS = Path(__file__).resolve().parent / "hub_models"

# Published tags: the SHA-256 of each file of hub/<variant>.<tag>/ (hub/make_tag.py prints them, hub/tags_table.py
# --write updates config.json's); everything else about a tag is in its config.json. ``pretrained=True`` loads
# them from the Hub cache, the veloxseg-weights package, the copy shipped with veloxseg, else the Hub
# (veloxseg.hub), each file checked against its SHA-256. Each variant's default comes first: the kind of tag that fine-tuned best on a task
# it was not trained on (benchmarks/experiments/finetune/: tissue, then lesions, then SSL).
PUBLISHED: dict[str, dict[str, Any]] = {
    "veloxseg_tiny.petct_lesions": dict(
        sha256={
            "config.json": "695345a4e4e540bfb5a6a132ebe7f56ff7274b06ecd2dd94f807975d74dcb0f6",
            "model.safetensors": "5c9fee2a39a3e80c95b4b2d20228763a22e2958b36633786f616dd9a41305c52",
        },
    ),
    "veloxseg_tiny.petct_lesions_anymod": dict(
        sha256={
            "config.json": "78ab713415ccb89932bbe8f3be31508dc0a165b5600a5f008ae8a2c16d2fcc67",
            "model.safetensors": "8ee96c132d727e761aaaa84ad92312e1bcf846b53ef299d62d44b3fb6c1c51d0",
        },
    ),
    "veloxseg_tiny.ssl_generalist": dict(
        sha256={
            "config.json": "d71d13444224b502a541db9ae5dd085e9d2690254603a57030d23441d6a1d839",
            "model.safetensors": "d6bfeb364cb1051d02ff7490e73c67758e7bbbb878d7755afef076ddb8c46688",
        },
    ),
    "veloxseg_small.mni152_tissue": dict(
        sha256={
            "config.json": "fa5bf43fff3ac81302805319252d9ecf87b87183b832dcdb62ca15895b1011c1",
            "model.safetensors": "175bee9755860ba9f6a19bbcdcf01910191effcb7bb10668871d366e6e9e9dda",
        },
    ),
    "veloxseg_small.petct_lesions": dict(
        sha256={
            "config.json": "735a36a1e6e30b8875a69f73ada4e030ef03a86e2d41706c364f0b7de6d2287f",
            "model.safetensors": "57c68a37b95d00aef087003af613d152d545b621fc73ce26ba68116c445c629e",
        },
    ),
    "veloxseg_small.petct_lesions_anymod": dict(
        sha256={
            "config.json": "c6d98d5e36e4aba7628fb3ddb34be64187ace3f465965e488dd9be6bc3b63f23",
            "model.safetensors": "5af099bc120a3fdbab9c30740aa6c80b9292ea3be5639d673a360293440bd08a",
        },
    ),
    "veloxseg_small.ssl_generalist": dict(
        sha256={
            "config.json": "190441295459ae0f65384a49d2f54644ad43e4925dc0947d8b77e927e59af63d",
            "model.safetensors": "b579f55805dd2d08fa5dfe230964badbd0088ffc590d7cc1b1005aec158d089d",
        },
    ),
    "veloxseg_base.petct_lesions": dict(
        sha256={
            "config.json": "dfd060044e0c5d04ffc43781fafe7b4d083187768b10bf2558fee458a8e90b89",
            "model.safetensors": "7ec5368d28412615682621b952e64ee1e8cf9ac27628d36543c89fb8c6f9cf80",
        },
    ),
    "veloxseg_base.petct_lesions_anymod": dict(
        sha256={
            "config.json": "aff674af1dbc524cd409d42536ca413dd347407403757b10cbec362146a1738a",
            "model.safetensors": "d3ec238ed802e3879d3c10a1036fb389f1019401073508beeeab7e76ca06e889",
        },
    ),
    "veloxseg_base.ssl_generalist": dict(
        sha256={
            "config.json": "6480cac662e29b0edb82668933b7191755f31abccd60f1b3147d01c5f99f736e",
            "model.safetensors": "7449950de615389b801ea206f0109c216cead6b96e6ed54ed5fdc74e34437028",
        },
    ),
    "veloxseg_small_hr.mni152_tissue": dict(
        sha256={
            "config.json": "ddfb7294443e1f6c57d01c99a19e42123688dc2c2c890cbb5599f3ab136dafc7",
            "model.safetensors": "451ed522e5fd69c519a652b0f82b60c22bba3ccb310d16ed7ad676f6899b5d01",
        },
    ),
    "veloxseg_small_hr.petct_lesions": dict(
        sha256={
            "config.json": "66ca7937484f9519733f6754e78762ba3d36aecccecc2fd2a904a41d1287d01e",
            "model.safetensors": "2c8d25b205e5728baeaf97f90528bca06204b0a7393f4227392ac902167275df",
        },
    ),
    "veloxseg_small_hr.petct_lesions_anymod": dict(
        sha256={
            "config.json": "77a51d129adbb52482839a0b1e7965275cb660239dc7984f1f069a46fafc8b72",
            "model.safetensors": "2dc74b575766704b3758f307d63c97a87840bfa59d2184399179c579ea2c5c24",
        },
    ),
    "veloxseg_small_hr.ssl_generalist": dict(
        sha256={
            "config.json": "84022dcda49d280906033919be9a43f27225e7ab2b900bafe44c661f1c904ecf",
            "model.safetensors": "9522a49eaf64524d31c109be207da82b2e56ee05197e6ee1fed7fcd510e4a4d1",
        },
    ),
}


def published_cfg(name: str) -> VeloxSegPretrainedCfg:
    """The registry's pretrained config of published tag ``name``: its Hub repo and SHA-256s, and its
    description and network's 3-D fields read from the shipped config.json (the tag's one source; the
    file is checked against its SHA-256 when weights are loaded)."""
    values = json.loads((SHIPPED_MODELS / name / "config.json").read_text(encoding="utf-8"))
    stored = renamed_fields(values["model_args"], warn=False)  # a file written before a field was renamed
    config = VeloxSegConfig(**VARIANTS[values["architecture"]]).replace(**stored)
    pretrained = values["pretrained_cfg"]
    return variant_cfg(
        hf_hub_id=f"{HUB_ORG}/{name}",
        description=pretrained.get("description"),
        **PUBLISHED[name],
        **describe_3d(config, pretrained["veloxseg"]),
    )


def untrained_cfg(variant: str) -> VeloxSegPretrainedCfg:
    """The pretrained config of a variant without published weights: its network, generic metadata."""
    config = VeloxSegConfig(**VARIANTS[variant])
    return variant_cfg(**describe_3d(config, ModelMetadata.default(config.group_channels, config.n_classes).to_dict()))


default_cfgs = generate_default_cfgs(
    {name: published_cfg(name) for name in PUBLISHED}
    | {f"{name}.untrained": untrained_cfg(name) for name in VARIANTS if not any(t.startswith(f"{name}.") for t in PUBLISHED)}
)


def variant_of(config: VeloxSegConfig) -> str | None:
    """The registered variant whose settings (the fields the variants set) are ``config``'s, or None
    for a custom network."""
    fields = {name for settings in VARIANTS.values() for name in settings}
    for name, settings in VARIANTS.items():
        variant = VeloxSegConfig(**settings)
        if all(getattr(config, f) == getattr(variant, f) for f in fields):
            return name
    return None


def translate_timm_args(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with timm's argument names in VeloxSeg's: ``num_classes`` -> ``n_classes``, and
    ``in_chans`` -> ``group_channels=[in_chans]`` (one modality group) or, with ``group_channels`` given, a
    check that they agree. Raises ``ValueError`` when both names of a pair are given and disagree."""
    kwargs = dict(kwargs)
    if "num_classes" in kwargs:
        num_classes = kwargs.pop("num_classes")
        if kwargs.setdefault("n_classes", num_classes) != num_classes:
            raise ValueError(f"num_classes={num_classes} and n_classes={kwargs['n_classes']} disagree; give one")
    if "in_chans" in kwargs:
        in_chans = kwargs.pop("in_chans")
        group_channels = kwargs.setdefault("group_channels", [in_chans])
        if sum(group_channels) != in_chans:
            raise ValueError(
                f"in_chans={in_chans} disagrees with group_channels={list(group_channels)}. VeloxSeg reads its input "
                f"channels in modality groups: give group_channels=[...] alone, e.g. group_channels=[1, 1] for PET "
                f"and CT as two groups or group_channels=[4] for one 4-channel group (in_chans=n alone means "
                f"group_channels=[n])"
            )
    return kwargs
