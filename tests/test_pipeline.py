"""The whole DAG on real parts: moto S3 server on localhost, Airflow (dag.test over a migrated SQLite
database), spark-submit on a local Spark reading s3a://, real MobileNetV2 ImageNet weights, real
Fruits-360 photos, and a real headless Chromium (Debian's `chromium`) for the run report. Nothing is
mocked; assertions are on the data read back from S3.

One history, as a user would make it: a Training batch of all 24 varieties (fits the PCA), a run with
nothing new, then a Test batch (transformed with that PCA, never fitted on) beside a batch without
_READY. The pipeline's checks and the run report's (the second page carries the linear probe, recomputed
here independently from the Parquet in S3) read the same runs.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from chromium import browser
from conftest import (
    BUCKET,
    WEIGHTS,
    assert_written_as_read,
    list_keys,
    read_json,
    read_parquet,
    run_dag,
    s3_hook,
    sample_files,
    snapshot,
    task_states,
    upload_sample,
    weights_model_id,
)
from fruits.layout import Layout
from fruits_jobs import tables

B1, B2, B3 = "b1-training", "b2-test", "b3-not-ready"
N_LABELS, PER_LABEL, TEST_PER_LABEL = 24, 3, 2


@pytest.fixture(scope="module")
def first_run(airflow_db, bucket):
    """A Training batch of all 24 varieties: the first run fits the PCA."""
    files = sample_files("Training", labels=N_LABELS, per_label=PER_LABEL)
    upload_sample(B1, files)
    dagrun = run_dag()
    return {"dagrun": dagrun, "files": files}


@pytest.fixture(scope="module")
def later_runs(first_run):
    """Then a run with nothing new, then a Test batch (transformed with the first run's model, never fitted
    on) beside a batch without _READY. The run report checks (at the end of this file) read the
    first and the last run's pages: one history serves both, instead of two."""
    before = snapshot()
    old_content = read_parquet(f"embeddings/batch_id={B1}/")
    # batch_ids null, as the trigger form sends an empty field: every ready batch not in the ledger.
    noop = run_dag({"batch_ids": None})
    after_noop = snapshot()
    new_files = sample_files("Test", labels=N_LABELS, per_label=TEST_PER_LABEL)
    upload_sample(B2, new_files)
    upload_sample(B3, sample_files("Test", labels=2, per_label=2, offset=TEST_PER_LABEL), ready=False)
    # A model fitted before the step saved projection.npz beside its PipelineModel (any history from
    # before that change): the transform falls back to the PipelineModel.
    version = read_json("models/pca/CURRENT.json")["version"]
    s3_hook().delete_objects(BUCKET, [f"models/pca/{version}/projection.npz"])
    second = run_dag({"batch_ids": None})
    return {
        "before": before,
        "old_content": old_content,
        "noop": noop,
        "after_noop": after_noop,
        "second": second,
        "new_files": new_files,
    }


