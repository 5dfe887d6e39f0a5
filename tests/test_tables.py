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
