"""The one CLIP factory (over open_clip).

A model is named by ``model`` (an open_clip config name such as ``RN50x64``, a config registered by cdul-ray such as
``cdul-synth-rn``, or ``local-dir:/path`` holding ``open_clip_config.json`` and weights) and ``pretrained``:

- an open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k``): downloaded from the hub into open_clip's cache;
- a bundled tag of cdul-ray (``synth`` for ``cdul-synth-rn``): weights shipped inside the package;
- a local file (``/weights/clip.safetensors``, ``.pt``, ``.bin``): must exist on every node;
- an ``s3://`` URI: fetched once per node into ``<cache_dir>/weights/`` (a file lock makes concurrent actors share it);
- ``none``: random initialisation (tests and debugging only; the scores are meaningless).

``resolve_weights`` runs on the driver before any cluster work and raises ``WeightsNotFoundError`` naming the model
and everything tried; ``load_clip`` runs inside actors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cdul_ray import storage

logger = logging.getLogger(__name__)

LOCAL_DIR = "local-dir:"
RANDOM_INIT = "none"


class WeightsNotFoundError(FileNotFoundError):
    """The requested CLIP weights cannot be found; the message names the model and every place tried."""


class UnknownModelError(ValueError):
    """The model name is neither an open_clip config, a registered cdul-ray config nor a ``local-dir:`` folder."""


@dataclass(frozen=True)
class ClipSpec:
    """A resolved model: what actors load.

    Attributes:
        model: open_clip model name (or ``local-dir:`` path).
        pretrained: what was asked for (tag, path, URI or ``none``).
        kind: ``tag`` | ``bundled`` | ``file`` | ``s3`` | ``local-dir`` | ``random``.
        location: local file for ``bundled``/``file``, the URI for ``s3``, None otherwise.
        preprocess: open_clip ``PreprocessCfg`` fields (size, mean, std, interpolation, resize_mode, fill_color).
    """

    model: str
    pretrained: str
    kind: str
    location: str | None
    preprocess: dict[str, Any]


def open_clip_module():
    import open_clip

    from cdul_ray.models import register_model_configs

    register_model_configs()
    return open_clip


def _bundled(model: str, pretrained: str) -> Path | None:
    from cdul_ray.models import BUNDLED_WEIGHTS

    return BUNDLED_WEIGHTS.get((model, pretrained))


def _preprocess_cfg(open_clip, model: str, tag_cfg: dict[str, Any] | None) -> dict[str, Any]:
    """open_clip's final PreprocessCfg for a model, computed from configs only (no weights, no instantiation)."""
    from dataclasses import asdict

    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg = asdict(PreprocessCfg())
    if model.startswith(LOCAL_DIR):
        model_cfg = json.loads((Path(model[len(LOCAL_DIR) :]) / "open_clip_config.json").read_text())
        cfg = merge_preprocess_dict(cfg, model_cfg.get("preprocess_cfg", {}))
        model_cfg = model_cfg["model_cfg"]
    else:
        model_cfg = open_clip.get_model_config(model)
    if tag_cfg:
        cfg = merge_preprocess_dict(cfg, tag_cfg)
    size = model_cfg["vision_cfg"].get("image_size")
    if size is not None:
        cfg["size"] = size
    cfg = merge_preprocess_dict(cfg, model_cfg.get("preprocess_cfg", {}))
    for key in ("mean", "std"):
        cfg[key] = tuple(cfg[key])
    return cfg


