"""What is in the bucket: ready batches, the ledger of processed batches, claims, the current PCA model.

All S3 access goes through the amazon provider's S3Hook.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO, TypeVar

from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from botocore.exceptions import ClientError

from fruits.layout import READY_MARKER, Layout

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


def sha256_stream(stream: BinaryIO) -> str:
    """SHA-256 of a file or an S3 body, read 1 MB at a time: model files are too big to hold twice."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: stream.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


class CatalogError(RuntimeError):
    """Bookkeeping in the bucket is unusable; the message says how to recover."""


def trigger_command(conf: dict[str, Any]) -> str:
    """The CLI trigger of the DAG with this conf (the UI's trigger form takes the same values)."""
    return f"`airflow dags trigger fruits_embeddings --conf '{json.dumps(conf)}'`"


def restore_advice(bucket: str, key: str) -> str:
    """Restoring an object from S3 versioning, as commands (the bucket must have versioning on: README)."""
    return (
        f"Restore it from S3 versioning: `aws s3api list-object-versions --bucket {bucket} --prefix {key}` "
        f"lists its versions; copy the last good one back with `aws s3api copy-object --bucket {bucket} "
        f"--key {key} --copy-source '{bucket}/{key}?versionId=VERSION_ID'` (a deleted object comes back "
        "when its delete marker is deleted)"
    )


def _now() -> datetime:
    return datetime.now(UTC)


# A ledger record as commit writes it is several hundred bytes; an object under this (an empty file, a
# truncated copy) is not one, and the listing gives every size for free.
MIN_RECORD_BYTES = 16
# check_state reads the records written last: where a crash or a careless hand leaves damage.
RECENT_RECORDS_CHECKED = 2


def pmap(fn: Callable[[T], R], items: list[T], workers: int = 8) -> list[R]:
    """fn over items, in order, a few requests in flight: S3 answers in tens of ms, not microseconds.
    (Fewer than the AWS client's 10 pooled connections, which the threads share.)"""
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


def _is_hidden_relpath(rel: str) -> bool:
    # Mirrors Spark's file index: names starting with '_' (unless they hold '=') or '.' are skipped.
    return any((p.startswith("_") and "=" not in p) or p.startswith(".") for p in rel.split("/"))


