"""Shared fixtures. Everything here is real: a moto S3 server process on localhost, an Airflow metadata
database (SQLite, migrated), the real DAG run with dag.test(), and spark-submit on a local Spark.

Environment is set at import time, before Airflow is imported anywhere, because Airflow reads its
configuration once.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import TextIO

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SAMPLE = SHARED / "data" / "fruits360-sample"
WEIGHTS = SHARED / "models" / "mobilenet_v2" / "mobilenet_v2_1.0_224_no_top.h5"
BUCKET = "fruits-test"
ARTIFACTS = REPO / "test-artifacts"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_PORT = _free_port()
ENDPOINT = f"http://127.0.0.1:{S3_PORT}"
_HOME = Path(tempfile.mkdtemp(prefix="fruits-airflow-"))
sys.path.insert(0, str(REPO / "scripts"))
from devstack import local_stack_env, s3_endpoint  # noqa: E402  (the stack's environment, shared)

os.environ.update(
    {
        **local_stack_env(_HOME, _HOME / "work", ENDPOINT),
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "eu-west-3",
        "FRUITS_BUCKET": BUCKET,
        "FRUITS_SPARK_MASTER": "local[2]",
        "FRUITS_SPARK_JARS_DIR": os.environ.get("FRUITS_SPARK_JARS_DIR", str(REPO / ".cache" / "jars")),
    }
)
for p in (REPO / "plugins", REPO / "spark_jobs", REPO / "dags"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


# The modules longest first (seconds of each under `make test`, three workers on two cores, measured
# 2026-12-08). `make test` runs pytest-xdist with --dist loadfile (a module's fixtures build one history
# for its tests): a worker takes the next module when it has two tests of its current one left, so the
# long modules go first and the short ones fill in at the end. A module missing here runs after these, in
# name order; one that grows past its neighbours belongs higher up. The order before this one left 80 s
# at the end with one worker running (745 s in all; 675 s with this order, same machine).
LONGEST_FIRST = (
    "test_recovery.py",  # ~330 s
    "test_scale.py",  # ~275 s
    "test_emr.py",  # ~260 s
    "test_faults.py",  # ~220 s
    "test_engines.py",  # ~200 s
    "test_scale_outputs.py",  # ~190 s
    "test_pipeline.py",  # ~145 s
    "test_ui_stack.py",  # ~120 s
    "test_samples.py",  # ~95 s
    "test_hostile_batch.py",  # ~75 s
    "test_sparkio.py",  # ~30 s
    "test_aws_check.py",  # ~30 s
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order the modules longest first; the tests inside a module keep their order (a stable sort)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real moto S3/EMR server process on localhost, counting the requests it serves by operation
    (scripts/counting_s3.py: s3_requests() reads the counts)."""
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "counting_s3.py"), "-H", "127.0.0.1", "-p", str(S3_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 90  # importing moto takes a while on a busy machine
    while True:
        try:
            urllib.request.urlopen(f"{ENDPOINT}/moto-api/", timeout=1)
            break
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("the local S3 server did not start") from None
            time.sleep(0.2)
    yield ENDPOINT
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated SQLite metadata database for dag.test()."""
    subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), "db", "migrate"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return _HOME


def s3_requests(reset: bool = False) -> dict:
    """What the S3 server has served since the last reset: {"total", "s3": {operation: n}, "other"}."""
    from counting_s3 import read_counts

    return read_counts(s3_endpoint(), reset=reset)


def reset_s3() -> None:
    # The connection in force: a test module may point it at its own moto server (tests/test_emr.py).
    req = urllib.request.Request(f"{s3_endpoint()}/moto-api/reset", method="POST")
    urllib.request.urlopen(req, timeout=10)


def s3_hook():
    """The amazon provider's S3Hook on the connection in force (one per connection: building a client costs
    a few hundred ms, and the tests read S3 often)."""
    return _hook_for(os.environ.get("AIRFLOW_CONN_AWS_DEFAULT", ""))


@functools.cache
def _hook_for(connection: str):
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    hook = S3Hook(aws_conn_id="aws_default")
    hook.get_conn()  # the client, built once and kept by the hook
    return hook


def fresh_bucket() -> str:
    """Reset the S3 server; an empty bucket in eu-west-3 with the real MobileNetV2 weights staged, as
    `make demo` does."""
    reset_s3()
    hook = s3_hook()
    hook.create_bucket(bucket_name=BUCKET, region_name="eu-west-3")
    hook.load_file(str(WEIGHTS), "artifacts/models/mobilenet_v2_1.0_224_no_top.h5", BUCKET, replace=True)
    return BUCKET


def weights_model_id() -> str:
    """The model_id of the weights the tests stage, by the plan's own formula (plan.model_id_for)."""
    import hashlib

    from fruits.plan import model_id_for

    return model_id_for(hashlib.sha256(WEIGHTS.read_bytes()).hexdigest())


