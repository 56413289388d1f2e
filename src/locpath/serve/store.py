"""Slides, jobs and API keys in a real database, behind one small interface (SQLAlchemy Core): SQLite by default (a
file in the data folder, WAL journal, so readers never wait for the writer), any SQLAlchemy URL otherwise.

Schema changes are numbered migrations applied at start and recorded in `schema_migrations`, so an existing
database is upgraded in place. Jobs survive restarts: on start, ingestion jobs that were queued or running are
handed to the worker again, and finished results stay where they are. A client may name a request with its own
key (`client_key`), scoped to the API key that sent it; submitting it again returns the first job instead of
making a second, unless that one was refused, cancelled or failed: then it runs again.

Every job and slide records the API key (its id) that made it, so a key sees only its own jobs. The database file
is checked before it is used: an empty file, or one that is not a locpath database, is refused unless `init`
(its keys would be gone and auth silently off); new files are private (0600).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

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
    sa.Column("key_id", sa.String(32)),  # the API key that registered it (None: open loopback mode)
    sa.Column("bytes", sa.Integer),  # an upload's stored size (counts against its key's quota; None once removed)
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
    sa.Column("key_id", sa.String(32)),  # the API key that made it: only it (and admins) may read it
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("started", sa.Float),
    sa.Column("finished", sa.Float),
    sa.Column("owner", sa.String(128)),  # the service instance (replica) running it
    sa.Column("heartbeat", sa.Float),  # last sign of life of that owner while running
    sa.Column("dicom_store", sa.Text),  # JSON: the answer's SR and annotations stored back by STOW-RS (--store-results)
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
    # plain SQL: an Index object would attach itself to JOBS, and a second fresh database in this process would
    # then be created with the index twice
    conn.execute(sa.text("CREATE INDEX IF NOT EXISTS ix_jobs_slide_status ON jobs (slide_id, status)"))


def _v3(conn) -> None:
    """Job ownership, so several service replicas share one queue of ingestion jobs (one claims each)."""
    have = {c["name"] for c in sa.inspect(conn).get_columns("jobs")}
    for name, kind in (("owner", "VARCHAR(128)"), ("heartbeat", "FLOAT")):
        if name not in have:
            conn.execute(sa.text(f"ALTER TABLE jobs ADD COLUMN {name} {kind}"))


def _v4(conn) -> None:
    """Instance liveness, so a replica's queued jobs and questions are taken over or closed when it is gone."""
    INSTANCES.create(conn, checkfirst=True)


def _v5(conn) -> None:
    """Ownership: the API key behind each job and slide, and an upload's stored bytes (the per-key quota)."""
    for table, cols in (("jobs", (("key_id", "VARCHAR(32)"),)),
                        ("slides", (("key_id", "VARCHAR(32)"), ("bytes", "INTEGER")))):
        have = {c["name"] for c in sa.inspect(conn).get_columns(table)}
        for name, kind in cols:
            if name not in have:
                conn.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {name} {kind}"))
    conn.execute(sa.text("CREATE INDEX IF NOT EXISTS ix_jobs_key_id ON jobs (key_id)"))


def _v6(conn) -> None:
    """The slide file's identity at registration, so a file swapped afterwards is refused (serve/slide_files.py)."""
    if "identity" not in {c["name"] for c in sa.inspect(conn).get_columns("slides")}:
        conn.execute(sa.text("ALTER TABLE slides ADD COLUMN identity TEXT"))


def _v7(conn) -> None:
    """A question's DICOM results stored back on the slide's DICOMweb server: status, UIDs, attempts, last error."""
    if "dicom_store" not in {c["name"] for c in sa.inspect(conn).get_columns("jobs")}:
        conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN dicom_store TEXT"))


