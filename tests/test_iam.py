"""The IAM policies of bootstrap/iam, evaluated over the JSON for every request the code makes.

Real: the policy files, filled in as the README does; the S3 keys come from plugins/fruits/layout.py (the
one place that builds them), the role and profile names from config.py. Evaluated by tests/iam_eval.py
(AWS's rules: explicit Deny wins, conditions included), because moto's evaluator treats every condition
of an identity policy as met (iam:PassedToService, aws:RequestTag, aws:ResourceTag). Linted by parliament.
The end-to-end run with IAM enforced in moto is tests/test_emr.py.
"""

from __future__ import annotations

import json
import warnings

import pytest
from iam_eval import IAM_DIR, decide, fill

BUCKET, ACCOUNT, REGION = "fruits-test", "123456789012", "eu-west-3"
pytestmark = pytest.mark.fast  # no Spark, no DAG run (`make test-fast`)

RUN = "runs/manual__2026-12-02T07_00_00_00_00/"
FRUITS_CLUSTER = f"arn:aws:elasticmapreduce:{REGION}:{ACCOUNT}:cluster/j-FRUITS"
FOREIGN_CLUSTER = f"arn:aws:elasticmapreduce:{REGION}:{ACCOUNT}:cluster/j-OTHER"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/"


def _policies(*names: str) -> list[dict]:
    return [fill(n, BUCKET, ACCOUNT, REGION) for n in names]


AIRFLOW = _policies("airflow-policy.json")
AIRFLOW_LOCAL = _policies("airflow-policy.json", "airflow-local-compute-policy.json")
INSTANCE = _policies("emr-instance-role-policy.json")
SERVICE = _policies("emr-service-role-policy.json")


def obj(key: str) -> str:
    return f"arn:aws:s3:::{BUCKET}/{key}"


def _keys():
    """The keys each principal touches, from the layout itself."""
    from fruits.config import settings
    from fruits.layout import Layout

    lay = Layout(BUCKET)
    v = "pca-20261202T070000Z-abc123"
    step_outputs = {
        "embedding part": lay.partition(lay.embeddings, "b1") + "part-0.parquet",
        "reject part": lay.partition(lay.rejects, "b1") + "part-0.parquet",
        "feature part": lay.partition(lay.features_prefix(v), "b1") + "part-0.parquet",
        "pca model": lay.pca_model_prefix(v) + "spark_model/metadata/part-00000",
        "pca metadata": lay.pca_model_prefix(v) + "metadata.json",
        # the samples (spark_jobs/fruits_jobs/samples.py): a refit's fit and the run report read them
        "fit sample delta": "samples/fit/run=R/part-0.parquet",
        "report sample delta": f"samples/report/pca_version={v}/run=R/part-0.parquet",
    }
    step_files = ("embed_validation.json", "pca_validation.json", "sample_fit.json", "sample_report.json")
    run_files = {
        n: RUN + n for n in ("inputs.jsonl", "embed.json", "pca.json", "pca_batches.json", *step_files)
    }
    return lay, settings(), step_outputs, run_files


def test_the_instance_role_reads_and_writes_what_the_steps_do() -> None:
    lay, _, outputs, run_files = _keys()
    for name, key in run_files.items():  # finding 1: runs/RUN/inputs.jsonl is the embed step's input
        assert decide(INSTANCE, "s3:GetObject", obj(key)) == "allow", name
    for name, key in {**outputs, **run_files, "log": lay.emr_step_log("j-1", "s-1")}.items():
        assert decide(INSTANCE, "s3:PutObject", obj(key)) == "allow", name
    for key in (lay.staged_key("jobs", "a" * 12, "embed.py"), lay.batch_prefix("b1") + "Apple/1.jpg"):
        assert decide(INSTANCE, "s3:GetObject", obj(key)) == "allow", key
    # what only Airflow writes, after validation, and the inputs: explicitly denied to the cluster
    only_airflow = (lay.pca_current, lay.ledger_key("b1"), lay.claim_key("b1"), "samples/LATEST.json")
    for key in (*only_airflow, lay.batch_prefix("b1") + "x.jpg"):
        assert decide(INSTANCE, "s3:PutObject", obj(key)) == "deny", key
    assert decide(INSTANCE, "s3:PutObject", obj(lay.report_key("r"))) == "implicit-deny"
    # listing only where pipeline data lives
    for prefix in ("runs/", "models/", "models/pca/", "embeddings/batch_id=b1/", "incoming/b1/"):
        assert decide(INSTANCE, "s3:ListBucket", f"arn:aws:s3:::{BUCKET}", {"s3:prefix": prefix}) == "allow"
    assert decide(INSTANCE, "s3:ListBucket", f"arn:aws:s3:::{BUCKET}", {"s3:prefix": "ledger/"}) != "allow"


