"""The embedding model: a Hugging Face encoder with pooling, Dense and Normalize as
sentence-transformers lays them out; which layout its texts take and the variable-length attention
for it, fast dropout, LoRA, and weights in and out."""
