"""Every way out the pipeline advises, followed literally, leads to a run that succeeds with the right data.

Real: the local S3 server on localhost, Airflow (dag.test() over the migrated SQLite DB) running the real
DAG, spark-submit on local Spark with the real weights and Fruits-360 photos, and `make stage-weights`
run as a user would run it. Each test damages the bookkeeping as a careless hand or a lost object would,
reads the advice from the error the pipeline raises, does exactly what it says, and checks the outputs
read back from S3.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
from conftest import (
    BUCKET,
    REPO,
    fresh_bucket,
    list_keys,
    read_json,
    read_parquet,
    run_dag,
    s3_hook,
    sample_files,
    upload_sample,
)
from fruits.catalog import Catalog, CatalogError
from fruits.config import settings
from fruits.layout import Layout
from fruits.plan import ParamError, parse_params, preflight

WEIGHTS_KEY = "artifacts/models/mobilenet_v2_1.0_224_no_top.h5"


def catalog() -> Catalog:
    return Catalog(s3_hook(), Layout(BUCKET))


def succeeded(dagrun) -> bool:
    return str(dagrun.state).endswith("success")


def advice(exc_type: type[Exception], conf: dict | None = None) -> str:
    """What check_params would say for this conf: the message a user reads in the task log."""
    with pytest.raises(exc_type) as exc:
        preflight(catalog(), parse_params(conf or {}, settings()))
    return str(exc.value)


def first_run(batch: str, n: int = 3) -> int:
    files = sample_files("Training", labels=2, per_label=n)
    upload_sample(batch, files)
    assert succeeded(run_dag())
    return len(files)


def test_lost_ledger_force_rerun_as_advised_rebuilds_it(airflow_db, s3_server):
    fresh_bucket()
    n = first_run("kept")
    record = read_json("ledger/batches/kept.json")
    s3_hook().delete_objects(BUCKET, ["ledger/batches/kept.json"])

    message = advice(CatalogError)
    assert "the ledger was lost" in message
    conf = json.loads(re.search(r"--conf '(\{.*?\})'", message).group(1))  # the command it prints
    assert conf == {"force": True, "batch_ids": ["kept"]}

    assert succeeded(run_dag(conf))
    rebuilt = read_json("ledger/batches/kept.json")
    assert (rebuilt["files"], rebuilt["embedded"], rebuilt["rejected"]) == (n, n, 0)
    assert rebuilt["pca_version"] == record["pca_version"]  # transformed with the model it had
    assert read_parquet("embeddings/batch_id=kept/").num_rows == n
    features = read_parquet(f"features/pca_version={record['pca_version']}/batch_id=kept/")
    assert features.num_rows == n


def test_lost_model_refit_as_advised_fits_a_new_one(airflow_db, s3_server):
    fresh_bucket()
    n = first_run("before")
    old = read_json("models/pca/CURRENT.json")["version"]
    s3_hook().delete_objects(BUCKET, list_keys(f"models/pca/{old}/"))

    message = advice(CatalogError)
    assert f"names PCA version {old!r}" in message and "refit=true" in message
    assert succeeded(run_dag({"refit": True}))  # nothing new to embed: the refit alone is the run

    new = read_json("models/pca/CURRENT.json")["version"]
    assert new != old
    assert list_keys(f"models/pca/{new}/metadata.json")
    record = read_json("ledger/batches/before.json")
    assert record["pca_version"] == new
    assert read_parquet(f"features/pca_version={new}/batch_id=before/").num_rows == n
    preflight(catalog(), parse_params({}, settings()))  # the bookkeeping is whole again


def test_missing_weights_make_stage_weights_as_advised(airflow_db, s3_server):
    fresh_bucket()
    s3_hook().delete_objects(BUCKET, [WEIGHTS_KEY])
    files = sample_files("Training", labels=2, per_label=2)
    upload_sample("late-weights", files)

    message = advice(ParamError)
    assert f"weights file s3://{BUCKET}/{WEIGHTS_KEY} does not exist" in message
    command = re.search(r"on the local stack `([^`]+)`", message).group(1)
    assert command == "make stage-weights"
    done = subprocess.run(command.split(), cwd=REPO, env=os.environ, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert list_keys(WEIGHTS_KEY)

    assert succeeded(run_dag())
    assert read_parquet("embeddings/batch_id=late-weights/").num_rows == len(files)