MIGRATIONS = [(1, _v1), (2, _v2), (3, _v3), (4, _v4), (5, _v5), (6, _v6), (7, _v7)]
STALE_AFTER_S = 60.0  # an instance (or a running job's owner) not heard of for this long is gone
ACTIVE = ("queued", "running")
RETRYABLE = ("cancelled", "failed")  # a client_key whose job ended so may run again
ANY_KEY = "*"  # jobs(key_id=ANY_KEY): every key's. A string, not object(): Ray ships the app's closures by value,
# and a pickled copy of a sentinel object is no longer `is` the store's (every listing failed on Ray Serve)


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
        for k in ("request", "result", "dicom_store"):
            if isinstance(d.get(k), str):
                d[k] = json.loads(d[k])
        if d.get("dicom_store") is None:
            d.pop("dicom_store", None)  # a job with nothing stored back (no --store-results, or not a DICOM slide)
        d.pop("client_key", None)
        d.pop("identity", None)  # a slide file's real path and inode: the server's business
        return d


def new_id() -> str:
    return uuid.uuid4().hex[:16]


def scoped_key(client_key: str | None, key_id: str | None) -> str | None:
    """A client_key as stored: within the API key that sent it, so two keys never share (or read) one."""
    if not client_key or key_id is None:
        return client_key  # open loopback mode: as given
    return f"k{key_id}:" + hashlib.sha256(client_key.encode("utf-8", "surrogatepass")).hexdigest()


