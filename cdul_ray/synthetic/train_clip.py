"""Train the small synthetic-world CLIP (``cdul-synth-rn``) contrastively on single-object images.

The model sees ONLY images with one object each (CLIP's own weakness, the paper's motivation): freshly generated
from the seed, captioned "a photo of a red triangle." / "a photo of a triangle." (and two other templates, see
``cdul_ray.synthetic.world.caption_for``). The loss is CLIP's symmetric InfoNCE with a learned temperature, with
the one change this world needs: images of a batch that carry the same caption share it as their positive
(:func:`clip_loss_shared_captions`; it equals open_clip's ``ClipLoss`` when all captions differ). After training, the weights are written as fp16 safetensors, reloaded through
``open_clip.create_model_and_transforms(..., pretrained=<file>)`` and scored zero-shot on held-out single objects
(another seed); that number goes into ``MODEL_CARD.md``.

Usage::

    python -m cdul_ray.synthetic.train_clip --seed 0 --out cdul_ray/models/
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import logging
import math
import multiprocessing
import pathlib
import platform
import time
from dataclasses import dataclass

import numpy as np
import torch

from cdul_ray.models import BUNDLED_WEIGHTS, MODELS_DIR, SYNTH_MODEL_NAME, SYNTH_PRETRAINED_TAG, register_model_configs
from cdul_ray.synthetic import world
from cdul_ray.synthetic.zero_shot import DEFAULT_EVAL_N, DEFAULT_EVAL_SEED, ZERO_SHOT_TEMPLATE, zero_shot_eval

logger = logging.getLogger(__name__)

WEIGHTS_FILE = BUNDLED_WEIGHTS[(SYNTH_MODEL_NAME, SYNTH_PRETRAINED_TAG)].name
MODEL_CARD_FILE = "MODEL_CARD.md"


@dataclass(frozen=True)
class TrainClipConfig:
    """Everything that determines the trained weights (recorded in the model card).

    Attributes:
        seed: seed of the training images ("single" stream), of the model init and of the batch order.
        model_name: registered open_clip config name.
        num_images: size of the generated single-object training pool.
        steps: optimizer steps.
        batch_size: images per step (each with its own caption).
        lr: peak AdamW learning rate (linear warm-up, cosine decay to 0).
        warmup_steps: warm-up length.
        weight_decay: AdamW weight decay on matrices/conv kernels (not on gains, biases, embeddings' scale).
        flips: apply a random flip/transpose (dihedral group, class-preserving) to each training image.
        threads: torch intra-op threads.
        workers: processes generating the training pool.
        eval_n: held-out single objects for the zero-shot evaluation.
        eval_seed: generation seed of the held-out set (must differ from ``seed``).
        eval_every: log a small zero-shot check every this many steps (0: never); does not change the weights.
    """

    seed: int = 0
    model_name: str = SYNTH_MODEL_NAME
    num_images: int = 24000
    steps: int = 4800
    batch_size: int = 128
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    flips: bool = True
    threads: int = 2
    workers: int = 2
    eval_n: int = DEFAULT_EVAL_N
    eval_seed: int = DEFAULT_EVAL_SEED
    eval_every: int = 800

    def validate(self) -> None:
        """Raise ``ValueError`` on inconsistent settings."""
        if self.seed in (self.eval_seed, self.eval_seed + 1):
            raise ValueError("eval_seed must differ from seed: the zero-shot set must be held out")
        for name in ("num_images", "steps", "batch_size", "threads", "workers", "eval_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size > self.num_images:
            raise ValueError("batch_size must not exceed num_images")


def generate_pool(seed: int, n: int, size: int, workers: int, chunk: int = 500) -> tuple[np.ndarray, np.ndarray,
                                                                                         list[str]]:
    """Generate the training pool in ``workers`` processes (deterministic: every sample has its own generator).

    Returns:
        ``(images [N, size, size, 3] uint8, labels [N], captions)``.
    """
    bounds = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    if workers <= 1:
        parts = [world.single_object_arrays(seed, a, b, size) for a, b in bounds]
    else:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that already runs torch threads
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            parts = list(pool.map(world.single_object_arrays, *zip(*[(seed, a, b, size) for a, b in bounds])))
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    captions = [c for p in parts for c in p[2]]
    return images, labels, captions


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's convention: no weight decay on gains, biases, norms, logit_scale and 1-d parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "bn" in name or "ln" in name or "logit_scale" in name or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def clip_loss_shared_captions(
    image_features: torch.Tensor, text_features: torch.Tensor, caption_index: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE loss when several images of a batch share one caption.

    open_clip's ``ClipLoss`` assumes caption ``i`` belongs to image ``i`` only. In this world captions repeat
    ("a photo of a triangle." is drawn for many images of a batch), and ``ClipLoss`` would then push an image away
    from the very caption it carries, written a second time. Here every distinct caption appears once, and an image's
    target is its caption (image -> text), a caption's target is the uniform distribution over the images that carry
    it (text -> image). With all captions distinct it equals ``ClipLoss`` exactly (Radford et al. 2021, Fig. 3).

    Args:
        image_features: ``[B, D]`` unit-norm image embeddings.
        text_features: ``[U, D]`` unit-norm embeddings of the batch's distinct captions.
        caption_index: ``[B]`` int64 in ``0..U-1``, the caption of each image (every caption used at least once).
        logit_scale: scalar, the temperature already exponentiated (``logit_scale.exp()``).

    Returns:
        Scalar loss, >= 0 (its floor is ``log`` of the caption multiplicities, not 0).
    """
    logits = logit_scale * image_features @ text_features.T  # (B, U)
    image_to_text = torch.nn.functional.cross_entropy(logits, caption_index)
    owners = torch.nn.functional.one_hot(caption_index, text_features.shape[0]).T.float()  # (U, B)
    targets = owners / owners.sum(1, keepdim=True)
    text_to_image = -(targets * torch.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2


def _dihedral(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Apply one of 8 flips/transposes per image. x: ``[B, 3, H, W]`` (H == W), codes: ``[B]`` in 0..7."""
    out = x.clone()
    for code in range(1, 8):
        sel = codes == code
        if not bool(sel.any()):
            continue
        y = x[sel]
        if code & 1:
            y = y.flip(-1)
        if code & 2:
            y = y.flip(-2)
        if code & 4:
            y = y.transpose(-1, -2)
        out[sel] = y
    return out


def _optimise(model, preprocess, tokenizer, pixels: torch.Tensor, cap_ids: torch.Tensor, all_tokens: torch.Tensor,
              norm: tuple[torch.Tensor, torch.Tensor], cfg: TrainClipConfig) -> list[float]:
    """The CLIP training steps (shared-caption contrastive loss, cosine LR schedule); returns the per-step losses.

    Args:
        pixels: [N, 3, S, S] uint8 training images. cap_ids: [N] caption index of each image into ``all_tokens``.
        all_tokens: [V, L] token ids of every caption of the world. norm: image mean and std, each [1, 3, 1, 1].
    """
    mean, std = norm
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress))

    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(pixels), generator=gen)
    cursor = 0
    model.train()
    t0 = time.perf_counter()
    losses: list[float] = []
    for step in range(cfg.steps):
        if cursor + cfg.batch_size > len(order):
            order, cursor = torch.randperm(len(pixels), generator=gen), 0
        idx = order[cursor:cursor + cfg.batch_size]
        cursor += cfg.batch_size
        x = (pixels[idx].float() / 255.0 - mean) / std  # (B, 3, S, S)
        if cfg.flips:
            x = _dihedral(x, torch.randint(0, 8, (len(idx),), generator=gen))
        x = x.contiguous(memory_format=torch.channels_last)
        uniq, inverse = torch.unique(cap_ids[idx], return_inverse=True)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)

        image_features = model.encode_image(x, normalize=True)  # (B, D)
        text_features = model.encode_text(all_tokens[uniq], normalize=True)  # (U, D)
        loss = clip_loss_shared_captions(image_features, text_features, inverse, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if step % 25 == 0 or step == cfg.steps - 1:
            logger.info("step %d/%d loss %.4f logit_scale %.2f lr %.2e elapsed %.0fs", step + 1, cfg.steps,
                        losses[-1], float(model.logit_scale.detach().exp()), lr_at(step), time.perf_counter() - t0)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            # Progress only (small, separate seed); eval mode leaves BatchNorm statistics and the RNGs untouched.
            acc = zero_shot_eval(model, preprocess, tokenizer, n=240, seed=cfg.eval_seed + 1).accuracy
            model.train()
            logger.info("step %d: zero-shot accuracy %.3f on 240 held-out images", step + 1, acc)
    return losses


def _input_spec(model) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(image side S, mean [1, 3, 1, 1], std [1, 3, 1, 1]) of an open_clip model's image tower."""
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    pp = model.visual.preprocess_cfg
    mean = torch.tensor(pp["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(pp["std"], dtype=torch.float32).view(1, 3, 1, 1)
    return size, mean, std


def train(cfg: TrainClipConfig, out_dir: pathlib.Path) -> dict:
    """Train, save fp16 safetensors, re-load them through open_clip, evaluate zero-shot, write the model card.

    Args:
        cfg: training configuration.
        out_dir: folder for the weights and ``MODEL_CARD.md``.

    Returns:
        Summary dictionary (also the model card's front matter).
    """
    import open_clip
    from safetensors.torch import save_file

    cfg.validate()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    register_model_configs()
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    model, _, preprocess = open_clip.create_model_and_transforms(cfg.model_name)
    # channels_last: oneDNN's CPU convolutions (backward especially) are several times faster for small widths.
    model.visual.to(memory_format=torch.channels_last)
    tokenizer = open_clip.get_tokenizer(cfg.model_name)
    size, mean, std = _input_spec(model)
    n_params = sum(p.numel() for p in model.parameters())

    t0 = time.perf_counter()
    images, labels, captions = generate_pool(cfg.seed, cfg.num_images, size, cfg.workers)
    t_data = time.perf_counter() - t0
    logger.info("generated %d single-object images in %.1fs", len(images), t_data)

    vocab = world.all_captions()
    cap_index = {c: i for i, c in enumerate(vocab)}
    cap_ids = torch.tensor([cap_index[c] for c in captions], dtype=torch.long)
    all_tokens = tokenizer(vocab)  # (V, L)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S) uint8

    t0 = time.perf_counter()
    losses = _optimise(model, preprocess, tokenizer, pixels, cap_ids, all_tokens, (mean, std), cfg)
    t_train = time.perf_counter() - t0

    weights_path = out_dir / WEIGHTS_FILE
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights_path), metadata={"model_name": cfg.model_name, "seed": str(cfg.seed)})

    # Score the weights exactly as users get them: fp16 file -> open_clip loader -> fp32 model.
    t0 = time.perf_counter()
    loaded, _, loaded_preprocess = open_clip.create_model_and_transforms(cfg.model_name, pretrained=str(weights_path))
    result = zero_shot_eval(loaded, loaded_preprocess, tokenizer, n=cfg.eval_n, seed=cfg.eval_seed)
    t_eval = time.perf_counter() - t0
    t_total = time.perf_counter() - t_start

    summary = {
        "model_name": cfg.model_name,
        "pretrained_tag": SYNTH_PRETRAINED_TAG,
        "weights_file": WEIGHTS_FILE,
        "weights_bytes": weights_path.stat().st_size,
        "parameters": n_params,
        "train_config": dataclasses.asdict(cfg),
        "images_seen": cfg.steps * cfg.batch_size,
        "final_loss_mean_last_25": float(np.mean(losses[-25:])),
        "final_logit_scale": float(model.logit_scale.exp()),
        "zero_shot_template": ZERO_SHOT_TEMPLATE,
        "zero_shot_accuracy": round(result.accuracy, 4),
        "zero_shot_per_class": {k: round(v, 4) for k, v in result.per_class.items()},
        "zero_shot_eval_n": result.n,
        "zero_shot_eval_seed": result.seed,
        "time_data_s": round(t_data, 1),
        "time_train_s": round(t_train, 1),
        "time_eval_s": round(t_eval, 1),
        "time_total_s": round(t_total, 1),
        "versions": _versions(),
    }
    (out_dir / MODEL_CARD_FILE).write_text(render_model_card(summary, result.confusion))
    logger.info("wrote %s and %s", weights_path, out_dir / MODEL_CARD_FILE)
    return summary


def _versions() -> dict[str, str]:
    import open_clip
    import PIL

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
    }


def _confusion_markdown(confusion: np.ndarray) -> str:
    """[C, C] counts (rows: true class) as a Markdown table."""
    header = "| true \\ pred | " + " | ".join(world.CLASS_NAMES) + " |"
    sep = "|---" * (len(world.CLASS_NAMES) + 1) + "|"
    rows = "\n".join(f"| {c} | " + " | ".join(str(int(v)) for v in confusion[k]) + " |"
                     for k, c in enumerate(world.CLASS_NAMES))
    return f"{header}\n{sep}\n{rows}"


def render_model_card(summary: dict, confusion: np.ndarray) -> str:
    """Markdown model card; the first block (between ``---`` lines) is JSON front matter that tests read."""
    cfg = summary["train_config"]
    per_class = "\n".join(f"| {k} | {v:.3f} |" for k, v in summary["zero_shot_per_class"].items())
    mb = summary["weights_bytes"] / 2**20
    return f"""---
{json.dumps(summary, indent=2, sort_keys=True)}
---

# Model card: `{summary['model_name']}` / `{summary['pretrained_tag']}` (cdul-ray's offline stand-in for CLIP)

A small CLIP (timm `test_resnet` convolutional image tower, 2-layer transformer text tower; config `{summary['model_name']}.json`
next to this file) trained from scratch, contrastively, on **single-object** synthetic images only. It exists so
that cdul-ray's CDUL pipeline can be run and tested offline, where real CLIP weights cannot be downloaded. Like
CLIP, it has never seen a multi-object scene: global alignment of a scene with several objects is its weak spot,
which is exactly what CDUL's local (snippet) alignment is meant to fix.

## Files
- `{summary['weights_file']}`: fp16 safetensors state dict, {mb:.1f} MiB, {summary['parameters']:,} parameters.
- Load: `cdul_ray.models.register_model_configs()` then
  `open_clip.create_model_and_transforms("{summary['model_name']}", pretrained=str(BUNDLED_WEIGHTS[("{summary['model_name']}", "{summary['pretrained_tag']}")]))`
  (open_clip {summary['versions']['open_clip']} reads `.safetensors` directly and copies the fp16 tensors into
  the fp32 model). Tokenizer: `open_clip.get_tokenizer("{summary['model_name']}")` (context length from the config).
- Preprocess: open_clip's default eval transform at the config's image size (bicubic resize of the shortest
  side, center crop, OpenAI mean/std); training used exactly this transform.

## Training data
- `cdul_ray.synthetic.world.make_single_object`, "single" stream, seed {cfg['seed']}, {cfg['num_images']:,} images:
  one object of {len(world.CLASS_NAMES)} shape classes ({", ".join(world.CLASS_NAMES)}) in one of
  {len(world.COLOR_NAMES)} colours (independent of the class), 30-90 % of the frame side, random position (up to
  15 % of its radius outside the frame), rotation and mild stretch, on a cluttered background; rendered at
  64-128 px and JPEG round-tripped (quality 75-95).
- Captions: `{'", "'.join(world.CAPTION_TEMPLATES)}` (p = {world.CAPTION_TEMPLATE_P}), naming the colour with
  probability {world.CAPTION_COLOR_P} ("a photo of a red triangle." / "a photo of a triangle.").
- Each training image gets a random flip/transpose (class-preserving) when `flips` is true.

## Training
- Loss: CLIP's symmetric InfoNCE with a learned temperature (clamped at 100), where images of a batch that carry
  the same caption share it as their positive (`clip_loss_shared_captions`; identical to `open_clip.ClipLoss`
  when all captions differ: here captions repeat, and `ClipLoss` would push an image away from its own caption).
- AdamW (betas 0.9/0.98, eps 1e-6), peak lr {cfg['lr']}, {cfg['warmup_steps']} warm-up steps then cosine to 0,
  weight decay {cfg['weight_decay']} (not on gains/biases/logit scale).
- {cfg['steps']} steps x batch {cfg['batch_size']} = {summary['images_seen']:,} images seen; mean loss of the last
  25 steps {summary['final_loss_mean_last_25']:.3f} (the floor is above 0: a batch holds many images with identical
  captions); final logit scale {summary['final_logit_scale']:.1f}.
- Wall time on {cfg['threads']} CPU threads ({cfg['workers']} processes for data): data {summary['time_data_s']} s,
  training {summary['time_train_s']} s, evaluation {summary['time_eval_s']} s, total {summary['time_total_s']} s
  (measured on a shared 2-core machine; other jobs may have been running).
- Versions: {", ".join(f"{k} {v}" for k, v in summary['versions'].items())}.

## Zero-shot accuracy on held-out single objects
Prompt `{summary['zero_shot_template']}`, logits `logit_scale.exp() * cos`, {summary['zero_shot_eval_n']}
class-balanced images freshly generated with seed {summary['zero_shot_eval_seed']} (never seen in training), scored
with the fp16 weights as saved: **top-1 accuracy {summary['zero_shot_accuracy']:.4f}**.
`tests/test_synth_clip.py` reproduces this number from the committed weights.

| class | accuracy |
|---|---|
{per_class}

Confusion matrix (rows: true class, columns: predicted):

{_confusion_markdown(confusion)}

## Limitations
- Trained on single objects only; a scene's global embedding mixes its objects (that is the point of the
  benchmark).
- Knows only this world's 12 shapes and 12 colours; useless on real photos.
- Bit-exact regeneration needs the same torch/NumPy/Pillow builds and thread count; other setups give
  numerically different but statistically equivalent weights.

## Regenerate
```
python -m cdul_ray.synthetic.train_clip --seed {cfg['seed']} --out cdul_ray/models/
```
"""


def read_model_card_summary(path: pathlib.Path = MODELS_DIR / MODEL_CARD_FILE) -> dict:
    """The JSON front matter of a model card written by :func:`render_model_card`."""
    text = path.read_text()
    if not text.startswith("---\n"):
        raise ValueError(f"{path} has no front matter")
    end = text.index("\n---\n", 4)
    return json.loads(text[4:end])


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    defaults = TrainClipConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--out", type=pathlib.Path, default=MODELS_DIR, help="output folder (default: %(default)s)")
    for field in dataclasses.fields(TrainClipConfig):
        if field.name == "seed":
            continue
        flag = "--" + field.name.replace("_", "-")
        if field.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
        else:
            kind = {"int": int, "float": float, "str": str}[str(field.type)]
            p.add_argument(flag, type=kind, default=field.default)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = TrainClipConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainClipConfig)})
    summary = train(cfg, args.out)
    print(json.dumps({k: summary[k] for k in ("zero_shot_accuracy", "time_total_s", "weights_bytes")}, indent=2))


if __name__ == "__main__":
    main()
