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
    """NaN, +inf and -inf values in an array<float> column, per row (null or empty array: 0).

    Counting them walks the array with a lambda, which Spark evaluates value by value, interpreted and
    boxed: on 5,040 photos that was over half of the embed step's executor CPU, for a count that is
    almost always 0. Only a row holding one is walked; array_max and array_min (compiled) find those:
    Spark sorts NaN above every number, so such a row's max is NaN or +inf, or its min is -inf."""
    values = F.col(column)
    top, bottom = F.array_max(values), F.array_min(values)
    holds_one = F.isnan(top) | (top == F.lit(float("inf"))) | (bottom == F.lit(float("-inf")))
    count = F.aggregate(
        values,
        F.lit(0).cast("long"),
        lambda acc, x: acc + F.when(F.isnan(x) | (F.abs(x) == F.lit(float("inf"))), 1).otherwise(0),
    )
    return F.when(holds_one, count).otherwise(F.lit(0).cast("long"))


def vector_checks(column: str, extra: list[Column] | None = None) -> list[Column]:
    """The per-batch checks of a vector column, for checks_by: dims, null vectors, NaN/inf values (dims
    over the non-null vectors; nulls are counted apart). Distinct paths are not among them: the embed step
    counts them over embeddings and rejects together, and a distinct count makes the rollup costlier."""
    return [
        F.min(F.when(F.col(column).isNotNull(), F.size(column))).alias("dim_min"),
        F.max(F.when(F.col(column).isNotNull(), F.size(column))).alias("dim_max"),
        F.sum(F.col(column).isNull().cast("long")).alias("null_vectors"),
        F.sum(nonfinite_count(column)).alias("nonfinite_values"),
        *(extra or []),
    ]


def distinct_paths() -> Column:
    return F.countDistinct("path").alias("distinct_paths")


def checks_by(
    frame: DataFrame, column: str, aggs: list[Column] | None = None
) -> tuple[dict[str, dict], dict[str, dict[str, int]]]:
    """({batch_id: {rows, *aggs}}, {batch_id: {value of `column`: rows}}) in one pass over the frame: a
    rollup of (batch_id, column) gives both levels, each exact (distinct counts included). Every
    aggregation is a Spark job or three, and a step's fixed cost is mostly such jobs."""
    rows = (
        frame.rollup("batch_id", column)
        .agg(F.count("*").alias("rows"), *(aggs or []), F.grouping(column).alias("_per_batch"))
        .where(F.grouping("batch_id") == 0)  # not the grand total
        .collect()
    )
    per_batch: dict[str, dict] = {}
    by_value: dict[str, dict[str, int]] = {}
    for row in rows:
        d = row.asDict()
        batch, value, whole = d.pop("batch_id"), d.pop(column), d.pop("_per_batch")
        if whole:
            per_batch[batch] = d
        else:
            by_value.setdefault(batch, {})[str(value)] = int(d["rows"])
    return per_batch, by_value


def unmatched_paths(left: DataFrame, right: DataFrame) -> tuple[dict[str, int], dict[str, int]]:
    """({batch_id: rows of left whose path right lacks}, {batch_id: rows of right whose path left lacks}):
    embeddings without features and features without an embedding, in one join."""
    both = left.select("batch_id", "path", F.lit(1).alias("_left")).join(
        right.select("batch_id", "path", F.lit(1).alias("_right")), ["batch_id", "path"], "full_outer"
    )
    only_left: dict[str, int] = {}
    only_right: dict[str, int] = {}
    for r in (
        both.groupBy("batch_id")
        .agg(
            F.sum(F.col("_right").isNull().cast("long")).alias("only_left"),
            F.sum(F.col("_left").isNull().cast("long")).alias("only_right"),
        )
        .collect()
    ):
        only_left[r["batch_id"]], only_right[r["batch_id"]] = int(r["only_left"]), int(r["only_right"])
    return only_left, only_right


# The tables' schemas as the steps write them (batch_id: the partition column). Read with them, Spark skips
# the job it runs to infer a schema from a file's footer: one Spark job less per read, and a small step
# is mostly such jobs (docs/performance.md).
EMBEDDINGS_SCHEMA = (
    "path string, label string, content_sha256 string, size_bytes long, embedding array<float>, "
    "model_id string, engine string, batch_id string"
)
REJECTS_SCHEMA = (
    "path string, label string, content_sha256 string, size_bytes long, reason string, batch_id string"
)
FEATURES_SCHEMA = (
    "path string, label string, content_sha256 string, features array<float>, pca_version string, "
    "model_id string, batch_id string"
)


def read_partitions(
    spark: SparkSession, root: str, batches: list[str], schema: str, prefix: str = ""
) -> DataFrame | None:
    """The named batch partitions of a table (with batch_id as a column); None when none exists.
    `schema`: the table's (above), so that Spark does not run a job to read it from a footer."""
    from fruits_jobs import sparkio

    base = root.rstrip("/") + ("/" + prefix.strip("/") if prefix else "")
    present = [f"{base}/batch_id={b}" for b in batches if sparkio.exists(spark, f"{base}/batch_id={b}")]
    if not present:
        return None
    return spark.read.option("basePath", base).schema(schema).parquet(*present)
