"""Stage 2, running the model: what decides the numbers (`config`) and the speed (`settings`, `tuning`,
`runtime`), inputs and decoding, the pure `Embedder`, the local and Ray engines, and the one `Job` every
command runs the model through.

(Named `embedding`, not `embed`: a subpackage `gpl_cli.embed` would shadow the public `gpl_cli.embed()`.)
"""
