"""EMR's control plane for the tests: moto's EMR API, in this process, plus the parts moto leaves out.

moto answers RunJobFlow, AddJobFlowSteps, DescribeStep, TerminateJobFlows..., but its steps never advance
(the first stays RUNNING, the others PENDING). This harness plays EMR's step runner and lifecycle:

- Each submitted step is RUN FOR REAL: its command-runner `spark-submit` argv, with the master set to the
  local Spark, the script and --py-files downloaded from S3 to a temp folder, s3:// rewritten to s3a://,
  and this machine's Python and s3a settings appended (plugins/fruits/local_compute.py, the same helpers
  as the local backend). Nothing else in the argv is changed, so the EMR tuning is what runs.
- The step becomes COMPLETED or FAILED from the real exit code. Its stderr and stdout are written, gzipped,
  to LOGURI/CLUSTER_ID/steps/STEP_ID/ in S3, as EMR does, before the state changes.
- ActionOnFailure is applied (CANCEL_AND_WAIT cancels the later steps; TERMINATE_CLUSTER also ends the
  cluster), and KeepJobFlowAliveWhenNoSteps=false ends a cluster once it has had steps and none is left.
- Each bootstrap action script must exist in S3 and pass `bash -n`, and its requirements must be pinned;
  otherwise the cluster ends with BOOTSTRAP_FAILURE. The script is not run (it would install TensorFlow).

Three places where moto differs from EMR are corrected, so the DAG meets EMR's behaviour:
- moto files every EMR call to a custom endpoint under us-east-1; here the SigV4-signed region is used.
- moto ends a cluster created without steps at once when KeepJobFlowAliveWhenNoSteps=false; EMR spends
  minutes starting, and steps added meanwhile run first.
- moto's DescribeStep has no FailureDetails; a step failed here gets them, as on EMR.

For assertions it records the RunJobFlow requests as sent (moto drops AutoTerminationPolicy), the
TerminateJobFlows calls, and every step it ran.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from moto.core import DEFAULT_ACCOUNT_ID
from moto.core.responses import BaseResponse
from moto.core.utils import utcnow
from moto.emr import models as emr_models
from moto.emr.models import emr_backends
from moto.emr.responses import ElasticMapReduceResponse

log = logging.getLogger("emr_harness")
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "INTERRUPTED")
ENDED = ("TERMINATING", "TERMINATED", "TERMINATED_WITH_ERRORS")


@dataclass
class StepRun:
    cluster_id: str
    step_id: str
    name: str
    argv: list[str]
    returncode: int
    seconds: float
    stderr_tail: list[str] = field(default_factory=list)


def _plain(value: Any) -> Any:
    """moto's parsed request (XFormedDict) as plain dicts and lists with the API's own key names."""
    if hasattr(value, "original_dict"):
        value = value.original_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class EmrHarness:
    def __init__(self, endpoint: str, spark_master: str = "local[2]", poll_s: float = 0.3) -> None:
        self.endpoint, self.spark_master, self.poll_s = endpoint, spark_master, poll_s
        self.requests: list[dict[str, Any]] = []  # {"region": ..., "params": RunJobFlow request}
        self.terminate_calls: list[tuple[str, list[str]]] = []  # (region, cluster ids)
        self.step_runs: list[StepRun] = []
        self.auto_terminated: list[str] = []
        self.bootstrap_checked: dict[str, list[str]] = {}
        self._undo: list[tuple[Any, str, Any]] = []
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="emr-harness", daemon=True)
        self._tmp = Path(tempfile.mkdtemp(prefix="emr-harness-"))
        self.s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="eu-west-3",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )

    # --- lifecycle ------------------------------------------------------------------------------------
    def __enter__(self) -> EmrHarness:
        self._patch()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        for obj, name, original in reversed(self._undo):
            setattr(obj, name, original)
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _set(self, obj: Any, name: str, value: Any) -> None:
        self._undo.append((obj, name, obj.__dict__[name]))
        setattr(obj, name, value)

    def _patch(self) -> None:
        harness = self
        self._set(ElasticMapReduceResponse, "get_region_from_url", BaseResponse.get_region_from_url)

        original_run = ElasticMapReduceResponse.run_job_flow

        def run_job_flow(resp: ElasticMapReduceResponse) -> Any:
            harness.requests.append({"region": resp.region, "params": _plain(resp._get_params())})
            return original_run(resp)

        self._set(ElasticMapReduceResponse, "run_job_flow", run_job_flow)

        def run_bootstrap_actions(cluster: Any) -> None:
            cluster.state = "BOOTSTRAPPING"
            cluster.ready_datetime = utcnow()
            cluster.state = "WAITING"  # not ended: steps are added while a real cluster starts

        self._set(emr_models.Cluster, "run_bootstrap_actions", run_bootstrap_actions)

        original_terminate = emr_models.ElasticMapReduceBackend.terminate_job_flows

        def terminate_job_flows(backend: Any, job_flow_ids: list[str]) -> Any:
            harness.terminate_calls.append((backend.region_name, list(job_flow_ids)))
            clusters = original_terminate(backend, job_flow_ids)
            for cluster in clusters:
                harness._cancel_pending(cluster, "Cancelled: the cluster was terminated")
            return clusters

        self._set(emr_models.ElasticMapReduceBackend, "terminate_job_flows", terminate_job_flows)

        original_status = emr_models.Step.status.fget

        def status(step: Any) -> dict[str, Any]:
            out = original_status(step)
            if getattr(step, "failure_details", None):
                out["FailureDetails"] = step.failure_details
            return out

        self._set(emr_models.Step, "status", property(status))

    # --- the step runner ------------------------------------------------------------------------------
    def clusters(self) -> list[tuple[str, Any]]:
        """(region, cluster) for every cluster moto holds."""
        out = []
        for region in list(emr_backends[DEFAULT_ACCOUNT_ID].keys()):
            backend = emr_backends[DEFAULT_ACCOUNT_ID][region]
            out += [(region, c) for c in list(backend.clusters.values())]
        return out

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                for _, cluster in self.clusters():
                    self._advance(cluster)
            except Exception:  # keep driving the other clusters; the test sees the state
                log.exception("harness loop")
            self._stop.wait(self.poll_s)

    def _advance(self, cluster: Any) -> None:
        if cluster.id not in self._seen:
            self._seen.add(cluster.id)
            self._check_bootstrap(cluster)
        if cluster.state in ENDED:
            self._cancel_pending(cluster, "Cancelled: the cluster was terminated")
            return
        pending = [s for s in cluster.steps if s.state not in FINAL]
        if pending:
            cluster.state = "RUNNING"
            self._run(cluster, pending[0])
        elif cluster.steps and not cluster.keep_job_flow_alive_when_no_steps:
            cluster.terminate()
            cluster.last_state_change_reason = "Steps completed"
            self.auto_terminated.append(cluster.id)

    def _cancel_pending(self, cluster: Any, reason: str) -> None:
        for step in cluster.steps:
            if step.state == "PENDING":
                step.state = "CANCELLED"
                step.last_state_change_reason = reason

    def _check_bootstrap(self, cluster: Any) -> None:
        problems, checked = [], []
        for action in cluster.bootstrap_actions:
            try:
                script = self._download(action.script_path, f"{cluster.id}-bootstrap")
                checked.append(action.script_path)
                syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
                if syntax.returncode:
                    problems.append(f"{action.script_path}: {syntax.stderr.strip()}")
                for arg in action.args:
                    if arg.startswith("s3://"):
                        req = self._download(arg, f"{cluster.id}-bootstrap").read_text()
                        unpinned = [
                            line
                            for line in req.splitlines()
                            if line.strip() and not line.startswith("#") and "==" not in line
                        ]
                        if unpinned:
                            problems.append(f"{arg}: unpinned {unpinned}")
            except Exception as exc:
                problems.append(f"{action.script_path}: {exc}")
        self.bootstrap_checked[cluster.id] = checked
        if problems:
            cluster.state = "TERMINATED_WITH_ERRORS"
            cluster.last_state_change_reason = "BOOTSTRAP_FAILURE: " + "; ".join(problems)
            self._cancel_pending(cluster, "Cancelled: bootstrap failure")

    def _run(self, cluster: Any, step: Any) -> None:
        step.state = "RUNNING"
        step.start()
        started = time.monotonic()
        try:
            argv, env = self._local_argv(cluster, step)
            proc = subprocess.run(
                argv,
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                errors="replace",
                timeout=1200,
            )
            code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        except Exception:
            argv, code, stdout, stderr = list(step.args), 1, "", traceback.format_exc()
        tail = [line for line in stderr.splitlines() if line.strip()][-40:]
        self.step_runs.append(
            StepRun(cluster.id, step.id, step.name, argv, code, time.monotonic() - started, tail)
        )
        stderr_uri = self._write_logs(cluster, step, stdout, stderr)
        step.end_date_time = utcnow()
        if code == 0:
            step.state = "COMPLETED"
            return
        errors = [line for line in stderr.splitlines() if re.match(r"\S.*(Error|Exception)\b", line)]
        step.failure_details = {
            "Reason": f"command-runner: spark-submit exited with code {code}",
            "Message": errors[-1][:1000] if errors else "see the step's stderr",
            "LogFile": stderr_uri,
        }
        step.last_state_change_reason = step.failure_details["Reason"]
        step.state = "FAILED"
        log.warning("step %s (%s) failed: %s", step.name, step.id, "\n".join(tail[-10:]))
        if step.action_on_failure in ("CANCEL_AND_WAIT", "TERMINATE_CLUSTER", "TERMINATE_JOB_FLOW"):
            self._cancel_pending(cluster, f"Cancelled: step {step.name} failed")
        if step.action_on_failure in ("TERMINATE_CLUSTER", "TERMINATE_JOB_FLOW"):
            cluster.terminate()
            cluster.state = "TERMINATED_WITH_ERRORS"

    def _local_argv(self, cluster: Any, step: Any) -> tuple[list[str], dict[str, str]]:
        """The step's own argv, made runnable here (see the module docstring for what changes)."""
        from fruits.config import settings
        from fruits.local_compute import s3a_conf_and_env
        from fruits.spark_submit import s3_to_s3a

        args = list(step.args)
        if step.jar != "command-runner.jar" or not args or args[0] != "spark-submit":
            raise ValueError(f"not a command-runner spark-submit step: {step.jar} {args[:2]}")
        at = args.index("--py-files")
        options, py_files, script, job_args = args[1:at], args[at + 1], args[at + 2], args[at + 3 :]
        if "--master" in options:
            raise ValueError("an EMR step must not set --master: the cluster's YARN is the master")
        folder = f"{cluster.id}-{step.id}"
        s = settings()
        s3a_conf, env = s3a_conf_and_env(s.aws_conn_id, s)
        local = {**s3a_conf, "spark.driver.memory": "2g"}  # this machine, not the primary node
        argv = [str(Path(s.spark_python).parent / "spark-submit"), "--master", self.spark_master, *options]
        for key in sorted(local):
            argv += ["--conf", f"{key}={local[key]}"]
        argv += [
            "--py-files",
            str(self._download(py_files, folder)),
            str(self._download(script, folder)),
            *s3_to_s3a(job_args),
        ]
        return argv, env

    def _download(self, uri: str, folder: str) -> Path:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        target = self._tmp / folder / key.rsplit("/", 1)[-1]
        target.parent.mkdir(parents=True, exist_ok=True)
        self.s3.download_file(bucket, key, str(target))
        return target

    def _write_logs(self, cluster: Any, step: Any, stdout: str, stderr: str) -> str | None:
        if not cluster.log_uri:
            return None
        bucket, _, prefix = re.sub(r"^s3[an]?://", "", cluster.log_uri).partition("/")
        base = f"{prefix.rstrip('/')}/{cluster.id}/steps/{step.id}/".lstrip("/")
        for name, text in (("stdout.gz", stdout), ("stderr.gz", stderr)):
            self.s3.put_object(Bucket=bucket, Key=base + name, Body=gzip.compress(text.encode()))
        return f"s3://{bucket}/{base}stderr.gz"
