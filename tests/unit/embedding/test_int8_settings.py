"""--precision int8 in the run settings: it implies OpenVINO on the CPU, and says so where it cannot run."""

from __future__ import annotations

import pytest
import torch

from gpl_cli.embedding.config import EmbedConfig
from gpl_cli.embedding.settings import check_precision, resolve_runtime
from gpl_cli.errors import GplError

pytest.importorskip("openvino")

CPU = torch.device("cpu")


@pytest.mark.parametrize("asked", ["auto", "openvino"])
def test_int8_runs_on_openvino(asked):
    assert resolve_runtime(asked, CPU, "int8") == "openvino"


def test_int8_refuses_torch():
    with pytest.raises(GplError, match="--precision int8 runs on OpenVINO .* use --runtime openvino or auto"):
        resolve_runtime("torch", CPU, "int8")


def test_int8_runs_on_the_cpu_only():
    assert check_precision("int8", CPU) == torch.float32  # what torch computes around it: the pooling
    with pytest.raises(GplError, match="--precision int8 runs on the CPU .* on cuda: use --device cpu"):
        check_precision("int8", torch.device("cuda"))


def test_calibration_needs_int8():
    EmbedConfig(precision="int8", calibration="photos").check()
    with pytest.raises(GplError, match="--calibration applies to --precision int8 only"):
        EmbedConfig(calibration="photos").check()
    # a run without one records no calibration: files of other precisions look as they always did
    assert "calibration" not in EmbedConfig().as_dict()
    assert EmbedConfig(precision="int8", calibration="photos").as_dict()["calibration"] == "photos"
