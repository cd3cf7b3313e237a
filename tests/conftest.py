"""Test-wide setup.

Without CUDA, Triton kernels run through the interpreter; the variable must
be set before triton is first imported, hence here at the top.
"""

import os
import shutil

if not os.environ.get("SPLITSERVE_TEST_CUDA") and shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest_plugins = ["tests.fixtures.checkpoints", "tests.fixtures.shape_variants"]
