"""The local backend: the same spark-submit argv as an EMR step, run on this machine against the S3
endpoint of the Airflow AWS connection (moto locally, MinIO in docker-compose, or AWS itself)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

from fruits.config import Settings
from fruits.spark_submit import local_bundle, run_spark_submit, s3_to_s3a, spark_submit_argv
from fruits.tuning import SparkTuning, local_tuning

log = logging.getLogger(__name__)
SPARK_JARS = ("hadoop-aws-3.3.1.jar", "aws-java-sdk-bundle-1.11.901.jar")


def s3a_conf_and_env(aws_conn_id: str, s: Settings) -> tuple[dict[str, str], dict[str, str]]:
    """Spark's s3a settings from the Airflow connection. Keys travel in the child's environment, never
    on its command line."""
    hook = AwsBaseHook(aws_conn_id=aws_conn_id, client_type="s3")
    creds = hook.get_credentials()
    endpoint = hook.conn_config.get_service_endpoint_url("s3") or f"https://s3.{s.region}.amazonaws.com"
    jars = [s.spark_jars_dir / j for j in SPARK_JARS]
    missing = [str(j) for j in jars if not j.exists()]
    if missing:
        raise FileNotFoundError(f"Spark s3a jars missing: {missing}. Run `make jars` (make demo does it).")
    conf = {
        "spark.jars": ",".join(str(j) for j in jars),
        "spark.hadoop.fs.s3a.endpoint": endpoint,
        "spark.hadoop.fs.s3a.path.style.access": "true",
        "spark.hadoop.fs.s3a.connection.ssl.enabled": str(endpoint.startswith("https")).lower(),
        "spark.hadoop.fs.s3a.aws.credentials.provider": "com.amazonaws.auth.EnvironmentVariableCredentialsProvider",
        "spark.pyspark.python": s.spark_python,
        "spark.pyspark.driver.python": s.spark_python,
    }
    env = {
        "AWS_ACCESS_KEY_ID": creds.access_key,
        "AWS_SECRET_ACCESS_KEY": creds.secret_key,
        "PYSPARK_PYTHON": s.spark_python,
        "PYSPARK_DRIVER_PYTHON": s.spark_python,
    }
    if creds.token:
        env["AWS_SESSION_TOKEN"] = creds.token
    return conf, env


def run_local_step(
    step: str,
    job_args: Sequence[str],
    s: Settings,
    logger: logging.Logger = log,
    tuning: SparkTuning | None = None,
) -> None:
    """`tuning` defaults to the one derived from this machine's cores; the bench passes others."""
    tuning = tuning or local_tuning(s.spark_master, native_blas=s.native_blas_dir)
    s3a_conf, env = s3a_conf_and_env(s.aws_conn_id, s)
    bundle = local_bundle(s.jobs_dir, s.work_dir)
    spark_submit = str(Path(s.spark_python).parent / "spark-submit")
    argv = spark_submit_argv(
        step,
        s3_to_s3a(job_args),
        bundle,
        {**tuning.conf(), **s3a_conf},
        master=tuning.master,
        spark_submit=spark_submit,
    )
    run_spark_submit(argv, {**env, **tuning.env}, logger)
