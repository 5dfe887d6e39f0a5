"""The Airflow UI on localhost, without Docker: `make up` / `make down`.

    python scripts/ui_stack.py up [--port 8080] [--s3-port 5056] [--home DIR] [--schedule]
                                  [--seed BATCH=DIR ...] [--no-seed]
    python scripts/ui_stack.py status | down [--home DIR]

`up` starts a local S3 (moto) with the bucket, the MobileNetV2 weights and the demo batches, then
`airflow standalone` (api-server with the UI, scheduler, dag-processor, triggerer; LocalExecutor) with
this repo's DAGs, plugins and connection, and a local Spark as compute. It waits until the DAG is
parsed, unpauses it, and prints the address and the login.

Every process it starts carries FRUITS_UI_STACK=<token> in its environment, inherited by the Airflow
task processes and the Spark JVMs they start. `down` stops the process groups it started, then looks
for anything still carrying the token, so that nothing is left behind, and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from devstack import local_stack_env  # noqa: E402

DEFAULT_HOME = REPO / ".cache" / "ui"
DAG_ID = "fruits_embeddings"
MARKER = "FRUITS_UI_STACK"
SHARED_SAMPLE = REPO.parent / "shared" / "data" / "fruits360-sample"
DEFAULT_SEEDS = {"demo-training": SHARED_SAMPLE / "Training", "demo-test": SHARED_SAMPLE / "Test"}


def say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


# --- the environment every component shares -------------------------------------------------------------
def stack_env(home: Path, port: int, s3_port: int, token: str, schedule: bool) -> dict[str, str]:
    """Airflow reads its configuration from the environment once: set everything before it starts.

    Parallelism 4 keeps standalone at about a dozen processes on 2 cores (at the default of 32 it starts
    38 and uses about 1.1 GB). Without --schedule the scheduler does not create the daily runs
    (use_job_schedule=False), so what runs is what you trigger; with it, unpausing the DAG starts the
    latest daily run at once, as in production."""
    venv_bin = Path(sys.executable).parent
    env = {
        **os.environ,
        **local_stack_env(home / "airflow", home / "work", f"http://127.0.0.1:{s3_port}"),
        MARKER: token,
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "4",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__BASE_URL": f"http://localhost:{port}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://localhost:{port}/execution/",
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": str(schedule),
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "PYTHONPATH": os.pathsep.join([str(REPO / "plugins"), str(REPO / "spark_jobs")]),
        "FRUITS_SPARK_PYTHON": sys.executable,
        "NO_COLOR": "1",
    }
    env.setdefault("FRUITS_SPARK_JARS_DIR", str(REPO / ".cache" / "jars"))
    return env


# --- processes ------------------------------------------------------------------------------------------
def marked_processes(token: str) -> list[int]:
    """Every live process whose environment carries this stack's token (Linux /proc)."""
    needle = f"{MARKER}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
    return sorted(found)


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total / 1024


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# --- the REST API the UI uses -----------------------------------------------------------------------------
class Api:
    """Airflow 3's public REST API (/api/v2), with a token from the simple auth manager's /auth/token."""

    def __init__(self, base: str, username: str = "admin", password: str | None = None) -> None:
        self.base, self.username, self.password, self.token = base.rstrip("/"), username, password, None

    def request(self, method: str, path: str, body: Any = None, raw: bool = False) -> Any:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=30) as resp:
            payload = resp.read()
        return payload.decode() if raw else (json.loads(payload) if payload else None)

    def login(self) -> None:
        self.token = self.request(
            "POST", "/auth/token", {"username": self.username, "password": self.password}
        )["access_token"]

    def healthy(self) -> bool:
        try:
            health = self.request("GET", "/api/v2/monitor/health")
        except (urllib.error.URLError, OSError, ValueError):
            return False
        parts = ("metadatabase", "scheduler", "dag_processor", "triggerer")
        return all((health.get(p) or {}).get("status") == "healthy" for p in parts)


def read_password(home: Path, timeout: float = 60) -> str:
    path = home / "airflow" / "simple_auth_manager_passwords.json.generated"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return json.loads(path.read_text())["admin"]
        time.sleep(0.5)
    raise SystemExit(f"no admin password in {path} after {timeout} s; see {home / 'standalone.log'}")


