"""Small Spark-side I/O helpers that go through Hadoop's FileSystem, so they work on s3a:// locally
and on s3:// (EMRFS) on EMR without any AWS client in the job."""

from __future__ import annotations

import json
import logging
import sys

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import StructType


def get_logger(name: str) -> logging.Logger:
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return logging.getLogger(name)


def session(app_name: str) -> SparkSession:
    """The steps' SparkSession, with the settings both rely on."""
    spark = SparkSession.builder.appName(app_name).getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    spark.conf.set("spark.sql.sources.partitionOverwriteMode", "dynamic")
    # batch_id=2026 read back is the string "2026", as the manifest and the batch lists name it
    spark.conf.set("spark.sql.sources.partitionColumnTypeInference.enabled", "false")
    return spark


def _fs_and_path(spark: SparkSession, uri: str):
    jvm = spark.sparkContext._jvm
    path = jvm.org.apache.hadoop.fs.Path(uri)
    return path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()), path


def exists(spark: SparkSession, uri: str) -> bool:
    fs, path = _fs_and_path(spark, uri)
    return bool(fs.exists(path))


def delete(spark: SparkSession, uri: str) -> None:
    fs, path = _fs_and_path(spark, uri)
    if fs.exists(path):
        fs.delete(path, True)


def write_text(spark: SparkSession, uri: str, text: str) -> None:
    fs, path = _fs_and_path(spark, uri)
    stream = fs.create(path, True)
    try:
        stream.write(bytearray(text.encode("utf-8")))
    finally:
        stream.close()


def write_bytes(spark: SparkSession, uri: str, data: bytes) -> None:
    fs, path = _fs_and_path(spark, uri)
    stream = fs.create(path, True)
    try:
        stream.write(bytearray(data))
    finally:
        stream.close()


def read_bytes(spark: SparkSession, uri: str) -> bytes:
    fs, path = _fs_and_path(spark, uri)
    stream = fs.open(path)
    try:
        return bytes(spark.sparkContext._jvm.org.apache.commons.io.IOUtils.toByteArray(stream))
    finally:
        stream.close()


def read_text(spark: SparkSession, uri: str) -> str:
    """A small file's text, read by the driver (a Spark job would cost more than the read)."""
    return read_bytes(spark, uri).decode("utf-8")


def map_in_arrow(frame: DataFrame, fn, schema: StructType | str) -> DataFrame:
    """`frame.mapInArrow(fn, schema)`, without importing pandas in the driver.

    PySpark 3.5 builds a mapInArrow UDF through `pandas_udf`, whose version check imports pandas: 1.5 to 2
    s of every step's driver, for functions that only ever see Arrow batches. This builds the same UDF
    (evaluation type SQL_MAP_ARROW_ITER_UDF) and the same plan node directly; a PySpark without that
    JVM method (another version) gets the public call."""
    from py4j.protocol import Py4JError, Py4JJavaError
    from pyspark.rdd import PythonEvalType
    from pyspark.sql.udf import UserDefinedFunction

    udf = UserDefinedFunction(fn, returnType=schema, evalType=PythonEvalType.SQL_MAP_ARROW_ITER_UDF)
    column = udf(*[frame[c] for c in frame.columns])
    try:
        jdf = frame._jdf.pythonMapInArrow(column._jc.expr(), False)
    except Py4JJavaError:
        raise  # the JVM refused the plan itself: the public call would fail the same way, a second time
    except Py4JError:  # no such method on this Spark's Dataset
        return frame.mapInArrow(fn, schema)
    return DataFrame(jdf, frame.sparkSession)


def write_json(spark: SparkSession, uri: str, payload: dict) -> None:
    write_text(spark, uri, json.dumps(payload, indent=2, sort_keys=True))


def remove_partitions_not_written(
    spark: SparkSession, table_uri: str, batches: list[str], written: set[str]
) -> None:
    """Dynamic partition overwrite only replaces partitions it writes: a re-run that now produces no row
    for a batch (say, no rejects this time) must still drop that batch's stale partition."""
    for batch in batches:
        if batch not in written:
            delete(spark, f"{table_uri.rstrip('/')}/batch_id={batch}")
