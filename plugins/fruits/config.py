"""All configuration in one place. Every value has a default that works for the local stack, and each
can be overridden by an environment variable of the same name (FRUITS_*)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# Regions inside the EU/EEA: GDPR keeps the photos, the embeddings and the cluster here.
EU_REGIONS = frozenset(
    {
        "eu-west-1",
        "eu-west-2",
        "eu-west-3",
        "eu-central-1",
        "eu-central-2",
        "eu-north-1",
        "eu-south-1",
        "eu-south-2",
    }
)
COMPUTE_BACKENDS = ("local", "emr")
PCA_MODES = ("variance", "fixed")
ENGINES = ("tf", "onnx")


def _env(name: str, default: str) -> str:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


@dataclass(frozen=True)
class Settings:
    bucket: str = field(default_factory=lambda: _env("FRUITS_BUCKET", "fruits-local"))
    aws_conn_id: str = field(default_factory=lambda: _env("FRUITS_AWS_CONN_ID", "aws_default"))
    region: str = field(default_factory=lambda: _env("FRUITS_REGION", "eu-west-3"))
    compute: str = field(default_factory=lambda: _env("FRUITS_COMPUTE", "local"))
    # Where MobileNetV2 weights live; staged into the bucket by `make demo` / the EMR staging task.
    weights_uri: str = field(
        default_factory=lambda: _env(
            "FRUITS_WEIGHTS_URI", "s3://{bucket}/artifacts/models/mobilenet_v2_1.0_224_no_top.h5"
        )
    )
    engine: str = field(default_factory=lambda: _env("FRUITS_ENGINE", "tf"))
    spark_master: str = field(default_factory=lambda: _env("FRUITS_SPARK_MASTER", "local[*]"))
    spark_jars_dir: Path = field(
        default_factory=lambda: Path(_env("FRUITS_SPARK_JARS_DIR", str(REPO_ROOT / ".cache" / "jars")))
    )
    spark_python: str = field(default_factory=lambda: _env("FRUITS_SPARK_PYTHON", sys.executable))
    jobs_dir: Path = field(
        default_factory=lambda: Path(_env("FRUITS_JOBS_DIR", str(REPO_ROOT / "spark_jobs")))
    )
    work_dir: Path = field(
        default_factory=lambda: Path(_env("FRUITS_WORK_DIR", str(REPO_ROOT / ".cache" / "work")))
    )
    claim_lease_s: int = field(default_factory=lambda: int(_env("FRUITS_CLAIM_LEASE_S", str(6 * 3600))))
    # Run report: a batch whose id holds the token "test" is held-out data for the linear probe; the
    # probe and the scatter read at most this many rows per split (a deterministic sample by path).
    test_batch_pattern: str = field(
        default_factory=lambda: _env("FRUITS_TEST_BATCH_PATTERN", r"(^|[-_.])test([-_.]|$)")
    )
    report_max_rows: int = field(default_factory=lambda: int(_env("FRUITS_REPORT_MAX_ROWS", "20000")))
    # PCA defaults (also the UI form's defaults).
    pca_variance_target: float = 0.90
    pca_max_k: int = 256
    pca_k: int = 64

    def resolve(self, template: str) -> str:
        return template.format(bucket=self.bucket)


def settings() -> Settings:
    """Read at call time, not import time, so tests and the UI stack can point it elsewhere."""
    return Settings()
