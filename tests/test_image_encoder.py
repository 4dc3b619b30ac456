"""The CLIP image encoder the labeling actors call: eager, or compiled once for a fixed number of views (--compile)."""

from __future__ import annotations

import logging

import pytest
import torch

from cdul_ray.clip import image_encoder, load_clip, resolve_weights

pytestmark = pytest.mark.slow  # each compile takes 5-15 s on 2 CPUs


@pytest.fixture(scope="module")
def clip_model(tiny_clip):
    spec = resolve_weights(f"local-dir:{tiny_clip}", "none")
    model, _ = load_clip(spec)
    size = spec.preprocess["size"]
    return model, (size, size)


def test_compiled_encoder_pads_partial_batches_and_matches_eager(clip_model):
    model, hw = clip_model
    encode = image_encoder(model, 20, hw, "cpu", autocast=False, compile=True)
    assert encode != model.encode_image  # really compiled (this machine has a C++ compiler)
    torch.manual_seed(0)
    with torch.inference_mode():
        for m in (20, 7, 1):  # the full batch, and partial ones padded to 20 views
            x = torch.randn(m, 3, *hw)
            got, want = encode(x), model.encode_image(x)
            assert got.shape == want.shape == (m, want.shape[1])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        with pytest.raises(ValueError, match="21 views in one call"):
            encode(torch.zeros(21, 3, *hw))


def test_eager_unless_asked(clip_model):
    model, hw = clip_model
    assert image_encoder(model, 20, hw, "cpu", autocast=False, compile=False) == model.encode_image


def test_a_failed_compile_falls_back_to_eager_with_the_reason(clip_model, caplog):
    """A CPU node without a C++ compiler: the run goes on eagerly, and the log says why."""
    import torch._inductor.config as inductor_config

    model, hw = clip_model
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",), "force_disable_caches": True}), \
            caplog.at_level(logging.WARNING, logger="cdul_ray.clip"):
        encode = image_encoder(model, 12, hw, "cpu", autocast=False, compile=True)
    assert encode == model.encode_image
    assert "--compile: compiling the CLIP image tower failed" in caplog.text
    assert "C++ compiler" in caplog.text and "running it eagerly" in caplog.text