def save_bucket() -> dict[str, bytes]:
    """Every object of the test bucket, in memory: a small processed history (a few MB), so that tests
    which each need one pay for its DAG runs once, then restore_bucket() it."""
    client = s3_hook().get_conn()
    return {key: client.get_object(Bucket=BUCKET, Key=key)["Body"].read() for key in snapshot()}


def restore_bucket(saved: dict[str, bytes]) -> None:
    """A fresh S3 server state holding exactly the saved objects."""
    reset_s3()
    hook = s3_hook()
    hook.create_bucket(bucket_name=BUCKET, region_name="eu-west-3")
    client = hook.get_conn()
    for key, data in saved.items():
        client.put_object(Bucket=BUCKET, Key=key, Body=data)
    assert set(snapshot()) == set(saved)


@pytest.fixture(scope="module")
def bucket(s3_server: str) -> str:
    """A fresh bucket per test module (call fresh_bucket() for one per test)."""
    return fresh_bucket()


def sample_files(split: str = "Training", labels: int = 3, per_label: int = 6, offset: int = 0) -> list[Path]:
    """Real Fruits-360 files: the first `labels` varieties, `per_label` images each (sorted, stable)."""
    out: list[Path] = []
    for label_dir in sorted(p for p in (SAMPLE / split).iterdir() if p.is_dir())[:labels]:
        out += sorted(label_dir.iterdir())[offset : offset + per_label]
    return out


def upload(batch_id: str, files: dict[str, bytes | Path], ready: bool = True) -> None:
    """Upload {relative key: content or path} under incoming/BATCH/, then _READY last."""
    hook = s3_hook()
    for rel, content in files.items():
        key = f"incoming/{batch_id}/{rel}"
        if isinstance(content, Path):
            hook.load_file(str(content), key, BUCKET, replace=True)
        else:
            hook.load_bytes(content, key, BUCKET, replace=True)
    if ready:
        hook.load_string("", f"incoming/{batch_id}/_READY", BUCKET, replace=True)


def upload_sample(batch_id: str, files: list[Path], ready: bool = True) -> None:
    upload(batch_id, {f"{p.parent.name}/{p.name}": p for p in files}, ready)


def get_dag():
    """The DAG as parsed under the environment in force (its Param defaults read FRUITS_* settings)."""
    return _dag_for(
        tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(("FRUITS_", "AIRFLOW"))))
    )


@functools.cache
def _dag_for(environment: tuple):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag.get_dag("fruits_embeddings")


def run_dag(conf: dict | None = None):
    """Run the real DAG once, in this process, like `airflow dags test`. Returns the DagRun.

    Each run's seconds per task go to test-artifacts/dag_runs.jsonl: where the suite's time goes."""
    started = time.monotonic()
    dagrun = get_dag().test(run_conf=conf or {})
    _record_run(dagrun, time.monotonic() - started)
    return dagrun


