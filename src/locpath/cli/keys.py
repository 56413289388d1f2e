"""`locpath keys add|list|revoke`: the API keys of `locpath serve`, stored hashed in its database."""

from __future__ import annotations

import sys

from ..errors import LocpathError
from .common import serve_data_dir


def register(sub) -> None:
    ks = sub.add_parser("keys", help="API keys of `locpath serve` (stored hashed in its database)")
    ks.add_argument("action", choices=("add", "list", "revoke"), help="what to do")
    ks.add_argument("name", nargs="?", default=None, help="the key's name (add, revoke)")
    ks.add_argument("--scopes", default="read,submit", help="comma-separated: read, submit, admin")
    ks.add_argument("--data-dir", default=None, help="the service's data folder (default ~/.cache/locpath/serve)")
    ks.add_argument("--database", default=None, help="SQLAlchemy URL (default: SQLite in the data folder)")
    ks.add_argument("--init", action="store_true", help="accept a database file that is empty or not locpath's")
    ks.set_defaults(func=run)


def run(args) -> int:
    from ..serve import auth
    from ..serve.store import JobStore

    data = serve_data_dir(args.data_dir)
    try:
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise LocpathError(f"{data}: cannot create the data folder ({exc.strerror or exc})") from None
    store = JobStore(args.database or f"sqlite:///{data / 'locpath.db'}", init=args.init)
    if args.action == "add":
        if not args.name:
            raise LocpathError("keys add needs a NAME")
        token = auth.new_token()
        store.add_key(args.name, auth.token_hash(token), auth.parse_scopes(args.scopes))
        print(token)
        print(f"key {args.name!r} ({args.scopes}) added; the token above is shown once and stored only as its hash",
              file=sys.stderr)
    elif args.action == "list":
        for k in store.keys():
            state = "revoked" if k.revoked else "active"
            print(f"{k.name}\t{k.scopes}\t{state}")
    else:
        if not args.name or not store.revoke_key(args.name):
            raise LocpathError(f"no active key named {args.name!r}")
        print(f"key {args.name!r} revoked")
    store.close()
    return 0
