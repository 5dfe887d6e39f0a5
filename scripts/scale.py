"""`make scale`: what a run costs as the bucket's history grows, measured on real DAG runs, in one run.

    python scripts/scale.py [--history-batches 5000] [--history-rows 200000] [--new-photos 200]
                            [--small-batches 1000] [--validate-rows 100000] [--skip refit,small,...]

It starts its own counting S3 server (moto plus a request counter: scripts/counting_s3.py) on a free port and
its own Airflow home, then:

1. warm-up: one small run in a scratch bucket (imports, JVM, the ONNX export staged once and then copied
   to the other buckets, so that no measured run pays for the export);
2. empty bucket: a whole DAG run (dag.test) on one new batch of --new-photos real Fruits-360 photos;
3. history: --history-batches processed batches written straight into the bucket (ledger records,
   _READY markers, embeddings and rejects partitions, --history-rows random float32 vectors in all, and
   the fit sample the embed steps would have kept), then a refit over all of them: its planning tasks
   (XCom, EMR steps) and its PCA step's fit for real (`refit_fit_s`, the step's own `fit_seconds`),
   whose model every later run uses;
4. a no-op run (nothing new) with that history behind it;
5. the same --new-photos batch as in 2, with the history behind it;
6. --small-batches new batches of one photo each: the planning tasks of a run taking them all (XCom,
   EMR steps), and a real run of --small-run-batches of them (files per batch partition);
7. the Airflow-side validate task on a --validate-rows batch (synthetic outputs), in a child process,
   for its peak RSS.

S3 requests are counted by the server, by operation, for each whole run (Spark's requests included).
XCom sizes are read from the Airflow metadata database after each run. Step argument sizes are the
EMR steps (`fruits.emr.emr_steps`) built from each run's plan, as compute=emr would submit them.
Human-readable figures first (the DAG runs' own logs go to .cache/scale/dag-runs.log); the last line is
one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from functools import cache
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HOME = REPO / ".cache" / "scale"
SAMPLE = REPO.parent / "shared" / "data" / "fruits360-sample"
WEIGHTS = REPO.parent / "shared" / "models" / "mobilenet_v2" / "mobilenet_v2_1.0_224_no_top.h5"
WEIGHTS_KEY = "artifacts/models/mobilenet_v2_1.0_224_no_top.h5"
DIM = 1280
# AWS's AddJobFlowSteps limit on the strings of one step's HadoopJarStep.
STEP_ARG_LIMIT = 10_240
GOALS = {
    "noop_s3_requests": ("<=", 30),
    "noop_run_s": ("<", 30),
    "run_s3_requests_ratio": ("<=", 1.1),
    "new_batch_run_ratio": ("<=", 1.2),
    "max_xcom_bytes": ("<=", 65_536),
    "max_step_arg_chars": ("<=", STEP_ARG_LIMIT),
    "refit_fit_s": ("<=", 15),
    "validate_peak_rss_mb": ("<=", 400),
    "files_per_batch": ("<=", 1),
}


def say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _configure_env(endpoint: str) -> None:
    """Before Airflow is imported: a private Airflow home and S3 endpoint."""
    sys.path.insert(0, str(REPO / "scripts"))
    from devstack import local_stack_env

    os.environ.update(local_stack_env(HOME / "airflow", HOME / "work", endpoint))
    os.environ.setdefault("FRUITS_SPARK_MASTER", "local[2]")
    for p in (REPO / "plugins", REPO / "spark_jobs", REPO / "scripts"):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))


def start_s3(endpoint: str) -> subprocess.Popen:
    """The counting S3 server (scripts/counting_s3.py: moto, plus requests counted by operation)."""
    import urllib.request

    port = endpoint.rsplit(":", 1)[1]
    log = open(HOME / "s3.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "counting_s3.py"), "-H", "127.0.0.1", "-p", port],
        stdout=log,
        stderr=log,
    )
    for _ in range(100):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            return proc
        except Exception:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the counting S3 server did not start; see {HOME / 's3.log'}")


def use_bucket(name: str) -> None:
    os.environ["FRUITS_BUCKET"] = name


def hook():
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    return S3Hook(aws_conn_id="aws_default")


# --- buckets and photos ------------------------------------------------------------------------------
def new_bucket(name: str, artifacts_from: str | None = None) -> None:
    """An empty bucket with the weights (and, when given, the staged ONNX export) in place."""
    h = hook()
    h.create_bucket(bucket_name=name, region_name="eu-west-3")
    if artifacts_from:
        client = h.get_conn()
        for key in h.list_keys(artifacts_from, prefix="artifacts/") or []:
            # GET + PUT, not CopyObject: moto keeps a multipart upload's checksum on the copy, which then
            # fails the reader's checksum validation
            body = client.get_object(Bucket=artifacts_from, Key=key)["Body"].read()
            client.put_object(Bucket=name, Key=key, Body=body)
    else:
        h.load_file(str(WEIGHTS), WEIGHTS_KEY, name, replace=True)


def photos(n: int, offset: int = 0) -> list[Path]:
    """n real Training photos, spread over the varieties (round robin), stable order."""
    by_label = [sorted(d.iterdir()) for d in sorted((SAMPLE / "Training").iterdir()) if d.is_dir()]
    out: list[Path] = []
    i = offset
    while len(out) < n:
        files = by_label[i % len(by_label)]
        out.append(files[(i // len(by_label)) % len(files)])
        i += 1
    return out


def upload_batches(bucket: str, batches: dict[str, list[Path]]) -> None:
    """Each batch's photos under incoming/BATCH/LABEL/, then its _READY marker."""
    client = hook().get_conn()
    puts = [
        (f"incoming/{b}/{p.parent.name}/{p.name}", p.read_bytes()) for b, ps in batches.items() for p in ps
    ]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), puts))
        list(
            pool.map(
                lambda b: client.put_object(Bucket=bucket, Key=f"incoming/{b}/_READY", Body=b""), batches
            )
        )


