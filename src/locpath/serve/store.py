"""Slides, jobs and API keys in a real database, behind one small interface (SQLAlchemy Core): SQLite by default (a
file in the data folder, WAL journal, so readers never wait for the writer), any SQLAlchemy URL otherwise.

Schema changes are numbered migrations applied at start and recorded in `schema_migrations`, so an existing
database is upgraded in place. Jobs survive restarts: on start, ingestion jobs that were queued or running are
handed to the worker again, and finished results stay where they are. A client may name a request with its own
key (`client_key`); submitting the same key again returns the first job instead of making a second.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass

import sqlalchemy as sa

from ..errors import LocpathError

META = sa.MetaData()
SLIDES = sa.Table(
    "slides", META,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(512), nullable=False),
    sa.Column("source_kind", sa.String(16), nullable=False),  # path | upload | dicomweb
    sa.Column("source", sa.Text, nullable=False),  # the path, upload name or study/series UIDs
    sa.Column("path", sa.Text, nullable=False),  # what the pipeline opens
    sa.Column("status", sa.String(16), nullable=False),  # registered | ingesting | ready | failed
    sa.Column("progress", sa.Float, nullable=False, default=0.0),
    sa.Column("tiles", sa.Integer),
    sa.Column("tokens", sa.Integer),
    sa.Column("error", sa.Text),
    sa.Column("client_key", sa.String(128), unique=True),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("updated", sa.Float, nullable=False),
    sa.Column("identity", sa.Text),  # the file as registered: real path, device, inode, size, mtime, fingerprint
)
JOBS = sa.Table(
    "jobs", META,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),  # ingest | question
    sa.Column("slide_id", sa.String(32), nullable=False, index=True),
    sa.Column("status", sa.String(16), nullable=False, index=True),  # queued | running | done | failed | cancelled
    sa.Column("progress", sa.Float, nullable=False, default=0.0),
    sa.Column("request", sa.Text, nullable=False),
    sa.Column("result", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("client_key", sa.String(128), unique=True),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("started", sa.Float),
    sa.Column("finished", sa.Float),
    sa.Column("owner", sa.String(128)),  # the service instance (replica) running it
    sa.Column("heartbeat", sa.Float),  # last sign of life of that owner while running
)
KEYS = sa.Table(
    "api_keys", META,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(128), nullable=False, unique=True),
    sa.Column("hash", sa.String(64), nullable=False, unique=True),  # sha256 of the token; the token is never stored
    sa.Column("scopes", sa.String(64), nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("revoked", sa.Float),
)
INSTANCES = sa.Table(
    "instances", META,  # the service instances (replicas) sharing this database, and when each was last alive
    sa.Column("owner", sa.String(128), primary_key=True),
    sa.Column("started", sa.Float, nullable=False),
    sa.Column("seen", sa.Float, nullable=False),
)
MIGRATIONS_TABLE = sa.Table(
    "schema_migrations", META,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied", sa.Float, nullable=False),
)


def _v1(conn) -> None:
    for t in (SLIDES, JOBS, KEYS):
        t.create(conn, checkfirst=True)


def _v2(conn) -> None:
    sa.Index("ix_jobs_slide_status", JOBS.c.slide_id, JOBS.c.status).create(conn, checkfirst=True)


def _v3(conn) -> None:
    """Job ownership, so several service replicas share one queue of ingestion jobs (one claims each)."""
    have = {c["name"] for c in sa.inspect(conn).get_columns("jobs")}
    for name, kind in (("owner", "VARCHAR(128)"), ("heartbeat", "FLOAT")):
        if name not in have:
            conn.execute(sa.text(f"ALTER TABLE jobs ADD COLUMN {name} {kind}"))


def _v4(conn) -> None:
    """Instance liveness, so a replica's queued jobs and questions are taken over or closed when it is gone."""
    INSTANCES.create(conn, checkfirst=True)


def _v6(conn) -> None:
    """The slide file's identity at registration, so a file swapped afterwards is refused (serve/slide_files.py)."""
    if "identity" not in {c["name"] for c in sa.inspect(conn).get_columns("slides")}:
        conn.execute(sa.text("ALTER TABLE slides ADD COLUMN identity TEXT"))