def resolve_weights(model: str, pretrained: str, download: bool = True, endpoint_override: str | None = None) -> ClipSpec:
    """Resolve ``(model, pretrained)`` on the driver, failing fast when the weights cannot be had.

    Args:
        model: model name (see module docstring).
        pretrained: tag, bundled tag, local file, ``s3://`` URI or ``none``.
        download: for hub tags, download into open_clip's cache now (so a missing network fails here, not in actors).
        endpoint_override: S3 endpoint for ``s3://`` weights.

    Returns:
        The ClipSpec actors load from.

    Raises:
        UnknownModelError: unknown model name (the message lists the valid names).
        WeightsNotFoundError: the weights are not where ``pretrained`` says (the message names what was tried).
    """
    open_clip = open_clip_module()
    if model.startswith(LOCAL_DIR):
        folder = Path(model[len(LOCAL_DIR) :]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise WeightsNotFoundError(
                f"model {model!r}: no open_clip_config.json in {folder} (tried: local-dir folder {folder})"
            )
        model = LOCAL_DIR + str(folder.resolve())
        return ClipSpec(model, pretrained, "local-dir", None, _preprocess_cfg(open_clip, model, None))
    if open_clip.get_model_config(model) is None:
        raise UnknownModelError(
            f"unknown CLIP model {model!r} (field `model`); valid names: {', '.join(open_clip.list_models())}, "
            f"or 'local-dir:/path/to/folder'"
        )
    if pretrained.lower() == RANDOM_INIT:
        logger.warning("model %s with pretrained=none: random weights, scores are meaningless", model)
        return ClipSpec(model, pretrained, "random", None, _preprocess_cfg(open_clip, model, None))
    bundled = _bundled(model, pretrained)
    if bundled is not None:
        if not bundled.is_file():
            raise WeightsNotFoundError(f"model {model!r}: bundled weights {pretrained!r} missing at {bundled}")
        return ClipSpec(model, pretrained, "bundled", str(bundled), _preprocess_cfg(open_clip, model, None))
    tag_cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if tag_cfg:
        if download:
            try:
                open_clip.download_pretrained(tag_cfg)
            except Exception as e:  # network errors come in many types
                raise WeightsNotFoundError(
                    f"model {model!r}, pretrained tag {pretrained!r}: download failed (tried: open_clip hub "
                    f"{tag_cfg.get('hf_hub') or tag_cfg.get('url')}). Without internet, pass a local file or an "
                    f"s3:// URI as `pretrained`. Cause: {e}"
                ) from e
        return ClipSpec(model, pretrained, "tag", None, _preprocess_cfg(open_clip, model, tag_cfg))
    if storage.is_s3(pretrained):
        if not storage.exists(pretrained, endpoint_override):
            raise WeightsNotFoundError(f"model {model!r}: weights not found at {pretrained} (tried: S3 object)")
        return ClipSpec(model, pretrained, "s3", pretrained, _preprocess_cfg(open_clip, model, None))
    path = Path(pretrained).expanduser()
    if path.is_file():
        return ClipSpec(model, pretrained, "file", str(path.resolve()), _preprocess_cfg(open_clip, model, None))
    tags = open_clip.list_pretrained_tags_by_model(model)
    bundled_tags = [t for (m, t) in _bundled_tags() if m == model]
    raise WeightsNotFoundError(
        f"model {model!r}: pretrained {pretrained!r} is not a known tag ({', '.join(tags + bundled_tags) or 'none'}), "
        f"not an existing local file (tried: {path.resolve()}) and not an s3:// URI"
    )


def _bundled_tags() -> list[tuple[str, str]]:
    from cdul_ray.models import BUNDLED_WEIGHTS

    return list(BUNDLED_WEIGHTS)


def fetch_to_cache(uri: str, cache_dir: str, endpoint_override: str | None = None) -> Path:
    """Copy an ``s3://`` object to ``<cache_dir>/weights/<sha1(uri)>/<name>`` once per node.

    Concurrent callers on one node (several actors) wait on a file lock; the copy is atomic (temp file + rename).
    """
    from filelock import FileLock

    digest = hashlib.sha1(uri.encode()).hexdigest()[:16]
    folder = Path(cache_dir).expanduser() / "weights" / digest
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / os.path.basename(uri.rstrip("/"))
    with FileLock(str(folder / ".lock")):
        if not target.is_file():
            logger.info("fetching CLIP weights %s -> %s", storage.redact(uri), target)
            tmp = target.with_suffix(target.suffix + ".part")
            tmp.write_bytes(storage.read_bytes(uri, endpoint_override))
            tmp.rename(target)
    return target


def load_clip(
    spec: ClipSpec, device: torch.device | str = "cpu", cache_dir: str = "~/.cache/cdul_ray", endpoint_override=None
):
    """Instantiate the CLIP model of a resolved spec, fp32, in eval mode.

    Returns:
        ``(model, tokenizer)``: an open_clip CLIP module on ``device`` and its tokenizer.
    """
    open_clip = open_clip_module()
    if spec.kind == "local-dir":
        pretrained = None
    elif spec.kind == "random":
        pretrained = None
    elif spec.kind == "s3":
        pretrained = str(fetch_to_cache(spec.location, cache_dir, endpoint_override))
    elif spec.kind in ("bundled", "file"):
        pretrained = spec.location
    else:
        pretrained = spec.pretrained
    # weights_only=True: a .pt/.bin file is unpickled without running code (safetensors files never are pickles)
    model = open_clip.create_model(spec.model, pretrained=pretrained, precision="fp32", device=device,
                                   weights_only=True)
    model.eval()
    return model, open_clip.get_tokenizer(spec.model)
