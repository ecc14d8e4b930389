"""Corpus → tokenized webdataset shards → the per-rank streaming loader."""
