"""Local stack for the demo, the tests and the UI: a moto S3 server, the bucket, weights, batches.

    python scripts/devstack.py s3-start | s3-stop | seed [--data DIR --batch ID] | demo [--data DIR]

S3 calls go through the amazon provider's S3Hook and the AWS connection from the environment, exactly as
in the DAG; only the server's lifecycle is handled here.
"""

from __future__ import annotations

import argparse
import json
import os
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
    """Start moto_server on the endpoint's port unless one answers already. True if this call started it."""
    endpoint = s3_endpoint()
    if _healthy(endpoint):
        return False
    port = endpoint.rsplit(":", 1)[1].strip("/")
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    log = open(CACHE / "moto.log", "ab")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", port],
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
    raise SystemExit(f"moto_server did not answer on {endpoint}; see {CACHE / 'moto.log'}")


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


def demo(data: Path, batch_id: str | None) -> None:
    from fruits.config import settings

    bucket = settings().bucket
    started_s3 = s3_start()
    try:
        ensure_bucket(bucket)
        stage_weights(bucket)
        batch = batch_id or f"{data.name.lower().replace(' ', '-')}-{time.strftime('%Y%m%dT%H%M%S')}"
        upload_batch(bucket, data, batch)
        say("running the DAG: airflow dags test fruits_embeddings (embed + PCA on local Spark)")
        t0 = time.monotonic()
        airflow = str(Path(sys.executable).parent / "airflow")
        subprocess.run([airflow, "db", "migrate"], check=True, stdout=subprocess.DEVNULL)
        conf = json.dumps({"batch_ids": [batch]})
        logfile = CACHE / "demo-dag.log"
        with open(logfile, "w") as out:
            code = subprocess.call(
                [airflow, "dags", "test", "fruits_embeddings", "-c", conf],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        for line in logfile.read_text(errors="replace").splitlines():
            if "progress:" in line or "done:" in line or "fitted PCA" in line or "Marking task as" in line:
                print("   " + line.split("]", 1)[-1].strip()[:160])
        if code != 0:
            raise SystemExit(f"DAG run failed (exit {code}); full log: {logfile}")
        summary = latest_summary(bucket)
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
        summary["seconds"] = round(time.monotonic() - t0, 1)
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
        print(json.dumps(summary))
    finally:
        if started_s3:
            s3_stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("s3-start")
    sub.add_parser("s3-stop")
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
    elif args.cmd == "seed":
        from fruits.config import settings

        ensure_bucket(settings().bucket)
        stage_weights(settings().bucket)
        upload_batch(settings().bucket, args.data, args.batch)
    else:
        demo(args.data.resolve(), args.batch)


if __name__ == "__main__":
    main()
