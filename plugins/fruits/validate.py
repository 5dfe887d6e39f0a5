"""Validation of a run's outputs, from what the Spark steps measured and the Parquet footers.

The checks on the data (counts per batch, vector dims, null vectors, NaN/inf, duplicate paths, model ids,
PCA versions, features vs embeddings one to one by path) are computed by the steps themselves, on what they
wrote (runs/RUN/embed_validation.json, pca_validation.json). This side compares them with the plan
(runs/RUN/expected.json: the input files of every batch the run rewrites) and reads each output file's
Parquet footer (schema, row count: one ranged GET of the file's tail), never a vector. So its memory and
transfer do not grow with the rows. Nothing is recorded in the ledger unless every check passes.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from fruits.catalog import Catalog

EMBEDDING_DIM = 1280
ROWS_PER_FILE = 20_000  # spark_jobs/fruits_jobs/tables.py
TAIL_BYTES = 64 << 10  # one GET reads a footer of up to this size (Spark's are a few KB)
SAMPLES_POINTER = "samples/LATEST.json"  # spark_jobs/fruits_jobs/samples.py
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


# --- Parquet footers ------------------------------------------------------------------------------------
def read_footer(client, bucket: str, key: str) -> pq.FileMetaData:
    """A Parquet file's metadata from its last bytes: a ranged GET of the tail (a second one only when the
    footer is larger than TAIL_BYTES). The row groups are never read."""
    tail = client.get_object(Bucket=bucket, Key=key, Range=f"bytes=-{TAIL_BYTES}")["Body"].read()
    if len(tail) < 12 or tail[-4:] != b"PAR1":
        raise ValueError("not a Parquet file (no PAR1 magic at its end)")
    size = int.from_bytes(tail[-8:-4], "little") + 8
    if size > len(tail):
        tail = client.get_object(Bucket=bucket, Key=key, Range=f"bytes=-{size}")["Body"].read()
    return pq.read_metadata(pa.BufferReader(tail[-size:]))


def _same_type(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Spark names list items 'element' and may mark them non-null: compare the value types only."""
    if pa.types.is_list(expected):
        return pa.types.is_list(actual) and actual.value_type.equals(expected.value_type)
    return actual.equals(expected)


def schema_problems(schema: pa.Schema, kind: str, key: str) -> list[str]:
    problems = []
    for name, typ in EXPECTED_COLUMNS[kind].items():
        if name not in schema.names:
            problems.append(f"{key}: column {name!r} missing")
        elif not _same_type(schema.field(name).type, typ):
            problems.append(f"{key}: column {name!r} is {schema.field(name).type}, expected {typ}")
    return problems


def partition_footers(catalog: Catalog, prefix: str, kind: str) -> tuple[int, int, list[str]]:
    """(rows, Parquet files, problems) of one batch partition, from its files' footers."""
    client = catalog.hook.get_conn()
    rows, files, problems = 0, 0, []
    for key in sorted(catalog.hook.list_keys(catalog.bucket, prefix=prefix) or []):
        if not key.endswith(".parquet"):
            continue
        files += 1
        try:
            meta = read_footer(client, catalog.bucket, key)
        except (ValueError, OSError, pa.ArrowException) as exc:
            problems.append(f"{key}: unreadable Parquet footer ({exc})")
            continue
        rows += meta.num_rows
        problems += schema_problems(meta.schema.to_arrow_schema(), kind, key)
    most = max(1, math.ceil(rows / ROWS_PER_FILE))
    if files > most:
        problems.append(f"{prefix}: {files} Parquet files for {rows} rows, expected at most {most}")
    return rows, files, problems


# --- the checks -------------------------------------------------------------------------------------------
def _vector_problems(c: dict[str, Any], rows: int, dim: int, what: str) -> list[str]:
    problems = []
    if c.get("null_vectors"):
        problems.append(f"{c['null_vectors']} null {what} vector(s)")
    lo, hi = c.get("dim_min"), c.get("dim_max")
    if rows and (lo != dim or hi != dim):
        problems.append(f"{what} length in [{lo}, {hi}], expected {dim}")
    if c.get("nonfinite_values"):
        problems.append(f"{c['nonfinite_values']} NaN/inf value(s) in {what}")
    return problems


