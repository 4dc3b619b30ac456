"""A real Ray head (`ray start --head`) and `ray job submit` of jobs/label_coco.py --smoke-test, with token auth."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cdul_ray import schema

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], env: dict, timeout: float, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def _processes_using(temp_dir: str) -> list[int]:
    """Ids of this user's processes whose command line names ``temp_dir`` (the Ray processes of our head only)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if entry.stat().st_uid == os.getuid() and temp_dir.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:  # exited meanwhile
            continue
    return pids


def _stop_head(pgid: int, temp_dir: str) -> None:
    """Stop only the head this test started: its process group, then anything still naming its temp dir."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        for pid in _processes_using(temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 15
        while time.time() < deadline and _processes_using(temp_dir):
            time.sleep(0.5)
        if not _processes_using(temp_dir):
            return


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head started with the CLI, token auth on (RAY_AUTH_MODE=token), its token under a private HOME.

    Every port is its own (free) one, so it runs beside the suite's shared ``ray_cluster`` (whose dashboard agent
    holds Ray's fixed default agent port 52365: a second head on that port never gets a job agent). ``ray start``
    runs in its own session and process group with its own temp dir; teardown stops exactly those processes (never
    ``ray stop``, which stops every Ray cluster of the machine).
    """
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home), RAY_AUTH_MODE="token", PATH=f"{BIN}:{os.environ['PATH']}",
               RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    _run([str(BIN / "ray"), "get-auth-token", "--generate"], env, 120)
    assert (home / ".ray" / "auth_token").is_file()
    gcs, dash, agent, client = _free_port(), _free_port(), _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    start = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--num-cpus=2", "--include-dashboard=true",
         f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", f"--dashboard-agent-listen-port={agent}",
         f"--ray-client-server-port={client}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    pgid = start.pid  # start_new_session: the session and process group of every process the head spawns
    try:
        out, err = start.communicate(timeout=300)
        assert start.returncode == 0, f"ray start failed ({start.returncode}):\n{out[-4000:]}\n{err[-4000:]}"
        yield env, f"http://127.0.0.1:{dash}"
    finally:
        if start.poll() is None:
            start.kill()
        _stop_head(pgid, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_smoke_test(ray_head, coco_dataset, tmp_path):
    env, address = ray_head
    root, info = coco_dataset
    out = tmp_path / "job_out"
    submit = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
              "python", "jobs/label_coco.py", "--smoke-test", "--dataset", str(root), "--split", "train",
              "--output", str(out)]
    deadline = time.time() + 300
    while True:  # the head's job agent starts a little after `ray start` returns
        proc = _run(submit, env, 900, check=False)
        if proc.returncode == 0 or "No available agent" not in proc.stderr or time.time() > deadline:
            break
        time.sleep(5)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    match = re.search(r"Job '([^']+)' succeeded", proc.stdout + proc.stderr)
    assert match, proc.stdout[-4000:]
    status = _run([str(BIN / "ray"), "job", "status", "--address", address, match.group(1)], env, 120)
    assert re.search(rf"Job '{match.group(1)}' succeeded", re.sub(r"\x1b\[[0-9;]*m", "", status.stdout)), status.stdout
    assert "CDUL labeling finished" in proc.stdout

    summary = json.loads((out / schema.SUMMARY_FILE).read_text())
    # --smoke-test keeps the first 8 images of the dataset, the bundled small CLIP, CPU actors
    assert summary["images"] == 8 and summary["labeled"] == 8 and summary["errors"] == 0
    table = pq.read_table(out / schema.LABELS_DIR)
    assert sorted(table["image_id"].to_pylist(), key=int) == info["ok"][:8]
    run_cfg = json.loads((out / schema.RUN_CONFIG_FILE).read_text())
    assert run_cfg["model"] == "cdul-synth-rn" and run_cfg["pretrained"] == "synth" and run_cfg["limit"] == 8


def test_job_without_token_is_refused(ray_head):
    env, address = ray_head
    no_token = dict(env, HOME=str(Path(env["HOME"]).parent / "other_home"))
    Path(no_token["HOME"]).mkdir()
    proc = _run([str(BIN / "ray"), "job", "list", "--address", address], no_token, 120, check=False)
    assert proc.returncode != 0
