"""One botocore data loader for all the AWS sessions of a process: the amazon provider's
`[aws] session_factory` (AIRFLOW__AWS__SESSION_FACTORY=fruits.aws_session.SharedLoaderSessionFactory).

Every hook builds its own boto3 session, and a new session parses botocore's JSON again: the S3 model,
its endpoint rules, the partitions, several MB in all. On the 2-core machine that was 0.29 s of CPU per
S3 client against 0.034 s with the loader shared, and about a third of the Airflow process's CPU in a
small DAG run (docs/performance.md, seventh round): each task builds its catalog's hook, and under
`dag.test` (the tests, the bench, the demo) every task of every run shares one process. The loader only
reads botocore's own files and caches what it read, so sharing it changes no request and no credential.

Sessions that assume a role are built by the provider elsewhere and keep a loader each.
"""

from __future__ import annotations

import threading
from typing import Any

import boto3
import botocore.loaders
import botocore.session
from airflow.providers.amazon.aws.hooks.base_aws import BaseSessionFactory

_lock = threading.Lock()
_loader: botocore.loaders.Loader | None = None


def shared_loader(core: botocore.session.Session) -> botocore.loaders.Loader:
    """The process's loader, first taken from a session (so that AWS_DATA_PATH is honoured), then given
    to every later one."""
    global _loader
    with _lock:
        if _loader is None:
            _loader = core.get_component("data_loader")
        else:
            core.register_component("data_loader", _loader)
        return _loader


class SharedLoaderSessionFactory(BaseSessionFactory):
    """The provider's session factory, with the process's botocore loader in each basic session."""

    def _create_basic_session(self, session_kwargs: dict[str, Any]) -> boto3.session.Session:
        core = botocore.session.get_session()
        loader = shared_loader(core)
        session = boto3.session.Session(botocore_session=core, **session_kwargs)
        with _lock:  # boto3 appends its own data folder to the loader at every session: keep one
            loader.search_paths[:] = list(dict.fromkeys(loader.search_paths))
        return session