def test_emrfs_folder_markers_of_every_folder_the_steps_create_are_allowed() -> None:
    """Finding 7: EMRFS may write DIR_$folder$ for each folder it creates; explicit in the policy."""
    lay, _, outputs, run_files = _keys()
    folders = set()
    for key in [*outputs.values(), *run_files.values()]:
        parts = key.split("/")[:-1]
        folders |= {"/".join(parts[: i + 1]) for i in range(len(parts))}
    assert {"models", "models/pca", "embeddings", "runs"} <= folders
    for folder in sorted(folders):
        assert decide(INSTANCE, "s3:PutObject", obj(f"{folder}_$folder$")) == "allow", folder
        # A Hadoop file system creating a folder first looks at each parent (HEAD folder, folder/, marker):
        # a 403 there fails the step (seen with s3a in tests/test_emr.py before this was allowed).
        for probe in (folder, f"{folder}/", f"{folder}_$folder$"):
            assert decide(INSTANCE, "s3:GetObject", obj(probe)) == "allow", probe
    assert decide(INSTANCE, "s3:PutObject", obj("ledger_$folder$")) == "implicit-deny"


def test_airflow_writes_bookkeeping_but_never_step_outputs_or_inputs() -> None:
    lay, _, outputs, run_files = _keys()
    for key in (
        lay.ledger_key("b1"),
        lay.claim_key("b1"),
        lay.pca_current,
        lay.report_key("r"),
        lay.staged_key("bootstrap", "b" * 12, "install_python_deps.sh"),
        lay.onnx_model_key("c" * 64),
        RUN + "summary.json",
        RUN + "inputs.jsonl",
        RUN + "validation.json",
        "samples/LATEST.json",  # moved by the validate task, after the run's checks passed
    ):
        assert decide(AIRFLOW, "s3:PutObject", obj(key)) == "allow", key
    for key in outputs.values():
        assert decide(AIRFLOW, "s3:PutObject", obj(key)) == "implicit-deny", key
        assert decide(AIRFLOW, "s3:GetObject", obj(key)) == "allow", key
    assert decide(AIRFLOW, "s3:PutObject", obj("incoming/b1/x.jpg")) == "implicit-deny"


def test_compute_local_adds_the_step_outputs_and_nothing_else() -> None:
    """compute=local on AWS: the worker's Spark writes the outputs itself, with Airflow's principal."""
    _, _, outputs, _ = _keys()
    for key in outputs.values():
        assert decide(AIRFLOW_LOCAL, "s3:PutObject", obj(key)) == "allow", key
    assert decide(AIRFLOW_LOCAL, "s3:PutObject", obj("incoming/b1/x.jpg")) == "deny"
    assert decide(AIRFLOW_LOCAL, "elasticmapreduce:AddTags", FRUITS_CLUSTER) == "deny"


def test_airflow_creates_drives_and_ends_only_fruits_clusters() -> None:
    fruits, other = {"aws:ResourceTag/project": "fruits"}, {"aws:ResourceTag/project": "other"}
    assert (
        decide(AIRFLOW, "elasticmapreduce:RunJobFlow", "*", {"aws:RequestTag/project": "fruits"}) == "allow"
    )
    assert decide(AIRFLOW, "elasticmapreduce:RunJobFlow", "*", {}) == "implicit-deny"
    for action in (
        "AddJobFlowSteps",
        "DescribeCluster",
        "DescribeStep",
        "ListSteps",
        "ListInstanceGroups",
        "TerminateJobFlows",
        "GetAutoTerminationPolicy",  # finding 6
        "PutAutoTerminationPolicy",
    ):
        assert decide(AIRFLOW, f"elasticmapreduce:{action}", FRUITS_CLUSTER, fruits) == "allow", action
        assert decide(AIRFLOW, f"elasticmapreduce:{action}", FOREIGN_CLUSTER, other) != "allow", action
    # finding 6: RunJobFlow with an AutoTerminationPolicy authorizes PutAutoTerminationPolicy on the new cluster
    assert decide(AIRFLOW, "elasticmapreduce:PutAutoTerminationPolicy", FRUITS_CLUSTER, {}) == "allow"


def test_airflow_cannot_tag_its_way_into_other_clusters() -> None:
    """Finding 11: no AddTags at all (the tags come with RunJobFlow), so no cluster becomes project=fruits."""
    for cluster, ctx in ((FOREIGN_CLUSTER, {"aws:ResourceTag/project": "other"}), (FRUITS_CLUSTER, {})):
        request = {**ctx, "aws:RequestTag/project": "fruits", "aws:TagKeys": ["project"]}
        assert decide(AIRFLOW, "elasticmapreduce:AddTags", cluster, request) == "deny"
        assert decide(AIRFLOW, "elasticmapreduce:RemoveTags", cluster, ctx) == "deny"


