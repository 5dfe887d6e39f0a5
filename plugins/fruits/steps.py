"""The two Spark steps' job arguments, built from the run plan. Shared by the local and EMR backends.

No batch id is ever an argument: the embed step reads its batches from the input manifest and the PCA
step from the run's pca_batches.json, so a step's arguments stay a few hundred characters whatever the
run holds (AddJobFlowSteps refuses more than 10,240 per step).
"""

from __future__ import annotations

from dataclasses import dataclass

from fruits.layout import Layout


@dataclass(frozen=True)
class PcaPlan:
    version: str
    fit: bool
    mode: str  # "variance" | "fixed"
    k: int | None
    variance_target: float
    max_k: int
    fit_batches: int  # how many batches the fit may sample from (the ids are in pca_batches.json)
    transform_batches: int


def embed_args(
    layout: Layout,
    weights_uri: str,
    engine: str,
    threads: int | None,
    onnx_uri: str | None,
    run_id: str,
    region: str,
) -> list[str]:
    args = [
        "--input-root",
        layout.uri(layout.incoming.rstrip("/")),
        "--embeddings-out",
        layout.uri(layout.embeddings.rstrip("/")),
        "--rejects-out",
        layout.uri(layout.rejects.rstrip("/")),
        "--manifest",
        layout.uri(layout.run_file(run_id, "inputs.jsonl")),
        "--weights",
        weights_uri,
        "--engine",
        engine,
        "--metrics-out",
        layout.uri(layout.run_file(run_id, "embed.json")),
        "--validation-out",  # the step's own checks of what it wrote (plugins/fruits/validate.py)
        layout.uri(layout.run_file(run_id, "embed_validation.json")),
        "--s3-region",  # the job reads the photos with its own S3 client, which must sign for the bucket
        region,
    ]
    if threads:  # otherwise the job uses spark.task.cpus, which the Spark tuning derives from the cores
        args += ["--threads-per-task", str(threads)]
    if onnx_uri:
        args += ["--onnx-model", onnx_uri]
    return args


def pca_args(layout: Layout, plan: PcaPlan, run_id: str) -> list[str]:
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
        layout.uri(layout.run_file(run_id, "pca.json")),
        "--validation-out",
        layout.uri(layout.run_file(run_id, "pca_validation.json")),
        "--batches-file",  # {"fit": [...], "transform": [...]}
        layout.uri(layout.run_file(run_id, "pca_batches.json")),
    ]
    if plan.fit:
        args.append("--fit")
    if plan.mode == "fixed":
        args += ["--k", str(plan.k)]
    else:
        args += ["--variance-target", str(plan.variance_target), "--max-k", str(plan.max_k)]
    return args
