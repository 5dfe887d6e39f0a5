"""`make up` / `make down`, used the way the UI uses it.

Real parts: scripts/ui_stack.py (what `make up` runs) starts a moto S3 server process and
`airflow standalone` (api-server with the UI and REST API, scheduler with LocalExecutor, dag-processor,
triggerer; SQLite) on free ports; the run is triggered through Airflow's public REST API (/api/v2, token
from /auth/token), the API the UI itself calls; the DAG runs spark-submit on a local Spark with the real
MobileNetV2 weights on real Fruits-360 photos. Assertions are on what lands in S3 and in the task logs.
`ui_stack.py down` must leave no process behind: the fixture checks, and kills leftovers, even on failure.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pyarrow.parquet as pq
import pytest
from conftest import REPO, sample_files

sys.path.insert(0, str(REPO / "scripts"))
import ui_stack  # noqa: E402

BATCH = "ui-training"
LABELS, PER_LABEL = 6, 3
PARAMS = {"batch_ids": [BATCH], "pca_mode": "fixed", "pca_k": 5, "variance_target": 0.8}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("ui-stack")
    data = home / "photos"
    for f in sample_files("Training", labels=LABELS, per_label=PER_LABEL):
        (data / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, data / f.parent.name / f.name)
    port, s3_port = free_port(), free_port()
    script = [sys.executable, str(REPO / "scripts" / "ui_stack.py")]
    up = [*script, "up", "--port", str(port), "--s3-port", str(s3_port), "--home", str(home)]
    started = time.monotonic()
    proc = subprocess.run([*up, "--seed", f"{BATCH}={data}"], capture_output=True, text=True, timeout=400)
    startup_s = time.monotonic() - started
    token = json.loads((home / "stack.json").read_text())["token"] if (home / "stack.json").exists() else None
    try:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        password = json.loads((home / "airflow" / "simple_auth_manager_passwords.json.generated").read_text())
        yield {
            "home": home,
            "port": port,
            "s3_port": s3_port,
            "token": token,
            "password": password["admin"],
            "up_output": proc.stdout,
            "startup_s": startup_s,
        }
    finally:
        down = subprocess.run(
            [*script, "down", "--home", str(home)], capture_output=True, text=True, timeout=120
        )
        left = ui_stack.marked_processes(token) if token else []
        for pid in left:  # never leave a process behind, even when `down` is broken
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert not left, f"left behind: {left}\n{down.stdout}\n{down.stderr}"
        if proc.returncode == 0:
            assert down.returncode == 0 and "none left" in down.stdout, down.stdout + down.stderr


def s3(stack):
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    os.environ["AIRFLOW_CONN_UI_STACK_S3"] = json.dumps(
        {
            "conn_type": "aws",
            "login": "test",
            "password": "test",
            "extra": {"endpoint_url": f"http://127.0.0.1:{stack['s3_port']}", "region_name": "eu-west-3"},
        }
    )
    return S3Hook(aws_conn_id="ui_stack_s3")


def task_log(api: ui_stack.Api, run_id: str, task_id: str) -> str:
    path = (
        f"/api/v2/dags/{ui_stack.DAG_ID}/dagRuns/{urllib.parse.quote(run_id, safe='')}"
        f"/taskInstances/{task_id}/logs/1?full_content=true"
    )
    return json.dumps(api.request("GET", path))


def test_trigger_through_rest_api_and_outputs(stack, capsys):
    port = stack["port"]
    assert f"http://localhost:{port}" in stack["up_output"] and stack["password"] in stack["up_output"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
        assert "<html" in resp.read().decode().lower()  # the UI itself is served

    api = ui_stack.Api(f"http://127.0.0.1:{port}", password=stack["password"])
    api.login()
    details = api.request("GET", f"/api/v2/dags/{ui_stack.DAG_ID}/details")
    assert details["is_paused"] is False
    # The trigger form: every param has a description and a default that passes its own schema.
    params = details["params"]
    assert set(PARAMS) <= set(params)
    for name, spec in params.items():
        assert spec.get("description"), f"param {name} has no description"
        assert "value" in spec, name
        if "enum" in spec["schema"]:
            assert spec["value"] in spec["schema"]["enum"], name
    assert params["pca_mode"]["value"] == "variance" and params["compute"]["value"] == "local"

    run = api.request(
        "POST", f"/api/v2/dags/{ui_stack.DAG_ID}/dagRuns", {"logical_date": None, "conf": PARAMS}
    )
    run_id = run["dag_run_id"]
    quoted = urllib.parse.quote(run_id, safe="")
    deadline, peak_procs, peak_mb, state = time.monotonic() + 480, 0, 0.0, run["state"]
    t0 = time.monotonic()
    while time.monotonic() < deadline:
        state = api.request("GET", f"/api/v2/dags/{ui_stack.DAG_ID}/dagRuns/{quoted}")["state"]
        procs = ui_stack.marked_processes(stack["token"])
        peak_procs, peak_mb = max(peak_procs, len(procs)), max(peak_mb, ui_stack.rss_mb(procs))
        if state in ("success", "failed"):
            break
        time.sleep(3)
    run_s = time.monotonic() - t0
    tis = api.request("GET", f"/api/v2/dags/{ui_stack.DAG_ID}/dagRuns/{quoted}/taskInstances")
    states = {ti["task_id"]: ti["state"] for ti in tis["task_instances"]}
    if state != "success":
        failed = [t for t, s in states.items() if s == "failed"]
        logs = "\n".join(task_log(api, run_id, t)[-3000:] for t in failed)
        pytest.fail(f"run {run_id} ended {state}: {states}\n{logs}")
    assert states["embed"] == states["pca"] == states["report"] == "success"

    # Outputs in S3, shaped by the non-default params.
    from fruits.layout import safe_run_id

    hook, bucket = s3(stack), os.environ["FRUITS_BUCKET"]
    record = json.loads(hook.read_key(f"ledger/batches/{BATCH}.json", bucket))
    n = LABELS * PER_LABEL
    assert (record["files"], record["embedded"], record["rejected"]) == (n, n, 0)
    assert record["run_id"] == run_id and record["pca_k"] == 5
    meta = json.loads(hook.read_key(f"models/pca/{record['pca_version']}/metadata.json", bucket))
    assert meta["mode"] == "fixed" and meta["k"] == 5
    keys = hook.list_keys(bucket, prefix=f"features/pca_version={record['pca_version']}/batch_id={BATCH}/")
    tables = [pq.read_table(io.BytesIO(hook.get_key(k, bucket).get()["Body"].read())) for k in keys]
    vectors = [v for t in tables if t.num_rows for v in t.column("features").to_pylist()]
    assert len(vectors) == n and {len(v) for v in vectors} == {5}
    report_key = f"reports/{safe_run_id(run_id)}.html"
    assert run_id in hook.read_key(report_key, bucket)

    # The task logs, as the UI shows them: embed progress (done out of total, rate) and the report path.
    embed_log = task_log(api, run_id, "embed")
    assert f"progress: {n}/{n} images (100%)" in embed_log and "img/s" in embed_log
    assert f"s3://{bucket}/{report_key}" in task_log(api, run_id, "report")

    # Bounded: parallelism 4 keeps the stack small on 2 cores.
    assert peak_procs <= 40 and peak_mb < 6000, (peak_procs, peak_mb)
    with capsys.disabled():
        print(
            f"\n    ui stack: up in {stack['startup_s']:.0f} s, run {run_s:.0f} s, "
            f"peak {peak_procs} processes / {peak_mb:.0f} MB resident"
        )
