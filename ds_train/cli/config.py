"""`ds-train config` — print every config key with its type, default and documentation."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("config", help="document every run config key")
    p.set_defaults(func=main)


def main(args) -> int:
    from ds_train.config import describe

    print(describe())
    return 0