def _values_problem(found: list[str], expected: str, what: str, rows: int) -> list[str]:
    if rows and sorted(map(str, found or [])) != [expected]:
        return [f"{what} {sorted(map(str, found or []))}, expected {expected!r}"]
    return []


def check_embed(catalog: Catalog, b: str, files: int, e: dict[str, Any] | None, model_id: str) -> dict:
    layout = catalog.layout
    res: dict[str, Any] = {"files": files, "problems": []}
    if e is None:
        res["problems"].append("the embed step reported nothing for this batch (embed_validation.json)")
        return res
    embedded, rejected = int(e.get("embedded", 0)), int(e.get("rejected", 0))
    res.update(embedded=embedded, rejected=rejected, labels=e.get("labels") or {})
    res["reject_reasons"] = e.get("reject_reasons") or {}
    p = res["problems"]
    if int(e.get("files", -1)) != files:
        p.append(f"the embed step read {e.get('files')} input file(s), the plan listed {files}")
    if embedded + rejected != files:
        p.append(
            f"embedded ({embedded}) + rejected ({rejected}) = {embedded + rejected}, "
            f"but the batch holds {files} input file(s)"
        )
    if e.get("duplicate_paths"):
        p.append(f"{e['duplicate_paths']} path(s) appear more than once in the embeddings and rejects")
    p += _vector_problems(e, embedded, EMBEDDING_DIM, "embedding")
    p += _values_problem(e.get("model_ids"), model_id, "model_id", embedded)
    for kind, table, expected in (
        ("embeddings", layout.embeddings, embedded),
        ("rejects", layout.rejects, rejected),
    ):
        rows, n_files, problems = partition_footers(catalog, layout.partition(table, b), kind)
        res[f"{kind}_files"] = n_files
        p += problems
        if rows != expected:
            p.append(f"{kind}: the Parquet footers hold {rows} row(s), the embed step counted {expected}")
    return res


def check_pca(
    catalog: Catalog, b: str, embedded: int | None, f: dict[str, Any] | None, version: str, k: int
) -> dict:
    layout = catalog.layout
    res: dict[str, Any] = {"problems": []}
    p = res["problems"]
    if f is None:  # the step reports every batch it was given, one with no embeddings too
        p.append("the pca step reported nothing for this batch (pca_validation.json)")
        res["features"] = 0
        return res
    features = int(f.get("features", 0))
    res.update(features=features, embeddings=int(f.get("embeddings", 0)), labels=f.get("labels") or {})
    if embedded is not None and f.get("embeddings") != embedded:
        p.append(f"the pca step read {f.get('embeddings')} embedding(s), the embed step wrote {embedded}")
    if features != int(f.get("embeddings", 0)) or f.get("missing_features") or f.get("extra_features"):
        p.append(
            f"PCA features ({features} rows) do not match the embeddings ({f.get('embeddings')} rows) one to "
            f"one: {f.get('missing_features', 0)} embedding path(s) without features, "
            f"{f.get('extra_features', 0)} feature path(s) without an embedding"
        )
    if int(f.get("distinct_paths", features)) != features:
        p.append(f"{features - int(f['distinct_paths'])} duplicate path(s) in the PCA features")
    p += _vector_problems(f, features, k, "PCA feature")
    p += _values_problem(f.get("pca_versions"), version, "pca_version", features)
    rows, n_files, problems = partition_footers(
        catalog, layout.partition(layout.features_prefix(version), b), "features"
    )
    res["features_files"] = n_files
    p += problems
    if rows != features:
        p.append(f"features: the Parquet footers hold {rows} row(s), the pca step counted {features}")
    return res


