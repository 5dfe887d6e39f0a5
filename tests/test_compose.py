"""docker-compose.yml, checked without a container engine (these machines cannot run Docker).

Real parts: the repo's docker-compose.yml and docker/Dockerfile, parsed with PyYAML (compose's own
variable interpolation, `${VAR:-default}`, is resolved here the same way); the paths are checked on
disk; the environment names are compared with what plugins/fruits/config.py and the DAG actually read.
What this cannot show: that the images build and the containers start. The README says how to try it.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
AIRFLOW_SERVICES = {
    "airflow-init": None,
    "airflow-apiserver": "api-server",
    "airflow-scheduler": "scheduler",
    "airflow-dag-processor": "dag-processor",
    "airflow-triggerer": "triggerer",
}
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?]([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's substitution: ${X}, ${X:-default}, ${X:?error}; '$$' is a literal '$'."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if "?" in m.group(0).split(name, 1)[1][:2]:
            raise KeyError(f"${{{name}}} is required: {default}")
        return default or ""

    return VAR.sub(sub, value.replace("$$", "\0")).replace("\0", "$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    raw = yaml.safe_load(COMPOSE.read_text())  # merge keys (<<) are resolved by PyYAML
    env = {"FRUITS_JWT_SECRET": "x" * 64, "AIRFLOW_UID": str(os.getuid())}
    return interpolate(raw, env)


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def names_read_by_config() -> set[str]:
    """Every FRUITS_* variable plugins/fruits/config.py reads."""
    return set(re.findall(r'_env\(\s*"(FRUITS_[A-Z0-9_]+)"', (REPO / "plugins/fruits/config.py").read_text()))


def test_required_env_is_demanded():
    """Without the JWT secret compose must refuse to start, not run with a random one per container."""
    raw = yaml.safe_load(COMPOSE.read_text())
    with pytest.raises(KeyError, match="FRUITS_JWT_SECRET"):
        interpolate(raw, {})


def test_services_and_images(compose):
    services = compose["services"]
    expected = set(AIRFLOW_SERVICES) | {"postgres", "minio", "minio-init", "spark-master", "spark-worker"}
    assert expected <= set(services), expected - set(services)
    for name, svc in services.items():
        assert svc.get("image") or svc.get("build"), f"{name}: no image and no build"
        if "build" in svc:
            context = (REPO / svc["build"]["context"]).resolve()
            dockerfile = context / svc["build"].get("dockerfile", "Dockerfile")
            assert context.is_dir() and dockerfile.is_file(), name
        else:
            assert ":" in svc["image"] and not svc["image"].endswith(":latest"), f"{name}: pin the image tag"
    for name, command in AIRFLOW_SERVICES.items():
        if command:
            assert services[name]["command"] == command, name
    assert "db migrate" in " ".join(services["airflow-init"]["command"])
    # The Airflow services and both Spark nodes run the image built from the repo's Dockerfile.
    built = {n for n, s in services.items() if "build" in s}
    assert set(AIRFLOW_SERVICES) | {"spark-master", "spark-worker"} <= built
    assert len({services[n]["image"] for n in built}) == 1


def test_dockerfile_matches_the_lock():
    text = (REPO / "docker/Dockerfile").read_text()
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    airflow = next(p.split("==")[1] for p in pins if p.startswith("apache-airflow=="))
    python = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"].strip("=.*")
    assert f"apache/airflow:{airflow}-python{python}" in text
    assert re.search(r"openjdk-17-jre-headless", text)
    assert "uv export --frozen --no-dev" in text and "pip install --no-cache-dir -r requirements.txt" in text
    for src in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, flags=re.M):
        for path in src.split():
            assert (REPO / path).exists(), f"Dockerfile copies {path}, which is not in the repo"
    ignore = (REPO / ".dockerignore").read_text()
    assert "!pyproject.toml" in ignore and "!uv.lock" in ignore  # the context stays small (no .venv)


def test_mounted_paths_exist(compose):
    mounts = 0
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (REPO / source).resolve().exists(), f"{name}: {source} does not exist"
                mounts += 1
            else:
                assert source in compose["volumes"], f"{name}: named volume {source} is not declared"
    for name in AIRFLOW_SERVICES:
        targets = {v.split(":")[1] for v in compose["services"][name]["volumes"]}
        assert {"/opt/airflow/dags", "/opt/airflow/plugins", "/opt/airflow/spark_jobs"} <= targets
    seeds = {v.split(":")[1] for v in compose["services"]["minio-init"]["volumes"]}
    assert seeds == {"/seed/models", "/seed/sample"}
    assert mounts >= 5 * 3 + 2


def test_environment_the_dag_reads(compose):
    services = compose["services"]
    read = names_read_by_config()
    required = {
        "FRUITS_BUCKET",
        "FRUITS_SPARK_MASTER",
        "FRUITS_SPARK_PYTHON",
        "FRUITS_SPARK_JARS_DIR",
        "FRUITS_JOBS_DIR",
        "FRUITS_WORK_DIR",
    }
    assert required <= read  # the names are still the ones config.py reads
    for name in AIRFLOW_SERVICES:
        env = env_of(services[name])
        fruits = {k for k in env if k.startswith("FRUITS_")}
        assert required <= fruits, f"{name}: missing {required - fruits}"
        assert fruits <= read, f"{name}: {fruits - read} are not read by config.py (typo?)"
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"].startswith("http://airflow-apiserver:8080/")
        assert len(env["AIRFLOW__API_AUTH__JWT_SECRET"]) >= 32
        assert int(env["AIRFLOW__CORE__PARALLELISM"]) <= 8

        # The S3 connection: conn id aws_default (config default), endpoint the MinIO service.
        conn = json.loads(env["AIRFLOW_CONN_AWS_DEFAULT"])
        assert conn["conn_type"] == "aws" and conn["extra"]["region_name"].startswith("eu-")
        host, port = conn["extra"]["endpoint_url"].removeprefix("http://").split(":")
        assert host == "minio" and f"{port}:{port}" in " ".join(services["minio"]["ports"])
        minio_env = env_of(services["minio"])
        assert (conn["login"], conn["password"]) == (
            minio_env["MINIO_ROOT_USER"],
            minio_env["MINIO_ROOT_PASSWORD"],
        )
        # Executors (on the worker) use s3a with the environment credentials provider, as the driver does.
        worker_env = env_of(services["spark-worker"])
        assert (worker_env["AWS_ACCESS_KEY_ID"], worker_env["AWS_SECRET_ACCESS_KEY"]) == (
            conn["login"],
            conn["password"],
        )

        # The compute: the Spark master the spark-master service runs, with the job paths as mounted.
        master = env["FRUITS_SPARK_MASTER"]
        assert master == "spark://spark-master:7077"
        assert services["spark-master"]["command"][2:5] == ["spark-master", "--port", "7077"]
        assert master in services["spark-worker"]["command"]
        assert env["FRUITS_JOBS_DIR"] == "/opt/airflow/spark_jobs"
        assert env["FRUITS_BUCKET"] == env_of(services["minio-init"])["FRUITS_BUCKET"]

    dockerfile = (REPO / "docker/Dockerfile").read_text()
    for path in ("/opt/fruits/bin/python", "/opt/fruits/jars"):
        assert path in dockerfile  # what FRUITS_SPARK_PYTHON / FRUITS_SPARK_JARS_DIR point at is built there
