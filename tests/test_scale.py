"""Growing data (issue 10, the Airflow side): a run costs what its new photos cost.

Real: the S3 server (moto, in its own process, counting the requests it serves by S3 operation:
scripts/counting_s3.py), Airflow (dag.test() over the migrated SQLite database), the plan's own functions
against that server, and, where steps run, spark-submit on a local Spark with the real weights and photos.
Synthetic: the history (thousands of ledger records, a model pointer, a model folder, incoming folders),
written straight into the S3 server with boto3 as the pipeline would have left it; nothing reads its
vectors, so none are written. No EMR cluster is created here: the cost guard refuses before any is.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest
from conftest import (
    BUCKET,
    ENDPOINT,
    fresh_bucket,
    list_keys,
    plan_as_plan_run,
    read_json,
    read_parquet,
    run_dag,
    s3_hook,
    s3_requests,
    sample_files,
    snapshot,
    task_states,
    upload_sample,
    weights_model_id,
)

HISTORY_VERSION = "pca-history"
XCOM_LIMIT = 65_536  # bytes per XCom value (the goal)
STEP_ARGS_LIMIT = 10_240  # characters across a step's HadoopJarStep strings (AddJobFlowSteps)


def client():
    return boto3.client(
        "s3",
        endpoint_url=ENDPOINT,
        region_name="eu-west-3",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )


def _put_all(objects: dict[str, bytes]) -> None:
    s3 = client()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: s3.put_object(Bucket=BUCKET, Key=kv[0], Body=kv[1]), objects.items()))


def history_id(i: int) -> str:
    return f"history-2024-{i:05d}"


def seed_history(n: int, incoming: bool = True) -> list[str]:
    """What n processed batches leave behind: a ledger record each (as commit writes it), their incoming
    folders (a photo and _READY), a run summary, the model pointer and the model's folder."""
    ids = [history_id(i) for i in range(n)]
    model_id = weights_model_id()
    objects: dict[str, bytes] = {}
    for b in ids:
        record = {
            "batch_id": b,
            "files": 40,
            "embedded": 40,
            "rejected": 0,
            "labels": {f"Variety {j}": 10 for j in range(4)},
            "ignored_hidden_files": [],
            "model_id": model_id,  # the staged weights': a refit never mixes weights
            "pca_version": HISTORY_VERSION,
            "pca_k": 64,
            "embeddings": f"s3://{BUCKET}/embeddings/batch_id={b}/",
            "rejects": f"s3://{BUCKET}/rejects/batch_id={b}/",
            "features": f"s3://{BUCKET}/features/pca_version={HISTORY_VERSION}/batch_id={b}/",
            "run_id": "scheduled__2024",
            "processed_at": "2024-01-01T00:00:00+00:00",
            "updated_at": "2024-01-01T00:00:00+00:00",
        }
        objects[f"ledger/batches/{b}.json"] = json.dumps(record, indent=2, sort_keys=True).encode()
        if incoming:
            objects[f"incoming/{b}/Variety 0/photo.jpg"] = b"\xff\xd8 not decoded by the plan"
            objects[f"incoming/{b}/_READY"] = b""
    meta = {"version": HISTORY_VERSION, "k": 64, "explained_variance_at_k": 0.9, "fit_batches": ids}
    objects |= {
        "runs/scheduled__2024/summary.json": b"{}",
        "models/pca/CURRENT.json": json.dumps({"version": HISTORY_VERSION, "k": 64}).encode(),
        f"models/pca/{HISTORY_VERSION}/metadata.json": json.dumps(meta).encode(),
        f"models/pca/{HISTORY_VERSION}/spark_model/metadata/part-00000": b"{}",
    }
    _put_all(objects)
    return ids


