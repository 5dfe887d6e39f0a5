"""Embed step: images of the given batches -> 1280-d MobileNetV2 embeddings, plus a rejects table.

    spark-submit --py-files fruits_jobs.zip embed.py --input-root s3://BUCKET/incoming --batch B1 \
        --embeddings-out s3://BUCKET/embeddings --rejects-out s3://BUCKET/rejects --weights s3://.../x.h5

Runs the same way locally (s3a://) and on EMR (s3://). Imports nothing from Airflow.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np
import pandas as pd
from fruits_jobs import imaging, sparkio
from fruits_jobs.engine import EMBEDDING_DIM, ENGINES, file_sha256, get_engine, model_id
from pyspark import SparkFiles, StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

log = sparkio.get_logger("fruits.embed")

# About 100 MB of float32 vectors per Parquet file.
ROWS_PER_FILE = 20_000
EMBEDDINGS_SCHEMA = "batch_id, path, label, content_sha256, size_bytes, embedding, model_id, engine"
UDF_SCHEMA = T.StructType(
    [
        T.StructField("embedding", T.ArrayType(T.FloatType(), containsNull=False)),
        T.StructField("error", T.StringType()),
    ]
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input-root", required=True, help="URI holding one folder per batch")
    p.add_argument("--batch", action="append", required=True, dest="batches", help="batch id (repeat)")
    p.add_argument("--embeddings-out", required=True)
    p.add_argument("--rejects-out", required=True)
    p.add_argument("--manifest", required=True, help="JSON lines {batch_id, path, size_bytes}: the inputs")
    p.add_argument("--weights", required=True, help='Keras .h5 path or URI, or "imagenet"')
    p.add_argument("--engine", choices=ENGINES, default="tf")
    p.add_argument("--onnx-model", help="ONNX export of the same weights (engine=onnx)")
    p.add_argument(
        "--threads-per-task", type=int, help="engine threads per Spark task (default: spark.task.cpus)"
    )
    p.add_argument("--metrics-out", help="URI of a JSON file with counts and timings")
    args = p.parse_args(argv)
    if args.engine == "onnx" and not args.onnx_model:
        p.error("--engine onnx needs --onnx-model")
    if args.threads_per_task is not None and args.threads_per_task < 1:
        p.error("--threads-per-task must be >= 1")
    return args


def localise(spark: SparkSession, uri: str) -> str:
    """Ship a model file to every node once (SparkFiles); returns the name executors resolve it by."""
    if uri == "imagenet":
        return uri
    spark.sparkContext.addFile(uri)
    return os.path.basename(uri.rstrip("/"))


def make_embed_udf(engine: str, model_file: str, threads: int, counter):
    """The Iterator pandas UDF: the engine is fetched once per worker and reused for every Arrow batch."""

    @F.pandas_udf(UDF_SCHEMA)
    def embed(contents: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        model_path = model_file if model_file == "imagenet" else SparkFiles.get(model_file)
        forward = get_engine(engine, model_path, threads)
        for content in contents:
            n = len(content)
            errors: list[str | None] = [None] * n
            pixels: list[np.ndarray] = []
            ok_rows: list[int] = []
            for i, data in enumerate(content):
                try:
                    pixels.append(imaging.decode_rgb224(data))
                    ok_rows.append(i)
                except imaging.RejectedImage as reject:
                    errors[i] = str(reject)
            vectors: list[np.ndarray | None] = [None] * n
            if pixels:
                out = forward(imaging.preprocess(np.stack(pixels)))
                for row, vec in zip(ok_rows, out, strict=True):
                    vectors[row] = vec.astype(np.float32, copy=False)
            counter.add(n)
            yield pd.DataFrame({"embedding": vectors, "error": errors})

    return embed


def s3_uri(col: str = "path") -> Column:
    """s3a:// (local) and s3n:// read as s3://, the scheme stored in every table and the manifest."""
    return F.regexp_replace(col, "^s3[an]?://", "s3://")


