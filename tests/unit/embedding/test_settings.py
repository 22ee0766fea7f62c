"""gpl_cli.embedding.settings: run options resolved once into RunSettings."""

from __future__ import annotations

import os

import pytest
import torch

from gpl_cli.embedding.settings import MAX_CPU_WORKERS, resolve_settings
from gpl_cli.embedding.tuning import Plan
from gpl_cli.errors import GplError


def test_cpu_defaults_one_worker_per_core_each_running_the_model_on_one_thread():
    s = resolve_settings("cpu")
    assert s.device == torch.device("cpu") and s.on_cpu and s.dtype == torch.float32
    assert s.workers == min(os.cpu_count() or 1, MAX_CPU_WORKERS) and s.threads == 1
    assert s.batch_size == 4 and not s.channels_last and s.timeout == 60.0


def test_in_process_runs_use_this_process_threads_and_given_values_win():
    s = resolve_settings("cpu", workers=0, batch_size=7, timeout=None)
    assert (s.workers, s.threads, s.batch_size, s.timeout) == (0, torch.get_num_threads(), 7, None)


def test_a_precision_the_device_cannot_run_is_refused_once_here():
    with pytest.raises(GplError, match="fp16 needs a GPU"):
        resolve_settings("cpu", "fp16")
    with pytest.raises(GplError, match="unknown precision"):
        resolve_settings("cpu", "fp64")


def test_a_plan_sets_batch_size_and_layout_and_says_where_they_came_from():
    s = resolve_settings("cpu", workers=0)
    planned = s.planned(Plan(16, True, "cache"))
    assert (planned.batch_size, planned.channels_last, planned.plan) == (16, True, "batch 16, channels-last (cache)")
    assert (s.batch_size, s.channels_last, s.plan) == (4, False, "")  # frozen: the original is unchanged


@pytest.mark.parametrize("device,probe,name", [("cuda", "torch.cuda.is_available", "CUDA"),
                                               ("mps", "torch.backends.mps.is_available", "MPS")])
def test_an_accelerator_the_machine_lacks_is_a_usage_error(device, probe, name, monkeypatch):
    monkeypatch.setattr(probe, lambda: False)
    with pytest.raises(GplError, match=f"^--device {device}: no {name} device is available"):
        resolve_settings(device)
    monkeypatch.setattr(probe, lambda: True)
    assert resolve_settings(device, workers=0).device == torch.device(device)  # present: taken as asked
