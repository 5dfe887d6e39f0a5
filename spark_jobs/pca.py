"""PCA step: StandardScaler + PCA over 1280-d embeddings -> reduced features, with a versioned model.

    spark-submit --py-files fruits_jobs.zip pca.py --embeddings-root s3://B/embeddings \
        --model-root s3://B/models/pca --version V [--fit] --batches-file s3://B/runs/RUN/pca_batches.json \
        --features-root s3://B/features --validation-out s3://B/runs/RUN/pca_validation.json \
        (--k K | --variance-target 0.9 --max-k 256)

The batches file is {"fit": [batch ids], "transform": [batch ids]}. With --fit, version V is fitted on a
bounded, deterministic sample of the "fit" batches' embeddings: the bottom FIT_SAMPLE_ROWS rows by a
hash of the path (fruits_jobs/samples.py), kept up to date by the embed step, so the fit reads at most
that many rows whatever the history. It is saved with a variance report (JSON and a PNG scree plot).
Without --fit, version V is loaded. Then the "transform" batches are transformed, CHUNK_BATCHES batches
at a time, into features_root/pca_version=V/batch_id=B; the job reads them back for its checks
(--validation-out) and offers them to the run's report sample. Imports nothing from Airflow.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from fruits_jobs import samples, sparkio, tables
from fruits_jobs.engine import EMBEDDING_DIM
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

if TYPE_CHECKING:
    from pyspark.ml import PipelineModel

log = sparkio.get_logger("fruits.pca")

# Batches transformed per Spark job: a refit over thousands of batches is that many bounded jobs.
CHUNK_BATCHES = 200
# The report's sample: the bottom rows by path hash per split (Training, Test), features and embeddings.
REPORT_SAMPLE_ROWS = 5_000
TEST_BATCH_PATTERN = r"(^|[-_.])test([-_.]|$)"  # plugins/fruits/config.py's default
FIT_BATCHES_LISTED = 100  # metadata.json names at most this many fit batches (and counts them all)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embeddings-root", required=True)
    p.add_argument("--features-root", required=True)
    p.add_argument("--model-root", required=True)
    p.add_argument("--version", required=True, help="PCA model version to fit or to load")
    p.add_argument("--fit", action="store_true", help="fit and save version V before transforming")
    p.add_argument("--batches-file", required=True, help='JSON {"fit": [...], "transform": [...]}')
    p.add_argument("--k", type=int, help="fixed number of components")
    p.add_argument("--variance-target", type=float, default=0.90)
    p.add_argument("--max-k", type=int, default=256)
    p.add_argument("--metrics-out")
    p.add_argument("--validation-out", help="URI of the step's own checks (JSON), per batch")
    p.add_argument("--sample-root", help="URI of the samples table (default: beside --embeddings-root)")
    p.add_argument("--fit-sample", help="the run's fit sample state (default: runs/RUN/sample_fit.json)")
    p.add_argument("--fit-sample-rows", type=int, default=30_000, help="when no fit sample exists")
    p.add_argument("--report-sample-rows", type=int, default=REPORT_SAMPLE_ROWS)
    p.add_argument("--test-batch-pattern", default=TEST_BATCH_PATTERN)
    p.add_argument("--chunk-batches", type=int, default=CHUNK_BATCHES)
    args = p.parse_args(argv)
    if args.k is not None and not 1 <= args.k <= EMBEDDING_DIM:
        p.error(f"--k must be in [1, {EMBEDDING_DIM}], got {args.k}")
    if not 0.0 < args.variance_target <= 1.0:
        p.error(f"--variance-target must be in (0, 1], got {args.variance_target}")
    if not 1 <= args.max_k <= EMBEDDING_DIM:
        p.error(f"--max-k must be in [1, {EMBEDDING_DIM}], got {args.max_k}")
    return args


def read_batches(spark: SparkSession, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    spec = json.loads(sparkio.read_text(spark, args.batches_file))
    fit, transform = sorted(spec.get("fit") or []), sorted(spec.get("transform") or [])
    if args.fit and not fit:
        raise SystemExit(f"pca: --fit needs fit batches; {args.batches_file} lists none")
    if not transform:
        raise SystemExit(f"pca: {args.batches_file} lists no batch to transform")
    return fit, transform


def run_folder(args: argparse.Namespace) -> tuple[str, str]:
    """(runs/RUN/ URI, RUN), from the run's own files."""
    uri = args.validation_out or args.metrics_out or args.batches_file
    folder = uri.rsplit("/", 1)[0]
    return folder + "/", folder.rsplit("/", 1)[1]


