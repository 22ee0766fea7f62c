"""OpenVINO as the trunk's runtime: float32 vectors equal torch's within the stated tolerance, and the conversion
cache (keyed, checked, rebuilt when damaged, safe for two first runs at once)."""

from __future__ import annotations

import functools
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("openvino")

from gpl_cli.embedding.embedder import Embedder  # noqa: E402
from gpl_cli.embedding.settings import cpu_has_native_bf16  # noqa: E402
from gpl_cli.models import openvino as gov  # noqa: E402
from gpl_cli.models.backbones import Backbone, _torchvision_cut, measure_feature_map, tap_layer  # noqa: E402
from gpl_cli.models.preprocess import Preprocess  # noqa: E402
from gpl_cli.pooling.spec import REGISTRY, parse_pool_list  # noqa: E402

EVERY_POOLING = parse_pool_list(sorted(REGISTRY))


def _pixels(n: int, height: int, width: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _assert_same_vectors(backbone: Backbone, shapes: list[tuple[int, int, int]]) -> None:
    """Every pooling from one pass on each runtime, at each (n, height, width)."""
    on_openvino = Embedder(backbone, EVERY_POOLING, device="cpu", runtime="openvino")
    on_torch = Embedder(backbone, EVERY_POOLING, device="cpu")
    assert isinstance(on_openvino.trunk, gov.Compiled) and not isinstance(on_torch.trunk, gov.Compiled)
    for seed, (n, height, width) in enumerate(shapes):
        pixels = _pixels(n, height, width, seed)
        got, want = on_openvino.embed_pixels(pixels), on_torch.embed_pixels(pixels)
        assert list(got) == [s.key for s in EVERY_POOLING]
        for key in got:
            scale = np.abs(want[key]).max(axis=1, keepdims=True)
            assert (scale > 1e-3).all(), key  # real vectors, not near-zero ones that any tolerance would pass
            worst = float((np.abs(got[key] - want[key]) / scale).max())
            assert worst <= gov.TOLERANCE, f"{key} differs by {worst:.1e} of its row's largest component"


def test_every_pooling_of_the_default_backbone_matches_torch_at_the_crop_and_other_sizes(lite0):
    # keep-aspect and --scales feed other shapes to the same converted model (its input is dynamic)
    _assert_same_vectors(lite0, [(3, 224, 224), (2, 200, 311), (1, 317, 160)])


def _random_resnet18(layer: str | None) -> Backbone:
    """A torchvision resnet18 with random weights (never presented as pretrained), small inputs."""
    from torchvision import models

    torch.manual_seed(0)
    cut, where = _torchvision_cut("resnet18")
    backbone = Backbone("resnet18", cut(models.resnet18().eval()).eval(), Preprocess(64, 64, (0.5,) * 3, (0.5,) * 3),
                        "random (test)", "random-seed-0", where)
    if layer:
        tap_layer(backbone, layer)
    backbone.feature_map = measure_feature_map(backbone.trunk, 64)
    return backbone


def test_a_layer_tap_of_a_torchvision_backbone_matches_torch():
    tapped = _random_resnet18("layer3")
    _assert_same_vectors(tapped, [(3, 64, 64), (2, 57, 90)])
    _, converted_now = gov.converted(tapped)
    assert not converted_now  # the tap is its own cache entry, converted once


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bfloat16; gpl refuses bf16 here")
def test_bf16_vectors_stay_close_to_torch_fp32_by_cosine(lite0):
    # bfloat16 keeps 8 bits of mantissa: the measurement on labelled photos gave a smallest cosine of 0.9946
    # for avg; 0.98 leaves room for other images while still failing a wrong graph (cosines near 0).
    bf16 = Embedder(lite0, parse_pool_list(["avg", "max"]), device="cpu", precision="bf16", runtime="openvino")
    fp32 = Embedder(lite0, parse_pool_list(["avg", "max"]), device="cpu")
    pixels = _pixels(4, 224, 224, 7)
    got, want = bf16.embed_pixels(pixels), fp32.embed_pixels(pixels)
    for key in got:
        cosine = (got[key] * want[key]).sum(1) / np.linalg.norm(got[key], axis=1) / np.linalg.norm(want[key], axis=1)
        assert cosine.min() >= 0.98, (key, cosine)


# --- conversion and its cache, on a model that converts in a moment ---------------------------------------------


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


class _SizeFrozen(nn.Module):
    """Crops to half its input's height with a Python int: a trace keeps the example's half for every size."""

    def forward(self, x):
        return x[:, :, : int(x.shape[-2]) // 2]


EXAMPLE = torch.rand(1, 3, 16, 16)
PARTS = {"backbone": "tiny", "weights_sha256": "0" * 64, "layer": None, "input": gov.INPUT_POLICY, "precision": "fp32"}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gpl" / "openvino"


@functools.cache
def _tiny_model():
    return gov.convert(_Tiny(), EXAMPLE)


def _build_counting(calls: list):
    """A build that converts the tiny model (once per process: converting costs seconds) and counts its calls."""
    def build():
        calls.append(1)
        return _tiny_model()
    return build


def _run(ir: gov.IR, x: np.ndarray) -> np.ndarray:
    return gov.Compiled(ir, threads=1)(x)


def test_the_cache_converts_once_and_its_model_runs_as_torch(cache):
    calls = []
    first, built = gov.cached(PARTS, _build_counting(calls))
    again, built_again = gov.cached(PARTS, _build_counting(calls))
    assert (built, built_again, len(calls)) == (True, False, 1) and again == first
    x = np.random.default_rng(0).random((2, 3, 20, 13), dtype=np.float32)
    with torch.inference_mode():
        want = _Tiny()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run(first, x), want, atol=1e-5)
    entry = json.loads((cache / os.listdir(cache)[0] / gov.ENTRY).read_text())
    assert entry["parts"]["openvino"] == gov.openvino_version() and entry["parts"]["backbone"] == "tiny"


@pytest.mark.parametrize("damage", ["flip a weight byte", "truncate the graph", "empty record"])
def test_a_damaged_entry_is_rebuilt_never_trusted(cache, damage):
    calls = []
    good, _ = gov.cached(PARTS, _build_counting(calls))
    folder = cache / os.listdir(cache)[0]
    if damage == "flip a weight byte":
        data = bytearray((folder / gov.MODEL_BIN).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / gov.MODEL_BIN).write_bytes(bytes(data))
    elif damage == "truncate the graph":
        (folder / gov.MODEL_XML).write_bytes((folder / gov.MODEL_XML).read_bytes()[:100])
    else:
        (folder / gov.ENTRY).write_text("")
    rebuilt, built = gov.cached(PARTS, _build_counting(calls))
    assert built and len(calls) == 2 and rebuilt.weights == good.weights
    assert sorted(os.listdir(cache)) == [folder.name]  # replaced in place, nothing left beside it


def test_a_new_openvino_version_or_new_weights_do_not_reuse_an_entry(cache, monkeypatch):
    calls = []
    gov.cached(PARTS, _build_counting(calls))
    gov.cached({**PARTS, "weights_sha256": "1" * 64}, _build_counting(calls))
    assert len(calls) == 2
    monkeypatch.setattr(gov, "openvino_version", lambda: "9999.0.0")
    assert not gov.is_cached(PARTS)
    _, built = gov.cached(PARTS, _build_counting(calls))
    assert built and len(calls) == 3 and len(os.listdir(cache)) == 3


_FIRST_RUN = """
import os, sys, time
sys.path.insert(0, {tests!r})
from unit.models.test_openvino import PARTS, _build_counting
from gpl_cli.models import openvino as gov
open(os.path.join({gate!r}, str(os.getpid())), "w").close()
while len(os.listdir({gate!r})) < 2:  # both processes start converting together
    time.sleep(0.01)
calls = []
build = _build_counting(calls)
ir, built = gov.cached(PARTS, lambda: (build(), time.sleep(0.5))[0])
print(built, gov.hashlib.sha256(ir.weights).hexdigest())
"""


def test_two_first_runs_at_once_both_get_a_whole_entry(cache, tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    code = _FIRST_RUN.format(tests=str(os.path.dirname(os.path.dirname(os.path.dirname(__file__)))), gate=str(gate))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=os.environ.copy()) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err.decode()[-2000:] for _, err in results]
    lines = [out.decode().split() for out, _ in results]
    assert lines[0] == lines[1] == [str(True), lines[0][1]]  # both converted, and both hold the same model
    assert len(os.listdir(cache)) == 1  # one entry, no temporaries left
    ir, built = gov.cached(PARTS, _build_counting([]))
    assert not built and gov.hashlib.sha256(ir.weights).hexdigest() == lines[0][1]


