"""The `cdul` command fails fast on bad input (before any cluster work) and reads YAML + flags."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cdul_ray import config as config_mod
from cdul_ray.cli import build_parser
from cdul_ray.config import ConfigError, LabelConfig


def _cdul(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "cdul_ray.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_bad_config_field_fails_before_ray(coco_dataset, tmp_path):
    root, _ = coco_dataset
    proc = _cdul("label", "--dataset", str(root), "--output", str(tmp_path / "o"), "--aggregator", "median")
    assert proc.returncode == 2
    assert "`aggregator`" in proc.stderr and "median" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert not (tmp_path / "o").exists()


def test_missing_weights_name_the_model_and_what_was_tried(coco_dataset, tmp_path):
    root, _ = coco_dataset
    proc = _cdul("label", "--dataset", str(root), "--split", "train", "--output", str(tmp_path / "o"),
                 "--model", "RN50", "--pretrained", str(tmp_path / "nope.safetensors"))
    assert proc.returncode == 2
    assert "'RN50'" in proc.stderr and "nope.safetensors" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


def test_hub_tag_offline_fails_fast(coco_dataset, tmp_path):
    root, _ = coco_dataset
    proc = _cdul("label", "--dataset", str(root), "--split", "train", "--output", str(tmp_path / "o"),
                 "--model", "RN50", "--pretrained", "openai", env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert "'RN50'" in proc.stderr and "'openai'" in proc.stderr and "download failed" in proc.stderr


def test_unknown_model_lists_valid_names(coco_dataset, tmp_path):
    from cdul_ray.clip import UnknownModelError, resolve_weights

    with pytest.raises(UnknownModelError, match="RN50x64.*cdul-synth-rn|cdul-synth-rn.*RN50x64"):
        resolve_weights("RN5O", "openai")


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: /data/coco\noutput: /out\nthreshold: 0.25\ngrid: 4\ntemplates: ['a {}.', 'the {}.']\n")
    args = build_parser().parse_args(["label", "--config", str(path), "--grid", "2", "--overwrite"])
    cfg = config_mod.from_args(LabelConfig, args).validate()
    assert (cfg.dataset, cfg.threshold, cfg.grid, cfg.overwrite) == ("/data/coco", 0.25, 2, True)
    assert cfg.templates == ("a {}.", "the {}.")


def test_yaml_unknown_or_bad_field_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: /d\noutput: /o\nthreshhold: 0.2\n")
    with pytest.raises(ConfigError, match="`threshhold`"):
        config_mod.load_yaml(LabelConfig, str(path))
    path.write_text("dataset: /d\noutput: /o\ngrid: three\n")
    with pytest.raises(ConfigError, match="`grid`"):
        config_mod.load_yaml(LabelConfig, str(path))


@pytest.mark.parametrize(
    "field,value",
    [("threshold", 1.5), ("grid", 0), ("format", "imagenet"), ("templates", ("no slot",)), ("max_actors", 0),
     ("use_gpu", "maybe"), ("lam", -1.0), ("dataset", "")],
)
def test_validate_names_the_field(field, value):
    cfg = LabelConfig(dataset="/d", output="/o")
    with pytest.raises(ConfigError) as err:
        LabelConfig(**{**cfg.to_dict(), field: value}).validate()
    assert err.value.field == field


def test_smoke_test_shrinks_every_job_alike_to_an_offline_model_on_cpu():
    from cdul_ray.clip import resolve_weights
    from cdul_ray.predict import PredictConfig
    from cdul_ray.train import TrainConfig

    label = LabelConfig(dataset="/d", output="/o", smoke_test=True, batch_size=64, use_gpu="true").effective()
    assert resolve_weights(label.model, label.pretrained, download=False).kind == "bundled"  # runs without internet
    assert (label.use_gpu, label.min_actors, label.max_actors) == ("false", 1, 1) and label.batch_size < 64
    train = TrainConfig(labels="/l", dataset="/d", output="/o", smoke_test=True, workers=4, use_gpu="true").effective()
    predict = PredictConfig(checkpoint="/c", dataset="/d", output="/o", smoke_test=True, use_gpu="true").effective()
    assert (train.use_gpu, train.workers, predict.use_gpu, predict.max_actors) == ("false", 1, "false", 1)
    # one image budget: training trains on what a smoke labeling run labeled, prediction predicts as many
    assert label.limit == train.limit == predict.limit == config_mod.SMOKE_IMAGES
    # a smaller limit is kept; the flag only ever shrinks a job
    assert LabelConfig(dataset="/d", output="/o", smoke_test=True, limit=3).effective().limit == 3


def test_use_gpu_is_one_tristate_flag_in_every_job():
    cases = {("--use-gpu",): "true", ("--use-gpu", "auto"): "auto", ("--no-use-gpu",): "false", (): None}
    for command, required in (("label", ["--dataset", "d", "--output", "o"]),
                              ("train", ["--labels", "l", "--dataset", "d", "--output", "o"]),
                              ("predict", ["--checkpoint", "c", "--dataset", "d", "--output", "o"])):
        for flags, expected in cases.items():
            args = build_parser().parse_args([command, *required, *flags])
            assert args.use_gpu == expected, (command, flags)
    path_cfg = config_mod.from_mapping(LabelConfig, {"dataset": "d", "output": "o", "use_gpu": True})
    assert path_cfg.use_gpu == "true"  # a YAML boolean is read as the same tristate


def test_evaluate_without_a_labeling_run_names_the_output_field(tmp_path, capsys):
    from cdul_ray.cli import main

    assert main(["evaluate", "--output", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "config field `output`" in err and "no labeling run at" in err and str(tmp_path / "nope") in err