def new_batches(n: int, photos: int = 1, prefix: str = "incoming-2026-12-02-camera") -> list[str]:
    """n small ready batches: `photos` tiny files each (the plan lists them, never decodes them)."""
    ids = [f"{prefix}-{i:04d}" for i in range(n)]
    objects = {f"incoming/{b}/Variety {j}/p{j}.jpg": b"\xff\xd8" for b in ids for j in range(photos)}
    _put_all(objects)
    _put_all({f"incoming/{b}/_READY": b"" for b in ids})
    return ids


def xcom_bytes(value: Any) -> int:
    return len(json.dumps(value).encode())


def step_chars(step: dict[str, Any]) -> int:
    jar = step["HadoopJarStep"]
    return len(jar["Jar"]) + len(jar.get("MainClass") or "") + sum(len(a) for a in jar["Args"])


# --- the counting S3 server -------------------------------------------------------------------------
def test_counting_server_names_each_request_as_the_client_does(s3_server):
    """The server's counts by operation equal what boto3 says it called (its own event hook)."""
    fresh_bucket()
    s3 = client()
    called: dict[str, int] = {}
    s3.meta.events.register(
        "before-call.s3.*", lambda model, **_: called.__setitem__(model.name, called.get(model.name, 0) + 1)
    )
    s3_requests(reset=True)
    s3.head_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key="a/x.json", Body=b"{}")
    s3.put_object(Bucket=BUCKET, Key="a/claim.json", Body=b"{}", IfNoneMatch="*")
    s3.head_object(Bucket=BUCKET, Key="a/x.json")
    s3.get_object(Bucket=BUCKET, Key="a/x.json")
    s3.list_objects_v2(Bucket=BUCKET, Prefix="a/", Delimiter="/")
    s3.list_objects(Bucket=BUCKET)
    s3.copy_object(Bucket=BUCKET, Key="a/y", CopySource={"Bucket": BUCKET, "Key": "a/x.json"})
    s3.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": "a/y"}]})
    s3.delete_object(Bucket=BUCKET, Key="a/claim.json")
    s3.get_bucket_location(Bucket=BUCKET)
    upload = s3.create_multipart_upload(Bucket=BUCKET, Key="a/big")
    part = s3.upload_part(Bucket=BUCKET, Key="a/big", UploadId=upload["UploadId"], PartNumber=1, Body=b"x")
    s3.complete_multipart_upload(
        Bucket=BUCKET,
        Key="a/big",
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]},
    )
    counts = s3_requests(reset=True)
    assert counts["s3"] == called and counts["total"] == sum(called.values()) == 14
    assert s3_requests()["total"] == 0  # reset; reading the counts is not counted


def test_server_keeps_the_connections_of_many_readers_alive(s3_server):
    """Spark's Python workers keep 16 GETs each in flight (fruits_jobs/objects.py). 40 connections at
    once, 10 requests each: every response keeps its connection open. With cheroot's defaults the
    server closed each connection past its 10th after one response, and the reconnects met a listen
    backlog of 5: the embed job on 5,040 photos ran at 27 img/s with the cores two-thirds idle."""
    import http.client
    import threading
    from urllib.parse import urlsplit

    from counting_s3 import COUNTS_PATH

    where = urlsplit(ENDPOINT)
    readers = 40
    connected = threading.Barrier(readers)

    def reader(_: int) -> tuple[int, int]:
        conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
        conn.connect()
        connected.wait(60)  # all connections open before the first request
        kept = 0
        for _ in range(10):
            conn.request("GET", COUNTS_PATH)
            response = conn.getresponse()
            response.read()
            kept += not response.will_close
        conn.close()
        return kept, response.status

    with ThreadPoolExecutor(readers) as pool:
        results = list(pool.map(reader, range(readers)))
    assert all(status == 200 for _, status in results)
    assert [kept for kept, _ in results] == [10] * readers


