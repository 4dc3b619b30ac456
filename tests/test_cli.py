"""The `cdul` command fails fast on bad input (before any cluster work) and reads YAML + flags."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
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
    assert not (tmp_path / "o").exists()  # the failed check left no empty output directory behind


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


# --------------------------------------------------------------------------------------------------------------------
# What a new user types and reads (issue 12): flags in errors, "did you mean", --help, job submission.


def test_config_error_names_the_flag_and_the_field():
    err = ConfigError("classes_file", "file not found: /x/y.txt")
    assert str(err) == "--classes-file (config field `classes_file`): file not found: /x/y.txt"
    assert err.field == "classes_file" and err.flag == "--classes-file"


def test_missing_classes_file_names_the_flag_and_the_path(tmp_path, capsys):
    from cdul_ray.cli import main

    missing = tmp_path / "nope" / "classes.txt"
    assert main(["label", "--format", "folder", "--dataset", str(tmp_path), "--classes-file", str(missing),
                 "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"--classes-file (config field `classes_file`): file not found: {missing}" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("field,value,suggestion", [("format", "foldr", "'folder'"), ("aggregator", "cdl", "'cdul'"),
                                                    ("use_gpu", "ture", "'true'")])
def test_choices_suggest_the_close_value(field, value, suggestion):
    cfg = LabelConfig(dataset="/d", output="/o")
    with pytest.raises(ConfigError) as err:
        LabelConfig(**{**cfg.to_dict(), field: value}).validate()
    assert str(err.value).startswith(f"--{field.replace('_', '-')} (config field `{field}`): {value!r} is not one of")
    assert f"did you mean {suggestion}?" in str(err.value)


def test_unknown_yaml_key_suggests_the_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: /d\noutput: /o\nthreshhold: 0.2\n")
    with pytest.raises(ConfigError, match="did you mean `threshold`"):
        config_mod.load_yaml(LabelConfig, str(path))


def test_unknown_model_says_did_you_mean_with_a_short_list():
    from cdul_ray.clip import UnknownModelError, resolve_weights

    with pytest.raises(UnknownModelError) as err:
        resolve_weights("RN50x46", "openai")
    msg = str(err.value)
    assert msg.startswith("--model (config field `model`): unknown CLIP model 'RN50x46'; did you mean RN50x4")
    suggested = msg.split("did you mean ")[1].split("?")[0].split(", ")
    assert 1 <= len(suggested) <= 5 and "RN50x64" in suggested and "RN50x16" in suggested
    assert "cdul-synth-rn" in msg and len(msg) < 400  # not the 2.8 KB list of every open_clip name


def test_unknown_pretrained_tag_says_did_you_mean():
    from cdul_ray.clip import WeightsNotFoundError, resolve_weights

    with pytest.raises(WeightsNotFoundError, match=r"^--pretrained .*'opnai' is not a known tag .*Did you mean openai"):
        resolve_weights("RN50", "opnai")


def test_unreachable_hub_fails_in_seconds_and_suggests_offline_options(coco_dataset, tmp_path):
    import time

    root, _ = coco_dataset
    start = time.time()
    # no HF_HUB_OFFLINE: the hub is unreachable from the test machines (no internet but PyPI)
    proc = _cdul("label", "--dataset", str(root), "--split", "train", "--output", str(tmp_path / "o"),
                 "--model", "RN50", "--pretrained", "openai", env={"HF_HUB_OFFLINE": ""})
    seconds = time.time() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--pretrained (config field `pretrained`): model 'RN50', pretrained tag 'openai'" in proc.stderr
    assert "--model cdul-synth-rn --pretrained synth" in proc.stderr and "local-dir:" in proc.stderr
    assert "Retrying in" not in proc.stderr
    assert seconds < 45, seconds  # was 54 s of hub retries plus start-up; the probe gives up after 3 s


def test_help_lists_required_flags_and_examples():
    for command, required in (("label", ("--dataset", "--output")), ("train", ("--labels", "--dataset", "--output")),
                              ("predict", ("--checkpoint", "--dataset", "--output")), ("evaluate", ("--output",))):
        proc = _cdul(command, "--help")
        assert proc.returncode == 0, proc.stderr
        text = proc.stdout
        group = text.split("\nrequired", 1)[1].split("\n\n", 1)[0]
        for flag in required:
            assert f"  {flag} " in group, (command, flag, group)
        assert "default: ''" not in text and "default: None" not in text
        assert "``" not in text
        examples = text.split("\nexamples:\n", 1)[1]
        assert f"\n  cdul {command} --" in "\n" + examples
        for line in text.splitlines():  # no default printed twice
            assert line.count("default") <= 1, line
    label = _cdul("label", "--help").stdout
    assert "cdul label --format folder --dataset ./my_images --classes-file ./classes.txt" in label
    assert "--model cdul-synth-rn --pretrained synth" in label


def test_relative_output_is_refused_under_ray_job_submit(tmp_path):
    import json

    job_env = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {}, "metadata": {
        "job_submission_id": "raysubmit_test123", "job_name": "raysubmit_test123"}})}
    proc = _cdul("label", "--smoke-test", "--output", "out/rel", env=job_env)
    assert proc.returncode == 2
    assert "--output (config field `output`): 'out/rel' is a relative path" in proc.stderr
    assert "`ray job submit` job (raysubmit_test123)" in proc.stderr and "s3:// URI" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    # --smoke-test's default output (out/smoke) is relative too
    proc = _cdul("label", "--smoke-test", env=job_env)
    assert proc.returncode == 2 and "'out/smoke' is a relative path" in proc.stderr


def test_output_location_check(monkeypatch, tmp_path):
    assert config_mod.submitted_job_id() is None
    config_mod.check_output_location("output", "out/rel")  # outside a submitted job: fine
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"metadata": {"job_submission_id": "raysubmit_x"}}')
    assert config_mod.submitted_job_id() == "raysubmit_x"
    config_mod.check_output_location("output", str(tmp_path / "o"))
    config_mod.check_output_location("output", "s3://bucket/runs/a")
    with pytest.raises(ConfigError) as err:
        config_mod.check_output_location("output", "out/rel")
    assert err.value.field == "output" and "(raysubmit_x)" in str(err.value)


def test_evaluate_on_a_run_that_did_not_finish_says_what_to_do(tmp_path, capsys):
    from cdul_ray.cli import main

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run_config.json").write_text("{}")
    assert main(["evaluate", "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"no label files in {tmp_path / 'run' / 'labels'}" in err
    assert "Rerun its `cdul label` command" in err and "the same --output resumes it" in err


@pytest.mark.slow
def test_label_your_own_folder_offline(ray_cluster, coco_dataset, tmp_path, capsys):
    """The README's "Label your own images", step 1: a folder without annotations, a classes file, the bundled CLIP."""
    import json
    import shutil

    import pyarrow.parquet as pq

    from cdul_ray.cli import main

    root, info = coco_dataset
    images = tmp_path / "my_images"
    (images / "sub").mkdir(parents=True)
    names = sorted(p.name for p in (root / "train").glob("0*.jpg"))[:5]
    for i, name in enumerate(names):
        shutil.copy(root / "train" / name, images / ("sub" if i == 0 else "") / name)
    (tmp_path / "classes.txt").write_text("dog\ncat\nbicycle\nperson\n")
    out = tmp_path / "out" / "mine"
    assert main(["label", "--format", "folder", "--dataset", str(images), "--classes-file",
                 str(tmp_path / "classes.txt"), "--output", str(out), "--model", "cdul-synth-rn",
                 "--pretrained", "synth"]) == 0
    printed = capsys.readouterr().out
    table = pq.read_table(out / "labels")
    assert table.num_rows == 5 and table["gt_labels"].null_count == 5
    assert json.loads((out / "classes.json").read_text())["classes"] == ["dog", "cat", "bicycle", "person"]
    soft = np.asarray(table["soft_label"].to_pylist())
    assert soft.shape == (5, 4) and ((soft >= 0) & (soft <= 1)).all()
    assert f"report         {out / 'report' / 'report.md'}" in printed
    assert sorted(p.name for p in (out / "report").iterdir()) == ["report.md", "scenes.png", "soft_label_hist.png",
                                                                  "thresholds.json"]


@pytest.mark.parametrize("raised,code,says", [
    (KeyboardInterrupt(), 130, "interrupted: the output files committed so far are kept; run the same command again"),
    (OSError("AWS Error NETWORK_CONNECTION during HeadObject operation: Could not resolve host: bucket.s3"), 1,
     "error: OSError: AWS Error NETWORK_CONNECTION"),
])
def test_interrupt_and_storage_failure_end_in_one_message_not_a_traceback(monkeypatch, capsys, raised, code, says):
    from cdul_ray import cli

    def label(_args):
        raise raised

    monkeypatch.setattr(cli, "_label", label)  # the command itself, not storage: what happens around it is tested
    monkeypatch.delenv("CDUL_TRACEBACK", raising=False)
    assert cli.main(["label", "--dataset", "d", "--output", "o"]) == code
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
