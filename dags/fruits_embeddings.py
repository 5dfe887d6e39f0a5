"""
### Fruits! image embeddings

New photo batches in S3 -> MobileNetV2 embeddings (1280-d) -> StandardScaler + PCA -> validated Parquet.

1. **plan**: check the params, find ready batches not in the ledger (oldest first, up to
   `max_images_per_run` photos), claim them, decide the PCA model and the cluster size (refused beyond
   `max_cost_usd`). Batch lists travel in files under `runs/RUN_ID/`, never in XCom or step arguments.
2. **compute**: the `embed` then `pca` Spark steps, on a local Spark or on a transient EMR cluster
   (`emr` group: created for this run, every step watched, terminated by a teardown whatever happened).
3. **validate** the outputs against the inputs, **commit** the ledger, **summarize**, **report** (HTML).

The data contract and how to run it are in the README. Helpers live in `plugins/fruits/`.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from airflow.providers.amazon.aws.operators.emr import (
    EmrAddStepsOperator,
    EmrCreateJobFlowOperator,
    EmrTerminateJobFlowOperator,
)
from airflow.sdk import Param, TaskGroup, TriggerRule, dag, get_current_context, setup, task, teardown
from airflow.sdk.exceptions import AirflowSkipException
from fruits import catalog as cat
from fruits import commit as commit_mod
from fruits import emr
from fruits import plan as planning
from fruits import report as reporting
from fruits import validate as validation
from fruits.config import COMPUTE_BACKENDS, ENGINES, PCA_MODES, settings
from fruits.layout import Layout
from fruits.local_compute import run_local_step

log = logging.getLogger("fruits.dag")
S = settings()


def _catalog() -> cat.Catalog:
    s = settings()
    return cat.Catalog(S3Hook(aws_conn_id=s.aws_conn_id), Layout(s.bucket))


PARAMS = {
    "batch_ids": Param(
        [],
        type=["array", "null"],  # null: optional in the trigger form
        items={"type": "string"},
        description="Batches to process (folder names under incoming/). Empty: every ready, "
        "unprocessed batch.",
    ),
    "force": Param(
        False, type="boolean", description="Reprocess the given batch_ids even if the ledger has them."
    ),
    "compute": Param(
        S.compute,
        enum=list(COMPUTE_BACKENDS),
        description="Where Spark runs: 'local' (this machine) or 'emr' (a transient cluster).",
    ),
    "engine": Param(S.engine, enum=list(ENGINES), description="Inference engine for MobileNetV2."),
    "pca_mode": Param(
        "variance",
        enum=list(PCA_MODES),
        description="'variance': smallest k reaching variance_target (capped by max_k); "
        "'fixed': k = pca_k. Used when a model is fitted.",
    ),
    "pca_k": Param(S.pca_k, type="integer", minimum=1, maximum=1280, description="k when pca_mode='fixed'."),
    "variance_target": Param(
        S.pca_variance_target,
        type="number",
        exclusiveMinimum=0,
        maximum=1,
        description="Share of variance to keep when pca_mode='variance'.",
    ),
    "max_k": Param(
        S.pca_max_k, type="integer", minimum=1, maximum=1280, description="Upper bound on k in variance mode."
    ),
    "refit": Param(
        False,
        type="boolean",
        description="Fit a new PCA model over every processed batch and re-transform them all.",
    ),
    "region": Param(S.region, type="string", description="AWS region of the bucket and cluster (EU only)."),
    "allow_non_eu_region": Param(
        False, type="boolean", description="Override the GDPR guard. Only with a documented approval."
    ),
    "weights_uri": Param(
        S.weights_uri,
        type="string",
        description="MobileNetV2 ImageNet no-top weights (.h5) in S3, or 'imagenet'.",
    ),
    "max_images_per_run": Param(
        S.max_images_per_run,
        type="integer",
        minimum=0,
        description="Backlogs: take the oldest ready batches up to this many photos (at least one batch); "
        "the rest waits for the next run. 0: no cap.",
    ),
    "max_cost_usd": Param(
        S.max_cost_usd,
        type="number",
        minimum=0,
        description="compute=emr: refuse to start a cluster estimated to cost more (USD). 0: no limit.",
    ),
}


@dag(
    dag_id="fruits_embeddings",
    schedule="@daily",
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    params=PARAMS,
    doc_md=__doc__,
    tags=["fruits", "spark", "embeddings"],
    default_args={"retries": 0},
)
def fruits_embeddings():
    @task
    def check_params() -> dict[str, Any]:
        """Fail fast, before anything is created: every message says what to change. Cheap whatever the
        history (plan.preflight). Each task reads the params from its context: none travel by XCom."""
        ctx = get_current_context()
        params = planning.parse_params(ctx["params"], settings())
        planning.preflight(_catalog(), params)
        return {"started": datetime.now(UTC).isoformat()}

    @task.short_circuit
    def find_new_batches(checked: dict[str, Any]) -> dict[str, Any] | None:
        """Stop here, with nothing created, when there is nothing new. A backlog beyond
        max_images_per_run is taken oldest first; the rest waits (logged, and in the summary)."""
        ctx = get_current_context()
        params = planning.parse_params(ctx["params"], settings())
        return planning.find_batches(_catalog(), params, ctx["run_id"])

    @setup
    def claim_batches(found: dict[str, Any]) -> dict[str, Any]:
        """Lease each batch to this run, so two runs never process the same batch."""
        ctx = get_current_context()
        lease = timedelta(seconds=settings().claim_lease_s)
        claimed = planning.claim_batches(_catalog(), found, ctx["run_id"], lease)
        if found["batches"] and not claimed["batches"]:
            raise AirflowSkipException(f"every batch is claimed by another run ({found['batches']})")
        return claimed

    @task
    def plan_run(checked: dict[str, Any], found: dict[str, Any], claimed: dict[str, Any]) -> dict[str, Any]:
        """Decide the model and the cluster size, write the run files; a cluster beyond max_cost_usd is
        refused here, before anything is created."""
        ctx = get_current_context()
        params = planning.parse_params(ctx["params"], settings())
        catalog = _catalog()
        batches = planning.claimed_batches(catalog, claimed)
        plan = planning.build_plan(catalog, params, batches, ctx["run_id"], settings(), found=found)
        plan["started"] = checked["started"]
        log.info(
            "plan: %s",
            json.dumps({k: plan[k] for k in ("new_batches", "files", "model_id", "pca", "keys", "sizing")}),
        )
        return plan

    @task.branch
    def choose_compute(plan: dict[str, Any]) -> str:
        """compute=local: spark-submit on this worker; compute=emr: a transient cluster for this run."""
        return "emr.stage_artifacts" if plan["params"]["compute"] == "emr" else "embed"

    @task
    def embed(plan: dict[str, Any]) -> None:
        if not plan["new_batches"]:  # refit=true with nothing new: the PCA step is the whole run
            log.info("nothing new to embed")
            return
        run_local_step("embed", plan["embed_args"], settings(), log)

    @task
    def pca(plan: dict[str, Any]) -> None:
        run_local_step("pca", plan["pca_args"], settings(), log)

    @task(multiple_outputs=True)
    def stage_artifacts(plan: dict[str, Any]) -> dict[str, Any]:
        """Job package, bootstrap action and weights to S3 (content-addressed: only what changed is
        uploaded), then the cluster request and the two steps that name them."""
        return emr.prepare_cluster(_catalog(), plan, settings())

    # One of the two compute paths is skipped; a failed step on the other still fails the run here.
    @task(trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
    def validate(plan: dict[str, Any]) -> dict[str, Any]:
        """The steps' own checks and the Parquet footers, never the vectors; per-batch results go to
        runs/RUN/validation.json, XCom gets the totals and its key."""
        return validation.validate_run(_catalog(), plan)

    @task
    def commit(plan: dict[str, Any], validated: dict[str, Any]) -> dict[str, Any]:
        """Only validated batches reach the ledger."""
        return commit_mod.commit(_catalog(), plan, validated)

    # After the compute has ended (on EMR: after terminate_cluster, skipped with compute=local), so the cost
    # block is priced from the cluster's final timeline.
    @task(trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
    def summarize(
        plan: dict[str, Any], validated: dict[str, Any], committed: dict[str, Any]
    ) -> dict[str, Any]:
        catalog = _catalog()
        seconds = (datetime.now(UTC) - datetime.fromisoformat(plan["started"])).total_seconds()
        summary = commit_mod.summarize(plan, validated, committed, seconds)
        cluster_id = get_current_context()["ti"].xcom_pull(task_ids="emr.create_cluster")
        if cluster_id:  # compute=emr: instance-hours x price, from the ended cluster's timeline
            summary["emr"] = emr.cluster_cost(cluster_id, plan["params"]["region"], settings())
        key = catalog.layout.run_file(plan["run_id"], "summary.json")
        catalog.write_json(key, {**summary, "run_id": plan["run_id"]})
        log.info("summary (s3://%s/%s): %s", catalog.bucket, key, json.dumps(summary))
        return summary

    @task
    def report(plan: dict[str, Any], summary: dict[str, Any]) -> str:
        """A page to look at: counts, rejects, timings, PCA variance and map, linear-probe accuracy."""
        catalog = _catalog()
        batches = planning.run_batches(catalog, plan)["new"]
        uri = reporting.write_report(catalog, {**plan, "batches": batches}, summary, settings())
        log.info("run report: %s", uri)
        return uri

    @teardown
    def release_claims(claimed: dict[str, Any]) -> None:
        """Runs whatever happened: a failed run hands its batches back at once."""
        planning.release_claims(_catalog(), claimed, get_current_context()["run_id"])

    checked = check_params()
    found = find_new_batches(checked)
    claimed = claim_batches(found)
    plan = plan_run(checked, found, claimed)
    route = choose_compute(plan)

    # compute=local
    embedded = embed(plan)
    reduced = pca(plan)
    route >> embedded >> reduced

    # compute=emr: create -> add both steps -> watch every step -> terminate (a teardown: it runs after a
    # success, a failure, or a run marked failed by hand)
    aws = {"aws_conn_id": S.aws_conn_id, "region_name": "{{ params.region }}"}
    with TaskGroup("emr", tooltip="a transient EMR cluster for this run") as on_emr:
        prepared = stage_artifacts(plan)
        create_cluster = EmrCreateJobFlowOperator(
            task_id="create_cluster", emr_conn_id=None, job_flow_overrides=prepared["job_flow"], **aws
        )
        add_steps = EmrAddStepsOperator(
            task_id="add_steps", job_flow_id=create_cluster.output, steps=prepared["steps"], **aws
        )
        watched = emr.StepWatcher.partial(
            task_id="watch_steps", job_flow_id=create_cluster.output, **aws, **emr.sensor_kwargs(S)
        ).expand(step_id=add_steps.output)
        terminate_cluster = EmrTerminateJobFlowOperator(
            task_id="terminate_cluster", job_flow_id=create_cluster.output, **aws
        )
        add_steps >> watched >> terminate_cluster.as_teardown(setups=create_cluster)
    route >> on_emr

    validated = validate(plan)
    committed = commit(plan, validated)
    summary = summarize(plan, validated, committed)
    [reduced, watched] >> validated
    terminate_cluster >> summary
    summary >> release_claims(claimed)
    report(plan, summary)


fruits_embeddings()