def test_a_trunk_whose_trace_holds_its_input_size_is_unconvertible_and_remembered(cache):
    with pytest.raises(gov.Unconvertible, match="at a 23x13 input"):
        gov.convert(_SizeFrozen(), EXAMPLE)
    calls = []

    def build():
        calls.append(1)
        return gov.convert(_SizeFrozen(), EXAMPLE)

    for _ in range(2):  # the second run is told at once, without converting again
        with pytest.raises(gov.Unconvertible, match="depends on the input size"):
            gov.cached(PARTS, build)
    assert len(calls) == 1


def test_a_compiled_model_travels_as_its_ir_and_compiles_where_it_runs(cache):
    ir, _ = gov.cached(PARTS, _build_counting([]))
    compiled = gov.Compiled(ir, threads=1)
    x = np.ones((1, 3, 8, 8), np.float32)
    first = compiled(x)
    copy = pickle.loads(pickle.dumps(compiled))
    assert copy._request is None and copy.ir == ir  # no compiled state crosses a process boundary
    np.testing.assert_array_equal(copy(x), first)
    assert compiled(x) is not compiled(x)  # each call's output is its own array, not the request's buffer


def test_converting_and_quantizing_report_no_usage_and_write_nothing_in_home(tmp_path):
    """OpenVINO's converter and NNCF, left alone, send usage statistics and create ~/intel on first use."""
    script = (
        "import numpy as np, torch\n"
        "from gpl_cli.models import openvino as ov, quantize\n"
        "model = ov.convert(torch.nn.Conv2d(3, 4, 3).eval(), torch.zeros(1, 3, 16, 16))\n"
        "quantize.quantize(model, [np.random.default_rng(0).random((1, 3, 16, 16), dtype=np.float32)] * 4)\n"
        "import sys; print(sys.modules['openvino_telemetry'])\n"
    )
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("CI", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__)))))
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().strip() == "None" and not (tmp_path / "intel").exists(), os.listdir(tmp_path)


