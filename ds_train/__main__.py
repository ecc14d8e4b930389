"""`python -m ds_train …` is the same as the `ds-train` console script."""

from ds_train.cli import console_main

if __name__ == "__main__":
    console_main()
