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
        # Every other run says how many rows it offers per stratum, as the steps do (they count them for
        # their checks): the sample must come out the same either way.
        known = {s: sum(1 for x in rows if x[2] == s) for s in {x[2] for x in rows}} if r % 2 else None
        state = samples.update(spark, state, frame, size, "split", str(tmp_path / f"run={r}"), rows=known)
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
    # The state records its folders' schema, so reading them runs no job to infer one from a footer.
    assert state["deltas"] and "schema" in state
    tracker = spark.sparkContext.statusTracker()
    spark.sparkContext.setJobGroup("stored", "the sample's folders, read")
    stored = samples._stored(spark, state)
    assert tracker.getJobIdsForGroup("stored") == []
    assert len(stored) == 1 + len(state["deltas"])
    spark.sparkContext.setLocalProperty("spark.jobGroup.id", None)


def test_a_prefilter_told_the_row_counts_keeps_the_same_rows_and_runs_no_job_under_size(spark):
    """prefilter(rows=...) (what the steps pass): a stratum offering fewer rows than the size is kept whole
    without a Spark job; one offering more is cut to exactly its bottom `size`, as without the counts."""
    from fruits_jobs import samples

    size = 5
    rows = [(f"s3://x/{s}/{i}.jpg", s) for s, n in (("small", 3), ("big", 12)) for i in range(n)]
    frame = samples.with_hash(spark.createDataFrame(rows, "path string, split string"))
    paths = lambda df: sorted(r["path"] for r in df.select("path").collect())  # noqa: E731
    tracker = spark.sparkContext.statusTracker()

    spark.sparkContext.setJobGroup("under", "prefilter, every stratum under its size")
    small_only = samples.prefilter(frame.where("split = 'small'"), size, "split", {"small": 3})
    assert tracker.getJobIdsForGroup("under") == []  # planning it ran nothing
    assert len(paths(small_only)) == 3

    told = samples.prefilter(frame, size, "split", {"small": 3, "big": 12})
    found = samples.prefilter(frame, size, "split")
    by_hash = sorted((r["h"], r["path"]) for r in frame.where("split = 'big'").collect())
    expected_big = {p for _, p in by_hash[:size]}
    assert paths(told) == paths(found)
    assert set(paths(told)) == expected_big | {p for p, s in rows if s == "small"}
    spark.sparkContext.setLocalProperty("spark.jobGroup.id", None)
