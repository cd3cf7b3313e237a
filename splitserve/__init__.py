"""splitserve: disaggregated LLM serving on Ray.

Every package is imported under this one name: ``splitserve.kernels``,
``splitserve.engine``, ``splitserve.handoff``, ``splitserve.prefill``,
``splitserve.decode``, ``splitserve.router`` and ``splitserve.cluster``.
Their folders sit at the top of the source tree; an installed wheel maps
them under ``splitserve/`` (pyproject ``package-dir``).

A source checkout works without an install too: with the checkout's root on
``sys.path`` (``PYTHONPATH=.``), this package also searches the root for its
sub-packages, so ``splitserve.engine`` is the folder ``engine/``. The root is
recognised by its pyproject.toml naming this project, which no installed
site-packages folder has.
"""

from __future__ import annotations

import os as _os

__version__ = "0.1.0"


def _source_root() -> str | None:
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    try:
        with open(_os.path.join(root, "pyproject.toml"), encoding="utf-8") as f:
            head = f.read(4096)
    except OSError:
        return None
    return root if 'name = "splitserve"' in head else None


_root = _source_root()
if _root is not None and _root not in __path__:
    __path__.append(_root)
del _root
