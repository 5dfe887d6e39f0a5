"""The EMR backend: what a transient cluster needs, in one place.

- `stage_artifacts`: puts what the steps read into S3, content-addressed, so an unchanged file is never
  uploaded twice and a running cluster never sees a file change under it.
- `job_flow_request`: the RunJobFlow request (release, instances, bootstrap action, LogUri, backstops, tags).
- `emr_steps`: the embed and PCA steps, built by the same spark-submit argv builder as the local backend.
- `StepWatcher`: the provider's step sensor, which also explains a failed step in the task log.
- `cost_estimate`: instance-hours x on-demand price, for the run's summary.

The DAG wires these to the amazon provider's operators; nothing here creates or ends a cluster.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import re
import time
from typing import Any

from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from airflow.providers.amazon.aws.sensors.emr import EmrStepSensor
from airflow.sdk.exceptions import AirflowException

from fruits.catalog import Catalog
from fruits.config import REPO_ROOT, Settings, instance_types, settings
from fruits.layout import Layout, safe_run_id
from fruits.spark_submit import JOB_PACKAGE, JOB_SCRIPTS, JobBundle, package_jobs, spark_submit_argv
from fruits.tuning import emr_tuning

log = logging.getLogger(__name__)

BOOTSTRAP_DIR = REPO_ROOT / "bootstrap"
BOOTSTRAP_SCRIPT = "install_python_deps.sh"
# The full pinned set of the "emr" dependency group, with hashes, exported from uv.lock by
# `make emr-requirements` (tests/test_bootstrap.py checks it is current).
BOOTSTRAP_REQUIREMENTS = "requirements-emr.txt"
STDERR_TAIL_LINES = 40
# Left out of a failed step's tail: Spark's INFO lines ("26/05/01 12:00:00 INFO SparkContext: ...") and
# JVM stack frames ("\tat org.apache.spark..."), so the 40 lines hold the Python traceback and WARN/ERROR.
_NOISE = re.compile(r"^(\d\d/\d\d/\d\d \d\d:\d\d:\d\d INFO |\s+at [\w$.<>/]+\(|\s+\.\.\. \d+ more)")

# Why CANCEL_AND_WAIT for both steps: the PCA step must never run on the output of a failed embed step
# (CONTINUE would let it), and the cluster's end has exactly one owner, the DAG's teardown, with EMR's own
# backstops behind it (KeepJobFlowAliveWhenNoSteps=false ends the cluster once no step is left; the idle
# timeout ends it if Airflow is gone). TERMINATE_CLUSTER would end the cluster from inside EMR before the
# DAG has read the failed step's state and logs, and report TERMINATED_WITH_ERRORS for a data error.
ACTION_ON_FAILURE = "CANCEL_AND_WAIT"
STEPS = ("embed", "pca")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _put_once(hook: S3Hook, bucket: str, key: str, data: bytes, report: dict[str, list[str]]) -> str:
    """Upload unless the content-addressed key is there already (same key = same bytes)."""
    if hook.check_for_key(key, bucket):
        report["unchanged"].append(key)
    else:
        hook.load_bytes(data, key, bucket, replace=True)
        report["uploaded"].append(key)
    return f"s3://{bucket}/{key}"


def _split_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = re.sub(r"^s3[an]?://", "", uri).partition("/")
    return bucket, key


def stage_artifacts(catalog: Catalog, plan: dict[str, Any], s: Settings) -> dict[str, Any]:
    """Stage the job scripts and their --py-files zip, the bootstrap action and the model weights.

    Every key holds a hash of its content, so staging uploads only what changed and a later deploy can
    never change the files of a cluster that is already running."""
    hook, bucket, layout = catalog.hook, catalog.bucket, catalog.layout
    report: dict[str, list[str]] = {"uploaded": [], "unchanged": []}

    zip_bytes, zip_sha = package_jobs(s.jobs_dir)
    scripts = {step: (s.jobs_dir / name).read_bytes() for step, name in JOB_SCRIPTS.items()}
    jobs_digest = _sha256((zip_sha + "".join(_sha256(b) for _, b in sorted(scripts.items()))).encode())
    py_files = _put_once(
        hook, bucket, layout.staged_key("jobs", jobs_digest, f"{JOB_PACKAGE}.zip"), zip_bytes, report
    )
    script_uris = {
        step: _put_once(hook, bucket, layout.staged_key("jobs", jobs_digest, JOB_SCRIPTS[step]), b, report)
        for step, b in scripts.items()
    }

    script = (BOOTSTRAP_DIR / BOOTSTRAP_SCRIPT).read_bytes()
    requirements = (BOOTSTRAP_DIR / BOOTSTRAP_REQUIREMENTS).read_bytes()
    boot_digest = _sha256(script + b"\0" + requirements)
    bootstrap_uri = _put_once(
        hook, bucket, layout.staged_key("bootstrap", boot_digest, BOOTSTRAP_SCRIPT), script, report
    )
    requirements_uri = _put_once(
        hook,
        bucket,
        layout.staged_key("bootstrap", boot_digest, BOOTSTRAP_REQUIREMENTS),
        requirements,
        report,
    )

    weights_uri = plan["params"]["weights_uri"]
    if weights_uri != "imagenet":
        weights_uri = _stage_weights(catalog, weights_uri, plan["weights_sha256"], report)

    log.info(
        "staged for EMR: %d uploaded %s, %d unchanged",
        len(report["uploaded"]),
        report["uploaded"],
        len(report["unchanged"]),
    )
    return {
        "scripts": script_uris,
        "py_files": py_files,
        "bootstrap": bootstrap_uri,
        "requirements": requirements_uri,
        "weights": weights_uri,
        **report,
    }


def _stage_weights(catalog: Catalog, source_uri: str, sha256: str, report: dict[str, list[str]]) -> str:
    """A content-addressed copy of the weights the plan hashed, so the cluster reads exactly the weights
    behind the run's model_id even if the source object is replaced while the run goes on. The bytes are
    checked against the plan's hash before the copy is written (a ~14 MB file)."""
    hook, bucket = catalog.hook, catalog.bucket
    src_bucket, src_key = _split_uri(source_uri)
    key = catalog.layout.staged_key("models", sha256, src_key.rsplit("/", 1)[-1])
    if hook.check_for_key(key, bucket):
        report["unchanged"].append(key)
        return f"s3://{bucket}/{key}"
    data = hook.get_key(src_key, src_bucket).get()["Body"].read()
    if _sha256(data) != sha256:
        raise RuntimeError(
            f"{source_uri} changed since this run was planned (sha256 {sha256[:12]} planned, "
            f"{_sha256(data)[:12]} now). No cluster was created; trigger the run again."
        )
    return _put_once(hook, bucket, key, data, report)