def test_full_run_outputs(first_run):
    assert str(first_run["dagrun"].state) in ("success", "DagRunState.SUCCESS")
    files: list[Path] = first_run["files"]

    emb = read_parquet(f"embeddings/batch_id={B1}/")
    assert emb.num_rows == len(files) == N_LABELS * PER_LABEL
    assert_written_as_read(emb, tables.EMBEDDINGS_SCHEMA)
    labels = emb.column("label").to_pylist()
    assert {lab: labels.count(lab) for lab in set(labels)} == {p.parent.name: PER_LABEL for p in files}
    assert sorted(emb.column("path").to_pylist()) == sorted(
        f"s3://{BUCKET}/incoming/{B1}/{p.parent.name}/{p.name}" for p in files
    )
    vectors = np.array(emb.column("embedding").to_pylist(), dtype=np.float32)
    assert vectors.shape == (len(files), 1280)
    assert np.isfinite(vectors).all() and (vectors >= 0).all() and vectors.std() > 0  # ReLU6 + avg pool
    assert set(emb.column("model_id").to_pylist()) == {weights_model_id()}
    # No engine was asked for (the tests' environment sets no FRUITS_ENGINE): ONNX Runtime is the default.
    assert "FRUITS_ENGINE" not in os.environ
    assert set(emb.column("engine").to_pylist()) == {"onnx"}
    layout = Layout(BUCKET)
    assert read_json(layout.run_file(first_run["dagrun"].run_id, "embed.json"))["engine"] == "onnx"
    by_path = dict(zip(emb.column("path").to_pylist(), emb.column("content_sha256").to_pylist(), strict=True))
    some = files[0]
    assert (
        by_path[f"s3://{BUCKET}/incoming/{B1}/{some.parent.name}/{some.name}"]
        == hashlib.sha256(some.read_bytes()).hexdigest()
    )
    assert not list_keys(f"rejects/batch_id={B1}/")

    current = read_json("models/pca/CURRENT.json")
    meta = read_json(f"models/pca/{current['version']}/metadata.json")
    k = meta["k"]
    cumulative = meta["cumulative_explained_variance"]
    assert meta["variance_target"] == 0.9 and meta["mode"] == "variance"
    assert cumulative[k - 1] >= 0.9 and (k == 1 or cumulative[k - 2] < 0.9)  # smallest k reaching it
    assert all(b >= a for a, b in zip(cumulative, cumulative[1:], strict=False))
    assert len(meta["explained_variance"]) == meta["k_fitted"] <= len(files)
    png = s3_hook().get_key(f"models/pca/{current['version']}/scree.png", BUCKET).get()["Body"].read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    feats = read_parquet(f"features/pca_version={current['version']}/batch_id={B1}/")
    assert feats.num_rows == len(files)
    assert_written_as_read(feats, tables.FEATURES_SCHEMA)
    fv = np.array(feats.column("features").to_pylist(), dtype=np.float32)
    assert fv.shape == (len(files), k) and np.isfinite(fv).all()
    # PCA scores of standardised data are centred, and component variances decrease.
    assert np.abs(fv.mean(axis=0)).max() < 1e-3 * max(1.0, fv.std())
    var = fv.var(axis=0)
    assert all(var[i] >= var[i + 1] * 0.999 for i in range(k - 1))

    assert_features_are_the_spark_models(current["version"], k, emb, feats)

    record = read_json(f"ledger/batches/{B1}.json")
    assert (record["files"], record["embedded"], record["rejected"]) == (len(files), len(files), 0)
    assert record["pca_version"] == current["version"] and record["pca_k"] == k
    assert record["model_id"] == weights_model_id()
    assert not list_keys("ledger/claims/")  # released by the teardown


def assert_features_are_the_spark_models(version: str, k: int, emb: pa.Table, feats: pa.Table) -> None:
    """The features written (`feats`, one batch's) are what the saved Spark ML PipelineModel computes:
    its StandardScaler and PCA stages, read from the model's own Parquet files (not from the step's
    projection.npz), applied to the batch's embeddings (`emb`)."""
    model = f"models/pca/{version}/spark_model/stages/"
    scaler = read_parquet(model + "0_fruits_scaler/data/").to_pylist()[0]
    pc = read_parquet(model + "1_fruits_pca/data/").to_pylist()[0]["pc"]
    assert not pc["isTransposed"] and pc["numRows"] == 1280  # dense, column-major
    components = np.array(pc["values"]).reshape(pc["numCols"], pc["numRows"]).T[:, :k]
    mean, std = np.array(scaler["mean"]["values"]), np.array(scaler["std"]["values"])
    by_path = dict(zip(emb.column("path").to_pylist(), emb.column("embedding").to_pylist(), strict=True))
    x = np.array([by_path[p] for p in feats.column("path").to_pylist()], dtype=np.float32).astype(np.float64)
    expected = ((x - mean) * np.where(std > 0, 1 / np.where(std > 0, std, 1), 0)) @ components
    got = np.array(feats.column("features").to_pylist(), dtype=np.float32)
    assert got.shape == expected.shape == (emb.num_rows, k)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_incremental_runs(first_run, later_runs):
    assert str(first_run["dagrun"].state).endswith("success")
    # 1. Nothing new: the run stops after detection; no Spark job, nothing in S3 changes (by ETag).
    noop = later_runs["noop"]
    assert str(noop.state).endswith("success")
    states = task_states(noop)
    assert states["find_new_batches"] == "success"
    assert states["embed"] == states["pca"] == states["commit"] == "skipped"
    assert later_runs["after_noop"] == later_runs["before"]

    # 2. A new ready batch and a batch without _READY: only the ready one is processed.
    second = later_runs["second"]
    assert str(second.state).endswith("success")
    assert task_states(second)["embed"] == "success"
    ledger = {k.rsplit("/", 1)[1][:-5] for k in list_keys("ledger/batches/")}
    assert ledger == {B1, B2}
    assert not list_keys(f"embeddings/batch_id={B3}/")
    emb2 = read_parquet(f"embeddings/batch_id={B2}/")
    assert emb2.num_rows == len(later_runs["new_files"])
    # The old batch's embeddings are untouched: same objects, same bytes, same content.
    old_embeddings = {
        k: v for k, v in later_runs["before"].items() if k.startswith(f"embeddings/batch_id={B1}/")
    }
    assert snapshot(f"embeddings/batch_id={B1}/") == old_embeddings
    assert read_parquet(f"embeddings/batch_id={B1}/").equals(later_runs["old_content"])
    # No refit: the new batch is transformed with the current model, which did not change.
    current = read_json("models/pca/CURRENT.json")
    assert read_json(f"ledger/batches/{B2}.json")["pca_version"] == current["version"]
    assert read_json(f"ledger/batches/{B1}.json")["pca_version"] == current["version"]
    assert len({k.split("/")[2] for k in list_keys("models/pca/") if k.endswith("metadata.json")}) == 1
    # The model had lost its projection.npz before this run, as a model fitted before that file existed:
    # the step read its arrays from the Spark ML PipelineModel, and the features are still that model's.
    assert not list_keys(f"models/pca/{current['version']}/projection.npz")
    feats2 = read_parquet(f"features/pca_version={current['version']}/batch_id={B2}/")
    assert_features_are_the_spark_models(current["version"], current["k"], emb2, feats2)


