"""MobileNetV2 inference engines, built once per Python worker process and reused for every batch.

Each engine maps a (N, 224, 224, 3) float32 batch, already scaled to [-1, 1], to (N, 1280) float32.
Threads are pinned to the Spark task's share of cores: an unpinned TensorFlow in every task
oversubscribes the machine and runs slower than a pinned one.
"""

from __future__ import annotations

import hashlib
import os
import time
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
_CACHE: dict[tuple[str, str, int, int], Embedder] = {}


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


def _tf_engine(weights: str, threads: int, batch: int = MODEL_BATCH) -> Embedder:
    """One graph traced once for a fixed (batch, 224, 224, 3) input: a short last call is padded with
    zeros (its extra rows dropped), a longer one split, so the shapes never change and the graph is
    never retraced; static shapes also let the graph optimiser fold every layer's shape once."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TF already initialised in this process; keep its settings.
        pass
    model = build_keras_model(weights)

    @tf.function(input_signature=[tf.TensorSpec([batch, 224, 224, 3], tf.float32)])
    def forward(x):
        return model(x, training=False)

    def run(x: np.ndarray) -> np.ndarray:
        outs = []
        for start in range(0, len(x), batch):
            part = x[start : start + batch]
            n = len(part)
            if n < batch:
                part = np.concatenate([part, np.zeros((batch - n, *part.shape[1:]), part.dtype)])
            outs.append(forward(part).numpy()[:n])
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    return run


def _onnx_engine(onnx_path: str, threads: int) -> Embedder:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(onnx_path, sess_options=options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {input_name: batch})[0]


def engine_pool_cpu_s() -> float:
    """CPU seconds so far of the engine's own thread pool in this process (TensorFlow runs its kernels in
    threads it names tf_*; ONNX Runtime on one intra-op thread runs in the caller's thread, so 0 then).
    With time.thread_time() of the calling thread around each forward call, this is the engine's whole
    CPU: the pool threads do nothing but the engine's work. From /proc (Linux); 0.0 elsewhere."""
    total = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0.0
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/stat") as handle:
                comm, rest = handle.read().rsplit(")", 1)
        except OSError:
            continue  # the thread ended
        if comm.split("(", 1)[1].startswith("tf_"):
            fields = rest.split()
            total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """Sums the engine's CPU seconds over the forward calls of one task (see engine_pool_cpu_s)."""

    def __init__(self) -> None:
        self.caller_s = 0.0
        self._pool_start = engine_pool_cpu_s()

    def timed(self, forward: Embedder) -> Embedder:
        def run(x: np.ndarray) -> np.ndarray:
            t0 = time.thread_time()
            try:
                return forward(x)
            finally:
                self.caller_s += time.thread_time() - t0

        return run

    def total_s(self) -> float:
        return self.caller_s + engine_pool_cpu_s() - self._pool_start


def get_engine(kind: str, model_path: str, threads: int, batch: int = MODEL_BATCH) -> Embedder:
    """The process-wide engine for (kind, model, threads, batch); built on first use only. `batch` is the
    photos per call the caller means to pass (TensorFlow's graph is traced for exactly that shape)."""
    key = (kind, model_path, threads, batch if kind == "tf" else 0)
    if key not in _CACHE:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        if kind == "tf":
            _CACHE[key] = _tf_engine(model_path, threads, batch)
        elif kind == "onnx":
            _CACHE[key] = _onnx_engine(model_path, threads)
        else:
            raise ValueError(f"unknown engine {kind!r}; choose one of {ENGINES}")
    return _CACHE[key]
