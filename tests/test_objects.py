"""How the embed job's photo reader (spark_jobs/fruits_jobs/objects.py) tells a deleted photo from any other
S3 error: the first becomes a reject, every other one fails the task (Spark retries it), so a photo is never
rejected, and lost, because S3 refused a request.

Real: obstore's S3 client over HTTP, the moto S3 server on localhost for present and deleted photos. For a
refusal (403 AccessDenied, as S3 answers without s3:GetObject), a small HTTP server on localhost answers
every request with S3's error document: moto has no switch for that, and it is the only stand-in here.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import BUCKET, ENDPOINT, reset_s3, s3_hook
from fruits_jobs import objects

pytestmark = pytest.mark.fast  # no Spark, no DAG run (`make test-fast`)

DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied</Message><RequestId>1</RequestId></Error>"
)


@pytest.fixture
def refusing_s3() -> Iterator[str]:
    class Refuse(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(403)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(DENIED)))
            self.end_headers()
            self.wfile.write(DENIED)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_present_photo_is_read_and_a_deleted_one_is_a_reject(s3_server) -> None:
    reset_s3()
    s3_hook().create_bucket(bucket_name=BUCKET, region_name="eu-west-3")
    s3_hook().load_bytes(b"jpeg bytes", "incoming/b/Apple/1.jpg", BUCKET)
    reader = objects.Reader(objects.S3Settings(region="eu-west-3", endpoint=ENDPOINT))
    got = list(
        objects.read_ahead(
            [(f"s3://{BUCKET}/incoming/b/Apple/1.jpg", 10), (f"s3://{BUCKET}/incoming/b/Apple/gone.jpg", 10)],
            reader.get,
        )
    )
    assert got[0].data == b"jpeg bytes" and got[0].content_sha256 is not None
    assert got[1] == objects.Fetched(None, None)  # 404: deleted after the plan, rejected with its reason


def test_any_other_s3_error_fails_the_task_instead_of_rejecting(refusing_s3: str) -> None:
    reader = objects.Reader(objects.S3Settings(region="eu-west-3", endpoint=refusing_s3))
    uri = f"s3://{BUCKET}/incoming/b/Apple/1.jpg"
    with pytest.raises(OSError, match=f"reading {uri} from S3 failed") as exc:
        list(objects.read_ahead([(uri, 10)], reader.get))
    assert not isinstance(exc.value, objects.ObjectMissing)