def test_idle_new_connections_do_not_stop_the_server(s3_server):
    """Clients open connections they leave idle (an HTTP pool racing a new connection against one about to
    be free). 48 such connections, more than the steps' readers open at once (2 workers x 16 GETs in
    flight, plus the JVM's and boto's pools): a request on another connection is still answered at once.
    With 8 server threads it waited 9.5 s, each thread held by an idle connection until its timeout."""
    import socket
    import urllib.request
    from urllib.parse import urlsplit

    from counting_s3 import COUNTS_PATH

    where = urlsplit(ENDPOINT)
    idle = [socket.create_connection((where.hostname, where.port), timeout=10) for _ in range(48)]
    try:
        time.sleep(0.5)  # the server has accepted them and handed each to a thread
        started = time.monotonic()
        with urllib.request.urlopen(f"{ENDPOINT}{COUNTS_PATH}", timeout=30) as response:
            assert response.status == 200
        assert time.monotonic() - started < 2.0
    finally:
        for s in idle:
            s.close()


# --- plans, step arguments and XCom against a large synthetic history (no Spark) --------------------
@pytest.fixture(scope="module")
def big_history(airflow_db, s3_server):
    fresh_bucket()
    history = seed_history(4000, incoming=False)
    fresh = new_batches(1000)
    return history, fresh


def _one_run(params_conf: dict[str, Any], run_id: str, before_commit=None) -> dict[str, Any]:
    """The planning tasks of one run, as the DAG calls them, and every XCom value they return (the
    validate/commit/summarize ones from results shaped as the validate task writes them), and the S3
    requests of its commit. `before_commit` runs between the plan and the commit."""
    from datetime import timedelta

    from fruits import commit as commit_mod
    from fruits import emr
    from fruits import plan as planning
    from fruits.catalog import Catalog
    from fruits.config import settings
    from fruits.layout import Layout

    s = settings()
    catalog = Catalog(s3_hook(), Layout(BUCKET))
    params = planning.parse_params(params_conf, s)
    planning.preflight(catalog, params)
    found = planning.find_batches(catalog, params, run_id)
    assert found is not None
    claimed = planning.claim_batches(catalog, found, run_id, timedelta(hours=1))
    plan = planning.build_plan(
        catalog, params, planning.claimed_batches(catalog, claimed), run_id, s, found=found
    )
    prepared = emr.prepare_cluster(catalog, plan, s)
    steps = prepared["steps"]
    expected = catalog.read_run_file(plan["expected_key"])
    results = {
        b: {"batch_id": b, "files": n, "embedded": n, "rejected": 0, "features": n, "labels": {"Apple": n}}
        for b, n in expected.items()
    }
    meta = {"version": plan["pca"]["version"], "k": 64, "explained_variance_at_k": 0.9}
    # What validate.validate_run writes and returns once every check passed (its checks are
    # tests/test_validate.py's): the per-batch results in a run file, the totals in XCom.
    key = catalog.layout.run_file(plan["run_id"], "validation.json")
    catalog.write_run_file(key, {"ok": True, "batches": results})
    validated = {
        "batches": plan["new_batches"],
        "batches_validated": len(results),
        **{n: sum(r[n] for r in results.values()) for n in ("embedded", "rejected", "features")},
        "images": sum(r["files"] for r in results.values()),
        "problems": 0,
        "key": key,
        "pca": meta,
    }
    if before_commit:
        before_commit()
    s3_requests(reset=True)
    committed = commit_mod.commit(catalog, plan, validated)
    commit_requests = s3_requests()["s3"]
    summary = commit_mod.summarize(plan, validated, committed, 1.0)
    planning.release_claims(catalog, claimed, run_id)
    xcoms = {
        "check_params": {"started": datetime.now(UTC).isoformat()},
        "find_new_batches": found,
        "claim_batches": claimed,
        "plan_run": plan,
        "emr.stage_artifacts": prepared,
        **{f"emr.stage_artifacts.{k}": v for k, v in prepared.items()},
        "emr.add_steps": ["s-0123456789ABCDEFGHIJKLMNOPQ"] * 2,
        "validate": validated,
        "commit": committed,
        "summarize": summary,
    }
    return {
        "plan": plan,
        "steps": steps,
        "xcoms": xcoms,
        "catalog": catalog,
        "expected": expected,
        "commit_requests": commit_requests,
    }


