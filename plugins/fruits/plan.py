"""Turn the DAG run's params and the bucket's state into a run plan, failing fast on anything wrong.

The plan is a JSON-able dict, passed between tasks by XCom, so every task sees the same decisions.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from fruits.catalog import Catalog
from fruits.config import COMPUTE_BACKENDS, ENGINES, EU_REGIONS, PCA_MODES, Settings
from fruits.layout import BATCH_ID_RE, Layout
from fruits.onnx_model import ensure_onnx
from fruits.steps import PcaPlan, embed_args, pca_args

log = logging.getLogger(__name__)
EMBEDDING_DIM = 1280


class ParamError(ValueError):
    """A wrong trigger parameter; the message says what to change."""


@dataclass(frozen=True)
class RunParams:
    batch_ids: tuple[str, ...]
    force: bool
    compute: str
    engine: str
    pca_mode: str
    pca_k: int
    variance_target: float
    max_k: int
    refit: bool
    region: str
    allow_non_eu_region: bool
    weights_uri: str


def parse_params(raw: Mapping[str, Any], s: Settings) -> RunParams:
    def get(name: str, default: Any) -> Any:
        value = raw.get(name)
        return default if value is None or value == "" else value

    batch_ids = get("batch_ids", [])
    if isinstance(batch_ids, str):
        batch_ids = [b.strip() for b in batch_ids.split(",") if b.strip()]
    p = RunParams(
        batch_ids=tuple(batch_ids),
        force=bool(get("force", False)),
        compute=str(get("compute", s.compute)),
        engine=str(get("engine", s.engine)),
        pca_mode=str(get("pca_mode", "variance")),
        pca_k=int(get("pca_k", s.pca_k)),
        variance_target=float(get("variance_target", s.pca_variance_target)),
        max_k=int(get("max_k", s.pca_max_k)),
        refit=bool(get("refit", False)),
        region=str(get("region", s.region)),
        allow_non_eu_region=bool(get("allow_non_eu_region", False)),
        weights_uri=s.resolve(str(get("weights_uri", s.weights_uri))),
    )
    errors = []
    if p.compute not in COMPUTE_BACKENDS:
        errors.append(f"compute={p.compute!r} is unknown; use one of {', '.join(COMPUTE_BACKENDS)}")
    if p.engine not in ENGINES:
        errors.append(f"engine={p.engine!r} is unknown; use one of {', '.join(ENGINES)}")
    if p.pca_mode not in PCA_MODES:
        errors.append(
            f"pca_mode={p.pca_mode!r} is unknown; use 'variance' (k from variance_target) or 'fixed'"
        )
    if not 1 <= p.pca_k <= EMBEDDING_DIM:
        errors.append(
            f"pca_k={p.pca_k} is outside [1, {EMBEDDING_DIM}]: PCA cannot keep more components than the "
            f"{EMBEDDING_DIM}-d embedding has. Choose pca_k <= {EMBEDDING_DIM}, or pca_mode='variance'."
        )
    if not 0.0 < p.variance_target <= 1.0:
        errors.append(
            f"variance_target={p.variance_target} is outside (0, 1]: it is the share of variance to keep, "
            "for example 0.9."
        )
    if not 1 <= p.max_k <= EMBEDDING_DIM:
        errors.append(f"max_k={p.max_k} is outside [1, {EMBEDDING_DIM}]")
    bad_ids = [b for b in p.batch_ids if not BATCH_ID_RE.match(b)]
    if bad_ids:
        errors.append(
            f"batch_ids {bad_ids} are not valid batch folder names (letters, digits, '.', '_', '-')"
        )
    if p.region not in EU_REGIONS and not p.allow_non_eu_region:
        errors.append(
            f"region={p.region!r} is outside the EU. Fruits! keeps photos and embeddings in the EU (GDPR), so "
            f"nothing was created. Use an EU region ({', '.join(sorted(EU_REGIONS))}), or set "
            "allow_non_eu_region=true if the data protection officer approved this transfer."
        )
    if errors:
        raise ParamError("invalid parameters:\n- " + "\n- ".join(errors))
    return p


def preflight(catalog: Catalog, p: RunParams) -> None:
    """Check what the params point at, and the bookkeeping, before anything is claimed or started."""
    hook, bucket = catalog.hook, catalog.bucket
    if not hook.check_for_bucket(bucket):
        raise ParamError(
            f"bucket {bucket!r} does not exist or is not reachable with connection {hook.aws_conn_id!r}. "
            "Create it in an EU region, or set FRUITS_BUCKET to the right bucket."
        )
    if p.weights_uri != "imagenet":
        if not p.weights_uri.startswith("s3://"):
            raise ParamError(f"weights_uri={p.weights_uri!r} must be an s3:// URI (or 'imagenet')")
        wb, _, wkey = p.weights_uri[len("s3://") :].partition("/")
        if not hook.check_for_key(wkey, wb):
            raise ParamError(
                f"weights file {p.weights_uri} does not exist. Upload mobilenet_v2_1.0_224_no_top.h5 there "
                "(`make stage-weights` does it locally) or set weights_uri / FRUITS_WEIGHTS_URI."
            )
    if p.batch_ids:
        known = set(catalog.batch_ids())
        unknown = [b for b in p.batch_ids if b not in known]
        if unknown:
            raise ParamError(
                f"unknown batch id(s) {unknown}: no folder s3://{bucket}/incoming/<id>/. "
                f"Known batches: {sorted(known) or 'none'}."
            )
        not_ready = [b for b in p.batch_ids if not catalog.is_ready(b)]
        if not_ready:
            raise ParamError(
                f"batch(es) {not_ready} have no _READY marker: their upload may be incomplete. "
                "Put the marker once the upload is complete, then trigger again."
            )
    catalog.check_state(refit=p.refit)


def select_batches(catalog: Catalog, p: RunParams) -> list[str]:
    """Ready batches not yet in the ledger (or the explicit ones; with force=true even if processed)."""
    ledger = catalog.ledger()
    if p.batch_ids:
        done = [b for b in p.batch_ids if b in ledger and not p.force]
        if done:
            log.info("already processed, skipped (set force=true to redo): %s", done)
        return [b for b in p.batch_ids if b not in done]
    return [b for b in catalog.ready_batches() if b not in ledger]


def weights_sha256(catalog: Catalog, uri: str) -> str:
    if uri == "imagenet":
        return "keras-imagenet"
    bucket, _, key = uri[len("s3://") :].partition("/")
    return catalog.object_sha256(key, bucket)


def model_id_for(weights_sha: str) -> str:
    # Same formula as spark_jobs/fruits_jobs/engine.model_id; a test keeps the two in step.
    return f"mobilenet_v2_1.0_224-imagenet-notop-avgpool@{weights_sha[:12]}"


def build_plan(
    catalog: Catalog,
    p: RunParams,
    batches: list[str],
    run_id: str,
    s: Settings,
    threads: int | None = None,
) -> dict[str, Any]:
    layout: Layout = catalog.layout
    ledger = catalog.ledger()
    current = catalog.current_pca()
    fit = p.refit or current is None
    if fit:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        version = f"pca-{stamp}-{hashlib.sha256(run_id.encode()).hexdigest()[:6]}"
        everything = sorted(set(ledger) | set(batches))
        pca = PcaPlan(
            version,
            True,
            tuple(everything),
            tuple(everything),
            p.pca_mode,
            p.pca_k if p.pca_mode == "fixed" else None,
            p.variance_target,
            p.max_k,
        )
    else:
        assert current is not None
        pca = PcaPlan(
            str(current["version"]),
            False,
            (),
            tuple(sorted(batches)),
            p.pca_mode,
            None,
            p.variance_target,
            p.max_k,
        )
    run_prefix = layout.run_prefix(run_id)
    files, ignored, manifest = {}, {}, []
    for b in sorted(batches):
        inputs, hidden = catalog.scan_inputs(b)
        files[b] = len(inputs)
        manifest += [{"batch_id": b, "path": layout.uri(k), "size_bytes": n} for k, n in inputs]
        if hidden:
            ignored[b] = hidden
            log.warning(
                "batch %s: %d hidden-named file(s) ignored (rename to include them): %s",
                b,
                len(hidden),
                hidden[:20],
            )
    # The embed step processes exactly this list, one GET per file: every listed file is embedded or
    # rejected (a deleted one too), and a file uploaded after the plan is not half-counted.
    manifest_key = f"{run_prefix}inputs.jsonl"
    catalog.hook.load_string(
        "\n".join(json.dumps(m, ensure_ascii=False) for m in manifest),
        manifest_key,
        catalog.bucket,
        replace=True,
    )
    # The pca step's batch lists and the validation's expected input files travel as files, never as
    # step arguments (AWS caps a step's arguments at 10,240 characters).
    catalog.write_json(
        f"{run_prefix}pca_batches.json",
        {"fit": list(pca.fit_batches), "transform": list(pca.transform_batches)},
    )
    expected = {
        b: (ledger[b]["files"] if b in ledger and b not in batches else files[b])
        for b in pca.transform_batches
    }
    catalog.write_json(f"{run_prefix}expected.json", expected)
    sha = weights_sha256(catalog, p.weights_uri)
    # ONNX Runtime runs an export of these same weights, made once per weights version and checked.
    onnx_uri = ensure_onnx(catalog, p.weights_uri, sha, s)[0] if p.engine == "onnx" else None
    plan: dict[str, Any] = {
        "run_id": run_id,
        "run_prefix": run_prefix,
        "params": asdict(p),
        "batches": sorted(batches),
        "files": files,
        "ignored": ignored,
        # Batches whose outputs this run (re)writes and must validate (the new ones, plus all on a refit),
        # with their input files: a file, not an XCom.
        "expected_key": f"{run_prefix}expected.json",
        "weights_sha256": sha,
        "model_id": model_id_for(sha),
        "pca": asdict(pca),
        "embed_args": embed_args(
            layout, sorted(batches), p.weights_uri, p.engine, threads, onnx_uri, run_prefix, p.region
        ),
        "pca_args": pca_args(layout, pca, run_prefix),
        "started_at": datetime.now(UTC).isoformat(),
    }
    return plan
