"""Global-local aggregators and the initial soft pseudo label (CDUL paper §3.1 Eq. 5-6; method.md §4-§5)."""

from __future__ import annotations

import torch

AGGREGATORS: tuple[str, ...] = ("cdul", "max", "avg")


def snippet_stats(local_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class statistics over snippets, everything the aggregators need.

    Args:
        local_scores: S_local, [N, S, C] snippet probabilities in [0, 1].

    Returns:
        ``(alpha, beta, mean)``, each [N, C]: max, min and mean over the S snippets (paper Eq. 5).
    """
    if local_scores.ndim != 3:
        raise ValueError(f"local_scores must be [N, S, C], got shape {tuple(local_scores.shape)}")
    return local_scores.amax(dim=1), local_scores.amin(dim=1), local_scores.mean(dim=1)


def aggregate(
    alpha: torch.Tensor, beta: torch.Tensor, mean: torch.Tensor, method: str = "cdul", threshold: float = 0.0
) -> torch.Tensor:
    """Aggregate snippet statistics into one local score per class.

    - ``cdul`` (paper Eq. 6): ``S_agg,c = alpha_c if alpha_c >= threshold else beta_c``; threshold ζ = 0 gives ``max``,
      a threshold above every alpha gives the min.
    - ``max``: alpha. ``avg``: the snippet mean (the paper's Table 1 baselines).

    Args:
        alpha: [N, C] max over snippets.
        beta: [N, C] min over snippets.
        mean: [N, C] mean over snippets.
        method: one of ``AGGREGATORS``.
        threshold: ζ in [0, 1], only used by ``cdul``.

    Returns:
        S_agg, [N, C] in [0, 1].

    Raises:
        ValueError: unknown method or threshold outside [0, 1].
    """
    if method == "max":
        return alpha
    if method == "avg":
        return mean
    if method == "cdul":
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold (zeta) must be in [0, 1], got {threshold}")
        return torch.where(alpha >= threshold, alpha, beta)  # gamma_c = 1[alpha_c >= zeta]
    raise ValueError(f"unknown aggregator {method!r}; choose one of {AGGREGATORS}")


def initial_soft_label(global_scores: torch.Tensor, aggregated: torch.Tensor, lam: float = 0.0) -> torch.Tensor:
    """Initial soft pseudo label Y0 = ½(S_global + S_agg) + λ·|S_global − S_agg| (paper §3.1, method.md §5).

    Args:
        global_scores: S_global, [N, C] in [0, 1].
        aggregated: S_agg, [N, C] in [0, 1].
        lam: λ >= 0 (0 by default, the paper's plain average).

    Returns:
        Y0, [N, C], clipped to [0, 1] (only λ > 0 can leave that range).
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    y = 0.5 * (global_scores + aggregated)
    if lam:
        y = y + lam * (global_scores - aggregated).abs()
    return y.clamp(0.0, 1.0)
