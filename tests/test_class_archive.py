"""What a local step's processes start with (fruits.local_compute): the JVM class archive, written by a
step's first run on the machine, mapped by the next ones, never kept from a failed run; and the Python
path that makes them import the installed pyspark. Real files in a temporary folder and real Python
processes; the JVM itself is exercised by every local DAG run of the suite (test_pipeline and others),
and test_sparkio runs a real spark-submit with the Python path."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from fruits.config import settings
from fruits.local_compute import ARCHIVE_DUMP_MAX_S, class_archive, local_python_path

pytestmark = pytest.mark.fast


def archive_path(options: str, flag: str) -> str:
    found = [o.split("=", 1)[1] for o in options.split() if o.startswith(flag + "=")]
    assert len(found) == 1, options
    return found[0]


def test_first_run_writes_the_archive_next_runs_map_it(tmp_path):
    s = dataclasses.replace(settings(), jvm_archive_dir=str(tmp_path))
    conf = {"spark.driver.extraClassPath": "/jars/a.jar:/jars/b.jar"}
    options, publish = class_archive(s, "embed", conf)
    partial = tmp_path / archive_path(options, "-XX:ArchiveClassesAtExit")
    partial.write_bytes(b"archive")  # what the JVM writes at exit
    publish(True)
    [archive] = tmp_path.glob("embed-*.jsa")
    assert archive.read_bytes() == b"archive" and not partial.exists()

    options, _ = class_archive(s, "embed", conf)
    assert archive_path(options, "-XX:SharedArchiveFile") == str(archive)
    assert "-Xlog:cds=off" in options.split()
    # Another step, or another class path, is another archive: not mapped before it is written.
    assert "-XX:ArchiveClassesAtExit=" in class_archive(s, "pca", conf)[0]
    other = {"spark.driver.extraClassPath": "/jars/a.jar"}
    assert "-XX:ArchiveClassesAtExit=" in class_archive(s, "embed", other)[0]


def test_one_first_run_writes_the_archive_another_at_once_runs_without(tmp_path):
    """Two first runs of a step at once (the suite's two workers start with DAG runs): one dumps the
    archive, the other runs without rather than pay for the same dump; the next run maps it. A marker
    left by a run killed while it wrote is taken over once old enough."""
    s = dataclasses.replace(settings(), jvm_archive_dir=str(tmp_path))
    first, publish = class_archive(s, "embed", {})
    assert class_archive(s, "embed", {})[0] == ""  # the first one is writing it
    (tmp_path / archive_path(first, "-XX:ArchiveClassesAtExit")).write_bytes(b"archive")
    publish(True)
    assert "-XX:SharedArchiveFile=" in class_archive(s, "embed", {})[0]
    assert not list(tmp_path.glob("*.writing"))

    killed, _ = class_archive(s, "pca", {})  # never published: the run was killed
    assert "-XX:ArchiveClassesAtExit=" in killed and class_archive(s, "pca", {})[0] == ""
    [marker] = tmp_path.glob("pca-*.writing")
    old = time.time() - ARCHIVE_DUMP_MAX_S - 1
    os.utime(marker, (old, old))
    assert "-XX:ArchiveClassesAtExit=" in class_archive(s, "pca", {})[0]


def test_a_failed_run_leaves_no_archive_and_empty_setting_turns_it_off(tmp_path, monkeypatch):
    s = dataclasses.replace(settings(), jvm_archive_dir=str(tmp_path))
    options, publish = class_archive(s, "pca", {})
    partial = tmp_path / archive_path(options, "-XX:ArchiveClassesAtExit")
    partial.write_bytes(b"half an archive")
    publish(False)
    assert list(tmp_path.iterdir()) == []
    # README: FRUITS_JVM_ARCHIVE_DIR empty turns the archives off.
    monkeypatch.setenv("FRUITS_JVM_ARCHIVE_DIR", "")
    off = settings()
    assert off.jvm_archive_dir == ""
    assert class_archive(off, "pca", {})[0] == ""


def test_no_archive_with_a_folder_of_files_on_the_class_path(tmp_path, monkeypatch):
    """The JVM refuses to write an archive when a non-empty folder is on the class path, and then fails
    at exit: a step that had succeeded would fail. A SPARK_CONF_DIR with a spark-defaults.conf is one."""
    s = dataclasses.replace(settings(), jvm_archive_dir=str(tmp_path / "jvm"))
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    monkeypatch.setenv("SPARK_CONF_DIR", str(conf_dir))
    assert "-XX:ArchiveClassesAtExit=" in class_archive(s, "embed", {})[0]  # empty: allowed
    (conf_dir / "spark-defaults.conf").write_text("spark.eventLog.enabled true\n")
    assert class_archive(s, "embed", {})[0] == ""


def test_s3a_jars_on_the_class_path_locally_shipped_to_a_cluster(tmp_path):
    """A local driver is its own executor: the s3a jars go on its class path (and so into the archive).
    A Spark cluster's executors (docker-compose's worker) need them shipped: spark.jars."""
    from fruits.local_compute import SPARK_JARS, s3a_conf_and_env

    for jar in SPARK_JARS:
        (tmp_path / jar).write_bytes(b"")
    s = dataclasses.replace(settings(), spark_jars_dir=tmp_path)
    jars = [str(tmp_path / jar) for jar in SPARK_JARS]
    local, _ = s3a_conf_and_env(s.aws_conn_id, s, "local[2]")
    assert local["spark.driver.extraClassPath"] == ":".join(jars) and "spark.jars" not in local
    cluster, _ = s3a_conf_and_env(s.aws_conn_id, s, "spark://spark-master:7077")
    assert cluster["spark.jars"] == ",".join(jars) and "spark.driver.extraClassPath" not in cluster


def test_only_the_zips_of_an_installed_pyspark_are_dropped(tmp_path):
    """spark_jobs/local_site/sitecustomize.py, in Python processes started with the path spark-submit gives
    them (SPARK_HOME's zips first, then the local step's PYTHONPATH): with pip's pyspark as SPARK_HOME,
    pyspark and py4j come from the installed packages; a Spark installed elsewhere (EMR's, a cluster's
    own), whose zips may be the only copy, keeps them."""
    import py4j
    import pyspark

    installed = Path(pyspark.__file__).parent
    elsewhere = tmp_path / "spark"
    (elsewhere / "python" / "lib").mkdir(parents=True)
    for z in (installed / "python" / "lib").glob("*.zip"):
        shutil.copy(z, elsewhere / "python" / "lib")

    def imported_from(home: Path) -> list[str]:
        zips = [str(z) for z in sorted((home / "python" / "lib").glob("*.zip"))]
        assert len(zips) == 2, zips  # pyspark.zip and py4j's
        env = {**os.environ, "SPARK_HOME": str(home), "PYTHONPATH": os.pathsep.join(zips)}
        env["PYTHONPATH"] += os.pathsep + local_python_path(REPO / "spark_jobs")
        code = "import pyspark, py4j; print(pyspark.__file__); print(py4j.__file__)"
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert imported_from(installed) == [pyspark.__file__, py4j.__file__]
    kept = imported_from(elsewhere)
    assert kept[0].startswith(str(elsewhere / "python" / "lib" / "pyspark.zip")), kept
    assert kept[1].startswith(str(elsewhere / "python" / "lib" / "py4j-")), kept