def sample_root(args: argparse.Namespace) -> str:
    return (args.sample_root or args.embeddings_root.rstrip("/").rsplit("/", 1)[0] + "/samples").rstrip("/")


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


# --- the model as arrays -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Projection:
    """What the saved PipelineModel computes, as arrays: features = ((x - mean) * scale) @ components,
    in float64, then float32 (Spark ML's StandardScalerModel.transform, then PCAModel.transform and
    vector_to_array(float32)). Loading a PipelineModel costs a local step about 11 s of Spark ML reads
    and class loading, for 2 vectors and a matrix (docs/performance.md): the step saves these arrays
    beside it (PROJECTION_FILE) and transforms with numpy in the Python workers."""

    mean: np.ndarray  # (dim,)
    scale: np.ndarray  # (dim,): 1 / std, 0 where std is 0
    components: np.ndarray  # (dim, k_fit): the principal components, by decreasing variance

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, mean=self.mean, scale=self.scale, components=self.components)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Projection:
        with np.load(io.BytesIO(data)) as z:
            return cls(z["mean"], z["scale"], z["components"])

    @classmethod
    def from_pipeline(cls, model: PipelineModel) -> Projection:
        """From a saved model of a version fitted before PROJECTION_FILE existed."""
        scaler, pca = model.stages
        std = scaler.std.toArray()
        scale = np.where(std != 0, 1.0 / np.where(std != 0, std, 1.0), 0.0)
        return cls(scaler.mean.toArray(), scale, pca.pc.toArray())


PROJECTION_FILE = "projection.npz"


def load_projection(spark: SparkSession, version_root: str) -> Projection:
    uri = f"{version_root}/{PROJECTION_FILE}"
    if sparkio.exists(spark, uri):
        return Projection.from_bytes(sparkio.read_bytes(spark, uri))
    log.info(
        "no %s in %s (fitted before it existed): loading the Spark ML model", PROJECTION_FILE, version_root
    )
    from pyspark.ml import PipelineModel  # about 1 s of imports (scipy): only where a model is loaded

    return Projection.from_pipeline(PipelineModel.load(f"{version_root}/spark_model"))


FEATURES_ARROW = pa.list_(pa.field("element", pa.float32(), nullable=False))


def project(frame: DataFrame, projection: Projection, k: int) -> DataFrame:
    """The embeddings' columns but the vector, and `features`: the first k components of each, computed
    one Arrow batch at a time (one matrix product) in the Python workers."""
    dim = len(projection.mean)
    # Shipped once per executor, not pickled into every task (up to 1280 x 256 float64: 2.6 MB).
    shared = frame.sparkSession.sparkContext.broadcast(
        (projection.mean, projection.scale, np.ascontiguousarray(projection.components[:, :k]))
    )
    keep = ["batch_id", "path", "label", "content_sha256", "model_id"]
    schema = pa.schema([*((c, pa.string()) for c in keep), ("features", FEATURES_ARROW)])

    def per_batch(batches):
        mean, scale, components = shared.value
        for batch in batches:
            col = batch.column("embedding")
            if col.null_count:
                raise ValueError(
                    "pca: null embedding vectors in the input (the embed step never writes them)"
                )
            x = col.flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(col), dim)
            y = (((x - mean) * scale) @ components).astype(np.float32)
            offsets = pa.array(np.arange(0, (len(col) + 1) * k, k, dtype=np.int32))
            features = pa.ListArray.from_arrays(offsets, pa.array(y.reshape(-1)), type=FEATURES_ARROW)
            yield pa.RecordBatch.from_arrays([*(batch.column(c) for c in keep), features], schema=schema)

    out = T.StructType(
        [*(T.StructField(c, T.StringType()) for c in keep)]
        + [T.StructField("features", T.ArrayType(T.FloatType(), containsNull=False))]
    )
    return sparkio.map_in_arrow(frame.select(*keep, "embedding"), per_batch, out)


