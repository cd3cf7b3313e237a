"""Test-wide setup.

Without CUDA, Triton kernels run through the interpreter; the variable must
be set before triton is first imported, hence here at the top.
"""

import os
import shutil

if not os.environ.get("SPLITSERVE_TEST_CUDA") and shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest_plugins = ["tests.fixtures.checkpoints", "tests.fixtures.shape_variants"]

# The tests' models are tiny: a second torch thread gains nothing, and on a loaded
# two-core machine OpenMP's barriers stall every op. One thread in the test process
# (Ray workers and tensor-parallel rank processes set their own), unless the
# environment asks for more.
if "OMP_NUM_THREADS" not in os.environ:
    import torch

    torch.set_num_threads(1)
