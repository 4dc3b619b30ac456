"""The CDUL math pinned on hand-made tensors (method.md §1-§5, §7)."""

import math

import numpy as np
import pytest
import torch

from cdul_ray.core import (
    aggregate,
    alignment_scores,
    class_text_embeddings,
    initial_soft_label,
    mean_average_precision,
    multi_hot,
    snippet_boxes,
    snippet_stats,
)


def test_alignment_uses_exp_of_logit_scale():
    img = torch.tensor([[1.0, 0.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # cos = 1 and 0
    log_scale = torch.tensor(math.log(100.0))
    p = alignment_scores(img, text, log_scale)
    # softmax([100, 0]) with the exp; softmax([4.6, 0]) = [0.990, 0.010] without it
    expected = torch.softmax(torch.tensor([100.0, 0.0]), dim=0)
    torch.testing.assert_close(p[0], expected)
    assert p[0, 1] < 1e-40
    wrong = torch.softmax(log_scale * torch.tensor([1.0, 0.0]), dim=0)
    assert not torch.allclose(p[0], wrong)


def test_alignment_normalises_images_and_rows_sum_to_one():
    torch.manual_seed(0)
    img = torch.randn(5, 8) * 7
    text = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    p = alignment_scores(img, text, torch.tensor(math.log(10.0)))
    torch.testing.assert_close(p, alignment_scores(img / 7, text, torch.tensor(math.log(10.0))))
    torch.testing.assert_close(p.sum(-1), torch.ones(5))
    cos = torch.nn.functional.normalize(img, dim=-1) @ text.T
    torch.testing.assert_close(p, torch.softmax(10.0 * cos, dim=-1))


def test_class_text_embeddings_average_templates_then_normalise():
    # encode_text: token id -> fixed vector, so the expected average is known by hand
    table = {0: [1.0, 0.0], 1: [0.0, 2.0], 2: [3.0, 0.0], 3: [0.0, 0.5]}

    def tokenizer(texts):
        return torch.tensor([[["a cat", "the cat", "a dog", "the dog"].index(t)] for t in texts])

    def encode_text(tokens):
        return torch.tensor([table[int(t)] for t in tokens[:, 0]])

    t = class_text_embeddings(encode_text, tokenizer, ["cat", "dog"], ["a {}", "the {}"])
    # cat: mean([1,0],[0,1]) -> normalised [0.707, 0.707]; dog: mean([1,0],[0,1]) too
    torch.testing.assert_close(t, torch.full((2, 2), 1 / math.sqrt(2)))
    with pytest.raises(ValueError, match="placeholder"):
        class_text_embeddings(encode_text, tokenizer, ["cat"], ["no slot"])


@pytest.mark.parametrize("w,h,k", [(224, 224, 3), (100, 101, 3), (7, 5, 2), (640, 427, 4), (10, 10, 1), (5, 5, 5)])
def test_snippets_tile_the_image_exactly(w, h, k):
    boxes = snippet_boxes(w, h, k)
    assert len(boxes) == k * k
    cover = np.zeros((h, w), dtype=np.int32)
    for left, top, right, bottom in boxes:
        assert right > left and bottom > top
        cover[top:bottom, left:right] += 1
    assert (cover == 1).all()  # no pixel lost, none counted twice
    widths = {r - l for l, _, r, _ in boxes}
    assert max(widths) - min(widths) <= 1


def test_snippet_grid_rejects_bad_sizes():
    with pytest.raises(ValueError, match="too small"):
        snippet_boxes(2, 10, 3)
    with pytest.raises(ValueError, match="k must be"):
        snippet_boxes(10, 10, 0)


@pytest.fixture
def local():
    # N=2 images, S=3 snippets, C=2 classes
    return torch.tensor(
        [
            [[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]],
            [[0.05, 0.95], [0.1, 0.9], [0.15, 0.85]],
        ]
    )


def test_snippet_stats(local):
    alpha, beta, mean = snippet_stats(local)
    torch.testing.assert_close(alpha, torch.tensor([[0.9, 0.8], [0.15, 0.95]]))
    torch.testing.assert_close(beta, torch.tensor([[0.2, 0.1], [0.05, 0.85]]))
    torch.testing.assert_close(mean, torch.tensor([[1.4 / 3, 1.6 / 3], [0.1, 0.9]]))


def test_cdul_threshold_zero_equals_max_and_high_threshold_equals_min(local):
    alpha, beta, mean = snippet_stats(local)
    torch.testing.assert_close(aggregate(alpha, beta, mean, "cdul", 0.0), aggregate(alpha, beta, mean, "max"))
    above_every_alpha = float(alpha.max()) + 0.01
    torch.testing.assert_close(aggregate(alpha, beta, mean, "cdul", above_every_alpha), beta)
    torch.testing.assert_close(aggregate(alpha, beta, mean, "avg"), mean)


def test_cdul_threshold_between(local):
    alpha, beta, mean = snippet_stats(local)
    out = aggregate(alpha, beta, mean, "cdul", 0.5)
    # alpha >= 0.5 keeps alpha, else beta: [[0.9, 0.8], [0.05 (beta), 0.95]]
    torch.testing.assert_close(out, torch.tensor([[0.9, 0.8], [0.05, 0.95]]))
    with pytest.raises(ValueError, match="unknown aggregator"):
        aggregate(alpha, beta, mean, "median")
    with pytest.raises(ValueError, match="threshold"):
        aggregate(alpha, beta, mean, "cdul", 1.5)


def test_initial_soft_label():
    g = torch.tensor([[0.2, 0.6]])
    a = torch.tensor([[0.8, 0.4]])
    torch.testing.assert_close(initial_soft_label(g, a), torch.tensor([[0.5, 0.5]]))
    torch.testing.assert_close(initial_soft_label(g, a, lam=0.5), torch.tensor([[0.8, 0.6]]))
    assert float(initial_soft_label(torch.ones(1, 1), torch.zeros(1, 1), lam=2.0)) == 1.0


def test_map_matches_hand_computation_and_skips_empty_classes():
    scores = np.array([[0.9, 0.1, 0.3], [0.8, 0.7, 0.2], [0.1, 0.6, 0.1], [0.4, 0.2, 0.9]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    res = mean_average_precision(scores, targets)
    # class 0: ranking 0.9(+) 0.8(-) 0.4(-) 0.1(+) -> AP = (1/1 + 2/4) / 2 = 0.75
    # class 1: ranking 0.7(+) 0.6(+) 0.2 0.1 -> AP = 1
    assert res.ap[0] == pytest.approx(75.0)
    assert res.ap[1] == pytest.approx(100.0)
    assert math.isnan(res.ap[2]) and res.skipped == (2,)
    assert res.map == pytest.approx(87.5)


def test_multi_hot():
    y = multi_hot([[0, 2], [], [1]], 3)
    np.testing.assert_array_equal(y, [[1, 0, 1], [0, 0, 0], [0, 1, 0]])
    with pytest.raises(ValueError, match="outside"):
        multi_hot([[3]], 3)
