"""The end of a run: record what was validated, then summarise it.

Reads the run's files (validation.json, batches.json, ignored.json, records.json), not the ledger: the
records this run rewrites (a forced re-run, or every batch on a refit) were saved by the plan with their
ETags, and only one that changed since is read again."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fruits.catalog import Catalog, pmap

EMBEDDING_DIM = 1280


def commit(catalog: Catalog, plan: dict[str, Any], validated: dict[str, Any]) -> dict[str, Any]:
    """Point at the new PCA model first, then write one ledger record per validated batch.

    In this order a crash in between leaves batches unrecorded (they are redone, idempotently), never
    recorded against a model that is not current. Returns counts only (XCom)."""
    layout, pca, k = catalog.layout, plan["pca"], validated["pca"]["k"]
    results: dict[str, dict[str, Any]] = catalog.read_run_file(validated["key"])["batches"]
    lists = catalog.read_run_file(plan["keys"]["batches.json"])
    new = set(lists["new"])
    rewritten = sorted(set(lists["recorded"]) | set(lists["refit"]))
    saved = (
        catalog.read_run_file(plan["keys"]["records.json"])
        if rewritten and "records.json" in plan["keys"]
        else {}
    )
    previous = catalog.records_now(rewritten, saved)
    ignored = catalog.read_run_file(plan["keys"]["ignored.json"])
    now = datetime.now(UTC).isoformat(timespec="seconds")
    if pca["fit"]:
        catalog.write_json(
            layout.pca_current,
            {
                "version": pca["version"],
                "k": k,
                "model_id": plan["model_id"],  # the weights its fit saw (plan.check_same_weights)
                "set_at": now,
                "run_id": plan["run_id"],
            },
        )

    def record(batch_id: str) -> None:
        r, before, is_new = results[batch_id], previous.get(batch_id, {}), batch_id in new
        catalog.record_batch(
            batch_id,
            {
                **before,
                "batch_id": batch_id,
                "files": r["files"],
                "embedded": r["embedded"],
                "rejected": r["rejected"],
                "labels": r["labels"],
                "ignored_hidden_files": ignored.get(batch_id, [])
                if is_new
                else before.get("ignored_hidden_files", []),
                "model_id": plan["model_id"] if is_new else before.get("model_id", plan["model_id"]),
                "pca_version": pca["version"],
                "pca_k": k,
                "embeddings": layout.uri(layout.partition(layout.embeddings, batch_id)),
                "rejects": layout.uri(layout.partition(layout.rejects, batch_id)),
                "features": layout.uri(layout.partition(layout.features_prefix(pca["version"]), batch_id)),
                "run_id": plan["run_id"] if is_new else before.get("run_id"),
                "processed_at": now if is_new else before.get("processed_at", now),
                "updated_at": now,
            },
        )

    pmap(record, sorted(results))
    fresh = [results[b] for b in sorted(new)]
    return {
        "records": len(results),
        "new": {
            "batches": len(fresh),
            "images": sum(r["files"] for r in fresh),
            "embedded": sum(r["embedded"] for r in fresh),
            "rejected": sum(r["rejected"] for r in fresh),
        },
    }


def summarize(
    plan: dict[str, Any], validated: dict[str, Any], committed: dict[str, Any], seconds: float
) -> dict[str, Any]:
    summary = {
        **committed["new"],
        "embedding_dim": EMBEDDING_DIM,
        "pca_components": validated["pca"]["k"],
        "explained_variance": round(float(validated["pca"]["explained_variance_at_k"]), 4),
        "seconds": round(seconds, 1),
        "ledger_records": committed["records"],
    }
    deferred = plan.get("deferred") or {}
    if deferred.get("batches"):  # left for the next run by max_images_per_run
        summary["deferred"] = deferred
    if plan.get("sizing"):  # compute=emr: what the plan expected, beside what the cluster cost
        summary["planned"] = {
            "core_nodes": plan["sizing"]["core_nodes"],
            "expected_s": plan["sizing"]["expected_s"]["total"],
            "expected_cost_usd": plan["sizing"]["expected_cost_usd"],
        }
    return summary
