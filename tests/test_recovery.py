"""Every way out the pipeline advises, followed literally, leads to a run that succeeds with the right data.

Real: the local S3 server on localhost, Airflow (dag.test() over the migrated SQLite DB) running the real
DAG, spark-submit on local Spark with the real weights and Fruits-360 photos, and `make stage-weights`
run as a user would run it. Each test damages the bookkeeping as a careless hand or a lost object would,
reads the advice from the error the pipeline raises, does exactly what it says, and checks the outputs
read back from S3.
"""

from __future__ import annotations

import hashlib
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
    restore_bucket,
    run_dag,
    s3_hook,
    sample_files,
    save_bucket,
    task_states,
    upload_sample,
)
from fruits.catalog import Catalog, CatalogError
from fruits.config import settings
from fruits.layout import Layout
from fruits.plan import ParamError, parse_params, preflight

WEIGHTS_KEY = "artifacts/models/mobilenet_v2_1.0_224_no_top.h5"
KEPT = "kept"


def catalog() -> Catalog:
    return Catalog(s3_hook(), Layout(BUCKET))


def succeeded(dagrun) -> bool:
    return str(dagrun.state).endswith("success")


def advice(exc_type: type[Exception], conf: dict | None = None) -> str:
    """What check_params would say for this conf: the message a user reads in the task log."""
    with pytest.raises(exc_type) as exc:
        preflight(catalog(), parse_params(conf or {}, settings()))
    return str(exc.value)


@pytest.fixture(scope="module")
def history(airflow_db, s3_server) -> dict:
    """One processed batch (a real DAG run), saved once; each test restores it, then damages it."""
    fresh_bucket()
    files = sample_files("Training", labels=2, per_label=3)
    upload_sample(KEPT, files)
    assert succeeded(run_dag())
    return {"objects": save_bucket(), "files": len(files)}


def from_history(history: dict) -> int:
    restore_bucket(history["objects"])
    return history["files"]


def test_lost_ledger_force_rerun_as_advised_rebuilds_it(history):
    n = from_history(history)
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


def test_lost_model_refit_as_advised_fits_a_new_one(history):
    n = from_history(history)
    old = read_json("models/pca/CURRENT.json")["version"]
    s3_hook().delete_objects(BUCKET, list_keys(f"models/pca/{old}/"))

    message = advice(CatalogError)
    assert f"names PCA version {old!r}" in message and "refit=true" in message
    assert succeeded(run_dag({"refit": True}))  # nothing new to embed: the refit alone is the run

    new = read_json("models/pca/CURRENT.json")["version"]
    assert new != old
    assert list_keys(f"models/pca/{new}/metadata.json")
    record = read_json(f"ledger/batches/{KEPT}.json")
    assert record["pca_version"] == new
    assert read_parquet(f"features/pca_version={new}/batch_id={KEPT}/").num_rows == n
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


def test_other_weights_never_mix_into_one_pca_and_the_advice_works(history):
    """A run pointed at other weights (another file, other bytes: another model_id) is refused before any
    step runs, for the transform with the current model and for a refit; setting the weights back, as the
    message says, processes the new batch with the model of the history."""
    n = from_history(history)
    pointer = read_json("models/pca/CURRENT.json")
    hook = s3_hook()
    other_key = "artifacts/models/other/mobilenet_v2_1.0_224_no_top.h5"
    weights = hook.get_key(WEIGHTS_KEY, BUCKET).get()["Body"].read()
    hook.load_bytes(weights + b"\0", other_key, BUCKET)  # never loaded: only hashed by the plan
    files = sample_files("Test", labels=2, per_label=2)
    upload_sample("later", files)
    other = {"weights_uri": f"s3://{BUCKET}/{other_key}"}

    message = plan_error(other)
    assert "vectors of different weights never share a PCA" in message
    prefix = re.search(r"whose SHA-256 starts with '([0-9a-f]{12})'", message).group(1)
    assert pointer["model_id"].endswith("@" + prefix)
    assert "a refit over them would mix" in plan_error({**other, "refit": True})
    for conf in (other, {**other, "refit": True}):  # through the real DAG: refused before any step
        dagrun = run_dag(conf)
        states = task_states(dagrun)
        assert not succeeded(dagrun) and states["plan_run"] == "failed", conf
        assert states["embed"] != "success" and states["pca"] != "success"
        assert not list_keys("embeddings/batch_id=later/") and not list_keys("ledger/claims/")
        assert read_json("models/pca/CURRENT.json") == pointer

    # The advice, literally: weights_uri back to the file with that SHA-256 (the default one).
    default = settings().resolve(settings().weights_uri)
    assert (
        hashlib.sha256(hook.get_key(WEIGHTS_KEY, BUCKET).get()["Body"].read()).hexdigest().startswith(prefix)
    )
    assert succeeded(run_dag({"weights_uri": default}))
    assert read_parquet("embeddings/batch_id=later/").num_rows == len(files)
    assert read_json("ledger/batches/later.json")["pca_version"] == pointer["version"]
    assert read_json(f"ledger/batches/{KEPT}.json")["files"] == n


def plan_error(conf: dict, batches: tuple[str, ...] = ("later",)) -> str:
    """What plan_run says for this conf and these claimed batches (build_plan, as the task calls it)."""
    from fruits.plan import build_plan

    with pytest.raises(ParamError) as exc:
        build_plan(catalog(), parse_params(conf, settings()), list(batches), "manual__probe", settings())
    return str(exc.value)
