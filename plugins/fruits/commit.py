"""The end of a run: record what was validated, then summarise it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fruits.catalog import Catalog

EMBEDDING_DIM = 1280


def commit(
    catalog: Catalog, plan: dict[str, Any], results: dict[str, dict[str, Any]], pca_meta: dict[str, Any]
) -> list[str]:
    """Point at the new PCA model first, then write one ledger record per batch.

    In this order a crash in between leaves batches unrecorded (they are redone, idempotently), never
    recorded against a model that is not current."""
    layout, pca = catalog.layout, plan["pca"]
    now = datetime.now(UTC).isoformat(timespec="seconds")
    if pca["fit"]:
        catalog.write_json(
            layout.pca_current,
            {
                "version": pca["version"],
                "k": pca_meta["k"],
                "set_at": now,
                "run_id": plan["run_id"],
            },
        )
    ledger = catalog.ledger()
    written = []
    for batch_id, r in sorted(results.items()):
        previous = ledger.get(batch_id, {})
        new = batch_id in plan["batches"]
        record = {
            **previous,
            "batch_id": batch_id,
            "files": r["files"],
            "embedded": r["embedded"],
            "rejected": r["rejected"],
            "labels": r["labels"],
            "ignored_hidden_files": plan.get("ignored", {}).get(batch_id, [])
            if new
            else previous.get("ignored_hidden_files", []),
            "model_id": plan["model_id"] if new else previous.get("model_id", plan["model_id"]),
            "pca_version": pca["version"],
            "pca_k": pca_meta["k"],
            "embeddings": layout.uri(layout.partition(layout.embeddings, batch_id)),
            "rejects": layout.uri(layout.partition(layout.rejects, batch_id)),
            "features": layout.uri(layout.partition(layout.features_prefix(pca["version"]), batch_id)),
            "run_id": plan["run_id"] if new else previous.get("run_id"),
            "processed_at": now if new else previous.get("processed_at", now),
            "updated_at": now,
        }
        catalog.record_batch(batch_id, record)
        written.append(batch_id)
    return written


def summarize(
    plan: dict[str, Any], results: dict[str, dict[str, Any]], pca_meta: dict[str, Any], seconds: float
) -> dict[str, Any]:
    new = [results[b] for b in plan["batches"]]
    return {
        "batches": len(new),
        "images": sum(r["files"] for r in new),
        "embedded": sum(r["embedded"] for r in new),
        "rejected": sum(r["rejected"] for r in new),
        "embedding_dim": EMBEDDING_DIM,
        "pca_components": pca_meta["k"],
        "explained_variance": round(float(pca_meta["explained_variance_at_k"]), 4),
        "seconds": round(seconds, 1),
    }
