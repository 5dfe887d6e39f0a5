"""Embed step: every file of the run's manifest -> 1280-d MobileNetV2 embeddings, plus a rejects table.

    spark-submit --py-files fruits_jobs.zip embed.py --input-root s3://BUCKET/incoming \
        --manifest s3://BUCKET/runs/RUN/inputs.jsonl --embeddings-out s3://BUCKET/embeddings \
        --rejects-out s3://BUCKET/rejects --weights s3://.../x.h5 \
        --validation-out s3://BUCKET/runs/RUN/embed_validation.json

The batches are the manifest's: no batch id travels on the command line. After writing, the job reads its
partitions back and writes its own checks (--validation-out) and the run's candidate fit sample
(samples/fit/run=RUN/ and runs/RUN/sample_fit.json; fruits_jobs/samples.py).

Runs the same way locally (s3a://) and on EMR (s3://). Imports nothing from Airflow.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
from fruits_jobs import imaging, objects, samples, sparkio, tables
from fruits_jobs.engine import (
    EMBEDDING_DIM,
    ENGINES,
    MODEL_BATCH,
    CpuMeter,
    file_sha256,
    get_engine,
    model_id,
)
from pyspark import SparkFiles, StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

log = sparkio.get_logger("fruits.embed")

# The PCA fit's sample: the bottom FIT_SAMPLE_ROWS embeddings of history by a hash of the path (about
# 150 MB of float32; 23 rows per dimension). Documented in the README; pca.py fits on it.
FIT_SAMPLE_ROWS = 30_000
# Photos per Spark task: enough to amortise a task's start, few enough to keep every core busy to the end.
IMAGES_PER_TASK = 256
VECTOR_TYPE = T.ArrayType(T.FloatType(), containsNull=False)
# What the Python worker answers for every photo it was given (mapInArrow): the input's columns, then
# what reading, decoding and the model made of it; `reason` is null exactly when `embedding` is not.
RESULT_SCHEMA = T.StructType(
    [
        T.StructField("batch_id", T.StringType()),
        T.StructField("path", T.StringType()),
        T.StructField("label", T.StringType()),
        T.StructField("content_sha256", T.StringType()),
        T.StructField("size_bytes", T.LongType()),
        T.StructField("embedding", VECTOR_TYPE),
        T.StructField("reason", T.StringType()),
    ]
)
INPUT_COLUMNS = ["batch_id", "path", "label", "size_bytes"]
# The Arrow types Spark expects for RESULT_SCHEMA (its array<float> without nulls is a list of non-null
# float32 named "element").
ARROW_VECTOR = pa.list_(pa.field("element", pa.float32(), nullable=False))
ARROW_RESULT = pa.schema(
    [
        ("batch_id", pa.string()),
        ("path", pa.string()),
        ("label", pa.string()),
        ("content_sha256", pa.string()),
        ("size_bytes", pa.int64()),
        ("embedding", ARROW_VECTOR),
        ("reason", pa.string()),
    ]
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input-root", required=True, help="URI holding one folder per batch")
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
    p.add_argument("--model-batch", type=int, help=f"photos per engine call (default {MODEL_BATCH})")
    p.add_argument("--s3-region", default="eu-west-3", help="region of the bucket the photos are in")
    p.add_argument("--validation-out", help="URI of the step's own checks (JSON), per batch")
    p.add_argument(
        "--sample-root", help="URI of the samples table (default: beside --embeddings-out, samples/)"
    )
    p.add_argument("--fit-sample-rows", type=int, default=FIT_SAMPLE_ROWS)
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


def make_embed_fn(engine: str, model_file: str, threads: int, model_batch: int, counter, engine_cpu, s3):
    """The mapInArrow function: Arrow record batches of (batch_id, path, label, size_bytes) in, one
    RESULT_SCHEMA batch out per batch in, no pandas on either side. The engine and the S3 reader are
    built once per worker and reused for every task. GETs run ahead in the reader's threads, across
    input batches; decoding and the model run in the task's own thread, `model_batch` photos per call (a
    small batch keeps the activations in cache: see docs/performance.md).

    `counter` counts the photos done (the driver's progress line); `engine_cpu` sums the engine's own
    CPU seconds (fruits_jobs.engine.CpuMeter), for the bench's CPU accounting."""

    def embed(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        model_path = model_file if model_file == "imagenet" else SparkFiles.get(model_file)
        meter = CpuMeter()
        forward = meter.timed(get_engine(engine, model_path, threads, model_batch))
        reader = objects.worker_reader(s3)
        # PySpark's reused worker runs a full gc.collect() after every task, over every object the worker
        # holds: the engine, numpy, pyarrow, Pillow. What is alive once the first task has built the engine
        # lives as long as the worker; frozen (once), the collector skips it and walks only what came after.
        if not gc.get_freeze_count():
            gc.freeze()
        pending: deque[pa.RecordBatch] = deque()

        def files() -> Iterator[tuple[str, int]]:
            for batch in batches:
                if batch.num_rows:
                    pending.append(batch)
                    sizes = batch.column("size_bytes").fill_null(0).to_pylist()
                    yield from zip(batch.column("path").to_pylist(), sizes, strict=True)

        fetched = objects.read_ahead(files(), reader.get)
        while (first := next(fetched, None)) is not None:
            batch = pending.popleft()  # read_ahead has pulled at least the batch `first` belongs to
            items = [first, *itertools.islice(fetched, batch.num_rows - 1)]
            yield embed_batch(batch, items, forward, model_batch)
            counter.add(len(items))
        engine_cpu.add(meter.total_s())

    return embed


def embed_batch(
    batch: pa.RecordBatch, items: list[objects.Fetched], forward, model_batch: int
) -> pa.RecordBatch:
    """Decode each photo and embed those that decode, `model_batch` at a time; the rest get a reason.
    The vectors go straight into one contiguous float32 buffer that becomes the list column's values
    (offsets 0, 1280, 2560, ...; a reject repeats its offset and is null): no Python object per vector."""
    n = len(items)
    reasons: list[str | None] = [None] * n
    vectors = np.empty((n, EMBEDDING_DIM), dtype=np.float32)
    done = 0  # rows of `vectors` filled
    pixels: list[np.ndarray] = []

    def flush() -> None:
        nonlocal done
        vectors[done : done + len(pixels)] = forward(imaging.preprocess(np.stack(pixels)))
        done += len(pixels)
        pixels.clear()

    for i, item in enumerate(items):
        if item.data is None:
            reasons[i] = "not found in S3: deleted after the run was planned"
            continue
        try:
            pixels.append(imaging.decode_rgb224(item.data))
        except imaging.RejectedImage as reject:
            reasons[i] = str(reject)
        if len(pixels) == model_batch:
            flush()
    if pixels:
        flush()
    rejected = np.fromiter((r is not None for r in reasons), dtype=bool, count=n)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(np.where(rejected, 0, EMBEDDING_DIM), out=offsets[1:])
    embedding = pa.ListArray.from_arrays(
        pa.array(offsets),
        pa.array(vectors[:done].reshape(-1)),
        type=ARROW_VECTOR,
        mask=pa.array(rejected),
    )
    listed = batch.column("size_bytes").to_pylist()
    sizes = [listed[i] if item.data is None else len(item.data) for i, item in enumerate(items)]
    return pa.RecordBatch.from_arrays(
        [
            batch.column("batch_id"),
            batch.column("path"),
            batch.column("label"),
            pa.array([item.content_sha256 for item in items], pa.string()),
            pa.array(sizes, pa.int64()),
            embedding,
            pa.array(reasons, pa.string()),
        ],
        schema=ARROW_RESULT,
    )


def classify(manifest: DataFrame, input_root: str) -> DataFrame:
    """Derive the label and a rejection reason known from the path alone (no GET needed for those)."""
    root = input_root.rstrip("/").replace("s3a://", "s3://", 1).replace("s3n://", "s3://", 1) + "/"
    parts = F.split(F.expr(f"substring(path, {len(root) + 1})"), "/")
    depth = F.size(parts)
    extensions = "|".join(e[1:] for e in imaging.IMAGE_EXTENSIONS)
    return manifest.withColumn("label", F.when(depth >= 3, parts.getItem(1))).withColumn(
        "reason",
        F.when(depth < 3, F.lit("no label folder: file is at the batch root")).when(
            ~F.lower(F.col("path")).rlike(rf"\.({extensions})$"),
            F.lit("unsupported extension (accepted: " + ", ".join(imaging.IMAGE_EXTENSIONS) + ")"),
        ),
    )


def read_manifest(spark: SparkSession, manifest_uri: str) -> DataFrame:
    """The run's inputs, exactly as the plan listed them: a file uploaded after the plan is not read, and
    every listed file gets a row (embedded or rejected), so embedded + rejected = files always holds."""
    return spark.read.schema("batch_id string, path string, size_bytes long").json(manifest_uri)


def weights_sha256(spark: SparkSession, args: argparse.Namespace, engine_file: str) -> str:
    """The weights' SHA-256 for model_id. With ONNX Runtime, from the manifest staged beside the ONNX file
    (plugins/fruits/onnx_model.py checked it against these weights before the run): the 14 MB .h5 is then
    neither shipped to the nodes nor hashed again. With TensorFlow, from the .h5 the engine loads."""
    if args.weights == "imagenet":
        return "keras-imagenet"
    if args.engine == "onnx":
        reader = objects.Reader(s3_settings(spark, args.s3_region))
        manifest = json.loads(reader.get(args.onnx_model + ".json"))
        return manifest["weights_sha256"]
    return file_sha256(SparkFiles.get(engine_file))


def sibling(uri: str, name: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0] + "/" + name


def run_folder(uri: str) -> tuple[str, str]:
    """(runs/RUN/ folder URI, RUN) of a run file such as runs/RUN/embed_validation.json."""
    folder = uri.rsplit("/", 1)[0]
    return folder + "/", folder.rsplit("/", 1)[1]


def input_partitions(spark: SparkSession, files: int) -> int:
    """Tasks of about IMAGES_PER_TASK photos, and at least two per core so that no core idles at the
    end of a small batch."""
    return max(2 * spark.sparkContext.defaultParallelism, math.ceil(files / IMAGES_PER_TASK), 1)


def s3_settings(spark: SparkSession, region: str) -> objects.S3Settings:
    """The S3 endpoint the job's own s3a settings point at (local S3, MinIO), or AWS itself on EMR."""
    endpoint = spark.sparkContext._jsc.hadoopConfiguration().get("fs.s3a.endpoint")
    if endpoint and "amazonaws.com" not in endpoint:
        return objects.S3Settings(region=region, endpoint=endpoint)
    return objects.S3Settings(region=region)


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


def validation(
    spark: SparkSession, args: argparse.Namespace, batches: list[str], listed: dict[str, int], mid: str
) -> dict:
    """The step's own checks, computed on what it wrote (read back from S3), per batch: the Airflow side
    compares them with the plan and reads only Parquet footers, never vectors."""
    emb = tables.read_partitions(spark, args.embeddings_out, batches, schema=tables.EMBEDDINGS_SCHEMA)
    rej = tables.read_partitions(spark, args.rejects_out, batches, schema=tables.REJECTS_SCHEMA)
    vec, labels = (
        tables.checks_by(
            emb, "label", tables.vector_checks("embedding", [F.collect_set("model_id").alias("model_ids")])
        )
        if emb is not None
        else ({}, {})
    )
    rejected, reasons = tables.checks_by(rej, "reason") if rej is not None else ({}, {})
    paths = [f.select("batch_id", "path") for f in (emb, rej) if f is not None]
    distinct: dict[str, int] = {}
    if paths:
        union = paths[0] if len(paths) == 1 else paths[0].unionByName(paths[1])
        distinct = {
            r["batch_id"]: int(r["distinct_paths"])
            for r in union.groupBy("batch_id").agg(tables.distinct_paths()).collect()
        }
    out = {}
    for b in batches:
        v = vec.get(b, {})
        embedded, rejects = int(v.get("rows", 0)), int(rejected.get(b, {}).get("rows", 0))
        out[b] = {
            "files": listed[b],
            "embedded": embedded,
            "rejected": rejects,
            "distinct_paths": distinct.get(b, 0),
            "duplicate_paths": embedded + rejects - distinct.get(b, 0),
            "dim_min": v.get("dim_min"),
            "dim_max": v.get("dim_max"),
            "null_vectors": int(v.get("null_vectors") or 0),
            "nonfinite_values": int(v.get("nonfinite_values") or 0),
            "model_ids": sorted(v.get("model_ids") or []),
            "labels": dict(sorted(labels.get(b, {}).items())),
            "reject_reasons": dict(sorted(reasons.get(b, {}).items())),
        }
    return {
        "step": "embed",
        "model_id": mid,
        "engine": args.engine,
        "embedding_dim": EMBEDDING_DIM,
        "rows_per_file": tables.ROWS_PER_FILE,
        "batches": out,
    }


def update_fit_sample(
    spark: SparkSession, args: argparse.Namespace, batches: list[str], embedded: int
) -> None:
    """Offer this run's embeddings (`embedded` rows) to the PCA fit's sample (fruits_jobs/samples.py) and
    write the run's candidate state beside its validation file; it becomes samples/LATEST.json once
    validated. With no sample yet (first run, or a history from before samples) the whole embeddings table
    is offered once."""
    root = (args.sample_root or sibling(args.embeddings_out, "samples")).rstrip("/")
    folder, run = run_folder(args.validation_out)
    pointer = samples.read_pointer(spark, f"{root}/LATEST.json")
    part = samples.same_scheme(pointer["fit"], root) if pointer.get("fit") else None
    rows = None  # what the whole table holds is not counted
    if part:
        offered = tables.read_partitions(spark, args.embeddings_out, batches, schema=tables.EMBEDDINGS_SCHEMA)
        rows = {"all": embedded}
    elif sparkio.exists(spark, args.embeddings_out):
        log.info("no fit sample yet: offering every embedding in %s once", args.embeddings_out)
        offered = spark.read.schema(tables.EMBEDDINGS_SCHEMA).parquet(args.embeddings_out)
    else:
        offered = None
    if offered is None:  # nothing embedded in this run: the sample stays as it is
        state = part or {}
    else:
        offered = offered.select("batch_id", "path", "label", "embedding", F.lit("all").alias("stratum"))
        state = samples.update(
            spark, part, offered, args.fit_sample_rows, "stratum", f"{root}/fit/run={run}", rows=rows
        )
    sparkio.write_json(spark, f"{folder}sample_fit.json", state)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    spark = sparkio.session("fruits-embed")
    started = time.monotonic()

    engine_file = localise(spark, args.weights if args.engine == "tf" else args.onnx_model)
    mid = model_id(weights_sha256(spark, args, engine_file))
    # One engine thread per core the task holds: more oversubscribes the cores, fewer leaves them idle.
    threads = args.threads_per_task or int(spark.conf.get("spark.task.cpus", "1"))
    log.info("model %s, engine %s, %d thread(s) per task", mid, args.engine, threads)
    # Float vectors never repeat: Parquet's dictionary attempt on them is CPU spent, then thrown away.
    spark.conf.set("parquet.enable.dictionary#embedding.list.element", "false")

    manifest = read_manifest(spark, args.manifest).cache()
    listed = {r["batch_id"]: int(r["count"]) for r in manifest.groupBy("batch_id").count().collect()}
    batches = sorted(listed)
    total = sum(listed.values())  # the plan's listing: no S3 request per file
    files = classify(manifest, args.input_root)
    parts = input_partitions(spark, total)
    log.info("%d files in %d batch(es), %d task(s)", total, len(batches), parts)

    counter = spark.sparkContext.accumulator(0)
    engine_cpu = spark.sparkContext.accumulator(0.0)
    model_batch = args.model_batch or MODEL_BATCH
    s3 = s3_settings(spark, args.s3_region)
    embed = make_embed_fn(args.engine, engine_file, threads, model_batch, counter, engine_cpu, s3)
    embedded = (
        files.where(F.col("reason").isNull())
        .select(*INPUT_COLUMNS)
        .repartition(parts)
        .transform(lambda frame: sparkio.map_in_arrow(frame, embed, RESULT_SCHEMA))
    )
    by_path = files.where(F.col("reason").isNotNull()).select(
        "batch_id",
        "path",
        "label",
        F.lit(None).cast("string").alias("content_sha256"),
        "size_bytes",
        F.lit(None).cast(VECTOR_TYPE).alias("embedding"),
        "reason",
    )
    # Computed once: both outputs are written from this cache, never by re-running the model. The action
    # that fills it also counts the rows per batch, so the cache is not scanned once more for them.
    result = embedded.unionByName(by_path).persist(StorageLevel.MEMORY_AND_DISK)
    progress = Progress(counter, total)
    progress.start()
    action_started = time.monotonic()  # the bench's job_images_per_s runs from here to `written`
    try:
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
    finally:
        progress.done.set()
        progress.join(timeout=5)
    embed_s = time.monotonic() - started
    computed = time.monotonic()

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
    # ceil(rows / 20,000) files per batch partition: a batch's rows are never spread over the whole run.
    for frame, table, key in (
        (embeddings, args.embeddings_out, "embedded"),
        (rejects, args.rejects_out, "rejected"),
    ):
        counts = {b: c[key] for b, c in per_batch.items() if c[key] > 0}
        tables.write_by_batch(spark, frame, counts, table, ["batch_id"])
        sparkio.remove_partitions_not_written(spark, table, batches, set(counts))
    written = time.monotonic()
    result.unpersist()
    embedded = sum(c["embedded"] for c in per_batch.values())

    if args.validation_out:
        checks = validation(spark, args, batches, listed, mid)
        sparkio.write_json(spark, args.validation_out, checks)
        update_fit_sample(spark, args, batches, embedded)
    validated = time.monotonic()

    seconds = time.monotonic() - started
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
        "validation_seconds": round(validated - written, 3),
        "action_window_unix": [
            round(time.time() - (time.monotonic() - t), 3) for t in (action_started, written)
        ],
        "images_per_s": round(total / seconds, 2) if seconds else None,
        # The engine's own CPU in the workers, summed over every forward call (fruits_jobs.engine.CpuMeter).
        "engine_cpu_seconds": round(engine_cpu.value, 3),
    }
    log.info("done: %d files, %d embedded, %d rejected in %.1f s", total, embedded, total - embedded, seconds)
    if args.metrics_out:
        sparkio.write_json(spark, args.metrics_out, metrics)
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
