"""compute=emr end to end, without AWS.

Real: Airflow (dag.test() over the migrated SQLite database) running the DAG, with the amazon provider's
EmrCreateJobFlowOperator, EmrAddStepsOperator, EmrStepSensor (as fruits.emr.StepWatcher) and
EmrTerminateJobFlowOperator calling an EMR API over HTTP through the AWS connection's endpoint_url; S3 (a
moto server on localhost, started in-process by this module); every EMR step's spark-submit, run for real
on a local Spark over s3a with the real MobileNetV2 weights and Fruits-360 photos; staging, validation,
ledger and summary, asserted on what is read back from S3.

Emulated: EMR's control plane only: moto's EMR API plus tests/emr_harness.py, which runs each submitted
step (the step's own argv, made local), sets its state from the real exit code, writes its logs to the
LogUri, applies ActionOnFailure and KeepJobFlowAliveWhenNoSteps, and checks (does not run) the bootstrap
action. There is no EC2, YARN, EMRFS or bootstrap install here.

IAM is enforced (moto's INITIAL_NO_AUTH_ACTION_COUNT, tests/aws_account.py sets the account up as the
README does): the DAG's tasks sign with the keys of a user holding exactly bootstrap/iam/airflow-policy.json,
the steps with the keys of the cluster's instance role (emr-instance-role-policy.json, assumed through the
instance profile named in the request), and the harness adds to moto's evaluation what AWS checks on EMR
calls (resource ARNs, tag conditions, iam:PassRole per service) and what RunJobFlow and AddJobFlowSteps
refuse (instance profile name, subnet and VPC tags, step size, pending steps).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from collections.abc import Iterator

import numpy as np
import pytest
from aws_account import INSTANCE_ROLE, set_up
from conftest import (
    BUCKET,
    REPO,
    WEIGHTS,
    captured_log,
    fresh_bucket,
    list_keys,
    read_json,
    read_parquet,
    run_dag,
    s3_hook,
    sample_files,
    task_states,
    upload_sample,
)
from emr_harness import MAX_PENDING_STEPS, MAX_STEP_ARGS_CHARS, EmrHarness

E1, E2, E3 = "emr-b1", "emr-b2-broken-weights", "emr-b3-us"
BROKEN_WEIGHTS = "test-fixtures/not_really_weights.h5"


def ti_states(dagrun) -> dict[tuple[str, int], str]:
    """Task states by (task_id, map_index): the step sensor is mapped over the step ids."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter(
            TaskInstance.dag_id == dagrun.dag_id, TaskInstance.run_id == dagrun.run_id
        )
        return {(ti.task_id, ti.map_index): str(getattr(ti.state, "value", ti.state)) for ti in tis}


def etags(prefix: str) -> dict[str, str]:
    hook = s3_hook()
    return {k: hook.head_object(k, BUCKET)["ETag"] for k in list_keys(prefix)}


def s3_bytes(uri: str) -> bytes:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return s3_hook().get_key(key, bucket).get()["Body"].read()


@pytest.fixture(scope="module")
def emr(airflow_db) -> Iterator[EmrHarness]:
    """An in-process moto server (S3 + EMR + IAM + EC2) that the AWS connections point at, driven by the
    harness, with IAM enforced: the DAG's tasks act as an IAM user holding exactly airflow-policy.json,
    the steps as the cluster's instance role (emr-instance-role-policy.json), the test's own fixtures as an
    administrator. An AccessDenied anywhere fails the run."""
    from counting_s3 import CountingMotoServer  # moto's app behind a keep-alive server (scripts/)

    server = CountingMotoServer().start()
    endpoint = server.endpoint
    conn = json.loads(os.environ["AIRFLOW_CONN_AWS_DEFAULT"])
    conn["extra"]["endpoint_url"] = endpoint
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(conn))
        env.setenv("FRUITS_EMR_SENSOR_MODE", "poke")  # no triggerer and no rescheduling in dag.test()
        env.setenv("FRUITS_EMR_POKE_INTERVAL_S", "2")
        env.setenv("FRUITS_EMR_LOG_WAIT_S", "5")
        env.setenv("FRUITS_EMR_STEP_TIMEOUT_S", "900")
        with EmrHarness(endpoint) as harness:
            fresh_bucket()  # as anyone: moto does not enforce IAM yet
            account = set_up(endpoint, BUCKET)
            env.setenv("AIRFLOW_CONN_AWS_DEFAULT", account.connection("admin"))  # the tests' fixtures
            env.setenv("AIRFLOW_CONN_FRUITS_AIRFLOW", account.connection("airflow"))  # the DAG's tasks
            env.setenv("FRUITS_AWS_CONN_ID", "fruits_airflow")
            env.setenv("FRUITS_EMR_SUBNET_ID", account.subnet_id)
            harness.account = account  # type: ignore[attr-defined]
            with harness.enforce_iam():
                yield harness
    server.stop()


