"""sparkio.map_in_arrow: the same rows as PySpark's own DataFrame.mapInArrow, without importing pandas in
the driver (PySpark's version imports it: 0.5 to 2 s of every step). Real: a local Spark driver in its own
process (this test process has pandas imported already), spark-submit-free but the same PySpark."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO

DRIVER = """
import json, sys
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import SparkSession
from fruits_jobs import sparkio

spark = (
    SparkSession.builder.master("local[2]")
    .config("spark.ui.enabled", "false")
    .config("spark.driver.extraJavaOptions", sys.argv[1])
    .getOrCreate()
)
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
    from fruits.tuning import LOCAL_JVM_OPTIONS

    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYTHONPATH": str(REPO / "spark_jobs")}
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, LOCAL_JVM_OPTIONS],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["ours"] == out["theirs"]
    assert out["ours"] == [[2 * i, str(3 * i)] for i in range(50)]
    assert out["pandas_after_ours"] is False  # the point of the helper
    assert out["pandas_after_theirs"] is True  # PySpark's own call does import it: the test can tell


# --- local steps import the installed pyspark (spark_jobs/local_site/sitecustomize.py) -------------------
WHERE = """
import json, sys
import pyspark
from pyspark.sql import SparkSession

def where(_):
    import sys
    import pyspark
    return [pyspark.__file__, [p for p in sys.path if p.endswith(".zip")]]

spark = SparkSession.builder.config("spark.ui.enabled", "false").getOrCreate()
worker = spark.sparkContext.parallelize([0], 1).map(where).collect()[0]
print(json.dumps({"driver": [pyspark.__file__, [p for p in sys.path if p.endswith(".zip")]], "worker": worker}))
spark.stop()
"""


def test_a_local_step_imports_the_installed_pyspark_not_the_zip(tmp_path):
    """A real spark-submit with a local step's PYTHONPATH (local_compute.local_python_path): its driver and
    its worker import pyspark from the installed package, whose bytecode is compiled once, and have no
    pyspark zip left on their path (PySpark's worker re-reads every zip's directory at each task)."""
    import pyspark
    from fruits.local_compute import local_python_path
    from fruits.tuning import LOCAL_JVM_OPTIONS

    script = tmp_path / "where.py"
    script.write_text(WHERE)
    env = {
        **os.environ,
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "PYTHONPATH": local_python_path(REPO / "spark_jobs"),
    }
    spark_submit = str(Path(sys.executable).parent / "spark-submit")
    done = subprocess.run(
        [spark_submit, "--master", "local[1]", "--driver-java-options", LOCAL_JVM_OPTIONS, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    installed = str(Path(pyspark.__file__))
    assert ".zip" not in installed
    for side in ("driver", "worker"):
        module, zips = out[side]
        assert module == installed, (side, module)
        assert not [z for z in zips if "pyspark" in Path(z).name or "py4j" in Path(z).name], (side, zips)
