"""Faults during a labeling run (issue 9 item 2): every image ends exactly once in ``labels/`` or ``errors/``.

(a) the CLIP actor's worker process SIGKILLed mid-run; (b) a worker node of a two-node cluster stopped mid-job;
(c) S3 transient outages (retried) and permanent errors (a clear message naming the URI).
"""

from __future__ import annotations

import http.server
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cdul_ray import schema
from cdul_ray.config import ConfigError
from cdul_ray.pipeline import run_labeling
from tests.helpers import CLASSES, committed_count, folder_label_config, output_ids
from tests.s3_fixtures import make_bucket, upload_dir

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _corpus(tmp_path: Path, n: int) -> tuple[Path, Path, list[str]]:
    """``n`` small JPEGs and one empty ``bad.jpg`` in ``tmp_path/photos``; a classes file. Returns the good names."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [f"p{i:03d}.jpg" for i in range(n)]
    for name in names:
        Image.fromarray(rng.integers(0, 255, size=(40, 48, 3), dtype=np.uint8)).save(folder / name, quality=90)
    (folder / "bad.jpg").write_bytes(b"")
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    return folder, classes, names




def _committed(out: Path) -> int:
    folder = out / schema.CHECKPOINT_DIR
    return len([f for f in folder.glob("*.parquet") if ".pending" not in f.name]) if folder.exists() else 0


def _clip_actors() -> dict[str, dict]:
    """This cluster's ClipScorer actors from the GCS actor table (``ray.util.state`` needs a dashboard; the session
    cluster runs without one)."""
    import ray

    return {a["ActorID"]: a for a in ray._private.state.actors().values() if "ClipScorer" in a["Name"] + a["ActorClassName"]}


def _cfg(dataset, output, clip, classes, **kw):
    return folder_label_config(dataset, output, clip, classes, **{"batch_size": 2, "decode_batch_size": 2, **kw})


# ----------------------------------------------------------------------------------------------------------------
# (a) CLIP actor killed


def test_killed_clip_actor_every_image_exactly_once(ray_cluster, tiny_clip, tmp_path):
    """SIGKILL the CLIP actor's worker process once some write tasks committed; the same run finishes."""
    folder, classes, names = _corpus(tmp_path, 60)
    out = tmp_path / "out"
    killed: dict = {}

    def kill_when_mid_run():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            alive = [a for a in _clip_actors().values() if a["State"] == "ALIVE" and a["Pid"]]
            if alive and _committed(out) >= 1:
                killed.update(actor=alive[0]["ActorID"], pid=alive[0]["Pid"], labels=committed_count(out),
                              at=time.time())
                os.kill(alive[0]["Pid"], signal.SIGKILL)
                return
            time.sleep(0.1)

    before = set(_clip_actors())
    killer = threading.Thread(target=kill_when_mid_run, daemon=True)
    killer.start()
    summary = run_labeling(_cfg(folder, out, tiny_clip, classes))
    killer.join(5)

    assert killed and killed["actor"] not in before, "the CLIP actor was not killed during the run"
    assert killed["labels"] < len(names), "killed too late: every label was already on disk"
    actor = _clip_actors()[killed["actor"]]
    # Ray restarted it (Ray Data's max_restarts=-1, max_task_retries=-1), or Ray Data replaced it with a new actor
    assert actor["NumRestarts"] >= 1 or len(set(_clip_actors()) - before) >= 2
    labels, errors = output_ids(out, schema.LABELS_DIR), output_ids(out, schema.ERRORS_DIR)
    assert sorted(labels) == names and errors == ["bad.jpg"]  # every image exactly once
    assert (summary.images, summary.labeled, summary.errors) == (len(names) + 1, len(names), 1)
    print(f"CLIP actor killed with {killed['labels']}/{len(names)} labels on disk; restarts {actor['NumRestarts']}; "
          f"run ended {time.time() - killed['at']:.0f} s later")


# ----------------------------------------------------------------------------------------------------------------
# (c) S3 errors


