"""Deterministic samples that stay small whatever the history: the bottom-N rows by a hash of the path.

A sample ("reservoir") is kept per stratum (a column value: one stratum for the PCA fit, Training and Test
for the report) as one compacted `base` folder plus up to MAX_DELTAS (8) small `delta` folders, each a
Parquet folder written by one run. Its state is a small JSON part:

    {"base": [uri], "deltas": [uri, ...], "threshold": {stratum: t or null}, "size": N, "rows": n}

Every row ever offered whose hash h is below its stratum's threshold is in base or deltas, and the
threshold is the N-th smallest h at the last compaction (null while the stratum holds fewer than N
rows). So the N rows with the smallest h per stratum of (base + deltas), a path kept once (its newest
copy), are exactly the bottom-N of every row ever offered: a deterministic sample, the same whatever
order the batches came in. A run offering new rows costs what they cost: it appends those below the
threshold (about new_rows x N / total rows) as a delta. While the sample is not full, an offer that keeps
it within N rows is a delta as it is. Only when the deltas reach MAX_DELTAS, a new stratum appears in a
full sample, or a sample that is not full would outgrow N, does it rewrite the base (at most N rows per
stratum).

The state moves only after the run's validation passed (plugins/fruits/validate.py writes
samples/LATEST.json from the run's candidate `runs/RUN/sample_*.json`), so a failed run's rows are never
read by a later one.
"""

from __future__ import annotations

import json
from typing import Any

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from fruits_jobs import sparkio
from fruits_jobs.tables import path_hash

MAX_DELTAS = 8  # each delta is a few more requests for every reader; a compaction rewrites <= N rows
NOT_FULL = 2.0  # above any hash: every row of a stratum that is not full yet is kept
STRATA_PARTITIONS = 2  # the strata: one for the fit sample, Training and Test for the report's


def read_pointer(spark: SparkSession, uri: str) -> dict[str, Any]:
    """samples/LATEST.json, or {} when there is none yet (first run, or a history from before samples)."""
    if not sparkio.exists(spark, uri):
        return {}
    return json.loads(sparkio.read_text(spark, uri))


def same_scheme(state: dict[str, Any], like: str) -> dict[str, Any]:
    """The state's folders with the scheme of `like` (s3:// on EMR, s3a:// for a local Spark), so a
    sample written by one runs on the other."""
    scheme = like.split("://", 1)[0] + "://"

    def fix(uri: str) -> str:
        return scheme + uri.split("://", 1)[1] if "://" in uri else uri

    out = dict(state)
    for key in ("base", "deltas"):
        if out.get(key):
            out[key] = [fix(u) for u in out[key]]
    return out


def is_full(part: dict[str, Any]) -> bool:
    """Every stratum of the state holds its size: each has a threshold."""
    thresholds = part.get("threshold") or {}
    return bool(thresholds) and all(t is not None for t in thresholds.values())


def with_hash(frame: DataFrame) -> DataFrame:
    return frame if "h" in frame.columns else frame.withColumn("h", path_hash())


def _threshold(part: dict[str, Any] | None, stratum_col: str):
    expr = F.lit(NOT_FULL)
    for stratum, t in ((part or {}).get("threshold") or {}).items():
        if t is not None:
            expr = F.when(F.col(stratum_col) == F.lit(stratum), F.lit(float(t))).otherwise(expr)
    return expr


def _same_columns(recorded: str | None, schema: T.StructType) -> bool:
    """The recorded schema (JSON) has the same columns and types as `schema`, in any order (folders are
    read by column name) and whatever their nullability (a file read makes every column nullable)."""
    if not recorded:
        return False
    columns = lambda st: sorted((f.name, f.dataType.simpleString()) for f in st.fields)  # noqa: E731
    return columns(T.StructType.fromJson(json.loads(recorded))) == columns(schema)


def _stored(spark: SparkSession, part: dict[str, Any] | None) -> list[DataFrame]:
    """The state's folders, oldest first, each with its generation. Read with the schema the state
    records (every folder of a state is written with it), Spark runs no job per folder to infer one from
    a footer: a state of a base and 8 deltas is 9 jobs less on every read. A state written before it
    recorded one is read by inference."""
    folders = list((part or {}).get("base") or []) + list((part or {}).get("deltas") or [])
    recorded = (part or {}).get("schema")
    reader = spark.read.schema(T.StructType.fromJson(json.loads(recorded))) if recorded else spark.read
    return [reader.parquet(f).withColumn("_gen", F.lit(i)) for i, f in enumerate(folders)]


def _ranked(frame: DataFrame, size: int, stratum_col: str) -> DataFrame:
    """Newest copy of each path, then the `size` smallest (h, path) per stratum (with helper columns)."""
    newest = Window.partitionBy("path").orderBy(F.col("_gen").desc())
    first = Window.partitionBy(stratum_col).orderBy("h", "path")
    return (
        frame.withColumn("_n", F.row_number().over(newest))
        .where("_n = 1")
        # One or two strata: as many partitions, not spark.sql.shuffle.partitions (200), which adaptive
        # execution does not coalesce in the last stage of a cached plan: 2 x 200 tasks, nearly all
        # empty, were about 7 s of every small step (docs/performance.md).
        .repartition(STRATA_PARTITIONS, stratum_col)
        .withColumn("_r", F.row_number().over(first))
        .where(F.col("_r") <= size)
    )


def _bottom(frame: DataFrame, size: int, stratum_col: str) -> DataFrame:
    return _ranked(frame, size, stratum_col).drop("_n", "_r", "_gen")