class Catalog:
    def __init__(self, hook: S3Hook, layout: Layout) -> None:
        self.hook, self.layout, self.bucket = hook, layout, layout.bucket

    # --- generic JSON objects -------------------------------------------------------------------
    def read_json(self, key: str) -> dict[str, Any] | None:
        """One GET (the hook's read_key would HEAD twice first); None when the object is not there."""
        try:
            body = self.hook.get_conn().get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        try:
            value = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CatalogError(
                f"s3://{self.bucket}/{key} is not valid JSON ({exc}). It was not written by this pipeline "
                f"or was damaged. {self.way_out(key)}"
            ) from None
        if not isinstance(value, dict):
            raise CatalogError(
                f"s3://{self.bucket}/{key} holds {type(value).__name__}, expected an object. {self.way_out(key)}"
            )
        return value

    def way_out(self, key: str) -> str:
        """How to recover from a damaged bookkeeping object, in commands that work as written: every
        message that names a damaged object ends with this (tests/test_recovery.py follows each)."""
        restore = restore_advice(self.bucket, key)
        ledger = self.layout.ledger
        if key.startswith(ledger) and key.endswith(".json") and "/" not in key[len(ledger) :]:
            batch = key[len(ledger) : -len(".json")]
            # A forced run of the batch gets past check_state even when this was the only record (the
            # ledger then looks lost), and rewrites the record.
            return (
                f"{restore}. Or delete it and process the batch again: `aws s3 rm s3://{self.bucket}/{key}`, "
                f"then {trigger_command({'force': True, 'batch_ids': [batch]})}."
            )
        if key == self.layout.pca_current:
            return (
                f"{restore}. Or delete it and fit a new model over every processed batch: `aws s3 rm "
                f"s3://{self.bucket}/{key}`, then {trigger_command({'refit': True})}."
            )
        return f"{restore}. Or delete it (`aws s3 rm s3://{self.bucket}/{key}`): the pipeline rebuilds it."

    def read_run_file(self, key: str) -> Any:
        """A run file this run wrote earlier (layout.RUN_FILES): missing means a task ran out of order."""
        body = self.hook.get_conn().get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return json.loads(body)

    def write_run_file(self, key: str, payload: Any) -> None:
        self.put_bytes(key, json.dumps(payload, separators=(",", ":")).encode())

    def object_sha256(self, key: str, bucket: str | None = None) -> str:
        """SHA-256 of an object's bytes as stored (in this bucket unless another is named)."""
        return sha256_stream(self.hook.get_key(key, bucket or self.bucket).get()["Body"])

    def write_json(self, key: str, payload: dict[str, Any]) -> None:
        self.put_bytes(key, json.dumps(payload, indent=2, sort_keys=True).encode())

    def put_bytes(self, key: str, data: bytes) -> None:
        """One PutObject (the hook's load_* go through the transfer manager, slower per small object)."""
        self.hook.get_conn().put_object(Bucket=self.bucket, Key=key, Body=data)

    # --- inputs -----------------------------------------------------------------------------------
    def batch_ids(self) -> list[str]:
        """Folder names under incoming/: one LIST per 1,000 batches, nothing read per batch."""
        prefixes = self.hook.list_prefixes(self.bucket, prefix=self.layout.incoming, delimiter="/") or []
        return sorted(p[len(self.layout.incoming) :].rstrip("/") for p in prefixes)

    def batch_exists(self, batch_id: str) -> bool:
        return bool(self.hook.list_keys(self.bucket, prefix=self.layout.batch_prefix(batch_id), max_items=1))

    def is_ready(self, batch_id: str) -> bool:
        return self.hook.check_for_key(self.layout.ready_key(batch_id), self.bucket)

    def ready_times(self, batch_ids: list[str]) -> dict[str, datetime]:
        """When each batch's _READY marker was written (one HEAD per batch asked about, in parallel);
        batches without one are left out."""
        heads = pmap(lambda b: self.hook.head_object(self.layout.ready_key(b), self.bucket), batch_ids)
        return {b: h["LastModified"] for b, h in zip(batch_ids, heads, strict=True) if h is not None}

    def scan_many(self, batch_ids: list[str]) -> list[tuple[list[tuple[str, int]], list[str]]]:
        """scan_inputs of each batch, a few listings in flight."""
        return pmap(self.scan_inputs, batch_ids)

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
    def ledger_listing(self) -> dict[str, dict[str, Any]]:
        """{batch_id: {"size", "modified"}} from the ledger's key names: one LIST per 1,000 records, no
        record read. A batch is processed when its record exists."""
        out: dict[str, dict[str, Any]] = {}
        prefix = self.layout.ledger
        for obj in self.hook.iter_file_metadata(prefix, self.bucket):
            key = obj["Key"]
            if key.endswith(".json") and "/" not in key[len(prefix) :]:
                out[key[len(prefix) : -len(".json")]] = {
                    "size": int(obj["Size"]),
                    "modified": obj["LastModified"],
                    "etag": obj.get("ETag"),
                }
        return out

    def ledger_ids(self) -> set[str]:
        return set(self.ledger_listing())

    def read_records(self, batch_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The ledger records of these batches (one GET each, in parallel); a missing one is left out."""
        records = pmap(lambda b: self.read_json(self.layout.ledger_key(b)), batch_ids)
        return {b: r for b, r in zip(batch_ids, records, strict=True) if r is not None}

    def records_as_read(self, batch_ids: list[str], listing: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """{batch_id: {"etag", "record"}}: the records of these batches (one GET each) with the ETag the
        listing gave, for records_now to reuse later in the run."""
        records = self.read_records(batch_ids)
        return {b: {"etag": listing[b]["etag"], "record": r} for b, r in records.items()}

    def records_now(self, batch_ids: list[str], saved: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """The current records of these batches: a saved one (records_as_read) whose ETag the ledger's
        listing still shows, else read again; a deleted one is left out. One LIST per 1,000 records and a
        GET per changed record, instead of a GET per record: a refit over 5,000 batches read them all
        twice (plan and commit)."""
        if not batch_ids:
            return {}
        listing = self.ledger_listing()
        out, changed = {}, []
        for b in batch_ids:
            if b not in listing:
                continue
            kept = saved.get(b)
            if kept and kept["etag"] and kept["etag"] == listing[b]["etag"]:
                out[b] = kept["record"]
            else:
                changed.append(b)
        return out | self.read_records(changed)

    def check_state(self, refit: bool, redo: tuple[str, ...] = ()) -> None:
        """Refuse to run on damaged bookkeeping rather than silently redo everything. Raises CatalogError
        with the way to recover.

        Cheap whatever the history: the ledger's listing (one LIST per 1,000 records), a GET of the
        most recently written records, of the model pointer, and one LIST of the model's folder. A
        normal run reads no other record (it needs only their key names); a refit reads them all later
        and fails there on a damaged one, with the same message."""
        listing = self.ledger_listing()
        where = f"s3://{self.bucket}/"
        newest = sorted(listing, key=lambda b: listing[b]["modified"], reverse=True)[:RECENT_RECORDS_CHECKED]
        self.read_records(newest)  # raises on a record that is not valid JSON
        for batch_id, meta in listing.items():
            if meta["size"] < MIN_RECORD_BYTES:  # free: the listing gives each size
                key = self.layout.ledger_key(batch_id)
                raise CatalogError(
                    f"{where}{key} holds {meta['size']} byte(s): too small to be a ledger record, it was not "
                    f"written by this pipeline or was damaged. {self.way_out(key)}"
                )
        if not listing and not redo and self._any_completed_run():
            # `redo`: the batches a forced run names. Recomputing them on purpose is the way out offered
            # here, so it must get past this check (and it rebuilds their records).
            known = self.batch_ids()
            example = trigger_command({"force": True, "batch_ids": known[:3] or ["BATCH"]})
            raise CatalogError(
                f"the ledger {where}{self.layout.ledger} is empty but completed runs are recorded under "
                f"{where}{self.layout.runs}: the ledger was lost. "
                f"{restore_advice(self.bucket, self.layout.ledger)}; or, to recompute on purpose, trigger "
                f"with force=true and the batch_ids to redo, for example {example} ({len(known)} batch(es) "
                f"under {where}{self.layout.incoming})."
            )
        if not listing and redo:
            log.warning("the ledger is empty: recomputing %s on purpose (force=true)", redo[:20])
        if refit:
            return
        pointer = self.read_json(self.layout.pca_current)
        if listing and pointer is None:
            raise CatalogError(
                f"{where}{self.layout.pca_current} is missing but {len(listing)} batch(es) are in the "
                f"ledger, so new features would not match the old ones. "
                f"{restore_advice(self.bucket, self.layout.pca_current)}; or fit a new PCA model over every "
                f"processed batch: {trigger_command({'refit': True})}."
            )
        self.current_pca(pointer)  # raises when the pointer names a model that is not there

    def _any_completed_run(self) -> bool:
        """A run summary is written only after its ledger records: one proves the ledger existed. (A first
        run that crashed before its commit leaves outputs but no summary, and is simply redone.) Asked
        only when the ledger is empty."""
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
            self.hook.get_conn().delete_object(Bucket=self.bucket, Key=key)

    # --- PCA model pointer ------------------------------------------------------------------------
    _UNREAD: Any = object()

    def current_pca(self, pointer: Any = _UNREAD) -> dict[str, Any] | None:
        """The model pointer (one GET, unless the caller has it) and a check that the model it names is
        there (one LIST of the model's folder)."""
        if pointer is Catalog._UNREAD:
            pointer = self.read_json(self.layout.pca_current)
        if pointer is None:
            return None
        version = pointer.get("version")
        model = self.layout.pca_model_prefix(str(version))
        keys = self.hook.list_keys(self.bucket, prefix=model) if version else []
        intact = (
            bool(version)
            and f"{model}metadata.json" in keys
            and any(k.startswith(f"{model}spark_model/") for k in keys)
        )
        if not intact:
            raise CatalogError(
                f"{self.layout.uri(self.layout.pca_current)} names PCA version {version!r}, but the model "
                f"at {self.layout.uri(model)} is missing or incomplete. "
                f"{restore_advice(self.bucket, model)}; or fit a new model over every processed batch: "
                f"{trigger_command({'refit': True})}."
            )
        return pointer

    def pca_metadata(self, version: str) -> dict[str, Any]:
        meta = self.read_json(self.layout.pca_model_prefix(version) + "metadata.json")
        if meta is None:
            raise CatalogError(f"PCA model {version} has no metadata.json; the fit did not finish")
        return meta
