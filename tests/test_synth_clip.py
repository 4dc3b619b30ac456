"""The bundled small CLIP: config registration, committed weights, and the model card's zero-shot accuracy."""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
from safetensors import safe_open

from cdul_ray.models import BUNDLED_WEIGHTS, MODELS_DIR, register_model_configs
from cdul_ray.synthetic import world
from cdul_ray.synthetic.train_clip import MODEL_CARD_FILE, read_model_card_summary
from cdul_ray.synthetic.zero_shot import zero_shot_eval

MODEL = "cdul-synth-rn"
WEIGHTS = BUNDLED_WEIGHTS[(MODEL, "synth")]


@pytest.fixture(scope="module")
def card() -> dict:
    return read_model_card_summary(MODELS_DIR / MODEL_CARD_FILE)


@pytest.fixture(scope="module")
def loaded():
    torch.set_num_threads(2)
    register_model_configs()
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL, pretrained=str(WEIGHTS))
    return model, preprocess, open_clip.get_tokenizer(MODEL)


def test_config_registered_idempotently():
    register_model_configs()
    register_model_configs()
    assert open_clip.list_models().count(MODEL) == 1
    cfg = open_clip.get_model_config(MODEL)
    assert isinstance(cfg["vision_cfg"]["layers"], list)  # ModifiedResNet image tower
    assert cfg["text_cfg"]["vocab_size"] == 49408 and cfg["text_cfg"]["context_length"] <= 77


def test_weights_file_is_small_fp16_and_matches_config():
    assert WEIGHTS.is_file(), f"committed weights missing: {WEIGHTS}"
    assert WEIGHTS.stat().st_size < 50 * 2**20
    register_model_configs()
    fresh = open_clip.create_model(MODEL)
    expected = fresh.state_dict()
    with safe_open(str(WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
        assert keys == set(expected)
        for k in keys:
            t = f.get_tensor(k)
            assert t.shape == expected[k].shape, k
            if expected[k].is_floating_point():
                assert t.dtype == torch.float16, k


def test_loaded_weights_are_the_card_s(loaded, card):
    model, _, _ = loaded
    assert all(torch.isfinite(p).all() for p in model.parameters())
    scale = float(model.logit_scale.exp())
    assert math.isfinite(scale)
    assert abs(scale - card["final_logit_scale"]) < 0.1  # fp16 rounding only
    assert sum(p.numel() for p in model.parameters()) == card["parameters"]


def test_zero_shot_accuracy_reproduces_model_card(loaded, card):
    model, preprocess, tokenizer = loaded
    assert card["zero_shot_eval_seed"] != card["train_config"]["seed"]  # held out
    result = zero_shot_eval(model, preprocess, tokenizer, n=card["zero_shot_eval_n"], seed=card["zero_shot_eval_seed"])
    assert result.n == card["zero_shot_eval_n"] >= 10 * len(world.CLASS_NAMES)
    assert result.accuracy >= card["zero_shot_accuracy"] - 0.02
    assert result.confusion.sum() == result.n
    # Issue 3 targets >= 95 % zero-shot; the committed weights do not reach it yet (see MODEL_CARD.md). This test pins
    # what the card claims; it is far above chance (1/12), so a broken loader or preprocess still fails it.
    assert result.accuracy >= 2.5 / len(world.CLASS_NAMES)


def test_zero_shot_accuracy_on_another_held_out_seed(loaded, card):
    """Not only the card's seed: a seed never used anywhere before gives the same level."""
    model, preprocess, tokenizer = loaded
    acc = zero_shot_eval(model, preprocess, tokenizer, n=600, seed=card["zero_shot_eval_seed"] + 7777).accuracy
    assert acc >= card["zero_shot_accuracy"] - 0.04