def classify(files: DataFrame, input_root: str) -> DataFrame:
    """Derive batch_id, label and a pre-decode rejection reason from each file's path and size."""
    root = input_root.rstrip("/").replace("s3a://", "s3://", 1).replace("s3n://", "s3://", 1) + "/"
    parts = F.split(F.expr(f"substring(path, {len(root) + 1})"), "/")
    depth = F.size(parts)
    extensions = "|".join(e[1:] for e in imaging.IMAGE_EXTENSIONS)
    return (
        files.withColumn("batch_id", parts.getItem(0))
        .withColumn("label", F.when(depth >= 3, parts.getItem(1)))
        .withColumn(
            "reason",
            F.when(depth < 3, F.lit("no label folder: file is at the batch root"))
            .when(
                ~F.lower(F.col("path")).rlike(rf"\.({extensions})$"),
                F.lit("unsupported extension (accepted: " + ", ".join(imaging.IMAGE_EXTENSIONS) + ")"),
            )
            .when(F.col("content").isNull() & (F.col("size_bytes") == 0), F.lit("empty file (0 bytes)"))
            .when(F.col("content").isNull(), F.lit("listed in S3 but not returned by Spark's file reader")),
        )
    )


def read_inputs(
    spark: SparkSession, input_root: str, batches: list[str], manifest_uri: str
) -> tuple[DataFrame, DataFrame]:
    """(the files of the run's manifest that Spark's reader returns, with their bytes; the manifest).

    Spark's file reader silently skips empty files, so a manifest file it did not return still gets a
    row (content null, see `not_returned`) and is rejected with a reason; a file uploaded after the plan
    is not read."""
    manifest = spark.read.schema("batch_id string, path string, size_bytes long").json(manifest_uri)
    roots = [f"{input_root.rstrip('/')}/{b}/" for b in batches]
    read = (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")
        .load(roots)
        .select(s3_uri().alias("path"), F.col("length").alias("size_bytes"), "content")
    )
    seen = read.join(F.broadcast(manifest.select("path")), "path", "left_semi")
    return classify(seen, input_root), manifest


def not_returned(manifest: DataFrame, returned_paths: DataFrame, input_root: str) -> DataFrame:
    """The manifest's files that the reader did not return, as rows without content (classify rejects
    them). Taken against the job's cached result, not by a second scan: scanning binaryFile costs an S3
    HEAD per file even when only paths are selected."""
    unseen = manifest.join(returned_paths, "path", "left_anti").select(
        "path", "size_bytes", F.lit(None).cast("binary").alias("content")
    )
    return classify(unseen, input_root)