@pytest.fixture(autouse=True)
def _emr_subnet(monkeypatch):
    """compute=emr requires a subnet (plan.parse_params): the plans here are built, never launched."""
    monkeypatch.setenv("FRUITS_EMR_SUBNET_ID", "subnet-0123456789abcdef0")


def test_1000_new_batches_and_a_refit_over_5000_keep_xcom_and_step_args_small(big_history):
    history, fresh = big_history
    run = _one_run({"compute": "emr", "engine": "tf", "max_images_per_run": 0}, "manual__1000-new")
    catalog, plan = run["catalog"], run["plan"]
    assert plan["new_batches"] == 1000 and plan["pca"]["version"] == HISTORY_VERSION
    sizes = {task: xcom_bytes(v) for task, v in run["xcoms"].items()}
    assert max(sizes.values()) <= XCOM_LIMIT, sizes
    chars = [step_chars(st) for st in run["steps"]]
    assert max(chars) <= STEP_ARGS_LIMIT, chars
    args = " ".join(a for st in run["steps"] for a in st["HadoopJarStep"]["Args"])
    assert not any(b in args for b in fresh[:50] + history[:50])
    # The batch lists travel as files: the PCA step's, the manifest, the expected counts.
    pca_file = "--batches-file"
    pca_args = run["steps"][1]["HadoopJarStep"]["Args"]
    assert pca_args[pca_args.index(pca_file) + 1] == f"s3://{BUCKET}/runs/manual__1000-new/pca_batches.json"
    assert catalog.read_run_file(plan["keys"]["pca_batches.json"]) == {"fit": [], "transform": sorted(fresh)}
    assert run["expected"] == {b: 1 for b in fresh}
    manifest = catalog.hook.read_key(plan["keys"]["inputs.jsonl"], BUCKET).splitlines()
    assert sorted(json.loads(line)["batch_id"] for line in manifest) == sorted(fresh)
    assert len(list_keys("ledger/batches/")) == 5000 and not list_keys("ledger/claims/")
    print(f"1,000 new batches: largest XCom {max(sizes.values())} bytes, longest step {max(chars)} chars")

    # A refit over all 5,000 processed batches (and one new one).
    (extra,) = new_batches(1, photos=3, prefix="late-upload")
    edited = f"ledger/batches/{history[5]}.json"

    def edit_a_record_after_the_plan() -> None:  # another hand, between the plan's read and the commit
        s3_hook().load_bytes(
            json.dumps({**read_json(edited), "note": "edited after the plan"}).encode(),
            edited,
            BUCKET,
            replace=True,
        )

    refit = _one_run(
        {"compute": "emr", "engine": "tf", "refit": True}, "manual__refit", edit_a_record_after_the_plan
    )
    plan = refit["plan"]
    assert plan["pca"]["fit"] and plan["pca"]["transform_batches"] == 5001
    sizes = {task: xcom_bytes(v) for task, v in refit["xcoms"].items()}
    assert max(sizes.values()) <= XCOM_LIMIT, sizes
    chars = [step_chars(st) for st in refit["steps"]]
    assert max(chars) <= STEP_ARGS_LIMIT
    print(
        f"refit over 5,001 batches: largest XCom {max(sizes.values())} bytes, longest step {max(chars)} chars"
    )
    lists = refit["catalog"].read_run_file(plan["keys"]["pca_batches.json"])
    assert lists["fit"] == lists["transform"] == sorted([*history, *fresh, extra])
    assert refit["expected"][extra] == 3 and refit["expected"][history[0]] == 40
    assert len(refit["expected"]) == 5001
    assert plan["sizing"]["transform_rows"] == 4000 * 40 + 1000 + 3
    # The commit rewrites 5,001 records from the plan's saved copies: the ledger's listing (one LIST per
    # 1,000 records) tells it which changed since, and it reads only that one again.
    reads = refit["commit_requests"]
    assert reads.get("GetObject", 0) <= 5 and reads.get("ListObjectsV2", 0) <= 6, reads
    assert reads.get("PutObject", 0) >= 5001, reads
    assert read_json(edited)["note"] == "edited after the plan"
    print(f"refit's commit over 5,001 records: {reads}")
    record = read_json(f"ledger/batches/{history[7]}.json")
    assert record["pca_version"] == plan["pca"]["version"] and record["run_id"] == "scheduled__2024"