def clusters_by_id(emr: EmrHarness) -> dict[str, tuple[str, object]]:
    return {c.id: (region, c) for region, c in emr.clusters()}


@pytest.fixture(scope="module")
def emr_run(emr: EmrHarness):
    files = sample_files("Training", labels=3, per_label=3)
    upload_sample(E1, files)
    with captured_log() as logged:
        dagrun = run_dag({"compute": "emr"})
    return {"dagrun": dagrun, "files": files, "log": logged}


def test_full_run_on_emr(emr: EmrHarness, emr_run) -> None:
    dagrun, files = emr_run["dagrun"], emr_run["files"]
    states = ti_states(dagrun)
    assert str(dagrun.state).endswith("success"), states
    assert states[("embed", -1)] == states[("pca", -1)] == "skipped"  # the local branch
    for task in ("emr.stage_artifacts", "emr.create_cluster", "emr.add_steps", "emr.terminate_cluster"):
        assert states[(task, -1)] == "success", task
    assert states[("emr.watch_steps", 0)] == states[("emr.watch_steps", 1)] == "success"  # every step
    assert states[("validate", -1)] == states[("commit", -1)] == "success"

    # The cluster, as requested of the EMR API.
    assert len(emr.requests) == 1
    request, req = emr.requests[0], emr.requests[0]["params"]
    assert request["region"] == "eu-west-3"
    assert req["ReleaseLabel"].startswith("emr-7.")
    assert req["LogUri"] == f"s3://{BUCKET}/emr-logs/"
    assert req["AutoTerminationPolicy"]["IdleTimeout"] == 1800
    assert req["Instances"]["KeepJobFlowAliveWhenNoSteps"] is False
    groups = {
        g["InstanceRole"]: (g["InstanceType"], g["InstanceCount"]) for g in req["Instances"]["InstanceGroups"]
    }
    assert groups == {"MASTER": ("m5.xlarge", 1), "CORE": ("m5.xlarge", 2)}
    assert [a["Name"] for a in req["Applications"]] == ["Spark"]
    assert {"Key": "project", "Value": "fruits"} in req["Tags"]
    # The instance profile EMR gets is named as its role, and the cluster goes to the tagged subnet.
    assert req["JobFlowRole"] == INSTANCE_ROLE and req["ServiceRole"] == "fruits-emr-service-role"
    assert req["Instances"]["Ec2SubnetId"] == emr.account.subnet_id  # type: ignore[attr-defined]
    assert not emr.refused, emr.refused  # nothing was refused on the way (IAM enforced)
    (action,) = req["BootstrapActions"]
    script_uri, (requirements_uri, venv) = (
        action["ScriptBootstrapAction"]["Path"],
        action["ScriptBootstrapAction"]["Args"],
    )
    assert s3_bytes(script_uri) == (REPO / "bootstrap" / "install_python_deps.sh").read_bytes()
    assert s3_bytes(requirements_uri) == (REPO / "bootstrap" / "requirements-emr.txt").read_bytes()
    assert venv == "/opt/fruits/venv"

    (cluster_id,) = clusters_by_id(emr)
    region, cluster = clusters_by_id(emr)[cluster_id]
    assert region == "eu-west-3" and cluster.release_label == req["ReleaseLabel"]
    assert emr.bootstrap_checked[cluster_id] == [script_uri]
    # Ended, and by the DAG's teardown (EMR's own end after the last step is only a backstop).
    assert cluster.state == "TERMINATED"
    assert ("eu-west-3", [cluster_id]) in emr.terminate_calls

    # Both steps were submitted, ran for real (exit code 0) and completed, in order.
    assert [(s.name, s.state, s.action_on_failure) for s in cluster.steps] == [
        ("fruits-embed", "COMPLETED", "CANCEL_AND_WAIT"),
        ("fruits-pca", "COMPLETED", "CANCEL_AND_WAIT"),
    ]
    runs = [r for r in emr.step_runs if r.cluster_id == cluster_id]
    assert [(r.name, r.returncode) for r in runs] == [("fruits-embed", 0), ("fruits-pca", 0)]
    embed_args = cluster.steps[0].args
    assert embed_args[:3] == ["spark-submit", "--deploy-mode", "client"]
    assert (
        "spark.executor.cores=4" in embed_args
        and "spark.sql.execution.arrow.maxRecordsPerBatch=32" in embed_args
    )
    for step in cluster.steps:  # EMR's log layout, written as the step ran
        stderr = gzip.decompress(
            s3_hook().get_key(f"emr-logs/{cluster_id}/steps/{step.id}/stderr.gz", BUCKET).get()["Body"].read()
        )
        assert b"SparkContext" in stderr

    # Staging: content-addressed, byte-equal to what is in the repo and to the weights the plan hashed.
    from fruits.spark_submit import package_jobs

    staged_zip = cluster.steps[0].args[cluster.steps[0].args.index("--py-files") + 1]
    assert hashlib.sha256(s3_bytes(staged_zip)).hexdigest() == package_jobs(REPO / "spark_jobs")[1]
    staged_weights = embed_args[embed_args.index("--weights") + 1]
    sha = hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
    assert staged_weights == f"s3://{BUCKET}/artifacts/models/{sha[:12]}/mobilenet_v2_1.0_224_no_top.h5"
    assert hashlib.sha256(s3_bytes(staged_weights)).hexdigest() == sha

    # The outputs, read back: one 1280-d embedding and one feature row per photo, recorded in the ledger.
    emb = read_parquet(f"embeddings/batch_id={E1}/")
    assert emb.num_rows == len(files)
    assert sorted(emb.column("path").to_pylist()) == sorted(
        f"s3://{BUCKET}/incoming/{E1}/{p.parent.name}/{p.name}" for p in files
    )
    vectors = np.array(emb.column("embedding").to_pylist(), dtype=np.float32)
    assert vectors.shape == (len(files), 1280) and np.isfinite(vectors).all() and vectors.std() > 0
    current = read_json("models/pca/CURRENT.json")
    feats = read_parquet(f"features/pca_version={current['version']}/batch_id={E1}/")
    assert feats.num_rows == len(files)
    record = read_json(f"ledger/batches/{E1}.json")
    assert (record["files"], record["embedded"], record["rejected"]) == (len(files), len(files), 0)
    assert not list_keys("ledger/claims/")

    # The run's cost: computed after the teardown, from the ended cluster's own timeline (creation to end)
    # and instance groups, priced from the config table, each price with its source and date.
    from fruits.config import instance_types

    summary_key = next(k for k in list_keys("runs/") if k.endswith("summary.json"))
    cost = read_json(summary_key)["emr"]
    price = instance_types()["m5.xlarge"]
    assert cost["cluster_id"] == cluster_id and cost["final"] is True and cost["state"] == "TERMINATED"
    described = boto_emr(emr).describe_cluster(ClusterId=cluster_id)["Cluster"]["Status"]["Timeline"]
    assert cost["ended"] == described["EndDateTime"].isoformat()
    assert cost["created"] == described["CreationDateTime"].isoformat()
    assert cost["cluster_hours"] == pytest.approx(
        (described["EndDateTime"] - described["CreationDateTime"]).total_seconds() / 3600, abs=1e-4
    )
    assert cost["instance_hours"]["m5.xlarge"] == pytest.approx(3 * cost["cluster_hours"], abs=1e-3)
    assert 0 < cost["cluster_hours"] < 1
    assert cost["estimated_cost_usd"] == pytest.approx(
        3 * cost["cluster_hours"] * (price.ec2_usd_per_hour + price.emr_usd_per_hour), abs=1e-3
    )
    assert cost["price_table"]["m5.xlarge"]["as_of"] == "2025-06-01"
    assert cost["unverified_prices"] == ["m5.xlarge"] and "UNVERIFIED" in cost["prices"]
    tis = ti_times(dagrun)
    assert tis["summarize"][0] >= tis["emr.terminate_cluster"][1]  # priced after the teardown had ended


