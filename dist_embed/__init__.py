"""dist_embed: distributed training of sentence-embedding models."""

__version__ = "0.1.0"
