"""`make aws-check`: before the first deployment, check an AWS account the way the first run will meet it.

Read-only: it makes only Get/List/Describe/Head calls (no resource is created or changed), with your own
credentials (environment, profile or instance role: boto3's usual chain) and the pipeline's settings
(FRUITS_BUCKET, FRUITS_REGION, FRUITS_EMR_SUBNET_ID, FRUITS_EMR_SERVICE_ROLE, FRUITS_EMR_INSTANCE_PROFILE,
FRUITS_WEIGHTS_URI), and prints what to fix, step by step as the README's deployment section names it.
Exit status 0 when every check passed, 1 otherwise.

    make aws-check AWS_CHECK_ARGS="--airflow-role fruits-airflow"
    python scripts/aws_check.py --bucket B --region eu-west-3 --subnet subnet-... [--airflow-user NAME]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import boto3
from botocore.exceptions import ClientError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))
from fruits.config import EMR_MANAGED_POLICY_TAG, EU_REGIONS, Settings  # noqa: E402

IAM_DIR = REPO / "bootstrap" / "iam"
EMR_V2 = "arn:aws:iam::aws:policy/service-role/AmazonEMRServicePolicy_v2"
CLEANUP_ROLE = "AWSServiceRoleForEMRCleanup"


def filled(name: str, bucket: str, account: str, region: str) -> dict[str, Any]:
    text = (IAM_DIR / name).read_text()
    return json.loads(
        text.replace("FRUITS_BUCKET", bucket).replace("ACCOUNT_ID", account).replace("REGION", region)
    )


def _doc(value: Any) -> dict[str, Any]:
    """IAM returns policy documents URL-encoded (the CLI and boto3 decode some of them)."""
    return value if isinstance(value, dict) else json.loads(unquote(value))


class Check:
    def __init__(self, session: boto3.Session, endpoint_url: str | None) -> None:
        self.session, self.endpoint_url = session, endpoint_url
        self.problems: list[str] = []
        self.passed: list[str] = []

    def client(self, service: str) -> Any:
        return self.session.client(service, endpoint_url=self.endpoint_url)

    def ok(self, what: str) -> None:
        self.passed.append(what)
        print(f"ok   {what}")

    def fix(self, what: str) -> None:
        self.problems.append(what)
        print(f"FIX  {what}")

    def step(self, title: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            self.fix(
                f"{title}: the check itself was refused ({code}): {exc}. Run it with credentials that may read IAM, S3 and EC2"
            )


def _role(iam: Any, name: str) -> dict[str, Any] | None:
    try:
        return iam.get_role(RoleName=name)["Role"]
    except ClientError as exc:
        if exc.response["Error"]["Code"] in ("NoSuchEntity", "NoSuchEntityException"):
            return None
        raise


def _inline_policies(iam: Any, role: str) -> list[dict[str, Any]]:
    names = iam.list_role_policies(RoleName=role)["PolicyNames"]
    return [_doc(iam.get_role_policy(RoleName=role, PolicyName=n)["PolicyDocument"]) for n in names]


def _trusts(role: dict[str, Any], service: str) -> bool:
    doc = _doc(role["AssumeRolePolicyDocument"])
    for st in doc.get("Statement", []):
        principals = (st.get("Principal") or {}).get("Service", [])
        principals = [principals] if isinstance(principals, str) else principals
        if st.get("Effect") == "Allow" and service in principals:
            return True
    return False


def run(args: argparse.Namespace) -> int:
    s = Settings()
    bucket, region = args.bucket or s.bucket, args.region or s.region
    subnet_id = args.subnet if args.subnet is not None else s.emr_subnet_id
    service_role, profile = (
        args.service_role or s.emr_service_role,
        args.instance_profile or s.emr_instance_profile,
    )
    session = boto3.Session(profile_name=args.profile, region_name=region)
    c = Check(session, args.endpoint_url)
    print(f"aws-check: bucket {bucket}, region {region}, subnet {subnet_id or '(none)'} (read-only)")
    account = c.client("sts").get_caller_identity()["Account"]

    # 1. Region
    if region in EU_REGIONS:
        c.ok(f"region {region} is in the EU")
    else:
        c.fix(
            f"region {region} is outside the EU: set FRUITS_REGION to one of {', '.join(sorted(EU_REGIONS))}"
        )

    # 2. Bucket
    def bucket_checks() -> None:
        s3 = c.client("s3")
        try:
            s3.head_bucket(Bucket=bucket)
        except ClientError as exc:
            c.fix(
                f"bucket {bucket} does not exist or is not yours ({exc.response['Error'].get('Code')}): create it in "
                f"{region} (README step 1) or set FRUITS_BUCKET"
            )
            return
        where = s3.get_bucket_location(Bucket=bucket).get("LocationConstraint") or "us-east-1"
        if where == region:
            c.ok(f"bucket {bucket} is in {region}")
        else:
            c.fix(
                f"bucket {bucket} is in {where}, not {region}: use a bucket in {region} or set FRUITS_REGION={where}"
            )
        weights = s.weights_uri.format(bucket=bucket)
        if weights.startswith(f"s3://{bucket}/"):
            key = weights[len(f"s3://{bucket}/") :]
            try:
                s3.head_object(Bucket=bucket, Key=key)
                c.ok(f"weights {weights} present")
            except ClientError:
                c.fix(
                    f"weights {weights} missing: upload mobilenet_v2_1.0_224_no_top.h5 there (README step 1)"
                )

    c.step("bucket", bucket_checks)

    # 3. Roles, instance profile, service-linked role
    def iam_checks() -> None:
        iam = c.client("iam")
        role = _role(iam, service_role)
        if role is None:
            c.fix(f"EMR service role {service_role} missing (README step 2)")
        else:
            c.ok(f"EMR service role {service_role} exists")
            if not _trusts(role, "elasticmapreduce.amazonaws.com"):
                c.fix(f"{service_role}'s trust policy does not let elasticmapreduce.amazonaws.com assume it")
            attached = {
                p["PolicyArn"]
                for p in iam.list_attached_role_policies(RoleName=service_role)["AttachedPolicies"]
            }
            if EMR_V2 in attached:
                c.ok(f"{service_role} has AmazonEMRServicePolicy_v2 attached")
            else:
                c.fix(f"attach {EMR_V2} to {service_role} (README step 2)")
            if filled("emr-service-role-policy.json", bucket, account, region) in _inline_policies(
                iam, service_role
            ):
                c.ok(f"{service_role} holds emr-service-role-policy.json")
            else:
                c.fix(
                    f"put bootstrap/iam/emr-service-role-policy.json (filled in) on {service_role} (README step 2)"
                )
        try:
            roles = [
                r["RoleName"]
                for r in iam.get_instance_profile(InstanceProfileName=profile)["InstanceProfile"]["Roles"]
            ]
        except ClientError:
            roles = None
            c.fix(
                f"instance profile {profile} missing: create it with the same name as its role and add the role "
                "(README step 2)"
            )
        if roles is not None:
            if roles == [profile]:
                c.ok(f"instance profile {profile} holds the role of the same name")
            else:
                c.fix(
                    f"instance profile {profile} holds {roles}: EMR needs one role named as the profile "
                    f"({profile}); set FRUITS_EMR_INSTANCE_PROFILE to the role's name and create the profile so"
                )
        role = _role(iam, profile)
        if role is None:
            c.fix(f"EMR instance role {profile} missing (README step 2)")
        else:
            if not _trusts(role, "ec2.amazonaws.com"):
                c.fix(f"{profile}'s trust policy does not let ec2.amazonaws.com assume it")
            if filled("emr-instance-role-policy.json", bucket, account, region) in _inline_policies(
                iam, profile
            ):
                c.ok(f"{profile} holds emr-instance-role-policy.json for bucket {bucket}")
            else:
                c.fix(
                    f"put bootstrap/iam/emr-instance-role-policy.json (filled in for {bucket}) on {profile}"
                )
        if _role(iam, CLEANUP_ROLE) is None:
            c.fix(
                f"service-linked role {CLEANUP_ROLE} missing: `aws iam create-service-linked-role "
                "--aws-service-name elasticmapreduce.amazonaws.com` once, as an administrator (README step 2)"
            )
        else:
            c.ok(f"service-linked role {CLEANUP_ROLE} exists")
        if args.airflow_user or args.airflow_role:
            wanted = [filled("airflow-policy.json", bucket, account, region)]
            if args.local_compute:
                wanted.append(filled("airflow-local-compute-policy.json", bucket, account, region))
            if args.airflow_user:
                names = iam.list_user_policies(UserName=args.airflow_user)["PolicyNames"]
                have = [
                    _doc(iam.get_user_policy(UserName=args.airflow_user, PolicyName=n)["PolicyDocument"])
                    for n in names
                ]
                who = f"user {args.airflow_user}"
            else:
                have, who = _inline_policies(iam, args.airflow_role), f"role {args.airflow_role}"
            for doc, name in zip(
                wanted, ["airflow-policy.json", "airflow-local-compute-policy.json"], strict=False
            ):
                if doc in have:
                    c.ok(f"Airflow's {who} holds {name}")
                else:
                    c.fix(f"put bootstrap/iam/{name} (filled in) on Airflow's {who} (README step 3)")

    c.step("IAM", iam_checks)

    # 4. Network
    def network_checks() -> None:
        key, value = EMR_MANAGED_POLICY_TAG
        if not subnet_id:
            c.fix(
                "FRUITS_EMR_SUBNET_ID is empty: give the private subnet the cluster runs in (README step 2)"
            )
            return
        ec2 = c.client("ec2")
        try:
            subnet = ec2.describe_subnets(SubnetIds=[subnet_id])["Subnets"][0]
        except ClientError:
            c.fix(f"subnet {subnet_id} not found in {region}")
            return
        vpc = ec2.describe_vpcs(VpcIds=[subnet["VpcId"]])["Vpcs"][0]
        for kind, resource, rid in (("subnet", subnet, subnet_id), ("VPC", vpc, subnet["VpcId"])):
            tags = {t["Key"]: t["Value"] for t in resource.get("Tags") or []}
            if tags.get(key) == value:
                c.ok(f"{kind} {rid} tagged {key}={value}")
            else:
                c.fix(
                    f"tag {kind} {rid} with {key}={value}: `aws ec2 create-tags --resources {rid} --tags Key={key},Value={value}`"
                )

    c.step("network", network_checks)

    print(f"aws-check: {len(c.passed)} ok, {len(c.problems)} to fix")
    return 1 if c.problems else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bucket")
    p.add_argument("--region")
    p.add_argument("--subnet")
    p.add_argument("--service-role")
    p.add_argument("--instance-profile")
    p.add_argument("--airflow-user", help="IAM user Airflow runs as (checks its inline policies)")
    p.add_argument("--airflow-role", help="IAM role Airflow runs as (checks its inline policies)")
    p.add_argument(
        "--local-compute", action="store_true", help="also expect airflow-local-compute-policy.json"
    )
    p.add_argument("--profile", help="AWS CLI profile to use")
    p.add_argument("--endpoint-url", help=argparse.SUPPRESS)  # the tests' moto server
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
