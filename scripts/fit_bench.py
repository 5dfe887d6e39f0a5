"""The PCA refit's fit over a synthetic history, from the fit sample and from a full read.

    python scripts/fit_bench.py [--rows 200000] [--batches 50]

A local S3 (moto) on a free port gets ROWS x 1280 float32 embeddings in BATCHES batch partitions (variance
falling off as a power law, as in make bench), plus the fit sample the embed step would keep for that
history: the bottom 30,000 rows by a hash of the path. Then the real pca.py runs twice through
run_local_step, each a refit of every batch (`fit_seconds` is the fit): once from the sample, transforming
one batch; once with no sample (the one-off full read of a history from before samples), re-transforming
every batch (the re-transform's rate, in chunks of 200 batches).
Ends with one JSON line. The sample's hash here is SHA-1 of the path (the job uses xxhash64): the fit
reads the sample's rows whichever hash chose them.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import bench  # noqa: E402

SAMPLE_ROWS = 30_000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--sample-only", action="store_true", help="skip the full-read refit")
    args = ap.parse_args()
    bench._configure_env()
    import devstack
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from fruits.catalog import Catalog
    from fruits.config import settings
    from fruits.layout import Layout
    from fruits.local_compute import run_local_step

    s = settings()
    bucket = bench.BUCKET
    pidfile = bench.BENCH_HOME / "moto-fit.pid"
    bench.BENCH_HOME.mkdir(parents=True, exist_ok=True)
    devstack.s3_start(pidfile)
    out: dict = {"rows": args.rows, "batches": args.batches, "load_1min_start": bench.load_avg()}
    try:
        hook = devstack.hook()
        devstack.ensure_bucket(bucket)
        client = hook.get_conn()
        catalog = Catalog(hook, Layout(bucket))
        rng = np.random.default_rng(7)
        scale = (np.arange(1, 1281) ** -0.63).astype(np.float32)
        rotation = np.linalg.qr(rng.normal(size=(1280, 1280)))[0].astype(np.float32)
        per = args.rows // args.batches
        batches = [f"hist-{i:05d}" for i in range(args.batches)]
        kept: list[tuple[float, str, str, np.ndarray]] = []
        t0 = time.monotonic()
        for b in batches:
            x = (rng.normal(size=(per, 1280)).astype(np.float32) * scale) @ rotation + 0.5
            paths = [f"s3://{bucket}/incoming/{b}/label-{j % 100}/{j}.jpg" for j in range(per)]
            vectors = pa.ListArray.from_arrays(
                pa.array(np.arange(0, per * 1280 + 1, 1280, dtype=np.int32)), pa.array(x.reshape(-1))
            )
            table = pa.table(
                {
                    "path": paths,
                    "label": [f"label-{j % 100}" for j in range(per)],
                    "content_sha256": ["0" * 64] * per,
                    "size_bytes": pa.array([7000] * per, pa.int64()),
                    "embedding": vectors,
                    "model_id": ["synthetic"] * per,
                    "engine": ["synthetic"] * per,
                }
            )
            buf = io.BytesIO()
            pq.write_table(table, buf)
            client.put_object(
                Bucket=bucket, Key=f"embeddings/batch_id={b}/part-00000.parquet", Body=buf.getvalue()
            )
            for j, p in enumerate(paths):
                h = int(hashlib.sha1(p.encode()).hexdigest()[:15], 16) / 16**15
                kept.append((h, p, b, x[j].copy()))
            kept.sort(key=lambda r: (r[0], r[1]))
            del kept[SAMPLE_ROWS:]
        out["history_write_s"] = round(time.monotonic() - t0, 1)
        rows = len(kept)
        sample = pa.table(
            {
                "batch_id": [r[2] for r in kept],
                "path": [r[1] for r in kept],
                "label": ["x"] * rows,
                "embedding": pa.ListArray.from_arrays(
                    pa.array(np.arange(0, rows * 1280 + 1, 1280, dtype=np.int32)),
                    pa.array(np.stack([r[3] for r in kept]).reshape(-1)),
                ),
                "stratum": ["all"] * rows,
                "h": [r[0] for r in kept],
            }
        )
        buf = io.BytesIO()
        pq.write_table(sample, buf)
        client.put_object(Bucket=bucket, Key="samples/fit/run=bench/part-00000.parquet", Body=buf.getvalue())
        state = {
            "base": [f"s3://{bucket}/samples/fit/run=bench"],
            "deltas": [],
            "threshold": {"all": kept[-1][0]},
            "size": SAMPLE_ROWS,
            "rows": rows,
        }
        runs = (("sample", True),) if args.sample_only else (("sample", True), ("full_read", False))
        for name, with_sample in runs:
            run = f"runs/fit-bench-{name}/"
            # the sample's run transforms one batch; the full read's run re-transforms them all (the rate)
            transform = batches[:1] if with_sample else batches
            catalog.write_json(f"{run}pca_batches.json", {"fit": batches, "transform": transform})
            if with_sample:
                catalog.write_json(f"{run}sample_fit.json", state)
            argv = [
                "--embeddings-root", f"s3://{bucket}/embeddings",
                "--features-root", f"s3://{bucket}/features",
                "--model-root", f"s3://{bucket}/models/pca",
                "--version", f"pca-bench-{name.replace('_', '-')}",
                "--fit",
                "--batches-file", f"s3://{bucket}/{run}pca_batches.json",
                "--metrics-out", f"s3://{bucket}/{run}pca.json",
                "--validation-out", f"s3://{bucket}/{run}pca_validation.json",
                "--variance-target", "0.9",
                "--max-k", "256",
            ]  # fmt: skip
            t0 = time.monotonic()
            run_local_step("pca", argv, s, bench.spark_log(f"fit-bench-{name}"))
            m = catalog.read_json(f"{run}pca.json") or {}
            meta = catalog.pca_metadata(m["version"])
            out[f"{name}_spark_submit_s"] = round(time.monotonic() - t0, 1)
            out[f"{name}_fit_s"] = m.get("fit_seconds")
            out[f"{name}_fit_rows"] = meta["fit_rows"]
            out[f"{name}_k"] = meta["k"]
            out[f"{name}_transform_rows"] = m.get("rows")
            out[f"{name}_transform_s"] = m.get("transform_seconds")
            bench.say(f"{name}: {json.dumps({k: v for k, v in out.items() if k.startswith(name)})}")
    finally:
        devstack.s3_stop(pidfile)
    out["load_1min_end"] = bench.load_avg()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
