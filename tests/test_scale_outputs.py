"""Output files per batch, and a PCA refit from the bounded sample, through the real DAG.

Real: a moto S3 server process on localhost, Airflow (dag.test over a migrated SQLite database),
spark-submit on a local Spark, the real MobileNetV2 weights and Fruits-360 photos. The one fake: in the
failing refit, validation is made to fail (a problem added to its result) in the test's process, where
dag.test runs the tasks, to show that nothing moves before validation passed.
"""

from __future__ import annotations

import pytest
from conftest import (
    BUCKET,
    list_keys,
    read_json,
    read_parquet,
    run_dag,
    s3_hook,
    sample_files,
    task_states,
    upload,
    upload_sample,
)

B1, B2, B3 = "s1-training", "s2-training", "s3-more"


def etags(prefix: str) -> dict[str, str]:
    hook = s3_hook()
    return {k: hook.head_object(k, BUCKET)["ETag"] for k in list_keys(prefix)}


def parquet_files(prefix: str) -> list[str]:
    return [k for k in list_keys(prefix) if k.endswith(".parquet")]


@pytest.fixture(scope="module")
def first(airflow_db, bucket):
    upload_sample(B1, sample_files("Training", labels=4, per_label=3))
    upload(B1, {"notes/readme.txt": b"not a photo"})  # one reject
    upload_sample(B2, sample_files("Training", labels=4, per_label=3, offset=3))
    dagrun = run_dag({"batch_ids": [B1, B2]})
    assert str(dagrun.state).endswith("success")
    return dagrun


def test_one_file_per_batch_partition(first):
    version = read_json("models/pca/CURRENT.json")["version"]
    for b in (B1, B2):
        assert len(parquet_files(f"embeddings/batch_id={b}/")) == 1
        assert len(parquet_files(f"features/pca_version={version}/batch_id={b}/")) == 1
    assert len(parquet_files(f"rejects/batch_id={B1}/")) == 1
    assert not list_keys(f"rejects/batch_id={B2}/")
    # the step's own checks, per batch, and the validation that read them
    checks = read_json(f"{first_prefix(first)}embed_validation.json")["batches"]
    assert (checks[B1]["files"], checks[B1]["embedded"], checks[B1]["rejected"]) == (13, 12, 1)
    assert checks[B1]["dim_min"] == checks[B1]["dim_max"] == 1280 and checks[B1]["nonfinite_values"] == 0
    validation = read_json(f"{first_prefix(first)}validation.json")
    assert validation["ok"] and validation["batches"][B2]["features_files"] == 1
    # the fit sample holds every embedding so far (fewer than its size), moved after validation
    pointer = read_json("samples/LATEST.json")
    assert pointer["fit"]["rows"] == 24 and pointer["fit"]["size"] == 30_000
    assert pointer["report"]["version"] == version and pointer["report"]["rows"] == 24


def first_prefix(dagrun) -> str:
    from fruits.layout import safe_run_id

    return f"runs/{safe_run_id(dagrun.run_id)}/"


def test_refit_from_the_sample(first, monkeypatch):
    old = read_json("models/pca/CURRENT.json")
    old_features = etags(f"features/pca_version={old['version']}/")
    assert len(old_features) >= 2
    upload_sample(B3, sample_files("Training", labels=2, per_label=3, offset=6))

    # 1. A refit whose validation fails: no pointer moves, no ledger record, old features untouched.
    import fruits.validate as validation

    real = validation.check_pca

    def broken(*args, **kwargs):
        res = real(*args, **kwargs)
        res["problems"].append("injected by the test")
        return res

    monkeypatch.setattr(validation, "check_pca", broken)
    failed = run_dag({"refit": True, "max_k": 5})
    monkeypatch.setattr(validation, "check_pca", real)
    assert str(failed.state).endswith("failed") and task_states(failed)["validate"] == "failed"
    assert read_json("models/pca/CURRENT.json") == old
    assert f"ledger/batches/{B3}.json" not in list_keys("ledger/batches/")
    assert read_json("samples/LATEST.json")["report"]["version"] == old["version"]

    # 2. The refit again: a new version fitted on the sample, every batch re-transformed.
    dagrun = run_dag({"refit": True, "max_k": 5})
    assert str(dagrun.state).endswith("success")
    current = read_json("models/pca/CURRENT.json")
    assert current["version"] != old["version"]
    meta = read_json(f"models/pca/{current['version']}/metadata.json")
    assert meta["fit_sample"]["method"] == "sample" and meta["fit_sample"]["size"] == 30_000
    assert meta["fit_rows"] == meta["fit_sample"]["rows"] == 30  # 12 + 12 + 6 embeddings, all sampled
    assert meta["fit_batch_count"] == 3 and meta["fit_batches"] == sorted([B1, B2, B3])
    assert meta["k"] <= meta["k_fitted"] <= 5  # max_k
    for b, n in ((B1, 12), (B2, 12), (B3, 6)):
        feats = read_parquet(f"features/pca_version={current['version']}/batch_id={b}/")
        assert feats.num_rows == n and {len(v) for v in feats.column("features").to_pylist()} == {meta["k"]}
        assert read_json(f"ledger/batches/{b}.json")["pca_version"] == current["version"]
    assert etags(f"features/pca_version={old['version']}/") == old_features
    # CURRENT.json moved after the run's validation was written
    hook = s3_hook()
    moved = hook.head_object("models/pca/CURRENT.json", BUCKET)["LastModified"]
    validated = hook.head_object(f"{first_prefix(dagrun)}validation.json", BUCKET)["LastModified"]
    assert moved >= validated
    assert read_json("samples/LATEST.json")["report"]["version"] == current["version"]
