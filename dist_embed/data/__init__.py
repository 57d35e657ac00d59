"""Rows in, batches out: readers (files, shards, hub), validation, the plan of global batches (every
rank plans all rows, or each its pieces with a hash exchange), mixing, tokenization, the loader."""
