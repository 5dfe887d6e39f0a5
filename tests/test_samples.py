"""The deterministic samples (spark_jobs/fruits_jobs/samples.py) on a real local Spark writing Parquet to a
local folder: whatever the order and grouping in which rows are offered (deltas to a sample not full yet,
compactions, deltas to a full one, a re-offered path), reading the sample gives exactly the `size` rows per
stratum with the smallest hash of the path."""

from __future__ import annotations


def test_bottom_n_per_stratum_across_runs(spark, tmp_path):
    from fruits_jobs import samples
    from pyspark.sql import functions as F

    size = 10
    # Small offers first (the sample is not full: they are appended as they are, until one would take it
    # past `size`), then larger ones (full: only the rows under the threshold are appended).
    per_run = [3, 3, 3, 15, 15, 3, 15, 15]
    runs = [[(f"b{r}", f"s3://x/incoming/b{r}/l/{i}.jpg", "test" if r % 3 == 0 else "train", float(r * 100 + i)) for i in range(n)] for r, n in enumerate(per_run)]  # fmt: skip
    runs[5] += runs[1]  # a batch offered again (a forced re-run): its paths count once
    state: dict = {}
    offered_so_far: set[tuple[float, str, str]] = set()
    kinds = []
    for r, rows in enumerate(runs):
        frame = spark.createDataFrame(rows, "batch_id string, path string, split string, v double")
        frame = samples.with_hash(frame)
        before = len(state.get("deltas") or [])
        state = samples.update(spark, state, frame, size, "split", str(tmp_path / f"run={r}"))
        kinds.append(
            ("delta" if len(state["deltas"]) > before else "base")
            + (" full" if samples.is_full(state) else "")
        )
        offered_so_far |= {
            (x["h"], x["path"], x["split"]) for x in frame.select("h", "path", "split").collect()
        }
        got = samples.read(spark, state, "split")
        expected = set()
        for split in ("train", "test"):
            expected |= {p for _, p in sorted((h, p) for h, p, s in offered_so_far if s == split)[:size]}
        assert {x["path"] for x in got.select("path").collect()} == expected, (r, kinds)
        assert got.groupBy("split").count().where(F.col("count") > size).count() == 0
        assert got.count() == len(expected)  # each path once
    # Each way through update() was taken: deltas while not full, a compaction when an offer would
    # outgrow the size, deltas once full.
    assert kinds[:3] == ["base", "delta", "delta"], kinds
    assert "base full" in kinds and kinds[-1] == "delta full", kinds
    assert len(state["deltas"]) <= samples.MAX_DELTAS