# --- the fit ------------------------------------------------------------------------------------------
def moments(frame: DataFrame, dim: int = EMBEDDING_DIM) -> tuple[int, np.ndarray, np.ndarray, list[str]]:
    """(n, mean, scatter matrix sum (x - mean)(x - mean)^T, the batch ids seen) of the `embedding` column,
    float64: one matrix product per Arrow batch in the Python workers (BLAS level 3), merged pairwise
    (Chan et al.), so only dim x dim numbers per task reach the driver. One pass over the rows: the fit
    needs their count and their batches too, which would otherwise be two more Spark jobs over a cache."""

    def per_task(batches):
        n, mean, m2 = 0, np.zeros(dim), np.zeros((dim, dim))
        seen: set[str] = set()
        for batch in batches:
            col = batch.column(1)
            if len(col) == 0:
                continue
            seen.update(batch.column(0).unique().to_pylist())
            x = col.flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(col), dim)
            nb, mb = len(x), x.mean(axis=0)
            xc = x - mb
            n, mean, m2 = _merge(n, mean, m2, nb, mb, xc.T @ xc)
        yield pa.RecordBatch.from_pydict(
            {"n": [n], "mean": [mean.tobytes()], "m2": [m2.tobytes()], "batch_ids": [sorted(seen)]}
        )

    n, mean, m2 = 0, np.zeros(dim), np.zeros((dim, dim))
    seen: set[str] = set()
    parts = sparkio.map_in_arrow(
        frame.select("batch_id", "embedding"),
        per_task,
        "n long, mean binary, m2 binary, batch_ids array<string>",
    ).collect()
    for r in parts:
        if r["n"]:
            pm = np.frombuffer(r["mean"], dtype=np.float64)
            pm2 = np.frombuffer(r["m2"], dtype=np.float64).reshape(dim, dim)
            n, mean, m2 = _merge(n, mean, m2, int(r["n"]), pm, pm2)
            seen.update(r["batch_ids"])
    return n, mean, m2, sorted(seen)


def _merge(na: int, ma: np.ndarray, m2a: np.ndarray, nb: int, mb: np.ndarray, m2b: np.ndarray):
    if na == 0:
        return nb, mb.copy(), m2b.copy()
    n = na + nb
    delta = mb - ma
    return n, ma + delta * (nb / n), m2a + m2b + np.outer(delta, delta) * (na * nb / n)


def fitted_pipeline(spark: SparkSession, n: int, mean: np.ndarray, m2: np.ndarray, k_fit: int):
    """The same model Spark ML's StandardScaler(withMean, withStd) + PCA would fit on these rows (sample
    std; zero-variance dims scaled to 0; explained variance = eigenvalue / trace), built from the
    moments: as a Spark ML PipelineModel (saved, for anyone to load as any other) and as the Projection
    the step transforms with."""
    from pyspark.ml import PipelineModel  # about 1 s of imports (scipy): only where a model is fitted
    from pyspark.ml.common import _py2java
    from pyspark.ml.feature import PCAModel, StandardScalerModel
    from pyspark.ml.linalg import DenseMatrix, DenseVector

    cov = m2 / (n - 1)
    std = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    inv = np.where(std > 0, 1.0 / np.where(std > 0, std, 1.0), 0.0)
    corr = cov * inv[:, None] * inv[None, :]
    eigenvalues, vectors = np.linalg.eigh(corr)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, vectors = np.clip(eigenvalues[order], 0.0, None), vectors[:, order]
    ratio = eigenvalues / eigenvalues.sum()
    sc, jvm = spark.sparkContext, spark._jvm
    scaler = StandardScalerModel(
        jvm.org.apache.spark.ml.feature.StandardScalerModel(
            "fruits_scaler", _py2java(sc, DenseVector(std)), _py2java(sc, DenseVector(mean))
        )
    )
    dim = len(mean)
    pca = PCAModel(
        jvm.org.apache.spark.ml.feature.PCAModel(
            "fruits_pca",
            _py2java(sc, DenseMatrix(dim, k_fit, vectors[:, :k_fit].flatten(order="F"))),
            _py2java(sc, DenseVector(ratio[:k_fit])),
        )
    )
    for param, value in (("inputCol", "vec"), ("outputCol", "scaled"), ("withMean", True), ("withStd", True)):
        scaler.set(scaler.getParam(param), value)
    for param, value in (("inputCol", "scaled"), ("outputCol", "pca"), ("k", k_fit)):
        pca.set(pca.getParam(param), value)
    projection = Projection(mean, inv, np.ascontiguousarray(vectors[:, :k_fit]))
    return PipelineModel([scaler, pca]), projection, [float(v) for v in ratio[:k_fit]]


