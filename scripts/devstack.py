"""Local stack for the demo, the tests and the UI: a moto S3 server, the bucket, weights, batches.

    python scripts/devstack.py s3-start | s3-stop | stage-weights | seed [--data DIR --batch ID] | demo [--data DIR]

S3 calls go through the amazon provider's S3Hook and the AWS connection from the environment, exactly as
in the DAG; only the server's lifecycle is handled here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))

CACHE = REPO / ".cache"
SHARED = REPO.parent / "shared"
DEFAULT_DATA = SHARED / "data" / "fruits360-sample" / "Training"
DEFAULT_WEIGHTS = SHARED / "models" / "mobilenet_v2" / "mobilenet_v2_1.0_224_no_top.h5"


def say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


# One botocore loader per process instead of one per hook (plugins/fruits/aws_session.py).
SESSION_FACTORY = "fruits.aws_session.SharedLoaderSessionFactory"


def local_stack_env(airflow_home: Path, work_dir: Path, s3_endpoint: str) -> dict[str, str]:
    """What Airflow, the DAG and the Spark steps read on this machine, set before Airflow is imported:
    an Airflow home, this repo's dags and plugins, the AWS connection at a local S3 server (local-only
    dummy keys), and this Python for Spark. The tests, the bench and the UI stack add their own on top."""
    conn = {
        "conn_type": "aws",
        "login": "test",
        "password": "test",
        "extra": {"endpoint_url": s3_endpoint, "region_name": "eu-west-3"},
    }
    return {
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__AWS__SESSION_FACTORY": SESSION_FACTORY,
        "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(conn),
        "FRUITS_WORK_DIR": str(work_dir),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
    }


# --- moto server lifecycle ---------------------------------------------------------------------------
def s3_endpoint() -> str:
    conn = json.loads(os.environ["AIRFLOW_CONN_AWS_DEFAULT"])
    return conn["extra"]["endpoint_url"]


def _healthy(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
            return True
    except Exception:
        return False


def s3_start(pidfile: Path = CACHE / "moto.pid") -> bool:
    """Start the local S3 server (moto, counting requests by operation: scripts/counting_s3.py, counts at
    ENDPOINT/_counts) on the endpoint's port unless one answers already. True if this call started it."""
    endpoint = s3_endpoint()
    if _healthy(endpoint):
        return False
    port = endpoint.rsplit(":", 1)[1].strip("/")
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    log = open(CACHE / "moto.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "counting_s3.py"), "-H", "127.0.0.1", "-p", port],
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    pidfile.write_text(str(proc.pid))
    for _ in range(100):
        if _healthy(endpoint):
            say(f"local S3 (moto) on {endpoint}, pid {proc.pid}")
            return True
        time.sleep(0.1)
    raise SystemExit(f"the local S3 server did not answer on {endpoint}; see {CACHE / 'moto.log'}")


def s3_stop(pidfile: Path = CACHE / "moto.pid") -> None:
    if pidfile.exists():
        pid = int(pidfile.read_text())
        try:
            os.killpg(pid, signal.SIGTERM)
            say(f"stopped local S3 (pid {pid})")
        except ProcessLookupError:
            pass
        pidfile.unlink()


# --- seeding ------------------------------------------------------------------------------------------
def hook():
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    return S3Hook(aws_conn_id=os.environ.get("FRUITS_AWS_CONN_ID", "aws_default"))


def ensure_bucket(bucket: str, region: str = "eu-west-3") -> None:
    h = hook()
    if not h.check_for_bucket(bucket):
        h.create_bucket(bucket_name=bucket, region_name=region)
        say(f"created bucket s3://{bucket} in {region}")


def stage_weights(bucket: str, weights: Path = DEFAULT_WEIGHTS) -> str:
    from fruits.config import settings

    uri = settings().resolve(settings().weights_uri)
    b, _, key = uri[len("s3://") :].partition("/")
    h = hook()
    if not h.check_for_key(key, b):
        h.load_file(str(weights), key, b, replace=True)
        say(f"staged weights {weights.name} -> {uri}")
    return uri


def upload_batch(bucket: str, data: Path, batch_id: str, ready: bool = True) -> int:
    """Upload DATA/LABEL/*.jpg to incoming/BATCH/LABEL/..., then the _READY marker last."""
    files = sorted(p for p in data.rglob("*") if p.is_file())
    if not files:
        raise SystemExit(f"no files under {data}")
    h = hook()
    prefix = f"incoming/{batch_id}/"
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda p: h.load_file(str(p), prefix + p.relative_to(data).as_posix(), bucket, replace=True),
                files,
            )
        )
    if ready:
        h.load_string("", prefix + "_READY", bucket, replace=True)
    say(f"uploaded {len(files)} files from {data} as batch {batch_id!r}" + (" (+ _READY)" if ready else ""))
    return len(files)


# --- demo ---------------------------------------------------------------------------------------------
def latest_summary(bucket: str) -> dict:
    h = hook()
    keys = [k for k in (h.list_keys(bucket, prefix="runs/") or []) if k.endswith("/summary.json")]
    if not keys:
        raise SystemExit("no run summary found in S3: the DAG run did not finish; see the log above")
    newest = max(keys, key=lambda k: h.head_object(k, bucket)["LastModified"])
    return json.loads(h.read_key(newest, bucket))


DEMO_OUTPUT = REPO / "demo-output"


