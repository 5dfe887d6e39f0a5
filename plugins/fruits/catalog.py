"""What is in the bucket: ready batches, the ledger of processed batches, claims, the current PCA model.

All S3 access goes through the amazon provider's S3Hook.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO

from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from botocore.exceptions import ClientError

from fruits.layout import READY_MARKER, Layout

log = logging.getLogger(__name__)


def sha256_stream(stream: BinaryIO) -> str:
    """SHA-256 of a file or an S3 body, read 1 MB at a time: model files are too big to hold twice."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: stream.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


class CatalogError(RuntimeError):
    """Bookkeeping in the bucket is unusable; the message says how to recover."""


def _now() -> datetime:
    return datetime.now(UTC)


def _is_hidden_relpath(rel: str) -> bool:
    # Mirrors Spark's file index: names starting with '_' (unless they hold '=') or '.' are skipped.
    return any((p.startswith("_") and "=" not in p) or p.startswith(".") for p in rel.split("/"))


class Catalog:
    def __init__(self, hook: S3Hook, layout: Layout) -> None:
        self.hook, self.layout, self.bucket = hook, layout, layout.bucket

    # --- generic JSON objects -------------------------------------------------------------------
    def read_json(self, key: str) -> dict[str, Any] | None:
        if not self.hook.check_for_key(key, self.bucket):
            return None
        text = self.hook.read_key(key, self.bucket)
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CatalogError(
                f"s3://{self.bucket}/{key} is not valid JSON ({exc}). It was not written by this pipeline "
                "or was damaged. Restore it from S3 versioning, or delete it to let the pipeline rebuild it "
                "(for a ledger record: the batch is then processed again)."
            ) from None
        if not isinstance(value, dict):
            raise CatalogError(f"s3://{self.bucket}/{key} holds {type(value).__name__}, expected an object")
        return value

    def object_sha256(self, key: str, bucket: str | None = None) -> str:
        """SHA-256 of an object's bytes as stored (in this bucket unless another is named)."""
        return sha256_stream(self.hook.get_key(key, bucket or self.bucket).get()["Body"])

    def write_json(self, key: str, payload: dict[str, Any]) -> None:
        self.hook.load_string(json.dumps(payload, indent=2, sort_keys=True), key, self.bucket, replace=True)

    # --- inputs -----------------------------------------------------------------------------------
    def batch_ids(self) -> list[str]:
        prefixes = self.hook.list_prefixes(self.bucket, prefix=self.layout.incoming, delimiter="/") or []
        return sorted(p[len(self.layout.incoming) :].rstrip("/") for p in prefixes)

    def is_ready(self, batch_id: str) -> bool:
        return self.hook.check_for_key(self.layout.ready_key(batch_id), self.bucket)

    def ready_batches(self) -> list[str]:
        return [b for b in self.batch_ids() if self.is_ready(b)]

    def scan_inputs(self, batch_id: str) -> tuple[list[tuple[str, int]], list[str]]:
        """([(key, size)] of the batch's input files, [hidden-named keys]). The _READY marker and folder
        markers are neither. Names starting with '_' or '.' are skipped by Spark's file index (think
        .DS_Store), so they are reported, not silently dropped."""
        prefix = self.layout.batch_prefix(batch_id)
        inputs, ignored = [], []
        for obj in self.hook.iter_file_metadata(prefix, self.bucket):
            key = obj["Key"]
            if key.endswith("/") or key == prefix + READY_MARKER:
                continue
            if _is_hidden_relpath(key[len(prefix) :]):
                ignored.append(key)
            else:
                inputs.append((key, int(obj["Size"])))
        return inputs, ignored

    # --- ledger -----------------------------------------------------------------------------------
    def ledger(self) -> dict[str, dict[str, Any]]:
        records: dict[str, dict[str, Any]] = {}
        for key in self.hook.list_keys(self.bucket, prefix=self.layout.ledger) or []:
            if key.endswith(".json"):
                record = self.read_json(key)
                assert record is not None
                records[key[len(self.layout.ledger) : -len(".json")]] = record
        return records

    def check_state(self, refit: bool) -> None:
        """Refuse to run on damaged bookkeeping rather than silently redo everything. Raises CatalogError
        with the way to recover."""
        ledger = self.ledger()  # raises on a record that is not valid JSON
        where = f"s3://{self.bucket}/"
        if not ledger and self._any_completed_run():
            raise CatalogError(
                f"the ledger {where}{self.layout.ledger} is empty but completed runs are recorded under "
                f"{where}{self.layout.runs}: the ledger was lost. Restore it from S3 versioning; or, to "
                "recompute on purpose, trigger with force=true and the batch_ids to redo."
            )
        if refit:
            return
        pointer_missing = not self.hook.check_for_key(self.layout.pca_current, self.bucket)
        if ledger and pointer_missing:
            raise CatalogError(
                f"{where}{self.layout.pca_current} is missing but {len(ledger)} batch(es) are in the ledger, "
                "so new features would not match the old ones. Restore the file from S3 versioning, or "
                "trigger with refit=true to fit a new PCA model over every processed batch."
            )
        self.current_pca()  # raises when the pointer names a model that is not there

    def _any_completed_run(self) -> bool:
        """A run summary is written only after its ledger records: one proves the ledger existed. (A first
        run that crashed before its commit leaves outputs but no summary, and is simply redone.)"""
        for obj in self.hook.iter_file_metadata(self.layout.runs, self.bucket):
            if obj["Key"].endswith("/summary.json"):
                return True
        return False

    def record_batch(self, batch_id: str, record: dict[str, Any]) -> None:
        self.write_json(self.layout.ledger_key(batch_id), record)

    # --- claims: a lease per batch, taken with a conditional write --------------------------------
    def claim(self, batch_id: str, run_id: str, lease: timedelta) -> bool:
        """Take the batch for this run. True if this run holds it; False if another live run does.

        The claim is an object written with If-None-Match, so two runs can never both win; it expires,
        so a run that died without releasing it blocks the batch for one lease at most."""
        key = self.layout.claim_key(batch_id)
        client = self.hook.get_conn()
        body = json.dumps(
            {"run_id": run_id, "claimed_at": _now().isoformat(), "expires_at": (_now() + lease).isoformat()}
        )
        for _ in range(2):
            try:
                client.put_object(Bucket=self.bucket, Key=key, Body=body.encode(), IfNoneMatch="*")
                return True
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "412"):
                    raise
            head = client.head_object(Bucket=self.bucket, Key=key)
            current = self.read_json(key) or {}
            if current.get("run_id") == run_id:
                return True
            expires = datetime.fromisoformat(current.get("expires_at", "1970-01-01T00:00:00+00:00"))
            if expires > _now():
                log.info("batch %s is claimed by run %s until %s", batch_id, current.get("run_id"), expires)
                return False
            log.warning(
                "claim on %s by %s expired at %s: taking it over", batch_id, current.get("run_id"), expires
            )
            try:  # replace only the exact expired claim we read
                client.put_object(Bucket=self.bucket, Key=key, Body=body.encode(), IfMatch=head["ETag"])
                return True
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in (
                    "PreconditionFailed",
                    "412",
                    "NoSuchKey",
                ):
                    raise
        return False

    def release(self, batch_id: str, run_id: str) -> None:
        key = self.layout.claim_key(batch_id)
        current = self.read_json(key)
        if current and current.get("run_id") == run_id:
            self.hook.delete_objects(self.bucket, [key])

    # --- PCA model pointer ------------------------------------------------------------------------
    def current_pca(self) -> dict[str, Any] | None:
        pointer = self.read_json(self.layout.pca_current)
        if pointer is None:
            return None
        version = pointer.get("version")
        model = self.layout.pca_model_prefix(str(version))
        intact = bool(version) and all(
            self.hook.list_keys(self.bucket, prefix=model + part, max_items=1)
            for part in ("metadata.json", "spark_model/")
        )
        if not intact:
            raise CatalogError(
                f"{self.layout.uri(self.layout.pca_current)} names PCA version {version!r}, but the model "
                f"at {self.layout.uri(model)} is missing or incomplete. Restore it from S3 versioning, or "
                "trigger with refit=true to fit a new model over every processed batch."
            )
        return pointer

    def pca_metadata(self, version: str) -> dict[str, Any]:
        meta = self.read_json(self.layout.pca_model_prefix(version) + "metadata.json")
        if meta is None:
            raise CatalogError(f"PCA model {version} has no metadata.json; the fit did not finish")
        return meta
