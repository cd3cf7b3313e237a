"""A request's priority and its client's timeout, as the APIs read them
(cluster/api/request_options.py), and the timeout bounding its streams."""

import time

import pytest

from splitserve.cluster.api.backend import RequestOptions
from splitserve.cluster.api.openai_schema import ApiError
from splitserve.cluster.api.request_options import PRIORITY_BOUND, grpc_options, http_options
from splitserve.cluster.config import DeadlineSpec
from splitserve.cluster.serve.stream_deadlines import StreamDeadlines


def test_http_priority_and_timeout():
    assert http_options({}, None, 100.0) == RequestOptions(0, None)
    assert http_options({"x-request-timeout": "2.5"}, -3, 100.0) == RequestOptions(-3, 102.5)
    for written in ("10", "1e1", "10.", ".1e2", "10.0E+0"):
        assert http_options({"x-request-timeout": written}, None, 0.0).deadline == 10.0
    assert http_options({}, PRIORITY_BOUND, 0.0).priority == PRIORITY_BOUND


@pytest.mark.parametrize("value", ["0", "-1", "abc", "nan", "inf", "86400.5", "", "1_0", "\uff11\uff10",
                                   "0x10", "1e999"])
def test_a_bad_timeout_header_is_a_400_naming_it(value):
    with pytest.raises(ApiError) as e:
        http_options({"x-request-timeout": value}, None, 0.0)
    assert e.value.status == 400 and e.value.body()["error"]["param"] == "x-request-timeout"


def test_a_priority_beyond_int32_is_a_400():
    with pytest.raises(ApiError) as e:
        http_options({}, PRIORITY_BOUND + 1, 0.0)
    assert e.value.body()["error"]["param"] == "priority"


def test_grpc_deadline_becomes_the_requests_deadline():
    assert grpc_options(5, None, 10.0) == RequestOptions(5, None)
    assert grpc_options(-1, 0.25, 10.0) == RequestOptions(-1, 10.25)


def test_the_clients_timeout_bounds_the_streams_when_it_comes_first():
    spec = DeadlineSpec()
    own = StreamDeadlines(spec, "r", 16, deadline=time.time() + 0.5)
    assert own.own and own.remaining() <= 0.5
    assert "the client's timeout" in str(own.expired("d0"))
    later = StreamDeadlines(spec, "r", 16, deadline=time.time() + 1e6)
    assert not later.own and later.overall_s == spec.overall_s(16)
    assert "max_request_s" in str(later.expired("d0"))
