"""The ONNX Runtime engine's model file: exported once per weights version, staged in S3, never trusted blind.

`ensure_onnx` returns the s3:// URI of an ONNX export of the run's weights. The export lives at
`artifacts/models/<weights sha12>/mobilenet_v2_avgpool.onnx` with a JSON manifest beside it, written last,
that holds the file's SHA-256 and the weights' SHA-256. A staged file is reused only when the manifest
names these weights and the object's bytes hash to the manifest's checksum; anything else (no manifest, a
stale or corrupt file) is replaced. The export itself runs `python -m fruits_jobs.onnx_export` in a child
process, so TensorFlow never loads into the Airflow task, and it is kept in the machine's ONNX cache
(`FRUITS_ONNX_CACHE_DIR`, checked like the staged copy) so that a new bucket on the same machine does not
pay for it again. Two runs that need the same export at once (the suite's two workers, two DAG runs) take
a lock on it: one exports, the other waits and uploads that copy.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fruits.catalog import Catalog, CatalogError, sha256_stream
from fruits.config import Settings

log = logging.getLogger(__name__)
MIN_PROBE_COSINE = 0.999


class OnnxExportFailed(RuntimeError):
    pass


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return sha256_stream(handle)


def _trusted(manifest: dict[str, Any] | None, weights_sha: str) -> bool:
    return (
        manifest is not None
        and manifest.get("weights_sha256") == weights_sha
        and float(manifest.get("probe", {}).get("min_cosine", 0.0)) >= MIN_PROBE_COSINE
        and isinstance(manifest.get("onnx_sha256"), str)
    )


def _staged_ok(catalog: Catalog, key: str, weights_sha: str) -> bool:
    """The S3 copy is usable: its manifest names these weights and its bytes match the manifest."""
    try:
        manifest = catalog.read_json(key + ".json")
    except CatalogError:  # a damaged manifest: export again rather than stop the pipeline
        return False
    if not _trusted(manifest, weights_sha):
        return False
    assert manifest is not None
    if not catalog.hook.check_for_key(key, catalog.bucket):
        return False
    return catalog.object_sha256(key) == manifest["onnx_sha256"]


def _local_ok(onnx_path: Path, manifest_path: Path, weights_sha: str) -> bool:
    if not (onnx_path.exists() and manifest_path.exists()):
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return False
    return _trusted(manifest, weights_sha) and _sha256_file(onnx_path) == manifest["onnx_sha256"]


def _download_weights(catalog: Catalog, weights_uri: str, folder: Path) -> str:
    if weights_uri == "imagenet":
        return weights_uri
    bucket, _, key = weights_uri[len("s3://") :].partition("/")
    target = folder / os.path.basename(key)
    catalog.hook.get_key(key, bucket).download_file(str(target))
    return str(target)


def cache_folder(s: Settings, weights_sha: str) -> Path:
    """The machine's folder for this weights version's export: the shared cache, or the run's work folder
    where the cache cannot be written (a read-only install)."""
    for root in (s.onnx_cache_dir, s.work_dir / "onnx"):
        folder = root / weights_sha[:12]
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return folder
        except OSError:
            continue
    raise OnnxExportFailed(f"neither {s.onnx_cache_dir} nor {s.work_dir / 'onnx'} can be written")


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One process at a time checks, exports or reads the folder's export (an advisory lock the kernel
    drops when its holder dies, so a killed export never blocks the next run)."""
    with open(folder.parent / f"{folder.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def export_locally(
    catalog: Catalog, weights_uri: str, weights_sha: str, s: Settings, folder: Path | None = None
) -> tuple[Path, Path]:
    """Run the exporter in a child process; returns (onnx file, manifest file) in the cache folder."""
    folder = folder or cache_folder(s, weights_sha)
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path, manifest_path = folder / "mobilenet_v2_avgpool.onnx", folder / "mobilenet_v2_avgpool.onnx.json"
    weights = _download_weights(catalog, weights_uri, folder)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(s.jobs_dir), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    argv = [s.spark_python, "-m", "fruits_jobs.onnx_export", "--weights", weights]
    argv += ["--out", str(onnx_path), "--manifest", str(manifest_path)]
    log.info("exporting MobileNetV2 to ONNX for weights %s (once per weights version)", weights_sha[:12])
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, errors="replace")
    if weights != "imagenet":
        Path(weights).unlink(missing_ok=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise OnnxExportFailed(f"ONNX export failed (exit {proc.returncode}):\n{tail}")
    if not _local_ok(onnx_path, manifest_path, weights_sha):
        raise OnnxExportFailed(f"ONNX export in {folder} does not match its manifest or these weights")
    return onnx_path, manifest_path


def ensure_onnx(catalog: Catalog, weights_uri: str, weights_sha: str, s: Settings) -> tuple[str, str]:
    """(s3:// URI of a checked ONNX export of these weights, what was done: reused | uploaded | exported)."""
    key = catalog.layout.onnx_model_key(weights_sha)
    uri = catalog.layout.uri(key)
    if _staged_ok(catalog, key, weights_sha):
        log.info("ONNX model %s checked (sha256 matches its manifest): reused", uri)
        return uri, "reused"
    folder = cache_folder(s, weights_sha)
    onnx_path, manifest_path = folder / "mobilenet_v2_avgpool.onnx", folder / "mobilenet_v2_avgpool.onnx.json"
    action = "uploaded"
    with _locked(folder):
        if not _local_ok(onnx_path, manifest_path, weights_sha):
            shutil.rmtree(folder, ignore_errors=True)
            onnx_path, manifest_path = export_locally(catalog, weights_uri, weights_sha, s, folder)
            action = "exported"
        # The manifest goes last: a file without it (an interrupted upload) is never trusted.
        catalog.hook.load_file(str(onnx_path), key, catalog.bucket, replace=True)
        catalog.hook.load_file(str(manifest_path), key + ".json", catalog.bucket, replace=True)
    log.info("ONNX model staged at %s (%s)", uri, action)
    return uri, action
