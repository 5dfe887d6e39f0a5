"""Export the MobileNetV2 Keras model (same weights, same pooling) to ONNX, and check it against Keras.

    python -m fruits_jobs.onnx_export --weights W.h5 --out model.onnx --manifest model.json

Run once per weights version by the Airflow side (plugins/fruits/onnx_model.py), in its own process so
that TensorFlow never loads into the Airflow task. The ONNX Runtime engine then runs this file on the
workers. Kept beside engine.build_keras_model so both engines start from one model definition.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from datetime import UTC, datetime
from typing import Any

import numpy as np

from fruits_jobs.engine import EMBEDDING_DIM, build_keras_model, file_sha256, model_id

INPUT_NAME = "images"
# Deterministic probe inputs: enough to catch a broken graph; the real-photo check is tests/test_engines.py.
PROBE_SEED, PROBE_BATCH = 20240501, 4
MIN_COSINE = 0.999


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))


def export(weights: str, out_path: str) -> dict[str, Any]:
    """Write the ONNX file atomically and return its manifest; raise if it disagrees with Keras."""
    import keras
    import onnx
    import onnxruntime as ort
    import tensorflow as tf
    import tf2onnx

    model = build_keras_model(weights)
    spec = [tf.TensorSpec([None, 224, 224, 3], tf.float32, name=INPUT_NAME)]
    folder = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=folder)
    os.close(fd)
    try:
        model.export(tmp, format="onnx", verbose=False, input_signature=spec)
        probe = (
            np.random.default_rng(PROBE_SEED).uniform(-1, 1, (PROBE_BATCH, 224, 224, 3)).astype(np.float32)
        )
        expected = np.asarray(model(probe, training=False))
        session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: probe})[0]
        if got.shape != (PROBE_BATCH, EMBEDDING_DIM):
            raise RuntimeError(f"ONNX export gives shape {got.shape}, expected (N, {EMBEDDING_DIM})")
        cosine = float(_cosines(expected, got).min())
        if cosine < MIN_COSINE:
            raise RuntimeError(f"ONNX export disagrees with Keras: min cosine {cosine:.6f} < {MIN_COSINE}")
        opset = {o.domain or "ai.onnx": o.version for o in onnx.load(tmp).opset_import}
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    weights_sha = "keras-imagenet" if weights == "imagenet" else file_sha256(weights)
    return {
        "weights_sha256": weights_sha,
        "model_id": model_id(weights_sha),
        "onnx_sha256": file_sha256(out_path),
        "onnx_bytes": os.path.getsize(out_path),
        "input": INPUT_NAME,
        "output_dim": EMBEDDING_DIM,
        "opset": opset,
        "versions": {
            "keras": keras.__version__,
            "tensorflow": tf.__version__,
            "tf2onnx": tf2onnx.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
        },
        "probe": {
            "seed": PROBE_SEED,
            "images": PROBE_BATCH,
            "min_cosine": round(cosine, 9),
            "max_abs_diff": float(np.abs(expected - got).max()),
        },
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True, help='local Keras .h5 file, or "imagenet"')
    p.add_argument("--out", required=True, help="local path of the .onnx file to write")
    p.add_argument("--manifest", required=True, help="local path of the JSON manifest to write")
    args = p.parse_args(argv)
    manifest = export(args.weights, args.out)
    with open(args.manifest, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