class Progress(threading.Thread):
    """Logs images done out of total, and the rate, while the job runs (shows in the Airflow task log)."""

    def __init__(self, counter, total: int, every_s: float = 10.0) -> None:
        super().__init__(daemon=True)
        self.counter, self.total, self.every_s = counter, total, every_s
        self.started = time.monotonic()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every_s):
            self.report()
        self.report()  # a last line with the total, so even a job shorter than every_s shows one

    def report(self) -> None:
        n = self.counter.value
        rate = n / max(time.monotonic() - self.started, 1e-9)
        log.info(
            "progress: %d/%d images (%.0f%%), %.1f img/s", n, self.total, 100 * n / max(self.total, 1), rate
        )


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    spark = SparkSession.builder.appName("fruits-embed").getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    spark.conf.set("spark.sql.sources.partitionOverwriteMode", "dynamic")
    started = time.monotonic()

    model_file = localise(spark, args.weights)
    weights_sha = "imagenet" if model_file == "imagenet" else file_sha256(SparkFiles.get(model_file))
    mid = model_id(weights_sha if weights_sha != "imagenet" else "keras-imagenet")
    engine_file = model_file if args.engine == "tf" else localise(spark, args.onnx_model)
    # One engine thread per core the task holds: more oversubscribes the cores, fewer leaves them idle.
    threads = args.threads_per_task or int(spark.conf.get("spark.task.cpus", "1"))
    log.info("model %s, engine %s, %d thread(s) per task", mid, args.engine, threads)

    files, manifest = read_inputs(spark, args.input_root, args.batches, args.manifest)
    total = manifest.count()  # the plan's listing: counting the scan would cost S3 requests per file
    log.info(
        "%d files in %d batch(es), %d partition(s)", total, len(args.batches), files.rdd.getNumPartitions()
    )

    counter = spark.sparkContext.accumulator(0)
    udf = make_embed_udf(args.engine, engine_file, threads, counter)
    returned = (
        files.withColumn("content_sha256", F.sha2("content", 256))
        .withColumn("r", F.when(F.col("reason").isNull(), udf(F.col("content"))))
        .select(
            "batch_id",
            "path",
            "label",
            "content_sha256",
            "size_bytes",
            F.col("r.embedding").alias("embedding"),
            F.coalesce("reason", "r.error").alias("reason"),
        )
    )
    # Computed once: both outputs are written from this cache, never by re-running the model.
    returned = returned.persist(StorageLevel.MEMORY_AND_DISK)
    progress = Progress(counter, total)
    progress.start()
    action_started = time.monotonic()  # the bench's job_images_per_s runs from here to `written`
    try:
        returned.count()
    finally:
        progress.done.set()
        progress.join(timeout=5)
    embed_s = time.monotonic() - started
    computed = time.monotonic()
    missing = not_returned(manifest, returned.select("path"), args.input_root).select(
        "batch_id",
        "path",
        "label",
        F.lit(None).cast("string").alias("content_sha256"),
        "size_bytes",
        F.lit(None).cast(UDF_SCHEMA["embedding"].dataType).alias("embedding"),
        "reason",
    )
    result = returned.unionByName(missing)
    # Few, large Parquet files: fewer S3 commits now, fewer small files for the PCA step to open later.
    out_files = max(1, math.ceil(total / ROWS_PER_FILE))

    embeddings = result.where(F.col("reason").isNull()).select(
        "batch_id",
        "path",
        "label",
        "content_sha256",
        "size_bytes",
        "embedding",
        F.lit(mid).alias("model_id"),
        F.lit(args.engine).alias("engine"),
    )
    rejects = result.where(F.col("reason").isNotNull()).select(
        "batch_id", "path", "label", "content_sha256", "size_bytes", "reason"
    )
    embeddings.coalesce(out_files).write.mode("overwrite").partitionBy("batch_id").parquet(
        args.embeddings_out
    )
    rejects.coalesce(out_files).write.mode("overwrite").partitionBy("batch_id").parquet(args.rejects_out)
    written = time.monotonic()

    per_batch = {
        r["batch_id"]: {"files": r["files"], "embedded": r["embedded"], "rejected": r["rejected"]}
        for r in result.groupBy("batch_id")
        .agg(
            F.count("*").alias("files"),
            F.sum(F.col("reason").isNull().cast("int")).alias("embedded"),
            F.sum(F.col("reason").isNotNull().cast("int")).alias("rejected"),
        )
        .collect()
    }
    for table, key in ((args.embeddings_out, "embedded"), (args.rejects_out, "rejected")):
        non_empty = {b for b, c in per_batch.items() if c[key] > 0}
        sparkio.remove_partitions_not_written(spark, table, args.batches, non_empty)
    returned.unpersist()

    seconds = time.monotonic() - started
    embedded = sum(c["embedded"] for c in per_batch.values())
    metrics = {
        "step": "embed",
        "model_id": mid,
        "engine": args.engine,
        "embedding_dim": EMBEDDING_DIM,
        "batches": per_batch,
        "files": total,
        "embedded": embedded,
        "rejected": total - embedded,
        "seconds": round(seconds, 3),
        "embed_seconds": round(embed_s, 3),
        # From the action to both tables written in S3: listing and JVM start excluded, engine load not.
        "action_seconds": round(written - action_started, 3),
        "compute_seconds": round(computed - action_started, 3),
        "write_seconds": round(written - computed, 3),
        "action_window_unix": [
            round(time.time() - (time.monotonic() - t), 3) for t in (action_started, written)
        ],
        "images_per_s": round(total / seconds, 2) if seconds else None,
    }
    log.info("done: %d files, %d embedded, %d rejected in %.1f s", total, embedded, total - embedded, seconds)
    if args.metrics_out:
        sparkio.write_json(spark, args.metrics_out, metrics)
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
