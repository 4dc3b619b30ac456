"""`use_gpu=auto` and the actor pool bounds from the GPUs a cluster has now and can add (cdul_ray.resources)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cdul_ray.config import ConfigError
from cdul_ray.resources import NO_CONFIG, GpuCapacity, capacity_from_cluster_config, cluster_config_from_file, \
    fit_cpu_pool, gpu_capacity, plan_actor_pool, plan_train_workers

REPO = Path(__file__).resolve().parents[1]
BOOT = "~/ray_bootstrap_config.yaml"


def _capacity(tmp_path, config: dict, now: int = 0) -> GpuCapacity:
    path = tmp_path / "ray_bootstrap_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return capacity_from_cluster_config(cluster_config_from_file(str(path)), now, BOOT)


def _config(max_workers: int, **types) -> dict:
    return {"max_workers": max_workers, "head_node_type": "head", "provider": {"type": "aws"},
            "available_node_types": {"head": {"resources": {"CPU": 8, "GPU": 0}, "node_config": {}}, **types}}


def test_cluster_yaml_can_grow_to_8_gpus_from_none():
    cap = capacity_from_cluster_config(cluster_config_from_file(str(REPO / "cluster.yaml")), 0, BOOT)
    assert cap == GpuCapacity(now=0, max=8, source=BOOT, gpu_node_types=("worker.gpu",))
    assert cap.addable == 8


def test_readme_shows_the_decision_on_cluster_yaml():
    cap = capacity_from_cluster_config(cluster_config_from_file(str(REPO / "cluster.yaml")), 0, BOOT)
    plan = plan_actor_pool("auto", 1, None, cap)
    assert (plan.use_gpu, plan.min_actors, plan.max_actors) == (True, 1, 8)
    assert f"INFO cdul_ray.pipeline: {plan.reason}\n" in (REPO / "README.md").read_text()


def test_global_max_workers_caps_gpus_and_per_type_max_defaults_to_it(tmp_path):
    # 1-GPU type without max_workers (-> global 3), 4-GPU type max 8: sum 3*1 + 8*4 = 35, capped at 3 nodes * 4 GPUs
    cap = _capacity(tmp_path, _config(3, g1={"resources": {"CPU": 8, "GPU": 1}, "node_config": {}},
                                      g4={"resources": {"CPU": 32, "GPU": 4}, "node_config": {}, "max_workers": 8}))
    assert (cap.max, cap.gpu_node_types) == (12, ("g1", "g4"))
    cap = _capacity(tmp_path, _config(10, g1={"resources": {"CPU": 8, "GPU": 1}, "node_config": {}, "max_workers": 2},
                                      g4={"resources": {"CPU": 32, "GPU": 4}, "node_config": {}, "max_workers": 1}))
    assert cap.max == 6  # 2*1 + 1*4, under the cap of 10 * 4


def test_head_gpus_and_present_gpus_count(tmp_path):
    config = _config(2, g1={"resources": {"CPU": 8, "GPU": 1}, "node_config": {}, "max_workers": 2})
    config["available_node_types"]["head"]["resources"]["GPU"] = 1
    cap = _capacity(tmp_path, config, now=1)
    assert (cap.now, cap.max, cap.addable) == (1, 3, 2)
    # nodes started outside the config: the maximum is never below what is there
    assert _capacity(tmp_path, config, now=5).max == 5


def test_a_type_with_max_workers_0_adds_nothing(tmp_path):
    cap = _capacity(tmp_path, _config(4, g1={"resources": {"CPU": 8, "GPU": 1}, "node_config": {}, "max_workers": 0}))
    assert (cap.max, cap.addable, cap.gpu_node_types) == (0, 0, ())


def test_not_an_autoscaler_config_is_refused(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("just: text\n")
    with pytest.raises(ValueError, match="not a cluster launcher config"):
        cluster_config_from_file(str(path))


def test_unbounded_node_group_from_the_gcs_config():
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add(name="gpu-group", max_count=-1)
    group.resources["GPU"] = 1
    cap = capacity_from_cluster_config(config, 0, "cluster config (GCS)")
    assert (cap.max, cap.addable, cap.gpu_node_types) == (None, None, ("gpu-group",))
    plan = plan_actor_pool("auto", 1, None, cap)
    assert (plan.use_gpu, plan.max_actors) == (True, None)
    assert "no upper bound addable by the autoscaler" in plan.reason and "pool 1..unbounded" in plan.reason


@pytest.mark.parametrize(
    "use_gpu, now, max_, min_actors, max_actors, expected",
    [
        ("auto", 0, 2, 1, None, (True, 1, 2)),  # cluster.yaml at submit time: GPUs addable only
        ("auto", 2, 2, 1, None, (True, 1, 2)),  # GPU nodes already up
        ("auto", 1, 8, 1, None, (True, 1, 8)),  # one up, seven more addable
        ("auto", 0, 0, 1, None, (False, 1, 1)),  # a CPU-only config
        ("auto", 0, 2, 3, None, (True, 3, 3)),  # the maximum is never below min_actors
        ("auto", 0, 8, 1, 3, (True, 1, 3)),  # --max-actors wins
        ("false", 0, 8, 1, None, (False, 1, 1)),  # --use-gpu false: CPU actors, one by default
        ("false", 0, 8, 1, 4, (False, 1, 4)),
        ("true", 0, 2, 1, None, (True, 1, 2)),
    ],
)
def test_plan(use_gpu, now, max_, min_actors, max_actors, expected):
    cap = GpuCapacity(now=now, max=max_, source=BOOT, gpu_node_types=("worker.gpu",) if max_ else ())
    plan = plan_actor_pool(use_gpu, min_actors, max_actors, cap)
    assert (plan.use_gpu, plan.min_actors, plan.max_actors) == expected
    assert plan.reason.startswith(f"use_gpu={use_gpu}: {now} GPUs now, ")
    assert not plan.warn


def test_reason_says_what_and_why():
    plan = plan_actor_pool("auto", 1, None, GpuCapacity(now=0, max=2, source=BOOT, gpu_node_types=("worker.gpu",)))
    assert plan.reason == ("use_gpu=auto: 0 GPUs now, up to 2 addable by the autoscaler (node type worker.gpu, from "
                           "~/ray_bootstrap_config.yaml) -> GPU actors (1 GPU each), pool 1..2; the actors wait for "
                           "the autoscaler to start GPU nodes")
    plan = plan_actor_pool("auto", 1, None, GpuCapacity(now=0, max=0, source=NO_CONFIG))
    assert plan.reason == "use_gpu=auto: 0 GPUs now, no autoscaler config found -> CPU actors, pool 1..1"


def test_use_gpu_true_without_any_gpu_fails_fast_when_the_config_is_known():
    with pytest.raises(ConfigError, match="use_gpu") as err:
        plan_actor_pool("true", 1, None, GpuCapacity(now=0, max=0, source=BOOT))
    assert err.value.field == "use_gpu" and BOOT in str(err.value)
    # no config known (a manually started cluster): GPU nodes may still join, so only a warning
    plan = plan_actor_pool("true", 1, None, GpuCapacity(now=0, max=0, source=NO_CONFIG))
    assert plan.use_gpu and plan.warn and plan.max_actors == 1


def test_cpu_actors_leave_room_for_the_decode_tasks():
    # 2 CPUs: one 1-CPU actor leaves 1 CPU for 0.5-CPU decode tasks; two would leave none (the job would hang)
    assert fit_cpu_pool(1, 1, 1.0, 2) == 1
    assert fit_cpu_pool(1, 2, 1.0, 2) == 1
    assert fit_cpu_pool(1, None, 1.0, 2) == 1
    assert fit_cpu_pool(2, 3, 1.0, 4) == 3  # 3 CPUs of actors + 0.5 for decoding fit in 4
    assert fit_cpu_pool(2, 2, 0.5, 2) == 2  # 0.5-CPU actors leave 0.25-CPU decode tasks room
    with pytest.raises(ConfigError, match="use at most 1") as err:
        fit_cpu_pool(2, 2, 1.0, 2)
    assert err.value.field == "min_actors"


def test_training_workers_take_gpus_the_autoscaler_can_add():
    cluster_yaml = GpuCapacity(now=0, max=8, source=BOOT, gpu_node_types=("worker.gpu",))
    gpu, reason = plan_train_workers("auto", 4, cluster_yaml)
    assert gpu and reason == ("use_gpu=auto: 0 GPUs now, up to 8 addable by the autoscaler (node type worker.gpu, "
                              "from ~/ray_bootstrap_config.yaml) -> 4 training worker(s), 1 GPU each; they start "
                              "once GPU nodes join")
    assert plan_train_workers("auto", 1, GpuCapacity(now=0, max=0, source=NO_CONFIG)) == (
        False, "use_gpu=auto: 0 GPUs now, no autoscaler config found -> 1 training worker(s) on CPUs")
    assert plan_train_workers("auto", 2, GpuCapacity(now=2, max=2, source=NO_CONFIG))[0]  # a fixed GPU machine
    assert not plan_train_workers("false", 2, cluster_yaml)[0]
    # more GPU workers than the cluster can ever have: the worker group would wait forever
    with pytest.raises(ConfigError, match="use --workers 8") as err:
        plan_train_workers("auto", 9, cluster_yaml)
    assert err.value.field == "workers"
    with pytest.raises(ConfigError) as err:
        plan_train_workers("true", 1, GpuCapacity(now=0, max=0, source=BOOT))
    assert err.value.field == "use_gpu"


@pytest.mark.slow
def test_gpu_capacity_on_a_local_cluster(ray_cluster, tmp_path):
    # the session cluster has no GPU and reports no cluster config to the GCS
    assert gpu_capacity(str(tmp_path / "absent.yaml")) == GpuCapacity(now=0, max=0, source=NO_CONFIG)
    # a head node of cluster.yaml: the bootstrap config `ray up` leaves there
    cap = gpu_capacity(str(REPO / "cluster.yaml"))
    assert (cap.now, cap.max, cap.gpu_node_types) == (0, 8, ("worker.gpu",))
    # an unreadable config is skipped with a warning, never fatal
    bad = tmp_path / "bad.yaml"
    bad.write_text("available_node_types: [\n")
    assert gpu_capacity(str(bad)).source == NO_CONFIG


@pytest.mark.slow
def test_wait_for_free_cpu_waits_while_actors_hold_every_cpu(ray_cluster):
    """Before a Dataset execution: wait while a previous stage's actors still hold the CPUs, at most the timeout."""
    import time

    from cdul_ray.resources import wait_for_free_cpu

    @ray_cluster.remote(num_cpus=2)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()
    ray_cluster.get(holder.ready.remote())
    start = time.monotonic()
    wait_for_free_cpu(timeout_s=1.0)
    assert 1.0 <= time.monotonic() - start < 5.0  # no CPU free: waited the whole timeout, then went on
    ray_cluster.kill(holder)
    deadline = time.monotonic() + 30
    while not ray_cluster.available_resources().get("CPU") and time.monotonic() < deadline:
        time.sleep(0.1)
    start = time.monotonic()
    wait_for_free_cpu(timeout_s=10.0)
    assert time.monotonic() - start < 1.0  # a CPU is free: no wait
