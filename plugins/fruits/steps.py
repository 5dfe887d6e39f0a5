"""The two Spark steps' job arguments, built from the run plan. Shared by the local and EMR backends."""

from __future__ import annotations

from dataclasses import dataclass

from fruits.layout import Layout


@dataclass(frozen=True)
class PcaPlan:
    version: str
    fit: bool
    fit_batches: tuple[str, ...]
    transform_batches: tuple[str, ...]
    mode: str  # "variance" | "fixed"
    k: int | None
    variance_target: float
    max_k: int


def embed_args(
    layout: Layout,
    batches: list[str],
    weights_uri: str,
    engine: str,
    threads: int | None,
    onnx_uri: str | None,
    run_prefix: str,
    region: str,
) -> list[str]:
    # The batches are the manifest's (runs/RUN/inputs.jsonl): none travels in the step's arguments.
    args = ["--input-root", layout.uri(layout.incoming.rstrip("/"))]
    args += [
        "--embeddings-out",
        layout.uri(layout.embeddings.rstrip("/")),
        "--rejects-out",
        layout.uri(layout.rejects.rstrip("/")),
        "--manifest",
        layout.uri(f"{run_prefix}inputs.jsonl"),
        "--weights",
        weights_uri,
        "--engine",
        engine,
        "--metrics-out",
        layout.uri(f"{run_prefix}embed.json"),
        "--validation-out",
        layout.uri(f"{run_prefix}embed_validation.json"),
        "--s3-region",  # the job reads the photos with its own S3 client, which must sign for the bucket
        region,
    ]
    if threads:  # otherwise the job uses spark.task.cpus, which the Spark tuning derives from the cores
        args += ["--threads-per-task", str(threads)]
    if onnx_uri:
        args += ["--onnx-model", onnx_uri]
    return args


def pca_args(layout: Layout, plan: PcaPlan, run_prefix: str) -> list[str]:
    args = [
        "--embeddings-root",
        layout.uri(layout.embeddings.rstrip("/")),
        "--features-root",
        layout.uri(layout.features.rstrip("/")),
        "--model-root",
        layout.uri(layout.pca_models.rstrip("/")),
        "--version",
        plan.version,
        "--metrics-out",
        layout.uri(f"{run_prefix}pca.json"),
        "--validation-out",
        layout.uri(f"{run_prefix}pca_validation.json"),
        # {"fit": [...], "transform": [...]}, written by the plan: no batch id in the step's arguments.
        "--batches-file",
        layout.uri(f"{run_prefix}pca_batches.json"),
    ]
    if plan.fit:
        args.append("--fit")
    if plan.mode == "fixed":
        args += ["--k", str(plan.k)]
    else:
        args += ["--variance-target", str(plan.variance_target), "--max-k", str(plan.max_k)]
    return args
