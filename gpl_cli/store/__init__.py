"""Stage 2, files: the `Embeddings` record and its checks, the one `Output` object per output, the run
journal and lock, the formats (one module each, writer and reader), and `gpl export`."""