def boto_emr(emr: EmrHarness, principal: str = "admin"):
    return emr.account.client("emr", principal)  # type: ignore[attr-defined]


def ti_times(dagrun) -> dict[str, tuple]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter(
            TaskInstance.dag_id == dagrun.dag_id, TaskInstance.run_id == dagrun.run_id
        )
        return {ti.task_id: (ti.start_date, ti.end_date) for ti in tis if ti.map_index == -1}


def test_nothing_new_creates_no_cluster(emr: EmrHarness, emr_run) -> None:
    before = (len(emr.requests), len(emr.clusters()), len(emr.step_runs))
    dagrun = run_dag({"compute": "emr"})
    states = task_states(dagrun)
    assert str(dagrun.state).endswith("success")
    assert states["find_new_batches"] == "success"
    assert states["emr.stage_artifacts"] == states["emr.create_cluster"] == "skipped"
    assert states["emr.terminate_cluster"] == "skipped"
    assert (len(emr.requests), len(emr.clusters()), len(emr.step_runs)) == before


def test_failed_step_fails_the_run_and_still_terminates(emr: EmrHarness, emr_run) -> None:
    hook = s3_hook()
    hook.load_bytes(b"this is not an HDF5 file", BROKEN_WEIGHTS, BUCKET, replace=True)
    upload_sample(E2, sample_files("Training", labels=2, per_label=1, offset=5))
    ledger_before = etags("ledger/")
    model_before = etags("models/pca/CURRENT.json")
    staged_code_before = etags("artifacts/jobs/") | etags("artifacts/bootstrap/")
    known = set(clusters_by_id(emr))

    broken = {"compute": "emr", "engine": "tf", "weights_uri": f"s3://{BUCKET}/{BROKEN_WEIGHTS}"}
    # Other weights than the history's are refused at planning, before any cluster (plan.check_same_weights).
    refused = run_dag(broken)
    assert ti_states(refused)[("emr.create_cluster", -1)] == "upstream_failed"
    assert set(clusters_by_id(emr)) == known
    with captured_log() as logged:
        # A run that re-embeds every batch with these weights and refits passes that check and reaches
        # the cluster: engine=tf then loads them inside the embed step (the onnx engine would fail
        # earlier, exporting the model at planning), and the step itself must fail.
        dagrun = run_dag({**broken, "refit": True, "force": True, "batch_ids": [E1, E2]})
    states = ti_states(dagrun)
    assert str(dagrun.state).endswith("failed")
    assert states[("emr.watch_steps", 0)] == "failed"  # embed failed
    assert states[("emr.watch_steps", 1)] == "failed"  # pca was cancelled, and that is watched too
    assert states[("emr.terminate_cluster", -1)] == "success"
    assert states[("validate", -1)] == states[("commit", -1)] == "upstream_failed"
    assert states[("release_claims", -1)] == "success"

    (cluster_id,) = set(clusters_by_id(emr)) - known
    _, cluster = clusters_by_id(emr)[cluster_id]
    assert cluster.state == "TERMINATED"
    assert any(cluster_id in ids for _, ids in emr.terminate_calls)
    assert [(s.name, s.state) for s in cluster.steps] == [
        ("fruits-embed", "FAILED"),
        ("fruits-pca", "CANCELLED"),
    ]
    (run,) = [r for r in emr.step_runs if r.cluster_id == cluster_id]  # pca never ran
    assert run.name == "fruits-embed" and run.returncode != 0

    # Nothing was recorded, nothing half-written is trusted, the batch is free for the next run.
    assert etags("ledger/") == ledger_before
    assert etags("models/pca/CURRENT.json") == model_before
    assert not list_keys(f"embeddings/batch_id={E2}/")
    assert not list_keys("ledger/claims/")
    assert etags("artifacts/jobs/") | etags("artifacts/bootstrap/") == staged_code_before  # not re-uploaded

    # The task log explains the failure: EMR's reason and the tail of the step's real stderr.
    text = "\n".join(logged)
    embed_step = cluster.steps[0]
    assert f"EMR step 'fruits-embed' ({embed_step.id}) on cluster {cluster_id} ended FAILED" in text
    assert "command-runner: spark-submit exited with code" in text
    assert f"emr-logs/{cluster_id}/steps/{embed_step.id}/stderr.gz" in text
    stderr = gzip.decompress(
        s3_bytes(f"s3://{BUCKET}/emr-logs/{cluster_id}/steps/{embed_step.id}/stderr.gz")
    ).decode()
    python_errors = [line for line in stderr.splitlines() if re.match(r"\w[\w.]*(Error|Exception): ", line)]
    assert python_errors and python_errors[-1] in text  # e.g. h5py's "OSError: ... file signature not found"
    assert "the step never started" in text  # the cancelled pca step


