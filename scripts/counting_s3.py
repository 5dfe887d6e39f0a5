"""A local AWS endpoint (moto) that counts the requests it serves, by S3 API operation.

    python scripts/counting_s3.py -H 127.0.0.1 -p PORT      # like `moto_server -H ... -p ...`

moto's own WSGI app (`DomainDispatcherApplication(create_backend_app)`, what `moto_server` runs) does all
the work; a small middleware in front of it names each request's operation (ListObjectsV2, HeadObject,
GetObject, PutObject, ...) from its method, path, query and headers, the way the S3 REST API defines them,
and counts it. Counted from the server's side, so every client is seen: boto3 in Airflow, s3a in Spark,
obstore in the embed job.

    GET  /_counts   -> {"total": S3 requests, "s3": {operation: n}, "other": {"service:Operation": n}}
    POST /_counts   -> the same, then every count is set to zero

`/_counts` is not an S3 path (bucket names cannot start with `_`); `/moto-api/...` (moto's reset and
dashboard) is served and not counted. Used by tests/conftest.py, scripts/devstack.py and benchmarks.

Conditional writes are made atomic, as S3 makes them: moto checks If-None-Match / If-Match and then
writes, with nothing in between held, so two concurrent `PUT If-None-Match: *` on one key can both
succeed (seen here: 1 round in 40 with 8 writers). S3 lets exactly one win. The middleware serialises
conditional PUTs, so the claims' guarantee (plugins/fruits/catalog.py) is tested against S3's rule, not
moto's leniency (tests/test_claims_race.py).

Served by cheroot (CherryPy's WSGI server: HTTP/1.1 keep-alive, a pool of threads) rather than werkzeug's
development server, which `moto_server` uses: that one closes the connection after every response, so each
request paid a new TCP connection and a name lookup in the client and a new thread in the server (a third of
a boto3 client's busy time on small requests, measured with py-spy; docs/performance.md). waitress was
tried first and hangs on boto3's empty PUTs (`Expect: 100-continue` with `Content-Length: 0`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import signal
import sys
import threading
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

COUNTS_PATH = "/_counts"

# Sub-resources named in the query string: GET/PUT/DELETE + this name is the operation.
_BUCKET_SUBRESOURCES = {
    "acl": "BucketAcl",
    "cors": "BucketCors",
    "encryption": "BucketEncryption",
    "lifecycle": "BucketLifecycleConfiguration",
    "logging": "BucketLogging",
    "notification": "BucketNotificationConfiguration",
    "ownershipControls": "BucketOwnershipControls",
    "policy": "BucketPolicy",
    "publicAccessBlock": "PublicAccessBlock",
    "tagging": "BucketTagging",
    "versioning": "BucketVersioning",
    "website": "BucketWebsite",
}
_OBJECT_SUBRESOURCES = {"acl": "ObjectAcl", "tagging": "ObjectTagging", "retention": "ObjectRetention"}
_VERB = {"GET": "Get", "PUT": "Put", "DELETE": "Delete"}
_SCOPE = re.compile(r"Credential=[^/]+/\d{8}/[^/]+/([^/]+)/aws4_request")


def _service(environ: dict[str, Any], query: dict[str, list[str]]) -> str:
    """The SigV4 credential scope names the service; unsigned and SigV2 requests are S3's."""
    scope = _SCOPE.search(environ.get("HTTP_AUTHORIZATION", ""))
    if scope:
        return scope.group(1)
    credential = (query.get("X-Amz-Credential") or [""])[0].split("/")
    return credential[3] if len(credential) > 3 else "s3"


def _bucket_and_key(environ: dict[str, Any]) -> tuple[str, str]:
    path = environ.get("PATH_INFO", "/")
    host = environ.get("HTTP_HOST", "").split(":")[0]
    if host.endswith(".localhost"):  # virtual-hosted style on a local name: the bucket is in the host
        return host[: -len(".localhost")], path.lstrip("/")
    bucket, _, key = path.lstrip("/").partition("/")
    return bucket, key


def s3_operation(method: str, bucket: str, key: str, query: dict[str, list[str]], copy: bool) -> str:
    """The S3 API operation name of one REST request (path-style)."""
    if not bucket:
        return "ListBuckets" if method == "GET" else f"{method} /"
    if not key:  # bucket-level
        if method == "HEAD":
            return "HeadBucket"
        if method == "POST" and "delete" in query:
            return "DeleteObjects"
        if method == "GET":
            for name, op in (
                ("list-type", "ListObjectsV2"),
                ("versions", "ListObjectVersions"),
                ("uploads", "ListMultipartUploads"),
                ("location", "GetBucketLocation"),
            ):
                if name in query:
                    return op if name != "list-type" or query[name] == ["2"] else "ListObjects"
        for name, suffix in _BUCKET_SUBRESOURCES.items():
            if name in query and method in _VERB:
                return _VERB[method] + suffix
        return {"GET": "ListObjects", "PUT": "CreateBucket", "DELETE": "DeleteBucket"}.get(
            method, f"{method} bucket"
        )
    # object-level
    if method == "HEAD":
        return "HeadObject"
    if "uploadId" in query:
        if method == "PUT":
            return "UploadPartCopy" if copy else "UploadPart"
        return {
            "GET": "ListParts",
            "POST": "CompleteMultipartUpload",
            "DELETE": "AbortMultipartUpload",
        }.get(method, f"{method} upload")
    if method == "POST":
        for name, op in (("uploads", "CreateMultipartUpload"), ("restore", "RestoreObject")):
            if name in query:
                return op
        return "SelectObjectContent" if "select" in query else "POST object"
    if "attributes" in query and method == "GET":
        return "GetObjectAttributes"
    for name, suffix in _OBJECT_SUBRESOURCES.items():
        if name in query and method in _VERB:
            return _VERB[method] + suffix
    if method == "PUT":
        return "CopyObject" if copy else "PutObject"
    return {"GET": "GetObject", "DELETE": "DeleteObject"}.get(method, f"{method} object")


