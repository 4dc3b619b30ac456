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
    assert cfg["vision_cfg"]["timm_model_name"] == "test_resnet"  # a convolutional image tower (timm ResNet)
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
    scale = float(model.logit_scale.detach().exp())
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
    assert result.accuracy >= 0.95  # issue 3: the single-object CLIP must be strong; scenes are its weak spot


def test_zero_shot_accuracy_on_another_held_out_seed(loaded, card):
    """Not only the card's seed: a seed never used anywhere before gives the same level."""
    model, preprocess, tokenizer = loaded
    acc = zero_shot_eval(model, preprocess, tokenizer, n=600, seed=card["zero_shot_eval_seed"] + 7777).accuracy
    assert acc >= card["zero_shot_accuracy"] - 0.04


def test_shared_caption_loss_equals_clip_loss_when_captions_differ_and_pools_duplicates():
    from cdul_ray.synthetic.train_clip import clip_loss_shared_captions

    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    distinct = clip_loss_shared_captions(img, txt, torch.arange(6), scale)
    torch.testing.assert_close(distinct, open_clip.ClipLoss()(img, txt, scale))

    # Images 0 and 1 carry the same caption; a perfect model (each image on its caption) reaches the floor
    # (log 2 for that caption's text->image term) and ClipLoss on the duplicated rows stays far above it.
    caps = torch.tensor([0, 0, 1, 2])
    txt3 = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    perfect = txt3[caps]
    loss = clip_loss_shared_captions(perfect, txt3, caps, torch.tensor(100.0))
    floor = math.log(2) / 3 / 2  # one of three captions has two owners; text->image term is half the loss
    assert abs(float(loss) - floor) < 1e-3
    assert float(open_clip.ClipLoss()(perfect, txt3[caps], torch.tensor(100.0))) > 0.3