def test_non_eu_region_fails_before_creating_anything(emr: EmrHarness) -> None:
    upload_sample(E3, sample_files("Training", labels=1, per_label=1, offset=7))
    before = (len(emr.requests), len(emr.clusters()))
    with captured_log() as logged:
        dagrun = run_dag({"compute": "emr", "region": "us-east-1", "batch_ids": [E3]})
    states = task_states(dagrun)
    assert str(dagrun.state).endswith("failed")
    assert states["check_params"] == "failed"
    assert states.get("emr.create_cluster") in (None, "upstream_failed")
    assert (len(emr.requests), len(emr.clusters())) == before
    assert not list_keys(f"ledger/claims/{E3}")
    assert any("region='us-east-1' is outside the EU" in line for line in logged)


def test_emr_tuning_fits_the_instance() -> None:
    """Executor heap + overhead fit YARN's share of the node, with a TF worker's memory per core."""
    from fruits.config import instance_types
    from fruits.tuning import TF_WORKER_BASE_MB, TF_WORKER_MB_PER_IMAGE, YARN_SHARE, emr_tuning

    for name, kind in instance_types().items():
        try:
            conf = emr_tuning(name, "m5.xlarge", "/opt/fruits/venv/bin/python").conf()
        except ValueError as exc:
            assert "too little memory per core" in str(exc)
            continue
        cores = int(conf["spark.executor.cores"])
        heap, overhead = (
            int(conf[k].removesuffix("m")) for k in ("spark.executor.memory", "spark.executor.memoryOverhead")
        )
        batch = int(conf["spark.sql.execution.arrow.maxRecordsPerBatch"])
        assert cores == kind.vcpu
        assert heap + overhead <= kind.memory_gib * 1024 * YARN_SHARE
        assert overhead / cores >= TF_WORKER_BASE_MB + TF_WORKER_MB_PER_IMAGE * batch


