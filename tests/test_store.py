"""The service's job store on a real SQLite file and a real PostgreSQL server: numbered migrations upgrade an older
database in place, idempotent submission, and job claims that let several replicas share one queue."""

import sqlite3
import threading
import time

import pytest

pytest.importorskip("sqlalchemy")

from locpath.serve.store import MIGRATIONS, JobStore  # noqa: E402

NEWEST = max(v for v, _ in MIGRATIONS)


def test_an_older_sqlite_database_is_migrated_in_place(tmp_path):
    db = tmp_path / "old.db"
    con = sqlite3.connect(db)  # the schema locpath wrote before job ownership (migrations 1 and 2)
    con.executescript("""
        CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied FLOAT NOT NULL);
        INSERT INTO schema_migrations VALUES (1, 0), (2, 0);
        CREATE TABLE slides (id VARCHAR(32) PRIMARY KEY, name VARCHAR(512) NOT NULL, source_kind VARCHAR(16) NOT NULL,
            source TEXT NOT NULL, path TEXT NOT NULL, status VARCHAR(16) NOT NULL, progress FLOAT NOT NULL,
            tiles INTEGER, tokens INTEGER, error TEXT, client_key VARCHAR(128) UNIQUE, created FLOAT NOT NULL,
            updated FLOAT NOT NULL);
        CREATE TABLE jobs (id VARCHAR(32) PRIMARY KEY, kind VARCHAR(16) NOT NULL, slide_id VARCHAR(32) NOT NULL,
            status VARCHAR(16) NOT NULL, progress FLOAT NOT NULL, request TEXT NOT NULL, result TEXT, error TEXT,
            client_key VARCHAR(128) UNIQUE, attempts INTEGER NOT NULL, created FLOAT NOT NULL, started FLOAT,
            finished FLOAT);
        CREATE TABLE api_keys (id VARCHAR(32) PRIMARY KEY, name VARCHAR(128) NOT NULL UNIQUE,
            hash VARCHAR(64) NOT NULL UNIQUE, scopes VARCHAR(64) NOT NULL, created FLOAT NOT NULL, revoked FLOAT);
        INSERT INTO jobs VALUES ('aaaaaaaaaaaaaaaa', 'ingest', 'bbbbbbbbbbbbbbbb', 'running', 0.5, '{}', NULL, NULL,
            NULL, 1, 1.0, 2.0, NULL);
    """)
    con.close()
    store = JobStore(f"sqlite:///{db}")
    assert store.schema_version() == NEWEST
    job = store.job("aaaaaaaaaaaaaaaa")
    assert job.status == "running" and job.owner is None and job.key_id is None  # kept, with the new columns
    assert [j.id for j in store.unfinished_ingestions()] == ["aaaaaaaaaaaaaaaa"]
    assert store.claim("aaaaaaaaaaaaaaaa", "replica-1")  # an owner-less running job is free to resume
    assert store.job("aaaaaaaaaaaaaaaa").attempts == 2
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
    newer = sqlite3.connect(db)
    newer.execute("INSERT INTO schema_migrations VALUES (99, 0)")
    newer.commit()
    newer.close()
    from locpath.serve.store import StoreError

    with pytest.raises(StoreError, match="schema version 99 is newer than this locpath"):
        JobStore(f"sqlite:///{db}")


def _exercise(store: JobStore) -> None:
    slide, created = store.add_slide("a.svs", "path", "/x/a.svs", "/x/a.svs", client_key="k1")
    again, created2 = store.add_slide("a.svs", "path", "/x/a.svs", "/x/a.svs", client_key="k1")
    assert created and not created2 and again.id == slide.id and len(store.slides()) == 1
    job, _ = store.add_job("ingest", slide.id, {"source": "/x/a.svs"})
    wins = []
    barrier = threading.Barrier(4)

    def claim(owner):
        barrier.wait()
        if store.claim(job.id, owner):
            wins.append(owner)

    threads = [threading.Thread(target=claim, args=(f"replica-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1  # of four replicas, exactly one runs it
    winner = wins[0]
    assert not store.claim(job.id, "latecomer")
    store.heartbeat(job.id, winner, progress=0.5)
    assert store.job(job.id).progress == 0.5
    time.sleep(0.2)
    assert store.claim(job.id, "latecomer", stale_after=0.1)  # the winner went silent: taken over
    assert store.job(job.id).owner == "latecomer" and store.job(job.id).attempts == 2
    store.update_job(job.id, status="done", result={"tiles": 3}, finished=time.time())
    assert store.job(job.id).to_dict()["result"] == {"tiles": 3} and store.unfinished_ingestions() == []
    assert store.job_counts()[("ingest", "done")] == 1


def _lost_instance(store: JobStore) -> None:
    """Replica A goes silent with a queued and a running ingestion and a question in flight; replica B, alive, takes
    the ingestions over (each to exactly one of two sweepers) and closes the question; B's own work is untouched."""
    slide, _ = store.add_slide("b.svs", "path", "/x/b.svs", "/x/b.svs")
    queued, _ = store.add_job("ingest", slide.id, {}, owner="A")
    running, _ = store.add_job("ingest", slide.id, {}, owner="A")
    question, _ = store.add_job("question", slide.id, {}, owner="A")
    mine, _ = store.add_job("question", slide.id, {}, owner="B")
    store.beat("A")
    assert store.claim(running.id, "A")
    store.beat("B")
    store.beat("C")
    assert store.adopt_ingestions("B", stale_after=30) == []  # A is alive: nothing to take
    assert store.abandon_questions("B", include_own=False, stale_after=30) == 0
    time.sleep(0.3)
    store.beat("B")
    store.beat("C")
    results: dict[str, list] = {}
    barrier = threading.Barrier(2)

    def sweep(owner):
        barrier.wait()
        results[owner] = [j.id for j in store.adopt_ingestions(owner, stale_after=0.2)]

    threads = [threading.Thread(target=sweep, args=(o,)) for o in ("B", "C")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    taken = sorted(results["B"] + results["C"])
    assert taken == sorted([queued.id, running.id])  # each job to exactly one sweeper
    owner_of_running = "B" if running.id in results["B"] else "C"
    assert store.claim(running.id, owner_of_running)  # the adopter may run it at once
    assert store.abandon_questions("B", include_own=False, stale_after=0.2) == 1
    assert store.job(question.id).status == "cancelled" and store.job(mine.id).status == "queued"
    assert store.abandon_questions("B", include_own=True, stale_after=0.2) == 1  # a restart closes its own
    assert store.job(mine.id).status == "cancelled"


def test_sqlite_store(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'locpath.db'}")
    _exercise(store)
    _lost_instance(store)


def test_postgresql_store(postgres_url):
    store = JobStore(postgres_url)
    assert store.schema_version() == NEWEST
    _exercise(store)
    _lost_instance(store)
    store.close()