def _record_run(dagrun, seconds: float) -> None:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter(TaskInstance.run_id == dagrun.run_id).all()
        tasks = {
            f"{ti.task_id}[{ti.map_index}]" if ti.map_index >= 0 else ti.task_id: round(
                (ti.end_date - ti.start_date).total_seconds(), 1
            )
            for ti in tis
            if ti.start_date and ti.end_date
        }
    ARTIFACTS.mkdir(exist_ok=True)
    line = {"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], "seconds": round(seconds, 1)}
    with (ARTIFACTS / "dag_runs.jsonl").open("a") as out:
        out.write(json.dumps({**line, "state": str(dagrun.state), "tasks": tasks}) + "\n")


def task_states(dagrun) -> dict[str, str]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = (
            session.query(TaskInstance)
            .filter(TaskInstance.dag_id == dagrun.dag_id, TaskInstance.run_id == dagrun.run_id)
            .all()
        )
        return {ti.task_id: str(ti.state.value if hasattr(ti.state, "value") else ti.state) for ti in tis}


def list_keys(prefix: str) -> list[str]:
    return sorted(s3_hook().list_keys(BUCKET, prefix=prefix) or [])


def snapshot(prefix: str = "") -> dict[str, str]:
    """{key: ETag} under prefix: equal snapshots mean the same objects with the same bytes."""
    pages = s3_hook().get_conn().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


# The S3 operations that change a bucket (the counting server names them as the S3 API does).
WRITE_PREFIXES = ("Put", "Copy", "Delete", "Create", "Upload", "Complete", "Restore", "POST")


def writes_since_reset() -> dict[str, int]:
    """The write requests the S3 server has served since the last s3_requests(reset=True)."""
    served = s3_requests()["s3"]
    return {op: n for op, n in served.items() if op.startswith(WRITE_PREFIXES) and n}


def read_json(key: str) -> dict:
    return json.loads(s3_hook().read_key(key, BUCKET))


def read_parquet(prefix: str):
    """All Parquet files under prefix, as one pyarrow table (via the S3 hook)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    hook = s3_hook()
    tables = [
        pq.read_table(io.BytesIO(hook.get_key(k, BUCKET).get()["Body"].read()))
        for k in list_keys(prefix)
        if k.endswith(".parquet")
    ]
    return pa.concat_tables(tables) if tables else None


def plan_as_plan_run(conf: dict) -> dict:
    """check_params, find, claim and plan as the DAG's tasks do them (raising what check_params or
    plan_run would fail with), without a step: the claims are released whatever happens, as the run's
    teardown does."""
    from datetime import timedelta

    from fruits.catalog import Catalog
    from fruits.config import settings
    from fruits.layout import Layout
    from fruits.plan import (
        build_plan,
        claim_batches,
        claimed_batches,
        find_batches,
        parse_params,
        preflight,
        release_claims,
    )

    catalog, s = Catalog(s3_hook(), Layout(BUCKET)), settings()
    params = parse_params(conf, s)
    preflight(catalog, params)
    found = find_batches(catalog, params, "manual__probe")
    assert found is not None
    claimed = claim_batches(catalog, found, "manual__probe", timedelta(minutes=5))
    try:
        return build_plan(catalog, params, claimed_batches(catalog, claimed), "manual__probe", s, found=found)
    finally:
        release_claims(catalog, claimed, "manual__probe")


def assert_written_as_read(table, ddl: str) -> None:
    """A table as a step wrote it (pyarrow, from its partition files) has exactly the columns and types of
    the schema the steps read it with (fruits_jobs.tables.*_SCHEMA, Spark DDL), the partition column
    aside: a column written but not in the schema would be dropped on read, one missing read as null."""
    import pyarrow as pa

    def spark_type(t: pa.DataType) -> str:
        if pa.types.is_list(t):
            return f"array<{spark_type(t.value_type)}>"
        return {pa.string(): "string", pa.int64(): "long", pa.float32(): "float"}[t]

    expected = dict(column.split(" ", 1) for column in ddl.split(", "))
    expected.pop("batch_id")  # the partition column: in the folder names, not in the files
    assert {f.name: spark_type(f.type) for f in table.schema} == expected


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="module")
def spark():
    """A local Spark session in this process (local[2], no UI), for tests of the jobs' helpers, with the
    local steps' JVM options and adaptive execution off, as the steps run (fruits.tuning.local_tuning):
    the defaults cost this module's JVM 50 CPU-s where these cost 29 (test_samples + test_tables)."""
    from fruits.tuning import LOCAL_JVM_OPTIONS
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2]")
        .config("spark.sql.shuffle.partitions", "8")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.extraJavaOptions", LOCAL_JVM_OPTIONS)
        .config("spark.sql.adaptive.enabled", "false")
        .getOrCreate()
    )
    yield session
    session.stop()


class _Tee(io.TextIOBase):
    """Writes through to the stream it replaces and keeps a copy."""

    def __init__(self, stream: TextIO, copy: list[str]) -> None:
        self.stream, self.copy = stream, copy

    def write(self, text: str) -> int:
        self.copy.append(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")


@contextmanager
def captured_log() -> Iterator[list[str]]:
    """The task logs of a DAG run, as lines. In dag.test() Airflow prints them (structlog) to stdout or
    stderr, which are teed here; stdlib log records are kept too."""
    chunks: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            chunks.append(record.getMessage() + "\n")

    handler, root = Keep(level=logging.INFO), logging.getLogger()
    root.addHandler(handler)
    lines: list[str] = []
    try:
        with redirect_stdout(_Tee(sys.stdout, chunks)), redirect_stderr(_Tee(sys.stderr, chunks)):
            yield lines
    finally:
        root.removeHandler(handler)
        lines.extend("".join(chunks).splitlines())
