"""Turn the DAG run's params and the bucket's state into a run plan, failing fast on anything wrong.

The plan is a small JSON-able dict, passed between tasks by XCom, so every task sees the same decisions.
Whatever names batches (the candidates, the claims, the manifest, the PCA step's batch lists, the expected
counts) goes to files under runs/RUN_ID/ (layout.RUN_FILES), so no XCom and no step argument grows with
the number of batches. A normal run reads nothing per past batch: the ledger's key names say what is
done, and `_READY` is asked (HEAD) only of batches not in the ledger.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from fruits.catalog import Catalog, CatalogError, pmap, trigger_command
from fruits.config import COMPUTE_BACKENDS, ENGINES, EU_REGIONS, PCA_MODES, Settings, instance_types
from fruits.layout import BATCH_ID_RE, Layout
from fruits.onnx_model import ensure_onnx
from fruits.steps import PcaPlan, embed_args, pca_args

log = logging.getLogger(__name__)
EMBEDDING_DIM = 1280


class ParamError(ValueError):
    """A wrong trigger parameter; the message says what to change."""


class CostLimitExceeded(RuntimeError):
    """The run's cluster would cost more than max_cost_usd; raised before anything is created."""


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
    max_images_per_run: int
    max_cost_usd: float


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
        max_images_per_run=int(get("max_images_per_run", s.max_images_per_run)),
        max_cost_usd=float(get("max_cost_usd", s.max_cost_usd)),
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
    if p.max_images_per_run < 0:
        errors.append(f"max_images_per_run={p.max_images_per_run} is negative; use 0 for no cap")
    if p.max_cost_usd < 0:
        errors.append(f"max_cost_usd={p.max_cost_usd} is negative; use 0 for no limit")
    bad_ids = [b for b in p.batch_ids if not BATCH_ID_RE.match(b)]
    if bad_ids:
        errors.append(
            f"batch_ids {bad_ids} are not valid batch folder names (letters, digits, '.', '_', '-')"
        )
    if p.compute == "emr":
        errors += s.emr_config_errors()
    if p.region not in EU_REGIONS and not p.allow_non_eu_region:
        errors.append(
            f"region={p.region!r} is outside the EU. Fruits! keeps photos and embeddings in the EU (GDPR), so "
            f"nothing was created. Use an EU region ({', '.join(sorted(EU_REGIONS))}), or set "
            "allow_non_eu_region=true if the data protection officer approved this transfer."
        )
    if errors:
        raise ParamError("invalid parameters:\n- " + "\n- ".join(errors))
    return p


def _few(ids: list[str], n: int = 20) -> str:
    """A batch list for a log line or a message: whole when short, else the first n and the count."""
    return str(ids) if len(ids) <= n else f"{ids[:n]} ... ({len(ids)} in all)"


def preflight(catalog: Catalog, p: RunParams) -> None:
    """Check what the params point at, and the bookkeeping, before anything is claimed or started.
    Cheap whatever the history: a HEAD per named batch and Catalog.check_state."""
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
                f"weights file {p.weights_uri} does not exist. Upload mobilenet_v2_1.0_224_no_top.h5 "
                f"(MobileNetV2 ImageNet, no top) there: on AWS `aws s3 cp mobilenet_v2_1.0_224_no_top.h5 "
                f"{p.weights_uri}`; on the local stack `make stage-weights`, which uploads ../shared's copy "
                "to FRUITS_WEIGHTS_URI through the aws_default connection. Or point weights_uri / "
                "FRUITS_WEIGHTS_URI at the file."
            )
    if p.batch_ids:
        ready = catalog.ready_times(list(p.batch_ids))
        missing = [b for b in p.batch_ids if b not in ready]
        unknown = [b for b in missing if not catalog.batch_exists(b)]
        if unknown:
            known = catalog.batch_ids()
            raise ParamError(
                f"unknown batch id(s) {unknown}: no folder s3://{bucket}/incoming/<id>/. "
                f"Known batches: {_few(known) if known else 'none'}."
            )
        not_ready = [b for b in missing if b not in unknown]
        if not_ready:
            marker = catalog.layout.ready_key(not_ready[0])
            raise ParamError(
                f"batch(es) {not_ready} have no _READY marker: their upload may be incomplete. Once it "
                f"is complete, put the marker (an empty object): `aws s3api put-object --bucket {bucket} "
                f"--key {marker}`"
                + (" (and the same for each of the others)" if len(not_ready) > 1 else "")
                + f", then trigger again: {trigger_command({'batch_ids': list(p.batch_ids)})}."
            )
    catalog.check_state(refit=p.refit, redo=p.batch_ids if p.force else ())


