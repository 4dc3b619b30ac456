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

import contextlib
import difflib
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cdul_ray import storage

logger = logging.getLogger(__name__)

LOCAL_DIR = "local-dir:"
RANDOM_INIT = "none"
# What works without internet; appended to every hub failure.
OFFLINE_OPTIONS = (
    "Offline options: the bundled small CLIP (--model cdul-synth-rn --pretrained synth), a local weights file "
    "(--pretrained /path/to/weights.safetensors, .pt or .bin), an s3:// URI, or a folder with open_clip_config.json "
    "and weights (--model local-dir:/path/to/folder)"
)
HUB_PROBE_TIMEOUT_S = 3.0


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


def view_size(preprocess: dict[str, Any]) -> tuple[int, int]:
    """(height, width) in pixels of one view: open_clip's preprocess ``size``, an int (square) or [height, width]."""
    size = preprocess["size"]
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


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
        names = open_clip.list_models()
        close = difflib.get_close_matches(model, names, n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UnknownModelError(
            f"--model (config field `model`): unknown CLIP model {model!r}; {hint}Other choices: the bundled offline "
            f"model cdul-synth-rn, a folder as local-dir:/path/to/folder, or any of the {len(names)} names of "
            "open_clip.list_models()"
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
            source = tag_cfg.get("hf_hub") or tag_cfg.get("url")
            offline = _hub_offline()
            try:
                with _hf_offline(offline):  # offline: only open_clip's cache is looked at, no retries
                    open_clip.download_pretrained(tag_cfg)
            except Exception as e:  # network errors come in many types
                why = "download failed: the hub is off (HF_HUB_OFFLINE) or unreachable (no internet?) and the " \
                      "weights are not in the cache" if offline else "download failed"
                raise WeightsNotFoundError(
                    f"--pretrained (config field `pretrained`): model {model!r}, pretrained tag {pretrained!r}: {why} "
                    f"(tried: open_clip hub {source}). {OFFLINE_OPTIONS}. Cause: {e}"
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
    close = difflib.get_close_matches(pretrained, tags + bundled_tags, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise WeightsNotFoundError(
        f"--pretrained (config field `pretrained`): model {model!r}: pretrained {pretrained!r} is not a known tag "
        f"({', '.join(tags + bundled_tags) or 'none'}), not an existing local file (tried: {path.resolve()}) and not "
        f"an s3:// URI.{hint}"
    )


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """True when one TCP connect to the Hugging Face hub (``huggingface_hub.constants.ENDPOINT``, port 443) succeeds
    within ``timeout`` seconds; the one reachability probe used before any hub download (CLIP and timm weights)."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_offline() -> bool:
    """True when the Hugging Face hub is off (``HF_HUB_OFFLINE``) or unreachable within a few seconds.

    huggingface_hub retries a failed request 5 times with back-off and open_clip asks for two file names, which made
    a missing network cost about a minute; one TCP connect to the hub answers in ``HUB_PROBE_TIMEOUT_S`` at most.
    """
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or not hub_reachable()


@contextlib.contextmanager
def _hf_offline(offline: bool) -> Iterator[None]:
    """huggingface_hub's offline mode (cache only, no request) for the duration of the block, when ``offline``."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = previous or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


class _OpenClipChatter(logging.Filter):
    """Drops open_clip's INFO steps and its 'initialized randomly' warning (see ``quiet_open_clip``)."""

    def __init__(self, drop_random_init_warning: bool):
        super().__init__()
        self.drop_random_init_warning = drop_random_init_warning

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}open_clip{os.sep}" not in record.pathname:
            return True
        if record.levelno < logging.WARNING:
            return False
        return not (self.drop_random_init_warning and "initialized randomly" in record.getMessage())


@contextlib.contextmanager
def quiet_open_clip(weights_loaded_later: bool = False) -> Iterator[None]:
    """Silence open_clip's model-building log on the root logger for the duration of the block.

    open_clip logs every step of ``create_model`` at INFO on the root logger (shown in Ray Train workers, whose root
    logger is at INFO). With ``weights_loaded_later`` (the caller loads a state dict right after), its warning "No
    pretrained weights loaded ... Model initialized randomly." is false and dropped too; every other warning stays.
    """
    chatter = _OpenClipChatter(weights_loaded_later)
    root = logging.getLogger()
    root.addFilter(chatter)
    try:
        yield
    finally:
        root.removeFilter(chatter)


def create_architecture(model: str):
    """An open_clip CLIP module of ``model`` without weights, for a caller that loads a state dict into it next.

    Returns:
        The open_clip CLIP module (fp32, random init until the caller loads its weights).
    """
    with quiet_open_clip(weights_loaded_later=True):
        return open_clip_module().create_model(model, pretrained=None)


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
    with quiet_open_clip():
        model = open_clip.create_model(spec.model, pretrained=pretrained, precision="fp32", device=device,
                                       weights_only=True)
    model.eval()
    return model, open_clip.get_tokenizer(spec.model)


def image_encoder(model, views_per_call: int, size: tuple[int, int], device: torch.device | str, autocast: bool,
                  compile: bool):
    """The function that turns a batch of normalised views into image embeddings: eager, or compiled once.

    Eager is ``model.encode_image``. Compiled (``compile=True``) is ``torch.compile`` of the image tower (inductor,
    with its weights frozen as constants: batch norm folded into the convolutions, weights pre-packed on CPU) for
    exactly ``views_per_call`` views; smaller batches are padded with zero views and the padding is dropped (eval
    mode: every view's embedding is independent of the others), so one compiled graph serves the whole run. The
    compile runs here, on a zero batch, under the same autocast the calls use: 10-30 s on CPU the first time on a
    machine, 5-10 s once inductor's cache under ``/tmp`` holds it. Embeddings differ from eager by float
    rounding only (≈ 2e-6 on the bundled CLIP; docs/performance.md).

    Args:
        model: an open_clip CLIP in eval mode (``load_clip``).
        views_per_call: the most views one call receives (images per CLIP batch × (1 + K²)).
        size: (height, width) of a view in pixels.
        autocast: bfloat16 autocast on CUDA (``--precision amp``).
        compile: compile the image tower; when compiling fails (no C++ compiler on a CPU node, an operator inductor
            cannot lower) the reason is logged once and the eager function is returned: a slower run, never a failed
            one.

    Returns:
        ``encode(x)``: [M, 3, H, W] float32 with M ≤ ``views_per_call`` -> [M, D] embeddings (float32, or bfloat16
        under autocast).
    """
    eager = model.encode_image
    if not compile:
        return eager

    def autocasting():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast)

    start = time.perf_counter()
    try:
        import torch._inductor.config as inductor_config

        compiled = torch.compile(model.visual, dynamic=False)
        with inductor_config.patch(freezing=True), torch.inference_mode(), autocasting():
            compiled(torch.zeros(views_per_call, 3, *size, device=device))
        logger.info("--compile: CLIP image tower compiled for %d views per call in %.1f s", views_per_call,
                    time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001 - any compiler failure: the eager model computes the same embeddings
        logger.warning("--compile: compiling the CLIP image tower failed (%s: %s); running it eagerly",
                       type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return eager

    def encode(x: torch.Tensor) -> torch.Tensor:
        m = len(x)
        if m > views_per_call:
            raise ValueError(f"{m} views in one call; the compiled encoder takes at most {views_per_call}")
        if m < views_per_call:
            x = torch.cat([x, x.new_zeros(views_per_call - m, *x.shape[1:])])
        return compiled(x)[:m]

    return encode
