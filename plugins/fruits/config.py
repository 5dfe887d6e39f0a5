"""All configuration in one place. Every value has a default that works for the local stack, and each
can be overridden by an environment variable of the same name (FRUITS_*)."""

from __future__ import annotations

import json
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


PRICE_SOURCE = "AWS public on-demand price lists (EC2 Linux + Amazon EMR), eu-west-3"
PRICE_AS_OF = "2025-06-01"
# The tag that AmazonEMRServicePolicy_v2 requires on the cluster, its subnet, the subnet's VPC and any
# security group it uses (README, "Deploying to a real AWS account").
EMR_MANAGED_POLICY_TAG = ("for-use-with-amazon-emr-managed-policies", "true")


def _env(name: str, default: str) -> str:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


@dataclass(frozen=True)
class InstanceType:
    """What the EMR Spark tuning and the run's cost estimate need to know about an EC2 instance type.

    Each price says where it comes from and when it was read; `verified` is False for a figure nobody has
    checked against the public price list for eu-west-3, and the run's summary and report say so."""

    vcpu: int
    memory_gib: int
    ec2_usd_per_hour: float  # on-demand, Linux
    emr_usd_per_hour: float  # the EMR charge on top of EC2
    source: str = PRICE_SOURCE
    as_of: str = PRICE_AS_OF
    verified: bool = False


# On-demand list prices in eu-west-3 (Paris), USD per instance-hour, from the public EC2 and EMR pricing
# pages as recorded on 2025-06-01 (the pipeline never fetches prices). None of them has been re-checked
# since from this project (the dev machines reach no AWS page), so every one is marked unverified, and the
# c5.2xlarge EMR fee, which had been copied from m5.2xlarge (0.096), is the list's c5 figure (0.085) as
# remembered, not read: check both before budgeting. Override without a code change with
# FRUITS_EMR_PRICES='{"m5.xlarge": [EC2_USD_PER_HOUR, EMR_USD_PER_HOUR], ...}' (then labelled as yours).
INSTANCE_TYPES: dict[str, InstanceType] = {
    "m5.xlarge": InstanceType(4, 16, 0.224, 0.048),
    "m5.2xlarge": InstanceType(8, 32, 0.448, 0.096),
    "m5.4xlarge": InstanceType(16, 64, 0.896, 0.192),
    "r5.xlarge": InstanceType(4, 32, 0.296, 0.063),
    "c5.2xlarge": InstanceType(8, 16, 0.404, 0.085),
}


