"""Validation of a run's outputs against its inputs, read back from S3 file by file (bounded memory).

Nothing is recorded in the ledger unless every check here passes.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from airflow.providers.amazon.aws.hooks.s3 import S3Hook

from fruits.layout import Layout

EMBEDDING_DIM = 1280
EXPECTED_COLUMNS = {
    "embeddings": {
        "path": pa.string(),
        "label": pa.string(),
        "content_sha256": pa.string(),
        "size_bytes": pa.int64(),
        "embedding": pa.list_(pa.float32()),
        "model_id": pa.string(),
        "engine": pa.string(),
    },
    "rejects": {
        "path": pa.string(),
        "label": pa.string(),
        "content_sha256": pa.string(),
        "size_bytes": pa.int64(),
        "reason": pa.string(),
    },
    "features": {
        "path": pa.string(),
        "label": pa.string(),
        "content_sha256": pa.string(),
        "features": pa.list_(pa.float32()),
        "pca_version": pa.string(),
        "model_id": pa.string(),
    },
}


class ValidationFailed(RuntimeError):
    pass


@dataclass
class BatchResult:
    batch_id: str
    files: int
    embedded: int = 0
    rejected: int = 0
    features: int = 0
    labels: dict[str, int] = field(default_factory=dict)
    reject_reasons: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def iter_parquet(hook: S3Hook, bucket: str, prefix: str) -> Iterator[tuple[str, pa.Table]]:
    for key in sorted(hook.list_keys(bucket, prefix=prefix) or []):
        if key.endswith(".parquet"):
            body = hook.get_key(key, bucket).get()["Body"].read()
            yield key, pq.read_table(io.BytesIO(body))


def _same_type(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Spark names list items 'element' and may mark them non-null: compare the value types only."""
    if pa.types.is_list(expected):
        return pa.types.is_list(actual) and actual.value_type.equals(expected.value_type)
    return actual.equals(expected)


def _schema_problems(table: pa.Table, kind: str, key: str) -> list[str]:
    problems = []
    for name, typ in EXPECTED_COLUMNS[kind].items():
        if name not in table.column_names:
            problems.append(f"{key}: column {name!r} missing")
        elif not _same_type(table.schema.field(name).type, typ):
            problems.append(f"{key}: column {name!r} is {table.schema.field(name).type}, expected {typ}")
    return problems


def _vector_problems(column: pa.ChunkedArray, dim: int, what: str, key: str) -> list[str]:
    problems = []
    if column.null_count:
        problems.append(f"{key}: {column.null_count} null {what} vector(s)")
    lengths = pc.list_value_length(column)
    lo, hi = pc.min(lengths).as_py(), pc.max(lengths).as_py()
    if len(column) and (lo != dim or hi != dim):
        problems.append(f"{key}: {what} length in [{lo}, {hi}], expected {dim}")
    values = pc.list_flatten(column)
    bad = len(values) - pc.sum(pc.is_finite(values)).as_py() if len(values) else 0
    if bad:
        problems.append(f"{key}: {bad} NaN/inf value(s) in {what}")
    return problems


def _single_value_problems(column: pa.ChunkedArray, expected: str, what: str, key: str) -> list[str]:
    found = set(pc.unique(column).to_pylist())
    return [] if found == {expected} else [f"{key}: {what} {sorted(map(str, found))}, expected {expected!r}"]


def validate_batch(
    hook: S3Hook, layout: Layout, batch_id: str, files: int, model_id: str, pca_version: str, k: int
) -> BatchResult:
    res = BatchResult(batch_id=batch_id, files=files)
    seen_paths: set[str] = set()
    embedded_paths: set[str] = set()
    for kind, prefix in (
        ("embeddings", layout.partition(layout.embeddings, batch_id)),
        ("rejects", layout.partition(layout.rejects, batch_id)),
    ):
        for key, table in iter_parquet(hook, layout.bucket, prefix):
            schema_problems = _schema_problems(table, kind, key)
            if schema_problems:
                res.problems += schema_problems
                continue
            paths = table.column("path").to_pylist()
            counts = Counter(paths)
            dupes = {p for p, c in counts.items() if c > 1} | seen_paths.intersection(counts)
            if dupes:
                res.problems.append(
                    f"{key}: {len(dupes)} path(s) appear more than once, e.g. {sorted(dupes)[:3]}"
                )
            seen_paths.update(paths)
            if kind == "embeddings":
                res.embedded += table.num_rows
                embedded_paths.update(paths)
                res.problems += _vector_problems(table.column("embedding"), EMBEDDING_DIM, "embedding", key)
                res.problems += _single_value_problems(table.column("model_id"), model_id, "model_id", key)
                for label, n in zip(*pc.value_counts(table.column("label")).flatten(), strict=True):
                    res.labels[str(label)] = res.labels.get(str(label), 0) + n.as_py()
            else:
                res.rejected += table.num_rows
                for reason in table.column("reason").to_pylist():
                    res.reject_reasons[reason] = res.reject_reasons.get(reason, 0) + 1
    if res.embedded + res.rejected != files:
        res.problems.append(
            f"embedded ({res.embedded}) + rejected ({res.rejected}) = {res.embedded + res.rejected}, "
            f"but the batch holds {files} input file(s)"
        )
    feature_paths: set[str] = set()
    for key, table in iter_parquet(
        hook, layout.bucket, layout.partition(layout.features_prefix(pca_version), batch_id)
    ):
        schema_problems = _schema_problems(table, "features", key)
        if schema_problems:
            res.problems += schema_problems
            continue
        res.features += table.num_rows
        feature_paths.update(table.column("path").to_pylist())
        res.problems += _vector_problems(table.column("features"), k, "PCA feature", key)
        res.problems += _single_value_problems(table.column("pca_version"), pca_version, "pca_version", key)
    if res.features != res.embedded or feature_paths != embedded_paths:
        res.problems.append(
            f"PCA features ({res.features} rows) do not match the embeddings ({res.embedded} rows) one to one"
        )
    return res


def validate_run(
    hook: S3Hook, layout: Layout, files_per_batch: dict[str, int], model_id: str, pca_version: str, k: int
) -> dict[str, dict[str, Any]]:
    results = {
        b: validate_batch(hook, layout, b, n, model_id, pca_version, k)
        for b, n in sorted(files_per_batch.items())
    }
    problems = [f"[{b}] {p}" for b, r in results.items() for p in r.problems]
    if problems:
        raise ValidationFailed(
            f"{len(problems)} validation problem(s); nothing was recorded in the ledger:\n"
            + "\n".join(problems)
        )
    return {b: asdict(r) for b, r in results.items()}
