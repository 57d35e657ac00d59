"""The embedding model: a Hugging Face encoder with pooling, Dense and Normalize as
sentence-transformers lays them out; attention layouts (packing), LoRA, and weights in and out."""