def find_batches(catalog: Catalog, p: RunParams, run_id: str) -> dict[str, Any] | None:
    """The batches this run takes: ready batches not in the ledger (or the named ones; with force=true
    even if processed), oldest `_READY` first, up to max_images_per_run photos (at least one batch).

    Cost: the listings of incoming/ and of the ledger's keys (one LIST per 1,000 batches each), a HEAD
    of `_READY` per batch not in the ledger, a listing of each such ready batch (to count its photos).
    Writes runs/RUN/candidates.json; returns a small summary for XCom, or None when nothing is new."""
    layout = catalog.layout
    ledger = catalog.ledger_ids()
    if p.batch_ids:
        done = [b for b in p.batch_ids if b in ledger and not p.force]
        if done:
            log.info("already processed, skipped (set force=true to redo): %s", _few(done))
        candidates = [b for b in dict.fromkeys(p.batch_ids) if b not in done]
    else:
        candidates = [b for b in catalog.batch_ids() if b not in ledger]
    ready = catalog.ready_times(candidates)
    if not ready and not p.refit:
        log.info("batches to process: none")
        return None
    if not ready:
        log.info("batches to process: none; refit=true: the run refits the PCA over the processed batches")
    order = sorted(ready, key=lambda b: (ready[b], b))
    files = dict(zip(order, (len(inputs) for inputs, _ in catalog.scan_many(order)), strict=True))
    cap = p.max_images_per_run
    take: list[str] = []
    photos = 0
    for b in order:
        if take and cap and photos + files[b] > cap:
            break
        take.append(b)
        photos += files[b]
    deferred = order[len(take) :]
    deferred_photos = sum(files[b] for b in deferred)
    log.info("batches to process: %s", _few(sorted(take)))
    log.info("%d photo(s) in %d batch(es), oldest _READY first", photos, len(take))
    if deferred:
        log.warning(
            "backlog: max_images_per_run=%d, so %d batch(es) with %d photo(s) wait for the next run "
            "(oldest first): %s",
            cap,
            len(deferred),
            deferred_photos,
            _few(deferred),
        )
    key = layout.run_file(run_id, "candidates.json")

    def row(b: str) -> dict[str, Any]:
        return {"batch_id": b, "ready_at": ready[b].isoformat(), "files": files[b]}

    catalog.write_run_file(
        key,
        {
            "max_images_per_run": cap,
            "take": [row(b) for b in take],
            "deferred": [row(b) for b in deferred],
        },
    )
    return {
        "key": key,
        "batches": len(take),
        "photos": photos,
        "deferred": {
            "batches": len(deferred),
            "photos": deferred_photos,
            "max_images_per_run": cap,
            "oldest_ready_at": ready[deferred[0]].isoformat() if deferred else None,
        },
    }


def claim_batches(catalog: Catalog, found: dict[str, Any], run_id: str, lease: timedelta) -> dict[str, Any]:
    """Lease each batch found to this run (a conditional write per batch); runs/RUN/claimed.json lists
    those this run holds, for the plan and for release_claims."""
    ids = [c["batch_id"] for c in catalog.read_run_file(found["key"])["take"]]
    won = pmap(lambda b: catalog.claim(b, run_id, lease), ids)
    claimed = [b for b, ok in zip(ids, won, strict=True) if ok]
    key = catalog.layout.run_file(run_id, "claimed.json")
    catalog.write_run_file(key, claimed)
    if len(claimed) < len(ids):
        log.info("%d batch(es) are claimed by another run and left to it", len(ids) - len(claimed))
    return {"key": key, "batches": len(claimed), "others": len(ids) - len(claimed)}


def claimed_batches(catalog: Catalog, claimed: dict[str, Any]) -> list[str]:
    return list(catalog.read_run_file(claimed["key"]))


def release_claims(catalog: Catalog, claimed: dict[str, Any], run_id: str) -> None:
    pmap(lambda b: catalog.release(b, run_id), claimed_batches(catalog, claimed))


