"""PCA step: StandardScaler + PCA over 1280-d embeddings -> reduced features, with a versioned model.

    spark-submit --py-files fruits_jobs.zip pca.py --embeddings-root s3://B/embeddings \
        --model-root s3://B/models/pca --version V [--fit] --batches-file s3://B/runs/RUN/pca_batches.json \
        --features-root s3://B/features (--k K | --variance-target 0.9 --max-k 256)

The batches file is {"fit": [batch ids], "transform": [batch ids]}. With --fit, the model is fitted on the
"fit" batches and saved as version V with a variance report (JSON and a PNG scree plot). Without it,
version V is loaded. Then the "transform" batches are transformed and written to
features_root/pca_version=V/batch_id=B. Imports nothing from Airflow.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from datetime import UTC, datetime

from fruits_jobs import sparkio
from fruits_jobs.engine import EMBEDDING_DIM
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.feature import PCA, StandardScaler
from pyspark.ml.functions import array_to_vector, vector_to_array
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

log = sparkio.get_logger("fruits.pca")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embeddings-root", required=True)
    p.add_argument("--features-root", required=True)
    p.add_argument("--model-root", required=True)
    p.add_argument("--version", required=True, help="PCA model version to fit or to load")
    p.add_argument("--fit", action="store_true", help="fit and save version V before transforming")
    p.add_argument("--batches-file", required=True, help='JSON {"fit": [ids], "transform": [ids]}')
    p.add_argument("--k", type=int, help="fixed number of components")
    p.add_argument("--variance-target", type=float, default=0.90)
    p.add_argument("--max-k", type=int, default=256)
    p.add_argument("--metrics-out")
    args = p.parse_args(argv)
    if args.k is not None and not 1 <= args.k <= EMBEDDING_DIM:
        p.error(f"--k must be in [1, {EMBEDDING_DIM}], got {args.k}")
    if not 0.0 < args.variance_target <= 1.0:
        p.error(f"--variance-target must be in (0, 1], got {args.variance_target}")
    if not 1 <= args.max_k <= EMBEDDING_DIM:
        p.error(f"--max-k must be in [1, {EMBEDDING_DIM}], got {args.max_k}")
    return args


def read_batches(spark: SparkSession, args: argparse.Namespace) -> None:
    """The batch lists come from the run's file, never from arguments (whose length AWS bounds)."""
    lists = json.loads(sparkio.read_text(spark, args.batches_file))
    args.fit_batches, args.batches = list(lists.get("fit") or []), list(lists.get("transform") or [])
    if args.fit and not args.fit_batches:
        raise SystemExit(f"pca: --fit but {args.batches_file} lists no fit batch")
    if not args.batches:
        raise SystemExit(f"pca: {args.batches_file} lists no batch to transform")


def read_embeddings(spark: SparkSession, root: str, batches: list[str]) -> DataFrame | None:
    """Only the named batch partitions are read: the DAG decides which batches are trusted.

    A batch whose every file was rejected has no embeddings partition: it simply gets no features."""
    paths = [f"{root.rstrip('/')}/batch_id={b}" for b in batches]
    present = [p for p in paths if sparkio.exists(spark, p)]
    missing = sorted(set(paths) - set(present))
    if missing:
        log.warning("no embeddings (every file rejected?) for %s", missing)
    if not present:
        return None
    return (
        spark.read.option("basePath", root).parquet(*present).withColumn("vec", array_to_vector("embedding"))
    )


def choose_k(cumulative: list[float], k: int | None, target: float) -> int:
    if k is not None:
        return min(k, len(cumulative))
    for i, value in enumerate(cumulative, start=1):
        if value >= target - 1e-12:
            return i
    return len(cumulative)  # target not reachable under max-k: the cap wins, and the report says so


