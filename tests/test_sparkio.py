"""sparkio.map_in_arrow: the same rows as PySpark's own DataFrame.mapInArrow, without importing pandas in
the driver (PySpark's version imports it: 0.5 to 2 s of every step). Real: a local Spark driver in its own
process (this test process has pandas imported already), spark-submit-free but the same PySpark."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

DRIVER = """
import json, sys
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import SparkSession
from fruits_jobs import sparkio

spark = SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false").getOrCreate()
frame = spark.range(50).selectExpr("id", "cast(id * 3 as string) as s").repartition(3)

def double(batches):
    for b in batches:
        yield pa.RecordBatch.from_arrays([pc.multiply(b.column(0), 2), b.column(1)], names=["id2", "s"])

ours = sorted(tuple(r) for r in sparkio.map_in_arrow(frame, double, "id2 long, s string").collect())
pandas_after_ours = "pandas" in sys.modules
theirs = sorted(tuple(r) for r in frame.mapInArrow(double, "id2 long, s string").collect())
print(json.dumps({"ours": ours, "theirs": theirs, "pandas_after_ours": pandas_after_ours,
                  "pandas_after_theirs": "pandas" in sys.modules}))
spark.stop()
"""


def test_map_in_arrow_equals_pyspark_and_leaves_pandas_unimported():
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYTHONPATH": str(REPO / "spark_jobs")}
    done = subprocess.run(
        [sys.executable, "-c", DRIVER], env=env, capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["ours"] == out["theirs"]
    assert out["ours"] == [[2 * i, str(3 * i)] for i in range(50)]
    assert out["pandas_after_ours"] is False  # the point of the helper
    assert out["pandas_after_theirs"] is True  # PySpark's own call does import it: the test can tell