# --- synthetic history -------------------------------------------------------------------------------
def history_vectors(rng, rows: int):
    """Random float32 vectors whose variance falls off as a power law (as MobileNetV2's do), non-negative
    like the network's pooled ReLU6 outputs."""
    import numpy as np

    scale = (np.arange(1, DIM + 1) ** -0.63).astype(np.float32)
    return np.abs(rng.normal(size=(rows, DIM)).astype(np.float32) * scale)


FIT_SAMPLE_ROWS = 30_000  # spark_jobs/pca.py's default fit sample size


def _h(path: str) -> float:
    """A hash of the path in [0, 1). The job uses Spark's xxhash64; which hash chose the history's
    sample rows does not change what the fit reads (scripts/fit_bench.py does the same)."""
    return int(hashlib.sha1(path.encode()).hexdigest()[:15], 16) / 16**15


def build_history(bucket: str, batches: int, rows: int, model_id: str, seed: int = 11) -> dict[str, int]:
    """`batches` processed batches, `rows` embeddings in all, as a long-running bucket holds them: for each,
    the _READY marker (the photos themselves are not needed), one embeddings file and a ledger record.
    Every 10th batch also has one reject. Plus the fit sample the embed steps would have kept for that
    history (samples/fit/, the bottom FIT_SAMPLE_ROWS rows by a hash of the path, named by
    samples/LATEST.json). Returns {what: objects written}."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    client = hook().get_conn()
    per_batch = [rows // batches + (1 if i < rows % batches else 0) for i in range(batches)]
    labels = sorted(d.name for d in (SAMPLE / "Training").iterdir() if d.is_dir())

    def one(i: int) -> int:
        b = f"hist-{i:05d}"
        n = per_batch[i]
        vec = history_vectors(np.random.default_rng(seed * 100_003 + i), n)
        paths = [f"s3://{bucket}/incoming/{b}/{labels[j % len(labels)]}/{j:05d}.jpg" for j in range(n)]
        hs = [_h(p) for p in paths]
        with lock:  # a generous cut, trimmed to the bottom FIT_SAMPLE_ROWS at the end
            candidates.extend(
                (h, p, b, labels[j % len(labels)], vec[j])
                for j, (h, p) in enumerate(zip(hs, paths, strict=True))
                if h < cut
            )
        table = pa.table(
            {
                "path": paths,
                "label": [labels[j % len(labels)] for j in range(n)],
                "content_sha256": [f"{i:08x}{j:056x}" for j in range(n)],
                "size_bytes": pa.array([7000] * n, pa.int64()),
                "embedding": pa.FixedSizeListArray.from_arrays(vec.reshape(-1), DIM).cast(
                    pa.list_(pa.float32())
                ),
                "model_id": [model_id] * n,
                "engine": ["onnx"] * n,
            }
        )
        buf = io.BytesIO()
        pq.write_table(table, buf)
        client.put_object(
            Bucket=bucket, Key=f"embeddings/batch_id={b}/part-00000.parquet", Body=buf.getvalue()
        )
        rejected = 1 if i % 10 == 0 else 0
        if rejected:
            rej = pa.table(
                {
                    "path": [f"s3://{bucket}/incoming/{b}/{labels[0]}/broken.jpg"],
                    "label": [labels[0]],
                    "content_sha256": [None],
                    "size_bytes": pa.array([0], pa.int64()),
                    "reason": ["empty file (0 bytes)"],
                },
                schema=pa.schema(
                    [
                        ("path", pa.string()),
                        ("label", pa.string()),
                        ("content_sha256", pa.string()),
                        ("size_bytes", pa.int64()),
                        ("reason", pa.string()),
                    ]
                ),
            )
            buf = io.BytesIO()
            pq.write_table(rej, buf)
            client.put_object(
                Bucket=bucket, Key=f"rejects/batch_id={b}/part-00000.parquet", Body=buf.getvalue()
            )
        client.put_object(Bucket=bucket, Key=f"incoming/{b}/_READY", Body=b"")
        record = {
            "batch_id": b,
            "files": n + rejected,
            "embedded": n,
            "rejected": rejected,
            "labels": {},
            "ignored_hidden_files": [],
            "model_id": model_id,
            "pca_version": None,
            "embeddings": f"s3://{bucket}/embeddings/batch_id={b}/",
            "rejects": f"s3://{bucket}/rejects/batch_id={b}/",
            "run_id": "history",
            "processed_at": "2024-01-01T00:00:00+00:00",
            "updated_at": "2024-01-01T00:00:00+00:00",
        }
        client.put_object(Bucket=bucket, Key=f"ledger/batches/{b}.json", Body=json.dumps(record).encode())
        return 3 + rejected

    lock = threading.Lock()
    candidates: list[tuple[float, str, str, str, Any]] = []
    cut = min(1.0, 1.5 * FIT_SAMPLE_ROWS / max(rows, 1))
    with ThreadPoolExecutor(8) as pool:
        written = sum(pool.map(one, range(batches)))
    candidates.sort(key=lambda r: (r[0], r[1]))
    kept = candidates[:FIT_SAMPLE_ROWS]
    n = len(kept)
    sample = pa.table(
        {
            "batch_id": [r[2] for r in kept],
            "path": [r[1] for r in kept],
            "label": [r[3] for r in kept],
            "embedding": pa.FixedSizeListArray.from_arrays(
                np.stack([r[4] for r in kept]).reshape(-1), DIM
            ).cast(pa.list_(pa.float32())),
            "stratum": ["all"] * n,
            "h": [r[0] for r in kept],
        }
    )
    buf = io.BytesIO()
    pq.write_table(sample, buf)
    client.put_object(Bucket=bucket, Key="samples/fit/run=history/part-00000.parquet", Body=buf.getvalue())
    state = {
        "base": [f"s3://{bucket}/samples/fit/run=history"],
        "deltas": [],
        "threshold": {"all": kept[-1][0] if n >= FIT_SAMPLE_ROWS else None},
        "size": FIT_SAMPLE_ROWS,
        "rows": n,
    }
    client.put_object(Bucket=bucket, Key="samples/LATEST.json", Body=json.dumps({"fit": state}).encode())
    return {"batches": batches, "rows": rows, "objects": written + 2, "fit_sample_rows": n}


# --- measuring runs ----------------------------------------------------------------------------------
def run_dag(conf: dict[str, Any] | None = None) -> dict[str, Any]:
    """One whole DAG run in this process (dag.test), with its S3 requests, XCom sizes and task states."""
    import devstack
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from counting_s3 import read_counts

    dag = DagBag(dag_folder=str(REPO / "dags")).get_dag("fruits_embeddings")
    endpoint = devstack.s3_endpoint()
    read_counts(endpoint, reset=True)
    t0 = time.monotonic()
    # Task logs to one file, open for the whole bench (Airflow's logger keeps the stream it first saw).
    with redirect_stdout(_dag_log()), redirect_stderr(_dag_log()):
        dagrun = dag.test(run_conf=conf or {})
    seconds = time.monotonic() - t0
    requests = read_counts(endpoint)["s3"]
    with create_session() as session:
        tis = session.query(TaskInstance).filter(TaskInstance.run_id == dagrun.run_id).all()
        states = {ti.task_id: str(getattr(ti.state, "value", ti.state)) for ti in tis}
        durations = {ti.task_id: round(ti.duration or 0.0, 1) for ti in tis}
        xcoms = (
            session.query(XComModel.task_id, XComModel.key, XComModel.value)
            .filter(XComModel.dag_id == dag.dag_id, XComModel.run_id == dagrun.run_id)
            .all()
        )
    sizes: dict[str, int] = {}
    values: dict[str, Any] = {}
    for task_id, key, value in xcoms:
        text = value if isinstance(value, str | bytes) else json.dumps(value)
        name = f"{task_id}:{key}"
        sizes[name] = len(text)
        values[name] = value
    state = str(getattr(dagrun.state, "value", dagrun.state))
    return {
        "run_id": dagrun.run_id,
        "state": state,
        "seconds": round(seconds, 1),
        "s3_requests": sum(requests.values()),
        "s3_by_operation": dict(sorted(requests.items(), key=lambda kv: -kv[1])),
        "tasks": states,
        "task_seconds": durations,
        "xcom_bytes": sizes,
        "xcom_values": values,
    }


@cache
def _dag_log():
    return open(HOME / "dag-runs.log", "a", buffering=1)  # noqa: SIM115  (closed at exit)


def _plan_of(run: dict[str, Any]) -> dict[str, Any] | None:
    value = run["xcom_values"].get("plan_run:return_value")
    if isinstance(value, str | bytes):
        value = json.loads(value)
    return value


def step_arg_chars(plan: dict[str, Any]) -> dict[str, int]:
    """Characters of each EMR step's HadoopJarStep strings (Jar + Args), as AddJobFlowSteps counts them,
    for this run's plan submitted with compute=emr (staged URIs of the real shape)."""
    from fruits import emr
    from fruits.config import settings

    s = settings()
    digest = "0123456789ab"
    staged = {
        "scripts": {step: f"s3://{s.bucket}/artifacts/jobs/{digest}/{step}.py" for step in emr.STEPS},
        "py_files": f"s3://{s.bucket}/artifacts/jobs/{digest}/fruits_jobs.zip",
        "weights": f"s3://{s.bucket}/artifacts/models/{digest}/mobilenet_v2_1.0_224_no_top.h5",
        "bootstrap": f"s3://{s.bucket}/artifacts/bootstrap/{digest}/install_python_deps.sh",
        "requirements": f"s3://{s.bucket}/artifacts/bootstrap/{digest}/requirements-emr.txt",
    }
    out = {}
    for step in emr.emr_steps(plan, staged, s):
        jar = step["HadoopJarStep"]
        out[step["Name"]] = len(jar["Jar"]) + sum(len(a) for a in jar["Args"])
    return out