MIGRATIONS = [(1, _v1), (2, _v2), (3, _v3), (4, _v4), (6, _v6)]
STALE_AFTER_S = 60.0  # an instance (or a running job's owner) not heard of for this long is gone
ACTIVE = ("queued", "running")


class StoreError(LocpathError):
    """The database cannot be opened or is from a newer locpath."""


@dataclass
class Record:
    """A row as a dict with attribute access."""

    row: dict

    def __getattr__(self, name):
        try:
            return self.row[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_dict(self) -> dict:
        d = dict(self.row)
        for k in ("request", "result"):
            if isinstance(d.get(k), str):
                d[k] = json.loads(d[k])
        d.pop("client_key", None)
        d.pop("identity", None)  # a slide file's real path and inode: the server's business
        return d


def new_id() -> str:
    return uuid.uuid4().hex[:16]


class JobStore:
    def __init__(self, url: str):
        self.url = url
        kw = {"connect_args": {"check_same_thread": False, "timeout": 30}} if url.startswith("sqlite") else {}
        try:
            self.engine = sa.create_engine(url, future=True, **kw)
        except Exception as exc:
            raise StoreError(f"{url}: cannot open the database ({exc})") from None
        if url.startswith("sqlite"):
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self._lock = threading.Lock()  # SQLite takes one writer at a time; callers need not know
        self.migrate()

    # -- schema -------------------------------------------------------------------------------------------------
    def migrate(self) -> int:
        try:
            with self.engine.begin() as conn:
                MIGRATIONS_TABLE.create(conn, checkfirst=True)
                done = {r[0] for r in conn.execute(sa.select(MIGRATIONS_TABLE.c.version))}
                newest = max(v for v, _ in MIGRATIONS)
                if done and max(done) > newest:
                    raise StoreError(f"{self.url}: database schema version {max(done)} is newer than this locpath "
                                     f"({newest}); upgrade locpath")
                for version, step in MIGRATIONS:
                    if version not in done:
                        step(conn)
                        conn.execute(MIGRATIONS_TABLE.insert().values(version=version, applied=time.time()))
        except sa.exc.SQLAlchemyError as exc:
            raise StoreError(f"{self.url}: cannot open the database ({str(exc).splitlines()[0][:200]})") from None
        return newest

    def schema_version(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.max(MIGRATIONS_TABLE.c.version))).scalar() or 0)

    # -- helpers --------------------------------------------------------------------------------------------------
    def _one(self, table, **where) -> Record | None:
        with self.engine.connect() as conn:
            q = sa.select(table)
            for k, v in where.items():
                q = q.where(table.c[k] == v)
            row = conn.execute(q).mappings().first()
        return Record(dict(row)) if row else None

    def _update(self, table, id_: str, **fields) -> None:
        with self._lock, self.engine.begin() as conn:
            conn.execute(table.update().where(table.c.id == id_).values(**fields))

    def _insert_once(self, table, values: dict) -> tuple[Record, bool]:
        """Insert, unless a row with the same client_key exists: then that row, and False."""
        key = values.get("client_key")
        with self._lock:
            if key:
                old = self._one(table, client_key=key)
                if old is not None:
                    return old, False
            with self.engine.begin() as conn:
                conn.execute(table.insert().values(**values))
        return Record(values), True

    # -- slides ---------------------------------------------------------------------------------------------------
    def add_slide(self, name: str, source_kind: str, source: str, path: str, client_key: str | None = None):
        now = time.time()
        return self._insert_once(SLIDES, dict(id=new_id(), name=name, source_kind=source_kind, source=source,
                                              path=path, status="registered", progress=0.0, tiles=None, tokens=None,
                                              error=None, client_key=client_key, created=now, updated=now))

    def slide(self, slide_id: str) -> Record | None:
        return self._one(SLIDES, id=slide_id)

    def slide_by_key(self, client_key: str) -> Record | None:
        return self._one(SLIDES, client_key=client_key)

    def slides(self) -> list[Record]:
        with self.engine.connect() as conn:
            return [Record(dict(r)) for r in conn.execute(sa.select(SLIDES).order_by(SLIDES.c.created)).mappings()]

    def update_slide(self, slide_id: str, **fields) -> None:
        self._update(SLIDES, slide_id, updated=time.time(), **fields)

    def delete_slide(self, slide_id: str) -> None:
        with self._lock, self.engine.begin() as conn:
            conn.execute(JOBS.delete().where(JOBS.c.slide_id == slide_id))
            conn.execute(SLIDES.delete().where(SLIDES.c.id == slide_id))

    # -- jobs -------------------------------------------------------------------------------------------------------
    def add_job(self, kind: str, slide_id: str, request: dict, client_key: str | None = None,
                owner: str | None = None):
        """`owner`: the instance whose queue the job goes to (so another can adopt it if that instance is lost)."""
        return self._insert_once(JOBS, dict(id=new_id(), kind=kind, slide_id=slide_id, status="queued", progress=0.0,
                                            request=json.dumps(request), result=None, error=None,
                                            client_key=client_key, attempts=0, created=time.time(), started=None,
                                            finished=None, owner=owner))

    def job(self, job_id: str) -> Record | None:
        return self._one(JOBS, id=job_id)

    def update_job(self, job_id: str, **fields) -> None:
        if "result" in fields and not isinstance(fields["result"], (str, type(None))):
            fields["result"] = json.dumps(fields["result"])
        self._update(JOBS, job_id, **fields)

    def jobs(self, slide_id: str | None = None, limit: int = 100) -> list[Record]:
        with self.engine.connect() as conn:
            q = sa.select(JOBS).order_by(JOBS.c.created.desc()).limit(limit)
            if slide_id:
                q = q.where(JOBS.c.slide_id == slide_id)
            return [Record(dict(r)) for r in conn.execute(q).mappings()]

    def claim(self, job_id: str, owner: str, stale_after: float = STALE_AFTER_S) -> bool:
        """Take a job to run: it must be queued, or running under this same owner (a restart), or running under an
        owner silent for `stale_after` seconds (a lost node). Atomic: of several replicas, one wins."""
        now = time.time()
        free = sa.or_(JOBS.c.status == "queued",
                      sa.and_(JOBS.c.status == "running",
                              sa.or_(JOBS.c.owner == owner, JOBS.c.owner.is_(None), JOBS.c.heartbeat.is_(None),
                                     JOBS.c.heartbeat < now - stale_after)))
        with self._lock, self.engine.begin() as conn:
            res = conn.execute(JOBS.update().where(JOBS.c.id == job_id, free)
                               .values(status="running", owner=owner, heartbeat=now, started=now,
                                       attempts=JOBS.c.attempts + 1))
            return res.rowcount == 1

    def heartbeat(self, job_id: str, owner: str, **fields) -> None:
        with self._lock, self.engine.begin() as conn:
            conn.execute(JOBS.update().where(JOBS.c.id == job_id, JOBS.c.owner == owner)
                         .values(heartbeat=time.time(), **fields))

    def unfinished_ingestions(self) -> list[Record]:
        """Ingestion jobs left queued or running, by any instance (oldest first)."""
        with self.engine.connect() as conn:
            q = (sa.select(JOBS).where(JOBS.c.kind == "ingest", JOBS.c.status.in_(ACTIVE))
                 .order_by(JOBS.c.created))
            return [Record(dict(r)) for r in conn.execute(q).mappings()]

    # -- instances (replicas sharing the database) -------------------------------------------------------------------
    def beat(self, owner: str) -> None:
        """This instance is alive (called at start and every few seconds)."""
        now = time.time()
        with self._lock, self.engine.begin() as conn:
            if conn.execute(INSTANCES.update().where(INSTANCES.c.owner == owner).values(seen=now)).rowcount == 0:
                conn.execute(INSTANCES.insert().values(owner=owner, started=now, seen=now))

    def live_owners(self, stale_after: float = STALE_AFTER_S) -> set[str]:
        with self.engine.connect() as conn:
            q = sa.select(INSTANCES.c.owner).where(INSTANCES.c.seen >= time.time() - stale_after)
            return {r[0] for r in conn.execute(q)}

    def _orphaned(self, kind: str, owner: str, include_own: bool, stale_after: float):
        """Active jobs of `kind` whose owner is gone (no owner, or not seen for `stale_after`), and with
        `include_own` this instance's own (a restart under the same name)."""
        live = self.live_owners(stale_after) - ({owner} if include_own else set())
        cond = [JOBS.c.kind == kind, JOBS.c.status.in_(ACTIVE),
                sa.or_(JOBS.c.owner.is_(None), JOBS.c.owner.not_in(live) if live else sa.true())]
        if not include_own:
            cond.append(sa.or_(JOBS.c.owner.is_(None), JOBS.c.owner != owner))
        return sa.and_(*cond)

    def adopt_ingestions(self, owner: str, include_own: bool = False,
                         stale_after: float = STALE_AFTER_S) -> list[Record]:
        """Take over the ingestion jobs of lost instances (and with `include_own`, this instance's own after a
        restart): each becomes this owner's, one row at a time and only if still orphaned, so of several
        instances sweeping at once each job goes to one. Oldest first."""
        where = self._orphaned("ingest", owner, include_own, stale_after)
        adopted = []
        with self.engine.connect() as conn:
            rows = [Record(dict(r)) for r in conn.execute(sa.select(JOBS).where(where).order_by(JOBS.c.created))
                    .mappings()]
        for job in rows:
            with self._lock, self.engine.begin() as conn:
                same = JOBS.c.owner.is_(None) if job.owner is None else JOBS.c.owner == job.owner
                res = conn.execute(JOBS.update().where(JOBS.c.id == job.id, same, JOBS.c.status.in_(ACTIVE))
                                   .values(owner=owner, heartbeat=time.time()))
            if res.rowcount == 1:
                adopted.append(job)
        return adopted

    def abandon_questions(self, owner: str, include_own: bool = True, stale_after: float = STALE_AFTER_S) -> int:
        """Questions in flight on an instance that stopped cannot be resumed (their client is gone): mark them.
        Those of live instances are left alone."""
        where = self._orphaned("question", owner, include_own, stale_after)
        with self._lock, self.engine.begin() as conn:
            res = conn.execute(JOBS.update().where(where)
                               .values(status="cancelled", error="the service stopped", finished=time.time()))
            return res.rowcount

    def job_counts(self) -> dict[tuple[str, str], int]:
        with self.engine.connect() as conn:
            q = sa.select(JOBS.c.kind, JOBS.c.status, sa.func.count()).group_by(JOBS.c.kind, JOBS.c.status)
            return {(k, s): n for k, s, n in conn.execute(q)}

    # -- API keys ---------------------------------------------------------------------------------------------------
    def add_key(self, name: str, token_hash: str, scopes: str) -> Record:
        values = dict(id=new_id(), name=name, hash=token_hash, scopes=scopes, created=time.time(), revoked=None)
        try:
            with self._lock, self.engine.begin() as conn:
                conn.execute(KEYS.insert().values(**values))
        except sa.exc.IntegrityError:
            raise StoreError(f"an API key named {name!r} exists already (revoke it first)") from None
        return Record(values)

    def key_by_hash(self, token_hash: str) -> Record | None:
        return self._one(KEYS, hash=token_hash)

    def keys(self) -> list[Record]:
        with self.engine.connect() as conn:
            return [Record(dict(r)) for r in conn.execute(sa.select(KEYS).order_by(KEYS.c.created)).mappings()]

    def active_keys(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(KEYS).where(KEYS.c.revoked.is_(None)))
                       .scalar())

    def revoke_key(self, name: str) -> bool:
        with self._lock, self.engine.begin() as conn:
            res = conn.execute(KEYS.update().where(KEYS.c.name == name, KEYS.c.revoked.is_(None))
                               .values(revoked=time.time()))
            return res.rowcount > 0

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()
