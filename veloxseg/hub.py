"""Hugging Face Hub I/O: save_pretrained, push_to_hub, pretrained=True, ``hf-hub:`` and ``local-dir:`` names.

A model folder (and a Hub repo) holds three files, and a fourth where the weights have a notice:

* ``config.json``, timm's layout: ``{"architecture": "veloxseg_small", "model_args": {every
  VeloxSegConfig field}, "pretrained_cfg": {..., "veloxseg": {the 3-D metadata}}}``;
* ``model.safetensors``: the state dict, teachers included (never a pickle);
* ``README.md``: the model card (:mod:`veloxseg.card`);
* ``NOTICE``: the metadata's ``notice``, the terms of the data or base weights that ask to be kept
  with every copy (:mod:`veloxseg.provenance`).

``VeloxSeg.from_pretrained`` / ``save_pretrained`` / ``push_to_hub`` follow huggingface_hub's
``ModelHubMixin``. timm's ``save_for_hf`` writes the same config.json and weights (no card), and its
``push_to_hf_hub`` adds timm's image-classification card to a repo without a README.md: there is no
hook to give it ours, so push with ``model.push_to_hub`` (or upload a ``save_pretrained`` folder's
README.md afterwards).

Downloads go through ``hf_hub_download``, so its cache (``HF_HUB_CACHE`` or ``cache_dir``), offline
mode (``HF_HUB_OFFLINE``) and revisions (``org/name@revision``) apply. A published tag
(:data:`veloxseg.variants.PUBLISHED`), named through the registry or as ``hf-hub:veloxseg/<tag>``,
comes from a local copy before any network call: the Hub cache, else the installed weights package
(``pip install "veloxseg[weights]"``, built from ``hub/``), else the copy of its folder that ships
with veloxseg (``veloxseg/hub_models``, a link to the repository's ``hub/``: a checkout has every
file, the wheel the config.json files only), and only else from the Hub; on every route each of its
files must have the SHA-256 the registry records (its files cannot change, so a verified local copy is
the file the Hub would give; a copy with another SHA-256 is skipped with a warning). The first load of
each weights file in a process says on one WARNING line where they came from. Weights are loaded
into a model whose config may differ from theirs through :func:`veloxseg.adapt.adapt_state_dict`;
the report is ``model.adaptation_report``, and a warning says when tensors were dropped or
re-initialised.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import timm
import torch
from huggingface_hub import CommitInfo, HfApi, constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .adapt import AdaptationReport, adapt_state_dict
from .card import model_card
from .config import VeloxSegConfig, json_ready, renamed_fields
from .io import atomic_file
from .metadata import ModelMetadata, model_metadata
from .model import VeloxSeg as VeloxSegNetwork
from .provenance import description, inherited
from .variants import (
    HUB_ORG,
    PUBLISHED,
    SHIPPED_MODELS,
    VARIANTS,
    VeloxSegPretrainedCfg,
    describe_3d,
    translate_timm_args,
    variant_of,
)

_logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
NOTICE_NAME = "NOTICE"  # the training data's sources and licenses, where the card says so
REPO_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
# pretrained_cfg entries that say where weights are, not what they are: left out of config.json.
_LOCATION_KEYS = {"url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "tag", "sha256"}
INSTALL_WEIGHTS = 'pip install "veloxseg[weights]" (from a checkout: pip install ./hub)'


class HubMixin:
    """huggingface_hub's ``ModelHubMixin`` calls as methods: ``from_pretrained``, ``save_pretrained`` and
    ``push_to_hub`` (this module's functions of those names)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> VeloxSeg:
        """A trained model from a ``save_pretrained`` folder, a Hub repo id ``org/name`` or a published tag
        (``revision=``, ``cache_dir=``; other keyword arguments change config fields, the weights adapted).
        See :func:`from_pretrained`."""
        return from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> Path:
        """Write a Hub-ready folder (config.json, model.safetensors, README.md). See :func:`save_pretrained`."""
        return save_pretrained(self, save_directory, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> CommitInfo:
        """Upload this model to the Hugging Face Hub. See :func:`push_to_hub`."""
        return push_to_hub(self, repo_id, **kwargs)


class VeloxSeg(HubMixin, VeloxSegNetwork):
    """The VeloxSeg network (:class:`veloxseg.model.VeloxSeg`) with the Hub I/O methods: ``veloxseg.VeloxSeg``,
    what ``create_model`` builds."""


@dataclass(frozen=True)
class HubConfig:
    """A checked config.json: the registered architecture, the network's config, the pretrained_cfg
    entries (metadata included, under ``veloxseg``) and the parsed 3-D metadata."""

    architecture: str
    config: VeloxSegConfig
    pretrained_cfg: dict[str, Any]
    metadata: ModelMetadata


def read_config(path: str | Path) -> HubConfig:
    """Parse a VeloxSeg config.json. Raises ``ValueError`` naming the file when it is not valid JSON,
    comes from another architecture or library, or its fields do not make a valid VeloxSeg."""
    path = Path(path)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a valid JSON file ({err})") from None
    architecture = values.get("architecture") if isinstance(values, dict) else None
    if architecture not in VARIANTS:
        raise ValueError(
            f"{path}: architecture {architecture!r} is not a VeloxSeg model (one of {', '.join(VARIANTS)}); "
            f"this config.json belongs to another model or library"
        )
    for key in ("model_args", "pretrained_cfg"):
        if not isinstance(values.get(key), dict):
            raise ValueError(f"{path}: {key!r} must be a JSON object (timm's config.json layout)")
    pretrained_cfg = values["pretrained_cfg"]
    if not isinstance(pretrained_cfg.get("veloxseg"), dict):
        raise ValueError(f"{path}: pretrained_cfg has no 'veloxseg' block (the 3-D metadata)")
    try:
        stored = renamed_fields(values["model_args"], warn=False)  # a file written before a field was renamed
        config = VeloxSegConfig(**VARIANTS[architecture]).replace(**translate_timm_args(stored))
        VeloxSegPretrainedCfg(**pretrained_cfg)  # unknown keys are an error
        metadata = ModelMetadata.from_dict(pretrained_cfg["veloxseg"])
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise ValueError(f"{path}: {type(err).__name__}: {err}") from None
    problems = metadata.problems(config.group_channels, config.n_classes)
    if problems:
        raise ValueError(f"{path}: the 'veloxseg' metadata does not fit model_args: {'; '.join(problems)}")
    return HubConfig(architecture, config, pretrained_cfg, metadata)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file. Raises ``ValueError`` naming the file when it is corrupt or truncated,
    or when a weight is NaN or infinite (a diverged training run: such a model segments nothing)."""
    try:
        tensors = load_file(path, device="cpu")
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{path}: not a readable safetensors file, corrupt or truncated ({err}); download or save it again"
        ) from None
    bad = nonfinite_tensors(tensors)
    if bad:
        raise ValueError(
            f"{path}: {len(bad)} weight tensor(s) hold NaN or infinite values (e.g. {bad[0]}): the training that "
            f"wrote them diverged; these weights cannot segment anything"
        )
    return tensors


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [name for name, t in tensors.items() if t.is_floating_point() and not t.isfinite().all()]


def save_pretrained(
    model: VeloxSegNetwork, save_directory: str | Path, *, metadata: ModelMetadata | None = None, repo_id: str | None = None
) -> Path:
    """Write config.json, model.safetensors, README.md and, when the metadata has a notice, NOTICE into
    ``save_directory`` (created if needed).

    Each file is written to a temporary file in the same folder, then renamed into place (config.json last).
    metadata: the 3-D metadata to record; default: the model's ``pretrained_cfg["veloxseg"]`` when it
        fits the model's config, else generic metadata. Raises ``ValueError`` when it does not fit.
    repo_id: the Hub repo the folder is meant for (used in the card's usage example).
    Returns the folder.
    """
    files = model_files(model, metadata, repo_id)  # checks before anything is written
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_file(folder / WEIGHTS_NAME) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    for name, text in files.items():
        with atomic_file(folder / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return folder


def model_files(model: VeloxSegNetwork, metadata: ModelMetadata | None = None, repo_id: str | None = None) -> dict[str, str]:
    """The text files of ``model``'s folder, config.json last: README.md (the card), NOTICE when the
    metadata has a notice, config.json (its ``pretrained_cfg`` described from ``metadata``, see
    :func:`veloxseg.variants.describe_3d`; a published tag's ``description`` from its publication facts).
    Arguments as for :func:`save_pretrained`."""
    cfg = model.config
    metadata = model_metadata(model) if metadata is None else metadata
    problems = metadata.problems(cfg.group_channels, cfg.n_classes)
    if problems:
        raise ValueError(f"the metadata does not describe this model: {'; '.join(problems)}")
    # The variant the widths are, else the registry entrypoint the model was built with (model_args fix every field).
    architecture = variant_of(cfg) or model.pretrained_cfg.get("architecture")
    if architecture is None:
        raise ValueError(
            "this VeloxSeg has the widths of no registered variant and was not built through the registry: build "
            f"it with veloxseg.create_model(<variant>, **overrides) (variants: {', '.join(VARIANTS)})"
        )
    # Not kept: where the weights were loaded from, and the description of those weights (a model trained from
    # them is another); a published tag's description is made from its metadata.
    kept = {k: v for k, v in model.pretrained_cfg.items() if k not in _LOCATION_KEYS and k != "description"}
    described = {
        **kept,
        **describe_3d(cfg, metadata.to_dict()),
        "description": description(metadata) if metadata.publication else None,
        "veloxseg": metadata.to_dict(),
    }
    config = {
        "architecture": architecture,
        "model_args": cfg.to_dict(),
        "pretrained_cfg": json_ready({k: v for k, v in described.items() if v is not None}),
    }
    files = {CARD_NAME: str(model_card(model, metadata, architecture, repo_id))}
    if metadata.notice:
        files[NOTICE_NAME] = metadata.notice
    return {**files, CONFIG_NAME: json.dumps(config, indent=2) + "\n"}


def push_to_hub(
    model: VeloxSegNetwork,
    repo_id: str,
    *,
    metadata: ModelMetadata | None = None,
    **upload_options: Any,
) -> CommitInfo:
    """Save ``model`` (as :func:`save_pretrained` does) and upload it to Hub repo ``repo_id``;
    ``upload_options``: :func:`push_folder`'s (commit_message, private, token, revision, create_pr)."""
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(model, folder, metadata=metadata, repo_id=repo_id)
        return push_folder(folder, repo_id, **upload_options)


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    commit_message: str = "Upload VeloxSeg model",
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> CommitInfo:
    """Upload a model folder's config.json, model.safetensors, README.md and NOTICE (when there; nothing
    else) to Hub repo ``repo_id``, creating the repo when it does not exist."""
    folder = Path(folder)
    missing = [name for name in REPO_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: not a model folder, missing {', '.join(missing)}")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id, folder_path=folder, allow_patterns=[*REPO_FILES, NOTICE_NAME], commit_message=commit_message,
        revision=revision, create_pr=create_pr,
    )  # fmt: skip


def load_pretrained(
    model: VeloxSegNetwork, cache_dir: str | Path | None = None, source: HubConfig | None = None
) -> AdaptationReport:
    """Load the weights ``model.pretrained_cfg`` names into ``model``, adapted to its config.

    The source is ``hf_hub_id`` ("org/name[@revision]", downloaded through the Hub cache, file
    ``hf_hub_filename`` or model.safetensors) or ``file`` (a local model folder). Its config.json
    gives the config the weights were trained with; :func:`veloxseg.adapt.adapt_state_dict` fits them
    to ``model.config``. Sets ``pretrained_cfg["veloxseg"]`` to the downloaded metadata when it still
    describes the model; ``source``: that config.json, when already read. Returns the adaptation report. Raises ``ValueError`` when the tag has no
    published weights or a file is invalid, ``FileNotFoundError`` when a file cannot be had.
    """
    cfg = model.pretrained_cfg
    if not (cfg.get("hf_hub_id") or cfg.get("file")):
            raise ValueError(
            f"no trained weights are published for {_name(cfg)} yet (its pretrained config names no Hub repo): create "
            f"it with pretrained=False, or load trained weights with create_model('hf-hub:org/name', "
            f"pretrained=True) or create_model('local-dir:/path/to/folder', pretrained=True)"
        )
    weights_name = cfg.get("hf_hub_filename") or WEIGHTS_NAME
    if not weights_name.endswith(".safetensors"):
        raise ValueError(f"{weights_name}: VeloxSeg loads safetensors weights only, never pickled checkpoints")
    source = source or read_config(_fetch(cfg, CONFIG_NAME, cache_dir).path)
    try:
        weights_path, origin = _fetch(cfg, weights_name, cache_dir)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{err}. VeloxSeg reads safetensors weights only (timm.models.save_for_hf writes them with "
            f"safe_serialization=True)"
        ) from None
    state_dict = read_weights(weights_path)
    try:
        adapted, report = adapt_state_dict(state_dict, source.config, model)
    except ValueError as err:
        raise ValueError(f"{weights_path}: {err}") from None
    model.load_state_dict(adapted)
    fitting = ModelMetadata.fitting(source.metadata.to_dict(), model.config.group_channels, model.config.n_classes)
    metadata = inherited(fitting, source.metadata).to_dict()
    model.pretrained_cfg.update(veloxseg=metadata, **describe_3d(model.config, metadata))
    model.adaptation_report = report
    _logger.info("%s: loaded %s", _name(cfg), weights_path)
    if weights_path not in _ANNOUNCED:  # one line per weights file and process, seen without logging set up
        _ANNOUNCED.add(weights_path)
        _logger.warning("%s: pretrained weights from %s, %s", _name(cfg), origin, weights_path)
    if report.dropped or report.reinitialised:
        reasons = "; ".join(dict.fromkeys([*report.dropped.values(), *report.reinitialised.values()]))
        warnings.warn(
            f"{_name(cfg)}: {len(report.dropped)} pretrained tensor(s) dropped and {len(report.reinitialised)} "
            f"re-initialised to fit this model ({reasons}); model.adaptation_report lists them",
            stacklevel=2,
        )
    return report


def published_config(cfg: dict[str, Any], cache_dir: str | Path | None = None) -> HubConfig | None:
    """The checked config.json of the weights ``cfg`` names (a registry tag's pretrained config), or
    None when it names none; the registry builds a tag's model with that config."""
    if not (cfg.get("hf_hub_id") or cfg.get("file")):
        return None
    return read_config(_fetch(cfg, CONFIG_NAME, cache_dir).path)


def sha256_of(path: str | Path) -> str:
    """The SHA-256 of a file, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def create_from_hub(
    name: str, pretrained: bool = False, cache_dir: str | Path | None = None, **overrides: Any
) -> VeloxSeg:
    """Build the model of ``hf-hub:org/name[@revision]`` or ``local-dir:/path/to/folder``.

    Architecture and config come from its config.json (``overrides`` change config fields); with
    ``pretrained`` its weights are loaded, adapted to the overrides (see :func:`load_pretrained`).
    """
    scheme, _, location = name.partition(":")
    if scheme in ("hf-hub", "local-dir") and not location.strip():
        what = "Hub repo" if scheme == "hf-hub" else "folder"
        raise ValueError(
            f"{name!r} names no {what}: expected 'hf-hub:org/name[@revision]' or 'local-dir:/path/to/folder'"
        )
    if scheme == "hf-hub":
        source = {"hf_hub_id": location, "source": "hf-hub"}
    elif scheme == "local-dir":
        source = {"file": location, "source": "local-dir"}
    else:
        raise ValueError(f"{name!r}: expected 'hf-hub:org/name[@revision]' or 'local-dir:/path/to/folder'")
    hub_config = read_config(_fetch(source, CONFIG_NAME, cache_dir).path)
    return timm.create_model(
        hub_config.architecture,
        pretrained=pretrained,
        pretrained_cfg={**hub_config.pretrained_cfg, **source},
        cache_dir=cache_dir,
        **{**hub_config.config.to_dict(), **renamed_fields(overrides, warn=True)},
    )


def from_pretrained(
    name_or_path: str | Path, *, revision: str | None = None, cache_dir: str | Path | None = None, **overrides: Any
) -> VeloxSeg:
    """A trained model, as huggingface_hub's ``ModelHubMixin.from_pretrained`` loads one: from a folder
    :func:`save_pretrained` wrote, a Hub repo id ``org/name`` (at ``revision``), or a published tag
    (``veloxseg_small.petct_lesions``). ``overrides`` change config fields; the weights are adapted to
    them (see :func:`load_pretrained`)."""
    name = str(name_or_path)
    if name in timm.list_pretrained("veloxseg*"):
        if revision is not None:
            raise ValueError(f"{name} is a published tag, whose files are fixed: it takes no revision")
        return timm.create_model(name, pretrained=True, cache_dir=cache_dir, **overrides)
    if Path(name).expanduser().is_dir():
        if revision is not None:
            raise ValueError(f"{name} is a local folder: it takes no revision")
        return create_from_hub(f"local-dir:{name}", pretrained=True, cache_dir=cache_dir, **overrides)
    return create_from_hub(
        f"hf-hub:{name}" + (f"@{revision}" if revision else ""), pretrained=True, cache_dir=cache_dir, **overrides
    )


def _name(cfg: dict[str, Any]) -> str:
    """The weights' name for messages: the registry tag, else the Hub repo or folder, else the architecture."""
    if cfg.get("tag"):
        return f"{cfg.get('architecture')}.{cfg['tag']}"
    return cfg.get("hf_hub_id") or cfg.get("file") or cfg.get("architecture") or "this model"


_ANNOUNCED: set[Path] = set()  # weights files whose origin this process has reported


class Fetched(NamedTuple):
    """A file of a model and where it came from, in words (for the log)."""

    path: Path
    origin: str


def _published_tag(source: dict[str, Any]) -> str | None:
    """The published tag whose registered Hub repo (``veloxseg/<tag>``, default revision) ``source``
    names, or None: a local folder, another repo or another revision is the user's own."""
    repo, _, revision = (source.get("hf_hub_id") or "").partition("@")
    name = repo.removeprefix(f"{HUB_ORG}/")
    published = not source.get("file") and repo == f"{HUB_ORG}/{name}" and name in PUBLISHED
    return name if published and revision in ("", "main") else None


def _fetch(source: dict[str, Any], filename: str, cache_dir: str | Path | None) -> Fetched:
    """``filename`` of a local model folder (``file``) or of a Hub repo (``hf_hub_id``, through the Hub
    cache). A published tag's file is the first copy with its registered SHA-256 among the Hub cache,
    the weights package and its shipped copy, else a fresh download from the Hub. A copy with another
    SHA-256 (a tag's earlier release left in the cache by an older veloxseg, or a damaged download) is
    never loaded: a warning names it, and with no verified copy the error does."""
    tag = _published_tag(source)
    if source.get("file"):
        path = Path(source["file"]).expanduser() / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file in the local model folder")
        return Fetched(path, "the local folder")
    if tag is None:
        return Fetched(_download(source["hf_hub_id"], filename, cache_dir), "the Hugging Face Hub (or its cache)")
    cached = _download(source["hf_hub_id"], filename, cache_dir, local_files_only=True, missing_ok=True)
    local = (
        (cached, "the Hugging Face cache"),
        (weights_package_file(tag, filename), "the veloxseg-weights package"),
        (SHIPPED_MODELS / tag / filename, "the copy shipped with veloxseg"),
    )
    rejected: list[Path] = []
    for path, origin in local:
        if path is not None and path.is_file():
            if _registered(tag, filename, path, rejected):
                _logger.info("%s: %s from %s, %s", tag, filename, origin, path)
                return Fetched(path, f"{origin} (SHA-256 verified)")
    if rejected and constants.HF_HUB_OFFLINE:
        raise ValueError(f"{_not_registered(tag, filename, rejected[0])}; offline mode (HF_HUB_OFFLINE) is on")
    try:  # a rejected copy may be the cache's: download it again rather than trust it
        path = _download(source["hf_hub_id"], filename, cache_dir, force_download=bool(rejected))
    except FileNotFoundError as err:
        if rejected:
            raise ValueError(_not_registered(tag, filename, rejected[0]) + "; and " + str(err)) from None
        raise FileNotFoundError(f"{err}; nor is the weights package installed: {INSTALL_WEIGHTS}") from None
    if not _registered(tag, filename, path, rejected):
        raise ValueError(_not_registered(tag, filename, path))
    return Fetched(path, "the Hugging Face Hub (SHA-256 verified)")


def _registered(tag: str, filename: str, path: Path, rejected: list[Path]) -> bool:
    """Whether ``path`` has the SHA-256 registered for ``filename`` of published ``tag``; if not, a
    warning names it and it joins ``rejected``."""
    if sha256_of(path) == PUBLISHED[tag]["sha256"][filename]:
        return True
    _logger.warning("%s; skipped for another copy", _not_registered(tag, filename, path))
    rejected.append(path)
    return False


def _not_registered(tag: str, filename: str, path: Path) -> str:
    return (
        f"{path}: its SHA-256 is not the one registered for {tag} ({PUBLISHED[tag]['sha256'][filename]}): "
        f"an earlier release of the tag or a changed or incomplete file; delete it to download it again "
        f"(or reinstall the weights: {INSTALL_WEIGHTS})"
    )


def weights_package_file(tag: str, filename: str) -> Path | None:
    """``filename`` of published tag ``tag`` in the installed weights package (``veloxseg-weights``),
    or None when the package is not installed."""
    try:
        import veloxseg_weights  # optional: the [weights] extra
    except ImportError:
        return None
    return veloxseg_weights.MODELS / tag / filename


def _download(
    hub_id: str,
    filename: str,
    cache_dir: str | Path | None,
    local_files_only: bool = False,
    missing_ok: bool = False,
    force_download: bool = False,
) -> Path | None:
    """``filename`` of Hub repo ``hub_id`` ("org/name[@revision]") through the Hub cache (only from the
    cache with ``local_files_only``; None when it is not there and ``missing_ok``; fetched again over
    the cache's copy with ``force_download``)."""
    repo_id, _, revision = hub_id.partition("@")
    try:
        return Path(
            hf_hub_download(
                repo_id,
                filename,
                revision=revision or None,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                force_download=force_download,
            )
        )
    except LocalEntryNotFoundError:
        if missing_ok:
            return None
        cache = cache_dir or constants.HF_HUB_CACHE
        why = "offline mode (HF_HUB_OFFLINE) is on" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise FileNotFoundError(
            f"{filename} of Hub repo {hub_id}: not in the Hub cache {cache} and {why}; download it once online"
        ) from None
    except (EntryNotFoundError, HfHubHTTPError, HFValidationError) as err:
        raise FileNotFoundError(f"{filename} of Hub repo {hub_id}: {type(err).__name__}: {err}") from None