def check_same_weights(
    model_id: str, p: RunParams, current: dict[str, Any] | None, old_records: dict[str, dict[str, Any]]
) -> None:
    """Vectors of different weights never share a PCA: a transform with the current model needs the
    weights its fit saw, a refit needs every batch it re-transforms to have been embedded with these
    weights. Checked before any run file is written or step started (the claims are handed back)."""
    if current is not None and current.get("model_id") not in (None, model_id):
        raise ParamError(
            f"weights_uri={p.weights_uri} gives model_id {model_id!r}, but the current PCA model "
            f"{current.get('version')!r} was fitted on embeddings of {current['model_id']!r}: vectors of "
            "different weights never share a PCA. Set weights_uri (or FRUITS_WEIGHTS_URI) back to the "
            f"weights file whose SHA-256 starts with {current['model_id'].rsplit('@', 1)[-1]!r}."
        )
    other = sorted(b for b, r in old_records.items() if r.get("model_id") not in (None, model_id))
    if other:
        theirs = sorted({str(old_records[b]["model_id"]) for b in other})
        raise ParamError(
            f"weights_uri={p.weights_uri} gives model_id {model_id!r}, but {len(other)} processed "
            f"batch(es) ({_few(other)}) were embedded with {theirs}: a refit over them would mix vectors "
            "of different weights in one PCA. Set weights_uri (or FRUITS_WEIGHTS_URI) back to the weights "
            f"file whose SHA-256 starts with {theirs[0].rsplit('@', 1)[-1]!r}."
        )


def weights_sha256(catalog: Catalog, uri: str) -> str:
    if uri == "imagenet":
        return "keras-imagenet"
    bucket, _, key = uri[len("s3://") :].partition("/")
    return catalog.object_sha256(key, bucket)


def model_id_for(weights_sha: str) -> str:
    # Same formula as spark_jobs/fruits_jobs/engine.model_id; a test keeps the two in step.
    return f"mobilenet_v2_1.0_224-imagenet-notop-avgpool@{weights_sha[:12]}"


def size_cluster(photos: int, transform_rows: int, fit: bool, s: Settings) -> dict[str, Any]:
    """Core nodes for this run and what the cluster is expected to take and cost.

    nodes = photos / (photos/s per vCPU x vCPUs per node x FRUITS_EMR_TARGET_EMBED_S), rounded up, within
    [FRUITS_EMR_CORE_COUNT, FRUITS_EMR_MAX_CORE_NODES]. Time = startup (instances + bootstrap) + embed
    (photos at the measured rate) + PCA (a fit's fixed cost + the rows transformed). Cost = that time x
    (primary + nodes x core) x (EC2 + EMR price per hour) from config.INSTANCE_TYPES."""
    table = instance_types()
    unknown = [t for t in (s.emr_core_type, s.emr_primary_type) if t not in table]
    if unknown:
        raise ParamError(f"instance type(s) {unknown} have no entry in config.INSTANCE_TYPES; add them there")
    core, primary = table[s.emr_core_type], table[s.emr_primary_type]
    per_node = s.emr_photos_per_s_per_vcpu * core.vcpu
    wanted = max(1, math.ceil(photos / (per_node * s.emr_target_embed_s)))
    low = max(1, min(s.emr_core_count, s.emr_max_core_nodes))
    nodes = min(max(wanted, low), s.emr_max_core_nodes)
    embed_s = photos / (per_node * nodes)
    pca_s = (s.emr_pca_fit_s if fit else 0) + transform_rows / (
        s.emr_pca_rows_per_s_per_vcpu * core.vcpu * nodes
    )
    seconds = s.emr_startup_s + embed_s + pca_s
    usd_per_hour = (primary.ec2_usd_per_hour + primary.emr_usd_per_hour) + nodes * (
        core.ec2_usd_per_hour + core.emr_usd_per_hour
    )
    return {
        "photos": photos,
        "transform_rows": transform_rows,
        "core_type": s.emr_core_type,
        "primary_type": s.emr_primary_type,
        "core_nodes": nodes,
        "core_nodes_wanted": wanted,
        "managed_scaling": s.emr_managed_scaling,
        "photos_per_s_per_vcpu": s.emr_photos_per_s_per_vcpu,
        "expected_s": {
            "startup": s.emr_startup_s,
            "embed": round(embed_s, 1),
            "pca": round(pca_s, 1),
            "total": round(seconds, 1),
        },
        "usd_per_hour": round(usd_per_hour, 4),
        "expected_cost_usd": round(seconds / 3600 * usd_per_hour, 2),
    }