class JobStore:
    def __init__(self, url: str, init: bool = False):
        """`init`: accept an existing database file that is empty or not locpath's (its tables are added)."""
        self.url = url
        self.name = display_name(url)  # what errors name: the file, or the URL without its password
        fresh = _prepare_sqlite_file(url, init)
        kw = {"connect_args": {"check_same_thread": False, "timeout": 30}} if url.startswith("sqlite") else {}
        try:
            self.engine = sa.create_engine(url, future=True, **kw)
        except Exception as exc:
            raise StoreError(f"{self.name}: cannot open the database ({exc})") from None
        if url.startswith("sqlite"):
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self._lock = threading.Lock()  # SQLite takes one writer at a time; callers need not know
        try:
            if fresh is None and not init and not url.startswith("sqlite"):
                _check_tables(self.name, set(sa.inspect(self.engine).get_table_names()), sqlite=False)
            self.migrate()
            with self.engine.begin() as conn:  # a write, so a read-only database is refused here, not mid-request
                top = sa.select(sa.func.max(MIGRATIONS_TABLE.c.version)).scalar_subquery()
                conn.execute(MIGRATIONS_TABLE.update().where(MIGRATIONS_TABLE.c.version == top)
                             .values(applied=MIGRATIONS_TABLE.c.applied))
        except sa.exc.SQLAlchemyError as exc:
            self.engine.dispose()
            raise StoreError(_db_error(self.name, exc)) from None
        _private_files(url)

    # -- schema -------------------------------------------------------------------------------------------------
    def migrate(self) -> int:
        try:
            with self.engine.begin() as conn:
                MIGRATIONS_TABLE.create(conn, checkfirst=True)
                done = {r[0] for r in conn.execute(sa.select(MIGRATIONS_TABLE.c.version))}
                newest = max(v for v, _ in MIGRATIONS)
                if done and max(done) > newest:
                    raise StoreError(f"{self.name}: database schema version {max(done)} is newer than this locpath "
                                     f"({newest}); upgrade locpath")
                for version, step in MIGRATIONS:
                    if version not in done:
                        step(conn)
                        conn.execute(MIGRATIONS_TABLE.insert().values(version=version, applied=time.time()))
        except sa.exc.SQLAlchemyError as exc:
            raise StoreError(_db_error(self.name, exc)) from None
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
        """Insert, unless a row with the same client_key exists: then that row, and False. A row that ended
        without a result (refused, cancelled, failed) gives its client_key up, so a retry runs again."""
        key = values.get("client_key")
        with self._lock:
            if key:
                old = self._one(table, client_key=key)
                if old is not None and old.status not in RETRYABLE:
                    return old, False
                if old is not None:  # the old row stays, as history, without the key
                    with self.engine.begin() as conn:
                        conn.execute(table.update().where(table.c.id == old.id, table.c.client_key == key)
                                     .values(client_key=None))
            try:
                with self.engine.begin() as conn:
                    conn.execute(table.insert().values(**values))
            except sa.exc.IntegrityError:  # another replica inserted the same client_key a moment ago
                old = self._one(table, client_key=key) if key else None
                if old is None:
                    raise
                return old, False
        return Record(values), True

    # -- slides ---------------------------------------------------------------------------------------------------
    def add_slide(self, name: str, source_kind: str, source: str, path: str, client_key: str | None = None,
                  key_id: str | None = None, size: int | None = None):
        """`key_id`: the API key registering it (its client_key is scoped to it); `size`: an upload's bytes."""
        now = time.time()
        return self._insert_once(SLIDES, dict(id=new_id(), name=name, source_kind=source_kind, source=source,
                                              path=path, status="registered", progress=0.0, tiles=None, tokens=None,
                                              error=None, client_key=scoped_key(client_key, key_id), key_id=key_id,
                                              bytes=size, created=now, updated=now))

    def slide(self, slide_id: str) -> Record | None:
        return self._one(SLIDES, id=slide_id)

    def slide_by_key(self, client_key: str, key_id: str | None = None) -> Record | None:
        return self._one(SLIDES, client_key=scoped_key(client_key, key_id))

    def upload_bytes(self, key_id: str | None) -> int:
        """The bytes of a key's stored uploads (its quota's use)."""
        owner = SLIDES.c.key_id.is_(None) if key_id is None else SLIDES.c.key_id == key_id
        with self.engine.connect() as conn:
            q = sa.select(sa.func.coalesce(sa.func.sum(SLIDES.c.bytes), 0)).where(SLIDES.c.source_kind == "upload",
                                                                                 owner)
            return int(conn.execute(q).scalar())

    def upload_paths(self) -> set[str]:
        with self.engine.connect() as conn:
            return {r[0] for r in conn.execute(sa.select(SLIDES.c.path).where(SLIDES.c.source_kind == "upload"))}

    def failed_uploads(self) -> list[Record]:
        """Uploads whose ingestion failed for good (no ingestion queued or running) and whose file is still kept."""
        active = sa.select(JOBS.c.id).where(JOBS.c.slide_id == SLIDES.c.id, JOBS.c.kind == "ingest",
                                            JOBS.c.status.in_(ACTIVE)).exists()
        with self.engine.connect() as conn:
            q = sa.select(SLIDES).where(SLIDES.c.source_kind == "upload", SLIDES.c.status == "failed",
                                        SLIDES.c.bytes.is_not(None), ~active)
            return [Record(dict(r)) for r in conn.execute(q).mappings()]

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
                owner: str | None = None, key_id: str | None = None):
        """`owner`: the instance whose queue the job goes to (so another can adopt it if that instance is lost);
        `key_id`: the API key asking (the job is its own; its client_key is scoped to it)."""
        return self._insert_once(JOBS, dict(id=new_id(), kind=kind, slide_id=slide_id, status="queued", progress=0.0,
                                            request=json.dumps(request), result=None, error=None,
                                            client_key=scoped_key(client_key, key_id), key_id=key_id, attempts=0,
                                            created=time.time(), started=None, finished=None, owner=owner))

    def job(self, job_id: str) -> Record | None:
        return self._one(JOBS, id=job_id)

    def update_job(self, job_id: str, **fields) -> None:
        for k in ("result", "dicom_store"):
            if k in fields and not isinstance(fields[k], (str, type(None))):
                fields[k] = json.dumps(fields[k])
        self._update(JOBS, job_id, **fields)

    def jobs(self, slide_id: str | None = None, limit: int = 100, key_id=ANY_KEY, kind: str | None = None):
        """Newest first; `key_id`: only that key's jobs (default: everyone's)."""
        with self.engine.connect() as conn:
            q = sa.select(JOBS).order_by(JOBS.c.created.desc()).limit(limit)
            if slide_id:
                q = q.where(JOBS.c.slide_id == slide_id)
            if kind:
                q = q.where(JOBS.c.kind == kind)
            if key_id != ANY_KEY:
                q = q.where(JOBS.c.key_id.is_(None) if key_id is None else JOBS.c.key_id == key_id)
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


