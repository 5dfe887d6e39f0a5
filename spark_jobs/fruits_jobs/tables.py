"""How the steps lay out what they write, and the checks they compute on it (Spark side).

- Output files: each batch partition holds ceil(rows / ROWS_PER_FILE) files, whatever else the run
  writes: rows are shuffled by (batch_id, file number), so a batch's rows never spread over every task
  of the run (write_by_batch).
- Checks: per batch, counts, vector dims, null vectors, NaN/inf values, duplicate paths, the model ids;
  computed by Spark on what was written (read back), written as a small JSON file for the Airflow side,
  which then reads only that and the Parquet footers (plugins/fruits/validate.py).
"""

from __future__ import annotations

import math

from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

# About 100 MB of float32 1280-d vectors per Parquet file.
ROWS_PER_FILE = 20_000


def path_hash() -> Column:
    """A stable hash of the path in [0, 1): xxhash64 (seed 42, fixed in Spark) of the exact path string.
    The same photo gets the same value in every run, every Spark version, every cluster."""
    return (F.xxhash64("path").bitwiseAND(F.lit(0x7FFFFFFFFFFFFFFF)) / F.lit(float(2**63))).alias("h")


def files_per_batch(counts: dict[str, int], rows_per_file: int = ROWS_PER_FILE) -> dict[str, int]:
    return {b: max(1, math.ceil(n / rows_per_file)) for b, n in counts.items()}


def write_by_batch(
    spark: SparkSession,
    frame: DataFrame,
    counts: dict[str, int],
    uri: str,
    partition_cols: list[str],
    rows_per_file: int = ROWS_PER_FILE,
) -> None:
    """Write `frame` partitioned by `partition_cols` (ending with batch_id), exactly ceil(rows /
    rows_per_file) files per batch partition. `counts` = {batch_id: rows of frame}: a few numbers per
    batch, from the step's own aggregates, never from a scan of history.

    A row's file number is its rank by path within its batch // rows_per_file (ranked on the narrow
    (batch_id, path) projection), so each (batch, file number) holds rows_per_file rows but the last.
    Rows are shuffled by (batch, file number); two such keys of a batch may share a task, and then
    maxRecordsPerFile = rows_per_file cuts that task's rows of the batch into as many files as keys."""
    if not counts:
        return
    spark.conf.set("spark.sql.files.maxRecordsPerFile", str(rows_per_file))
    per_batch = files_per_batch(counts, rows_per_file)
    if max(per_batch.values()) == 1:
        # Every batch fits one file (the usual run): file number 0, no ranking window and no join, which
        # would shuffle and sort the whole rows (vectors included) once more.
        numbered = frame.withColumn("_file", F.lit(0))
    else:
        rank = Window.partitionBy("batch_id").orderBy("path")
        numbered = frame.join(
            frame.select("batch_id", "path").withColumn(
                "_file", F.floor((F.row_number().over(rank) - 1) / F.lit(rows_per_file)).cast("int")
            ),
            ["batch_id", "path"],
        )
    (
        numbered.repartition(sum(per_batch.values()), "batch_id", "_file")
        .drop("_file")
        .write.mode("overwrite")
        .partitionBy(*partition_cols)
        .parquet(uri)
    )


def nonfinite_count(column: str) -> Column:
    """NaN, +inf and -inf values in an array<float> column, per row (null array: 0)."""
    return F.coalesce(
        F.aggregate(
            F.col(column),
            F.lit(0).cast("long"),
            lambda acc, x: acc + F.when(F.isnan(x) | (F.abs(x) == F.lit(float("inf"))), 1).otherwise(0),
        ),
        F.lit(0).cast("long"),
    )


def vector_checks(frame: DataFrame, column: str, extra: list[Column] | None = None) -> dict[str, dict]:
    """{batch_id: {rows, distinct_paths, dim_min, dim_max, null_vectors, nonfinite_values, ...}}."""
    aggs = [
        F.count("*").alias("rows"),
        F.countDistinct("path").alias("distinct_paths"),
        F.min(F.when(F.col(column).isNotNull(), F.size(column))).alias("dim_min"),
        F.max(F.when(F.col(column).isNotNull(), F.size(column))).alias("dim_max"),
        F.sum(F.col(column).isNull().cast("long")).alias("null_vectors"),
        F.sum(nonfinite_count(column)).alias("nonfinite_values"),
        *(extra or []),
    ]
    out = {}
    for row in frame.groupBy("batch_id").agg(*aggs).collect():
        d = row.asDict()
        out[d.pop("batch_id")] = d  # dims over the non-null vectors; nulls are counted apart
    return out


def counts_by(frame: DataFrame, column: str) -> dict[str, dict[str, int]]:
    """{batch_id: {value: rows}} for a small-cardinality column (labels, reject reasons)."""
    out: dict[str, dict[str, int]] = {}
    for row in frame.groupBy("batch_id", column).count().collect():
        out.setdefault(row["batch_id"], {})[str(row[column])] = int(row["count"])
    return out


def read_partitions(spark: SparkSession, root: str, batches: list[str], prefix: str = "") -> DataFrame | None:
    """The named batch partitions of a table (with batch_id as a column); None when none exists."""
    from fruits_jobs import sparkio

    base = root.rstrip("/") + ("/" + prefix.strip("/") if prefix else "")
    present = [f"{base}/batch_id={b}" for b in batches if sparkio.exists(spark, f"{base}/batch_id={b}")]
    if not present:
        return None
    return spark.read.option("basePath", base).parquet(*present)
