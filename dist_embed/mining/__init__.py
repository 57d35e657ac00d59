"""Hard-negative mining: exact top-k split across ranks (the same at any world size), the
false-negative filters, and the negatives a training run re-mines with its current weights."""