def test_embeddings_equal_direct_keras(first_run):
    """The Spark job's vector equals a direct Keras computation on the same file (cosine >= 0.9999)."""
    import keras

    files: list[Path] = first_run["files"][:: len(first_run["files"]) // 4][:4]
    emb = read_parquet(f"embeddings/batch_id={B1}/")
    by_path = dict(zip(emb.column("path").to_pylist(), emb.column("embedding").to_pylist(), strict=True))
    model = keras.applications.MobileNetV2(
        weights=str(WEIGHTS), include_top=False, pooling="avg", input_shape=(224, 224, 3)
    )
    for f in files:
        img = keras.utils.load_img(f, target_size=(224, 224), interpolation="bilinear")
        x = keras.applications.mobilenet_v2.preprocess_input(keras.utils.img_to_array(img)[None])
        direct = np.asarray(model(x, training=False))[0]
        spark = np.asarray(by_path[f"s3://{BUCKET}/incoming/{B1}/{f.parent.name}/{f.name}"])
        cosine = float(direct @ spark / (np.linalg.norm(direct) * np.linalg.norm(spark)))
        assert cosine >= 0.9999, (f, cosine)


def test_same_variety_is_closer(first_run):
    """Plausibility on real photos: same-variety pairs are closer than different-variety pairs."""
    emb = read_parquet(f"embeddings/batch_id={B1}/")
    x = np.array(emb.column("embedding").to_pylist(), dtype=np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.array(emb.column("label").to_pylist())
    sim = x @ x.T
    same = labels[:, None] == labels[None, :]
    off_diag = ~np.eye(len(labels), dtype=bool)
    intra, inter = sim[same & off_diag].mean(), sim[~same].mean()
    assert intra > inter + 0.1, (intra, inter)
    # Leave-one-out nearest neighbour: far above the 1/24 chance level.
    np.fill_diagonal(sim, -np.inf)
    accuracy = float((labels[sim.argmax(axis=1)] == labels).mean())
    assert accuracy >= 0.8, accuracy


# --- the run report (plugins/fruits/report.py) of the runs above, rendered in a real headless Chromium ---
TRAIN, TEST = B1, B2
LABELS, TRAIN_PER_LABEL = N_LABELS, PER_LABEL
PLOTS = ["plot-cumulative", "plot-scatter", "plot-scree", "plot-steps"]


def report_html(run_id: str) -> str:
    from fruits.layout import safe_run_id

    return s3_hook().read_key(f"reports/{safe_run_id(run_id)}.html", "fruits-test")


def probe_accuracy(x_train, y_train, x_test, y_test) -> float:
    """The probe, computed here from the Parquet data, independently of plugins/fruits/report.py."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(max_iter=2000).fit(scaler.transform(x_train), y_train)
    return float((clf.predict(scaler.transform(x_test)) == np.array(y_test)).mean())


def test_reports_in_s3(first_run, later_runs):
    first, second = first_run["dagrun"], later_runs["second"]
    assert str(first.state).endswith("success") and str(second.state).endswith("success")
    from fruits.layout import safe_run_id

    keys = list_keys("reports/")
    assert keys == sorted(f"reports/{safe_run_id(r.run_id)}.html" for r in (first, second))

    # First run: Training only, so the page explains why there is no probe.
    page1 = report_html(first.run_id)
    assert "id='probe-missing'" in page1 and "Test batch" in page1
    summary1 = read_json(f"runs/{safe_run_id(first.run_id)}/summary.json")
    assert summary1["embedded"] == LABELS * TRAIN_PER_LABEL

    # Second run: the probe, checked against an independent computation on the data in S3.
    page = report_html(second.run_id)
    version = read_json("models/pca/CURRENT.json")["version"]
    meta = read_json(f"models/pca/{version}/metadata.json")
    assert meta["fit_batches"] == [TRAIN]  # the Test batch was never seen by the PCA fit
    feats = {b: read_parquet(f"features/pca_version={version}/batch_id={b}/") for b in (TRAIN, TEST)}
    embs = {b: read_parquet(f"embeddings/batch_id={b}/") for b in (TRAIN, TEST)}

    def xy(table, column):
        order = np.argsort(table.column("path").to_pylist())
        x = np.array(table.column(column).to_pylist(), dtype=np.float32)[order]
        y = np.array(table.column("label").to_pylist(), dtype=object)[order]
        return x, list(y)

    pca_acc = probe_accuracy(*xy(feats[TRAIN], "features"), *xy(feats[TEST], "features"))
    full_acc = probe_accuracy(*xy(embs[TRAIN], "embedding"), *xy(embs[TEST], "embedding"))
    stats = read_json(f"runs/{safe_run_id(second.run_id)}/report.json")["probe"]
    assert stats["pca"]["dim"] == meta["k"] and stats["full"]["dim"] == 1280
    assert stats["pca"]["train_rows"] == LABELS * TRAIN_PER_LABEL
    assert stats["pca"]["test_rows"] == LABELS * TEST_PER_LABEL and stats["pca"]["classes"] == LABELS
    assert stats["pca"]["accuracy"] == pytest.approx(pca_acc, abs=1e-4)
    assert stats["full"]["accuracy"] == pytest.approx(full_acc, abs=1e-4)
    # Plausibility, not a fixed number: ImageNet features separate Fruits-360 varieties far above chance.
    assert full_acc > 10 / LABELS and pca_acc > 10 / LABELS
    assert f"probe top-1: PCA {stats['pca']['accuracy']} vs 1280-d {stats['full']['accuracy']}" in page

    # The page states the run's numbers, read from S3, and escapes what it quotes.
    summary = read_json(f"runs/{safe_run_id(second.run_id)}/summary.json")
    assert html.escape(second.run_id) in page
    assert f"<b>{summary['embedded']}</b><span>embedded</span>" in page
    assert f"k = <b>{meta['k']}</b>" in page
    embed_metrics = read_json(f"runs/{safe_run_id(second.run_id)}/embed.json")
    assert f"{embed_metrics['images_per_s']:,.1f}" in page
    assert sorted(re.findall(r'<img id="(plot-[a-z]+)" class="plot"', page)) == PLOTS
    assert "No file of this run was rejected." in page


def test_report_renders_in_chromium(later_runs, artifacts, capsys):
    second = later_runs["second"]
    page_file = artifacts / "report.html"
    page_file.write_text(report_html(second.run_id))
    shot = artifacts / "report-screenshot.png"
    with browser() as page:
        page.goto(page_file.resolve().as_uri())
        assert page.eval("document.title").startswith("Fruits! run report")
        images = page.eval(
            "Array.from(document.querySelectorAll('img.plot')).map(i => "
            "({id: i.id, w: i.naturalWidth, h: i.naturalHeight, shown: i.getBoundingClientRect().width}))"
        )
        # Every plot decoded into a real bitmap and is laid out on the page.
        assert sorted(i["id"] for i in images) == PLOTS
        assert all(i["w"] > 300 and i["h"] > 150 and i["shown"] > 300 for i in images), images
        probe = page.eval("document.getElementById('probe-result').textContent")
        assert probe.startswith("probe top-1: PCA ")
        headings = page.eval("Array.from(document.querySelectorAll('h2')).map(h => h.id)")
        assert {"batches", "rejects", "steps", "pca", "scatter", "probe"} <= set(headings)
        page.screenshot(shot)
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000
    with capsys.disabled():
        print(f"\n    report screenshot: {shot}\n    report page: {page_file}")


def test_emr_cost_section():
    """On EMR the summary carries instance-hours (plugins/fruits/emr.py); the page shows hours x price."""
    from fruits.config import instance_types
    from fruits.report import _cost_section

    hours = {"m5.xlarge": 0.75}
    price = instance_types()["m5.xlarge"]
    expected = 0.75 * (price.ec2_usd_per_hour + price.emr_usd_per_hour)
    page = _cost_section(
        {
            "emr": {
                "cluster_id": "j-TEST",
                "cluster_hours": 0.25,
                "instance_hours": hours,
                "estimated_cost_usd": round(expected, 4),
                "final": True,
                "unpriced_instance_types": [],
                "prices": "list prices",
            }
        }
    )
    assert (
        f"Estimated cost: ${expected:,.2f}" in page and "0.750" in page and f"${expected:,.2f}</td>" in page
    )
    assert _cost_section({"batches": 1}) == ""  # local runs: no cost section
