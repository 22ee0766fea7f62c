"""Choices and defaults shared by the command line and the library, in one torch-free module.

cli.py builds its options from these names without importing torch or numpy (`gpl --help` stays
fast); the modules that act on them (engine, formats, compare, ...) import the same names.
"""

DEFAULT_BACKBONE = "efficientnet_lite0"
DEFAULT_POOLS = ("avg",)  # gpl embed
COMPARE_POOLS = ("avg", "max")  # gpl compare on images
DEVICES = ("auto", "cpu", "cuda", "mps")
# the trunk's compute precision (settings.check_precision); int8 is a model quantized for OpenVINO
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
RUNTIMES = ("auto", "torch", "openvino")  # what runs the trunk (settings.resolve_runtime)
NORMALIZATIONS = ("none", "l2")
RESIZE_MODES = ("crop", "keep-aspect")
ENGINES = ("local", "ray")

# Output formats by name; "shards" names the npy-shards + parquet-paths folder by what it is for
# (outputs too big for one file) and writes the same as "parquet".
OUTPUT_FORMATS = ("h5", "npy", "jsonl", "csv", "tsv", "parquet", "shards")
FORMAT_ALIASES = {"shards": "parquet"}
STDOUT_FORMATS = ("jsonl", "csv", "tsv", "npy")
# The format an output path's extension implies (gpl embed -o, gpl export -o); gpl_cli.store.formats
# holds what writes and reads each format.
OUTPUT_EXTENSIONS = {
    ".h5": "h5", ".hdf5": "h5", ".hdf": "h5", ".npy": "npy",
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv",
}
