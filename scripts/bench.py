"""`make bench`: how fast the embed job runs against the model's own speed, on this machine, in one run.

    python scripts/bench.py [--images 5040] [--engines onnx,tf] [--skip pca,noop] [--curve]

It starts its own moto S3 server on a free port and its own Airflow home, then measures, on the same
images and the same machine:

- decode_images_per_s  Pillow decode + resize to 224x224 (fruits_jobs.imaging), one process, one core.
- raw_images_per_s     the engine alone on pre-decoded tensors in one process, at its best thread count
                       and batch size (1..cores threads x RAW_BATCHES): the model's ceiling here.
- job_images_per_s     the real embed Spark job (plan from plugins/fruits/plan.py, spark-submit through
                       plugins/fruits/local_compute.py, images read from S3), from its action until both
                       Parquet tables are written, after one warm-up run of the same job.
- efficiency           job / raw, with the default engine (config FRUITS_ENGINE).
- overhead_cpu_ms_per_image  CPU per photo, during the timed job's action, of the Spark JVM and the Python
                       workers minus the engine's own CPU (the job sums it around every forward call:
                       fruits_jobs.engine.CpuMeter); the S3 server is left out. Default engine.
- efficiency_cpu       engine CPU / (engine CPU + overhead CPU) per photo, default engine.
- tf_vs_raw_tf         the job with engine=tf / raw TensorFlow (needs tf in --engines).
- small_run_s          a whole DAG run (dag.test) on a new batch of SMALL_BATCH_IMAGES photos, the ONNX
                       export already staged: the median of --small-runs (3) runs, each on a new batch
                       (small_runs_s lists them); small_run_tasks_s gives the median run's task seconds,
                       small_runs_cpu_s each run's CPU seconds (Airflow's process, the steps' processes).
- worker_peak_rss_mb   the largest Spark Python worker's peak RSS (VmHWM) during the timed job.
- pca_refit_s          the real pca.py --fit on 100,000 x 1280 synthetic embeddings written to S3.
- noop_run_s           a whole DAG run (dag.test) when no batch is new.

--skip takes: noop, decode, raw, job, pca, small.

Images: the shared Fruits-360 sample (Training + Test) replicated until there are at least --images. Each
copy gets a JPEG comment segment (FF FE) after the start-of-image marker naming the copy, so every file has
distinct bytes (and SHA-256) while its pixels, hence decode and model cost, are those of the original.

With --curve it also runs the job over a grid of model batch sizes and threads per task (the tuning
curve in docs/performance.md). Human-readable figures first; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH_HOME = REPO / ".cache" / "bench"
SAMPLE = REPO.parent / "shared" / "data" / "fruits360-sample"
BUCKET = "fruits-bench"
BATCH = "bench-replicated"
SYNTHETIC_BATCH = "synthetic-100k"
SMALL_BATCH = "bench-small"
SMALL_BATCH_IMAGES = 100
RAW_BATCHES = (8, 16, 32, 64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _configure_env() -> None:
    """Before Airflow is imported: a private Airflow home, S3 endpoint and bucket, so the bench never
    touches the demo's or the tests' state."""
    sys.path.insert(0, str(REPO / "scripts"))
    from devstack import local_stack_env

    endpoint = f"http://127.0.0.1:{_free_port()}"
    os.environ.update(
        {**local_stack_env(BENCH_HOME / "airflow", BENCH_HOME / "work", endpoint), "FRUITS_BUCKET": BUCKET}
    )
    for p in (REPO / "plugins", REPO / "spark_jobs", REPO / "scripts"):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))


def say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


# --- images ------------------------------------------------------------------------------------------
def sample_files() -> list[Path]:
    return sorted(p for p in SAMPLE.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg") and p.is_file())


def with_comment(jpeg: bytes, text: str) -> bytes:
    """Same JPEG with a COM segment after SOI: distinct bytes, identical pixels."""
    if jpeg[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    payload = text.encode("ascii")
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def replicated(n_images: int, tag: str = "fruits-bench") -> dict[str, bytes]:
    """{LABEL/FILE: bytes}: the sample repeated until there are n_images, every file distinct (and distinct
    from another tag's)."""
    import hashlib

    files = sample_files()
    out: dict[str, bytes] = {}
    copy = 0
    while len(out) < n_images:
        for f in files:
            if len(out) >= n_images:
                break
            split = f.parent.parent.name.lower()
            out[f"{f.parent.name}/c{copy}-{split}-{f.name}"] = with_comment(
                f.read_bytes(), f"{tag} copy {copy} {split}/{f.parent.name}/{f.name}"
            )
        copy += 1
    digests = {hashlib.sha256(b).hexdigest() for b in out.values()}
    if len(digests) != len(out):
        raise RuntimeError("replicated images are not all distinct")
    return out


def upload(hook, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    client = hook.get_conn()

    def put(item: tuple[str, bytes]) -> None:
        client.put_object(Bucket=bucket, Key=prefix + item[0], Body=item[1])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, files.items()))