def instance_types() -> dict[str, InstanceType]:
    """The table above, with prices overridden from FRUITS_EMR_PRICES."""
    table = dict(INSTANCE_TYPES)
    for name, (ec2, emr) in json.loads(_env("FRUITS_EMR_PRICES", "{}")).items():
        if name not in table:
            raise ValueError(
                f"FRUITS_EMR_PRICES names {name!r}, which has no vCPU/memory entry in config.INSTANCE_TYPES; "
                "add it there first"
            )
        table[name] = InstanceType(
            table[name].vcpu,
            table[name].memory_gib,
            float(ec2),
            float(emr),
            source="FRUITS_EMR_PRICES (set by the deployment)",
            as_of="as set",
            verified=True,
        )
    return table


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
    # ONNX Runtime: same vectors as TensorFlow (cosine >= 0.999 on every sample photo) and faster in the
    # job, with a smaller worker; measured in docs/performance.md.
    engine: str = field(default_factory=lambda: _env("FRUITS_ENGINE", "onnx"))
    spark_master: str = field(default_factory=lambda: _env("FRUITS_SPARK_MASTER", "local[*]"))
    spark_jars_dir: Path = field(
        default_factory=lambda: Path(_env("FRUITS_SPARK_JARS_DIR", str(REPO_ROOT / ".cache" / "jars")))
    )
    spark_python: str = field(default_factory=lambda: _env("FRUITS_SPARK_PYTHON", sys.executable))
    # OpenBLAS for Spark ML (the PCA fit), unpacked here by `make blas`; without it Spark uses Java BLAS.
    native_blas_dir: Path = field(
        default_factory=lambda: Path(_env("FRUITS_NATIVE_BLAS_DIR", str(REPO_ROOT / ".cache" / "blas")))
    )
    jobs_dir: Path = field(
        default_factory=lambda: Path(_env("FRUITS_JOBS_DIR", str(REPO_ROOT / "spark_jobs")))
    )
    work_dir: Path = field(
        default_factory=lambda: Path(_env("FRUITS_WORK_DIR", str(REPO_ROOT / ".cache" / "work")))
    )
    # ONNX exports of the weights (fruits.onnx_model), checked against their manifest before use: shared by
    # every run on the machine, tests and bench included, so a machine exports a weights version once.
    onnx_cache_dir: Path = field(
        default_factory=lambda: Path(_env("FRUITS_ONNX_CACHE_DIR", str(REPO_ROOT / ".cache" / "onnx")))
    )
    # The local steps' JVM class archives (fruits.local_compute.class_archive): shared by every run on the
    # machine, tests and bench included; "" turns them off (so not read through _env, which takes "" for
    # unset).
    jvm_archive_dir: str = field(
        default_factory=lambda: os.environ.get("FRUITS_JVM_ARCHIVE_DIR", str(REPO_ROOT / ".cache" / "jvm"))
    )
    claim_lease_s: int = field(default_factory=lambda: int(_env("FRUITS_CLAIM_LEASE_S", str(6 * 3600))))
    # Run report: a batch whose id holds the token "test" is held-out data for the linear probe; the
    # probe and the scatter read at most this many rows per split (a deterministic sample by path).
    test_batch_pattern: str = field(
        default_factory=lambda: _env("FRUITS_TEST_BATCH_PATTERN", r"(^|[-_.])test([-_.]|$)")
    )
    report_max_rows: int = field(default_factory=lambda: int(_env("FRUITS_REPORT_MAX_ROWS", "20000")))
    # EMR (compute=emr): a transient cluster per run. README "Deploying to AWS" explains each value.
    emr_release: str = field(default_factory=lambda: _env("FRUITS_EMR_RELEASE", "emr-7.12.0"))
    emr_primary_type: str = field(default_factory=lambda: _env("FRUITS_EMR_PRIMARY_TYPE", "m5.xlarge"))
    emr_core_type: str = field(default_factory=lambda: _env("FRUITS_EMR_CORE_TYPE", "m5.xlarge"))
    # Core nodes are sized to the run (plan.size_cluster): enough for the embed step to take about
    # FRUITS_EMR_TARGET_EMBED_S at the measured photos/s per vCPU, never fewer than FRUITS_EMR_CORE_COUNT
    # nor more than FRUITS_EMR_MAX_CORE_NODES.
    emr_core_count: int = field(default_factory=lambda: int(_env("FRUITS_EMR_CORE_COUNT", "2")))
    emr_max_core_nodes: int = field(default_factory=lambda: int(_env("FRUITS_EMR_MAX_CORE_NODES", "20")))
    # docs/performance.md, "Results": the embed job ran 141.7 photos/s on 2 vCPUs (ONNX Runtime, the S3
    # server on the same cores), 70.9 per vCPU. EMR has no S3 server on its cores; keep the measured rate
    # until a run on EMR measures its own (the summary's emr block gives the hours to check it against).
    emr_photos_per_s_per_vcpu: float = field(
        default_factory=lambda: float(_env("FRUITS_EMR_PHOTOS_PER_S_PER_VCPU", "70"))
    )
    emr_target_embed_s: int = field(default_factory=lambda: int(_env("FRUITS_EMR_TARGET_EMBED_S", "1800")))
    # Provisioning + the bootstrap action installing the jobs' Python (README: 8 to 12 min before the
    # first step starts), and the PCA step: transform rate (docs/performance.md: 100,000 rows transformed
    # and written in about 11 s on 2 vCPUs) and a fit's fixed cost (a fit reads a bounded sample).
    emr_startup_s: int = field(default_factory=lambda: int(_env("FRUITS_EMR_STARTUP_S", "720")))
    emr_pca_rows_per_s_per_vcpu: float = field(
        default_factory=lambda: float(_env("FRUITS_EMR_PCA_ROWS_PER_S_PER_VCPU", "4000"))
    )
    emr_pca_fit_s: int = field(default_factory=lambda: int(_env("FRUITS_EMR_PCA_FIT_S", "120")))
    # EMR managed scaling between FRUITS_EMR_CORE_COUNT and the sized core count (off: a fixed size).
    emr_managed_scaling: bool = field(
        default_factory=lambda: _env("FRUITS_EMR_MANAGED_SCALING", "false").lower() in ("1", "true", "yes")
    )
    # A run whose cluster is estimated to cost more than this (USD) refuses to start it (0: no limit).
    max_cost_usd: float = field(default_factory=lambda: float(_env("FRUITS_MAX_COST_USD", "25")))
    # Backlogs: a run takes the oldest ready batches (by _READY time) up to this many photos, at least one
    # batch; the rest waits for the next run (0: no cap).
    max_images_per_run: int = field(default_factory=lambda: int(_env("FRUITS_MAX_IMAGES_PER_RUN", "1000000")))
    emr_service_role: str = field(
        default_factory=lambda: _env("FRUITS_EMR_SERVICE_ROLE", "fruits-emr-service-role")
    )
    emr_instance_profile: str = field(
        # EMR refuses an instance profile whose name differs from its role's: one name for both.
        default_factory=lambda: _env("FRUITS_EMR_INSTANCE_PROFILE", "fruits-emr-instance-role")
    )
    # Required with compute=emr: a private subnet (NAT gateway or a package mirror), tagged, in a tagged
    # VPC (EMR_MANAGED_POLICY_TAG). Empty would put the cluster in the default VPC, where
    # AmazonEMRServicePolicy_v2 cannot create its security groups.
    emr_subnet_id: str = field(default_factory=lambda: _env("FRUITS_EMR_SUBNET_ID", ""))
    # Optional package mirror for the bootstrap's pip, passed as the script's third argument (a bootstrap
    # action gets no environment); empty: the public index, through the subnet's NAT gateway.
    emr_pip_index_url: str = field(default_factory=lambda: _env("FRUITS_EMR_PIP_INDEX_URL", ""))
    # Backstop if Airflow itself dies: EMR ends a cluster idle this long (the teardown normally ends it).
    emr_idle_timeout_s: int = field(default_factory=lambda: int(_env("FRUITS_EMR_IDLE_TIMEOUT_S", "1800")))
    # Where the bootstrap action builds the jobs' Python environment on every node.
    emr_venv: str = field(default_factory=lambda: _env("FRUITS_EMR_VENV", "/opt/fruits/venv"))
    # Waiting on steps: "reschedule" frees the worker slot between checks and needs no triggerer;
    # FRUITS_EMR_DEFERRABLE=true hands the wait to the triggerer instead (README); tests use "poke".
    emr_sensor_mode: str = field(default_factory=lambda: _env("FRUITS_EMR_SENSOR_MODE", "reschedule"))
    emr_deferrable: bool = field(
        default_factory=lambda: _env("FRUITS_EMR_DEFERRABLE", "false").lower() in ("1", "true", "yes")
    )
    emr_poke_interval_s: int = field(default_factory=lambda: int(_env("FRUITS_EMR_POKE_INTERVAL_S", "60")))
    emr_step_timeout_s: int = field(default_factory=lambda: int(_env("FRUITS_EMR_STEP_TIMEOUT_S", "14400")))
    # EMR copies step logs to the LogUri every few minutes: how long a failed step's diagnostics wait.
    emr_log_wait_s: int = field(default_factory=lambda: int(_env("FRUITS_EMR_LOG_WAIT_S", "330")))
    # PCA defaults (also the UI form's defaults).
    pca_variance_target: float = 0.90
    pca_max_k: int = 256
    pca_k: int = 64

    def resolve(self, template: str) -> str:
        return template.format(bucket=self.bucket)

    def emr_config_errors(self) -> list[str]:
        """What compute=emr needs from the deployment's settings, checked before anything is created."""
        errors = []
        if not self.emr_subnet_id:
            key, value = EMR_MANAGED_POLICY_TAG
            errors.append(
                "compute=emr needs FRUITS_EMR_SUBNET_ID: set it to the id (subnet-...) of a private subnet "
                f"tagged {key}={value} in a VPC with the same tag, and a NAT gateway or "
                "FRUITS_EMR_PIP_INDEX_URL (README, 'Deploying to a real AWS account'; `make aws-check` "
                "checks it). Or run with compute=local."
            )
        return errors


def settings() -> Settings:
    """Read at call time, not import time, so tests and the UI stack can point it elsewhere."""
    return Settings()
