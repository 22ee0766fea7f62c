"""Start-up (issue 14): a command imports what its backbone needs and nothing more, and a small run
forks no loader workers. The times themselves are measured by bench/startup.py, not here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import SAMPLE_IMAGES, gpl_imports

from gpl_cli.embedding.settings import IN_PROCESS_BELOW, MAX_CPU_WORKERS, resolve_settings
from gpl_cli.store.formats import read_embeddings

# What embedding with the default backbone may load: torch itself and h5py to write the file.
NEVER_ON_THE_DEFAULT_PATH = {"torchvision", "timm", "sympy", "torch._dynamo", "torch._inductor", "matplotlib",
                             "sklearn", "scipy", "huggingface_hub", "ray", "openvino", "nncf"}


def test_a_default_backbone_embed_imports_neither_torchvision_nor_timm(tmp_path):
    out = tmp_path / "one.h5"
    status, heavy, err = gpl_imports("embed", str(SAMPLE_IMAGES / "coffee.png"), "-o", str(out))
    assert status == 0, err
    assert heavy & NEVER_ON_THE_DEFAULT_PATH == set(), heavy
    assert {"torch", "h5py"} <= heavy
    assert "in-process" in err  # one image: no loader workers were forked
    import timm
    import torchvision

    recorded = read_embeddings(str(out)).metadata["versions"]  # the file still names the libraries
    assert recorded["torchvision"] == torchvision.__version__.split("+")[0] and recorded["timm"] == timm.__version__


def test_a_query_image_for_neighbors_is_embedded_without_torchvision_or_timm(tmp_path):
    base = tmp_path / "base.h5"
    status, _, err = gpl_imports("embed", str(SAMPLE_IMAGES), "-o", str(base))
    assert status in (0, 3), err
    query = tmp_path / "new.png"  # not a row of the file: it must be embedded
    shutil.copy(SAMPLE_IMAGES / "coffee.png", query)
    status, heavy, err = gpl_imports("neighbors", str(base), str(query), "-k", "2")
    assert status == 0, err
    assert heavy & NEVER_ON_THE_DEFAULT_PATH == set(), heavy


def test_the_pooling_registry_parses_without_torch():
    """gpl_cli.pooling.spec is what lets `--pool` be refused before torch loads: importing it, parsing a spec
    and reading its key and dimension load no torch, though a spec is callable on a map."""
    code = ("import sys\nfrom gpl_cli.pooling.spec import parse_pool_spec\nspec = parse_pool_spec('gem:p=4')\n"
            "print(spec.key, spec.operator.out_dim(8), callable(spec), 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().split() == ["gem:p=4", "8", "True", "False"]


@pytest.mark.parametrize("name,needs,not_needed", [("resnet18", "torchvision", "timm"),
                                                   ("timm:resnet18", "timm", None)])
def test_other_backbones_import_their_own_library(name, needs, not_needed):
    code = (f"import sys\nfrom gpl_cli.models.backbones import architecture\narchitecture({name!r})\n"
            "print(' '.join(sorted(m for m in ('torchvision', 'timm') if m in sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
    loaded = set(proc.stdout.decode().split())
    assert proc.returncode == 0, proc.stderr.decode()
    assert needs in loaded and (not_needed is None or not_needed not in loaded), loaded


def test_small_cpu_runs_stay_in_process_and_larger_ones_fork_one_worker_per_core():
    cpu = torch.device("cpu")
    small = resolve_settings(cpu, images=IN_PROCESS_BELOW - 1)
    assert (small.workers, small.threads) == (0, torch.get_num_threads())
    large = resolve_settings(cpu, images=IN_PROCESS_BELOW)
    assert large.workers == min(os.cpu_count() or 1, MAX_CPU_WORKERS) and large.threads == 1
    assert resolve_settings(cpu, workers=2, images=1).workers == 2  # asked for: always given
    assert resolve_settings(cpu).workers == large.workers  # a run of unknown size: the default
