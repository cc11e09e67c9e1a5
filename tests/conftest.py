"""Test setup: Triton interpreter and inductor/triton caches on CPU, GPU tests skipped without CUDA."""

import os
import pathlib

import torch

# Without a GPU, Triton kernels run under the interpreter; it must be set before any kernel is
# defined (PITFALLS: "0 active drivers" otherwise). Importing torch defines none.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Keep compiled kernels inside the clone: repeats of a (shape, mask) compile take ~1 s, not 5-10 s.
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR", str(pathlib.Path(__file__).resolve().parents[1] / ".inductor_cache")
)
# triton.compile's cache too (the sm_90 compile checks of tests/test_sm90_sass.py run on the CPU)
os.environ.setdefault("TRITON_CACHE_DIR", str(pathlib.Path(__file__).resolve().parents[1] / ".triton_cache"))

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