_SIGNAL_AFTER_TWO_MODELS = """
import ctypes, gc, signal, subprocess, sys, tempfile
import numpy as np, torch
import openvino
from gpl_cli.models import openvino as gov

class Stack(ctypes.Structure):
    _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]

def signal_stack():
    got = Stack()
    assert ctypes.CDLL(None).sigaltstack(None, ctypes.byref(got)) == 0
    return got.sp or 0, got.size

def mapped(address):
    for line in open("/proc/self/maps"):
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        if start <= address < end:
            return True
    return False

buffer = ctypes.create_string_buffer(1 << 16)  # this thread's own signal stack, as faulthandler or Ray set one
assert ctypes.CDLL(None).sigaltstack(ctypes.byref(Stack(ctypes.addressof(buffer), 0, 1 << 16)), None) == 0
folder = tempfile.mkdtemp()
openvino.save_model(gov.convert(torch.nn.Conv2d(3, 4, 3).eval(), torch.zeros(1, 3, 16, 16)), folder + "/m.xml")
ir = gov.IR(open(folder + "/m.xml", "rb").read(), open(folder + "/m.bin", "rb").read())
first, second = gov.Compiled(ir, threads=1), gov.Compiled(ir, threads=1)
for model in (first, second):
    model(np.ones((1, 3, 8, 8), np.float32))
del first  # the models go in the order they came
gc.collect()
del second
gc.collect()
sp, size = signal_stack()
print(sp == ctypes.addressof(buffer), mapped(sp), flush=True)
signal.signal(signal.SIGCHLD, lambda *_: None)  # as torch's DataLoader does: handled on that stack
subprocess.run(["true"], check=True)
print("survived", flush=True)
"""


def test_compiled_models_leave_the_threads_signal_stack_as_they_found_it():
    """OpenVINO's CPU plugin gives a compiling thread a signal stack of its own and leaves the thread pointing at
    it, unmapped, once models go in the order they came: the next handled signal (a child's SIGCHLD) killed the
    process, or wrote its frame over whatever had been mapped there since (this suite's heap)."""
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_AFTER_TWO_MODELS], capture_output=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__)))))
    assert proc.returncode == 0, (proc.returncode, proc.stderr.decode()[-2000:])
    assert proc.stdout.decode().split() == ["True", "True", "survived"]
