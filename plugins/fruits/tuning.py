"""Spark settings derived from the cores at hand, so nothing about parallelism is hard-coded.

Reasoning (measured figures in docs/performance.md): one Spark task per core, each running the model on
one intra-op thread, beats fewer tasks with more threads each, because decoding is single-threaded
Python and runs in the same task. The Arrow batch bounds the memory a Python worker holds at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ARROW_BATCH = 64  # images per Arrow batch: 64 x 224 x 224 x 3 float32 is about 38 MB per worker


@dataclass(frozen=True)
class SparkTuning:
    master: str | None
    task_cpus: int
    threads_per_task: int
    arrow_batch: int
    extra: dict[str, str]

    def conf(self) -> dict[str, str]:
        return {
            "spark.task.cpus": str(self.task_cpus),
            "spark.sql.execution.arrow.maxRecordsPerBatch": str(self.arrow_batch),
            "spark.python.worker.reuse": "true",
            "spark.sql.sources.partitionOverwriteMode": "dynamic",
            **self.extra,
        }


def local_tuning(master: str = "local[*]", cores: int | None = None) -> SparkTuning:
    cores = cores or os.cpu_count() or 1
    if master == "local[*]":
        master = f"local[{cores}]"
    return SparkTuning(
        master=master,
        task_cpus=1,
        threads_per_task=1,
        arrow_batch=ARROW_BATCH,
        extra={"spark.driver.memory": "2g", "spark.ui.showConsoleProgress": "false"},
    )


# --- EMR: sized from the instance type ----------------------------------------------------------------
# Measured on the dev machine (fruits_jobs/engine.py, 1 thread, peak RSS): with TF 2.21 a Python worker
# holds ~700 MB once MobileNetV2 is loaded and its peak grows by ~21 MB per image of the batch it runs
# (32 images -> 1.2 GB, 64 -> 2.0 GB); with ONNX Runtime ~85 MB and ~14 MB per image (64 -> 1.0 GB).
# The sizing uses the TF figures, the larger, so either engine fits.
TF_WORKER_BASE_MB = 700
TF_WORKER_MB_PER_IMAGE = 21
WORKER_HEADROOM = 1.25
# YARN gets about 3/4 of a node's RAM on EMR (12,288 of 16,384 MiB on an m5.xlarge); the rest is the OS
# and the EMR/Hadoop daemons.
YARN_SHARE = 0.75
EXECUTOR_HEAP_MB = 2048  # the JVM only lists files, moves Arrow batches and writes Parquet
AM_RESERVE_MB = 1024  # the YARN application master (client mode) sits on one core node
JVM_OFF_HEAP_MB = 384  # Spark's own minimum memory overhead, before the Python workers


def emr_tuning(core_type: str, primary_type: str, python: str) -> SparkTuning:
    """Spark settings for a cluster of `core_type` core nodes.

    Why these numbers:
    - One executor per core node with every vCPU, one task per vCPU and one TF thread per task: the
      same shape as locally (decoding is single-threaded Python in the same task).
    - Client deploy mode: the driver runs on the primary node, which otherwise idles, so the core nodes
      hold executors only, and the driver's output (a Python traceback included) is the step's stderr,
      which the DAG shows when a step fails.
    - The Python workers live outside the JVM heap, so they are paid for in spark.executor.memoryOverhead
      (spark.executor.pyspark.memory is left unset: its address-space limit breaks TensorFlow).
    - The Arrow batch is the largest power of two whose activations fit a worker's share of that
      overhead, capped at the local ARROW_BATCH (bigger batches are not faster).
    """
    from fruits.config import instance_types

    table = instance_types()
    for name in (core_type, primary_type):
        if name not in table:
            raise ValueError(
                f"instance type {name!r} has no entry in config.INSTANCE_TYPES ({', '.join(sorted(table))}); "
                "add its vCPU, memory and prices there"
            )
    core, primary = table[core_type], table[primary_type]
    container_mb = int(core.memory_gib * 1024 * YARN_SHARE) - AM_RESERVE_MB
    overhead_mb = container_mb - EXECUTOR_HEAP_MB
    per_worker_mb = (overhead_mb - JVM_OFF_HEAP_MB) / core.vcpu
    fits = int((per_worker_mb / WORKER_HEADROOM - TF_WORKER_BASE_MB) / TF_WORKER_MB_PER_IMAGE)
    if fits < 8:
        raise ValueError(
            f"{core_type} has {core.memory_gib} GiB for {core.vcpu} vCPUs: too little memory per core for "
            "a TensorFlow worker (about 1 GB each). Use an m5 or r5 type."
        )
    arrow_batch = min(ARROW_BATCH, 1 << (fits.bit_length() - 1))
    driver_mb = min(4096, primary.memory_gib * 1024 // 4)
    return SparkTuning(
        master=None,  # YARN, from the cluster's spark-defaults
        task_cpus=1,
        threads_per_task=1,
        arrow_batch=arrow_batch,
        extra={
            "spark.executor.cores": str(core.vcpu),
            "spark.executor.memory": f"{EXECUTOR_HEAP_MB}m",
            "spark.executor.memoryOverhead": f"{overhead_mb}m",
            "spark.driver.memory": f"{driver_mb}m",
            "spark.pyspark.python": python,
            "spark.pyspark.driver.python": python,
            "spark.executorEnv.OMP_NUM_THREADS": "1",
            "spark.ui.showConsoleProgress": "false",
        },
    )