def scree_png(explained: list[float], cumulative: list[float], k: int, target: float | None) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    xs = range(1, len(explained) + 1)
    ax.bar(xs, explained, color="#8fbf6f", label="per component")
    ax2 = ax.twinx()
    ax2.plot(xs, cumulative, color="#c0392b", label="cumulative")
    ax2.set_ylim(0, 1.02)
    ax2.axvline(k, color="#555", linestyle="--", linewidth=1)
    if target is not None:
        ax2.axhline(target, color="#999", linestyle=":", linewidth=1)
    ax.set_xlabel("principal component")
    ax.set_ylabel("explained variance ratio")
    ax2.set_ylabel("cumulative")
    ax.set_title(f"PCA scree plot: k={k}, cumulative={cumulative[k - 1]:.3f}")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def fit(spark: SparkSession, args: argparse.Namespace, cached: DataFrame | None = None) -> dict:
    """Fit and save version V; `cached` is the fit batches' embeddings when main already holds them."""
    frame = cached if cached is not None else read_embeddings(spark, args.embeddings_root, args.fit_batches)
    if frame is None:
        raise SystemExit("pca: nothing to fit on: the fit batches have no embeddings (all files rejected?)")
    data = frame.select("vec") if cached is not None else frame.select("vec").cache()
    n_rows = data.count()
    if n_rows < 2:
        raise SystemExit(f"pca: cannot fit on {n_rows} row(s); add images or fix --fit-batch")
    k_fit = min(args.k if args.k is not None else args.max_k, EMBEDDING_DIM, n_rows)
    if args.k is not None and args.k > n_rows:
        raise SystemExit(f"pca: k={args.k} exceeds the {n_rows} rows to fit on; lower k or add batches")
    pipeline = Pipeline(
        stages=[
            StandardScaler(inputCol="vec", outputCol="scaled", withMean=True, withStd=True),
            PCA(k=k_fit, inputCol="scaled", outputCol="pca"),
        ]
    )
    model = pipeline.fit(data)
    if cached is None:
        data.unpersist()
    explained = [float(v) for v in model.stages[-1].explainedVariance]
    cumulative = []
    total = 0.0
    for v in explained:
        total += v
        cumulative.append(min(total, 1.0))
    k = choose_k(cumulative, args.k, args.variance_target)
    target = None if args.k is not None else args.variance_target
    version_root = f"{args.model_root.rstrip('/')}/{args.version}"
    model.write().overwrite().save(f"{version_root}/spark_model")
    meta = {
        "version": args.version,
        "k": k,
        "k_fitted": k_fit,
        "mode": "fixed" if args.k is not None else "variance",
        "variance_target": target,
        "target_reached": target is None or cumulative[k - 1] >= target - 1e-12,
        "explained_variance": explained,
        "cumulative_explained_variance": cumulative,
        "explained_variance_at_k": cumulative[k - 1],
        "fit_rows": n_rows,
        "fit_batches": sorted(args.fit_batches),
        "input_dim": EMBEDDING_DIM,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    sparkio.write_bytes(spark, f"{version_root}/scree.png", scree_png(explained, cumulative, k, target))
    # metadata.json last: a version folder without it is an unfinished fit and is never loaded.
    sparkio.write_json(spark, f"{version_root}/metadata.json", meta)
    log.info("fitted PCA %s on %d rows: k=%d explains %.4f", args.version, n_rows, k, cumulative[k - 1])
    return meta


def load(spark: SparkSession, args: argparse.Namespace) -> dict:
    uri = f"{args.model_root.rstrip('/')}/{args.version}/metadata.json"
    if not sparkio.exists(spark, uri):
        raise SystemExit(f"pca: model version {args.version} has no metadata at {uri}; refit with --fit")
    return json.loads(sparkio.read_text(spark, uri))


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    spark = SparkSession.builder.appName("fruits-pca").getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    spark.conf.set("spark.sql.sources.partitionOverwriteMode", "dynamic")
    started = time.monotonic()
    read_batches(spark, args)
    cached = None
    if args.fit and set(args.fit_batches) == set(args.batches):
        # A refit transforms exactly what it fits on: read the embeddings from S3 once, keep them cached.
        cached = read_embeddings(spark, args.embeddings_root, args.batches)
        cached = cached.drop("embedding").cache() if cached is not None else None
    meta = fit(spark, args, cached) if args.fit else load(spark, args)
    fit_s = time.monotonic() - started
    model = PipelineModel.load(f"{args.model_root.rstrip('/')}/{args.version}/spark_model")
    k = int(meta["k"])

    embeddings = cached if cached is not None else read_embeddings(spark, args.embeddings_root, args.batches)
    out = f"{args.features_root.rstrip('/')}/pca_version={args.version}"
    rows, written = 0, set()
    if embeddings is not None:
        features = model.transform(embeddings).select(
            "batch_id",
            "path",
            "label",
            "content_sha256",
            F.slice(vector_to_array("pca", "float32"), 1, k).alias("features"),
            F.lit(args.version).alias("pca_version"),
            "model_id",
        )
        features.write.mode("overwrite").partitionBy("batch_id").parquet(out)
        counts = (
            spark.read.parquet(out).where(F.col("batch_id").isin(args.batches)).groupBy("batch_id").count()
        )
        per_batch = {r["batch_id"]: r["count"] for r in counts.collect()}
        rows, written = sum(per_batch.values()), set(per_batch)
    sparkio.remove_partitions_not_written(spark, out, args.batches, written)
    seconds = time.monotonic() - started
    metrics = {
        "step": "pca",
        "version": args.version,
        "fitted": bool(args.fit),
        "k": k,
        "explained_variance_at_k": meta["explained_variance_at_k"],
        "rows": rows,
        "batches": sorted(args.batches),
        "fit_seconds": round(fit_s, 3),
        "seconds": round(seconds, 3),
    }
    log.info("transformed %d rows of %d batch(es) to k=%d in %.1f s", rows, len(args.batches), k, seconds)
    if args.metrics_out:
        sparkio.write_json(spark, args.metrics_out, metrics)
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
