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
    plan_as_plan_run,
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


def trigger_conf(message: str) -> dict:
    """The conf of the trigger command an error message prints (`airflow dags trigger ... --conf '...'`)."""
    found = re.findall(r"airflow dags trigger fruits_embeddings --conf '(\{.*?\})'", message)
    assert len(found) == 1, message
    return json.loads(found[0])


def removed_key(message: str) -> str:
    """The key of the `aws s3 rm s3://BUCKET/KEY` an error message prints."""
    found = re.findall(rf"`aws s3 rm s3://{BUCKET}/([^`]+)`", message)
    assert len(found) == 1, message
    return found[0]


def test_damaged_then_lost_ledger_force_rerun_as_advised_rebuilds_it(history):
    """A garbage record in a one-record ledger: its advice (delete it, then a forced run of the batch)
    leads through the lost-ledger state, whose own advice prints the same run; that run rebuilds it."""
    n = from_history(history)
    record = read_json("ledger/batches/kept.json")
    hook = s3_hook()
    hook.load_bytes(b'{"files": 6, "embedd', "ledger/batches/kept.json", BUCKET, replace=True)

    damaged = advice(CatalogError)
    assert "ledger/batches/kept.json is not valid JSON" in damaged
    conf = trigger_conf(damaged)
    assert conf == {"force": True, "batch_ids": ["kept"]}
    hook.delete_objects(BUCKET, [removed_key(damaged)])  # the `aws s3 rm` it prints

    lost = advice(CatalogError)  # the ledger is now empty: the lost-ledger message, same way out
    assert "the ledger was lost" in lost
    assert trigger_conf(lost) == conf

    assert succeeded(run_dag(conf))
    rebuilt = read_json("ledger/batches/kept.json")
    assert (rebuilt["files"], rebuilt["embedded"], rebuilt["rejected"]) == (n, n, 0)
    assert rebuilt["pca_version"] == record["pca_version"]  # transformed with the model it had
    assert read_parquet("embeddings/batch_id=kept/").num_rows == n
    features = read_parquet(f"features/pca_version={record['pca_version']}/batch_id=kept/")
    assert features.num_rows == n


def test_lost_pointer_or_model_refit_as_advised_fits_a_new_one(history):
    """The model pointer lost: its advice (refit) is planned as a fit over every processed batch. Then the
    model itself lost too: the same advice, run for real, fits a new version and makes the bookkeeping
    whole again."""
    n = from_history(history)
    old = read_json("models/pca/CURRENT.json")["version"]
    s3_hook().delete_objects(BUCKET, ["models/pca/CURRENT.json"])
    pointer_lost = advice(CatalogError)
    assert "models/pca/CURRENT.json is missing" in pointer_lost
    conf = trigger_conf(pointer_lost)
    assert conf == {"refit": True}
    plan = plan_as_plan_run(conf)  # gets past check_params, and past the plan (the bug)
    assert not list_keys("ledger/claims/")  # handed back
    assert plan["pca"]["fit"] and plan["pca"]["version"] != old and plan["new_batches"] == 0
    assert read_json(plan["keys"]["pca_batches.json"]) == {"fit": [KEPT], "transform": [KEPT]}

    from_history(history)
    s3_hook().delete_objects(BUCKET, list_keys(f"models/pca/{old}/"))
    message = advice(CatalogError)
    assert f"names PCA version {old!r}" in message
    assert trigger_conf(message) == conf
    assert succeeded(run_dag(conf))  # nothing new to embed: the refit alone is the run

    new = read_json("models/pca/CURRENT.json")["version"]
    assert new != old
    assert list_keys(f"models/pca/{new}/metadata.json")
    record = read_json(f"ledger/batches/{KEPT}.json")
    assert record["pca_version"] == new
    assert read_parquet(f"features/pca_version={new}/batch_id={KEPT}/").num_rows == n
    preflight(catalog(), parse_params({}, settings()))  # the bookkeeping is whole again


def test_restore_from_s3_versioning_as_advised(history):
    """On a versioned bucket (README, deploying), a damaged record and a deleted one each come back as the
    message says: the last good version copied back, a delete marker deleted. No step needs to run: the
    next run finds the ledger whole and nothing new."""
    from_history(history)
    s3 = s3_hook().get_conn()
    key = "ledger/batches/kept.json"
    good = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    s3.put_object(Bucket=BUCKET, Key=key, Body=good)  # the record as written once versioning is on
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"\x00\x00 damaged")

    message = advice(CatalogError)
    listed = re.search(r"`aws s3api list-object-versions --bucket (\S+) --prefix (\S+)`", message)
    copy = re.search(
        r"`aws s3api copy-object --bucket (\S+) --key (\S+) --copy-source '([^?]+)\?versionId=", message
    )
    assert (
        listed
        and copy
        and listed.groups() == (BUCKET, key)
        and copy.groups() == (BUCKET, key, f"{BUCKET}/{key}")
    )
    versions = s3.list_object_versions(Bucket=BUCKET, Prefix=key)["Versions"]
    last_good = sorted((v for v in versions if not v["IsLatest"]), key=lambda v: v["LastModified"])[-1]
    s3.copy_object(
        Bucket=BUCKET, Key=key, CopySource={"Bucket": BUCKET, "Key": key, "VersionId": last_good["VersionId"]}
    )
    assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == good
    preflight(catalog(), parse_params({}, settings()))

    s3.delete_object(Bucket=BUCKET, Key=key)  # a lost ledger: its one record deleted
    lost = advice(CatalogError)
    assert "the ledger was lost" in lost and "delete marker is deleted" in lost
    listed = s3.list_object_versions(Bucket=BUCKET, Prefix="ledger/batches/")
    (marker,) = [m for m in listed["DeleteMarkers"] if m["IsLatest"]]
    s3.delete_object(Bucket=BUCKET, Key=marker["Key"], VersionId=marker["VersionId"])
    assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == good

    dagrun = run_dag()
    assert succeeded(dagrun)
    states = task_states(dagrun)
    assert states["find_new_batches"] == "success" and states["embed"] == "skipped"  # nothing new
    assert json.loads(good)["files"] == history["files"]


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
