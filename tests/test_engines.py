"""The ONNX Runtime engine against TensorFlow, and how its model file is made, staged and trusted.

Real parts: the moto S3 server process on localhost (through the amazon provider's S3Hook), the real
Keras -> ONNX export (tf2onnx, in its own process as in the DAG), the real MobileNetV2 ImageNet weights,
all 1,680 Fruits-360 sample photos decoded by the job's own code, TensorFlow and ONNX Runtime, and a whole
DAG run (dag.test, spark-submit on local Spark) with the non-default engine.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    BUCKET,
    SAMPLE,
    WEIGHTS,
    get_dag,
    read_json,
    read_parquet,
    run_dag,
    s3_hook,
    sample_files,
    task_states,
    upload_sample,
)

WEIGHTS_SHA = hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
WEIGHTS_URI = f"s3://{BUCKET}/artifacts/models/mobilenet_v2_1.0_224_no_top.h5"


def _catalog():
    from fruits.catalog import Catalog
    from fruits.layout import Layout

    return Catalog(s3_hook(), Layout(BUCKET))


def _sha256_s3(key: str) -> str:
    return hashlib.sha256(s3_hook().get_key(key, BUCKET).get()["Body"].read()).hexdigest()


@pytest.fixture(scope="module")
def staged(airflow_db, bucket, tmp_path_factory):
    """The first ensure_onnx of a bucket on a machine without an export: a real export, then staged (the
    file, then its manifest). This module has an ONNX cache of its own, empty, so the export runs here
    whatever the suite's shared cache holds, and the other worker's runs never see it change."""
    from fruits.config import settings
    from fruits.onnx_model import ensure_onnx

    before = os.environ.get("FRUITS_ONNX_CACHE_DIR")
    os.environ["FRUITS_ONNX_CACHE_DIR"] = str(tmp_path_factory.mktemp("onnx-cache"))
    try:
        # Two runs needing the export at once (the suite's two workers on a fresh machine): one exports,
        # the other waits for the machine's copy and uploads it.
        with ThreadPoolExecutor(2) as pool:
            done = list(
                pool.map(lambda _: ensure_onnx(_catalog(), WEIGHTS_URI, WEIGHTS_SHA, settings()), [0, 1])
            )
        uri = done[0][0]
        assert done[1][0] == uri
        yield {"uri": uri, "actions": sorted(a for _, a in done), "key": uri[len(f"s3://{BUCKET}/") :]}
    finally:
        if before is None:
            os.environ.pop("FRUITS_ONNX_CACHE_DIR", None)
        else:
            os.environ["FRUITS_ONNX_CACHE_DIR"] = before


def test_export_is_staged_per_weights_version_with_a_checked_manifest(staged):
    assert staged["actions"] == ["exported", "uploaded"]  # one export, the other run waited for it
    assert staged["key"] == f"artifacts/models/{WEIGHTS_SHA[:12]}/mobilenet_v2_avgpool.onnx"
    manifest = read_json(staged["key"] + ".json")
    assert manifest["weights_sha256"] == WEIGHTS_SHA
    assert manifest["onnx_sha256"] == _sha256_s3(staged["key"])
    assert manifest["output_dim"] == 1280 and manifest["probe"]["min_cosine"] >= 0.999
    assert manifest["model_id"] == f"mobilenet_v2_1.0_224-imagenet-notop-avgpool@{WEIGHTS_SHA[:12]}"


def test_staged_export_is_reused_and_never_trusted_blind(staged):
    from fruits.config import settings
    from fruits.onnx_model import ensure_onnx

    hook, key, s = s3_hook(), staged["key"], settings()
    good = s3_hook().get_key(key, BUCKET).get()["Body"].read()
    etag = hook.head_object(key, BUCKET)["ETag"]
    assert ensure_onnx(_catalog(), WEIGHTS_URI, WEIGHTS_SHA, s) == (staged["uri"], "reused")
    assert hook.head_object(key, BUCKET)["ETag"] == etag  # not uploaded again

    # A corrupt object (one byte changed) no longer matches its manifest: replaced by the checked copy.
    hook.load_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]), key, BUCKET, replace=True)
    assert ensure_onnx(_catalog(), WEIGHTS_URI, WEIGHTS_SHA, s) == (staged["uri"], "uploaded")
    assert _sha256_s3(key) == hashlib.sha256(good).hexdigest()

    # A manifest written for other weights (stale) is not trusted either.
    manifest = read_json(key + ".json")
    _catalog().write_json(key + ".json", {**manifest, "weights_sha256": "0" * 64})
    assert ensure_onnx(_catalog(), WEIGHTS_URI, WEIGHTS_SHA, s)[1] == "uploaded"
    assert read_json(key + ".json")["weights_sha256"] == WEIGHTS_SHA


def test_onnx_matches_tensorflow_on_the_whole_sample(staged, tmp_path: Path):
    """Cosine >= 0.999 on every one of the 1,680 sample photos, decoded as the job decodes them."""
    from fruits_jobs import imaging
    from fruits_jobs.engine import get_engine

    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(s3_hook().get_key(staged["key"], BUCKET).get()["Body"].read())
    files = sorted(SAMPLE.glob("*/*/*.jpg"))
    assert len(files) == 1680
    tf_forward = get_engine("tf", str(WEIGHTS), 2)
    onnx_forward = get_engine("onnx", str(onnx_file), 2)
    cosines = []
    for i in range(0, len(files), 64):
        x = imaging.preprocess(np.stack([imaging.decode_rgb224(f.read_bytes()) for f in files[i : i + 64]]))
        a, b = tf_forward(x).astype(np.float64), onnx_forward(x).astype(np.float64)
        assert a.shape == b.shape == (len(x), 1280)
        cosines += list((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
    assert len(cosines) == 1680
    assert min(cosines) >= 0.999, min(cosines)


def test_engine_parameter_selects_the_engine_end_to_end(staged, tmp_path: Path):
    """ONNX Runtime is the default engine; a DAG run with engine=tf runs TensorFlow, records it, keeps the
    weights' model_id (it names the weights, not the engine), and its vectors equal ONNX Runtime's on the
    same photos. (The default engine's whole DAG run is tests/test_pipeline.py.)"""
    from fruits.config import settings
    from fruits_jobs import imaging
    from fruits_jobs.engine import get_engine

    assert settings().engine == "onnx"
    assert get_dag().params["engine"] == "onnx"
    files = sample_files("Test", labels=4, per_label=2)
    upload_sample("engine-tf", files)
    dagrun = run_dag({"batch_ids": ["engine-tf"], "engine": "tf"})
    assert str(dagrun.state) in ("success", "DagRunState.SUCCESS"), task_states(dagrun)

    emb = read_parquet("embeddings/batch_id=engine-tf/")
    assert emb.num_rows == len(files)
    assert set(emb.column("engine").to_pylist()) == {"tf"}
    assert set(emb.column("model_id").to_pylist()) == {
        f"mobilenet_v2_1.0_224-imagenet-notop-avgpool@{WEIGHTS_SHA[:12]}"
    }
    by_path = dict(zip(emb.column("path").to_pylist(), emb.column("embedding").to_pylist(), strict=True))
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(s3_hook().get_key(staged["key"], BUCKET).get()["Body"].read())
    x = imaging.preprocess(np.stack([imaging.decode_rgb224(f.read_bytes()) for f in files]))
    expected = get_engine("onnx", str(onnx_file), 1)(x).astype(np.float64)
    for f, b in zip(files, expected, strict=True):
        a = np.asarray(
            by_path[f"s3://{BUCKET}/incoming/engine-tf/{f.parent.name}/{f.name}"], dtype=np.float64
        )
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) >= 0.999, f
