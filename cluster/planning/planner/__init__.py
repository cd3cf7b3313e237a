"""``splitserve plan``: bounds, a vectorised analytic estimate and the
simulator choose a deployment for a workload (``search.py``)."""