def describe(name: str, run: dict[str, Any]) -> None:
    top = ", ".join(f"{k} {v}" for k, v in list(run["s3_by_operation"].items())[:8])
    say(f"{name}: {run['state']} in {run['seconds']} s, {run['s3_requests']} S3 requests ({top})")
    slow = sorted(run["task_seconds"].items(), key=lambda kv: -kv[1])[:6]
    say(f"   slowest tasks: {', '.join(f'{t} {s} s' for t, s in slow)}")
    biggest = max(run["xcom_bytes"].items(), key=lambda kv: kv[1], default=("none", 0))
    say(f"   largest XCom: {biggest[0]} {biggest[1]:,} bytes")


def files_per_partition(bucket: str, prefix: str) -> dict[str, int]:
    """Parquet files per batch partition under a table prefix."""
    counts: dict[str, int] = {}
    for key in hook().list_keys(bucket, prefix=prefix) or []:
        if key.endswith(".parquet"):
            part = key[len(prefix) :].split("/", 1)[0]
            counts[part] = counts.get(part, 0) + 1
    return counts


def plan_only(bucket: str, run_id: str, conf: dict[str, Any]) -> dict[str, Any]:
    """A run's planning tasks as the DAG calls them, with compute=emr: every XCom value they return and
    the EMR steps built from the plan (not submitted). The claims are released afterwards."""
    from datetime import timedelta

    from fruits import plan as planning
    from fruits.catalog import Catalog
    from fruits.config import settings
    from fruits.layout import Layout

    s = settings()
    catalog = Catalog(hook(), Layout(bucket))
    params = planning.parse_params({"compute": "emr", **conf}, s)
    planning.preflight(catalog, params)
    found = planning.find_batches(catalog, params, run_id)
    assert found is not None, "nothing to plan"
    claimed = planning.claim_batches(catalog, found, run_id, timedelta(hours=1))
    try:
        batches = planning.claimed_batches(catalog, claimed)
        plan = planning.build_plan(catalog, params, batches, run_id, s, found=found)
    finally:
        planning.release_claims(catalog, claimed, run_id)
    values = {"find_new_batches": found, "claim_batches": claimed, "plan_run": plan}
    return {
        "plan": plan,
        "batches": len(batches),
        "xcom_bytes": {k: len(json.dumps(v)) for k, v in values.items()},
        "step_arg_chars": step_arg_chars(plan),
    }