def test_cluster_end_is_a_teardown_and_every_step_is_watched(airflow_db) -> None:
    """The shape that keeps clusters from leaking: terminate is create's teardown (it runs after a failure
    and after a run marked failed by hand), and the sensor is mapped over every id add_steps returns."""
    from airflow.sdk import TriggerRule
    from conftest import get_dag

    dag = get_dag()
    create, add = dag.get_task("emr.create_cluster"), dag.get_task("emr.add_steps")
    terminate, watch = dag.get_task("emr.terminate_cluster"), dag.get_task("emr.watch_steps")
    assert create.is_setup and terminate.is_teardown
    assert terminate.trigger_rule == TriggerRule.ALL_DONE_SETUP_SUCCESS
    assert create.task_id in terminate.upstream_task_ids and watch.task_id in terminate.upstream_task_ids
    (mapped_over,) = watch.expand_input.value.values()
    assert mapped_over.operator.task_id == add.task_id  # all step ids, not the first one only
    assert dag.get_task("validate").trigger_rule == TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS
    assert {"emr.watch_steps", "pca"} <= dag.get_task("validate").upstream_task_ids


# --- what AWS refuses, refused here too (IAM enforced; run after the end-to-end tests above) -------------
def _request(emr: EmrHarness, **changes) -> dict:
    """The DAG's own RunJobFlow request of the first test run, changed."""
    req = json.loads(json.dumps(emr.requests[0]["params"]))
    for path, value in changes.items():
        target, *keys = path.split("__")
        node = req
        for key in [target, *keys][:-1]:
            node = node[key]
        node[[target, *keys][-1]] = value
    return req