def python_path(s: Settings) -> str:
    return f"{s.emr_venv}/bin/python"


def job_flow_request(plan: dict[str, Any], staged: dict[str, Any], s: Settings) -> dict[str, Any]:
    """The RunJobFlow request: everything about the cluster, in one place."""
    layout = Layout(s.bucket)
    emr_tuning(s.emr_core_type, s.emr_primary_type, python_path(s))  # unknown instance types fail here
    # Sized to the run's photos by the plan (plan.size_cluster), which also checked its cost.
    core_nodes = int((plan.get("sizing") or {}).get("core_nodes") or s.emr_core_count)
    instances: dict[str, Any] = {
        "InstanceGroups": [
            {
                "Name": "primary",
                "InstanceRole": "MASTER",
                "Market": "ON_DEMAND",
                "InstanceType": s.emr_primary_type,
                "InstanceCount": 1,
            },
            {
                "Name": "core",
                "InstanceRole": "CORE",
                "Market": "ON_DEMAND",
                "InstanceType": s.emr_core_type,
                "InstanceCount": core_nodes,
            },
        ],
        # Backstop 1: the cluster ends by itself once no step is left (the steps are added right after
        # creation, while it is still starting, so it never sees "no steps" before them).
        "KeepJobFlowAliveWhenNoSteps": False,
        "TerminationProtected": False,
    }
    if s.emr_subnet_id:
        instances["Ec2SubnetId"] = s.emr_subnet_id
    run_id = safe_run_id(plan["run_id"])
    request: dict[str, Any] = {
        "Name": f"fruits-{run_id}"[:256],
        "ReleaseLabel": s.emr_release,
        "LogUri": layout.uri(layout.emr_logs),
        "Applications": [{"Name": "Spark"}],
        "Instances": instances,
        "BootstrapActions": [
            {
                "Name": "fruits-python-deps",
                "ScriptBootstrapAction": {
                    "Path": staged["bootstrap"],
                    # A bootstrap action gets no environment: the optional mirror is an argument.
                    "Args": [staged["requirements"], s.emr_venv]
                    + ([s.emr_pip_index_url] if s.emr_pip_index_url else []),
                },
            }
        ],
        "Configurations": [
            {
                # Anything else started on the cluster (a notebook, spark-shell) uses the jobs' Python too.
                "Classification": "spark-env",
                "Configurations": [
                    {
                        "Classification": "export",
                        "Properties": {"PYSPARK_PYTHON": python_path(s)},
                    }
                ],
            }
        ],
        # Backstop 2: if Airflow dies before its teardown, EMR ends an idle cluster after this long.
        "AutoTerminationPolicy": {"IdleTimeout": s.emr_idle_timeout_s},
        "EbsRootVolumeSize": 30,  # room for the TensorFlow venv next to EMR's own software
        "StepConcurrencyLevel": 1,
        "JobFlowRole": s.emr_instance_profile,
        "ServiceRole": s.emr_service_role,
        "VisibleToAllUsers": True,
        "Tags": [
            {"Key": "project", "Value": "fruits"},
            {"Key": "fruits:run_id", "Value": run_id[:256]},
            {"Key": "fruits:batches", "Value": str(plan["new_batches"])},
            # Required by the AmazonEMRServicePolicy_v2 managed policy of the service role.
            {"Key": "for-use-with-amazon-emr-managed-policies", "Value": "true"},
        ],
    }
    if s.emr_managed_scaling:
        # EMR may shrink the core group to FRUITS_EMR_CORE_COUNT when it idles (the PCA step needs less
        # than embed) and grow it back up to the sized count, never beyond: the plan's cost bound holds.
        low = min(s.emr_core_count, core_nodes)
        request["ManagedScalingPolicy"] = {
            "ComputeLimits": {
                "UnitType": "Instances",
                "MinimumCapacityUnits": low,
                "MaximumCapacityUnits": core_nodes,
                "MaximumCoreCapacityUnits": core_nodes,
                "MaximumOnDemandCapacityUnits": core_nodes,
            }
        }
    return request


