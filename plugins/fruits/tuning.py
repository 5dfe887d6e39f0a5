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