def _refused(emr: EmrHarness, call, **kwargs) -> str:
    from botocore.exceptions import ClientError

    before = len(emr.clusters())
    with pytest.raises(ClientError) as info:
        call(**kwargs)
    assert len(emr.clusters()) == before  # nothing was created
    return str(info.value)


def test_emr_refuses_an_instance_profile_named_unlike_its_role(emr: EmrHarness, emr_run) -> None:
    iam = emr.account.client("iam")  # type: ignore[attr-defined]
    iam.create_instance_profile(InstanceProfileName="fruits-emr-instance-profile")
    iam.add_role_to_instance_profile(
        InstanceProfileName="fruits-emr-instance-profile", RoleName=INSTANCE_ROLE
    )
    client = boto_emr(emr, "admin")
    message = _refused(emr, client.run_job_flow, **_request(emr, JobFlowRole="fruits-emr-instance-profile"))
    assert "Invalid InstanceProfile: fruits-emr-instance-profile" in message
    message = _refused(emr, client.run_job_flow, **_request(emr, JobFlowRole="no-such-profile"))
    assert "Invalid InstanceProfile: no-such-profile" in message


def test_emr_refuses_a_cluster_without_a_tagged_subnet(emr: EmrHarness, emr_run) -> None:
    client, ec2 = boto_emr(emr), emr.account.client("ec2")  # type: ignore[attr-defined]
    req = _request(emr)
    del req["Instances"]["Ec2SubnetId"]
    assert "no Ec2SubnetId" in _refused(emr, client.run_job_flow, **req)
    vpc = ec2.create_vpc(CidrBlock="10.43.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.43.1.0/24")["Subnet"]["SubnetId"]
    ec2.create_tags(
        Resources=[subnet], Tags=[{"Key": "for-use-with-amazon-emr-managed-policies", "Value": "true"}]
    )
    message = _refused(emr, client.run_job_flow, **_request(emr, Instances__Ec2SubnetId=subnet))
    assert f"VPC {vpc} is not tagged" in message and "subnet" not in message.split("VPC")[0]


def test_airflow_principal_cannot_retag_or_drive_a_foreign_cluster(emr: EmrHarness, emr_run) -> None:
    """Finding 11: the Airflow principal may not tag another cluster project=fruits and then drive it."""
    admin, airflow = boto_emr(emr, "admin"), boto_emr(emr, "airflow")
    req = _request(emr, Name="someone-elses-cluster")
    req["Tags"] = [t for t in req["Tags"] if t["Key"] != "project"] + [{"Key": "project", "Value": "other"}]
    foreign = admin.run_job_flow(**req)["JobFlowId"]
    admin.terminate_job_flows(JobFlowIds=[foreign])
    for call, kwargs in (
        (airflow.add_tags, {"ResourceId": foreign, "Tags": [{"Key": "project", "Value": "fruits"}]}),
        (airflow.terminate_job_flows, {"JobFlowIds": [foreign]}),
        (airflow.describe_cluster, {"ClusterId": foreign}),
    ):
        from botocore.exceptions import ClientError

        with pytest.raises(ClientError, match="AccessDenied"):
            call(**kwargs)
    # and it may not create an untagged cluster either
    untagged = _request(emr)
    untagged["Tags"] = [t for t in untagged["Tags"] if t["Key"] != "project"]
    assert "AccessDenied" in _refused(emr, airflow.run_job_flow, **untagged)


