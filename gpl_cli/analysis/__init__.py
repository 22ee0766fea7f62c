"""Stage 3, answers from vectors: retrieval metrics and `compare`, linear probes and GeM's fitted p,
neighbours, duplicates and outliers, `explain`, `classify`, learning a whitening."""
