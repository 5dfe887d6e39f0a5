"""The local backend: the same spark-submit argv as an EMR step, run on this machine against the S3
endpoint of the Airflow AWS connection (moto locally, MinIO in docker-compose, or AWS itself)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path

from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

from fruits.config import Settings
from fruits.spark_submit import local_bundle, run_spark_submit, s3_to_s3a, spark_submit_argv
from fruits.tuning import SparkTuning, local_tuning

log = logging.getLogger(__name__)
SPARK_JARS = ("hadoop-aws-3.3.1.jar", "aws-java-sdk-bundle-1.11.901.jar")
# A step that writes its class archive lives longer than this only if it was killed (local_compute.class_archive).
ARCHIVE_DUMP_MAX_S = 30 * 60


def s3a_conf_and_env(aws_conn_id: str, s: Settings, master: str) -> tuple[dict[str, str], dict[str, str]]:
    """Spark's s3a settings from the Airflow connection, for a spark-submit to `master`. Keys travel in
    the child's environment, never on its command line."""
    hook = AwsBaseHook(aws_conn_id=aws_conn_id, client_type="s3")
    creds = hook.get_credentials()
    endpoint = hook.conn_config.get_service_endpoint_url("s3") or f"https://s3.{s.region}.amazonaws.com"
    jars = [s.spark_jars_dir / j for j in SPARK_JARS]
    missing = [str(j) for j in jars if not j.exists()]
    if missing:
        raise FileNotFoundError(f"Spark s3a jars missing: {missing}. Run `make jars` (make demo does it).")
    # A local master: on the JVM's own class path rather than in spark.jars. The driver is its own
    # executor, so nothing has to be copied to it (spark.jars copies the 190 MB SDK bundle into every
    # run's scratch folder), and the classes can go into the class archive (class_archive). A cluster's
    # executors (docker-compose's Spark worker) get them through spark.jars.
    key = "spark.driver.extraClassPath" if master.startswith("local") else "spark.jars"
    conf = {
        key: (":" if key == "spark.driver.extraClassPath" else ",").join(str(j) for j in jars),
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
    s3a_conf, env = s3a_conf_and_env(s.aws_conn_id, s, tuning.master or s.spark_master)
    bundle = local_bundle(s.jobs_dir, s.work_dir)
    spark_submit = str(Path(s.spark_python).parent / "spark-submit")
    conf = {**tuning.conf(), **s3a_conf}
    archive_options, publish_archive = class_archive(s, step, conf)
    java_options = conf.get("spark.driver.extraJavaOptions", "")
    conf["spark.driver.extraJavaOptions"] = f"{java_options} {archive_options}".strip()
    argv = spark_submit_argv(
        step, s3_to_s3a(job_args), bundle, conf, master=tuning.master, spark_submit=spark_submit
    )
    env["PYTHONPATH"] = local_python_path(s.jobs_dir)
    try:
        run_spark_submit(argv, {**env, **tuning.env}, logger)
    except BaseException:
        publish_archive(False)
        raise
    publish_archive(True)


def local_python_path(jobs_dir: Path) -> str:
    """PYTHONPATH for a local step: spark_jobs/local_site first, whose sitecustomize makes the driver and
    the workers import the installed pyspark, not the zipped copy spark-submit puts first (compiled from
    source in every process); then whatever PYTHONPATH this process has."""
    return os.pathsep.join([str(jobs_dir / "local_site"), *filter(None, [os.environ.get("PYTHONPATH")])])


def class_archive(s: Settings, step: str, conf: dict[str, str]) -> tuple[str, Callable[[bool], None]]:
    """JVM options for a class archive (AppCDS) of this step, and what to call once the JVM has exited.

    A local step is a short-lived JVM that spends seconds loading and verifying the same Spark, Hadoop
    and AWS SDK classes every run (docs/performance.md: a no-op spark-submit, 13.3 s -> 7.5 s with the
    archive). The first run of a step on a machine writes the archive of the classes it loaded
    (-XX:ArchiveClassesAtExit, about 20 s more, once), later runs map it (-XX:SharedArchiveFile). Its name
    hashes what the archive is only valid for: the Java binary, the Spark version, the class path. If the
    JVM still finds it stale it ignores it (-Xshare:auto, the default) and runs as without it."""
    if not s.jvm_archive_dir:
        return "", lambda ok: None
    java_home = os.environ.get("JAVA_HOME")
    java = Path(java_home, "bin", "java") if java_home else Path(shutil.which("java") or "java")
    try:
        stat = java.resolve().stat()
        key = [str(java.resolve()), str(stat.st_size), str(stat.st_mtime_ns), version("pyspark"), step]
    except (OSError, PackageNotFoundError):
        return "", lambda ok: None  # no Java or no Spark here: spark-submit will say so itself
    key.append(conf.get("spark.driver.extraClassPath", ""))
    if any(d.is_dir() and any(d.iterdir()) for d in _class_path_dirs(conf)):
        return "", lambda ok: None  # the JVM cannot archive with one, and fails the step at exit
    folder = Path(s.jvm_archive_dir)
    archive = folder / f"{step}-{hashlib.sha256(chr(0).join(key).encode()).hexdigest()[:16]}.jsa"
    quiet = "-Xlog:cds=off -Xlog:cds+dynamic=off"  # the dump lists every class it skips
    if archive.exists():
        return f"-XX:SharedArchiveFile={archive} {quiet}", lambda ok: None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only install: run without
        return "", lambda ok: None
    # One first run writes it; another one at the same time (the other test worker, a second DAG run)
    # runs without rather than pay for the same dump twice. A marker older than ARCHIVE_DUMP_MAX_S is left
    # by a run that was killed: taken over.
    marker = archive.with_suffix(".writing")
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        if archive.exists():  # published by the marker's holder since the check above
            return f"-XX:SharedArchiveFile={archive} {quiet}", lambda ok: None
        try:
            writing = time.time() - marker.stat().st_mtime < ARCHIVE_DUMP_MAX_S
        except FileNotFoundError:  # its holder has just failed
            writing = False
        if writing:
            return "", lambda ok: None
        marker.touch()
    except OSError:  # a read-only folder: run without
        return "", lambda ok: None
    else:
        os.close(fd)
    partial = archive.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")

    def publish(ok: bool) -> None:
        """Kept from a step that succeeded only: a JVM killed while it wrote leaves half an archive."""
        if ok and partial.exists():
            partial.replace(archive)
        else:
            partial.unlink(missing_ok=True)
        marker.unlink(missing_ok=True)

    return f"-XX:ArchiveClassesAtExit={partial} {quiet}", publish


def _class_path_dirs(conf: dict[str, str]) -> list[Path]:
    """The folders spark-submit puts on the driver's class path (Spark's launcher: the conf folder, then
    HADOOP_CONF_DIR, YARN_CONF_DIR, SPARK_DIST_CLASSPATH, and spark.driver.extraClassPath)."""
    env = os.environ
    spec = find_spec("pyspark")
    home = env.get("SPARK_HOME") or (str(Path(spec.origin).parent) if spec and spec.origin else "")
    entries = [env.get("SPARK_CONF_DIR") or (f"{home}/conf" if home else "")]
    entries += [env.get("HADOOP_CONF_DIR", ""), env.get("YARN_CONF_DIR", "")]
    entries += env.get("SPARK_DIST_CLASSPATH", "").split(":")
    entries += conf.get("spark.driver.extraClassPath", "").split(":")
    return [Path(e) for e in entries if e and not e.endswith((".jar", "*"))]
