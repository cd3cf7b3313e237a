"""Triton kernels for the engine's hot paths, one module per kernel family.

Each module holds ``_name_kernel`` jitted functions with constexpr tile sizes
and a launcher with the signature of the matching ``splitserve.kernels.reference`` op.
``splitserve.kernels.triton_ops`` registers the launchers under backend "triton".
On CPU they run through Triton's interpreter (``TRITON_INTERPRET=1``).
"""