def read(spark: SparkSession, part: dict[str, Any] | None, stratum_col: str) -> DataFrame | None:
    """The sample's rows (at most size per stratum); None when it is empty. The dedup and the ranking
    run on the narrow (path, stratum, h, generation) columns; only the kept rows' vectors are read."""
    stored = _stored(spark, part)
    if not stored:
        return None
    frame = stored[0]
    for other in stored[1:]:
        frame = frame.unionByName(other, allowMissingColumns=True)
    if len(stored) == 1:  # a base alone is a bottom-N already, each path once
        return frame.drop("_gen")
    narrow = _bottom_with_gen(frame.select("path", stratum_col, "h", "_gen"), int(part["size"]), stratum_col)  # type: ignore[index]
    return frame.join(F.broadcast(narrow), ["path", "_gen"]).drop("_gen")


def _bottom_with_gen(frame: DataFrame, size: int, stratum_col: str) -> DataFrame:
    return _ranked(frame, size, stratum_col).select("path", "_gen")


def prefilter(
    offered: DataFrame, size: int, stratum_col: str, rows: dict[str, int] | None = None
) -> DataFrame:
    """Only the rows that can be in a bottom-`size`: per stratum, h up to its size-th smallest value (a
    top-k per task on one double column, no sort of the vectors). Bounds what the window sorts.

    `rows`: {stratum: rows offered, at most}, when the caller knows it (the steps count their rows per
    batch anyway): a stratum offering fewer than `size` rows keeps them all, so it costs no Spark job, and
    neither does finding the strata. Only a bound: the ranking that follows keeps exactly the bottom N."""
    cut = F.lit(NOT_FULL)
    if rows is None:
        strata = [r[0] for r in offered.select(stratum_col).distinct().collect()]
    else:
        strata = [stratum for stratum, n in rows.items() if n >= size]
    for stratum in strata:
        top = offered.where(F.col(stratum_col) == F.lit(stratum)).select("h").orderBy("h").limit(size)
        row = top.agg(F.count("*").alias("n"), F.max("h").alias("t")).collect()[0]
        if row["n"] >= size:
            cut = F.when(F.col(stratum_col) == F.lit(stratum), F.lit(float(row["t"]))).otherwise(cut)
    return offered.where(F.col("h") <= cut) if strata else offered


def update(
    spark: SparkSession,
    part: dict[str, Any] | None,
    offered: DataFrame,
    size: int,
    stratum_col: str,
    out_uri: str,
    prefiltered: bool = False,
    rows: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Offer rows (a DataFrame with path, stratum_col and the sampled columns) to the sample; writes a
    delta or a new base at out_uri and returns the new state (the caller writes it as the candidate).
    `prefiltered`: the offer already holds at most `size` rows per stratum (the caller ran prefilter on
    it), so a compaction does not run those jobs again. `rows`: {stratum: rows offered, at most}, when the
    caller knows it (see prefilter)."""
    part = dict(part or {})
    if part and int(part.get("size", size)) != size:
        part = {}  # another sample size: start again from what is offered
    offered = with_hash(offered)
    fresh = offered.where(F.col("h") < _threshold(part, stratum_col))
    thresholds = part.get("threshold") or {}
    deltas = list(part.get("deltas") or [])
    if part.get("base") and len(deltas) < MAX_DELTAS:
        if rows is not None and all(t is None for t in thresholds.values()):
            added = sum(rows.values())  # no threshold yet: the offer is kept whole, its rows are known
        else:
            fresh = fresh.cache()
            added = fresh.count()
        if is_full(part):  # only the rows under each threshold; a new stratum needs one set: compaction
            fits = not {r[0] for r in fresh.select(stratum_col).distinct().collect()} - set(thresholds)
        else:
            # Not full yet: the offer is kept whole (no threshold), so it can be the delta as it is, as long
            # as what is kept stays within one stratum's size. `rows` counts a re-offered path twice: that
            # can only bring the compaction forward. Saves the ranking a compaction runs on every small run.
            fits = int(part.get("rows", 0)) + added <= size
        if fits:
            state = {**part, "deltas": deltas, "rows": int(part.get("rows", 0)) + added, "size": size}
            if added:
                fresh.coalesce(1).write.mode("overwrite").parquet(out_uri)
                deltas.append(out_uri)
                if not _same_columns(part.get("schema"), fresh.schema):  # two schemas: infer them
                    state.pop("schema", None)
            fresh.unpersist()
            return state
    # Compaction: rewrite the base as the bottom-N per stratum of everything kept so far plus the offer.
    stored = _stored(spark, part)
    bounded = fresh if prefiltered else prefilter(fresh, size, stratum_col, rows)
    frame = bounded.withColumn("_gen", F.lit(len(stored)))
    for other in stored:
        frame = other.unionByName(frame, allowMissingColumns=True)
    kept = _bottom(frame, size, stratum_col).cache()
    stats = kept.groupBy(stratum_col).agg(F.count("*").alias("n"), F.max("h").alias("t")).collect()
    kept.coalesce(1).write.mode("overwrite").parquet(out_uri)
    kept.unpersist()
    fresh.unpersist()
    return {
        "base": [out_uri],
        "deltas": [],
        "threshold": {str(r[stratum_col]): (float(r["t"]) if r["n"] >= size else None) for r in stats},
        "size": size,
        "rows": sum(int(r["n"]) for r in stats),
        "schema": kept.schema.json(),
    }
