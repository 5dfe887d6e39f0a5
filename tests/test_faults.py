"""Faults, re-runs, concurrency, damaged bookkeeping and wrong parameters.

Real: moto S3 server on localhost, Airflow (dag.test() over the migrated SQLite DB, and `airflow dags test`
processes for the concurrency case), spark-submit on local Spark with the real weights and photos. The
damaged states (a garbage ledger record, a stale part file, a dangling model pointer) are written into the
real S3 server, as a crash or a careless hand would leave them.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from airflow.sdk.exceptions import ParamValidationError
from conftest import (
    BUCKET,
    fresh_bucket,
    list_keys,
    read_json,
    read_parquet,
    run_dag,
    s3_hook,
    s3_requests,
    sample_files,
    snapshot,
    task_states,
    upload_sample,
    writes_since_reset,
)
from fruits.catalog import Catalog, CatalogError
from fruits.config import settings
from fruits.layout import Layout
from fruits.plan import ParamError, parse_params, preflight


def catalog() -> Catalog:
    return Catalog(s3_hook(), Layout(BUCKET))


def failed(dagrun) -> bool:
    return str(dagrun.state).endswith("failed")


def test_run_dying_before_validation_is_redone_and_nothing_half_written_is_trusted(airflow_db, s3_server):
    fresh_bucket()
    files = sample_files("Training", labels=3, per_label=3)
    upload_sample("crashy", files)

    # A model pointer in place (as a commit writes it), so that "not moved" can fail: a refit ignores
    # the current model, fits a new one, and only a validated commit may point at it.
    pointer = json.dumps({"version": "pca-earlier", "k": 2}).encode()
    s3_hook().load_bytes(pointer, "models/pca/CURRENT.json", BUCKET, replace=True)
    etag = s3_hook().head_object("models/pca/CURRENT.json", BUCKET)["ETag"]

    # PCA fails (k above the 9 rows it can fit on) after embed has written its partition.
    broken = run_dag({"refit": True, "pca_mode": "fixed", "pca_k": 500})
    states = task_states(broken)
    assert failed(broken)
    assert (states["embed"], states["pca"]) == ("success", "failed")
    assert states["validate"] != "success" and states["commit"] != "success"
    assert not list_keys("ledger/batches/")
    assert s3_hook().head_object("models/pca/CURRENT.json", BUCKET)["ETag"] == etag  # not moved
    assert [k for k in list_keys("models/pca/") if k.endswith("metadata.json")] == []  # nothing loadable
    assert not list_keys("ledger/claims/")  # the teardown handed the batch back
    s3_hook().delete_objects(BUCKET, ["models/pca/CURRENT.json"])  # the seeded pointer named no model
    assert read_parquet("embeddings/batch_id=crashy/").num_rows == len(files)  # written, but not trusted

    # A crashed writer's leftover: a duplicate part file inside the partition.
    part = next(k for k in list_keys("embeddings/batch_id=crashy/") if k.endswith(".parquet"))
    s3_hook().copy_object(
        part, "embeddings/batch_id=crashy/part-99999-stale.c000.snappy.parquet", BUCKET, BUCKET
    )
    assert read_parquet("embeddings/batch_id=crashy/").num_rows > len(files)

    recovered = run_dag()
    assert str(recovered.state).endswith("success")
    emb = read_parquet("embeddings/batch_id=crashy/")
    paths = emb.column("path").to_pylist()
    assert len(paths) == len(set(paths)) == len(files)
    assert not any("stale" in k for k in list_keys("embeddings/"))
    record = read_json("ledger/batches/crashy.json")
    assert (record["files"], record["embedded"]) == (len(files), len(files))
    assert record["run_id"] == recovered.run_id


def _airflow_dags_test(home: Path, log: Path, migrated: Path) -> subprocess.Popen:
    """`airflow dags test` in its own home, on a copy of the session's migrated database (SQLite's backup
    API: a consistent copy, without paying for a second `airflow db migrate`)."""
    env = {**os.environ, "AIRFLOW_HOME": str(home)}
    airflow = str(Path(sys.executable).parent / "airflow")
    with sqlite3.connect(migrated / "airflow.db") as src, sqlite3.connect(home / "airflow.db") as dst:
        src.backup(dst)
    return subprocess.Popen(
        [airflow, "dags", "test", "fruits_embeddings"],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def test_two_runs_at_once_process_a_batch_once(airflow_db, s3_server, tmp_path):
    """Two schedulers with separate metadata databases (so max_active_runs cannot help): only the claim
    in S3 stands between them."""
    fresh_bucket()
    files = sample_files("Training", labels=2, per_label=3)
    upload_sample("contended", files)
    logs = [tmp_path / "run-a.log", tmp_path / "run-b.log"]
    homes = [tmp_path / "home-a", tmp_path / "home-b"]
    for h in homes:
        h.mkdir()
    procs = [_airflow_dags_test(h, lg, airflow_db) for h, lg in zip(homes, logs, strict=True)]
    codes = [p.wait(timeout=900) for p in procs]
    texts = [lg.read_text(errors="replace") for lg in logs]

    assert all("batches to process: ['contended']" in t for t in texts)  # both saw it as new
    winners = [t for t in texts if "fruits.embed: done:" in t]
    losers = [t for t in texts if "every batch is claimed by another run" in t]
    assert len(winners) == 1 and len(losers) == 1, codes
    assert sorted(codes) == [0, 0]
    assert read_parquet("embeddings/batch_id=contended/").num_rows == len(files)
    assert list_keys("ledger/batches/") == ["ledger/batches/contended.json"]
    assert not list_keys("ledger/claims/")


def test_claims_are_exclusive_reentrant_and_expire(s3_server):
    fresh_bucket()
    cat = catalog()
    hour = timedelta(hours=1)
    assert cat.claim("b", "run-a", hour)
    assert not cat.claim("b", "run-b", hour)  # live claim by another run
    assert cat.claim("b", "run-a", hour)  # a retried task of the same run keeps it
    cat.release("b", "run-b")  # not the owner: nothing happens
    assert read_json("ledger/claims/b.json")["run_id"] == "run-a"

    # A run that crashed long ago left its claim: it expires and can be taken over.
    past = datetime.now(UTC) - timedelta(minutes=5)
    cat.write_json("ledger/claims/b.json", {"run_id": "dead-run", "expires_at": past.isoformat()})
    assert cat.claim("b", "run-b", hour)
    assert read_json("ledger/claims/b.json")["run_id"] == "run-b"
    cat.release("b", "run-b")
    assert not list_keys("ledger/claims/")


def _seed_processed_state() -> None:
    """What a processed batch leaves behind, written by hand: a ledger record, a run summary, a pointer."""
    cat = catalog()
    cat.record_batch("old", {"batch_id": "old", "files": 1, "embedded": 1, "rejected": 0})
    cat.write_json("runs/manual__old/summary.json", {"batches": 1, "ledger": ["old"]})
    cat.write_json("models/pca/CURRENT.json", {"version": "pca-gone", "k": 2})


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("garbage_ledger_record", "is not valid JSON"),
        ("ledger_deleted", "the ledger s3://fruits-test/ledger/batches/ is empty but completed runs"),
        ("model_deleted", "names PCA version 'pca-gone', but the model"),
        ("pointer_deleted", "CURRENT.json is missing but 1 batch(es) are in the ledger"),
    ],
)
def test_damaged_bookkeeping_fails_fast_with_a_way_out(airflow_db, s3_server, damage, message):
    fresh_bucket()
    _seed_processed_state()
    hook = s3_hook()
    if damage == "garbage_ledger_record":
        hook.load_string("{not json", "ledger/batches/old.json", BUCKET, replace=True)
    elif damage == "ledger_deleted":
        hook.delete_objects(BUCKET, ["ledger/batches/old.json"])
    elif damage == "pointer_deleted":
        hook.delete_objects(BUCKET, ["models/pca/CURRENT.json"])
    upload_sample("new", sample_files("Training", labels=1, per_label=2))
    before = snapshot()

    with pytest.raises(CatalogError, match=re.escape(message)) as exc:
        preflight(catalog(), parse_params({}, settings()))
    # Each way out is a command to run (tests/test_recovery.py and test_scale.py follow them to a run
    # that succeeds): a restore from S3 versioning, and a trigger that rebuilds what was lost.
    assert "Restore it from S3 versioning: `aws s3api list-object-versions" in str(exc.value)
    assert "`airflow dags trigger fruits_embeddings --conf '{" in str(exc.value)

    s3_requests(reset=True)
    dagrun = run_dag()  # the real DAG stops at check_params: nothing claimed, computed or written
    states = task_states(dagrun)
    assert failed(dagrun) and states["check_params"] == "failed"
    assert all(states.get(t) != "success" for t in ("claim_batches", "embed", "commit"))
    # Nothing written: not one write request reached S3 (a rewrite with the same bytes counts too), and
    # every object is the one that was there, by ETag.
    assert writes_since_reset() == {}
    assert snapshot() == before


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ({"batch_ids": ["no-such-batch"]}, "unknown batch id(s) ['no-such-batch']"),
        ({"batch_ids": ["unready"]}, "have no _READY marker"),
        ({"pca_k": 2000}, "pca_k=2000 is outside [1, 1280]"),
        ({"variance_target": 1.5}, "variance_target=1.5 is outside (0, 1]"),
        ({"variance_target": 0}, "variance_target=0.0 is outside (0, 1]"),
        (
            {"weights_uri": "s3://fruits-test/nope/weights.h5"},
            "weights file s3://fruits-test/nope/weights.h5 does not exist",
        ),
        ({"region": "us-east-1"}, "region='us-east-1' is outside the EU"),
        ({"compute": "mainframe"}, "compute='mainframe' is unknown"),
    ],
)
def test_wrong_parameters_fail_fast_with_a_message(airflow_db, s3_server, conf, message):
    fresh_bucket()
    upload_sample("unready", sample_files("Training", labels=1, per_label=1), ready=False)
    with pytest.raises(ParamError) as exc:
        preflight(catalog(), parse_params(conf, settings()))
    assert message in str(exc.value)


def test_an_unready_batch_put_ready_as_advised_is_taken(airflow_db, s3_server):
    """The _READY refusal's two commands, followed literally (the put-object as boto3 makes it, the trigger
    conf parsed from the message): the marker is there and the batch gets past check_params and is taken."""
    from fruits.plan import find_batches

    fresh_bucket()
    upload_sample("unready", sample_files("Training", labels=1, per_label=2), ready=False)
    with pytest.raises(ParamError) as exc:
        preflight(catalog(), parse_params({"batch_ids": ["unready"]}, settings()))
    put = re.search(r"`aws s3api put-object --bucket (\S+) --key (\S+)`", str(exc.value))
    trigger = re.search(r"`airflow dags trigger fruits_embeddings --conf '(.+?)'`", str(exc.value))
    assert put and trigger, str(exc.value)
    s3_hook().get_conn().put_object(Bucket=put.group(1), Key=put.group(2))
    params = parse_params(json.loads(trigger.group(1)), settings())
    preflight(catalog(), params)
    found = find_batches(catalog(), params, "manual__probe")
    assert found is not None and (found["batches"], found["photos"]) == (1, 2)


def test_missing_bucket_fails_fast(airflow_db, s3_server, monkeypatch):
    fresh_bucket()
    monkeypatch.setenv("FRUITS_BUCKET", "no-such-bucket")
    s = settings()
    with pytest.raises(ParamError, match="bucket 'no-such-bucket' does not exist"):
        preflight(Catalog(s3_hook(), Layout(s.bucket)), parse_params({}, s))


def test_dag_refuses_bad_params_before_creating_anything(airflow_db, s3_server):
    """Through the real DAG: the Param schema refuses k > 1280 at trigger time; a semantic error (an
    unknown batch) fails check_params; neither claims, computes or writes anything."""
    fresh_bucket()
    upload_sample("real", sample_files("Training", labels=1, per_label=2))
    before = snapshot()
    s3_requests(reset=True)
    with pytest.raises(ParamValidationError, match="pca_k"):
        run_dag({"pca_k": 2000})
    dagrun = run_dag({"batch_ids": ["ghost"]})
    states = task_states(dagrun)
    assert failed(dagrun) and states["check_params"] == "failed"
    assert all(states.get(t) != "success" for t in ("find_new_batches", "claim_batches", "embed"))
    assert writes_since_reset() == {}
    assert snapshot() == before