class RequestCounter:
    """WSGI middleware: counts each request by operation, answers /_counts, passes the rest on."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.conditional_writes = threading.Lock()
        self.s3: Counter[str] = Counter()
        self.other: Counter[str] = Counter()

    def snapshot(self, reset: bool = False) -> dict[str, Any]:
        with self.lock:
            out = {"total": sum(self.s3.values()), "s3": dict(self.s3), "other": dict(self.other)}
            if reset:
                self.s3.clear()
                self.other.clear()
        return out

    def classify(self, environ: dict[str, Any]) -> tuple[str, str]:
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        method = environ.get("REQUEST_METHOD", "GET")
        service = _service(environ, query)
        if service != "s3":
            target = environ.get("HTTP_X_AMZ_TARGET", "")  # JSON protocols: "ElasticMapReduce.RunJobFlow"
            action = target.rsplit(".", 1)[-1] if target else (query.get("Action") or [method])[0]
            return "other", f"{service}:{action}"
        bucket, key = _bucket_and_key(environ)
        copy = "HTTP_X_AMZ_COPY_SOURCE" in environ
        return "s3", s3_operation(method, bucket, key, query, copy)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        # moto routes and checks SigV4 signatures on the path as it arrived, percent-encoded, which it takes
        # from RAW_URI (werkzeug's name); cheroot names it REQUEST_URI.
        environ.setdefault("RAW_URI", environ.get("REQUEST_URI", ""))
        path = environ.get("PATH_INFO", "")
        if path == COUNTS_PATH:
            body = json.dumps(self.snapshot(reset=environ.get("REQUEST_METHOD") == "POST")).encode()
            start_response(
                "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
            )
            return [body]
        if not path.startswith("/moto-api"):
            kind, op = self.classify(environ)
            with self.lock:
                (self.s3 if kind == "s3" else self.other)[op] += 1
        if environ.get("REQUEST_METHOD") == "PUT" and (
            "HTTP_IF_NONE_MATCH" in environ or "HTTP_IF_MATCH" in environ
        ):
            with self.conditional_writes:  # check and write as one step, as S3 does
                return list(self.app(environ, start_response))
        return self.app(environ, start_response)


def counting_app() -> RequestCounter:
    from moto.server import DomainDispatcherApplication, create_backend_app

    dispatcher = DomainDispatcherApplication(create_backend_app)
    # moto names a request's service by listing its own package folder (some 170 isdir calls) and trying
    # every service's URL pattern, twice for each path-style request, under a lock every request takes: a
    # quarter of this server's time on small requests. The answer depends on the host name alone.
    dispatcher.get_backend_for_host = functools.lru_cache(maxsize=256)(dispatcher.get_backend_for_host)  # type: ignore[method-assign]
    return RequestCounter(dispatcher)


# cheroot hands every newly accepted connection to a thread, which waits for its first request up to the
# socket timeout (10 s); only a connection between requests waits without one. Clients open connections
# they then leave idle (an HTTP pool racing a new connection against one about to be free), and with 8
# threads 8 such connections stopped the server for 10 s: both embed workers stalled at a task start,
# once or twice per 5,040 photos. Threads cost nothing while they wait; moto serialises its own work.
THREADS = 64
# cheroot's defaults suit a web site, not Spark's Python workers keeping 16 GETs each in flight
# (fruits_jobs/objects.py): a listen backlog of 5 drops the SYNs of a burst of new connections (the client
# sends them again after a second), and past 10 keep-alive connections it closes each connection after
# its response, so the clients keep reconnecting into that backlog. The embed job on 5,040 photos ran
# with two thirds of the cores idle (27 img/s); docs/performance.md, seventh round.
BACKLOG = 256
KEEP_ALIVE_CONNECTIONS = 256


def make_server(host: str, port: int, app: Any):
    """moto's app behind cheroot, sized for the steps' GETs."""
    from cheroot import wsgi

    server = wsgi.Server((host, port), app, numthreads=THREADS, request_queue_size=BACKLOG)
    server.keep_alive_conn_limit = KEEP_ALIVE_CONNECTIONS
    return server


class CountingMotoServer:
    """In-process (moto's backends shared with the caller, as moto's ThreadedMotoServer), on a free port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = counting_app()
        self.server = make_server(host, port, self.app)
        self.server.prepare()  # binds: the port is known from here on
        self.thread = threading.Thread(target=self.server.serve, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self.server.bind_addr[:2]
        return f"http://{host}:{port}"

    def start(self) -> CountingMotoServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(10)


def read_counts(endpoint: str, reset: bool = False) -> dict[str, Any]:
    """The server's counts over HTTP (POST also resets them)."""
    req = urllib.request.Request(f"{endpoint.rstrip('/')}{COUNTS_PATH}", method="POST" if reset else "GET")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-H", "--host", default="127.0.0.1")
    ap.add_argument("-p", "--port", type=int, default=5000)
    args = ap.parse_args(argv)
    os.environ.setdefault("MOTO_PORT", str(args.port))  # as moto_server: some services build URLs with it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    make_server(args.host, args.port, counting_app()).safe_start()


if __name__ == "__main__":
    main()