# -- the database file ---------------------------------------------------------------------------------------------
def _sqlite_file(url: str) -> Path | None:
    """The file of a plain SQLite URL (None for memory, SQLite URI filenames and other databases)."""
    try:
        u = sa.engine.make_url(url)
    except Exception:
        return None
    if not u.drivername.startswith("sqlite") or not u.database or u.database == ":memory:" or \
            u.database.startswith("file:") or u.query.get("uri"):
        return None
    return Path(u.database)


def display_name(url: str) -> str:
    path = _sqlite_file(url)
    if path is not None or url.startswith("sqlite"):
        return str(path or url)
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "the database URL"


def _prepare_sqlite_file(url: str, init: bool) -> Path | None:
    """Create a missing SQLite file (0600; returns it), or check an existing one before anything writes to it."""
    path = _sqlite_file(url)
    if path is None:
        return None
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            return path
        if path.is_dir():
            raise StoreError(f"{path}: is a folder, not a database file")
        if not os.access(path, os.R_OK | os.W_OK) or not os.access(path.parent, os.W_OK | os.X_OK):
            what = "database file" if not os.access(path, os.W_OK) else "folder of the database"
            raise StoreError(f"{path}: the {what} is read-only (locpath writes its jobs and keys there)")
        size = path.stat().st_size
        from .config import check_not_others

        check_not_others(path, "database file", mode=False)  # its mode is made private below
    except FileExistsError:
        return None
    except OSError as exc:
        raise StoreError(f"{path}: cannot use the database file ({exc.strerror or exc})") from None
    if not init and size == 0:
        raise StoreError(f"{path}: the database file is empty (its API keys and jobs would be gone and auth "
                         f"silently off); start with --init to make a new database there")
    if not init:
        _check_tables(str(path), _sqlite_tables(path), sqlite=True)
    return None


def _sqlite_tables(path: Path) -> set[str]:
    import sqlite3

    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=30)
        try:
            return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: not a usable SQLite database ({exc})") from None


def _check_tables(name: str, tables: set[str], sqlite: bool) -> None:
    """A database that is not locpath's (tables, none of them schema_migrations), or an SQLite file with no
    tables at all, is refused: starting on it would silently drop every key."""
    if MIGRATIONS_TABLE.name in tables:
        return
    if tables:
        raise StoreError(f"{name}: not a locpath database (it has tables but no {MIGRATIONS_TABLE.name}); start "
                         f"with --init to add locpath's tables to it")
    if sqlite:
        raise StoreError(f"{name}: the database file holds no tables (its API keys and jobs would be gone); start "
                         f"with --init to make a new database there")


def _private_files(url: str) -> None:
    """The database file and its -wal/-shm readable by this user only (older locpaths made them 0644)."""
    path = _sqlite_file(url)
    if path is None:
        return
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            st = p.stat()
            if st.st_mode & 0o077 and st.st_uid == os.getuid():
                os.chmod(p, st.st_mode & 0o700)
        except OSError:
            pass


def _db_error(name: str, exc: Exception) -> str:
    first = (str(exc).splitlines() or [""])[0][:200]
    if "readonly" in first.lower() or "read-only" in first.lower():
        return f"{name}: the database is read-only (locpath writes its jobs and keys there; {first})"
    return f"{name}: cannot open the database ({first})"


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()
