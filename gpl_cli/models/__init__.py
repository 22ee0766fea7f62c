"""Stage 1, the network: backbones and their weights, where each family's trunk is cut, `--layer` taps,
the trained classifier heads, the `gpl models` catalogue, and the trunk made ready for inference."""