def refit_over_history(bucket: str) -> dict[str, Any]:
    """A refit over every processed batch: its planning tasks (XCom values, EMR steps) as plan_only, then
    its PCA step for real on the local Spark (spark-submit, as the DAG's pca task runs it), fitting from
    the history's fit sample and transforming one batch. The re-transform of every batch is Spark work
    that grows with the history by design; it is measured on a smaller history (docs/scale.md). The new
    version becomes CURRENT.json, as commit would make it, for the runs that follow."""
    import logging
    from datetime import UTC, datetime

    from fruits.catalog import Catalog
    from fruits.config import settings
    from fruits.layout import Layout
    from fruits.local_compute import run_local_step

    s = settings()
    catalog = Catalog(hook(), Layout(bucket))
    planned = plan_only(bucket, "manual__scale-refit", {"refit": True})
    plan = planned["plan"]
    keys = plan["keys"]
    batches = catalog.read_run_file(keys["pca_batches.json"])
    catalog.write_run_file(keys["pca_batches.json"], {"fit": batches["fit"], "transform": batches["fit"][:1]})
    log = logging.getLogger("scale.refit")
    log.addHandler(logging.StreamHandler(_dag_log()))
    t0 = time.monotonic()
    run_local_step("pca", plan["pca_args"], s, log)
    step_s = time.monotonic() - t0
    metrics = catalog.read_run_file(catalog.layout.run_file(plan["run_id"], "pca.json"))
    meta = catalog.pca_metadata(plan["pca"]["version"])
    catalog.write_json(
        catalog.layout.pca_current,
        {
            "version": meta["version"],
            "k": meta["k"],
            "set_at": datetime.now(UTC).isoformat(),
            "run_id": "scale",
        },
    )
    return {
        "planned": planned,
        "refit_batches": len(batches["fit"]),
        "refit_fit_s": metrics.get("fit_seconds"),
        "refit_fit_rows": meta.get("fit_rows"),
        "refit_fit_sample": meta.get("fit_sample"),
        "refit_pca_step_s": round(step_s, 1),
        "refit_k": meta.get("k"),
    }