def test_emr_refuses_steps_over_the_size_and_pending_limits(emr: EmrHarness, emr_run) -> None:
    client = boto_emr(emr)
    (cluster_id,) = [c.id for _, c in emr.clusters()][:1]
    big = {
        "Name": "too-big",
        "ActionOnFailure": "CONTINUE",
        "HadoopJarStep": {"Jar": "command-runner.jar", "Args": ["spark-submit", "x" * MAX_STEP_ARGS_CHARS]},
    }
    message = _refused(emr, client.add_job_flow_steps, JobFlowId=cluster_id, Steps=[big])
    assert f"more than the {MAX_STEP_ARGS_CHARS} EMR accepts" in message
    # The pending limit, on the rule itself (a cluster with 256 live steps would be run by the harness).
    small = {"Name": "s", "HadoopJarStep": {"Jar": "command-runner.jar", "Args": ["spark-submit"]}}
    assert EmrHarness._step_problems([small], MAX_PENDING_STEPS - 1) == []
    assert EmrHarness._step_problems([small], MAX_PENDING_STEPS) != []
    # The DAG's own steps passed the same rule (they were added through it in the first test).
    _, cluster = clusters_by_id(emr)[cluster_id]
    sizes = [len(s.jar) + sum(len(a) for a in s.args) for s in cluster.steps]
    assert sizes and max(sizes) <= MAX_STEP_ARGS_CHARS


def test_compute_emr_without_a_subnet_fails_fast_saying_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 4: no FRUITS_EMR_SUBNET_ID would put the cluster in the untagged default VPC."""
    from fruits.config import Settings
    from fruits.plan import ParamError, parse_params

    monkeypatch.setenv("FRUITS_EMR_SUBNET_ID", "")
    with pytest.raises(ParamError, match="compute=emr needs FRUITS_EMR_SUBNET_ID") as info:
        parse_params({"compute": "emr"}, Settings())
    assert "for-use-with-amazon-emr-managed-policies=true" in str(info.value)
    assert parse_params({"compute": "local"}, Settings()).compute == "local"  # local needs no subnet
    monkeypatch.setenv("FRUITS_EMR_SUBNET_ID", "subnet-0abc")
    assert parse_params({"compute": "emr"}, Settings()).compute == "emr"


def test_compute_local_on_aws_needs_and_gets_its_own_policy(
    emr: EmrHarness, emr_run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """compute=local with IAM enforced: the worker's Spark writes the outputs with Airflow's principal, so
    airflow-policy.json alone is refused (AccessDenied, nothing recorded), and with
    airflow-local-compute-policy.json added the run succeeds."""
    batch = "emr-b5-local"
    upload_sample(batch, sample_files("Training", labels=1, per_label=2, offset=9))
    dagrun = run_dag({"compute": "local", "batch_ids": [batch]})
    states = task_states(dagrun)
    assert states["embed"] == "failed" and states["commit"] == "upstream_failed"
    assert not list_keys(f"ledger/batches/{batch}")
    monkeypatch.setenv("AIRFLOW_CONN_FRUITS_AIRFLOW", emr.account.connection("airflow-local"))  # type: ignore[attr-defined]
    dagrun = run_dag({"compute": "local", "batch_ids": [batch]})
    states = task_states(dagrun)
    assert str(dagrun.state).endswith("success"), states
    record = read_json(f"ledger/batches/{batch}.json")
    assert (record["files"], record["embedded"]) == (2, 2)


def test_report_says_which_prices_are_unverified() -> None:
    """Finding 10: prices carry their source and date, and the page labels the unverified ones."""
    from fruits.config import INSTANCE_TYPES
    from fruits.report import _cost_section

    assert all(p.source and p.as_of and not p.verified for p in INSTANCE_TYPES.values())
    assert INSTANCE_TYPES["c5.2xlarge"].emr_usd_per_hour != INSTANCE_TYPES["m5.2xlarge"].emr_usd_per_hour
    price = INSTANCE_TYPES["m5.xlarge"]
    cost = {
        "cluster_id": "j-TEST",
        "cluster_hours": 0.25,
        "instance_hours": {"m5.xlarge": 0.75},
        "estimated_cost_usd": 0.2,
        "final": True,
        "unpriced_instance_types": [],
        "price_table": {"m5.xlarge": {"source": price.source, "as_of": price.as_of, "verified": False}},
        "unverified_prices": ["m5.xlarge"],
        "prices": "list prices (UNVERIFIED for m5.xlarge)",
    }
    page = _cost_section({"emr": cost})
    assert "id='cost-unverified'" in page and "m5.xlarge" in page and price.as_of in page
    assert "id='cost-unverified'" not in _cost_section({"emr": {**cost, "unverified_prices": []}})
