"""Claims under a real race: many runs claim the same batch at the same instant; exactly one wins.

Real: the local S3 server (moto behind scripts/counting_s3.py, over HTTP on localhost), the amazon
provider's S3Hook, and fruits.catalog.Catalog.claim, called from concurrent threads that each hold their
own hook and client and are released together by a barrier, so their conditional PUTs reach the server
at once. moto alone checks If-None-Match and then writes without holding anything in between, so two
writers could both win there (seen: 1 round in 40 with 8 writers, so not every run shows it); the
counting server makes conditional writes atomic, as S3 does. Seen failing: a claim written without
If-None-Match gives 8 winners in the first round.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta

import pytest
from conftest import BUCKET, s3_hook

pytestmark = pytest.mark.fast  # no Spark, no DAG run (`make test-fast`)

WRITERS = 8
ROUNDS = 25
LEASE = timedelta(hours=1)


def _catalog():
    """A catalog with a hook and client of its own (conftest.s3_hook() is one shared hook)."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook
    from fruits.catalog import Catalog
    from fruits.layout import Layout

    return Catalog(S3Hook(aws_conn_id="aws_default"), Layout(BUCKET))


@pytest.fixture(scope="module")
def catalogs(bucket):
    """One catalog (hook and client) per writer, built before any start line and reused every round."""
    out = [_catalog() for _ in range(WRITERS)]
    for c in out:
        c.hook.get_conn()
    return out


def _race(catalogs, batch_id: str) -> list[str]:
    """Every writer claims batch_id at once; returns the run ids that were told they hold it."""
    start = threading.Barrier(WRITERS)
    winners: list[str] = []
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        run_id = f"run-{i}"
        try:
            start.wait()
            if catalogs[i].claim(batch_id, run_id, LEASE):
                winners.append(run_id)
        except BaseException as exc:  # a crash must fail the test, not hide as "did not win"
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return winners


def test_exactly_one_of_many_simultaneous_claims_wins_every_round(catalogs):
    for r in range(ROUNDS):
        batch = f"race-{r:03d}"
        winners = _race(catalogs, batch)
        assert len(winners) == 1, f"round {r}: {len(winners)} runs hold {batch}: {winners}"
        holder = json.loads(s3_hook().read_key(f"ledger/claims/{batch}.json", BUCKET))
        assert holder["run_id"] == winners[0], "the claim object must name the run that was told it won"


def test_exactly_one_run_takes_over_an_expired_claim(catalogs):
    """The takeover of a dead run's claim is an If-Match write on the expired object: one winner too."""
    for r in range(ROUNDS // 5):
        batch = f"expired-{r:03d}"
        past = datetime.now(UTC) - timedelta(hours=2)
        s3_hook().load_string(
            json.dumps(
                {"run_id": "dead-run", "claimed_at": past.isoformat(), "expires_at": past.isoformat()}
            ),
            f"ledger/claims/{batch}.json",
            BUCKET,
            replace=True,
        )
        winners = _race(catalogs, batch)
        assert len(winners) == 1, f"round {r}: {len(winners)} runs took over {batch}: {winners}"
        holder = json.loads(s3_hook().read_key(f"ledger/claims/{batch}.json", BUCKET))
        assert holder["run_id"] == winners[0]


@pytest.mark.parametrize("held_by_self", [True, False])
def test_a_live_claim_is_kept_and_reentrant(bucket, held_by_self):
    catalog = _catalog()
    batch = f"live-{held_by_self}"
    assert catalog.claim(batch, "owner", LEASE)
    assert catalog.claim(batch, "owner" if held_by_self else "intruder", LEASE) is held_by_self
