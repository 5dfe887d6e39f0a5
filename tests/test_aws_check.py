"""`make aws-check` (scripts/aws_check.py) against an account on a moto server.

Real: the script, its boto3 calls over HTTP, a moto server (in this process) holding an account set up as
the README says (tests/aws_account.py), then broken one step at a time. What the script would see on AWS
and moto does not model (the bucket's location, tags, IAM documents) is modelled by moto here.
"""

from __future__ import annotations

import sys
import urllib.request
from collections.abc import Iterator

import boto3
import pytest
from aws_account import STEPS, set_up
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import aws_check  # noqa: E402

BUCKET = "fruits-check"


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    from counting_s3 import CountingMotoServer  # moto's app behind a keep-alive server (scripts/)

    server = CountingMotoServer().start()
    yield server.endpoint
    server.stop()


@pytest.fixture
def moto(server: str) -> str:
    """An empty account for each test (moto's backends live in this process)."""
    urllib.request.urlopen(urllib.request.Request(f"{server}/moto-api/reset", method="POST"), timeout=120)
    return server


def _bucket(endpoint: str, region: str = "eu-west-3", weights: bool = True) -> None:
    s3 = boto3.client(
        "s3", endpoint_url=endpoint, region_name=region, aws_access_key_id="t", aws_secret_access_key="t"
    )
    s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": region})
    if weights:
        s3.put_object(Bucket=BUCKET, Key="artifacts/models/mobilenet_v2_1.0_224_no_top.h5", Body=b"w")


def _check(endpoint: str, subnet: str, capsys, *extra: str) -> tuple[int, str]:
    code = aws_check.main(
        ["--endpoint-url", endpoint, "--bucket", BUCKET, "--region", "eu-west-3", "--subnet", subnet, *extra]
    )
    return code, capsys.readouterr().out


@pytest.fixture(autouse=True)
def _credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("FRUITS_WEIGHTS_URI", "s3://{bucket}/artifacts/models/mobilenet_v2_1.0_224_no_top.h5")


def test_an_account_set_up_as_the_readme_says_passes(moto: str, capsys) -> None:
    _bucket(moto)
    account = set_up(moto, BUCKET)
    code, out = _check(moto, account.subnet_id, capsys, "--airflow-user", "fruits-airflow")
    assert code == 0, out
    assert "FIX" not in out and "0 to fix" in out
    assert "instance profile fruits-emr-instance-role holds the role of the same name" in out
    assert "Airflow's user fruits-airflow holds airflow-policy.json" in out


EXPECTED = {
    "service-role": "EMR service role fruits-emr-service-role missing",
    "service-role-managed-policy": "attach arn:aws:iam::aws:policy/service-role/AmazonEMRServicePolicy_v2",
    "instance-role": "EMR instance role fruits-emr-instance-role missing",
    "instance-role-policy": "put bootstrap/iam/emr-instance-role-policy.json",
    "instance-profile": "instance profile fruits-emr-instance-role missing",
    "cleanup-role": "service-linked role AWSServiceRoleForEMRCleanup missing",
    "vpc-tag": "tag VPC vpc-",
    "subnet-tag": "tag subnet subnet-",
}


@pytest.mark.parametrize("step", STEPS)
def test_each_missing_step_is_reported_with_its_fix(moto: str, capsys, step: str) -> None:
    _bucket(moto)
    account = set_up(moto, BUCKET, skip=frozenset({step}))
    code, out = _check(moto, account.subnet_id, capsys)
    assert code == 1
    fixes = [line for line in out.splitlines() if line.startswith("FIX")]
    assert any(EXPECTED[step] in line for line in fixes), out
    assert len(fixes) <= 3, fixes  # the step's own problem, not a cascade of unrelated ones


def test_wrong_region_bucket_profile_name_subnet_and_airflow_policy(moto: str, capsys) -> None:
    _bucket(moto, region="eu-west-1", weights=False)
    account = set_up(moto, BUCKET, instance_profile_name="fruits-emr-instance-profile")
    code, out = _check(
        moto,
        account.subnet_id,
        capsys,
        "--instance-profile",
        "fruits-emr-instance-profile",
        "--airflow-user",
        "fruits-airflow",
        "--local-compute",
    )
    assert code == 1
    assert f"bucket {BUCKET} is in eu-west-1, not eu-west-3" in out
    assert "weights s3://fruits-check/artifacts/models/mobilenet_v2_1.0_224_no_top.h5 missing" in out
    assert "instance profile fruits-emr-instance-profile holds ['fruits-emr-instance-role']" in out
    assert "put bootstrap/iam/airflow-local-compute-policy.json" in out
    code, out = _check(moto, "", capsys)
    assert "FRUITS_EMR_SUBNET_ID is empty" in out
    code, out = (
        aws_check.main(
            ["--endpoint-url", moto, "--bucket", BUCKET, "--region", "us-east-1", "--subnet", "x"]
        ),
        capsys.readouterr().out,
    )
    assert "region us-east-1 is outside the EU" in out
