"""The S3 data contract: every key the pipeline reads or writes is built here, and only here."""

from __future__ import annotations

import re
from dataclasses import dataclass

BATCH_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
READY_MARKER = "_READY"
# Files under runs/RUN_ID/ (README, "Data contract"), by who writes them:
RUN_FILES = (
    "candidates.json",  # find_new_batches: the batches taken (oldest _READY first) and those deferred
    "claimed.json",  # claim_batches: the batches this run holds a claim on
    "batches.json",  # plan: new batches, new ones already in the ledger (force), old ones re-transformed
    "inputs.jsonl",  # plan: the embed step's manifest, one line per input file
    "pca_batches.json",  # plan: the PCA step's {"fit": [...], "transform": [...]}
    "expected.json",  # plan: {batch_id: input files} for every batch the run (re)writes
    "ignored.json",  # plan: {batch_id: [hidden-named keys]}
    "records.json",  # plan: the ledger records the run rewrites, as read, with their ETags (commit)
    "embed.json",  # embed step: metrics
    "pca.json",  # pca step: metrics
    "embed_validation.json",  # embed step: its own checks
    "pca_validation.json",  # pca step: its own checks
    "sample_fit.json",  # embed step: the fit sample's candidate state (samples.py)
    "sample_report.json",  # pca step: the report sample's candidate state
    "validation.json",  # validate: the per-batch results
    "summary.json",  # summarize
    "report.json",  # report
)


def is_hidden(key_part: str) -> bool:
    """Hadoop (and so Spark) skips names starting with '_' or '.': we count inputs the same way."""
    return key_part.startswith(("_", "."))


@dataclass(frozen=True)
class Layout:
    bucket: str

    # inputs
    incoming: str = "incoming/"

    def batch_prefix(self, batch_id: str) -> str:
        return f"{self.incoming}{batch_id}/"

    def ready_key(self, batch_id: str) -> str:
        return f"{self.batch_prefix(batch_id)}{READY_MARKER}"

    # outputs (tables, partitioned by batch_id)
    embeddings: str = "embeddings/"
    rejects: str = "rejects/"
    features: str = "features/"

    def features_prefix(self, version: str) -> str:
        return f"{self.features}pca_version={version}/"

    def partition(self, table_prefix: str, batch_id: str) -> str:
        return f"{table_prefix}batch_id={batch_id}/"

    # models and reports
    pca_models: str = "models/pca/"
    pca_current: str = "models/pca/CURRENT.json"

    def pca_model_prefix(self, version: str) -> str:
        return f"{self.pca_models}{version}/"

    # bookkeeping
    ledger: str = "ledger/batches/"
    claims: str = "ledger/claims/"
    runs: str = "runs/"
    artifacts: str = "artifacts/"
    reports: str = "reports/"
    emr_logs: str = "emr-logs/"  # the EMR cluster's LogUri

    def staged_key(self, kind: str, digest: str, name: str) -> str:
        """What EMR steps read, content-addressed: new content is a new key, so a staged object is never
        overwritten and an unchanged one is never uploaded twice."""
        return f"{self.artifacts}{kind}/{digest[:12]}/{name}"

    def emr_step_log(self, cluster_id: str, step_id: str, name: str = "stderr.gz") -> str:
        """EMR's own layout under the LogUri: LOGURI/CLUSTER_ID/steps/STEP_ID/{stderr,stdout,controller}.gz"""
        return f"{self.emr_logs}{cluster_id}/steps/{step_id}/{name}"

    def onnx_model_key(self, weights_sha256: str) -> str:
        """The ONNX export of one weights version; its manifest (checksums, probe check) is KEY + '.json'."""
        return f"{self.artifacts}models/{weights_sha256[:12]}/mobilenet_v2_avgpool.onnx"

    def ledger_key(self, batch_id: str) -> str:
        return f"{self.ledger}{batch_id}.json"

    def claim_key(self, batch_id: str) -> str:
        return f"{self.claims}{batch_id}.json"

    def run_prefix(self, run_id: str) -> str:
        return f"{self.runs}{safe_run_id(run_id)}/"

    def run_file(self, run_id: str, name: str) -> str:
        """A file of one run (RUN_FILES): what names batches travels between tasks and steps this way,
        never in step arguments or XCom, so neither grows with the batch count."""
        assert name in RUN_FILES, name
        return f"{self.run_prefix(run_id)}{name}"

    def report_key(self, run_id: str) -> str:
        """One self-contained HTML page per run (plugins/fruits/report.py)."""
        return f"{self.reports}{safe_run_id(run_id)}.html"

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


def safe_run_id(run_id: str) -> str:
    """Airflow run ids hold ':' and '+'; keep S3 keys and Spark paths plain."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", run_id)
