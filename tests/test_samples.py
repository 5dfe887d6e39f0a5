"""The deterministic samples (spark_jobs/fruits_jobs/samples.py) on a real local Spark writing Parquet to a
local folder: whatever the order and grouping in which rows are offered (deltas, compactions, a re-offered
path), reading the sample gives exactly the `size` rows per stratum with the smallest hash of the path."""

from __future__ import annotations


def test_bottom_n_per_stratum_across_runs(spark, tmp_path):
    from fruits_jobs import samples
    from pyspark.sql import functions as F

    size = 10
    runs = [[(f"b{r}", f"s3://x/incoming/b{r}/l/{i}.jpg", "test" if r % 3 == 0 else "train", float(r * 100 + i)) for i in range(15)] for r in range(8)]  # fmt: skip
    state: dict = {}
    offered_so_far = []
    for r, rows in enumerate(runs):
        frame = spark.createDataFrame(rows, "batch_id string, path string, split string, v double")
        frame = samples.with_hash(frame)
        state = samples.update(spark, state, frame, size, "split", str(tmp_path / f"run={r}"))
        offered_so_far += frame.select("path", "split", "h").collect()
        got = samples.read(spark, state, "split")
        expected = set()
        for split in ("train", "test"):
            mine = sorted((x["h"], x["path"]) for x in offered_so_far if x["split"] == split)
            expected |= {p for _, p in mine[:size]}
        assert {x["path"] for x in got.select("path").collect()} == expected, r
        assert got.groupBy("split").count().where(F.col("count") > size).count() == 0
    assert state["threshold"]["train"] is not None  # full: later runs appended deltas
    assert len(state["deltas"]) <= samples.MAX_DELTAS