class FlakyProxy:
    """A TCP proxy on loopback in front of an S3 server whose :meth:`outage` is a transient network failure.

    During an outage every open connection is reset and every new one is accepted and reset at once (what a client
    sees from a load balancer whose backend restarts); afterwards connections pass through again. The server's
    state is untouched (moto's state lives in memory and would be lost by a real restart).
    """

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.up = threading.Event()
        self.up.set()
        self.lock = threading.Lock()
        self.open: set[socket.socket] = set()
        self.refused = 0  # connections reset during outages
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @staticmethod
    def _reset(sock: socket.socket) -> None:
        for step in (lambda: sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)),
                     lambda: sock.shutdown(socket.SHUT_RDWR),  # wakes a pump blocked in recv() on it
                     sock.close):  # with SO_LINGER 0: a reset
            try:
                step()
            except OSError:
                pass

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return  # closed
            if not self.up.is_set():
                self.refused += 1
                self._reset(client)
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.open |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            self._reset(s)
        with self.lock:
            self.open -= {src, dst}

    def outage(self, seconds: float, until_refused_s: float = 0.0) -> float:
        """Down for ``seconds``, then on until a new connection has been refused during the outage (at most
        ``until_refused_s`` more): a job busy without S3 for the first seconds still meets the outage."""
        refused, start = self.refused, time.monotonic()
        self.up.clear()
        with self.lock:
            dropped = list(self.open)
        for s in dropped:
            self._reset(s)
        time.sleep(seconds)
        deadline = time.monotonic() + until_refused_s
        while self.refused == refused and time.monotonic() < deadline:
            time.sleep(0.05)
        self.up.set()
        return time.monotonic() - start  # seconds down

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def own_moto():
    """This test's own moto server on a free loopback port (moto keeps its state in this process)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        yield server.get_host_and_port()[1]
    finally:
        server.stop()


def _s3_ids(client, bucket: str, prefix: str) -> list[str]:
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    return [i for k in keys if k.endswith(".parquet") for i in pq.read_table(
        io.BytesIO(client.get_object(Bucket=bucket, Key=k)["Body"].read()), columns=["image_id"])["image_id"].to_pylist()]


def test_s3_outage_mid_run_is_retried_and_the_run_completes(ray_cluster, own_moto, tiny_clip, tmp_path):
    """Reads (images) and writes (labels, checkpoint) go through a proxy that drops every connection for 4 s once the
    first write task has committed, and longer if the job has not tried S3 by then (its images may all be read
    already, its next write not due: the outage lasts until it has refused one connection); the run ends complete,
    with no image turned into an error row by the outage."""
    folder, classes, names = _corpus(tmp_path, 32)
    client = make_bucket(f"http://127.0.0.1:{own_moto}", "faults-outage")
    upload_dir(client, folder, "faults-outage", "photos")
    proxy = FlakyProxy(own_moto)
    outage: dict = {}

    def cut_when_mid_run():
        deadline = time.time() + 240
        while time.time() < deadline:
            listed = client.list_objects_v2(Bucket="faults-outage", Prefix=f"out/{schema.CHECKPOINT_DIR}/")
            if any(k.endswith(".parquet") and not k.endswith(".pending.parquet")
                   for k in (o["Key"] for o in listed.get("Contents", []))):  # a committed write task
                outage["labels_before"] = len(_s3_ids(client, "faults-outage", f"out/{schema.LABELS_DIR}/"))
                outage["seconds"] = proxy.outage(4.0, until_refused_s=60.0)
                outage["done"] = True
                return
            time.sleep(0.1)

    cutter = threading.Thread(target=cut_when_mid_run, daemon=True)
    try:
        cutter.start()
        summary = run_labeling(_cfg("s3://faults-outage/photos", "s3://faults-outage/out", tiny_clip, classes,
                                    s3_endpoint=proxy.endpoint))
        cutter.join(10)
    finally:
        proxy.close()
    assert outage.get("done") and 0 < outage["labels_before"] < len(names), f"no outage mid-run: {outage}"
    assert proxy.refused > 0  # the job did try to reach S3 during the outage
    labels = _s3_ids(client, "faults-outage", f"out/{schema.LABELS_DIR}/")
    errors = _s3_ids(client, "faults-outage", f"out/{schema.ERRORS_DIR}/")
    assert sorted(labels) == names and errors == ["bad.jpg"]  # exactly once, no read error from the outage
    assert (summary.labeled, summary.errors) == (32, 1)
    print(f"S3 outage of {outage['seconds']:.1f} s with {outage['labels_before']}/32 labels written; "
          f"{proxy.refused} connections reset during it; run complete")


class DenyAll(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that answers every request with 403 AccessDenied (a bucket this identity may not touch)."""

    def _deny(self) -> None:
        body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                b"<Message>Access Denied</Message></Error>")
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _deny

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def deny_endpoint():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), DenyAll)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_s3_output_denied_or_missing_fails_fast_naming_the_uri(own_moto, deny_endpoint, tiny_clip, tmp_path):
    """Permanent S3 errors on the output end before any Ray work with a message naming the URI; nothing is written."""
    import ray

    folder, classes, _ = _corpus(tmp_path, 2)
    started = ray.is_initialized()
    t0 = time.time()
    with pytest.raises(ConfigError, match=r"config field `output`\)?: cannot write to s3://locked/run1: .*ACCESS_DENIED"):
        run_labeling(_cfg(folder, "s3://locked/run1", tiny_clip, classes, s3_endpoint=deny_endpoint))
    denied_s = time.time() - t0

    moto = f"http://127.0.0.1:{own_moto}"
    client = make_bucket(moto, "faults-exists")
    with pytest.raises(ConfigError, match=r"cannot write to s3://faults-no-such-bucket/run1: .*(NoSuchBucket|not found|does not exist)"):
        run_labeling(_cfg(folder, "s3://faults-no-such-bucket/run1", tiny_clip, classes, s3_endpoint=moto))
    assert "faults-no-such-bucket" not in {b["Name"] for b in client.list_buckets()["Buckets"]}  # never created
    assert ray.is_initialized() == started  # failed before starting Ray
    assert denied_s < 30, denied_s  # not retried as if transient


