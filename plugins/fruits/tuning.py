"""Spark settings derived from the cores (and memory) at hand, so nothing about parallelism is hard-coded.

Both backends go through `task_shape`: the local one with this machine's cores, EMR with a core node's
vCPUs. The reasoning and the measured curve (images/s against the model batch and threads per task) are
in docs/performance.md; in short:

- One Spark task per core, each running the engine on one intra-op thread (spark.task.cpus = 1; the job
  takes its thread count from it). Decoding is single-threaded Python inside the same task, so a task
  with two threads leaves a core idle while it decodes, and letting every task use every core (what
  unpinned TensorFlow does) oversubscribes them.
- The Arrow batch bounds the rows (paths in, vectors out) a Python worker holds at once. The photos
  themselves are read by the worker, bounded in bytes (fruits_jobs/objects.py), and the engine runs a
  few at a time whatever the Arrow batch (fruits_jobs/engine.MODEL_BATCH).
- The embed job splits its input manifest into tasks of about 256 photos, at least two per core
  (spark_jobs/embed.py). For file scans (the PCA step's Parquet) Spark packs files into a task until
  their size plus an "open cost" per file reaches maxPartitionBytes; at least MIN_TASKS_PER_CORE tasks
  per core, so that a small input still uses every core.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

ARROW_BATCH = 64  # rows per Arrow batch, at most: paths in, 1280-d vectors out (about 330 KB of vectors)
THREADS_PER_TASK = 1
FILE_OPEN_COST_BYTES = 1 << 20
MAX_PARTITION_BYTES = 128 << 20
MIN_TASKS_PER_CORE = 2


@dataclass(frozen=True)
class SparkTuning:
    master: str | None
    task_cpus: int
    threads_per_task: int
    arrow_batch: int
    extra: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)  # for a local spark-submit's JVM

    def conf(self) -> dict[str, str]:
        return {
            "spark.task.cpus": str(self.task_cpus),
            "spark.sql.execution.arrow.maxRecordsPerBatch": str(self.arrow_batch),
            "spark.python.worker.reuse": "true",
            "spark.sql.sources.partitionOverwriteMode": "dynamic",
            **self.extra,
        }


@dataclass(frozen=True)
class TaskShape:
    task_cpus: int
    threads_per_task: int
    arrow_batch: int
    conf: dict[str, str]


def task_shape(cores: int, worker_mb: float, executors: int | None = 1) -> TaskShape:
    """What both backends derive from a node's cores and the memory each Python worker may use.

    `executors` is how many such nodes run tasks (None when unknown until run time: Spark then takes
    its default parallelism). Raises ValueError when a worker cannot hold 8 images."""
    fits = int((worker_mb / WORKER_HEADROOM - TF_WORKER_BASE_MB) / TF_WORKER_MB_PER_IMAGE)
    if fits < 8:
        raise ValueError(
            f"{worker_mb:.0f} MB per Python worker is too little memory per core for a TensorFlow worker "
            "(about 1 GB each)"
        )
    conf = {
        "spark.sql.files.openCostInBytes": str(FILE_OPEN_COST_BYTES),
        "spark.sql.files.maxPartitionBytes": str(MAX_PARTITION_BYTES),
    }
    if executors:
        conf["spark.sql.files.minPartitionNum"] = str(MIN_TASKS_PER_CORE * cores * executors)
    return TaskShape(
        task_cpus=THREADS_PER_TASK,
        threads_per_task=THREADS_PER_TASK,
        arrow_batch=min(ARROW_BATCH, 1 << (fits.bit_length() - 1)),
        conf=conf,
    )


def _memory_mb() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)


def native_blas_conf(folder: Path | None) -> dict[str, str]:
    """Spark ML's BLAS/LAPACK from OpenBLAS unpacked in `folder` (`make blas`), when it is there. The PCA
    fit's covariance and eigen-decomposition are several times faster than with the Java fallback. One
    OpenBLAS thread per call (see local_tuning): the tasks already run one per core."""
    lib = folder / "usr" / "lib" / "x86_64-linux-gnu" if folder else None
    if lib is None or not (lib / "openblas-pthread" / "libblas.so.3").exists():
        return {}
    return {
        "spark.driver.extraLibraryPath": f"{lib}:{lib / 'openblas-pthread'}",
        "spark.driver.extraJavaOptions": (
            f"-Ddev.ludovic.netlib.blas.nativeLibPath={lib / 'openblas-pthread' / 'libblas.so.3'} "
            f"-Ddev.ludovic.netlib.lapack.nativeLibPath={lib / 'openblas-pthread' / 'liblapack.so.3'}"
        ),
    }


# The local driver JVM lives for one step: its JIT's second tier (C2) and G1's concurrent threads cost more
# CPU than they give back on two cores. C1 alone and the serial collector: a no-op spark-submit took 30.6
# CPU-seconds with the defaults and 17.8 with these (same machine, back to back). EMR keeps the defaults.
LOCAL_JVM_OPTIONS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC -XX:CICompilerCount=1"


def local_tuning(
    master: str = "local[*]", cores: int | None = None, native_blas: Path | None = None
) -> SparkTuning:
    """Local Spark: the driver JVM is the executor. A quarter of the RAM goes to it (2 to 8 GB), so that
    the PCA fit's cache stays in memory; half of the rest is shared by the Python workers, one per core."""
    cores = cores or os.cpu_count() or 1
    if master == "local[*]":
        master = f"local[{cores}]"
    driver_mb = min(8192, max(2048, _memory_mb() // 4))
    shape = task_shape(cores, (_memory_mb() - driver_mb) / (2 * cores))
    blas = native_blas_conf(native_blas)
    java_options = " ".join([LOCAL_JVM_OPTIONS, blas.pop("spark.driver.extraJavaOptions", "")]).strip()
    return SparkTuning(
        master=master,
        task_cpus=shape.task_cpus,
        threads_per_task=shape.threads_per_task,
        arrow_batch=shape.arrow_batch,
        extra={
            **shape.conf,
            **blas,
            "spark.driver.extraJavaOptions": java_options,
            "spark.driver.memory": f"{driver_mb}m",
            "spark.ui.showConsoleProgress": "false",
            # A local step is a headless spark-submit whose progress is in the task log: its web UI (a
            # Jetty server started with every JVM, twice per run) is fixed cost nobody looks at.
            "spark.ui.enabled": "false",
            # Adaptive execution re-plans a query at every shuffle and runs each shuffle stage as a job
            # of its own: a small local step ran 20 to 25 jobs where 9 to 14 do, for 5% more CPU. Its
            # gains (coalesced partitions, joins switched to broadcast at run time) are for skewed or
            # mis-estimated data spread over a cluster; here shuffles go to a fixed few partitions per
            # core. EMR keeps Spark's defaults.
            "spark.sql.adaptive.enabled": "false",
            "spark.sql.shuffle.partitions": str(MIN_TASKS_PER_CORE * cores),
        },
        # Measured on the PCA refit: OpenBLAS's own threads on top of one task per core cost a third more
        # CPU and 20% more time.
        env={"OPENBLAS_NUM_THREADS": "1"},
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
    try:
        shape = task_shape(core.vcpu, per_worker_mb, executors=None)  # executors come and go on YARN
    except ValueError:
        raise ValueError(
            f"{core_type} has {core.memory_gib} GiB for {core.vcpu} vCPUs: too little memory per core for "
            "a TensorFlow worker (about 1 GB each). Use an m5 or r5 type."
        ) from None
    driver_mb = min(4096, primary.memory_gib * 1024 // 4)
    return SparkTuning(
        master=None,  # YARN, from the cluster's spark-defaults
        task_cpus=shape.task_cpus,
        threads_per_task=shape.threads_per_task,
        arrow_batch=shape.arrow_batch,
        extra={
            **shape.conf,
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
