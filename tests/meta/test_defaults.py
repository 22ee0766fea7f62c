"""gpl_cli.defaults: the one torch-free home of the choices the command line offers."""

from __future__ import annotations

import subprocess
import sys

import torch

from gpl_cli import defaults
from gpl_cli.embedding.settings import DTYPES
from gpl_cli.store.output import format_for


def test_the_command_line_module_loads_without_numpy_or_torch():
    code = ("import sys, gpl_cli.cli; heavy = [m for m in ('numpy', 'torch', 'h5py') if m in sys.modules]; "
            "sys.exit(1 if heavy else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_precisions_name_the_torch_dtypes():
    assert {name: DTYPES[name] for name in defaults.PRECISIONS} == {
        "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.float32}


def test_every_output_extension_names_a_format_the_writers_open():
    for ext, fmt in defaults.OUTPUT_EXTENSIONS.items():
        assert fmt in defaults.OUTPUT_FORMATS
        assert format_for(f"out{ext.upper()}", None) == fmt
    for alias, fmt in defaults.FORMAT_ALIASES.items():
        assert format_for("out_dir", alias) == fmt
