"""Gradient-alignment training math (paper §3.2; docs/method.md §6) as pure torch functions, no Ray.

The classifier f is trained on the latent labels Y ∈ (0, 1)^{N×C} as soft targets. In label-update epochs, after the
network step on a batch, the labels of that batch move along the gradient of the loss with respect to Y, in logit
space so that they stay in (0, 1)::

    z = logit(Y);   z ← z − η·ψ(Y)·∂D/∂Y;   Y ← clamp(sigmoid(z), ε, 1 − ε)

Choices of ours where the paper's text is open (each one a config field of ``cdul_ray.train.TrainConfig``):

- ``loss``: ``bce`` (default) trains with binary cross-entropy on sigmoid outputs and soft targets; ``kl`` with the KL
  divergence KL(q ‖ softmax(s)) of the label distribution q = Y / ΣY (the option the unofficial reproduction used).
- The label gradient ∂D/∂Y is taken of the *divergence* D(Y, f) between label and prediction whose gradient with
  respect to the network equals the training loss's. For ``kl`` that is the loss itself. For ``bce`` it is the
  per-element Bernoulli KL(Y ‖ σ(s)) = BCE(s, Y) − H(Y): the target entropy H(Y) does not depend on the network, so
  the network step is plain BCE, but the label gradient becomes ``logit(Y) − s`` (zero when the label agrees with the
  prediction). The literal ∂BCE/∂Y = −s has no fixed point: it pushes every label toward 0 or 1 by the sign of the
  logit forever, however far it already is.
- ``psi``: ``one`` (ψ = 1; with ``bce`` the step is z ← (1 − η)·z + η·s, a moving average of the label logit toward
  the classifier's logit) or ``sigmoid_grad`` (ψ = Y(1 − Y) = dY/dz, which makes the step exact gradient descent on z,
  and slow for labels near 0 or 1).
- The step uses the logits of the batch's forward pass (before the network step), so no second forward pass.
- D is per image (summed over classes), not averaged over the batch, so η does not depend on the batch size.

Shapes: B images in a batch, C classes. Logits s are real; labels Y and probabilities are in (0, 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("bce", "kl")
PSI = ("one", "sigmoid_grad")
# Labels are kept in [LABEL_EPS, 1 - LABEL_EPS] so that logit(Y) stays finite (|z| <= 13.8 in float32).
LABEL_EPS = 1e-6


def _check(loss: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")


def clamp_labels(labels: torch.Tensor, eps: float = LABEL_EPS) -> torch.Tensor:
    """Clamp labels into [eps, 1 − eps] so that their logits are finite.

    Args:
        labels: [B, C] values in [0, 1].
        eps: margin in (0, 0.5).

    Returns:
        [B, C] in [eps, 1 − eps].
    """
    return labels.clamp(eps, 1.0 - eps)


def soft_target_loss(logits: torch.Tensor, targets: torch.Tensor, loss: str = "bce") -> torch.Tensor:
    """The network loss on soft targets (method.md §6).

    Args:
        logits: [B, C] classifier outputs s.
        targets: [B, C] latent labels Y in [0, 1] (no gradient flows into them).
        loss: ``bce``: mean over B·C of BCE-with-logits; ``kl``: KL(q ‖ softmax(s)) with q = Y / ΣY, summed over
            classes and averaged over the batch.

    Returns:
        Scalar loss.

    Raises:
        ValueError: unknown ``loss``.
    """
    _check(loss)
    targets = targets.detach().to(logits.dtype)
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(logits, targets)
    q = _normalise(targets)  # (B, C)
    return F.kl_div(F.log_softmax(logits, dim=1), q, reduction="batchmean")


def predict_proba(logits: torch.Tensor, loss: str = "bce") -> torch.Tensor:
    """Class probabilities of a classifier trained with ``loss``: sigmoid for ``bce``, softmax for ``kl``.

    Args:
        logits: [B, C].

    Returns:
        [B, C] in [0, 1].
    """
    _check(loss)
    return torch.sigmoid(logits) if loss == "bce" else torch.softmax(logits, dim=1)


def _normalise(y: torch.Tensor) -> torch.Tensor:
    return y / y.sum(dim=1, keepdim=True).clamp_min(1e-12)


def label_divergence(logits: torch.Tensor, labels: torch.Tensor, loss: str = "bce") -> torch.Tensor:
    """D(Y, f) per image, the function whose gradient in Y drives the label update.

    ``bce``: Σ_c KL(Bernoulli(Y_c) ‖ Bernoulli(σ(s_c))); ``kl``: KL(q ‖ softmax(s)) with q = Y / ΣY.
    Both are >= 0 and 0 exactly when the label agrees with the prediction (for ``kl``, up to the scale of Y).

    Args:
        logits: [B, C] classifier outputs s.
        labels: [B, C] latent labels in (0, 1) (differentiable: autograd on Y gives ``label_gradient``).

    Returns:
        [B] divergences.
    """
    _check(loss)
    if loss == "bce":
        p = torch.sigmoid(logits)
        kl = labels * (torch.log(labels) - torch.log(p)) + (1 - labels) * (torch.log1p(-labels) - torch.log1p(-p))
        return kl.sum(dim=1)
    q = _normalise(labels)
    return (q * (torch.log(q) - F.log_softmax(logits, dim=1))).sum(dim=1)


def label_gradient(logits: torch.Tensor, labels: torch.Tensor, loss: str = "bce") -> torch.Tensor:
    """∂D/∂Y in closed form (equal to autograd of ``label_divergence``).

    ``bce``: logit(Y) − s. ``kl``: (log q − log p − D) / ΣY with q = Y / ΣY, p = softmax(s).

    Args:
        logits: [B, C] classifier outputs s.
        labels: [B, C] latent labels in (0, 1).

    Returns:
        [B, C] gradient.
    """
    _check(loss)
    if loss == "bce":
        return torch.logit(labels) - logits
    total = labels.sum(dim=1, keepdim=True)  # (B, 1)
    log_ratio = torch.log(labels / total) - F.log_softmax(logits, dim=1)  # (B, C) log q - log p
    kl = (labels / total * log_ratio).sum(dim=1, keepdim=True)  # (B, 1)
    return (log_ratio - kl) / total


def label_step(
    labels: torch.Tensor,
    logits: torch.Tensor,
    eta: float,
    loss: str = "bce",
    psi: str = "one",
    eps: float = LABEL_EPS,
) -> torch.Tensor:
    """One gradient-alignment update of the latent labels of a batch (method.md §6).

    z = logit(Y); z ← z − η·ψ(Y)·∂D/∂Y; Y ← clamp(sigmoid(z), eps, 1 − eps).

    Args:
        labels: [B, C] current latent labels in [0, 1] (clamped to [eps, 1 − eps] first).
        logits: [B, C] classifier outputs for the same images (detached; no gradient flows).
        eta: step size η >= 0; 0 leaves the (clamped) labels unchanged.
        loss: ``bce`` or ``kl`` (see module docstring).
        psi: ``one`` (ψ = 1) or ``sigmoid_grad`` (ψ = Y(1 − Y)).
        eps: clamp margin.

    Returns:
        [B, C] updated labels in [eps, 1 − eps], same dtype as ``labels``.

    Raises:
        ValueError: unknown ``loss`` or ``psi``, negative ``eta``, or shapes that differ.
    """
    _check(loss)
    if psi not in PSI:
        raise ValueError(f"unknown psi {psi!r}; valid: {', '.join(PSI)}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if labels.shape != logits.shape or labels.ndim != 2:
        raise ValueError(f"labels {tuple(labels.shape)} and logits {tuple(logits.shape)} must both be [B, C]")
    y = clamp_labels(labels.detach().double(), eps)  # float64: the step stays exact near 0 and 1
    s = logits.detach().double()
    if eta == 0:
        return y.to(labels.dtype)
    weight = torch.ones_like(y) if psi == "one" else y * (1 - y)  # ψ(Y), (B, C)
    z = torch.logit(y) - eta * weight * label_gradient(s, y, loss)  # (B, C)
    return clamp_labels(torch.sigmoid(z), eps).to(labels.dtype)


def is_update_epoch(epoch: int, enabled: bool, warmup_epochs: int, every: int) -> bool:
    """Whether epoch ``epoch`` (1-based) updates the labels: epochs w+1, w+1+k, w+1+2k, ... when enabled.

    Args:
        epoch: 1-based epoch number.
        enabled: label updates on (off = plain training on fixed pseudo labels, the ablation).
        warmup_epochs: w >= 0 epochs of network-only training first.
        every: k >= 1.

    Raises:
        ValueError: epoch < 1, warmup_epochs < 0 or every < 1.
    """
    if epoch < 1 or warmup_epochs < 0 or every < 1:
        raise ValueError(f"need epoch >= 1, warmup_epochs >= 0, every >= 1; got {epoch}, {warmup_epochs}, {every}")
    return enabled and epoch > warmup_epochs and (epoch - warmup_epochs - 1) % every == 0
