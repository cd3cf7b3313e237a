"""Load generation and reports, the one home of both: the ``splitserve bench``
load generator (datasets, arrival processes, an async driver over
HTTP/gRPC/in-process backends, the serving statistics of docs/benchmarks.md),
reports (tables, plot) and the JSON records that ``splitserve bench`` and the
scripts in benchmarks/ write (``record``)."""