# ----------------------------------------------------------------------------------------------------------------
# (b) a worker node of a two-node cluster stopped mid-job

BIN = Path(sys.executable).parent

# A driver of the test cluster that fills the head's CPUs until the job's CLIP actor is ALIVE, so the actor lands on
# the worker node (the node this test stops), then frees them for the survivor. Prints two JSON lines.
HOLD_HEAD = """
import json, time, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(logging_level="ERROR", log_to_driver=False)
deadline = time.time() + 240
while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.time() < deadline:
    time.sleep(0.5)
nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
head = next(i for i, n in nodes.items() if "node:__internal_head__" in n["Resources"])
worker = next(i for i in nodes if i != head)
@ray.remote(num_cpus=2)
class Hold:
    def ok(self):
        return 1
hold = Hold.options(scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote()
ray.get(hold.ok.remote())
print(json.dumps({"head": head, "worker": worker}), flush=True)
clip = []
while not clip and time.time() < deadline:
    clip = [a for a in ray._private.state.actors().values()
            if "ClipScorer" in a["ActorClassName"] + a["Name"] and a["State"] == "ALIVE"]
    time.sleep(0.2)
print(json.dumps({"clip_node": clip[0]["Address"]["NodeID"] if clip else None}), flush=True)
ray.kill(hold)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_group(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM, then SIGKILL, the process group this test started (never any other Ray process)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace_s)
            return
        except subprocess.TimeoutExpired:
            pass


def _json_line(proc: subprocess.Popen):
    """The next JSON line a driver printed (Ray may print its own lines in between), or None when it ended."""
    for line in proc.stdout:
        if line.startswith("{"):
            return json.loads(line)
    return None


@pytest.fixture
def two_nodes(tmp_path):
    """``ray start --head`` (2 CPUs) and a second ``ray start --address`` (2 CPUs, custom resource ``faults_worker``)
    on this machine, each in its own process group and temp dir, token auth with this cluster's own token."""
    import ray._private.services

    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home), PATH=f"{BIN}:{os.environ['PATH']}", PYTHONPATH=str(REPO),
               RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True,
                   timeout=120)
    ip = ray._private.services.get_node_ip_address()
    common = ["--block", f"--node-ip-address={ip}", "--num-cpus=2", f"--object-store-memory={100 * 1024**2}",
              "--disable-usage-stats"]
    procs: list[subprocess.Popen] = []
    temps: list[str] = []

    def start(name: str, args: list[str]) -> subprocess.Popen:
        """``ray start --block`` in its own process group and temp dir; tried 3 times (on 2 loaded cores a raylet
        can miss Ray's fixed 30 s registration deadline)."""
        log = tmp_path / f"{name}.log"
        for _ in range(3):
            temps.append(tempfile.mkdtemp(prefix="rf", dir="/tmp"))  # Ray's socket paths must stay under 107 bytes
            with open(log, "a") as f:
                proc = subprocess.Popen([str(BIN / "ray"), "start", *args(), f"--temp-dir={temps[-1]}", *common],
                                        env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                        cwd=REPO)
            procs.append(proc)
            deadline = time.time() + 180
            while "Ray runtime started" not in log.read_text() and proc.poll() is None and time.time() < deadline:
                time.sleep(1)
            if proc.poll() is None and "Ray runtime started" in log.read_text():
                return proc
            _stop_group(proc)
        raise AssertionError(f"{name} did not start:\n{log.read_text()[-3000:]}")

    port = 0
    try:
        def head_args() -> list[str]:
            nonlocal port
            port = _free_port()
            return ["--head", f"--port={port}", "--include-dashboard=false"]

        start("head", head_args)
        worker = start("worker", lambda: [f"--address={ip}:{port}", '--resources={"faults_worker": 1}'])
        yield dict(env, RAY_ADDRESS=f"{ip}:{port}"), worker
    finally:
        for proc in reversed(procs):
            _stop_group(proc)
        for t in temps:
            shutil.rmtree(t, ignore_errors=True)


