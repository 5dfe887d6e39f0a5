"""docker-compose.yml, checked statically (fast, in `make test`); `make compose-check` runs it for real.

Real parts: the repo's docker-compose.yml and docker/Dockerfile, parsed with PyYAML (compose's own
variable interpolation, `${VAR:-default}`, is resolved here the same way); the paths are checked on
disk; the environment names are compared with what plugins/fruits/config.py and the DAG actually read;
the image variables are compared with the ones scripts/compose_check.py points at its stand-ins.
What this cannot show: that the images build and the containers start. `make compose-check` does that
(scripts/compose_check.py: builds, starts the stack, runs the DAG, tears down; 5-30 minutes, README).
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

pytestmark = pytest.mark.fast  # no Spark, no DAG run (`make test-fast`)

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
    assert seeds == {"/opt/fruits/seed_s3.py", "/seed/models", "/seed/sample"}
    assert mounts >= 5 * 3 + 3


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


IMAGE_VAR = re.compile(r"^\$\{([A-Z_]+):-([^}]+)\}$")


def test_every_image_is_a_variable_with_a_pinned_default():
    """Users get the official images by default; `make compose-check` swaps in its stand-ins through the
    same variables, so every image (and the Airflow base of the project's image) must be one."""
    raw = yaml.safe_load(COMPOSE.read_text())
    variables = {}
    for name, svc in raw["services"].items():
        m = IMAGE_VAR.match(svc["image"])
        assert m, f"{name}: image {svc['image']!r} is not ${{VAR:-default}}"
        variables[m.group(1)] = m.group(2)
        if "build" in svc:
            m = IMAGE_VAR.match(svc["build"]["args"]["AIRFLOW_IMAGE"])
            assert m and m.group(1) == "AIRFLOW_IMAGE", name
            variables["AIRFLOW_IMAGE"] = m.group(2)
    assert set(variables) == {"AIRFLOW_IMAGE", "FRUITS_IMAGE", "POSTGRES_IMAGE", "MINIO_IMAGE"}
    for var, default in variables.items():
        assert ":" in default and not default.endswith(":latest"), f"{var}: pin the default tag"
    # The compose default and the Dockerfile's own default are the same official image.
    dockerfile = (REPO / "docker/Dockerfile").read_text()
    assert f"ARG AIRFLOW_IMAGE={variables['AIRFLOW_IMAGE']}" in dockerfile
    assert variables["AIRFLOW_IMAGE"].startswith("apache/airflow:")
    assert variables["POSTGRES_IMAGE"].startswith("postgres:")
    assert "minio/minio:" in variables["MINIO_IMAGE"]

    # compose_check.py overrides each of them, and the stand-in names are what compose then runs.
    check = (REPO / "scripts/compose_check.py").read_text()
    overridden = set(re.findall(r'^    "([A-Z_]+_IMAGE)": ', check, flags=re.M))
    assert overridden == set(variables), overridden ^ set(variables)
    env = {"FRUITS_JWT_SECRET": "x" * 64, **{v: f"standin/{v.lower()}:1" for v in variables}}
    services = interpolate(raw, env)["services"]
    assert services["postgres"]["image"] == "standin/postgres_image:1"
    assert services["minio"]["image"] == "standin/minio_image:1"
    assert services["airflow-scheduler"]["build"]["args"]["AIRFLOW_IMAGE"] == "standin/airflow_image:1"
    assert {services[n]["image"] for n in (*AIRFLOW_SERVICES, "spark-master", "spark-worker")} == {
        "standin/fruits_image:1"
    }


def test_stand_ins_exist_for_every_image_the_check_replaces():
    check = (REPO / "scripts/compose_check.py").read_text()
    for dockerfile in re.findall(r'"([a-z0-9]+\.Dockerfile)"', check):
        text = (REPO / "docker/standins" / dockerfile).read_text()
        assert text.startswith("#") and "ARG BASE_IMAGE=" in text, dockerfile
        for src in re.findall(r"^COPY (\S+) \S+$", text, flags=re.M):
            path = REPO / "docker/standins" / src
            assert path.is_file() and os.access(path, os.X_OK), (
                f"{dockerfile}: {src} missing or not executable"
            )
    airflow = (REPO / "docker/standins/airflow.Dockerfile").read_text()
    # What docker/Dockerfile and the compose file rely on in the official image.
    assert "--uid 50000 --gid 0" in airflow and "AIRFLOW_HOME=/opt/airflow" in airflow
    entrypoint = (REPO / "docker/standins/airflow-entrypoint.sh").read_text()
    assert "_AIRFLOW_DB_MIGRATE" in entrypoint and "_AIRFLOW_WWW_USER_CREATE" in entrypoint


def test_published_ports_and_health_checks(compose):
    """Host ports are variables (the check runs beside other stacks); S3 is waited for by its health."""
    raw = yaml.safe_load(COMPOSE.read_text())
    for name, svc in raw["services"].items():
        for port in svc.get("ports", []):
            assert re.match(r"^\$\{[A-Z0-9_]+_PORT:-\d+\}:\d+$", port), f"{name}: {port}"
    services = compose["services"]
    assert services["minio"]["healthcheck"]["test"] == ["CMD", "mc", "ready", "local"]
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    for name in ("postgres", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor"):
        assert services[name]["healthcheck"]["test"], name
