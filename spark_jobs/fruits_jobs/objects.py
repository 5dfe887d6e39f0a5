"""Reads the photos of the embed job straight from S3, inside the Python worker: one GET per photo, many
in flight ahead of the one being embedded.

Why not Spark's binaryFile reader: it opens each file in turn inside a task (a HEAD for its file
status, another inside s3a's `open`, then the GET), so a task waits out one S3 round trip per photo and
pushes every photo's bytes through the JVM and Arrow before Python sees them. On S3 that makes the job
latency-bound, and on one machine it costs more CPU than the model. Here the JVM only passes paths, and
a small thread pool per worker keeps GETs in flight ahead of the photo being decoded and embedded
(obstore runs the requests in Rust, off the GIL). Decoding stays in the task's own thread: the task holds
one core, and decoding beside the model only made both slower (measured in docs/performance.md).

Credentials come from the environment (local keys) or the instance profile (EMR), never from arguments.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

# GETs in flight per Python worker: at S3's tens of ms to first byte, 16 keep well ahead of a model
# that embeds a photo every 5 to 7 ms per core.
FETCH_THREADS = 16
# Bytes read ahead per Python worker, at most (plus one file larger than this, if any).
READ_AHEAD_BYTES = 128 << 20


class ObjectMissing(Exception):
    """The object is not in S3 any more (deleted after the run was planned)."""


@dataclass(frozen=True)
class S3Settings:
    """Where the photos are served from: None endpoint means AWS itself (EMR)."""

    region: str
    endpoint: str | None = None


def split_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/key (or s3a://) -> (bucket, key), the key unquoted exactly as stored."""
    parts = urlsplit(uri)
    if parts.scheme not in ("s3", "s3a", "s3n") or not parts.netloc:
        raise ValueError(f"not an S3 URI: {uri!r}")
    return parts.netloc, uri.split("/", 3)[3]


class Reader:
    """Per-bucket obstore clients, built once per Python worker and shared by its fetch threads."""

    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        self._stores: dict[str, object] = {}

    def _store(self, bucket: str):
        from obstore.store import S3Store

        if bucket not in self._stores:
            options: dict = {}
            kwargs: dict = {"region": self.settings.region}
            if self.settings.endpoint:
                kwargs["endpoint"] = self.settings.endpoint
                kwargs["virtual_hosted_style_request"] = False
                options["allow_http"] = self.settings.endpoint.startswith("http://")
            self._stores[bucket] = S3Store(bucket, client_options=options, **kwargs)
        return self._stores[bucket]

    def get(self, uri: str) -> bytes:
        import obstore

        bucket, key = split_uri(uri)
        try:
            return bytes(obstore.get(self._store(bucket), key).bytes())
        except FileNotFoundError:  # obstore's NotFound (404)
            raise ObjectMissing(uri) from None
        except Exception as exc:  # transient after obstore's own retries: fail the task, Spark retries it
            raise OSError(f"reading {uri} from S3 failed: {exc}") from exc


_READERS: dict[S3Settings, Reader] = {}


def worker_reader(settings: S3Settings) -> Reader:
    """The process's Reader for `settings`, kept for every task the Python worker runs: its clients' pools
    keep their connections from one task to the next. A Reader per task opened a burst of new connections
    at every task start (TLS handshakes on S3), some only to sit idle in the pool; the local S3 server
    lent a thread to each new connection until it sent a request or timed out (10 s), and with all of its
    threads so held, both workers stalled for 10 s (docs/performance.md)."""
    if settings not in _READERS:
        _READERS[settings] = Reader(settings)
    return _READERS[settings]


@dataclass(frozen=True)
class Fetched:
    """One input file's bytes as read from S3 (None if it was deleted after the plan) and their SHA-256."""

    data: bytes | None
    content_sha256: str | None


def fetch(uri: str, get: Callable[[str], bytes]) -> Fetched:
    try:
        data = get(uri)
    except ObjectMissing:
        return Fetched(None, None)
    return Fetched(data, hashlib.sha256(data).hexdigest())  # hashlib releases the GIL on large inputs


def read_ahead(
    files: Iterable[tuple[str, int]],
    get: Callable[[str], bytes],
    threads: int = FETCH_THREADS,
    max_bytes: int = READ_AHEAD_BYTES,
) -> Iterator[Fetched]:
    """Yields the files' contents in input order, keeping GETs in flight ahead of the consumer.

    `files` are (uri, size in bytes from the plan's listing). The window ahead holds at most `threads`
    x 4 files and `max_bytes` bytes (always at least one file, however large), so a worker's memory is
    bounded in bytes, not in photos: a batch of 40 MB photos reads fewer ahead than one of 5 KB ones."""
    window: deque[tuple[Future[Fetched], int]] = deque()
    held = 0
    upcoming = iter(files)
    nxt = next(upcoming, None)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="s3-get") as pool:
        while nxt is not None or window:
            while (
                nxt is not None and len(window) < 4 * threads and (not window or held + nxt[1] <= max_bytes)
            ):
                window.append((pool.submit(fetch, nxt[0], get), nxt[1]))
                held += nxt[1]
                nxt = next(upcoming, None)
            future, size = window.popleft()
            held -= size
            yield future.result()
