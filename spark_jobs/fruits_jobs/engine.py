"""MobileNetV2 inference engines, built once per Python worker process and reused for every batch.

Each engine maps a (N, 224, 224, 3) float32 batch, already scaled to [-1, 1], to (N, 1280) float32.
Threads are pinned to the Spark task's share of cores: an unpinned TensorFlow in every task
oversubscribes the machine and runs slower than a pinned one.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

import numpy as np

EMBEDDING_DIM = 1280
MODEL_NAME = "mobilenet_v2_1.0_224-imagenet-notop-avgpool"
ENGINES = ("tf", "onnx")
# Photos per engine call, whatever the Arrow batch. On one thread a small batch keeps the activations in
# the core's cache: both engines run fastest at 8 (ONNX Runtime 198 img/s at 8 against 165 at 64,
# TensorFlow 136 against 115, one thread on the dev machine; docs/performance.md).
MODEL_BATCH = 8

Embedder = Callable[[np.ndarray], np.ndarray]
_CACHE: dict[tuple[str, str, int], Embedder] = {}


def model_id(weights_sha256: str) -> str:
    """Identifies the network and the exact weights, so embeddings from other weights never mix."""
    return f"{MODEL_NAME}@{weights_sha256[:12]}"


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_keras_model(weights: str):
    """The Keras model. `weights` is a local .h5 path, or "imagenet" on machines with internet."""
    import keras

    return keras.applications.MobileNetV2(
        weights=weights, include_top=False, pooling="avg", input_shape=(224, 224, 3)
    )


def _tf_engine(weights: str, threads: int) -> Embedder:
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TF already initialised in this process; keep its settings.
        pass
    model = build_keras_model(weights)

    @tf.function(input_signature=[tf.TensorSpec([None, 224, 224, 3], tf.float32)], reduce_retracing=True)
    def forward(x):
        return model(x, training=False)

    return lambda batch: forward(tf.constant(batch)).numpy()


def _onnx_engine(onnx_path: str, threads: int) -> Embedder:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(onnx_path, sess_options=options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {input_name: batch})[0]


def get_engine(kind: str, model_path: str, threads: int) -> Embedder:
    """The process-wide engine for (kind, model, threads); built on first use only."""
    key = (kind, model_path, threads)
    if key not in _CACHE:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        if kind == "tf":
            _CACHE[key] = _tf_engine(model_path, threads)
        elif kind == "onnx":
            _CACHE[key] = _onnx_engine(model_path, threads)
        else:
            raise ValueError(f"unknown engine {kind!r}; choose one of {ENGINES}")
    return _CACHE[key]
