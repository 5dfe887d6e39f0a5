"""Output files per batch partition (spark_jobs/fruits_jobs/tables.write_by_batch) on a real local Spark
writing Parquet to a local folder; the file size is lowered to a few rows so that a batch needs several
files. Real: pyspark local[2], Parquet files counted on disk and read back."""

from __future__ import annotations

import math

import pyarrow.parquet as pq


def test_each_batch_partition_holds_ceil_rows_over_file_size_files(spark, tmp_path):
    from fruits_jobs.tables import write_by_batch

    counts = {"b-small": 3, "b-mid": 12, "b-big": 41}
    rows = [(b, f"s3://x/incoming/{b}/l/{i}.jpg", i) for b, n in counts.items() for i in range(n)]
    # spread over many input tasks, as the embed step's model tasks are
    frame = spark.createDataFrame(rows, "batch_id string, path string, i long").repartition(7)
    write_by_batch(spark, frame, counts, str(tmp_path), ["batch_id"], rows_per_file=5)
    for b, n in counts.items():
        files = sorted((tmp_path / f"batch_id={b}").glob("*.parquet"))
        assert len(files) == math.ceil(n / 5), (b, len(files))
        assert sum(pq.read_metadata(f).num_rows for f in files) == n
        assert all(pq.read_metadata(f).num_rows <= 5 for f in files)
    assert len(list((tmp_path / "batch_id=b-small").glob("*.parquet"))) == 1


def test_checks_by_gives_exact_per_batch_checks_and_counts_by_value_in_one_pass(spark):
    """checks_by's rollup against the same figures computed by hand from the rows."""
    from fruits_jobs.tables import checks_by, distinct_paths, vector_checks
    from pyspark.sql import functions as F

    nan, inf = float("nan"), float("inf")
    rows = [
        ("b1", "p/a1", "apple", [1.0, 2.0, 3.0]),
        ("b1", "p/a1", "apple", [1.0, 2.0, 3.0]),  # a duplicate path
        ("b1", "p/a2", "apple", [0.0, 0.0, 0.0]),
        ("b1", "p/a2", "pear", [0.0, 0.0, 0.0]),  # the same path under another label: one distinct path
        ("b1", "p/p1", "pear", None),  # a null vector: not in the dims
        ("b2", "p/x1", None, [nan, inf, -inf, 1.0]),  # no label; three non-finite values, dim 4
        ("b2", "p/x2", "kiwi", [1.0, 2.0]),
    ]
    frame = spark.createDataFrame(rows, "batch_id string, path string, label string, v array<float>")
    per_batch, by_label = checks_by(
        frame, "label", vector_checks("v", [distinct_paths(), F.collect_set("label").alias("labels")])
    )
    assert {b: {k: v for k, v in d.items() if k != "labels"} for b, d in per_batch.items()} == {
        "b1": {
            "rows": 5,
            "distinct_paths": 3,
            "dim_min": 3,
            "dim_max": 3,
            "null_vectors": 1,
            "nonfinite_values": 0,
        },
        "b2": {
            "rows": 2,
            "distinct_paths": 2,
            "dim_min": 2,
            "dim_max": 4,
            "null_vectors": 0,
            "nonfinite_values": 3,
        },
    }
    assert sorted(per_batch["b1"]["labels"]) == ["apple", "pear"]
    assert by_label == {"b1": {"apple": 3, "pear": 2}, "b2": {"None": 1, "kiwi": 1}}


def test_nonfinite_count_finds_each_kind_alone(spark):
    """nonfinite_count walks only the rows that array_max/array_min flag: a row whose only non-finite
    values are NaN, or +inf, or -inf, must each be flagged and counted exactly."""
    from fruits_jobs.tables import nonfinite_count

    nan, inf = float("nan"), float("inf")
    rows = [
        ([1.0, 2.0], 0),
        ([nan, 1.0], 1),
        ([2.0, inf], 1),
        ([-inf, 3.0], 1),
        ([1.0, -inf, -inf], 2),
        ([nan, inf, -inf, nan], 4),
        ([-1e38, 3e38], 0),  # large but finite
        ([], 0),
        (None, 0),
    ]
    frame = spark.createDataFrame([(i, v) for i, (v, _) in enumerate(rows)], "i int, v array<float>")
    got = {r["i"]: r["n"] for r in frame.select("i", nonfinite_count("v").alias("n")).collect()}
    assert got == {i: n for i, (_, n) in enumerate(rows)}


def test_unmatched_paths_counts_each_side_per_batch(spark):
    from fruits_jobs.tables import unmatched_paths

    schema = "batch_id string, path string"
    left = spark.createDataFrame([("b1", "a"), ("b1", "b"), ("b1", "c"), ("b2", "x"), ("b3", "y")], schema)
    right = spark.createDataFrame([("b1", "a"), ("b1", "z"), ("b1", "z"), ("b2", "x"), ("b4", "w")], schema)
    only_left, only_right = unmatched_paths(left, right)
    assert only_left == {"b1": 2, "b2": 0, "b3": 1, "b4": 0}
    assert only_right == {"b1": 2, "b2": 0, "b3": 0, "b4": 1}