def wait_for(what: str, check, timeout: float, log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(1)
    raise SystemExit(f"{what} not ready after {timeout:.0f} s; see {log}")


# --- up / down --------------------------------------------------------------------------------------------
def state_file(home: Path) -> Path:
    return home / "stack.json"


def load_state(home: Path) -> dict[str, Any] | None:
    path = state_file(home)
    return json.loads(path.read_text()) if path.exists() else None


def up(
    home: Path, port: int, s3_port: int, schedule: bool, seeds: dict[str, Path], timeout: float = 180
) -> dict[str, Any]:
    state = load_state(home)
    if state and marked_processes(state["token"]):
        say(f"already running: http://localhost:{state['port']} (`make down` first to restart it)")
        return state
    home.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    env = stack_env(home, port, s3_port, token, schedule)
    os.environ.update(env)  # this process seeds S3 through the same connection, before importing Airflow
    state = {"token": token, "port": port, "s3_port": s3_port, "home": str(home), "pids": {}}
    state_file(home).write_text(json.dumps(state))
    try:
        import devstack
        from fruits.config import settings

        say(f"[1/4] local S3 (moto) on 127.0.0.1:{s3_port}")
        if not devstack.s3_start(home / "moto.pid"):
            raise SystemExit(f"port {s3_port} already serves an S3 endpoint; choose another with --s3-port")
        state["pids"]["moto"] = int((home / "moto.pid").read_text())
        state_file(home).write_text(json.dumps(state))

        bucket = settings().bucket
        say(f"[2/4] bucket s3://{bucket}: weights and {len(seeds)} demo batch(es)")
        devstack.ensure_bucket(bucket)
        devstack.stage_weights(bucket)
        for batch, data in seeds.items():
            devstack.upload_batch(bucket, data, batch)

        say(f"[3/4] airflow standalone on :{port} (log: {home / 'standalone.log'}), about 15-30 s")
        log = open(home / "standalone.log", "ab")
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "airflow"), "standalone"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=home,
        )
        state["pids"]["standalone"] = proc.pid
        state_file(home).write_text(json.dumps(state))
        api = Api(f"http://127.0.0.1:{port}", password=read_password(home, timeout))
        wait_for("the Airflow API", api.healthy, timeout, home / "standalone.log")
        api.login()

        say(f"[4/4] waiting for the DAG {DAG_ID} to be parsed")

        def parsed() -> bool:
            errors = api.request("GET", "/api/v2/importErrors").get("import_errors", [])
            if errors:
                raise SystemExit("DAG import errors:\n" + "\n".join(e["stack_trace"] for e in errors))
            try:
                return bool(api.request("GET", f"/api/v2/dags/{DAG_ID}"))
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    return False
                raise

        wait_for(f"DAG {DAG_ID}", parsed, timeout, home / "standalone.log")
        api.request("PATCH", f"/api/v2/dags/{DAG_ID}?update_mask=is_paused", {"is_paused": False})
    except BaseException:
        say("start failed: stopping what was started")
        down(home, quiet=True)
        raise
    procs = marked_processes(token)
    print()
    print(f"Airflow UI:  http://localhost:{port}   login: admin / {api.password}")
    print(
        f"             (password file: {home / 'airflow' / 'simple_auth_manager_passwords.json.generated'})"
    )
    print(f"DAG:         {DAG_ID}: Trigger -> the Param form (each field says what it does) -> Trigger")
    print(f"Local S3:    http://127.0.0.1:{s3_port}  bucket {bucket}; batches: {', '.join(seeds) or 'none'}")
    print(
        "Schedule:    "
        + (
            "daily runs are on (unpaused)"
            if schedule
            else "manual runs only (`make up SCHEDULE=on` for daily)"
        )
    )
    print(f"Processes:   {len(procs)}, {rss_mb(procs):.0f} MB resident; stop everything with `make down`")
    print(f"Reports:     s3://{bucket}/reports/RUN.html (path in the `report` task's log)")
    return state


def down(home: Path, quiet: bool = False, grace: float = 30) -> int:
    """Stop the stack's process groups, then anything still carrying its token. Returns what is left."""
    state = load_state(home)
    if not state:
        if not quiet:
            say(f"nothing to stop (no {state_file(home)})")
        return 0
    token = state["token"]
    before = marked_processes(token)
    for pid in state.get("pids", {}).values():
        _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while marked_processes(token) and time.monotonic() < deadline:
        time.sleep(0.5)
    stragglers = marked_processes(token)
    for pid in stragglers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.5)
    left = marked_processes(token)
    (home / "moto.pid").unlink(missing_ok=True)
    if not left:
        state_file(home).unlink(missing_ok=True)
    if not quiet or left:
        say(
            f"stopped {len(before)} process(es)"
            + (f" ({len(stragglers)} needed SIGKILL)" if stragglers else "")
            + (f"; STILL RUNNING: {left}" if left else "; none left")
        )
    return len(left)


def status(home: Path) -> None:
    state = load_state(home)
    if not state:
        say("not running")
        return
    procs = marked_processes(state["token"])
    say(f"http://localhost:{state['port']}: {len(procs)} process(es), {rss_mb(procs):.0f} MB resident")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up")
    u.add_argument("--port", type=int, default=8080)
    u.add_argument("--s3-port", type=int, default=5056)
    u.add_argument("--schedule", action="store_true", help="let the scheduler create the daily runs")
    u.add_argument("--seed", action="append", default=[], metavar="BATCH=DIR", help="batch to upload")
    u.add_argument("--no-seed", action="store_true", help="upload no batch (weights only)")
    u.add_argument("--timeout", type=float, default=180)
    for p in (u, sub.add_parser("down"), sub.add_parser("status")):
        p.add_argument("--home", type=Path, default=DEFAULT_HOME)
    args = ap.parse_args()
    home = args.home.resolve()
    if args.cmd == "up":
        seeds = {} if args.no_seed else dict(DEFAULT_SEEDS)
        if args.seed:
            seeds = {b: Path(d).resolve() for b, _, d in (s.partition("=") for s in args.seed)}
        up(home, args.port, args.s3_port, args.schedule, seeds, args.timeout)
    elif args.cmd == "down":
        sys.exit(1 if down(home) else 0)
    else:
        status(home)


if __name__ == "__main__":
    main()
