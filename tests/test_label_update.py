"""The gradient-alignment label update (cdul_ray.core.label_update) on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch

from cdul_ray.core.label_update import (
    LABEL_EPS,
    is_update_epoch,
    label_divergence,
    label_gradient,
    label_step,
    predict_proba,
    soft_target_loss,
)

Y = torch.tensor([[0.9, 0.2, 0.5], [0.05, 0.6, 0.3]], dtype=torch.float64)  # (B=2, C=3)
S = torch.tensor([[2.0, -1.0, 0.3], [-3.0, 0.0, 1.5]], dtype=torch.float64)  # logits, (2, 3)


@pytest.mark.parametrize("loss", ["bce", "kl"])
def test_analytic_gradient_equals_autograd(loss):
    y = Y.clone().requires_grad_(True)
    label_divergence(S, y, loss).sum().backward()
    torch.testing.assert_close(label_gradient(S, Y, loss), y.grad, rtol=1e-10, atol=1e-12)


def test_bce_gradient_is_label_logit_minus_classifier_logit():
    expected = torch.log(Y / (1 - Y)) - S
    torch.testing.assert_close(label_gradient(S, Y, "bce"), expected)
    assert label_gradient(S, Y, "bce")[0, 0].item() == pytest.approx(math.log(9) - 2.0)


def test_bce_divergence_differs_from_bce_by_the_label_entropy_only():
    bce = torch.nn.functional.binary_cross_entropy_with_logits(S, Y, reduction="none").sum(1)
    entropy = -(Y * Y.log() + (1 - Y) * (1 - Y).log()).sum(1)
    torch.testing.assert_close(label_divergence(S, Y, "bce"), bce - entropy)


@pytest.mark.parametrize("psi", ["one", "sigmoid_grad"])
def test_bce_step_moves_every_label_toward_the_prediction_without_overshoot(psi):
    p = torch.sigmoid(S)
    new = label_step(Y, S, eta=0.5, loss="bce", psi=psi)
    before, after = (Y - p).abs(), (new - p).abs()
    assert (after < before).all()
    assert (torch.sign(new - Y) == torch.sign(p - Y)).all()  # moved toward sigmoid(logits), never past it


def test_bce_step_with_psi_one_interpolates_logits():
    new = label_step(Y, S, eta=0.25, loss="bce", psi="one")
    z = torch.logit(Y)
    torch.testing.assert_close(torch.logit(new), 0.75 * z + 0.25 * S)
    # η = 1 lands exactly on the classifier's probabilities.
    torch.testing.assert_close(label_step(Y, S, eta=1.0, loss="bce", psi="one"), torch.sigmoid(S))


def test_sigmoid_grad_psi_scales_the_logit_step_by_y_one_minus_y():
    eta = 0.3
    z = torch.logit(Y)
    new = label_step(Y, S, eta=eta, loss="bce", psi="sigmoid_grad")
    torch.testing.assert_close(torch.logit(new), z - eta * Y * (1 - Y) * (z - S))


@pytest.mark.parametrize("loss", ["bce", "kl"])
def test_eta_zero_leaves_labels_unchanged(loss):
    y32 = Y.float()
    assert torch.equal(label_step(y32, S.float(), eta=0.0, loss=loss), y32)


def test_fixed_point_when_the_label_equals_the_prediction():
    p = torch.sigmoid(S)
    torch.testing.assert_close(label_step(p, S, eta=0.7, loss="bce"), p)


@pytest.mark.parametrize("loss", ["bce", "kl"])
@pytest.mark.parametrize("psi", ["one", "sigmoid_grad"])
def test_labels_stay_strictly_inside_zero_one_for_huge_steps(loss, psi):
    y = torch.tensor([[0.0, 1.0, 0.5, 1e-9]], dtype=torch.float32)
    s = torch.tensor([[-50.0, 50.0, 30.0, -40.0]], dtype=torch.float32)
    for eta in (1e3, 1e6):
        new = label_step(y, s, eta=eta, loss=loss, psi=psi)
        assert torch.isfinite(new).all()
        assert (new >= LABEL_EPS).all() and (new <= 1 - LABEL_EPS).all()
        assert (new > 0).all() and (new < 1).all()
        assert new.dtype == torch.float32


def test_kl_small_step_decreases_the_divergence():
    before = label_divergence(S, Y, "kl")
    after = label_divergence(S, label_step(Y, S, eta=0.05, loss="kl"), "kl")
    assert (after < before).all()


def test_kl_gradient_is_zero_when_label_distribution_equals_softmax():
    y = 0.5 * torch.softmax(S, dim=1)  # same distribution, different scale
    torch.testing.assert_close(label_gradient(S, y, "kl"), torch.zeros_like(y), atol=1e-12, rtol=0)


def test_soft_target_losses_match_their_definitions():
    bce = soft_target_loss(S, Y, "bce")
    assert bce.item() == pytest.approx(torch.nn.functional.binary_cross_entropy_with_logits(S, Y).item())
    q = Y / Y.sum(1, keepdim=True)
    kl = (q * (q.log() - torch.log_softmax(S, 1))).sum(1).mean()
    assert soft_target_loss(S, Y, "kl").item() == pytest.approx(kl.item())
    # no gradient flows into the targets
    y = Y.clone().requires_grad_(True)
    soft_target_loss(S.clone().requires_grad_(True), y, "bce").backward()
    assert y.grad is None


def test_predict_proba():
    torch.testing.assert_close(predict_proba(S, "bce"), torch.sigmoid(S))
    torch.testing.assert_close(predict_proba(S, "kl").sum(1), torch.ones(2, dtype=torch.float64))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="loss"):
        label_step(Y, S, 0.1, loss="mse")
    with pytest.raises(ValueError, match="psi"):
        label_step(Y, S, 0.1, psi="two")
    with pytest.raises(ValueError, match="eta"):
        label_step(Y, S, -0.1)
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        label_step(Y, S[:, :2], 0.1)


def test_update_schedule():
    # warm-up 2, every 3: epochs 3, 6, 9 update
    assert [e for e in range(1, 11) if is_update_epoch(e, True, 2, 3)] == [3, 6, 9]
    assert [e for e in range(1, 5) if is_update_epoch(e, True, 0, 1)] == [1, 2, 3, 4]
    assert not any(is_update_epoch(e, False, 0, 1) for e in range(1, 5))
    with pytest.raises(ValueError):
        is_update_epoch(0, True, 0, 1)
