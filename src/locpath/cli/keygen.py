"""`locpath keygen PREFIX`: an Ed25519 key pair for signing bundles."""

from __future__ import annotations


def register(sub) -> None:
    kg = sub.add_parser("keygen", help="make an Ed25519 key pair for signing bundles: PREFIX.key and PREFIX.pub")
    kg.add_argument("prefix", help="path prefix of the two files (the private key is written with mode 0600)")
    kg.set_defaults(func=run)


def run(args) -> int:
    from ..bundle.integrity import generate_keypair

    priv, pub, kid = generate_keypair(args.prefix)
    print(f"key {kid}: private {priv} (keep it secret), public {pub} (give it to the runtimes as --trusted-keys)")
    return 0