# --- decode and raw engine speed ---------------------------------------------------------------------
def timed_loop(step: Callable[[], int], min_s: float = 8.0, min_calls: int = 3) -> float:
    """Items per second of step() (which returns items done), over at least min_s seconds."""
    done, calls, t0 = 0, 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - t0 < min_s:
        done += step()
        calls += 1
    return done / (time.perf_counter() - t0)


def decode_speed(images: list[bytes]) -> float:
    from fruits_jobs import imaging

    for data in images[:50]:
        imaging.decode_rgb224(data)  # warm the import and allocator
    t0 = time.perf_counter()
    for data in images:
        imaging.decode_rgb224(data)
    return len(images) / (time.perf_counter() - t0)


def raw_child(engine: str, model_path: str, threads: int, batch: int, tensors: str) -> None:
    """One engine, one thread count, in this fresh process (TF's thread pools are set once per process)."""
    import numpy as np
    from fruits_jobs.engine import get_engine

    x = np.load(tensors)
    import inspect

    # The engine traced for this batch shape (TensorFlow); older engines took no batch.
    shaped = "batch" in inspect.signature(get_engine).parameters
    forward = (
        get_engine(engine, model_path, threads, batch) if shaped else get_engine(engine, model_path, threads)
    )
    batches = [x[i : i + batch] for i in range(0, len(x) - batch + 1, batch)]
    for b in batches[:2]:
        forward(b)  # warm-up: graph tracing, allocator
    state = {"i": 0}

    def step() -> int:
        b = batches[state["i"] % len(batches)]
        state["i"] += 1
        forward(b)
        return len(b)

    cpu0, done0 = time.process_time(), state["i"]
    rate = timed_loop(step)
    cpu_ms = 1000 * (time.process_time() - cpu0) / max((state["i"] - done0) * batch, 1)
    print(json.dumps({"images_per_s": rate, "cpu_ms_per_image": cpu_ms}))


