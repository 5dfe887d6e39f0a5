"""docker-compose's minio-init: the bucket, the MobileNetV2 weights and the demo batches in the stack's S3.

Runs in the project's image with /seed/models and /seed/sample mounted. S3 calls go through the amazon
provider's S3Hook and the aws_default connection from the environment, as the DAG's do. What is already
there is skipped, so running it again changes nothing; a batch gets its _READY marker last.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from airflow.providers.amazon.aws.hooks.s3 import S3Hook

WEIGHTS = Path("/seed/models/mobilenet_v2_1.0_224_no_top.h5")
SAMPLE = Path("/seed/sample")


def main() -> None:
    bucket = os.environ["FRUITS_BUCKET"]
    hook = S3Hook(aws_conn_id=os.environ.get("FRUITS_AWS_CONN_ID", "aws_default"))
    if not hook.check_for_bucket(bucket):
        hook.create_bucket(bucket_name=bucket, region_name=os.environ.get("FRUITS_REGION", "eu-west-3"))
        print(f"created bucket {bucket}")
    key = f"artifacts/models/{WEIGHTS.name}"
    if not hook.check_for_key(key, bucket):
        if not WEIGHTS.is_file():
            raise SystemExit(f"{WEIGHTS} is missing: FRUITS_SHARED must hold models/mobilenet_v2/ (README)")
        hook.load_file(str(WEIGHTS), key, bucket)
        print(f"staged s3://{bucket}/{key}")
    for split in ("Training", "Test"):
        src, batch = SAMPLE / split, f"demo-{split.lower()}"
        files = sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else []
        if not files or hook.check_for_key(f"incoming/{batch}/_READY", bucket):
            continue

        def upload(path: Path, src: Path = src, batch: str = batch) -> None:
            key = f"incoming/{batch}/{path.relative_to(src).as_posix()}"
            hook.load_file(str(path), key, bucket, replace=True)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(upload, files))
        hook.load_string("", f"incoming/{batch}/_READY", bucket, replace=True)
        print(f"uploaded {len(files)} files as batch {batch}")
    print(f"bucket {bucket} ready")


if __name__ == "__main__":
    main()
