"""Global and local alignment (CDUL paper §3.1; method.md §1-§3)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)


def class_text_embeddings(
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor],
    classes: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Class text embeddings T from prompt templates (method.md §1, open_clip's zero-shot recipe).

    Each template is filled with each class name, encoded, L2-normalised, averaged over templates per class and
    L2-normalised again.

    Args:
        encode_text: CLIP text tower, token ids [M, L] -> features [M, D].
        tokenizer: open_clip tokenizer, list of M strings -> token ids [M, L].
        classes: C natural class names.
        templates: prompt templates with one ``{}`` each.
        device: where the text tower runs.

    Returns:
        T, [C, D] float32, rows unit-norm.

    Raises:
        ValueError: no classes, no templates, or a template without ``{}``.
    """
    if not classes:
        raise ValueError("classes must not be empty")
    if not templates:
        raise ValueError("templates must not be empty")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"every prompt template needs a '{{}}' placeholder for the class name; bad: {bad}")
    prompts = [t.format(c) for c in classes for t in templates]  # C*P strings, class-major
    tokens = tokenizer(prompts).to(device)  # (C*P, L)
    feats = F.normalize(encode_text(tokens).float(), dim=-1)  # (C*P, D)
    feats = feats.reshape(len(classes), len(templates), -1).mean(dim=1)  # (C, D)
    return F.normalize(feats, dim=-1)


def alignment_scores(image_features: torch.Tensor, text_embeddings: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Softmax over classes of ``logit_scale.exp() * cos(image, text)`` (paper §3.1, method.md §2).

    Used for both the global view (global alignment) and every snippet (local alignment).

    Args:
        image_features: [M, D] image embeddings (normalised here; any scale accepted).
        text_embeddings: T, [C, D], rows unit-norm.
        logit_scale: scalar tensor holding the LOG of the temperature scale, as stored in CLIP checkpoints
            (≈ ln 100 = 4.605). It is exponentiated here; passing the scale itself is a bug.

    Returns:
        [M, C] float32 probabilities in [0, 1]; each row sums to 1.
    """
    img = F.normalize(image_features.float(), dim=-1)  # (M, D)
    logits = logit_scale.float().exp() * img @ text_embeddings.float().T  # (M, C)
    return logits.softmax(dim=-1)


def snippet_boxes(width: int, height: int, k: int) -> list[tuple[int, int, int, int]]:
    """The K×K non-overlapping grid of snippets (paper §3.1, method.md §3).

    Edges sit at ``floor(i * size / k)``, so the boxes tile the image exactly for any size: every pixel belongs to
    exactly one snippet, and snippet sides differ by at most one pixel.

    Args:
        width: image width in pixels.
        height: image height in pixels.
        k: grid side K (S = K² snippets).

    Returns:
        S boxes ``(left, upper, right, lower)`` in PIL crop convention (right/lower exclusive), row-major.

    Raises:
        ValueError: ``k < 1`` or the image is smaller than K pixels on a side (a snippet would be empty).
    """
    if k < 1:
        raise ValueError(f"grid size k must be >= 1, got {k}")
    if width < k or height < k:
        raise ValueError(f"image of {width}x{height} pixels is too small for a {k}x{k} snippet grid")
    xs = [i * width // k for i in range(k + 1)]
    ys = [i * height // k for i in range(k + 1)]
    return [(xs[c], ys[r], xs[c + 1], ys[r + 1]) for r in range(k) for c in range(k)]