def raw_speed(engine: str, model_path: str, threads: int, batch: int, tensors: Path) -> dict[str, float]:
    argv = [sys.executable, __file__, "_raw", engine, model_path, str(threads), str(batch), str(tensors)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"raw {engine} x{threads} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- Spark worker memory ------------------------------------------------------------------------------
class WorkerRss(threading.Thread):
    """Peak RSS of this process's Spark Python workers (pyspark.daemon and its forks), from VmHWM, the
    kernel's own high-water mark, so short peaks between samples are not missed."""

    def __init__(self, every_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.every_s, self.stop = every_s, threading.Event()
        self.peak_kb: dict[int, int] = {}

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop.wait(self.every_s):
            for proc in me.children(recursive=True):
                try:
                    if "pyspark.daemon" not in " ".join(proc.cmdline()):
                        continue
                    with open(f"/proc/{proc.pid}/status") as status:
                        for line in status:
                            if line.startswith("VmHWM:"):
                                kb = int(line.split()[1])
                                self.peak_kb[proc.pid] = max(self.peak_kb.get(proc.pid, 0), kb)
                except (psutil.Error, OSError, ValueError):
                    continue

    def peak_mb(self) -> float:
        return round(max(self.peak_kb.values(), default=0) / 1024, 1)


class CpuMonitor(threading.Thread):
    """Cumulative CPU seconds, sampled over time, of: the Spark JVM, the Spark Python workers, the S3
    server (all started by this bench), and the whole machine (anything else is other people's load)."""

    def __init__(self, s3_pid: int, every_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.s3_pid, self.every_s, self.stop = s3_pid, every_s, threading.Event()
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._last: dict[int, tuple[str, float]] = {}

    def _snapshot(self) -> dict[str, float]:
        import psutil

        for proc in psutil.Process().children(recursive=True):
            try:
                cmd = " ".join(proc.cmdline())
                t = proc.cpu_times()
            except psutil.Error:
                continue  # an exited process keeps its last sample
            if proc.pid == self.s3_pid:
                group = "s3_server"
            elif "java" in cmd.split(" ", 1)[0]:
                group = "spark_jvm"
            elif "pyspark.daemon" in cmd:
                group = "python_workers"
            else:
                group = "other_children"
            self._last[proc.pid] = (group, t.user + t.system)
        totals: dict[str, float] = {}
        for group, cpu in self._last.values():
            totals[group] = totals.get(group, 0.0) + cpu
        machine = psutil.cpu_times()
        totals["machine_busy"] = machine.user + machine.system + machine.nice + machine.irq + machine.softirq
        return totals

    def run(self) -> None:
        while True:
            self.samples.append((time.time(), self._snapshot()))
            if self.stop.wait(self.every_s):
                self.samples.append((time.time(), self._snapshot()))
                return

    def between(self, t0: float, t1: float) -> dict[str, float]:
        """CPU seconds per group between two wall-clock times (nearest samples)."""

        def at(t: float) -> dict[str, float]:
            return min(self.samples, key=lambda sample: abs(sample[0] - t))[1]

        a, b = at(t0), at(t1)
        return {k: round(b.get(k, 0.0) - a.get(k, 0.0), 1) for k in b}


def process_cpu_s(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def spark_log(name: str):
    """A logger that keeps spark-submit's output in .cache/bench/logs/NAME.log instead of the console."""
    import logging

    folder = BENCH_HOME / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(f"bench.{name}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.handlers = [logging.FileHandler(folder / f"{name}.log", mode="w")]
    return logger


# --- the real embed job ---------------------------------------------------------------------------------
def run_embed(
    catalog,
    s,
    engine: str,
    run_id: str,
    tuning=None,
    threads: int | None = None,
    model_batch: int | None = None,
) -> dict[str, Any]:
    """Plan (manifest, ONNX staging) and spark-submit exactly as the DAG does; returns the job's metrics.
    `model_batch` overrides the job's photos per engine call (the curve only)."""
    from fruits import plan as planning
    from fruits.local_compute import run_local_step

    params = planning.parse_params({"engine": engine, "batch_ids": [BATCH]}, s)
    kwargs = {"threads": threads} if threads else {}
    plan = planning.build_plan(catalog, params, [BATCH], run_id, s, **kwargs)
    extra = ["--model-batch", str(model_batch)] if model_batch else []
    run_local_step("embed", plan["embed_args"] + extra, s, spark_log(run_id), tuning=tuning)
    metrics = catalog.read_json(f"{plan['run_prefix']}embed.json")
    assert metrics is not None
    return metrics


def synthetic_embeddings(hook, rows: int = 100_000, files: int = 8, seed: int = 7) -> None:
    """rows x 1280 float32 embeddings written as Parquet under embeddings/batch_id=SYNTHETIC_BATCH/ with
    the job's schema. Their variance falls off as a power law in random directions, so that about 190
    components explain 90% of it, as on the real sample (the demo's PCA keeps 191)."""
    import tempfile

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    scale = (np.arange(1, 1281) ** -0.63).astype(np.float32)
    rotation = np.linalg.qr(rng.normal(size=(1280, 1280)))[0].astype(np.float32)
    per_file = rows // files
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(files):
            x = (rng.normal(size=(per_file, 1280)).astype(np.float32) * scale) @ rotation + 0.5
            ids = [f"s3://{BUCKET}/synthetic/{i}/{j}.jpg" for j in range(per_file)]
            table = pa.table(
                {
                    "path": ids,
                    "label": [f"label-{j % 100}" for j in range(per_file)],
                    "content_sha256": [f"{i:08d}{j:056d}" for j in range(per_file)],
                    "size_bytes": pa.array([7000] * per_file, pa.int64()),
                    "embedding": pa.FixedSizeListArray.from_arrays(x.reshape(-1), 1280).cast(
                        pa.list_(pa.float32())
                    ),
                    "model_id": ["synthetic"] * per_file,
                    "engine": ["synthetic"] * per_file,
                }
            )
            local = Path(tmp) / f"part-{i:05d}.parquet"
            pq.write_table(table, local)
            hook.load_file(
                str(local), f"embeddings/batch_id={SYNTHETIC_BATCH}/{local.name}", BUCKET, replace=True
            )


def migrate_airflow_db() -> None:
    subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), "db", "migrate"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def cpu_seconds() -> dict[str, float]:
    """CPU seconds so far of this process (Airflow's tasks under dag.test) and of its children that have
    exited (each step's spark-submit: the JVM, the Python driver and the Python workers it waited for)."""
    return {
        who: usage.ru_utime + usage.ru_stime
        for who, usage in (
            ("airflow", resource.getrusage(resource.RUSAGE_SELF)),
            ("steps", resource.getrusage(resource.RUSAGE_CHILDREN)),
        )
    }


def dag_run(
    conf: dict[str, Any] | None = None,
) -> tuple[float, str, dict[str, dict[str, Any]], dict[str, float]]:
    """A whole DAG run (dag.test, in this process): (seconds, state, {task_id: {state, seconds}}, CPU
    seconds by cpu_seconds' keys), each task's seconds from its task instance's start and end."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    bag = DagBag(dag_folder=str(REPO / "dags"))
    dag = bag.get_dag("fruits_embeddings")
    t0, cpu0 = time.monotonic(), cpu_seconds()
    dagrun = dag.test(run_conf=conf or {})
    seconds = time.monotonic() - t0
    cpu = {who: round(s - cpu0[who], 1) for who, s in cpu_seconds().items()}
    with create_session() as session:
        tis = session.query(TaskInstance).filter(TaskInstance.run_id == dagrun.run_id).all()
        tasks = {
            ti.task_id: {
                "state": str(getattr(ti.state, "value", ti.state)),
                "seconds": round((ti.end_date - ti.start_date).total_seconds(), 1)
                if ti.start_date and ti.end_date
                else None,
            }
            for ti in tis
        }
    return seconds, str(getattr(dagrun.state, "value", dagrun.state)), tasks, cpu


def noop_dag_run() -> tuple[float, str, dict[str, str]]:
    """A whole DAG run (dag.test, in this process) when no batch is ready: (seconds, state, task states)."""
    migrate_airflow_db()
    seconds, state, tasks, _ = dag_run()
    return seconds, state, {t: v["state"] for t, v in tasks.items()}


def small_dag_run(
    hook, batch: str, tag: str
) -> tuple[float, dict[str, float], dict[str, float], dict[str, int]]:
    """A whole DAG run on `batch`, a new batch of SMALL_BATCH_IMAGES photos: its seconds, each task's, its
    CPU seconds (dag_run) and the S3 requests the local server served during it, by operation."""
    from counting_s3 import read_counts
    from devstack import s3_endpoint

    migrate_airflow_db()
    upload(hook, BUCKET, f"incoming/{batch}/", replicated(SMALL_BATCH_IMAGES, tag))
    hook.load_string("", f"incoming/{batch}/_READY", BUCKET, replace=True)
    read_counts(s3_endpoint(), reset=True)
    seconds, state, tasks, cpu = dag_run({"batch_ids": [batch]})
    requests = read_counts(s3_endpoint())["s3"]
    if state != "success" or any(t["state"] not in ("success", "skipped") for t in tasks.values()):
        raise RuntimeError(f"small DAG run failed: {state} {tasks}")
    timed = {t: v["seconds"] for t, v in tasks.items() if v["state"] == "success" and v["seconds"]}
    return seconds, dict(sorted(timed.items(), key=lambda kv: -kv[1])), cpu, requests


def curve(catalog, s, base, engines: list[str], cores: int, batch_sizes: list[int]) -> list[dict[str, Any]]:
    """The embed job over model batch sizes (photos per engine call) and thread layouts: tasks x threads
    per task = cores (pinned), plus every task using every core (the unpinned layout of common
    implementations). The Arrow batch stays the tuning's: it only carries paths in and vectors out."""
    layouts = sorted({(1, 1), (cores, cores), (1, cores)})  # (spark.task.cpus, threads per task)
    points = []
    for engine in engines:
        run_embed(catalog, s, engine, f"curve-{engine}-warmup", tuning=base)
        for task_cpus, threads in layouts:
            for batch in batch_sizes:
                tuning = replace(base, task_cpus=task_cpus, threads_per_task=threads)
                name = f"curve-{engine}-c{task_cpus}-t{threads}-b{batch}"
                m = run_embed(catalog, s, engine, name, tuning=tuning, threads=threads, model_batch=batch)
                point = {
                    "engine": engine,
                    "concurrent_tasks": cores // task_cpus,
                    "threads_per_task": threads,
                    "model_batch": batch,
                    "images_per_s": round(m["files"] / m["action_seconds"], 1),
                    "load_1min": load_avg(),
                }
                say(f"  curve {point}")
                points.append(point)
    return points


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5040)
    ap.add_argument("--engines", default="", help="engines for the job (default: the default engine only)")
    ap.add_argument("--skip", default="", help="comma list of: noop,decode,raw,job,pca,small")
    ap.add_argument(
        "--raw-grid", default="", help="THREADSxBATCH list for the raw engines, e.g. 1x8,2x8 (default: all)"
    )
    ap.add_argument("--small-runs", type=int, default=3, help="timed small DAG runs (the median is reported)")
    ap.add_argument("--curve", action="store_true", help="also run the model batch x threads grid")
    ap.add_argument("--curve-batches", default="8,32,64")
    ap.add_argument("--conf", action="append", default=[], help="KEY=VALUE added to every spark-submit")
    args = ap.parse_args()
    _configure_env()
    # Imported after the environment is set: Airflow reads its configuration once.
    import devstack
    import numpy as np
    from fruits import plan as planning
    from fruits.catalog import Catalog
    from fruits.config import settings
    from fruits.layout import Layout
    from fruits.local_compute import run_local_step
    from fruits.onnx_model import ensure_onnx
    from fruits.tuning import local_tuning
    from fruits_jobs import imaging
    from fruits_jobs.engine import MODEL_BATCH

    skip = set(filter(None, args.skip.split(",")))
    raw_grid = set(filter(None, args.raw_grid.split(",")))
    s = settings()
    engines = [e for e in (args.engines or s.engine).split(",") if e]
    default_engine = s.engine
    cores = os.cpu_count() or 1
    tuning = local_tuning(s.spark_master, native_blas=s.native_blas_dir)  # as run_local_step
    if args.conf:
        tuning = replace(tuning, extra={**tuning.extra, **dict(c.split("=", 1) for c in args.conf)})
    out: dict[str, Any] = {}
    extra: dict[str, Any] = {
        "machine": f"{cores} cores, {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB",
        "master": tuning.master,
        "arrow_batch": tuning.arrow_batch,
        "threads_per_task": tuning.threads_per_task,
        "load_1min_start": load_avg(),
    }
    pidfile = BENCH_HOME / "moto.pid"
    BENCH_HOME.mkdir(parents=True, exist_ok=True)
    devstack.s3_start(pidfile)
    try:
        hook = devstack.hook()
        devstack.ensure_bucket(BUCKET)
        weights_uri = devstack.stage_weights(BUCKET)
        catalog = Catalog(hook, Layout(BUCKET))
        images = replicated(args.images)
        t0 = time.monotonic()
        upload(hook, BUCKET, f"incoming/{BATCH}/", images)
        say(
            f"{len(images)} distinct images in s3://{BUCKET}/incoming/{BATCH}/ ({time.monotonic() - t0:.0f} s)"
        )
        out["images"] = len(images)

        if "noop" not in skip:
            # The batch has no _READY marker yet: nothing is new, so the run must stop after finding so.
            seconds, state, states = noop_dag_run()
            if (
                state != "success"
                or states.get("find_new_batches") != "success"
                or states.get("embed") != "skipped"
            ):
                raise RuntimeError(f"no-op DAG run did not short-circuit: {state} {states}")
            if catalog.hook.list_keys(BUCKET, prefix="runs/"):
                raise RuntimeError("no-op DAG run created run files")
            out["noop_run_s"] = round(seconds, 1)
            say(f"no-op DAG run (nothing new): {seconds:.1f} s, {state}")
        hook.load_string("", f"incoming/{BATCH}/_READY", BUCKET, replace=True)

        sha = planning.weights_sha256(catalog, weights_uri)
        onnx_uri, action = ensure_onnx(catalog, weights_uri, sha, s)
        onnx_local = BENCH_HOME / "model.onnx"
        hook.get_key(onnx_uri.split("/", 3)[3], BUCKET).download_file(str(onnx_local))
        say(f"ONNX export {action}: {onnx_uri}")
        model_paths = {"tf": str(devstack.DEFAULT_WEIGHTS), "onnx": str(onnx_local)}

        if "small" not in skip:
            # A first run makes the state a later run finds (ledger, PCA model, fit sample); the second,
            # timed, is the steady case: a new small batch on a pipeline that has run before.
            first_s, *_ = small_dag_run(hook, f"{SMALL_BATCH}-first", "fruits-bench-small-first")
            say(f"first DAG run on {SMALL_BATCH_IMAGES} new photos (fits PCA): {first_s:.1f} s")
            load = load_avg()
            # Several timed runs, each on a new batch: one run's wall time moves by a quarter from one
            # minute to the next on a shared machine; the median is the figure, the spread is reported.
            runs = []
            for i in range(args.small_runs):
                batch = SMALL_BATCH if i == 0 else f"{SMALL_BATCH}-{i + 1}"
                seconds, tasks, cpu, requests = small_dag_run(hook, batch, f"fruits-{batch}")
                runs.append((seconds, tasks, cpu, requests))
                say(
                    f"DAG run on {SMALL_BATCH_IMAGES} new photos: {seconds:.1f} s; by task {tasks}; CPU s {cpu}; "
                    f"S3 requests {requests}"
                )
            seconds, tasks, _, by_op = sorted(runs, key=lambda run: run[0])[(len(runs) - 1) // 2]
            out["small_run_s"] = round(seconds, 1)
            extra["small_run_tasks_s"] = tasks  # the median run's
            extra["small_runs_s"] = [round(run[0], 1) for run in runs]
            # CPU seconds, machine noise aside: Airflow's process and the steps' processes, for each run.
            extra["small_runs_cpu_s"] = [run[2] for run in runs]
            # Counts, which do not depend on the machine: every request of each run, and the median run's by
            # operation (the run small_run_tasks_s is from).
            extra["small_runs_s3_requests"] = [sum(run[3].values()) for run in runs]
            extra["small_run_s3_requests_by_op"] = dict(sorted(by_op.items(), key=lambda kv: -kv[1]))
            extra["small_run_load_1min"] = [load, load_avg()]

        sample = list(images.values())
        if "decode" not in skip:
            rate = decode_speed(sample[:1680])
            out["decode_images_per_s"] = round(rate, 1)
            say(f"decode + resize to 224x224 (one core): {rate:.1f} img/s")

        raw: dict[str, dict[str, float]] = {}
        raw_cpu: dict[str, dict[str, float]] = {}
        if "raw" not in skip:
            tensors = BENCH_HOME / "tensors.npy"
            np.save(tensors, imaging.preprocess(np.stack([imaging.decode_rgb224(b) for b in sample[:512]])))
            for engine in sorted(set(engines) | {default_engine}):
                raw[engine] = {}
                for threads in range(1, cores + 1):
                    for batch in RAW_BATCHES:
                        if raw_grid and f"{threads}x{batch}" not in raw_grid:
                            continue
                        r = raw_speed(engine, model_paths[engine], threads, batch, tensors)
                        rate = r["images_per_s"]
                        raw[engine][f"{threads}x{batch}"] = round(rate, 1)
                        raw_cpu.setdefault(engine, {})[f"{threads}x{batch}"] = round(r["cpu_ms_per_image"], 2)
                        say(
                            f"raw {engine}, {threads} thread(s), batch {batch}: {rate:.1f} img/s, "
                            f"{r['cpu_ms_per_image']:.2f} ms CPU per image"
                        )
            tensors.unlink()
            extra["raw_by_engine_threads_x_batch"] = raw
            extra["raw_cpu_ms_per_image"] = raw_cpu

        jobs: dict[str, dict[str, Any]] = {}
        if "job" not in skip:
            moto_pid = int(pidfile.read_text())
            for engine in engines:
                say(f"embed job, engine={engine}: warm-up run")
                warm = run_embed(catalog, s, engine, f"bench-{engine}-warmup", tuning=tuning)
                say(f"  warm-up: {warm['files'] / warm['action_seconds']:.1f} img/s; timed run")
                rss, cpu = WorkerRss(), CpuMonitor(moto_pid)
                rss.start()
                cpu.start()
                m = run_embed(catalog, s, engine, f"bench-{engine}-timed", tuning=tuning)
                for monitor in (rss, cpu):
                    monitor.stop.set()
                    monitor.join()
                used = cpu.between(*m["action_window_unix"])
                used["others_on_machine"] = round(used.pop("machine_busy") - sum(used.values()), 1)
                moto_cpu = used.get("s3_server", 0.0)
                if m["embedded"] != len(images):
                    raise RuntimeError(f"the job embedded {m['embedded']} of {len(images)} images")
                rate = m["files"] / m["action_seconds"]
                # CPU per photo: the engine's own (summed in the workers around each forward call), and
                # everything else the job's processes spent (JVM + Python workers), S3 server excluded.
                if "engine_cpu_seconds" in m:
                    model_ms, model_source = 1000 * m["engine_cpu_seconds"] / m["files"], "job"
                else:  # a job that does not meter its engine: the raw engine's CPU per photo instead
                    key = f"{tuning.threads_per_task}x{MODEL_BATCH}"
                    model_ms, model_source = raw_cpu.get(engine, {}).get(key, 0.0), f"raw {key}"
                job_ms = 1000 * (used.get("python_workers", 0.0) + used.get("spark_jvm", 0.0)) / m["files"]
                jobs[engine] = {
                    "model_cpu_ms_per_image": round(model_ms, 2),
                    "model_cpu_from": model_source,
                    "overhead_cpu_ms_per_image": round(job_ms - model_ms, 2),
                    "python_outside_engine_cpu_ms_per_image": round(
                        1000 * used.get("python_workers", 0.0) / m["files"] - model_ms, 2
                    ),
                    "jvm_cpu_ms_per_image": round(1000 * used.get("spark_jvm", 0.0) / m["files"], 2),
                    "efficiency_cpu": round(model_ms / job_ms, 3) if job_ms else None,
                    "images_per_s": round(rate, 1),
                    "action_s": m["action_seconds"],
                    "compute_s": m["compute_seconds"],
                    "write_s": m["write_seconds"],
                    "worker_peak_rss_mb": rss.peak_mb(),
                    "s3_server_cpu_s": round(moto_cpu, 1),
                    # CPU seconds used during the action, by whom; the machine has cores x action_s.
                    "cpu_s_during_action": used,
                }
                say(
                    f"  {engine}: {m['files']} images, action {m['action_seconds']:.1f} s (compute "
                    f"{m['compute_seconds']:.1f} + write {m['write_seconds']:.1f}) = {rate:.1f} img/s; worker "
                    f"peak RSS {rss.peak_mb():.0f} MB"
                )
                say(f"  CPU seconds during the action ({cores} cores x {m['action_seconds']:.0f} s): {used}")
                say(
                    f"  CPU per photo: engine {model_ms:.2f} ms, overhead (JVM + workers outside the engine) "
                    f"{job_ms - model_ms:.2f} ms"
                )
            extra["job_by_engine"] = jobs
            if default_engine in jobs:
                out["engine"] = default_engine
                out["job_images_per_s"] = jobs[default_engine]["images_per_s"]
                out["worker_peak_rss_mb"] = jobs[default_engine]["worker_peak_rss_mb"]
                out["overhead_cpu_ms_per_image"] = jobs[default_engine]["overhead_cpu_ms_per_image"]
                out["efficiency_cpu"] = jobs[default_engine]["efficiency_cpu"]
        if default_engine in raw:
            best = max(raw[default_engine], key=lambda t: raw[default_engine][t])
            out["raw_images_per_s"] = raw[default_engine][best]
            extra["raw_best_threads_x_batch"] = best
            if "job_images_per_s" in out:
                out["efficiency"] = round(out["job_images_per_s"] / out["raw_images_per_s"], 3)
        if "tf" in raw and "tf" in jobs:
            out["tf_vs_raw_tf"] = round(jobs["tf"]["images_per_s"] / max(raw["tf"].values()), 3)
            extra["raw_tf_images_per_s"] = max(raw["tf"].values())

        if "pca" not in skip:
            t0 = time.monotonic()
            synthetic_embeddings(hook)
            say(f"100,000 x 1280 synthetic embeddings written to S3 ({time.monotonic() - t0:.0f} s)")
            params = planning.parse_params({"refit": True, "batch_ids": [SYNTHETIC_BATCH]}, s)
            plan = planning.build_plan(catalog, params, [SYNTHETIC_BATCH], "bench-pca", s)
            t0 = time.monotonic()
            run_local_step("pca", plan["pca_args"], s, spark_log("bench-pca"), tuning=tuning)
            seconds = time.monotonic() - t0
            m = catalog.read_json(f"{plan['run_prefix']}pca.json") or {}
            out["pca_refit_s"] = round(seconds, 1)
            extra["pca"] = {k: m.get(k) for k in ("rows", "k", "fit_seconds", "seconds")}
            say(f"PCA refit on 100,000 x 1280, whole spark-submit: {seconds:.1f} s; {extra['pca']}")

        if args.curve:
            extra["curve"] = curve(
                catalog, s, tuning, engines, cores, [int(b) for b in args.curve_batches.split(",")]
            )
    finally:
        devstack.s3_stop(pidfile)
    extra["load_1min_end"] = load_avg()
    print()
    for key, value in {**out, **extra}.items():
        print(f"{key:>24}: {value}")
    keys = ["job_images_per_s", "raw_images_per_s", "efficiency", "overhead_cpu_ms_per_image"]
    keys += ["efficiency_cpu", "tf_vs_raw_tf", "small_run_s", "decode_images_per_s"]
    keys += ["worker_peak_rss_mb", "pca_refit_s", "noop_run_s", "engine", "images"]
    print(json.dumps({**{k: out[k] for k in keys if k in out}, **extra}))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_raw":
        sys.path.insert(0, str(REPO / "spark_jobs"))
        raw_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
        sys.exit(0)
    sys.exit(main())