def fit_sample(
    spark: SparkSession, args: argparse.Namespace, fit_batches: list[str]
) -> tuple[DataFrame, dict]:
    """The fit's rows: the run's fit sample (written by the embed step) restricted to the fit batches.
    With no sample at all (a history from before samples), the bottom rows by hash of the fit batches'
    embeddings are taken once, from a full read, and the metadata says so."""
    folder, _ = run_folder(args)
    state_uri = args.fit_sample or f"{folder}sample_fit.json"
    if sparkio.exists(spark, state_uri):
        state = json.loads(sparkio.read_text(spark, state_uri))
    else:  # no embed step in this run (a refit alone): the sample as the last validated run left it
        state_uri = f"{sample_root(args)}/LATEST.json"
        state = samples.read_pointer(spark, state_uri).get("fit") or {}
    state = samples.same_scheme(state, args.embeddings_root) if state else {}
    rows = samples.read(spark, state, "stratum") if state else None
    if rows is not None:
        source = {"method": "sample", "state": state_uri, "size": int(state.get("size", 0))}
    if rows is None:
        log.warning("no fit sample at %s: sampling the fit batches' embeddings from a full read", state_uri)
        emb = tables.read_partitions(
            spark, args.embeddings_root, fit_batches, schema=tables.EMBEDDINGS_SCHEMA
        )
        if emb is None:
            raise SystemExit(
                "pca: nothing to fit on: the fit batches have no embeddings (all files rejected?)"
            )
        offered = samples.with_hash(
            emb.select("batch_id", "path", "embedding").withColumn("stratum", F.lit("all"))
        )
        rows = samples.prefilter(offered, args.fit_sample_rows, "stratum")
        source = {"method": "full read", "size": args.fit_sample_rows}
    # A filter, not a join with a table of the ids: no broadcast to build (two Spark jobs on a small fit);
    # Spark turns a long list into a hash set.
    rows = rows.where(F.col("batch_id").isin(fit_batches)).select("batch_id", "path", "embedding")
    return rows, source


