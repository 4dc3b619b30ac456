"""`use_gpu=auto` on an autoscaling cluster whose GPU workers start at zero (cluster.yaml's shape), on one machine.

Ray's fake multi-node provider (``provider: fake_multinode``, the provider behind
``ray.cluster_utils.AutoscalingCluster``) launches "nodes" as extra raylets on this machine when the autoscaler asks for
them, with whatever resources their node type declares: GPUs are fake (no CUDA; ClipScorer falls back to the CPU). The
cluster is started like ``AutoscalingCluster.start()`` does, but in this test's own process group, temp dir and ports
(``AutoscalingCluster`` force-stops every Ray process on the machine when it starts and shuts down, and its template
``example.yaml`` is missing from the 2.60 wheel). As on a ``ray up`` head node, the autoscaler config lives in the home
directory as ``ray_bootstrap_config.yaml``, and the job runs as a driver on the head (what ``ray job submit`` does),
submitted with defaults: no ``--use-gpu``, no ``--max-actors``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE as HEAD_TYPE  # the head's tag

from cdul_ray import schema

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
IDLE_TIMEOUT_S = 15  # the autoscaler releases a worker node idle this long (cluster.yaml: 5 minutes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_config(gcs_address: str) -> dict:
    """cluster.yaml's node types with the fake provider: a CPU-only head, GPU workers 0..2 of cluster.yaml's GPU shape.

    CPUs are scaled down to this machine (2 per node) and object stores kept small; GPUs per node are cluster.yaml's.
    The head type keeps the name the fake provider tags the head with (under another name the autoscaler would try
    to launch a second head).
    """
    real = yaml.safe_load((REPO / "cluster.yaml").read_text())
    head = real["available_node_types"][real["head_node_type"]]["resources"]
    (gpu_type, gpu_node), = ((k, v) for k, v in real["available_node_types"].items() if v["resources"].get("GPU"))
    assert head.get("GPU", 0) == 0 and gpu_node["min_workers"] == 0
    return {
        "cluster_name": "cdul-fake",
        "max_workers": 2,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_S / 60,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {
            HEAD_TYPE: {"resources": {"CPU": 2, "GPU": 0}, "node_config": {}, "max_workers": 0},
            gpu_type: {"resources": {"CPU": 2, "GPU": gpu_node["resources"]["GPU"],
                                     "object_store_memory": 150 * 1024**2},
                       "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": HEAD_TYPE,
        "auth": {}, "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [],
        "rsync_filter": [],
    }


def _probe(env: dict, code: str, timeout: float = 120) -> dict:
    """Run ``code`` in a driver connected to the test cluster; it prints one JSON line last."""
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


NODES = """
import json, ray
ray.init(logging_level="ERROR", log_to_driver=False)
print(json.dumps([{"id": n["NodeID"], "gpu": n["Resources"].get("GPU", 0)} for n in ray.nodes() if n["Alive"]]))
"""

ACTORS = """
import json, ray
from ray.util.state import list_actors, list_nodes
ray.init(logging_level="ERROR", log_to_driver=False)
nodes = {n.node_id: n.resources_total.get("GPU", 0) for n in list_nodes(detail=True, limit=1000)}
actors = [a for a in list_actors(detail=True, limit=10000) if "ClipScorer" in a.class_name]
print(json.dumps([{"node_gpus": nodes.get(a.node_id), "required": a.required_resources, "state": a.state,
                   "node": a.node_id} for a in actors]))
