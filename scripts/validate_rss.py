"""What a run's Spark steps leave for validation, written synthetically, and the Airflow-side validate's
peak memory on it.

    python scripts/validate_rss.py [--rows 100000] [--k 191]

Starts its own moto S3 server on a free localhost port, writes one batch of ROWS rows as the steps would
(embeddings/, rejects/, features/ Parquet with the jobs' schemas, ceil(rows / 20,000) files per partition;
embed_validation.json, pca_validation.json, expected.json, the model's metadata.json), then runs
plugins/fruits/validate.validate_run in a fresh Python process and prints its peak RSS (VmHWM) as
one JSON line. tests/test_validate.py writes its good and bad runs with `write_run`.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
MODEL_ID = "mobilenet_v2_1.0_224-imagenet-notop-avgpool@000000000000"
VERSION = "pca-synthetic"
ROWS_PER_FILE = 20_000


def _vectors(values: np.ndarray) -> pa.Array:
    rows, dim = values.shape
    return pa.ListArray.from_arrays(
        pa.array(np.arange(0, rows * dim + 1, dim, dtype=np.int32)), pa.array(values.reshape(-1))
    )


def put_parquet(client, bucket: str, key: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    client.put_object(Bucket=bucket, Key=key, Body=buf.getvalue())


def put_json(client, bucket: str, key: str, payload: Any) -> None:
    client.put_object(Bucket=bucket, Key=key, Body=json.dumps(payload).encode())


def write_run(
    client,
    bucket: str,
    run_prefix: str,
    batches: dict[str, int],
    k: int = 8,
    rejected: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """A valid run's outputs for {batch: embedded rows} (+ `rejected` rejects per batch) and the plan
    dict validate_run takes. Tests then damage one thing."""
    rng = np.random.default_rng(seed)
    embed_checks, pca_checks = {}, {}
    for b, rows in batches.items():
        n_files = max(1, math.ceil(rows / ROWS_PER_FILE))
        for i in range(n_files):
            lo, hi = i * rows // n_files, (i + 1) * rows // n_files
            paths = [f"s3://{bucket}/incoming/{b}/label-{j % 3}/{j}.jpg" for j in range(lo, hi)]
            labels = [f"label-{j % 3}" for j in range(lo, hi)]
            common = {
                "path": pa.array(paths, pa.string()),
                "label": pa.array(labels, pa.string()),
                "content_sha256": pa.array(["0" * 64] * (hi - lo), pa.string()),
            }
            emb = rng.random((hi - lo, 1280), dtype=np.float32)
            put_parquet(
                client,
                bucket,
                f"embeddings/batch_id={b}/part-{i:05d}.snappy.parquet",
                pa.table(
                    {
                        **common,
                        "size_bytes": pa.array([7000] * (hi - lo), pa.int64()),
                        "embedding": _vectors(emb),
                        "model_id": pa.array([MODEL_ID] * (hi - lo), pa.string()),
                        "engine": pa.array(["onnx"] * (hi - lo), pa.string()),
                    }
                ),
            )
            del emb
            put_parquet(
                client,
                bucket,
                f"features/pca_version={VERSION}/batch_id={b}/part-{i:05d}.snappy.parquet",
                pa.table(
                    {
                        **common,
                        "features": _vectors(rng.random((hi - lo, k), dtype=np.float32)),
                        "pca_version": pa.array([VERSION] * (hi - lo), pa.string()),
                        "model_id": pa.array([MODEL_ID] * (hi - lo), pa.string()),
                    }
                ),
            )
        if rejected:
            put_parquet(
                client,
                bucket,
                f"rejects/batch_id={b}/part-00000.snappy.parquet",
                pa.table(
                    {
                        "path": pa.array(
                            [f"s3://{bucket}/incoming/{b}/x/bad{j}.txt" for j in range(rejected)]
                        ),
                        "label": pa.array(["x"] * rejected),
                        "content_sha256": pa.array([None] * rejected, pa.string()),
                        "size_bytes": pa.array([10] * rejected, pa.int64()),
                        "reason": pa.array(["unsupported extension"] * rejected),
                    }
                ),
            )
        embed_checks[b] = {
            "files": rows + rejected,
            "embedded": rows,
            "rejected": rejected,
            "distinct_paths": rows + rejected,
            "duplicate_paths": 0,
            "dim_min": 1280,
            "dim_max": 1280,
            "null_vectors": 0,
            "nonfinite_values": 0,
            "model_ids": [MODEL_ID],
            "labels": {f"label-{i}": len(range(i, rows, 3)) for i in range(min(3, rows))},
            "reject_reasons": {"unsupported extension": rejected} if rejected else {},
        }
        pca_checks[b] = {
            "embeddings": rows,
            "features": rows,
            "distinct_paths": rows,
            "dim_min": k,
            "dim_max": k,
            "null_vectors": 0,
            "nonfinite_values": 0,
            "pca_versions": [VERSION],
            "missing_features": 0,
            "extra_features": 0,
            "labels": embed_checks[b]["labels"],
        }
    put_json(
        client,
        bucket,
        f"{run_prefix}embed_validation.json",
        {"step": "embed", "model_id": MODEL_ID, "engine": "onnx", "batches": embed_checks},
    )
    put_json(
        client,
        bucket,
        f"{run_prefix}pca_validation.json",
        {"step": "pca", "version": VERSION, "k": k, "batches": pca_checks},
    )
    put_json(client, bucket, f"{run_prefix}expected.json", {b: n + rejected for b, n in batches.items()})
    put_json(
        client,
        bucket,
        f"models/pca/{VERSION}/metadata.json",
        {"version": VERSION, "k": k, "explained_variance_at_k": 0.9},
    )
    # The plan's batch lists, as plugins/fruits/plan.py writes them (runs/RUN/batches.json).
    put_json(
        client, bucket, f"{run_prefix}batches.json", {"new": sorted(batches), "recorded": [], "refit": []}
    )
    return {
        "run_id": "synthetic",
        "run_prefix": run_prefix,
        "keys": {"batches.json": f"{run_prefix}batches.json", "expected.json": f"{run_prefix}expected.json"},
        "model_id": MODEL_ID,
        "pca": {"version": VERSION, "fit": False},
        "expected_key": f"{run_prefix}expected.json",
    }


# Peak RSS of the validate process itself: VmHWM (this address space's high-water mark). ru_maxrss would
# also count the parent's pages at fork time (Linux carries it across execve), here the synthetic data.
MEASURE = """
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
import json, sys, time
from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from fruits.catalog import Catalog
from fruits.layout import Layout
from fruits.validate import validate_run
plan = json.loads(sys.argv[1])
catalog = Catalog(S3Hook(aws_conn_id="aws_default"), Layout(sys.argv[2]))
catalog.hook.get_conn()
before = hwm()
t = time.monotonic()
totals = validate_run(catalog, plan)
print(json.dumps({"peak_rss_mb": round(hwm(), 1),
                  "rss_before_validate_mb": round(before, 1),
                  "seconds": round(time.monotonic() - t, 2), "totals": totals}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--k", type=int, default=191)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="eu-west-3",
            aws_access_key_id="t",
            aws_secret_access_key="t",
        )
        bucket = "fruits-rss"
        client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-3"})
        plan = write_run(client, bucket, "runs/synthetic/", {"big-batch": args.rows}, k=args.k)
        conn = {
            "conn_type": "aws",
            "login": "t",
            "password": "t",
            "extra": {"endpoint_url": endpoint, "region_name": "eu-west-3"},
        }
        env = {
            **os.environ,
            "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(conn),
            "PYTHONPATH": f"{REPO / 'plugins'}:{os.environ.get('PYTHONPATH', '')}",
        }
        out = (
            subprocess.run(
                [sys.executable, "-c", MEASURE, json.dumps(plan), bucket],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        result = json.loads(out)
        print(
            json.dumps(
                {
                    "rows": args.rows,
                    "validate_peak_rss_mb": result["peak_rss_mb"],
                    "rss_before_validate_mb": result["rss_before_validate_mb"],
                    "validate_s": result["seconds"],
                    "features": result["totals"]["features"],
                }
            )
        )
    finally:
        server.terminate()
        server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
