"""The whole DAG on real parts: moto S3 server on localhost, Airflow (dag.test over a migrated SQLite
database), spark-submit on a local Spark reading s3a://, real MobileNetV2 ImageNet weights, real
Fruits-360 photos. Nothing is mocked; assertions are on the data read back from S3.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    BUCKET,
    WEIGHTS,
    list_keys,
    read_json,
    read_parquet,
    run_dag,
    s3_hook,
    sample_files,
    task_states,
    upload_sample,
)

B1, B2, B3 = "b1-training", "b2-more", "b3-not-ready"
N_LABELS, PER_LABEL = 24, 3


def weights_model_id() -> str:
    return (
        "mobilenet_v2_1.0_224-imagenet-notop-avgpool@" + hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()[:12]
    )


def snapshot(prefix: str) -> dict[str, str]:
    hook = s3_hook()
    return {k: hook.head_object(k, BUCKET)["ETag"] for k in list_keys(prefix)}


@pytest.fixture(scope="module")
def first_run(airflow_db, bucket):
    files = sample_files("Training", labels=N_LABELS, per_label=PER_LABEL)
    upload_sample(B1, files)
    dagrun = run_dag()
    return {"dagrun": dagrun, "files": files}


def test_full_run_outputs(first_run):
    assert str(first_run["dagrun"].state) in ("success", "DagRunState.SUCCESS")
    files: list[Path] = first_run["files"]

    emb = read_parquet(f"embeddings/batch_id={B1}/")
    assert emb.num_rows == len(files) == N_LABELS * PER_LABEL
    labels = emb.column("label").to_pylist()
    assert {lab: labels.count(lab) for lab in set(labels)} == {p.parent.name: PER_LABEL for p in files}
    assert sorted(emb.column("path").to_pylist()) == sorted(
        f"s3://{BUCKET}/incoming/{B1}/{p.parent.name}/{p.name}" for p in files
    )
    vectors = np.array(emb.column("embedding").to_pylist(), dtype=np.float32)
    assert vectors.shape == (len(files), 1280)
    assert np.isfinite(vectors).all() and (vectors >= 0).all() and vectors.std() > 0  # ReLU6 + avg pool
    assert set(emb.column("model_id").to_pylist()) == {weights_model_id()}
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
    fv = np.array(feats.column("features").to_pylist(), dtype=np.float32)
    assert fv.shape == (len(files), k) and np.isfinite(fv).all()
    # PCA scores of standardised data are centred, and component variances decrease.
    assert np.abs(fv.mean(axis=0)).max() < 1e-3 * max(1.0, fv.std())
    var = fv.var(axis=0)
    assert all(var[i] >= var[i + 1] * 0.999 for i in range(k - 1))

    record = read_json(f"ledger/batches/{B1}.json")
    assert (record["files"], record["embedded"], record["rejected"]) == (len(files), len(files), 0)
    assert record["pca_version"] == current["version"] and record["pca_k"] == k
    assert record["model_id"] == weights_model_id()
    assert not list_keys("ledger/claims/")  # released by the teardown


def test_incremental_runs(first_run):
    assert str(first_run["dagrun"].state).endswith("success")
    before = snapshot("")
    # 1. Nothing new: the run stops after detection; no Spark job, nothing in S3 changes.
    noop = run_dag()
    assert str(noop.state).endswith("success")
    states = task_states(noop)
    assert states["find_new_batches"] == "success"
    assert states["embed"] == states["pca"] == states["commit"] == "skipped"
    assert snapshot("") == before

    # 2. A new ready batch and a batch without _READY: only the ready one is processed.
    old_embeddings = snapshot(f"embeddings/batch_id={B1}/")
    old_content = read_parquet(f"embeddings/batch_id={B1}/")
    new_files = sample_files("Training", labels=4, per_label=2, offset=PER_LABEL)
    upload_sample(B2, new_files)
    upload_sample(B3, sample_files("Test", labels=2, per_label=2), ready=False)
    second = run_dag()
    assert str(second.state).endswith("success")
    assert task_states(second)["embed"] == "success"

    ledger = {k.rsplit("/", 1)[1][:-5] for k in list_keys("ledger/batches/")}
    assert ledger == {B1, B2}
    assert not list_keys(f"embeddings/batch_id={B3}/")
    emb2 = read_parquet(f"embeddings/batch_id={B2}/")
    assert emb2.num_rows == len(new_files)
    # The old batch's embeddings are untouched: same objects, same bytes, same content.
    assert snapshot(f"embeddings/batch_id={B1}/") == old_embeddings
    assert read_parquet(f"embeddings/batch_id={B1}/").equals(old_content)
    # No refit: the new batch is transformed with the current model, which did not change.
    current = read_json("models/pca/CURRENT.json")
    assert read_json(f"ledger/batches/{B2}.json")["pca_version"] == current["version"]
    assert read_json(f"ledger/batches/{B1}.json")["pca_version"] == current["version"]
    assert len({k.split("/")[2] for k in list_keys("models/pca/") if k.endswith("metadata.json")}) == 1


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
