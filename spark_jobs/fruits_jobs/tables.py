"""How the steps lay out what they write, and the checks they compute on it (Spark side).

- Output files: each batch partition holds ceil(rows / ROWS_PER_FILE) files, whatever else the run
  writes: rows are shuffled by (batch_id, file number), the file number a hash of the path modulo the
  batch's file count, so a batch's rows never spread over every task of the run.
- Checks: per batch, counts, vector dims, null vectors, NaN/inf values, duplicate paths, the model ids;
  computed by Spark on what was written (read back), written as a small JSON file for the Airflow side,
  which then reads only that and the Parquet footers (plugins/fruits/validate.py).
"""

from __future__ import annotations

import math

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

# About 100 MB of float32 1280-d vectors per Parquet file.
ROWS_PER_FILE = 20_000
# Spark's own cap per file: above ROWS_PER_FILE so that a hash file number holding a few more rows than
# its share does not open a second file, below twice it so that no file is ever two files' worth.
MAX_RECORDS_PER_FILE = ROWS_PER_FILE * 5 // 4


def path_hash() -> Column:
    """A stable hash of the path in [0, 1): xxhash64 (seed 42, fixed in Spark) of the exact path string.
    The same photo gets the same value in every run, every Spark version, every cluster."""
    return (F.xxhash64("path").bitwiseAND(F.lit(0x7FFFFFFFFFFFFFFF)) / F.lit(float(2**63))).alias("h")


def files_per_batch(counts: dict[str, int]) -> dict[str, int]:
    return {b: max(1, math.ceil(n / ROWS_PER_FILE)) for b, n in counts.items()}


def write_by_batch(
    spark: SparkSession, frame: DataFrame, counts: dict[str, int], uri: str, partition_cols: list[str]
) -> None:
    """Write `frame` partitioned by `partition_cols` (ending with batch_id), ceil(rows / ROWS_PER_FILE)
    files per batch partition. `counts` = {batch_id: rows of frame}: a few numbers per batch, known from
    the step's own aggregates, never from a scan of history."""
    if not counts:
        return
    spark.conf.set("spark.sql.files.maxRecordsPerFile", str(MAX_RECORDS_PER_FILE))
    per_batch = files_per_batch(counts)
    n_files = spark.createDataFrame(sorted(per_batch.items()), "batch_id string, _files int")
    keyed = frame.join(F.broadcast(n_files), "batch_id").withColumn(
        "_file", F.pmod(F.xxhash64("path"), F.col("_files"))
    )
    # One shuffle partition per (batch, file number): at most that many files per batch partition.
    (
        keyed.repartition(sum(per_batch.values()), "batch_id", "_file")
        .drop("_files", "_file")
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