def dag_test(batch: str, logfile: Path) -> None:
    """One DAG run over one batch, as `airflow dags test` (scheduler-less, in this machine's Spark)."""
    airflow = str(Path(sys.executable).parent / "airflow")
    keep = ("starting task_id", "progress:", "done:", "fitted PCA", "run report:", "linear probe", "Marking")
    # The full log goes to a file; the lines that say where the run is are shown as they come.
    with (
        open(logfile, "w") as out,
        subprocess.Popen(
            [airflow, "dags", "test", "fruits_embeddings", "-c", json.dumps({"batch_ids": [batch]})],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        ) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            if any(k in line for k in keep):
                text = re.sub(r"\s+\[[\w.]+\]\s+loc=\S+.*$", "", line.split("]", 1)[-1].strip())
                print("   " + text[:160], flush=True)
        code = proc.wait()
    if code != 0:
        raise SystemExit(f"DAG run failed (exit {code}); full log: {logfile}")


def fetch_report(bucket: str, run_id: str) -> tuple[Path, dict]:
    """Copy the run's HTML report from S3 into demo-output/; return it with the probe's numbers."""
    from fruits.layout import Layout

    layout = Layout(bucket)
    DEMO_OUTPUT.mkdir(exist_ok=True)
    local = DEMO_OUTPUT / layout.report_key(run_id).rsplit("/", 1)[1]
    hook().get_conn().download_file(bucket, layout.report_key(run_id), str(local))
    stats = json.loads(hook().read_key(f"{layout.run_prefix(run_id)}report.json", bucket))
    return local, stats


def held_out_split(data: Path) -> Path | None:
    """Fruits-360 keeps Training/ and Test/ side by side: the demo uses Test/ as held-out data."""
    sibling = data.parent / "Test"
    return sibling if data.name == "Training" and sibling.is_dir() else None


def demo(data: Path, batch_id: str | None) -> None:
    from fruits.config import settings

    bucket = settings().bucket
    started_s3 = s3_start()
    try:
        ensure_bucket(bucket)
        stage_weights(bucket)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        batch = batch_id or f"{data.name.lower().replace(' ', '-')}-{stamp}"
        upload_batch(bucket, data, batch)
        test_data = held_out_split(data)
        test_batch = f"test-{stamp}"  # the token "test" makes it held-out data for the report's probe
        if test_data:
            upload_batch(bucket, test_data, test_batch)
        subprocess.run(
            [str(Path(sys.executable).parent / "airflow"), "db", "migrate"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        say(f"run 1: the DAG on {batch!r} (embed + PCA fit on local Spark)")
        t0 = time.monotonic()
        logfile = CACHE / "demo-dag.log"
        dag_test(batch, logfile)
        seconds = round(time.monotonic() - t0, 1)
        summary = latest_summary(bucket)
        reports = [fetch_report(bucket, summary["run_id"])]
        if test_data:
            say(f"run 2: the DAG on {test_batch!r} (held-out Test images, transformed with run 1's PCA)")
            dag_test(test_batch, CACHE / "demo-dag-test.log")
            reports.append(fetch_report(bucket, latest_summary(bucket)["run_id"]))
        summary = {
            k: summary[k]
            for k in (
                "batches",
                "images",
                "embedded",
                "rejected",
                "embedding_dim",
                "pca_components",
                "explained_variance",
                "seconds",
            )
        }
        summary["seconds"] = seconds
        print()
        print(
            f"Processed {summary['batches']} batch(es): {summary['images']} images, "
            f"{summary['embedded']} embedded ({summary['embedding_dim']}-d MobileNetV2), "
            f"{summary['rejected']} rejected."
        )
        print(
            f"PCA kept {summary['pca_components']} components explaining "
            f"{summary['explained_variance']:.1%} of the variance. Took {summary['seconds']} s."
        )
        print(
            f"Outputs: s3://{bucket}/embeddings/, rejects/, features/, models/pca/, ledger/ "
            f"(endpoint {s3_endpoint()}); full DAG log: {logfile}"
        )
        probe = reports[-1][1]["probe"]
        if probe.get("pca"):
            print(
                f"Linear probe (logistic regression, trained on the {probe['pca']['train_rows']} Training "
                f"images, top-1 on the {probe['pca']['test_rows']} Test images, {probe['pca']['classes']} "
                f"varieties): PCA features ({probe['pca']['dim']}-d) {probe['pca']['accuracy']:.1%}, "
                f"full embeddings (1280-d) {probe['full']['accuracy']:.1%}."
            )
        for path, _ in reports:
            print(f"Run report: {path}")
    finally:
        if started_s3:
            s3_stop()
    print(json.dumps(summary))  # last: the one line a script reads


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("s3-start")
    sub.add_parser("s3-stop")
    sub.add_parser("stage-weights", help="upload ../shared's MobileNetV2 weights to FRUITS_WEIGHTS_URI")
    seed = sub.add_parser("seed")
    seed.add_argument("--data", type=Path, default=DEFAULT_DATA)
    seed.add_argument("--batch", default="demo")
    d = sub.add_parser("demo")
    d.add_argument("--data", type=Path, default=DEFAULT_DATA)
    d.add_argument("--batch")
    args = ap.parse_args()
    if args.cmd == "s3-start":
        s3_start()
    elif args.cmd == "s3-stop":
        s3_stop()
    elif args.cmd == "stage-weights":
        from fruits.config import settings

        stage_weights(settings().bucket)
    elif args.cmd == "seed":
        from fruits.config import settings

        ensure_bucket(settings().bucket)
        stage_weights(settings().bucket)
        upload_batch(settings().bucket, args.data, args.batch)
    else:
        demo(args.data.resolve(), args.batch)


if __name__ == "__main__":
    main()