def test_pass_role_each_role_to_its_own_service_only() -> None:
    """Finding 2: the instance role goes to EC2, the service role to EMR (as AWS's EMR policies do)."""
    from fruits.config import Settings

    s = Settings()
    instance, service = ROLE + s.emr_instance_profile, ROLE + s.emr_service_role
    ec2, emr = (
        {"iam:PassedToService": "ec2.amazonaws.com"},
        {"iam:PassedToService": "elasticmapreduce.amazonaws.com"},
    )
    assert decide(AIRFLOW, "iam:PassRole", instance, ec2) == "allow"
    assert decide(AIRFLOW, "iam:PassRole", service, emr) == "allow"
    assert decide(AIRFLOW, "iam:PassRole", instance, emr) == "implicit-deny"
    assert decide(AIRFLOW, "iam:PassRole", service, ec2) == "implicit-deny"
    assert decide(AIRFLOW, "iam:PassRole", ROLE + "admin", ec2) == "implicit-deny"
    assert decide(SERVICE, "iam:PassRole", instance, ec2) == "allow"  # EMR hands it to the instances
    # The service-linked cleanup role is created by the administrator (README), never by the pipeline.
    assert decide(AIRFLOW, "iam:CreateServiceLinkedRole", "*", {}) == "implicit-deny"


def test_instance_profile_is_named_as_its_role() -> None:
    """Finding 3: EMR refuses an instance profile whose name differs from its role's."""
    from fruits.config import Settings

    s = Settings()
    assert s.emr_instance_profile == "fruits-emr-instance-role"
    passed = [r for st in AIRFLOW[0]["Statement"] if st["Action"] == "iam:PassRole" for r in [st["Resource"]]]
    assert ROLE + s.emr_instance_profile in passed


@pytest.mark.parametrize(
    "name",
    [
        "airflow-policy.json",
        "airflow-local-compute-policy.json",
        "emr-instance-role-policy.json",
        "emr-service-role-policy.json",
    ],
)
def test_policies_pass_parliament(name: str) -> None:
    """Unknown actions, conditions that do not apply to an action, malformed statements."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # parliament imports pkg_resources
        import parliament

    doc = fill(name, BUCKET, ACCOUNT, REGION)
    findings = parliament.analyze_policy_string(json.dumps(doc), include_community_auditors=False).findings
    assert not findings, [(f.issue, f.detail) for f in findings]


def test_iam_policies_are_scoped_to_the_bucket() -> None:
    """Every S3 right is on the pipeline's bucket only (not another bucket, not one whose name merely starts
    like it), and within it each principal still reaches what it needs: the instance role its own input
    list, Airflow its bookkeeping. A policy narrowed too far fails here as surely as one too wide."""
    lay, _, outputs, run_files = _keys()
    others = ("other-bucket", f"{BUCKET}-copy", f"{BUCKET}x")
    for name, policies in (("airflow", AIRFLOW_LOCAL), ("instance", INSTANCE), ("service", SERVICE)):
        for other in others:
            for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
                for key in ("incoming/b1/Apple/1.jpg", run_files["inputs.jsonl"], "ledger/batches/b1.json"):
                    verdict = decide(policies, action, f"arn:aws:s3:::{other}/{key}")
                    assert verdict != "allow", (name, action, other, key)
            assert decide(policies, "s3:ListBucket", f"arn:aws:s3:::{other}", {"s3:prefix": ""}) != "allow"
    # The instance role reads its run's input list and batch lists, and the photos they name.
    for key in (run_files["inputs.jsonl"], run_files["pca_batches.json"], lay.batch_prefix("b1") + "A/1.jpg"):
        assert decide(INSTANCE, "s3:GetObject", obj(key)) == "allow", key
    assert (
        decide(INSTANCE, "s3:ListBucket", f"arn:aws:s3:::{BUCKET}", {"s3:prefix": "incoming/b1/"}) == "allow"
    )
    # Airflow reads and writes its bookkeeping, and lists the batches.
    for key in (lay.ledger_key("b1"), lay.claim_key("b1"), lay.pca_current, run_files["inputs.jsonl"]):
        assert decide(AIRFLOW, "s3:GetObject", obj(key)) == "allow", key
        assert decide(AIRFLOW, "s3:PutObject", obj(key)) == "allow", key
    assert decide(AIRFLOW, "s3:ListBucket", f"arn:aws:s3:::{BUCKET}", {"s3:prefix": "incoming/"}) == "allow"
    text = "\n".join(p.read_text() for p in IAM_DIR.glob("*.json"))
    assert "AKIA" not in text and "aws_secret" not in text.lower()


def test_every_policy_file_is_covered() -> None:
    assert {p.name for p in IAM_DIR.glob("*.json")} == {
        "airflow-policy.json",
        "airflow-local-compute-policy.json",
        "emr-instance-role-policy.json",
        "emr-instance-role-trust.json",
        "emr-service-role-policy.json",
        "emr-service-role-trust.json",
    }