def validate_run(catalog: Catalog, plan: dict[str, Any]) -> dict[str, Any]:
    """Check every batch the run (re)wrote; write runs/RUN/validation.json (per batch, problems included);
    raise ValidationFailed listing every problem, or return the totals (small: for XCom)."""
    prefix, version = plan["run_prefix"], plan["pca"]["version"]
    expected = catalog.read_json(plan["expected_key"]) or {}
    embed = catalog.read_json(f"{prefix}embed_validation.json")
    pca = catalog.read_json(f"{prefix}pca_validation.json")
    meta = catalog.pca_metadata(version)
    k = int(meta["k"])
    run_problems = []
    new = set(catalog.read_json(plan["keys"]["batches.json"])["new"])
    if embed is None and new:
        run_problems.append(f"no {prefix}embed_validation.json: the embed step did not finish")
    elif embed is not None and embed.get("model_id") != plan["model_id"]:
        run_problems.append(
            f"the embed step used model {embed.get('model_id')!r}, the plan {plan['model_id']!r}"
        )
    if pca is None:
        run_problems.append(f"no {prefix}pca_validation.json: the pca step did not finish")
    else:
        if pca.get("version") != version:
            run_problems.append(f"the pca step wrote version {pca.get('version')!r}, the plan {version!r}")
        if int(pca.get("k", -1)) != k:
            run_problems.append(f"the pca step used k={pca.get('k')}, the model's metadata k={k}")
    embed_b = (embed or {}).get("batches") or {}
    pca_b = (pca or {}).get("batches") or {}
    results: dict[str, dict[str, Any]] = {}
    for b, files in sorted(expected.items()):
        if b in new:
            r = check_embed(catalog, b, int(files), embed_b.get(b), plan["model_id"])
            embedded = r.get("embedded")
        else:  # a refit rewrites only the features of an earlier batch
            r = {"files": int(files), "problems": []}
            embedded = None
        f = check_pca(catalog, b, embedded, pca_b.get(b), version, k)
        r["problems"] += f.pop("problems")
        if b not in new:
            r.update(embedded=f.get("embeddings", 0), labels=f.get("labels") or {}, reject_reasons={})
            r["rejected"] = int(files) - r["embedded"]
        r.update(features=f.get("features", 0), features_files=f.get("features_files", 0))
        results[b] = r
    problems = run_problems + [f"[{b}] {p}" for b, r in results.items() for p in r["problems"]]
    totals = {
        "batches": len(new),
        "batches_validated": len(results),
        "images": sum(results[b]["files"] for b in new if b in results),
        "embedded": sum(results[b].get("embedded", 0) for b in new if b in results),
        "rejected": sum(results[b].get("rejected", 0) for b in new if b in results),
        "features": sum(r.get("features", 0) for r in results.values()),
        "problems": len(problems),
    }
    key = f"{prefix}validation.json"
    catalog.write_json(
        key,
        {
            "ok": not problems,
            "totals": totals,
            "pca": {"version": version, "k": k, "explained_variance_at_k": meta["explained_variance_at_k"]},
            "model_id": plan["model_id"],
            "problems": problems,
            "batches": results,
        },
    )
    if problems:
        raise ValidationFailed(
            f"{len(problems)} validation problem(s); nothing was recorded in the ledger (all of them in "
            f"{catalog.layout.uri(key)}):\n" + "\n".join(problems)
        )
    publish_samples(catalog, prefix)
    return {
        **totals,
        "key": key,
        "pca": {
            "version": version,
            "k": k,
            "explained_variance_at_k": meta["explained_variance_at_k"],
        },
    }


def publish_samples(catalog: Catalog, run_prefix: str) -> None:
    """Move samples/LATEST.json to the run's sample state (spark_jobs/fruits_jobs/samples.py): only a
    validated run's sampled rows are ever read by a later fit or report."""
    pointer = catalog.read_json(SAMPLES_POINTER) or {}
    changed = False
    for name, part in (("fit", "sample_fit.json"), ("report", "sample_report.json")):
        state = catalog.read_json(f"{run_prefix}{part}")
        if state is not None:
            pointer[name] = state
            changed = True
    if changed:
        catalog.hook.load_string(
            json.dumps(pointer, indent=2, sort_keys=True), SAMPLES_POINTER, catalog.bucket, replace=True
        )
