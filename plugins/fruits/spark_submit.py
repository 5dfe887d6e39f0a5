"""One spark-submit command line for both backends.

The EMR step (command-runner.jar) and the local run use the same argv built here, so what the tests run
locally is what EMR runs; only the master, the URI scheme and the file locations differ.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import subprocess
import zipfile
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

JOB_PACKAGE = "fruits_jobs"
JOB_SCRIPTS = {"embed": "embed.py", "pca": "pca.py"}


@dataclass(frozen=True)
class JobBundle:
    """Where spark-submit finds the job: the entry script per step and the zipped shared package."""

    scripts: Mapping[str, str]  # step name -> script path or URI
    py_files: str  # zip path or URI


def package_jobs(jobs_dir: Path) -> tuple[bytes, str]:
    """Zip spark_jobs/fruits_jobs reproducibly; returns the bytes and their sha256, so staging can skip
    the upload when nothing changed."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted((jobs_dir / JOB_PACKAGE).rglob("*.py")):
            info = zipfile.ZipInfo(str(path.relative_to(jobs_dir)), date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes())
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def local_bundle(jobs_dir: Path, work_dir: Path) -> JobBundle:
    data, digest = package_jobs(jobs_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    zip_path = work_dir / f"{JOB_PACKAGE}-{digest[:12]}.zip"
    if not zip_path.exists():
        tmp = zip_path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(zip_path)
    return JobBundle({k: str(jobs_dir / v) for k, v in JOB_SCRIPTS.items()}, str(zip_path))


def spark_submit_argv(
    step: str,
    job_args: Sequence[str],
    bundle: JobBundle,
    conf: Mapping[str, str],
    *,
    master: str | None = None,
    deploy_mode: str | None = None,
    spark_submit: str = "spark-submit",
) -> list[str]:
    argv = [spark_submit]
    if master:
        argv += ["--master", master]
    if deploy_mode:
        argv += ["--deploy-mode", deploy_mode]
    for key in sorted(conf):
        argv += ["--conf", f"{key}={conf[key]}"]
    argv += ["--py-files", bundle.py_files, bundle.scripts[step], *job_args]
    return argv


def s3_to_s3a(argv: Sequence[str]) -> list[str]:
    """Locally, Hadoop's s3a connector plays EMRFS's part: s3:// URIs become s3a://."""
    return [a.replace("s3://", "s3a://") for a in argv]


class SparkSubmitFailed(RuntimeError):
    pass


def run_spark_submit(argv: Sequence[str], env: Mapping[str, str], logger: logging.Logger = log) -> None:
    """Run spark-submit, streaming its output into the task log; raise with the output's tail on failure."""
    logger.info("spark-submit: %s", " ".join(a for a in argv if "secret" not in a.lower()))
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(
        list(argv),
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            if " WARN " in line and "NativeCodeLoader" in line:
                continue
            logger.info("%s", line)
        code = proc.wait()
    if code != 0:
        raise SparkSubmitFailed(f"spark-submit exited with {code}; last output:\n" + "\n".join(tail))