def check_cost(
    sizing: dict[str, Any],
    p: RunParams,
    s: Settings,
    fit: bool,
    old_rows: int,
    oldest_first: Callable[[], list[int]],
) -> None:
    """Refuse a cluster estimated above max_cost_usd, saying which value of which param gets this run
    under it. `oldest_first()`: the photos of each batch, in the order find_batches takes them (only
    read when the limit is exceeded); a run takes at least one whole batch, so a lower
    max_images_per_run helps only down to the oldest batch."""
    cost, limit = sizing["expected_cost_usd"], p.max_cost_usd
    if not limit or cost <= limit:
        return

    def cost_of(photos: int) -> float:
        return float(size_cluster(photos, photos + old_rows, fit, s)["expected_cost_usd"])

    taken = batches = 0
    per_batch = oldest_first()
    for n in per_batch:
        if cost_of(taken + n) > limit:
            break
        taken, batches = taken + n, batches + 1
    if batches:
        fewer = (
            f"or set max_images_per_run={taken} (param, or FRUITS_MAX_IMAGES_PER_RUN): the run then takes "
            f"its oldest {batches} batch(es), {taken} photos, estimated at {cost_of(taken):.2f} USD, and the "
            "rest waits for the next run"
        )
    else:
        first = per_batch[0] if per_batch else 0
        fewer = (
            "a lower max_images_per_run cannot help: a run takes at least one whole batch, and the oldest "
            f"alone ({first} photos) is estimated at {cost_of(first):.2f} USD (a cluster's startup is most "
            "of it)"
        )
    raise CostLimitExceeded(
        f"the EMR cluster for this run is estimated at {cost:.2f} USD, above max_cost_usd={limit:.2f}: "
        f"{sizing['core_nodes']} x {sizing['core_type']} core + 1 x {sizing['primary_type']} primary "
        f"at {sizing['usd_per_hour']:.3f} USD/h for about {sizing['expected_s']['total'] / 3600:.2f} h "
        f"({sizing['photos']} photos to embed, {sizing['transform_rows']} rows to transform). No cluster "
        f"was created and the batches' claims are released. Set max_cost_usd={cost:.2f} or more (param, "
        f"or FRUITS_MAX_COST_USD) to run them all, {fewer}."
    )


