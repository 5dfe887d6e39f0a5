"""An AWS account set up as the README's "Deploying to a real AWS account" says, on a moto server.

Every resource the README names is created here with the same calls (IAM roles with bootstrap/iam's
policies filled in, the instance profile named as its role, the EMR cleanup service-linked role, a VPC and
a subnet tagged for AmazonEMRServicePolicy_v2), plus the two principals the tests act as:
- `airflow`: an IAM user holding exactly airflow-policy.json (with `local_compute`, also
  airflow-local-compute-policy.json), whose keys the DAG's tasks use;
- `airflow-local`: a user holding airflow-policy.json and airflow-local-compute-policy.json (compute=local);
- `admin`: an IAM user allowed everything, for the tests' own fixtures (uploading photos, reading back).
The EMR instance role's keys are not made here: the harness assumes the role behind the cluster's own
instance profile, as the nodes do.

`skip` leaves out steps by name, so that `make aws-check`'s test can break the account one step at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import boto3
from iam_eval import fill

ACCOUNT = "123456789012"  # moto's default account
SERVICE_ROLE = "fruits-emr-service-role"
INSTANCE_ROLE = "fruits-emr-instance-role"
EMR_V2 = "arn:aws:iam::aws:policy/service-role/AmazonEMRServicePolicy_v2"
CLEANUP_ROLE = "AWSServiceRoleForEMRCleanup"
TAG = {"Key": "for-use-with-amazon-emr-managed-policies", "Value": "true"}
STEPS = (
    "service-role",
    "service-role-managed-policy",
    "instance-role",
    "instance-role-policy",
    "instance-profile",
    "cleanup-role",
    "vpc-tag",
    "subnet-tag",
)


def _load_only_the_managed_policy_used() -> None:
    """moto attaches an AWS managed policy (AmazonEMRServicePolicy_v2) only when it loads them, and it
    loads all 1,582 (its copy of AWS's documents) into each partition's IAM backend, again at every reset:
    about 2 s of CPU per reset of the in-process servers here. The one the account uses is kept, as moto
    has it; attaching any other managed policy is refused (NoSuchEntity), which is stricter, not laxer.
    Set in moto's in-process config, not the environment, which every child process (the suite's own S3
    server among them) would inherit."""
    import moto.iam.models as iam_models
    from moto.core.config import default_user_config

    default_user_config["iam"]["load_aws_managed_policies"] = True
    every = json.loads(iam_models.aws_managed_policies_data)
    name = EMR_V2.rsplit("/", 1)[1]
    iam_models.aws_managed_policies_data = json.dumps({name: every[name]})


_load_only_the_managed_policy_used()


@dataclass
class Account:
    endpoint: str
    bucket: str
    region: str
    keys: dict[str, tuple[str, str]] = field(default_factory=dict)  # principal -> (access key, secret)
    subnet_id: str = ""
    vpc_id: str = ""

    def client(self, service: str, principal: str = "admin") -> Any:
        key, secret = self.keys[principal]
        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=key,
            aws_secret_access_key=secret,
        )

    def connection(self, principal: str) -> str:
        """An Airflow AWS connection (JSON) for this principal."""
        key, secret = self.keys[principal]
        return json.dumps(
            {
                "conn_type": "aws",
                "login": key,
                "password": secret,
                "extra": {"endpoint_url": self.endpoint, "region_name": self.region},
            }
        )


def _user(iam: Any, name: str, policies: dict[str, dict]) -> tuple[str, str]:
    iam.create_user(UserName=name)
    for policy_name, doc in policies.items():
        iam.put_user_policy(UserName=name, PolicyName=policy_name, PolicyDocument=json.dumps(doc))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def set_up(
    endpoint: str,
    bucket: str,
    region: str = "eu-west-3",
    *,
    skip: frozenset[str] = frozenset(),
    local_compute: bool = False,
    instance_profile_name: str = INSTANCE_ROLE,
) -> Account:
    """Create the account's IAM and network resources (call while moto does not enforce IAM)."""
    unknown = set(skip) - set(STEPS)
    assert not unknown, unknown
    account = Account(endpoint, bucket, region)
    plain = dict(
        endpoint_url=endpoint, region_name=region, aws_access_key_id="test", aws_secret_access_key="test"
    )
    iam, ec2 = boto3.client("iam", **plain), boto3.client("ec2", **plain)

    def doc(name: str) -> dict:
        return fill(name, bucket, ACCOUNT, region)

    account.keys["admin"] = _user(
        iam,
        "fixtures-admin",
        {
            "all": {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
            }
        },
    )
    airflow = {"fruits-airflow": doc("airflow-policy.json")}
    if local_compute:
        airflow["fruits-airflow-local-compute"] = doc("airflow-local-compute-policy.json")
    account.keys["airflow"] = _user(iam, "fruits-airflow", airflow)
    # compute=local on AWS: the same principal plus the local-compute policy (README step 4)
    account.keys["airflow-local"] = _user(
        iam,
        "fruits-airflow-local",
        {
            "fruits-airflow": doc("airflow-policy.json"),
            "fruits-airflow-local-compute": doc("airflow-local-compute-policy.json"),
        },
    )

    if "service-role" not in skip:
        iam.create_role(
            RoleName=SERVICE_ROLE, AssumeRolePolicyDocument=json.dumps(doc("emr-service-role-trust.json"))
        )
        if "service-role-managed-policy" not in skip:
            iam.attach_role_policy(RoleName=SERVICE_ROLE, PolicyArn=EMR_V2)
        iam.put_role_policy(
            RoleName=SERVICE_ROLE,
            PolicyName="pass-instance-role",
            PolicyDocument=json.dumps(doc("emr-service-role-policy.json")),
        )
    if "instance-role" not in skip:
        iam.create_role(
            RoleName=INSTANCE_ROLE, AssumeRolePolicyDocument=json.dumps(doc("emr-instance-role-trust.json"))
        )
        if "instance-role-policy" not in skip:
            iam.put_role_policy(
                RoleName=INSTANCE_ROLE,
                PolicyName="fruits-data",
                PolicyDocument=json.dumps(doc("emr-instance-role-policy.json")),
            )
        if "instance-profile" not in skip:
            iam.create_instance_profile(InstanceProfileName=instance_profile_name)
            iam.add_role_to_instance_profile(
                InstanceProfileName=instance_profile_name, RoleName=INSTANCE_ROLE
            )
    if "cleanup-role" not in skip:
        iam.create_role(
            RoleName=CLEANUP_ROLE,
            Path="/aws-service-role/elasticmapreduce.amazonaws.com/",
            AssumeRolePolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Principal": {"Service": "elasticmapreduce.amazonaws.com"},
                            "Action": "sts:AssumeRole",
                        }
                    ],
                }
            ),
        )
    vpc = ec2.create_vpc(CidrBlock="10.42.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.42.1.0/24")["Subnet"]["SubnetId"]
    if "vpc-tag" not in skip:
        ec2.create_tags(Resources=[vpc], Tags=[TAG])
    if "subnet-tag" not in skip:
        ec2.create_tags(Resources=[subnet], Tags=[TAG])
    account.vpc_id, account.subnet_id = vpc, subnet
    return account