def test_worker_node_stopped_mid_job_every_image_exactly_once(two_nodes, tiny_clip, tmp_path):
    """The CLIP actor runs on the worker node; its whole process group is SIGKILLed once some write tasks committed.
    The job finishes on the head (Ray restarts the actor there), or fails with a clear message and finishes when
    the same command is run again; every image ends exactly once in labels/ or errors/."""
    env, worker = two_nodes
    folder, classes, names = _corpus(tmp_path, 32)
    out = tmp_path / "out"
    cmd = [sys.executable, "jobs/label_folder.py", "--dataset", str(folder), "--classes-file", str(classes),
           "--output", str(out), "--model", f"local-dir:{tiny_clip}", "--pretrained", "none", "--batch-size", "2",
           "--decode-batch-size", "2", "--rows-per-file", "4", "--max-actors", "1", "--use-gpu", "false"]
    holder = subprocess.Popen([sys.executable, "-c", HOLD_HEAD], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, start_new_session=True, cwd=REPO)
    job = None
    try:
        nodes = _json_line(holder)
        assert nodes, "the two-node cluster did not come up"
        job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, cwd=REPO)
        placed = _json_line(holder)
        assert placed and placed["clip_node"] == nodes["worker"], placed
        deadline = time.time() + 240
        while _committed(out) < 1 and job.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        on_disk = len(output_ids(out, schema.LABELS_DIR))
        assert job.poll() is None and on_disk < len(names), f"the job ended before the node could be stopped"
        _stop_group(worker, grace_s=0)  # SIGTERM then at once SIGKILL: the node is gone
        worker.wait(30)
        first_log = job.communicate(timeout=400)[0]
    finally:
        for proc in (holder, job):
            if proc is not None:
                _stop_group(proc, grace_s=5)
    (tmp_path / "job.log").write_text(first_log)
    if job.returncode != 0:  # the other documented outcome: a clear message, then the same command finishes
        assert "Traceback" not in first_log.splitlines()[-1], first_log[-3000:]
        again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, start_new_session=True,
                               cwd=REPO)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    summary = json.loads((out / schema.SUMMARY_FILE).read_text())
    labels, errors = output_ids(out, schema.LABELS_DIR), output_ids(out, schema.ERRORS_DIR)
    assert sorted(labels) == names and errors == ["bad.jpg"]  # every image exactly once
    assert summary["labeled_total"] == 32 and summary["errors_total"] == 1
    print(f"worker node stopped with {on_disk} labels on disk; first run rc={job.returncode}")