# --- the validate task's memory ----------------------------------------------------------------------
def validate_rss(bucket: str, rows: int) -> dict[str, Any]:
    """Peak RSS (VmHWM) of the Airflow-side validation of one batch of `rows` rows, in a child process that
    imports what the task imports: the outputs as the steps write them (Parquet files of 20,000 rows, and
    the steps' validation files), made by scripts/validate_rss.py's write_run."""
    import validate_rss as vr

    plan = vr.write_run(hook().get_conn(), bucket, "runs/validate-rss/", {"validate-rss": rows}, k=191)
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'plugins'}:{REPO / 'spark_jobs'}"}
    proc = subprocess.run(
        [sys.executable, "-c", vr.MEASURE, json.dumps(plan), bucket], capture_output=True, text=True, env=env
    )
    if proc.returncode:
        raise RuntimeError(f"validate child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--history-batches", type=int, default=5000)
    ap.add_argument("--history-rows", type=int, default=200_000)
    ap.add_argument("--new-photos", type=int, default=200)
    ap.add_argument("--small-batches", type=int, default=1000, help="new batches planned in one run")
    ap.add_argument("--small-run-batches", type=int, default=100, help="of them, run for real in one run")
    ap.add_argument("--validate-rows", type=int, default=100_000)
    ap.add_argument("--skip", default="", help="comma list of: empty,refit,noop,new,small,validate")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    endpoint = f"http://127.0.0.1:{_free_port()}"
    _configure_env(endpoint)
    HOME.mkdir(parents=True, exist_ok=True)
    server = start_s3(endpoint)
    figures: dict[str, Any] = {"machine": f"{os.cpu_count()} cores", "load_1min_start": os.getloadavg()[0]}
    runs: dict[str, dict[str, Any]] = {}
    planned: dict[str, dict[str, Any]] = {}
    # compute=emr plans need a subnet (plan.parse_params); they are built here, never launched
    os.environ.setdefault("FRUITS_EMR_SUBNET_ID", "subnet-0123456789abcdef0")
    try:
        subprocess.run(
            [str(Path(sys.executable).parent / "airflow"), "db", "reset", "-y"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        from fruits import plan as planning

        new_batch = photos(args.new_photos)

        say("warm-up: one small run in a scratch bucket (imports, JVM, the ONNX export, staged once)")
        use_bucket("scale-warmup")
        new_bucket("scale-warmup")
        upload_batches("scale-warmup", {"warmup": photos(24, offset=args.new_photos)})
        runs["warmup"] = run_dag()
        describe("warm-up", runs["warmup"])
        weights_sha = hook().list_keys("scale-warmup", prefix="artifacts/models/")  # staged export
        say(f"   staged artifacts copied to each bucket: {len(weights_sha)} objects")

        if "empty" not in skip:
            use_bucket("scale-empty")
            new_bucket("scale-empty", artifacts_from="scale-warmup")
            upload_batches("scale-empty", {"new-200": new_batch})
            runs["empty"] = run_dag()
            describe(f"empty bucket, 1 new batch of {args.new_photos} photos", runs["empty"])

        use_bucket("scale-history")
        new_bucket("scale-history", artifacts_from="scale-warmup")
        from fruits.catalog import sha256_stream

        with open(WEIGHTS, "rb") as f:
            model_id = planning.model_id_for(sha256_stream(f))
        t0 = time.monotonic()
        built = build_history("scale-history", args.history_batches, args.history_rows, model_id)
        say(f"history: {built} in {time.monotonic() - t0:.0f} s")
        refit = refit_over_history("scale-history")
        planned["refit"] = refit["planned"]
        figures.update({k: v for k, v in refit.items() if k != "planned"})
        say(
            f"refit over {args.history_batches} batches: fit {refit['refit_fit_s']} s on {refit['refit_fit_rows']} rows"
        )

        if "noop" not in skip:
            runs["noop"] = run_dag()
            describe(f"no-op with {args.history_batches} batches behind it", runs["noop"])
            figures["noop_s3_requests"] = runs["noop"]["s3_requests"]
            figures["noop_run_s"] = runs["noop"]["seconds"]

        if "new" not in skip:
            upload_batches("scale-history", {"new-200": new_batch})
            runs["new"] = run_dag()
            describe(f"history, 1 new batch of {args.new_photos} photos", runs["new"])
            if "empty" in runs:
                figures["run_s3_requests_ratio"] = round(
                    runs["new"]["s3_requests"] / runs["empty"]["s3_requests"], 3
                )
                figures["new_batch_run_ratio"] = round(runs["new"]["seconds"] / runs["empty"]["seconds"], 3)
                figures["run_s3_requests"] = {
                    "empty": runs["empty"]["s3_requests"],
                    "history": runs["new"]["s3_requests"],
                }
                figures["new_batch_run_s"] = {
                    "empty": runs["empty"]["seconds"],
                    "history": runs["new"]["seconds"],
                }

        if "small" not in skip:
            # The planning tasks of a run that takes --small-batches new batches at once (XCom values and
            # the EMR steps, built and not submitted), then a real run of --small-run-batches of them.
            small = {f"small-{i:04d}": photos(1, offset=i) for i in range(args.small_batches)}
            upload_batches("scale-history", small)
            planned["small"] = plan_only(
                "scale-history", "manual__scale-plan-small", {"max_images_per_run": 0}
            )
            # the real run takes the oldest --small-run-batches (all _READY at about the same time)
            cap = {"max_images_per_run": args.small_run_batches}
            runs["small"] = run_dag(cap)
            describe(
                f"{args.small_run_batches} of the {args.small_batches} new batches in one run", runs["small"]
            )
            per_part = files_per_partition("scale-history", "embeddings/")
            small_parts = {k: v for k, v in per_part.items() if k.startswith("batch_id=small-")}
            figures["files_per_batch"] = max(small_parts.values(), default=None)
            figures["small_batch_partitions"] = len(small_parts)

        measured = {k: v for k, v in runs.items() if k in ("empty", "new", "small")}
        xcom_by_run = {k: max(r["xcom_bytes"].values(), default=0) for k, r in measured.items()}
        xcom_by_run |= {f"{k} (planning tasks)": max(v["xcom_bytes"].values()) for k, v in planned.items()}
        figures["max_xcom_bytes"] = max(xcom_by_run.values(), default=None)
        figures["xcom_by_run"] = xcom_by_run
        arg_chars = {}
        for name, r in measured.items():
            plan = _plan_of(r)
            if plan:
                arg_chars[name] = step_arg_chars(plan)
        arg_chars |= {f"{k} (planning tasks)": v["step_arg_chars"] for k, v in planned.items()}
        figures["step_arg_chars"] = arg_chars
        figures["max_step_arg_chars"] = max((c for v in arg_chars.values() for c in v.values()), default=None)

        if "validate" not in skip:
            rss = validate_rss("scale-history", args.validate_rows)
            figures["validate_peak_rss_mb"] = rss["peak_rss_mb"]
            figures["validate_rss_before_mb"] = rss["rss_before_validate_mb"]
            say(f"validate on a {args.validate_rows:,}-row batch: {rss['peak_rss_mb']} MB peak RSS")
    finally:
        server.terminate()
        server.wait(10)

    figures["runs"] = {
        k: {"state": r["state"], "seconds": r["seconds"], "s3_requests": r["s3_requests"]}
        for k, r in runs.items()
    }
    figures["s3_by_operation"] = {k: r["s3_by_operation"] for k, r in runs.items()}
    figures["load_1min_end"] = os.getloadavg()[0]
    print()
    failed = [k for k, r in runs.items() if r["state"] != "success"]
    for key, (op, goal) in GOALS.items():
        value = figures.get(key)
        ok = value is not None and (value <= goal if op == "<=" else value < goal)
        print(f"{key:24} {value!s:>12}   goal {op} {goal:<8} {'met' if ok else 'MISSED'}")
    if failed:
        print(f"runs that did not succeed: {failed}")
    print(json.dumps(figures, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
