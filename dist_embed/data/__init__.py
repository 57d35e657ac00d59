"""Rows in, batches out: readers (files, shards, hub), validation, the global plan (shuffle,
no-duplicates, mixing), tokenization and the per-rank loader."""