def fit(spark: SparkSession, args: argparse.Namespace, fit_batches: list[str]) -> dict:
    """Fit and save version V on the bounded sample."""
    rows, source = fit_sample(spark, args, fit_batches)
    n_rows, mean, m2, sampled_batches = moments(rows)
    if n_rows < 2:
        raise SystemExit(f"pca: cannot fit on {n_rows} row(s); add images or fix the fit batches")
    k_fit = min(args.k if args.k is not None else args.max_k, EMBEDDING_DIM, n_rows)
    if args.k is not None and args.k > n_rows:
        raise SystemExit(f"pca: k={args.k} exceeds the {n_rows} rows to fit on; lower k or add batches")
    model, projection, explained = fitted_pipeline(spark, n_rows, mean, m2, k_fit)
    cumulative, total = [], 0.0
    for v in explained:
        total += v
        cumulative.append(min(total, 1.0))
    k = choose_k(cumulative, args.k, args.variance_target)
    target = None if args.k is not None else args.variance_target
    version_root = f"{args.model_root.rstrip('/')}/{args.version}"
    model.write().overwrite().save(f"{version_root}/spark_model")
    sparkio.write_bytes(spark, f"{version_root}/{PROJECTION_FILE}", projection.to_bytes())
    pattern = re.compile(args.test_batch_pattern, re.IGNORECASE)
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
        "fit_sample": {**source, "rows": n_rows, "rule": "bottom rows by xxhash64(path)"},
        "fit_batch_count": len(fit_batches),
        "fit_batches": fit_batches[:FIT_BATCHES_LISTED],
        "fit_batches_listed_all": len(fit_batches) <= FIT_BATCHES_LISTED,
        "fit_sampled_batches": len(sampled_batches),
        "fit_saw_test": any(pattern.search(b) for b in sampled_batches),
        "input_dim": EMBEDDING_DIM,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    sparkio.write_bytes(spark, f"{version_root}/scree.png", scree_png(explained, cumulative, k, target))
    # metadata.json last: a version folder without it is an unfinished fit and is never loaded.
    sparkio.write_json(spark, f"{version_root}/metadata.json", meta)
    log.info(
        "fitted PCA %s on a sample of %d rows: k=%d explains %.4f", args.version, n_rows, k, cumulative[k - 1]
    )
    return meta


def load(spark: SparkSession, args: argparse.Namespace) -> dict:
    uri = f"{args.model_root.rstrip('/')}/{args.version}/metadata.json"
    if not sparkio.exists(spark, uri):
        raise SystemExit(f"pca: model version {args.version} has no metadata at {uri}; refit with --fit")
    return json.loads(sparkio.read_text(spark, uri))


