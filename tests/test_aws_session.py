"""The AWS sessions of one process share botocore's data loader (plugins/fruits/aws_session.py).

Real: the amazon provider's S3Hook resolving its session factory from Airflow's configuration (as the
local stack sets it), botocore's loader reading its JSON files, and the suite's S3 server on localhost
answering the clients. The JSON reads are counted by wrapping botocore's own file loader."""

from __future__ import annotations

import boto3
import pytest
from airflow.providers.amazon.aws.hooks import base_aws
from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from botocore.loaders import JSONFileLoader
from fruits.aws_session import SharedLoaderSessionFactory

pytestmark = pytest.mark.fast


def test_the_local_stack_configures_the_shared_loader() -> None:
    assert base_aws.SessionFactory is SharedLoaderSessionFactory


def test_new_hooks_read_no_json_and_still_talk_to_s3(bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str] = []
    real_load = JSONFileLoader.load_file

    def counted(self: JSONFileLoader, file_path: str) -> object:
        reads.append(file_path)
        return real_load(self, file_path)

    monkeypatch.setattr(JSONFileLoader, "load_file", counted)
    S3Hook(aws_conn_id="aws_default").get_conn().list_buckets()  # the process's first S3 client, maybe
    reads.clear()

    hooks = [S3Hook(aws_conn_id="aws_default") for _ in range(5)]
    clients = [h.get_conn() for h in hooks]
    assert reads == [], f"new sessions parsed botocore's JSON again: {reads}"
    loaders = {id(h.get_session()._session.get_component("data_loader")) for h in hooks}
    assert len(loaders) == 1
    paths = hooks[0].get_session()._session.get_component("data_loader").search_paths
    boto3_data = [p for p in paths if p.startswith(boto3.__path__[0])]
    assert len(boto3_data) == 1, paths  # boto3 appends it at every session

    clients[1].put_object(Bucket=bucket, Key="aws_session/probe", Body=b"shared loader")
    assert clients[4].get_object(Bucket=bucket, Key="aws_session/probe")["Body"].read() == b"shared loader"
