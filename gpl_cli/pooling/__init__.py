"""Stage 1, the vector: pooling operators (`spec`: the torch-free registry and `--pool` parsing; `ops`: the
functions), post-processing (power, whitening, normalisation) and whitening files."""
