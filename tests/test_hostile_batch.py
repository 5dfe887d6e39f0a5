"""A batch of hostile files and odd names through the whole DAG, then forced again.

Real: moto S3 server on localhost, Airflow dag.test() on a migrated SQLite DB, spark-submit on local
Spark via s3a, MobileNetV2 with the real weights, files made with Pillow. Nothing is mocked.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    BUCKET,
    assert_written_as_read,
    captured_log,
    list_keys,
    read_json,
    read_parquet,
    run_dag,
    s3_hook,
    sample_files,
    task_states,
    upload,
)
from fruits_jobs import tables
from hostile import hostile_files

BATCH = "hostile"
PHOTOS = sample_files("Training", labels=3, per_label=2)
ODD_NAMES = {  # relative key -> expected label
    "Pêche Été/a b+c#d%e&f'g\"h.jpg": "Pêche Été",
    "日本の梨/写真 1.jpg": "日本の梨",
    "Apple Red/deep/er/sub folder/x y.jpg": "Apple Red",
    "Kiwi (gold) 100%/#1 & more.jpeg": "Kiwi (gold) 100%",
}


def uri(rel: str) -> str:
    return f"s3://{BUCKET}/incoming/{BATCH}/{rel}"


@pytest.fixture(scope="module")
def hostile_run(airflow_db, bucket):
    files: dict[str, bytes] = {f"{p.parent.name}/{p.name}": p.read_bytes() for p in PHOTOS}
    expect: dict[str, str | None] = dict.fromkeys(files)
    for name, (data, reason) in hostile_files().items():
        files[f"Mixed Bag/{name}"] = data
        expect[f"Mixed Bag/{name}"] = reason
    for i, rel in enumerate(ODD_NAMES):
        files[rel] = PHOTOS[i].read_bytes()
        expect[rel] = None
    files["root-photo.jpg"] = PHOTOS[0].read_bytes()
    expect["root-photo.jpg"] = "no label folder"
    hidden = {"Banana/.DS_Store": b"\x00\x01", "Banana/_x.jpg": PHOTOS[0].read_bytes()}
    upload(BATCH, {**files, **hidden})
    with captured_log() as logged:
        first = run_dag()
    snapshot = {
        "embeddings": read_parquet(f"embeddings/batch_id={BATCH}/"),
        "rejects": read_parquet(f"rejects/batch_id={BATCH}/"),
        "ledger": read_json(f"ledger/batches/{BATCH}.json"),
    }
    return {"dagrun": first, "expect": expect, "log": logged, **snapshot}


def test_every_file_is_embedded_or_rejected_with_its_reason(hostile_run):
    assert str(hostile_run["dagrun"].state).endswith("success")
    expect = hostile_run["expect"]
    emb, rej = hostile_run["embeddings"], hostile_run["rejects"]
    embedded = set(emb.column("path").to_pylist())
    rejected = dict(zip(rej.column("path").to_pylist(), rej.column("reason").to_pylist(), strict=True))
    assert embedded == {uri(r) for r, reason in expect.items() if reason is None}
    assert set(rejected) == {uri(r) for r, reason in expect.items() if reason is not None}
    for rel, fragment in expect.items():
        if fragment is not None:
            assert fragment in rejected[uri(rel)], (rel, rejected[uri(rel)])
    assert len(embedded) + len(rejected) == len(expect)  # nothing lost, nothing counted twice
    assert_written_as_read(rej, tables.REJECTS_SCHEMA)
    vectors = np.array(emb.column("embedding").to_pylist(), dtype=np.float32)
    assert vectors.shape == (len(embedded), 1280) and np.isfinite(vectors).all()

    record = hostile_run["ledger"]
    assert (record["files"], record["embedded"], record["rejected"]) == (
        len(expect),
        len(embedded),
        len(rejected),
    )
    hidden = [f"incoming/{BATCH}/Banana/.DS_Store", f"incoming/{BATCH}/Banana/_x.jpg"]
    assert sorted(record["ignored_hidden_files"]) == hidden  # a photo named _x.jpg is not read either
    warning = next(line for line in hidden_run_log(hostile_run) if "hidden-named file(s) ignored" in line)
    assert all(key in warning for key in hidden), warning


def hidden_run_log(hostile_run) -> list[str]:
    return [line for line in hostile_run["log"] if f"batch {BATCH}:" in line]


def test_odd_names_round_trip_exactly(hostile_run):
    emb = hostile_run["embeddings"]
    labels = dict(zip(emb.column("path").to_pylist(), emb.column("label").to_pylist(), strict=True))
    for rel, label in ODD_NAMES.items():
        assert labels[uri(rel)] == label
    rej = hostile_run["rejects"]
    root = [r for r in rej.to_pylist() if r["path"] == uri("root-photo.jpg")]
    assert root and root[0]["label"] is None


def test_forced_rerun_is_idempotent(hostile_run):
    before_emb = hostile_run["embeddings"].sort_by("path")
    before_rej = hostile_run["rejects"].sort_by("path")
    version = read_json("models/pca/CURRENT.json")["version"]
    before_feat = read_parquet(f"features/pca_version={version}/batch_id={BATCH}/").sort_by("path")

    parts_before = set(list_keys(f"embeddings/batch_id={BATCH}/"))
    again = run_dag({"batch_ids": [BATCH], "force": True})
    assert str(again.state).endswith("success")
    # The run really redid the batch (an ignored force would stop at find_new_batches and pass the
    # equalities below): the step ran, the partition holds only new part files, the record is this run's.
    assert task_states(again)["embed"] == "success"
    parts_after = set(list_keys(f"embeddings/batch_id={BATCH}/"))
    assert parts_after and not parts_after & parts_before
    assert read_json(f"ledger/batches/{BATCH}.json")["run_id"] == again.run_id

    after_emb = read_parquet(f"embeddings/batch_id={BATCH}/").sort_by("path")
    after_rej = read_parquet(f"rejects/batch_id={BATCH}/").sort_by("path")
    after_feat = read_parquet(f"features/pca_version={version}/batch_id={BATCH}/").sort_by("path")
    assert after_emb.num_rows == before_emb.num_rows == len(set(after_emb.column("path").to_pylist()))
    assert after_emb.column("path").equals(before_emb.column("path"))
    assert after_emb.column("content_sha256").equals(before_emb.column("content_sha256"))
    np.testing.assert_array_equal(
        np.array(after_emb.column("embedding").to_pylist()),
        np.array(before_emb.column("embedding").to_pylist()),
    )
    assert after_rej.equals(before_rej)
    assert after_feat.num_rows == before_feat.num_rows
    np.testing.assert_allclose(
        np.array(after_feat.column("features").to_pylist()),
        np.array(before_feat.column("features").to_pylist()),
        rtol=0,
        atol=1e-5,
    )
    assert list_keys("ledger/batches/") == [f"ledger/batches/{BATCH}.json"]
    assert not list_keys("ledger/claims/")


def test_photo_deleted_after_the_plan_is_rejected_not_lost(bucket, tmp_path):
    """The embed step on its own (spark-submit on local Spark, real weights, moto S3), with the run's
    input manifest written as the plan writes it, then one listed photo deleted before the step runs."""
    import json

    from fruits.config import settings
    from fruits.layout import Layout
    from fruits.local_compute import run_local_step
    from fruits.steps import embed_args

    batch, photos = "vanishing", sample_files("Test", labels=2, per_label=2)
    files = {f"{p.parent.name}/{p.name}": p for p in photos}
    upload(batch, files)
    manifest = [
        {"batch_id": batch, "path": f"s3://{BUCKET}/incoming/{batch}/{rel}", "size_bytes": p.stat().st_size}
        for rel, p in files.items()
    ]
    hook = s3_hook()
    run_prefix = "runs/vanishing-test/"
    hook.load_string("\n".join(json.dumps(m) for m in manifest), f"{run_prefix}inputs.jsonl", BUCKET)
    gone = manifest[1]["path"]
    hook.delete_objects(BUCKET, [gone.split(f"{BUCKET}/", 1)[1]])

    s = settings()
    layout = Layout(BUCKET)
    args = embed_args(layout, s.resolve(s.weights_uri), "tf", None, None, "vanishing-test", "eu-west-3")
    run_local_step("embed", args, s)

    emb = read_parquet(f"embeddings/batch_id={batch}/")
    rej = read_parquet(f"rejects/batch_id={batch}/")
    assert sorted(emb.column("path").to_pylist()) == sorted(m["path"] for m in manifest if m["path"] != gone)
    assert rej.column("path").to_pylist() == [gone]
    assert "not found in S3" in rej.column("reason")[0].as_py()
    assert {len(v) for v in emb.column("embedding").to_pylist()} == {1280}
    metrics = read_json(f"{run_prefix}embed.json")
    assert (metrics["files"], metrics["embedded"], metrics["rejected"]) == (4, 3, 1)
