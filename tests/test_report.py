"""The run report, end to end on real parts: a moto S3 server process, the real DAG (dag.test over a
migrated SQLite database), spark-submit on a local Spark, the real MobileNetV2 weights, real Fruits-360
Training and Test photos (all 24 varieties), and a real headless Chromium (Debian's `chromium`) that
renders the HTML page read back from S3.

Two runs, as a user would do them: a Training batch (fits the PCA), then a Test batch (transformed with
that PCA, never fitted on). The second run's report carries the linear probe; the test recomputes it
independently from the Parquet in S3 and checks the page says the same.
"""

from __future__ import annotations

import html
import re

import numpy as np
import pytest
from chromium import browser
from conftest import list_keys, read_json, read_parquet, run_dag, s3_hook, sample_files, upload_sample

TRAIN, TEST = "train-2026-01", "test-2026-01"
LABELS, TRAIN_PER_LABEL, TEST_PER_LABEL = 24, 4, 2
PLOTS = ["plot-cumulative", "plot-scatter", "plot-scree", "plot-steps"]


@pytest.fixture(scope="module")
def two_runs(airflow_db, bucket):
    upload_sample(TRAIN, sample_files("Training", labels=LABELS, per_label=TRAIN_PER_LABEL))
    first = run_dag({"batch_ids": [TRAIN]})
    upload_sample(TEST, sample_files("Test", labels=LABELS, per_label=TEST_PER_LABEL))
    second = run_dag({"batch_ids": [TEST]})
    return first, second


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


def test_reports_in_s3(two_runs):
    first, second = two_runs
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


def test_report_renders_in_chromium(two_runs, artifacts, capsys):
    _, second = two_runs
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