# --- sizing and the cost guard (no Spark) -------------------------------------------------------------
def test_cluster_is_sized_to_the_run_and_bounded(monkeypatch):
    from fruits.config import instance_types, settings
    from fruits.plan import size_cluster

    monkeypatch.setenv("FRUITS_EMR_MAX_CORE_NODES", "8")
    s = settings()
    per_node_30min = 70 * 4 * 1800  # photos/s per vCPU x 4 vCPUs (m5.xlarge) x the target embed time
    small, mid, huge = (size_cluster(n, n, False, s) for n in (200, 3 * per_node_30min, 10**8))
    assert (small["core_nodes"], mid["core_nodes"], huge["core_nodes"]) == (2, 3, 8)
    assert huge["core_nodes_wanted"] > 8
    price = instance_types()["m5.xlarge"]
    hourly = 4 * (price.ec2_usd_per_hour + price.emr_usd_per_hour)  # 1 primary + 3 core
    assert mid["usd_per_hour"] == pytest.approx(hourly)
    assert mid["expected_s"]["embed"] == pytest.approx(1800, rel=1e-6)
    assert mid["expected_cost_usd"] == pytest.approx(mid["expected_s"]["total"] / 3600 * hourly, abs=0.01)
    fit = size_cluster(200, 200, True, s)
    assert fit["expected_s"]["pca"] > small["expected_s"]["pca"]


def test_managed_scaling_is_bounded_by_the_sized_count(monkeypatch):
    from fruits.config import settings
    from fruits.emr import job_flow_request

    monkeypatch.setenv("FRUITS_EMR_MANAGED_SCALING", "true")
    plan = {"run_id": "r", "new_batches": 3, "sizing": {"core_nodes": 6}}
    staged = {"bootstrap": "s3://b/boot.sh", "requirements": "s3://b/req.txt"}
    req = job_flow_request(plan, staged, settings())
    core = next(g for g in req["Instances"]["InstanceGroups"] if g["InstanceRole"] == "CORE")
    assert core["InstanceCount"] == 6
    limits = req["ManagedScalingPolicy"]["ComputeLimits"]
    assert (limits["MinimumCapacityUnits"], limits["MaximumCapacityUnits"]) == (2, 6)


# --- whole DAG runs ------------------------------------------------------------------------------------
def test_noop_run_with_hundreds_of_batches_behind_it_stays_cheap(airflow_db, s3_server):
    """Nothing new, 400 processed batches: the whole DAG run's S3 requests, counted by the server."""
    fresh_bucket()
    seed_history(400)
    before = set(list_keys(""))
    s3_requests(reset=True)
    dagrun = run_dag()
    counts = s3_requests()
    assert str(dagrun.state).endswith("success")
    assert task_states(dagrun)["claim_batches"] == "skipped"
    print(f"no-op run, 400 batches behind it: {counts['total']} S3 requests {counts['s3']}")
    assert counts["total"] <= 30, counts
    # Nothing is read per past batch: the records' key names say what is done.
    assert counts["s3"].get("GetObject", 0) <= 4 and counts["s3"].get("HeadObject", 0) <= 2, counts
    assert set(list_keys("")) == before  # and nothing is written


