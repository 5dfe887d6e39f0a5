"""The Airflow-side validation (plugins/fruits/validate.py), one check at a time, without Spark.

Real: a moto S3 server process on localhost, the amazon provider's S3Hook, Parquet files written with
pyarrow in the jobs' schemas and the steps' validation files, as the Spark steps leave them
(scripts/validate_rss.write_run). Each test damages one thing in a valid run, as a buggy step or a stray
file would, and checks that validation fails with the message that names it; the valid run passes and
leaves runs/RUN/validation.json. The validator reads Parquet footers only: a test checks that no GET
reads a whole object.
"""

from __future__ import annotations

import copy
import io
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import BUCKET, reset_s3, restore_bucket, s3_hook, save_bucket
from fruits.catalog import Catalog
from fruits.layout import Layout
from fruits.validate import ValidationFailed, validate_run
from validate_rss import MODEL_ID, VERSION, put_json, put_parquet, write_run

pytestmark = pytest.mark.fast  # no Spark, no DAG run (`make test-fast`)

RUN = "runs/manual__t/"
B1, B2 = "b1", "b2-test"


@pytest.fixture(scope="module")
def valid_run(s3_server):
    """A valid run's outputs, written once and kept in memory."""
    reset_s3()
    hook = s3_hook()
    hook.create_bucket(bucket_name=BUCKET, region_name="eu-west-3")
    plan = write_run(hook.get_conn(), BUCKET, RUN, {B1: 30, B2: 12}, k=8)
    return plan, save_bucket()


@pytest.fixture
def run(valid_run):
    """The valid run restored into an otherwise empty S3, for each test to damage."""
    plan, objects = valid_run
    restore_bucket(objects)
    return copy.deepcopy(plan)


def catalog() -> Catalog:
    return Catalog(s3_hook(), Layout(BUCKET))


def edit_json(key: str, change) -> None:
    hook = s3_hook()
    doc = json.loads(hook.read_key(key, BUCKET))
    change(doc)
    put_json(hook.get_conn(), BUCKET, key, doc)


def fails_with(plan, *messages: str) -> str:
    with pytest.raises(ValidationFailed) as exc:
        validate_run(catalog(), plan)
    text = str(exc.value)
    for m in messages:
        assert m in text, text
    # every problem is also in the run's validation.json, and nothing passed
    saved = json.loads(s3_hook().read_key(f"{RUN}validation.json", BUCKET))
    assert saved["ok"] is False and saved["problems"]
    return text


def test_a_valid_run_passes_and_writes_validation_json(run):
    totals = validate_run(catalog(), run)
    assert totals["key"] == f"{RUN}validation.json"
    assert (totals["batches"], totals["images"], totals["embedded"], totals["rejected"]) == (2, 44, 42, 2)
    assert totals["features"] == 42 and totals["problems"] == 0
    assert len(json.dumps(totals)) < 1000  # XCom-sized
    saved = json.loads(s3_hook().read_key(f"{RUN}validation.json", BUCKET))
    assert saved["ok"] and saved["batches"][B1]["labels"] == {"label-0": 10, "label-1": 10, "label-2": 10}
    assert saved["batches"][B1]["embeddings_files"] == 1 and saved["batches"][B2]["features_files"] == 1


def test_reads_footers_not_vectors(run):
    """Every GET of a Parquet file is a ranged read of its tail."""
    client = s3_hook().get_conn()
    gets: list[dict] = []
    client.meta.events.register(
        "provide-client-params.s3.GetObject", lambda params, **_: gets.append(dict(params))
    )
    cat = catalog()
    cat.hook.get_conn = lambda: client  # the same client, so its events are seen
    validate_run(cat, run)
    parquet = [g for g in gets if g["Key"].endswith(".parquet")]
    assert len(parquet) == 2 * 2 + 2  # embeddings + features per batch, rejects per batch
    assert all(g.get("Range", "").startswith("bytes=-") for g in parquet), parquet


def test_schema(run):
    key = f"embeddings/batch_id={B1}/part-00000.snappy.parquet"
    table = pq.read_table(io.BytesIO(s3_hook().get_key(key, BUCKET).get()["Body"].read()))
    bad = table.set_column(
        table.schema.get_field_index("embedding"),
        "embedding",
        table.column("embedding").cast(pa.list_(pa.float64())),
    ).drop_columns(["engine"])
    put_parquet(s3_hook().get_conn(), BUCKET, key, bad)
    fails_with(
        run,
        f"[{B1}] {key}: column 'embedding' is list<element: double>, expected list<item: float>",
        f"[{B1}] {key}: column 'engine' missing",
    )


def test_nan_and_inf(run):
    edit_json(f"{RUN}embed_validation.json", lambda d: d["batches"][B1].update(nonfinite_values=3))
    edit_json(f"{RUN}pca_validation.json", lambda d: d["batches"][B2].update(nonfinite_values=1))
    fails_with(run, f"[{B1}] 3 NaN/inf value(s) in embedding", f"[{B2}] 1 NaN/inf value(s) in PCA feature")


def test_null_vectors(run):
    edit_json(f"{RUN}embed_validation.json", lambda d: d["batches"][B1].update(null_vectors=2))
    fails_with(run, f"[{B1}] 2 null embedding vector(s)")


