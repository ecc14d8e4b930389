"""`python -m ds_train …` is the same as the `ds-train` console script."""

from ds_train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
