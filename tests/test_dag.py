"""The DAG as Airflow parses it: its shape, its schedule and its trigger form, in seconds.

Real: Airflow's DagBag parsing dags/ with plugins/ on the path (as the scheduler does), the DAG's own
Param objects validated by Airflow's JSON-schema code, and fruits.plan.parse_params. Nothing runs, so no
S3 server, Spark or metadata database is needed: these are the suite's fast tests.
"""

from __future__ import annotations

import warnings
from functools import cache

import pytest
from conftest import REPO

pytestmark = pytest.mark.fast

DAG_ID = "fruits_embeddings"


@cache
def parsed() -> tuple[object, list[warnings.WarningMessage]]:
    from airflow.dag_processing.dagbag import DagBag

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bag = DagBag(dag_folder=str(REPO / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags[DAG_ID], list(caught)


def dag():
    return parsed()[0]


def test_dag_parses_without_warnings_from_our_code():
    _, caught = parsed()
    ours = [
        f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}"
        for w in caught
        if str(REPO) in str(w.filename)
    ]
    assert not ours, "\n".join(ours)


def test_schedule_catchup_and_concurrency():
    d = dag()
    assert d.schedule == "@daily"
    assert d.catchup is False, "a DAG that catches up would start one run per missed day"
    assert d.max_active_runs == 1, "two runs at once would race for the same batches and the model pointer"
    assert d.start_date is not None and d.start_date.tzinfo is not None


def test_every_param_default_is_valid_and_described():
    params = dag().params
    resolved = params.validate()  # raises ParamValidationError on a default its own schema refuses
    assert set(resolved) == set(params.keys())
    undocumented = [k for k in params if not params.get_param(k).description]
    assert not undocumented, f"the trigger form shows no help for {undocumented}"


@pytest.mark.parametrize(
    "name, bad",
    [
        ("pca_k", 0),
        ("pca_k", 1281),
        ("max_k", 0),
        ("variance_target", 0),
        ("variance_target", 1.5),
        ("compute", "gpu"),
        ("engine", "torch"),
        ("pca_mode", "auto"),
        ("force", "yes"),
        ("batch_ids", "b1"),
    ],
)
def test_the_trigger_form_refuses_out_of_range_values(name, bad):
    from airflow.sdk.definitions.param import Param

    original = dag().params.get_param(name)
    param = Param(bad, **original.schema)
    with pytest.raises(Exception, match="(?i)valid|not|less|greater|enum|type|minimum|maximum"):
        param.resolve()


def test_batch_ids_null_from_the_trigger_form_means_every_ready_batch():
    from airflow.sdk.definitions.param import Param
    from fruits.config import settings
    from fruits.plan import parse_params

    schema = dag().params.get_param("batch_ids").schema
    assert Param(None, **schema).resolve() is None  # the form sends null when the field is left empty
    assert parse_params({"batch_ids": None}, settings()).batch_ids == ()
    assert parse_params({"batch_ids": "a, b"}, settings()).batch_ids == ("a", "b")


def _setups_of(task_id: str) -> set[str]:
    d = dag()
    task = d.get_task(task_id)
    assert task.is_teardown, f"{task_id} must be a teardown"
    return {u for u in task.upstream_task_ids if d.get_task(u).is_setup}


def test_each_teardown_is_paired_with_what_it_undoes():
    assert _setups_of("emr.terminate_cluster") == {"emr.create_cluster"}
    assert _setups_of("release_claims") == {"claim_batches"}
    d = dag()
    teardowns = {t.task_id for t in d.tasks if t.is_teardown}
    assert teardowns == {"emr.terminate_cluster", "release_claims"}
    for task_id in teardowns:
        assert str(d.get_task(task_id).trigger_rule) in (
            "all_done_setup_success",
            "TriggerRule.ALL_DONE_SETUP_SUCCESS",
        )


def test_every_step_is_watched_before_the_cluster_ends():
    d = dag()
    terminate = d.get_task("emr.terminate_cluster")
    assert "emr.watch_steps" in terminate.upstream_task_ids
    watch = d.get_task("emr.watch_steps")
    assert "emr.add_steps" in watch.upstream_task_ids
    # The sensor is mapped over the step ids add_steps returns: every step, not the first only.
    assert type(watch).__name__ == "MappedOperator"


def test_validate_waits_for_either_compute_path_and_fails_on_a_failed_step():
    d = dag()
    validate = d.get_task("validate")
    assert {"pca", "emr.watch_steps"} <= validate.upstream_task_ids
    assert "none_failed_min_one_success" in str(validate.trigger_rule).lower()
    assert str(d.get_task("commit").trigger_rule).lower().endswith("all_success")


def readme_parameter_defaults() -> dict[str, object]:
    """{param: default} as the README's parameters table states them "out of the box" (a backticked value
    in parentheses wins over the setting's name; "BUCKET" is the form's `{bucket}`, filled in at run time)."""
    import json
    import re

    text = (REPO / "README.md").read_text()
    table = text.split("### Parameters (the trigger form in the UI)", 1)[1].split("\n### ", 1)[0]
    out: dict[str, object] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([a-z_]+)`", cells[0])
        values = [v.strip() for v in cells[1].split(", ")] if len(names) > 1 else [cells[1]]
        assert len(values) == len(names), line
        for name, value in zip(names, values, strict=True):
            inner = re.search(r"\((`?)([^)`]+)\1", value)
            raw = (inner.group(2) if inner and "FRUITS_" in value else value).strip("`").replace(",", "")
            raw = raw.replace("BUCKET", "{bucket}")
            try:
                out[name] = json.loads(raw)
            except ValueError:
                out[name] = raw
    return out


def test_the_trigger_forms_defaults_are_the_readmes():
    import os

    overridden = [k for k in os.environ if k in ("FRUITS_COMPUTE", "FRUITS_ENGINE", "FRUITS_REGION")]
    assert not overridden, f"these settings would change the defaults under test: {overridden}"
    stated = readme_parameter_defaults()
    form = dag().params.validate()
    assert set(stated) == set(form), "the README's table and the trigger form list different params"
    for name, value in stated.items():
        assert form[name] == value, f"{name}: the form's default is {form[name]!r}, the README says {value!r}"
    from fruits.config import settings

    s = settings()
    assert (
        s.resolve(form["weights_uri"]) == f"s3://{s.bucket}/artifacts/models/mobilenet_v2_1.0_224_no_top.h5"
    )
