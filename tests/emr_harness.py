"""EMR's control plane for the tests: moto's EMR API, in this process, plus the parts moto leaves out.

moto answers RunJobFlow, AddJobFlowSteps, DescribeStep, TerminateJobFlows..., but its steps never advance
(the first stays RUNNING, the others PENDING). This harness plays EMR's step runner and lifecycle:

- Each submitted step is RUN FOR REAL: its command-runner `spark-submit` argv, with the master set to the
  local Spark, the script and --py-files downloaded from S3 to a temp folder, s3:// rewritten to s3a://,
  and this machine's Python, s3a and JVM settings appended (plugins/fruits/local_compute.py and
  fruits.tuning.LOCAL_JVM_OPTIONS, as the local backend has them: the JIT and the collector, not Spark's
  settings). Nothing else in the argv is changed, so the EMR tuning is what runs.
- The step becomes COMPLETED or FAILED from the real exit code. Its stderr and stdout are written, gzipped,
  to LOGURI/CLUSTER_ID/steps/STEP_ID/ in S3, as EMR does, before the state changes.
- ActionOnFailure is applied (CANCEL_AND_WAIT cancels the later steps; TERMINATE_CLUSTER also ends the
  cluster), and KeepJobFlowAliveWhenNoSteps=false ends a cluster once it has had steps and none is left.
- Each bootstrap action script must exist in S3 and pass `bash -n`, and each entry of its requirements
  must be pinned (name==version) with hashes, as pip's hash-checking mode on the nodes needs;
  otherwise the cluster ends with BOOTSTRAP_FAILURE. The script is not run (it would install TensorFlow).

What RunJobFlow and AddJobFlowSteps refuse on AWS is refused here too (ValidationException or
AccessDenied, before moto records anything):
- a JobFlowRole that is not an existing instance profile holding one role of the same name, a ServiceRole
  that does not exist;
- with AmazonEMRServicePolicy_v2 on the service role: no Ec2SubnetId, a subnet or VPC without the tag
  for-use-with-amazon-emr-managed-policies=true, or a cluster without it;
- a step whose HadoopJarStep strings (Jar, MainClass, Args, Properties) exceed MAX_STEP_ARGS_CHARS, and
  more than MAX_PENDING_STEPS steps not yet ended on one cluster;
- with IAM enforced (moto's INITIAL_NO_AUTH_ACTION_COUNT, `enforce_iam()`), every EMR call is authorized
  against the caller's policies the way AWS does it, conditions included (tests/iam_eval.py): the cluster
  ARN as resource (moto uses "*"), aws:ResourceTag from the cluster's tags, aws:RequestTag/aws:TagKeys from
  the request, and for RunJobFlow the iam:PassRole of each role to its service (iam:PassedToService) and
  PutAutoTerminationPolicy when the request sets one. moto itself checks the S3 calls (action and key).

The steps run as the cluster's instance role: the harness assumes the role of the instance profile the
cluster was created with (as the nodes' credentials come from it), and uses those keys for the step's
Spark (s3a and the job's own S3 client), for fetching the step's files and the bootstrap script, and for
writing the step logs. With IAM enforced, anything that role's policy does not allow fails the step.

Six places where moto differs from AWS are corrected, so the DAG meets EMR's behaviour:
- moto files every EMR call to a custom endpoint under us-east-1; here the SigV4-signed region is used.
- moto authorizes HeadBucket as s3:HeadBucket, which does not exist in IAM; here as s3:ListBucket (AWS).
- moto authorizes DeleteObjects as s3:DeleteObject on the bucket; here on each key, as AWS does.
- moto checks a signature by re-signing with botocore, which leaves User-Agent out; the Java SDK behind
  s3a signs it (AWS accepts that), so here the headers the client signed are the ones re-signed.
- moto ends a cluster created without steps at once when KeepJobFlowAliveWhenNoSteps=false; EMR spends
  minutes starting, and steps added meanwhile run first.
- moto's DescribeStep has no FailureDetails; a step failed here gets them, as on EMR.

For assertions it records the RunJobFlow requests as sent (moto drops AutoTerminationPolicy), the
TerminateJobFlows calls, and every step it ran.
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import xmltodict
from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import HTTPHeaders
from iam_eval import decide
from moto import settings as moto_settings
from moto.core import DEFAULT_ACCOUNT_ID
from moto.core.authorization import ActionAuthenticatorMixin
from moto.core.exceptions import AccessDeniedError
from moto.core.responses import BaseResponse
from moto.core.utils import utcnow
from moto.ec2.models import ec2_backends
from moto.emr import models as emr_models
from moto.emr.exceptions import ValidationException
from moto.emr.models import emr_backends
from moto.emr.responses import ElasticMapReduceResponse
from moto.iam.access_control import IAMPolicy, IAMRequest, S3IAMRequest, create_access_key
from moto.iam.models import iam_backends
from moto.s3 import responses as s3_responses
from moto.s3.responses import S3Response
from moto.sts.models import sts_backends

log = logging.getLogger("emr_harness")
MAX_STEP_ARGS_CHARS = 10_240  # AddJobFlowSteps: all strings of one step's HadoopJarStep together
MAX_PENDING_STEPS = 256  # steps not yet ended (PENDING or RUNNING) on one cluster
MANAGED_POLICY_V2 = "arn:aws:iam::aws:policy/service-role/AmazonEMRServicePolicy_v2"
MANAGED_TAG = ("for-use-with-amazon-emr-managed-policies", "true")
# EMR calls whose resource is a cluster, by the request parameter that names it.
_CLUSTER_PARAMS = ("ClusterId", "JobFlowId", "ResourceId")
_MISSING = object()
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


def _SignedHeadersAuth(base: type, credentials: Any, service: str, region: str, signed: list[str]) -> Any:
    """botocore's SigV4 signer, signing exactly the headers the client signed. moto recomputes a request's
    signature with botocore, which never signs User-Agent; the AWS SDK for Java (Spark's s3a) does, and AWS
    accepts it, so without this every s3a request fails moto's signature check once IAM is enforced."""

    class Auth(base):  # type: ignore[misc, valid-type]
        def headers_to_sign(self, request: Any) -> Any:
            headers = HTTPHeaders()
            for name, value in request.headers.items():
                if name.lower() in signed:
                    headers[name.lower()] = value
            return headers

    return Auth(credentials, service, region)


def requirement_entries(text: str) -> list[str]:
    """A requirements file's entries, each with its continuation lines (hashes) joined, comments left out."""
    joined = re.sub(r"\\\n", " ", text)
    return [
        line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]


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
        self.refused: list[str] = []  # every request refused here, with EMR's message
        self._instance_keys: dict[str, dict[str, str]] = {}  # cluster id -> the instance role's keys

    # --- lifecycle ------------------------------------------------------------------------------------
    def __enter__(self) -> EmrHarness:
        self._patch()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._restore()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _set(self, obj: Any, name: str, value: Any) -> None:
        self._undo.append((obj, name, obj.__dict__.get(name, _MISSING)))
        setattr(obj, name, value)

    def _restore(self) -> None:
        for obj, name, original in reversed(self._undo):
            if isinstance(obj, dict):
                obj[name] = original
            elif original is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, original)

    @staticmethod
    @contextlib.contextmanager
    def enforce_iam() -> Iterator[None]:
        """moto authorizes every request against the caller's IAM policies from here on (its
        INITIAL_NO_AUTH_ACTION_COUNT set to 0); an unknown key or a denied action is refused."""
        before = (moto_settings.INITIAL_NO_AUTH_ACTION_COUNT, ActionAuthenticatorMixin.request_count)
        moto_settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
        ActionAuthenticatorMixin.request_count = 0
        try:
            yield
        finally:
            moto_settings.INITIAL_NO_AUTH_ACTION_COUNT, ActionAuthenticatorMixin.request_count = before

    @staticmethod
    def iam_enforced() -> bool:
        return moto_settings.INITIAL_NO_AUTH_ACTION_COUNT == 0

    def _patch(self) -> None:
        harness = self
        self._set(ElasticMapReduceResponse, "get_region_from_url", BaseResponse.get_region_from_url)
        # AWS authorizes HeadBucket as s3:ListBucket (there is no s3:HeadBucket permission); moto asks for
        # "s3:HeadBucket", which no real policy grants.
        head = s3_responses.ACTION_MAP["BUCKET"]["HEAD"]
        self._undo.append((head, "DEFAULT", head["DEFAULT"]))
        head["DEFAULT"] = "ListBucket"

        original_run = ElasticMapReduceResponse.run_job_flow
        original_add_steps = ElasticMapReduceResponse.add_job_flow_steps
        original_auth = ElasticMapReduceResponse._authenticate_and_authorize_normal_action

        def run_job_flow(resp: ElasticMapReduceResponse) -> Any:
            params = _plain(resp._get_params())
            harness._refuse_if(harness._run_job_flow_problems(resp, params))
            harness.requests.append({"region": resp.region, "params": params})
            return original_run(resp)

        def add_job_flow_steps(resp: ElasticMapReduceResponse) -> Any:
            params = _plain(resp._get_params())
            cluster = resp.backend.clusters.get(params.get("JobFlowId"))
            pending = len([s for s in cluster.steps if s.state not in FINAL]) if cluster else 0
            harness._refuse_if(harness._step_problems(params.get("Steps") or [], pending))
            return original_add_steps(resp)

        def determine_resource(resp: ElasticMapReduceResponse) -> str:
            """The cluster's ARN for the calls on a cluster (moto authorizes them on "*")."""
            params = resp._get_params()
            ids = [params.get(p) for p in _CLUSTER_PARAMS if params.get(p)] + list(
                params.get("JobFlowIds") or []
            )
            if not ids:
                return "*"
            return f"arn:aws:elasticmapreduce:{resp.region}:{resp.current_account}:cluster/{ids[0]}"

        def authorize(resp: ElasticMapReduceResponse, resource: str = "*") -> None:
            original_auth(resp, resource)  # moto: signature, action and resource
            if harness.iam_enforced():
                harness._authorize_with_conditions(resp, resource)

        def sign_what_was_signed(auth_cls: type) -> Any:
            def create_auth(req: Any, credentials: Any) -> Any:
                signed = req._get_string_between("SignedHeaders=", ",", req._headers["Authorization"])
                return _SignedHeadersAuth(auth_cls, credentials, req._service, req._region, signed.split(";"))

            return create_auth

        self._set(S3IAMRequest, "_create_auth", sign_what_was_signed(S3SigV4Auth))
        self._set(IAMRequest, "_create_auth", sign_what_was_signed(SigV4Auth))

        original_post = S3Response._bucket_response_post

        def bucket_post(resp: S3Response, request: Any, bucket_name: str) -> Any:
            """DeleteObjects: AWS authorizes s3:DeleteObject per key; moto on the bucket ARN, which no
            key-scoped policy allows. Here each key is authorized; if all are, the delete goes ahead."""
            resp.path = resp._get_path(request)
            if harness.iam_enforced() and request.headers.get("Content-Length") and resp.is_delete_keys():
                objects = xmltodict.parse(resp.body, strip_whitespace=False)["Delete"].get("Object", [])
                objects = objects if isinstance(objects, list) else [objects]
                resp.data["Action"] = "DeleteObject"
                try:
                    for obj in objects:
                        resp._authenticate_and_authorize_s3_action(
                            bucket_name=bucket_name, key_name=obj["Key"]
                        )
                except Exception:
                    return original_post(resp, request, bucket_name)
                return resp._bucket_response_delete_keys(bucket_name)
            return original_post(resp, request, bucket_name)

        self._set(S3Response, "_bucket_response_post", bucket_post)
        self._set(ElasticMapReduceResponse, "run_job_flow", run_job_flow)
        self._set(ElasticMapReduceResponse, "add_job_flow_steps", add_job_flow_steps)
        self._set(ElasticMapReduceResponse, "_determine_resource", determine_resource)
        self._set(ElasticMapReduceResponse, "_authenticate_and_authorize_normal_action", authorize)

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

    # --- what EMR refuses -----------------------------------------------------------------------------
    def _refuse_if(self, problems: list[str]) -> None:
        if problems:
            message = "; ".join(problems)
            self.refused.append(message)
            raise ValidationException(message)

    @staticmethod
    def _step_problems(steps: list[dict[str, Any]], pending: int) -> list[str]:
        problems = []
        for step in steps:
            jar = step.get("HadoopJarStep") or {}
            strings = [jar.get("Jar") or "", jar.get("MainClass") or "", *(jar.get("Args") or [])]
            strings += [f"{p.get('Key', '')}{p.get('Value', '')}" for p in jar.get("Properties") or []]
            size = sum(len(s) for s in strings)
            if size > MAX_STEP_ARGS_CHARS:
                problems.append(
                    f"step {step.get('Name')!r}: HadoopJarStep holds {size} characters, more than the "
                    f"{MAX_STEP_ARGS_CHARS} EMR accepts"
                )
        if pending + len(steps) > MAX_PENDING_STEPS:
            problems.append(
                f"{pending} steps not ended + {len(steps)} new exceed the {MAX_PENDING_STEPS} EMR accepts"
            )
        return problems

    @staticmethod
    def _iam(account: str) -> Any:
        return iam_backends[account]["aws"]

    def _run_job_flow_problems(self, resp: ElasticMapReduceResponse, req: dict[str, Any]) -> list[str]:
        iam, problems = self._iam(resp.current_account), []
        profile_name, service_role = req.get("JobFlowRole"), req.get("ServiceRole")
        try:
            profile = iam.get_instance_profile(profile_name)
            roles = [r.name for r in profile.roles]
            if roles != [profile_name]:
                problems.append(
                    f"Invalid InstanceProfile: {profile_name} holds role(s) {roles}; EMR needs an instance "
                    "profile with the same name as its role"
                )
        except Exception:
            problems.append(f"Invalid InstanceProfile: {profile_name} (no instance profile of that name)")
        try:
            role = iam.get_role(service_role)
        except Exception:
            return [*problems, f"Invalid ServiceRole: {service_role} does not exist"]
        attached = {p.arn for p in role.managed_policies.values()}
        if MANAGED_POLICY_V2 in attached:
            key, value = MANAGED_TAG
            tags = {t["Key"]: t.get("Value") for t in req.get("Tags") or []}
            if tags.get(key) != value:
                problems.append(f"the cluster lacks the tag {key}={value} AmazonEMRServicePolicy_v2 needs")
            instances = req.get("Instances") or {}
            subnets = [instances.get("Ec2SubnetId")] if instances.get("Ec2SubnetId") else []
            subnets += list(instances.get("Ec2SubnetIds") or [])
            if not subnets:
                problems.append(
                    "no Ec2SubnetId: with AmazonEMRServicePolicy_v2 the cluster needs a subnet tagged "
                    f"{key}={value} (the default VPC's are not)"
                )
            ec2 = ec2_backends[resp.current_account][resp.region]
            for subnet_id in subnets:
                try:
                    subnet = ec2.get_subnet(subnet_id)
                except Exception:
                    problems.append(f"subnet {subnet_id} does not exist in {resp.region}")
                    continue
                for kind, resource_id in (("subnet", subnet_id), ("VPC", subnet.vpc_id)):
                    rtags = dict(ec2.tags.get(resource_id, {}))
                    if rtags.get(key) != value:
                        problems.append(f"{kind} {resource_id} is not tagged {key}={value}")
        problems += self._step_problems(req.get("Steps") or [], 0)
        return problems

    def _authorize_with_conditions(self, resp: ElasticMapReduceResponse, resource: str) -> None:
        """AWS's evaluation of the EMR call with its conditions (moto's ignores them)."""
        account = resp.current_account
        headers = dict(resp.headers)
        key_id = headers["Authorization"].partition("Credential=")[2].split("/")[0]
        principal = create_access_key(account, "aws", key_id, headers)
        policies = [IAMPolicy(p)._policy_json for p in principal.collect_policies()]
        action = resp._get_action()
        params = _plain(resp._get_params())
        context: dict[str, Any] = {}
        request_tags = {t["Key"]: t.get("Value", "") for t in params.get("Tags") or []}
        for k, v in request_tags.items():
            context[f"aws:RequestTag/{k}"] = v
            context[f"elasticmapreduce:RequestTag/{k}"] = v
        if request_tags:
            context["aws:TagKeys"] = list(request_tags)
        cluster = None
        if resource != "*":
            cluster = resp.backend.clusters.get(resource.rsplit("/", 1)[-1])
        for k, v in (getattr(cluster, "_tags", None) or {}).items():
            context[f"aws:ResourceTag/{k}"] = v
            context[f"elasticmapreduce:ResourceTag/{k}"] = v
        checks = [(f"elasticmapreduce:{action}", resource, context)]
        if action == "RunJobFlow":
            iam = self._iam(account)
            new_cluster = f"arn:aws:elasticmapreduce:{resp.region}:{account}:cluster/*"
            if params.get("AutoTerminationPolicy"):
                checks.append(("elasticmapreduce:PutAutoTerminationPolicy", new_cluster, {}))
            try:
                roles = [r.arn for r in iam.get_instance_profile(params.get("JobFlowRole")).roles]
            except Exception:
                roles = []
            for arn in roles:
                checks.append(("iam:PassRole", arn, {"iam:PassedToService": "ec2.amazonaws.com"}))
            service_role = f"arn:aws:iam::{account}:role/{params.get('ServiceRole')}"
            checks.append(
                ("iam:PassRole", service_role, {"iam:PassedToService": "elasticmapreduce.amazonaws.com"})
            )
        for checked_action, checked_resource, ctx in checks:
            if decide(policies, checked_action, checked_resource, ctx) != "allow":
                message = f"{principal.arn} may not {checked_action} on {checked_resource} (context {ctx})"
                self.refused.append(message)
                log.error("AccessDenied: %s", message)
                raise AccessDeniedError(
                    user_arn=principal.arn, action=f"{checked_action} on {checked_resource}"
                )

    # --- the instance role --------------------------------------------------------------------------
    def instance_keys(self, cluster: Any) -> dict[str, str]:
        """Temporary keys of the cluster's instance role, as EC2 hands them to the nodes."""
        if cluster.id not in self._instance_keys:
            profile = self._iam(DEFAULT_ACCOUNT_ID).get_instance_profile(cluster.role)
            (role,) = profile.roles
            assumed = sts_backends[DEFAULT_ACCOUNT_ID]["aws"].assume_role(
                region_name="eu-west-3",
                role_session_name=f"emr-{cluster.id}",
                role_arn=role.arn,
                policy="",
                duration=43200,
                external_id="",
            )
            self._instance_keys[cluster.id] = {
                "AWS_ACCESS_KEY_ID": assumed.access_key_id,
                "AWS_SECRET_ACCESS_KEY": assumed.secret_access_key,
                "AWS_SESSION_TOKEN": assumed.session_token,
            }
        return self._instance_keys[cluster.id]

    def s3_for(self, cluster: Any) -> Any:
        keys = self.instance_keys(cluster)
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="eu-west-3",
            aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"],
            aws_session_token=keys["AWS_SESSION_TOKEN"],
        )

    # --- the step runner ------------------------------------------------------------------------------
    def clusters(self) -> list[tuple[str, Any]]:
        """(region, cluster) for every cluster moto holds."""
        out = []
        try:
            regions = list(emr_backends[DEFAULT_ACCOUNT_ID].keys())
        except KeyError:  # nothing asked of EMR since the last reset
            return []
        for region in regions:
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
                script = self._download(cluster, action.script_path, f"{cluster.id}-bootstrap")
                checked.append(action.script_path)
                syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
                if syntax.returncode:
                    problems.append(f"{action.script_path}: {syntax.stderr.strip()}")
                for arg in action.args:
                    if arg.startswith("s3://"):
                        req = self._download(cluster, arg, f"{cluster.id}-bootstrap").read_text()
                        unpinned = [
                            entry.split()[0]
                            for entry in requirement_entries(req)
                            if not re.match(r"^[A-Za-z0-9._-]+==[^\s;]+", entry)
                            or "--hash=sha256:" not in entry
                        ]
                        if unpinned:
                            problems.append(f"{arg}: not pinned with hashes {unpinned}")
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
        publish = None
        try:
            argv, env, publish = self._local_argv(cluster, step)
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
        if publish:
            publish(code == 0)
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
        out_tail = [line for line in stdout.splitlines() if line.strip()][-40:]
        log.warning(
            "step %s (%s) failed:\nstderr:\n%s\nstdout:\n%s",
            step.name,
            step.id,
            "\n".join(line for line in tail if " INFO " not in line),
            "\n".join(out_tail),
        )
        if step.action_on_failure in ("CANCEL_AND_WAIT", "TERMINATE_CLUSTER", "TERMINATE_JOB_FLOW"):
            self._cancel_pending(cluster, f"Cancelled: step {step.name} failed")
        if step.action_on_failure in ("TERMINATE_CLUSTER", "TERMINATE_JOB_FLOW"):
            cluster.terminate()
            cluster.state = "TERMINATED_WITH_ERRORS"

    def _local_argv(
        self, cluster: Any, step: Any
    ) -> tuple[list[str], dict[str, str], Callable[[bool], None]]:
        """The step's own argv, made runnable here (see the module docstring for what changes), and what
        to call when it has run (the local steps' JVM class archive, as run_local_step uses it)."""
        from fruits.config import settings
        from fruits.local_compute import class_archive, s3a_conf_and_env
        from fruits.spark_submit import s3_to_s3a
        from fruits.tuning import LOCAL_JVM_OPTIONS

        args = list(step.args)
        if step.jar != "command-runner.jar" or not args or args[0] != "spark-submit":
            raise ValueError(f"not a command-runner spark-submit step: {step.jar} {args[:2]}")
        at = args.index("--py-files")
        options, py_files, script, job_args = args[1:at], args[at + 1], args[at + 2], args[at + 3 :]
        if "--master" in options:
            raise ValueError("an EMR step must not set --master: the cluster's YARN is the master")
        folder = f"{cluster.id}-{step.id}"
        s = settings()
        s3a_conf, env = s3a_conf_and_env(s.aws_conn_id, s, self.spark_master)
        local = {**s3a_conf, "spark.driver.memory": "2g"}  # this machine, not the primary node
        archive_options, publish = class_archive(s, Path(script).stem, local)
        # This machine's JVM settings, as for a local step (C1 only, the serial collector): they change
        # what the JVM spends starting on two cores, not what Spark runs.
        local["spark.driver.extraJavaOptions"] = f"{LOCAL_JVM_OPTIONS} {archive_options}".strip()
        argv = [str(Path(s.spark_python).parent / "spark-submit"), "--master", self.spark_master, *options]
        for key in sorted(local):
            argv += ["--conf", f"{key}={local[key]}"]
        argv += [
            "--py-files",
            str(self._download(cluster, py_files, folder)),
            str(self._download(cluster, script, folder)),
            *s3_to_s3a(job_args),
        ]
        # The step runs as the instance role, not as the Airflow connection's principal.
        env = {**env, **self.instance_keys(cluster)}
        return argv, env, publish

    def _download(self, cluster: Any, uri: str, folder: str) -> Path:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        target = self._tmp / folder / key.rsplit("/", 1)[-1]
        target.parent.mkdir(parents=True, exist_ok=True)
        self.s3_for(cluster).download_file(bucket, key, str(target))
        return target

    def _write_logs(self, cluster: Any, step: Any, stdout: str, stderr: str) -> str | None:
        if not cluster.log_uri:
            return None
        bucket, _, prefix = re.sub(r"^s3[an]?://", "", cluster.log_uri).partition("/")
        base = f"{prefix.rstrip('/')}/{cluster.id}/steps/{step.id}/".lstrip("/")
        for name, text in (("stdout.gz", stdout), ("stderr.gz", stderr)):
            self.s3_for(cluster).put_object(Bucket=bucket, Key=base + name, Body=gzip.compress(text.encode()))
        return f"s3://{bucket}/{base}stderr.gz"