def test_cost_guard_refuses_before_creating_anything(airflow_db, s3_server, monkeypatch):
    from fruits.config import instance_types, settings
    from fruits.plan import size_cluster
    from test_emr import captured_log

    fresh_bucket()
    # Versioned, so that the claim the run took and released can be read back: its lease must be the
    # FRUITS_CLAIM_LEASE_S the DAG's claim_batches was given.
    client = s3_hook().get_conn()
    client.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    monkeypatch.setenv("FRUITS_CLAIM_LEASE_S", "4321")
    upload_sample("costly", sample_files("Training", labels=2, per_label=2))
    # Worked out here from the settings and the price table, not by the plan's own function: 4 photos on
    # the minimum of 2 core nodes + 1 primary (m5.xlarge, 4 vCPUs), with a PCA fit (first model).
    s, price = settings(), instance_types()["m5.xlarge"]
    seconds = s.emr_startup_s + 4 / (s.emr_photos_per_s_per_vcpu * 8) + s.emr_pca_fit_s
    seconds += 4 / (s.emr_pca_rows_per_s_per_vcpu * 8)
    expected = round(seconds / 3600 * 3 * (price.ec2_usd_per_hour + price.emr_usd_per_hour), 2)
    assert expected == size_cluster(4, 4, True, s)["expected_cost_usd"] > 0.01
    with captured_log() as logged:
        dagrun = run_dag({"compute": "emr", "max_cost_usd": 0.01})
    states = task_states(dagrun)
    assert str(dagrun.state).endswith("failed")
    assert states["plan_run"] == "failed" and states["claim_batches"] == "success"
    assert states.get("emr.stage_artifacts") != "success" and states.get("emr.create_cluster") != "success"
    text = "\n".join(logged)
    assert f"estimated at {expected:.2f} USD, above max_cost_usd=0.01" in text
    assert "No cluster was created" in text
    emr = boto3.client(
        "emr",
        endpoint_url=ENDPOINT,
        region_name="eu-west-3",
        aws_access_key_id="t",
        aws_secret_access_key="t",
    )
    assert emr.list_clusters()["Clusters"] == []
    assert not list_keys("ledger/claims/") and not list_keys("ledger/batches/")
    assert not list_keys("artifacts/jobs/")  # nothing staged for a cluster either
    versions = client.list_object_versions(Bucket=BUCKET, Prefix="ledger/claims/costly.json")
    assert len(versions["Versions"]) == 1 and len(versions["DeleteMarkers"]) == 1  # taken, released
    claim = json.loads(
        client.get_object(
            Bucket=BUCKET, Key="ledger/claims/costly.json", VersionId=versions["Versions"][0]["VersionId"]
        )["Body"].read()
    )
    leased = datetime.fromisoformat(claim["expires_at"]) - datetime.fromisoformat(claim["claimed_at"])
    assert claim["run_id"] == dagrun.run_id and abs(leased - timedelta(seconds=4321)) < timedelta(seconds=1)
    # The message's way out, followed literally: the one batch alone is above the limit, so only the
    # named max_cost_usd can help, and with it the same batches get past the guard (the plan, as plan_run
    # calls it: a real cluster needs the EMR harness of test_emr).
    assert "a lower max_images_per_run cannot help" in text
    advised = re.search(r"Set max_cost_usd=([0-9.]+) or more", text)
    assert advised and float(advised.group(1)) == expected
    plan = plan_as_plan_run({"compute": "emr", "max_cost_usd": float(advised.group(1))})
    assert plan["sizing"]["expected_cost_usd"] == expected


