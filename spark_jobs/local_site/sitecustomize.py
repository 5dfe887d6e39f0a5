"""Imported at start by the Python driver and workers of a local step (plugins/fruits/local_compute.py puts
this folder on their PYTHONPATH): they import Spark's Python code as installed, compiled once, not from a
zip.

spark-submit puts SPARK_HOME/python/lib/pyspark.zip and py4j's zip first on every Python's path. A zip
holds no bytecode, so each step's driver and each daemon of its workers compiled pyspark from source
(0.3 s of CPU each), and every task re-read the zips' directories (PySpark's worker calls
importlib.invalidate_caches, about 30 ms a task). With pip's pyspark, SPARK_HOME is the installed package
itself: the zips are copies of code that is importable without them, and only then are they dropped. A
Spark installed otherwise (EMR's, a cluster's own) keeps its zips. The venv's Python has no
sitecustomize of its own for this one to hide.
"""

import os
import sys
from importlib.util import find_spec


def _drop_zipped_copies_of_installed_pyspark() -> None:
    home = os.environ.get("SPARK_HOME")
    if not home or not os.path.isfile(os.path.join(home, "__init__.py")):
        return  # not pip's pyspark: the zips are the only copy
    lib = os.path.realpath(os.path.join(home, "python", "lib"))
    zipped = [p for p in sys.path if p.endswith(".zip") and os.path.dirname(os.path.realpath(p)) == lib]
    if not zipped:
        return
    kept = [p for p in sys.path if p not in zipped]
    before, sys.path[:] = sys.path[:], kept
    if find_spec("pyspark") is None or find_spec("py4j") is None:  # not importable without them after all
        sys.path[:] = before


_drop_zipped_copies_of_installed_pyspark()