"""


@pytest.fixture
def autoscaling_head(tmp_path):
    """A head with the fake-multinode autoscaler, in its own process group; stopped by signalling only that group."""
    home = tmp_path / "home"
    home.mkdir()
    temp_dir = tempfile.mkdtemp(prefix="ras", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    import ray._private.services

    ip = ray._private.services.get_node_ip_address()
    port, dash = _free_port(), _free_port()
    config = home / "ray_bootstrap_config.yaml"  # where `ray up` puts it on the head node
    config.write_text(yaml.safe_dump(_fake_config(f"{ip}:{port}")))
    # token auth as on cluster.yaml's nodes, with this cluster's own token under the private HOME (whatever the
    # session's local cluster set in this process's environment)
    env = dict(os.environ, HOME=str(home), PATH=f"{BIN}:{os.environ['PATH']}", PYTHONPATH=str(REPO),
               RAY_USAGE_STATS_ENABLED="0", RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
               RAY_AUTH_MODE="token")
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True,
                   timeout=120)
    log = open(tmp_path / "head.log", "w")
    # --block keeps `ray start` in the foreground as the leader of every process of this cluster (fake worker nodes
    # are children of its autoscaler), so one killpg stops exactly them.
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--node-ip-address={ip}", "--num-cpus=2",
         "--num-gpus=0", f"--object-store-memory={200 * 1024**2}", f"--autoscaling-config={config}",
         "--include-dashboard=true", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
    driver_env = dict(env, RAY_ADDRESS=f"{ip}:{port}")
    del driver_env["RAY_FAKE_CLUSTER"]
    try:
        deadline = time.time() + 120
        while True:
            try:
                if len(_probe(driver_env, NODES, timeout=60)) == 1:
                    break
            except (AssertionError, subprocess.TimeoutExpired, json.JSONDecodeError, IndexError):
                pass
            assert head.poll() is None and time.time() < deadline, (tmp_path / "head.log").read_text()[-4000:]
            time.sleep(2)
        yield driver_env, tmp_path
    finally:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            try:
                head.wait(wait)
            except subprocess.TimeoutExpired:
                pass
        log.close()
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)


def test_default_job_scales_gpu_workers_up_and_back_down(autoscaling_head, coco_dataset, tiny_clip):
    env, tmp_path = autoscaling_head
    root, info = coco_dataset
    out = tmp_path / "labels"
    job = [sys.executable, "jobs/label_coco.py", "--dataset", str(root), "--split", "train", "--output", str(out),
           "--model", f"local-dir:{tiny_clip}", "--pretrained", "none", "--batch-size", "2",
           "--decode-batch-size", "2"]
    proc = subprocess.run(job, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    logs = proc.stdout + proc.stderr
    (tmp_path / "job.log").write_text(logs)
    decided = [line for line in logs.splitlines() if "use_gpu=" in line]
    assert proc.returncode == 0, logs[-6000:]

    # the decision and its reason: no GPU at submit time, 2 addable by the autoscaler
    assert len(decided) == 1, decided
    assert ("use_gpu=auto: 0 GPUs now, up to 2 addable by the autoscaler (node type worker.gpu, from "
            "~/ray_bootstrap_config.yaml) -> GPU actors (1 GPU each), pool 1..2") in decided[0], decided

    # the CLIP actors asked for one GPU each and ran on GPU worker nodes the autoscaler added (the head has none)
    # (an actor the pool added last may still wait for its GPU node when the job ends: it is killed unplaced, DEAD
    # with no node, and never ran anywhere)
    actors = _probe(env, ACTORS)
    placed = [a for a in actors if a["node"] is not None]
    assert placed, f"no ClipScorer actor was placed: {actors}"
    for a in actors:
        assert a["required"].get("GPU") == 1, actors
    for a in placed:
        assert a["node_gpus"] == 1, actors
    assert all(a["state"] == "DEAD" for a in actors if a["node"] is None), actors

    # the right rows: every readable image labeled once, the corrupt and missing ones as error rows
    labels = pq.read_table(out / schema.LABELS_DIR)
    assert sorted(labels["image_id"].to_pylist(), key=int) == info["ok"]
    errors = pq.read_table(out / schema.ERRORS_DIR)
    assert sorted(errors["image_id"].to_pylist()) == sorted([info["corrupt"], info["missing"]])

    # idle GPU workers go back: head only again within the idle timeout plus slack
    deadline = time.time() + IDLE_TIMEOUT_S + 90
    while (nodes := _probe(env, NODES)) and len(nodes) > 1:
        assert time.time() < deadline, f"GPU workers not released: {nodes}"
        time.sleep(3)
    assert [n["gpu"] for n in nodes] == [0]