def test_cost_guard_names_the_max_images_per_run_that_fits_and_it_does(airflow_db, s3_server, monkeypatch):
    """Two batches whose photos (at a slow enough rate) cost more together than the limit, the oldest
    alone less: the refusal names max_images_per_run = the oldest's photos; set, the run takes only that
    batch and gets past the guard; the other waits."""
    from fruits.config import settings
    from fruits.plan import CostLimitExceeded, size_cluster

    monkeypatch.setenv("FRUITS_EMR_PHOTOS_PER_S_PER_VCPU", "0.001")  # photos, not startup, make the cost
    fresh_bucket()
    upload_sample("costly-a", sample_files("Training", labels=2, per_label=2))
    upload_sample("costly-b", sample_files("Training", labels=2, per_label=3))
    s = settings()
    alone, both = (size_cluster(n, n, True, s)["expected_cost_usd"] for n in (4, 10))
    assert alone < both
    with pytest.raises(CostLimitExceeded) as refused:
        plan_as_plan_run({"compute": "emr", "max_cost_usd": alone})
    message = str(refused.value)
    assert f"estimated at {both:.2f} USD, above max_cost_usd={alone:.2f}" in message
    assert "set max_images_per_run=4 (param, or FRUITS_MAX_IMAGES_PER_RUN)" in message
    assert "its oldest 1 batch(es), 4 photos" in message
    assert not list_keys("ledger/claims/")  # handed back
    plan = plan_as_plan_run({"compute": "emr", "max_cost_usd": alone, "max_images_per_run": 4})
    assert plan["sizing"]["photos"] == 4 and plan["sizing"]["expected_cost_usd"] <= alone
    assert plan["deferred"]["batches"] == 1 and plan["deferred"]["photos"] == 6


def _xcoms(dagrun) -> dict[str, Any]:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.scalars(XComModel.get_many(run_id=dagrun.run_id, dag_ids=dagrun.dag_id)).all()
        return {f"{r.task_id}.{r.key}": XComModel.deserialize_value(r) for r in rows}


def test_backlog_is_split_over_two_runs_oldest_first(airflow_db, s3_server):
    """max_images_per_run below the backlog: run 1 takes the oldest ready batch, run 2 the rest. The
    batch ids reach the steps only through the run's files."""
    from fruits.layout import safe_run_id

    fresh_bucket()
    older, newer = "zz-uploaded-first", "aa-uploaded-second"  # name order is the reverse of age
    older_files = sample_files("Training", labels=3, per_label=2)
    newer_files = sample_files("Training", labels=2, per_label=2, offset=2)
    upload_sample(older, older_files)
    time.sleep(1.1)  # S3 times have a 1 s resolution
    upload_sample(newer, newer_files)
    cap = {"max_images_per_run": len(older_files)}

    first = run_dag(cap)
    assert str(first.state).endswith("success")
    assert list_keys("ledger/batches/") == [f"ledger/batches/{older}.json"]
    assert read_parquet(f"embeddings/batch_id={older}/").num_rows == len(older_files)
    assert not list_keys(f"embeddings/batch_id={newer}/")
    run1 = f"runs/{safe_run_id(first.run_id)}/"
    summary = read_json(f"{run1}summary.json")
    assert summary["batches"] == 1 and summary["images"] == len(older_files)
    assert summary["deferred"] == {
        "batches": 1,
        "photos": len(newer_files),
        "max_images_per_run": len(older_files),
        "oldest_ready_at": summary["deferred"]["oldest_ready_at"],
    }
    candidates = read_json(f"{run1}candidates.json")
    assert [c["batch_id"] for c in candidates["take"]] == [older]
    assert [c["batch_id"] for c in candidates["deferred"]] == [newer]

    # The batch list travels as files: no batch id in the steps' arguments or in any XCom.
    xcoms = _xcoms(first)
    plan = xcoms["plan_run.return_value"]
    assert not any(older in a or newer in a for a in plan["embed_args"] + plan["pca_args"])
    assert not any(older in json.dumps(v) for v in xcoms.values())
    assert max(xcom_bytes(v) for v in xcoms.values()) < 4096
    assert plan["pca_args"][plan["pca_args"].index("--batches-file") + 1].endswith(f"{run1}pca_batches.json")
    assert read_json(f"{run1}pca_batches.json") == {"fit": [older], "transform": [older]}
    manifest = [
        json.loads(line)
        for line in client().get_object(Bucket=BUCKET, Key=f"{run1}inputs.jsonl")["Body"].read().splitlines()
    ]
    assert {m["batch_id"] for m in manifest} == {older} and len(manifest) == len(older_files)

    second = run_dag(cap)
    assert str(second.state).endswith("success")
    assert list_keys("ledger/batches/") == [f"ledger/batches/{newer}.json", f"ledger/batches/{older}.json"]
    assert read_parquet(f"embeddings/batch_id={newer}/").num_rows == len(newer_files)
    version = read_json("models/pca/CURRENT.json")["version"]
    assert read_json(f"ledger/batches/{newer}.json")["pca_version"] == version  # transformed, not refitted
    assert read_parquet(f"features/pca_version={version}/batch_id={newer}/").num_rows == len(newer_files)
    run2 = f"runs/{safe_run_id(second.run_id)}/"
    assert "deferred" not in read_json(f"{run2}summary.json")
    assert not list_keys("ledger/claims/")