def build_plan(
    catalog: Catalog,
    p: RunParams,
    batches: list[str],
    run_id: str,
    s: Settings,
    threads: int | None = None,
    found: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's decisions (small, for XCom) and its run files (for the steps and the later tasks).

    Reads per past batch only on a fit over the history (a refit, or a first model): every ledger record,
    for the expected counts and the rows to transform, none of which goes into the returned plan."""
    layout: Layout = catalog.layout
    listing = catalog.ledger_listing()
    # A refit needs no current model: it is the way out when that model is lost or damaged.
    current = None if p.refit else catalog.current_pca()
    fit = p.refit or current is None
    new = sorted(batches)
    old = sorted(set(listing) - set(new)) if fit else []
    as_read = catalog.records_as_read(old, listing)
    records = {b: r["record"] for b, r in as_read.items()}
    damaged = [b for b in old if b in records and not isinstance(records[b].get("files"), int)]
    if damaged:
        raise CatalogError(
            f"ledger record(s) {_few(damaged)} have no file count: not written by this pipeline, or "
            f"damaged. {catalog.way_out(layout.ledger_key(damaged[0]))}"
            + (" The same for each of the others." if len(damaged) > 1 else "")
        )
    old = [b for b in old if b in records]  # a record deleted since the listing: that batch is not done
    # A forced re-run's record: a damaged one fails here; commit keeps the rest of it.
    as_read |= catalog.records_as_read([b for b in new if b in listing], listing)
    sha = weights_sha256(catalog, p.weights_uri)
    check_same_weights(model_id_for(sha), p, current, {b: records[b] for b in old})
    if fit:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        version = f"pca-{stamp}-{hashlib.sha256(run_id.encode()).hexdigest()[:6]}"
    else:
        assert current is not None
        version = str(current["version"])
    transform = sorted(set(new) | set(old))
    pca = PcaPlan(
        version,
        fit,
        p.pca_mode,
        p.pca_k if p.pca_mode == "fixed" else None,
        p.variance_target,
        p.max_k,
        len(transform) if fit else 0,
        len(transform),
    )

    files, ignored, manifest = {}, {}, []
    for b, (inputs, hidden) in zip(new, catalog.scan_many(new), strict=True):
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
    photos = sum(files.values())
    old_rows = sum(int(records[b].get("embedded", records[b]["files"]) or 0) for b in old)
    sizing = None
    if p.compute == "emr":
        sizing = size_cluster(photos, photos + old_rows, fit, s)
        log.info(
            "EMR sizing: %d photo(s) to embed, %d row(s) to transform -> %d x %s core node(s) + 1 primary; "
            "expected %.1f min (startup %.0f s, embed %.0f s, pca %.0f s), estimated %.2f USD "
            "(max_cost_usd %s)",
            photos,
            photos + old_rows,
            sizing["core_nodes"],
            sizing["core_type"],
            sizing["expected_s"]["total"] / 60,
            sizing["expected_s"]["startup"],
            sizing["expected_s"]["embed"],
            sizing["expected_s"]["pca"],
            sizing["expected_cost_usd"],
            p.max_cost_usd or "none",
        )

        def oldest_first() -> list[int]:  # find_batches' order, from its candidates file
            order = [c["batch_id"] for c in catalog.read_run_file(found["key"])["take"]] if found else new
            return [files[b] for b in order if b in files]

        check_cost(sizing, p, s, fit, old_rows, oldest_first)  # before any file, export or cluster
    else:
        log.info("local Spark: %d photo(s) to embed, %d row(s) to transform", photos, photos + old_rows)

    keys = {name: layout.run_file(run_id, name) for name in ("inputs.jsonl", "pca_batches.json")}
    keys |= {
        name: layout.run_file(run_id, name)
        for name in ("expected.json", "batches.json", "ignored.json", "records.json")
    }
    # The embed step processes exactly this list, one GET per file: every listed file is embedded or
    # rejected (a deleted one too), and a file uploaded after the plan is not half-counted.
    catalog.hook.load_string(
        "\n".join(json.dumps(m, ensure_ascii=False) for m in manifest),
        keys["inputs.jsonl"],
        catalog.bucket,
        replace=True,
    )
    catalog.write_run_file(
        keys["pca_batches.json"], {"fit": transform if fit else [], "transform": transform}
    )
    # Every batch whose outputs this run (re)writes and validates: the new ones, plus all on a refit.
    catalog.write_run_file(keys["expected.json"], {**{b: records[b]["files"] for b in old}, **files})
    catalog.write_run_file(
        keys["batches.json"],
        {"new": new, "recorded": [b for b in new if b in listing], "refit": old},
    )
    catalog.write_run_file(keys["ignored.json"], ignored)
    catalog.write_run_file(keys["records.json"], as_read)

    # ONNX Runtime runs an export of these same weights, made once per weights version and checked.
    onnx_uri = ensure_onnx(catalog, p.weights_uri, sha, s)[0] if p.engine == "onnx" else None
    params = {k: v for k, v in asdict(p).items() if k != "batch_ids"}  # the ids are in the run files
    return {
        "run_id": run_id,
        "run_prefix": layout.run_prefix(run_id),
        "params": params,
        "new_batches": len(new),
        "files": photos,
        "keys": keys,
        "expected_key": keys["expected.json"],
        "weights_sha256": sha,
        "model_id": model_id_for(sha),
        "pca": asdict(pca),
        "sizing": sizing,
        "deferred": (found or {}).get("deferred"),
        "embed_args": embed_args(layout, p.weights_uri, p.engine, threads, onnx_uri, run_id, p.region),
        "pca_args": pca_args(layout, pca, run_id),
        "started_at": datetime.now(UTC).isoformat(),
    }


def run_batches(catalog: Catalog, plan: dict[str, Any]) -> dict[str, list[str]]:
    """runs/RUN/batches.json: {"new": [...], "recorded": [...], "refit": [...]}."""
    return catalog.read_run_file(plan["keys"]["batches.json"])
