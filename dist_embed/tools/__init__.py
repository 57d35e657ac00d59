"""Commands beside training: prepare-data (validated webdataset shards), mine (hard negatives) and
merge (an adapter export into a plain model)."""