# --- the transform, in chunks ----------------------------------------------------------------------------
def transform_chunk(
    spark: SparkSession, args: argparse.Namespace, projection: Projection, k: int, chunk: list[str], out: str
) -> tuple[dict, DataFrame | None]:
    """Transform one chunk of batches, write it (ceil(rows / 20,000) files per batch), read it back for
    the checks; returns ({batch: checks}, the chunk's offer to the report sample)."""
    nothing = {  # a batch whose every file was rejected has no embeddings: it is reported all the same
        b: {"embeddings": 0, "features": 0, "distinct_paths": 0, "missing_features": 0, "extra_features": 0}
        for b in chunk
    }
    emb = tables.read_partitions(spark, args.embeddings_root, chunk, schema=tables.EMBEDDINGS_SCHEMA)
    if emb is None:
        return nothing, None
    emb = emb.persist(StorageLevel.MEMORY_AND_DISK)  # read from S3 once per chunk
    counts = {r["batch_id"]: int(r["count"]) for r in emb.groupBy("batch_id").count().collect()}
    features = project(emb, projection, k).select(
        "batch_id",
        "path",
        "label",
        "content_sha256",
        "features",
        F.lit(args.version).alias("pca_version"),
        "model_id",
    )
    tables.write_by_batch(spark, features, counts, out, ["batch_id"])
    written = tables.read_partitions(spark, out, chunk, schema=tables.FEATURES_SCHEMA)
    if written is None:
        return {
            **nothing,
            **{b: {**nothing[b], "embeddings": n, "missing_features": n} for b, n in counts.items()},
        }, None
    checks, labels = tables.checks_by(
        written,
        "label",
        tables.vector_checks(
            "features", [tables.distinct_paths(), F.collect_set("pca_version").alias("pca_versions")]
        ),
    )
    missing_n, extra_n = tables.unmatched_paths(emb, written)
    out_checks = dict(nothing)
    for b in sorted(set(counts) | set(checks)):
        c = checks.get(b, {})
        out_checks[b] = {
            "embeddings": counts.get(b, 0),
            "features": int(c.get("rows", 0)),
            "distinct_paths": int(c.get("distinct_paths", 0)),
            "dim_min": c.get("dim_min"),
            "dim_max": c.get("dim_max"),
            "null_vectors": int(c.get("null_vectors") or 0),
            "nonfinite_values": int(c.get("nonfinite_values") or 0),
            "pca_versions": sorted(c.get("pca_versions") or []),
            "missing_features": missing_n.get(b, 0),
            "extra_features": extra_n.get(b, 0),
            "labels": dict(sorted(labels.get(b, {}).items())),
        }
    test = F.col("batch_id").rlike("(?i)" + args.test_batch_pattern)
    offer = samples.with_hash(
        written.select("batch_id", "path", "label", "features").join(emb.select("path", "embedding"), "path")
    ).withColumn("split", F.when(test, "test").otherwise("train"))
    return out_checks, offer


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    spark = sparkio.session("fruits-pca")
    started = time.monotonic()
    fit_batches, batches = read_batches(spark, args)
    meta = fit(spark, args, fit_batches) if args.fit else load(spark, args)
    fit_s = time.monotonic() - started
    projection = load_projection(spark, f"{args.model_root.rstrip('/')}/{args.version}")
    k = int(meta["k"])

    out = f"{args.features_root.rstrip('/')}/pca_version={args.version}"
    checks: dict[str, dict] = {}
    offered: DataFrame | None = None
    size = args.report_sample_rows
    # Rows of `offered` per split, at most (the checks count each batch's features): a split under the
    # sample's size needs no cut, so a small run's offer costs no Spark job before its checkpoint.
    offered_rows: dict[str, int] = {}
    test = re.compile(args.test_batch_pattern, re.IGNORECASE)  # as transform_chunk's rlike
    for i in range(0, len(batches), args.chunk_batches):
        chunk = batches[i : i + args.chunk_batches]
        chunk_checks, offer = transform_chunk(spark, args, projection, k, chunk, out)
        checks.update(chunk_checks)
        if offer is not None:  # keep only what can be in the sample: bounded whatever the chunks
            for b in chunk:
                split = "test" if test.search(b) else "train"
                offered_rows[split] = offered_rows.get(split, 0) + int(chunk_checks[b]["features"])
            merged = offer if offered is None else offered.unionByName(offer)
            offered = samples.prefilter(merged, size, "split", offered_rows).localCheckpoint()
            offered_rows = {split: min(n, size) for split, n in offered_rows.items()}
        spark.catalog.clearCache()  # the chunk's cached embeddings
        log.info("transformed batches %d-%d of %d", i + 1, i + len(chunk), len(batches))
    sparkio.remove_partitions_not_written(
        spark, out, batches, {b for b, c in checks.items() if c.get("features")}
    )
    rows = sum(c["features"] for c in checks.values())
    transformed = time.monotonic()

    folder, run = run_folder(args)
    if args.validation_out:
        sparkio.write_json(
            spark, args.validation_out, {"step": "pca", "version": args.version, "k": k, "batches": checks}
        )
        root = sample_root(args)
        pointer = samples.same_scheme(
            samples.read_pointer(spark, f"{root}/LATEST.json").get("report") or {}, root
        )
        part = pointer if pointer.get("version") == args.version and not args.fit else None
        state = dict(part or {})
        if offered is not None:
            state = samples.update(  # `offered` went through prefilter in the chunks' loop
                spark,
                part,
                offered,
                size,
                "split",
                f"{root}/report/pca_version={args.version}/run={run}",
                prefiltered=True,
                rows=offered_rows,
            )
        sparkio.write_json(spark, f"{folder}sample_report.json", {**state, "version": args.version})
    seconds = time.monotonic() - started
    metrics = {
        "step": "pca",
        "version": args.version,
        "fitted": bool(args.fit),
        "k": k,
        "explained_variance_at_k": meta["explained_variance_at_k"],
        "fit_rows": meta.get("fit_rows"),
        "rows": rows,
        "batches": len(batches),
        "fit_seconds": round(fit_s, 3),
        "transform_seconds": round(transformed - fit_s - started, 3),
        "seconds": round(seconds, 3),
    }
    log.info("transformed %d rows of %d batch(es) to k=%d in %.1f s", rows, len(batches), k, seconds)
    if args.metrics_out:
        sparkio.write_json(spark, args.metrics_out, metrics)
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