def test_wrong_dim(run):
    edit_json(f"{RUN}embed_validation.json", lambda d: d["batches"][B1].update(dim_min=1279))
    edit_json(f"{RUN}pca_validation.json", lambda d: d["batches"][B2].update(dim_max=9))
    fails_with(
        run,
        f"[{B1}] embedding length in [1279, 1280], expected 1280",
        f"[{B2}] PCA feature length in [8, 9], expected 8",
    )


def test_duplicate_paths(run):
    edit_json(f"{RUN}embed_validation.json", lambda d: d["batches"][B1].update(duplicate_paths=2))
    edit_json(f"{RUN}pca_validation.json", lambda d: d["batches"][B2].update(distinct_paths=11))
    fails_with(
        run,
        f"[{B1}] 2 path(s) appear more than once in the embeddings and rejects",
        f"[{B2}] 1 duplicate path(s) in the PCA features",
    )


def test_counts_mismatch(run):
    """The plan listed more files than the step read and wrote."""
    put_json(s3_hook().get_conn(), BUCKET, f"{RUN}expected.json", {B1: 32, B2: 13})
    fails_with(
        run,
        f"[{B1}] the embed step read 31 input file(s), the plan listed 32",
        f"[{B1}] embedded (30) + rejected (1) = 31, but the batch holds 32 input file(s)",
    )


def test_footer_rows_and_files(run):
    """A stale part file beside the step's output: its rows are not in the step's count."""
    hook = s3_hook()
    part = f"embeddings/batch_id={B1}/part-00000.snappy.parquet"
    hook.copy_object(part, f"embeddings/batch_id={B1}/part-99999-stale.snappy.parquet", BUCKET, BUCKET)
    fails_with(
        run,
        f"[{B1}] embeddings: the Parquet footers hold 60 row(s), the embed step counted 30",
        f"[{B1}] embeddings/batch_id={B1}/: 2 Parquet files for 60 rows, expected at most 1",
    )


def test_not_parquet(run):
    s3_hook().load_string("garbage", f"rejects/batch_id={B2}/part-00001.snappy.parquet", BUCKET)
    fails_with(run, f"[{B2}] rejects/batch_id={B2}/part-00001.snappy.parquet: unreadable Parquet footer")


def test_model_id(run):
    edit_json(
        f"{RUN}embed_validation.json", lambda d: d["batches"][B1].update(model_ids=[MODEL_ID, "other@1"])
    )
    edit_json(f"{RUN}embed_validation.json", lambda d: d.update(model_id="other@1"))
    fails_with(
        run,
        f"the embed step used model 'other@1', the plan '{MODEL_ID}'",
        f"[{B1}] model_id ['{MODEL_ID}', 'other@1'], expected '{MODEL_ID}'",
    )


def test_pca_version(run):
    edit_json(f"{RUN}pca_validation.json", lambda d: d["batches"][B2].update(pca_versions=["pca-old"]))
    edit_json(f"{RUN}pca_validation.json", lambda d: d.update(version="pca-old", k=7))
    fails_with(
        run,
        f"the pca step wrote version 'pca-old', the plan '{VERSION}'",
        "the pca step used k=7, the model's metadata k=8",
        f"[{B2}] pca_version ['pca-old'], expected '{VERSION}'",
    )


def test_features_vs_embeddings(run):
    edit_json(
        f"{RUN}pca_validation.json",
        lambda d: d["batches"][B1].update(
            features=28, missing_features=3, extra_features=1, distinct_paths=28
        ),
    )
    text = fails_with(
        run,
        f"[{B1}] PCA features (28 rows) do not match the embeddings (30 rows) one to one: 3 embedding path(s) "
        "without features, 1 feature path(s) without an embedding",
        f"[{B1}] features: the Parquet footers hold 30 row(s), the pca step counted 28",
    )
    assert not re.search(rf"\[{B2}\]", text)  # the other batch is fine


def test_missing_step_results(run):
    edit_json(f"{RUN}pca_validation.json", lambda d: d["batches"].pop(B2))
    s3_hook().delete_objects(BUCKET, [f"{RUN}embed_validation.json"])
    fails_with(
        run,
        f"no {RUN}embed_validation.json: the embed step did not finish",
        f"[{B1}] the embed step reported nothing for this batch",
        f"[{B2}] the pca step reported nothing for this batch (pca_validation.json)",
    )


def test_a_refit_revalidates_the_older_batches_features(run):
    """A refit rewrites the features of every earlier batch (batches.json "refit"): each is checked
    against the embeddings the pca step read, though the embed step did not touch it this run."""
    edit_json(f"{RUN}batches.json", lambda d: d.update(new=[B1], refit=[B2]))
    edit_json(f"{RUN}embed_validation.json", lambda d: d["batches"].pop(B2))  # not embedded this run
    totals = validate_run(catalog(), run)
    assert (totals["batches"], totals["batches_validated"], totals["features"]) == (1, 2, 42)
    saved = json.loads(s3_hook().read_key(f"{RUN}validation.json", BUCKET))["batches"][B2]
    assert (saved["files"], saved["embedded"], saved["rejected"], saved["features"]) == (13, 12, 1, 12)

    edit_json(
        f"{RUN}pca_validation.json",
        lambda d: d["batches"][B2].update(features=10, missing_features=2, distinct_paths=10),
    )
    text = fails_with(
        run,
        f"[{B2}] PCA features (10 rows) do not match the embeddings (12 rows) one to one: 2 embedding path(s) "
        "without features",
        f"[{B2}] features: the Parquet footers hold 12 row(s), the pca step counted 10",
    )
    assert not re.search(rf"\[{B1}\]", text)  # the new batch is fine