def _with_arg(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


def emr_steps(plan: dict[str, Any], staged: dict[str, Any], s: Settings) -> list[dict[str, Any]]:
    """The two steps, submitted together: EMR runs them in order and cancels the second if the first
    fails (ACTION_ON_FAILURE). Their argv comes from the one builder the local backend uses too."""
    tuning = emr_tuning(s.emr_core_type, s.emr_primary_type, python_path(s))
    bundle = JobBundle(scripts=staged["scripts"], py_files=staged["py_files"])
    job_args = {
        "embed": _with_arg(plan["embed_args"], "--weights", staged["weights"]),
        "pca": list(plan["pca_args"]),
    }
    return [
        {
            "Name": f"fruits-{step}",
            "ActionOnFailure": ACTION_ON_FAILURE,
            "HadoopJarStep": {
                "Jar": "command-runner.jar",
                "Args": spark_submit_argv(step, job_args[step], bundle, tuning.conf(), deploy_mode="client"),
            },
        }
        for step in STEPS
        if step != "embed" or plan["new_batches"]  # a refit with nothing new: the PCA step alone
    ]


def prepare_cluster(catalog: Catalog, plan: dict[str, Any], s: Settings) -> dict[str, Any]:
    """Stage, then build the cluster request and the steps from the staged URIs (one task, so the
    request never names a file that was not staged)."""
    staged = stage_artifacts(catalog, plan, s)
    return {
        "job_flow": job_flow_request(plan, staged, s),
        "steps": emr_steps(plan, staged, s),
        "staged": staged,
    }


# --- watching steps -----------------------------------------------------------------------------------
def sensor_kwargs(s: Settings) -> dict[str, Any]:
    """How the DAG waits on a step (config: FRUITS_EMR_SENSOR_MODE, _DEFERRABLE, _POKE_INTERVAL_S)."""
    return {
        "mode": s.emr_sensor_mode,
        "deferrable": s.emr_deferrable,
        "poke_interval": s.emr_poke_interval_s,
        "timeout": s.emr_step_timeout_s,
        "max_attempts": max(1, s.emr_step_timeout_s // max(1, s.emr_poke_interval_s)),
    }


def _stderr_tail(hook: S3Hook, uri: str, wait_s: int) -> str | None:
    bucket, key = _split_uri(uri)
    deadline = time.monotonic() + wait_s
    while not hook.check_for_key(key, bucket):
        if time.monotonic() >= deadline:
            return None
        time.sleep(min(15.0, max(0.0, deadline - time.monotonic())))
    raw = hook.get_key(key, bucket).get()["Body"].read()
    try:
        text = gzip.decompress(raw).decode("utf-8", errors="replace")
    except OSError:
        text = raw.decode("utf-8", errors="replace")
    lines = [line for line in text.splitlines() if line.strip() and not _NOISE.match(line)]
    return "\n".join(lines[-STDERR_TAIL_LINES:])


def explain_step(emr_client: Any, s3: S3Hook, cluster_id: str, step_id: str, wait_s: int) -> str:
    """Why a step ended as it did: its state-change reason, EMR's failure details and the tail of its
    stderr from the LogUri (EMR layout LOGURI/CLUSTER_ID/steps/STEP_ID/stderr.gz), when present."""
    step = emr_client.describe_step(ClusterId=cluster_id, StepId=step_id)["Step"]
    status = step["Status"]
    lines = [f"EMR step {step.get('Name')!r} ({step_id}) on cluster {cluster_id} ended {status['State']}."]
    reason = (status.get("StateChangeReason") or {}).get("Message")
    if reason:
        lines.append(f"state-change reason: {reason}")
    details = status.get("FailureDetails") or {}
    if details:
        lines.append(f"failure details: {details.get('Reason')}: {details.get('Message')}")
    if not (status.get("Timeline") or {}).get("StartDateTime"):
        lines.append(
            f"the step never started: EMR cancels the steps after a failed one (ActionOnFailure={ACTION_ON_FAILURE})."
        )
        return "\n".join(lines)
    log_uri = emr_client.describe_cluster(ClusterId=cluster_id)["Cluster"].get("LogUri")
    if not log_uri:
        lines.append("the cluster has no LogUri, so there is no stderr to show")
        return "\n".join(lines)
    stderr_uri = f"{log_uri.rstrip('/')}/{cluster_id}/steps/{step_id}/stderr.gz"
    tail = _stderr_tail(s3, stderr_uri, wait_s)
    if tail is None:
        lines.append(f"{stderr_uri} was not there after {wait_s} s (EMR copies step logs every few minutes).")
    else:
        lines.append(f"last lines of {stderr_uri} (Spark INFO lines and JVM frames left out):\n{tail}")
    return "\n".join(lines)


class StepWatcher(EmrStepSensor):
    """The provider's EmrStepSensor, plus: when the step fails or is cancelled, the task log says why,
    with the tail of the step's stderr, so nobody has to open the AWS console."""

    def poke(self, context: Any) -> bool:
        try:
            return super().poke(context)
        except AirflowException as exc:
            raise AirflowException(self._explain()) from exc

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> None:
        try:
            super().execute_complete(context, event)
        except AirflowException as exc:
            raise AirflowException(self._explain()) from exc

    def _explain(self) -> str:
        try:
            text = explain_step(
                self.hook.conn,
                S3Hook(aws_conn_id=self.aws_conn_id, region_name=self.region_name),
                self.job_flow_id,
                self.step_id,
                settings().emr_log_wait_s,
            )
        except Exception as exc:  # the diagnosis must never hide the failure itself
            text = f"EMR step {self.step_id} on {self.job_flow_id} failed; no diagnosis ({exc!r})"
        for line in text.splitlines():
            self.log.error("%s", line)
        return text


# --- cost ---------------------------------------------------------------------------------------------
ENDED_STATES = ("TERMINATED", "TERMINATED_WITH_ERRORS")


def cost_estimate(emr_client: Any, cluster_id: str) -> dict[str, Any]:
    """Instance-hours x on-demand price (config.INSTANCE_TYPES), from the ended cluster's own timeline
    (CreationDateTime to EndDateTime: EMR bills from the request to the end) and instance groups. An
    estimate: EBS, S3 requests and data transfer are not in it. Refuses a cluster that has not ended, so a
    total is never understated by a missing end."""
    cluster = emr_client.describe_cluster(ClusterId=cluster_id)["Cluster"]
    state, timeline = cluster["Status"]["State"], cluster["Status"]["Timeline"]
    if state not in ENDED_STATES or not timeline.get("EndDateTime"):
        raise RuntimeError(
            f"cluster {cluster_id} is {state}, not ended: its cost is computed only from a final timeline "
            "(the summary runs after terminate_cluster has waited for the end)"
        )
    start, end = timeline["CreationDateTime"], timeline["EndDateTime"]
    hours = max(0.0, (end - start).total_seconds() / 3600)
    table = instance_types()
    instance_hours: dict[str, float] = {}
    cost, unpriced, prices = 0.0, [], {}
    for group in emr_client.list_instance_groups(ClusterId=cluster_id)["InstanceGroups"]:
        kind = group["InstanceType"]
        # Requested, not running: a terminated cluster runs none, but was billed for what it ran.
        n = int(group.get("RequestedInstanceCount") or group.get("RunningInstanceCount") or 0)
        instance_hours[kind] = instance_hours.get(kind, 0.0) + n * hours
        if kind in table:
            price = table[kind]
            cost += n * hours * (price.ec2_usd_per_hour + price.emr_usd_per_hour)
            prices[kind] = {
                "ec2_usd_per_hour": price.ec2_usd_per_hour,
                "emr_usd_per_hour": price.emr_usd_per_hour,
                "source": price.source,
                "as_of": price.as_of,
                "verified": price.verified,
            }
        else:
            unpriced.append(kind)
    unverified = sorted(k for k, p in prices.items() if not p["verified"])
    return {
        "cluster_id": cluster_id,
        "state": state,
        "created": start.isoformat(),
        "ended": end.isoformat(),
        "cluster_hours": round(hours, 4),
        "instance_hours": {k: round(v, 4) for k, v in instance_hours.items()},
        "estimated_cost_usd": round(cost, 4),
        "final": True,
        "unpriced_instance_types": unpriced,
        "price_table": prices,
        "unverified_prices": unverified,
        "prices": "on-demand EC2 + EMR list prices, eu-west-3, config.INSTANCE_TYPES"
        + (f" (UNVERIFIED for {', '.join(unverified)})" if unverified else ""),
    }


def wait_until_ended(emr_client: Any, cluster_id: str, poll_s: int, timeout_s: int = 3600) -> str:
    """TerminateJobFlows returns at once and the cluster spends minutes TERMINATING: wait for its end
    (TERMINATED or TERMINATED_WITH_ERRORS; boto3's waiter fails on the latter, which still has a cost)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = emr_client.describe_cluster(ClusterId=cluster_id)["Cluster"]["Status"]["State"]
        if state in ENDED_STATES:
            return state
        if time.monotonic() >= deadline:
            raise RuntimeError(f"cluster {cluster_id} still {state} after {timeout_s} s: see the EMR console")
        log.info("cluster %s is %s; waiting for its end to price it", cluster_id, state)
        time.sleep(poll_s)


def cluster_cost(cluster_id: str, region: str, s: Settings) -> dict[str, Any]:
    """The cost block of the summary, once the cluster has ended (the DAG runs this after the teardown)."""
    from airflow.providers.amazon.aws.hooks.emr import EmrHook

    client = EmrHook(aws_conn_id=s.aws_conn_id, region_name=region, emr_conn_id=None).conn
    wait_until_ended(client, cluster_id, s.emr_poke_interval_s)
    return cost_estimate(client, cluster_id)