def test_a_damaged_old_record_is_refused_when_a_run_rewrites_it(airflow_db, s3_server):
    """A normal run reads only the newest records; a refit reads every one and refuses a damaged one,
    with the same way out, before any file of the run is written."""
    from datetime import timedelta

    from conftest import s3_hook
    from fruits import plan as planning
    from fruits.catalog import Catalog, CatalogError
    from fruits.config import settings
    from fruits.layout import Layout

    fresh_bucket()
    ids = seed_history(3)
    s3 = client()
    s3.put_object(Bucket=BUCKET, Key=f"ledger/batches/{ids[0]}.json", Body=b'{"files": 40, "embedded": 4')
    time.sleep(1.1)  # S3 times have a 1 s resolution: the damaged record must be the oldest
    for b in ids[1:]:
        key = f"ledger/batches/{b}.json"
        s3.put_object(Bucket=BUCKET, Key=key, Body=s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    (new,) = new_batches(1, photos=2, prefix="after-the-damage")
    s = settings()
    catalog = Catalog(s3_hook(), Layout(BUCKET))

    normal = planning.parse_params({}, s)
    planning.preflight(catalog, normal)  # the two newest records are sound: a normal run goes on
    assert planning.find_batches(catalog, normal, "manual__normal")["batches"] == 1

    refit = planning.parse_params({"refit": True, "engine": "tf"}, s)
    planning.preflight(catalog, refit)
    found = planning.find_batches(catalog, refit, "manual__refit")
    claimed = planning.claim_batches(catalog, found, "manual__refit", timedelta(hours=1))
    with pytest.raises(CatalogError, match=rf"ledger/batches/{ids[0]}.json is not valid JSON.*Restore it"):
        planning.build_plan(catalog, refit, [new], "manual__refit", s)
    assert not list_keys("runs/manual__refit/pca_batches.json")
    planning.release_claims(catalog, claimed, "manual__refit")

    # A forced re-run of the damaged batch, through the real DAG: refused in plan_run, before any step,
    # with its claim handed back by the teardown and the ledger as it was.
    ledger = {k: v for k, v in snapshot("ledger/").items()}
    forced = {"force": True, "batch_ids": [ids[0]]}
    dagrun = run_dag(forced)
    states = task_states(dagrun)
    assert states["plan_run"] == "failed" and states["release_claims"] == "success", states
    assert states["embed"] != "success" and states["pca"] != "success"
    assert snapshot("ledger/") == ledger  # no claim left, no record touched

    # Its advice, literally: delete the record, then the forced run it prints plans the batch again.
    with pytest.raises(CatalogError) as refused:
        planning.build_plan(catalog, planning.parse_params(forced, s), [ids[0]], "manual__probe", s)
    message = str(refused.value)
    assert f"`aws s3 rm s3://{BUCKET}/ledger/batches/{ids[0]}.json`" in message
    assert f"--conf '{json.dumps(forced)}'" in message
    s3.delete_object(Bucket=BUCKET, Key=f"ledger/batches/{ids[0]}.json")
    again = planning.parse_params(forced, s)
    planning.preflight(catalog, again)
    found = planning.find_batches(catalog, again, "manual__again")
    assert found is not None and found["batches"] == 1
    assert read_json("runs/manual__again/candidates.json")["take"][0]["batch_id"] == ids[0]
