"""StreamDeadlines: the first output, the gap between outputs and the
overall deadline of a request's decode streams; the stream is closed on
every way out."""

import asyncio

import pytest

from splitserve.cluster.api.backend import DeadlineExceeded
from splitserve.cluster.config import DeadlineSpec
from splitserve.cluster.serve.stream_deadlines import StreamDeadlines


class Stream:
    """An async iterator yielding after the given delays; records aclose."""

    def __init__(self, delays, error: BaseException | None = None):
        self.delays, self.error, self.closed = list(delays), error, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.delays:
            if self.error is not None:
                raise self.error
            raise StopAsyncIteration
        await asyncio.sleep(self.delays.pop(0))
        return "tok"

    async def aclose(self):
        self.closed = True


def spec(**kw):
    base = dict(first_output_s=0.3, inter_token_s=0.1, per_token_s=0.05, max_request_s=60)
    base.update(kw)
    return DeadlineSpec(**base)


async def drain(d: StreamDeadlines, s: Stream) -> int:
    return len([x async for x in d.outputs(s, "decode-1")])


def test_overall_deadline_follows_the_tokens_and_the_cap():
    s = DeadlineSpec(first_output_s=10, per_token_s=0.5, max_request_s=100)
    assert s.overall_s(20) == 20.0 and s.overall_s(10_000) == 100.0
    t = [1000.0]
    d = StreamDeadlines(s, "r", 20, clock=lambda: t[0])
    assert d.remaining() == 20.0
    t[0] += 25
    assert d.remaining() == 0.001  # a gRPC deadline that has passed, never none


def test_a_stream_within_its_deadlines_runs_to_the_end():
    # a first token slower than inter_token_s is allowed; wide margins, for a loaded machine
    s = Stream([0.5, 0.01, 0.01, 0.01])
    d = StreamDeadlines(spec(first_output_s=1.5, inter_token_s=0.3), "r", 100)
    assert asyncio.run(drain(d, s)) == 4
    assert s.closed


@pytest.mark.parametrize("delays, what", [
    ([0.5], "first token within deadlines.first_output_s"),
    ([0.01, 0.01, 0.3], "next token within deadlines.inter_token_s"),
])
def test_a_stalled_stream_is_closed_with_deadline_exceeded(delays, what):
    s = Stream(delays)
    with pytest.raises(DeadlineExceeded, match=what):
        asyncio.run(drain(StreamDeadlines(spec(), "r", 100), s))
    assert s.closed


def test_the_overall_deadline_cuts_a_stream_that_keeps_talking():
    s = Stream([0.05] * 40)  # 2 s of tokens, each within inter_token_s
    d = StreamDeadlines(spec(first_output_s=0.2, per_token_s=0.01), "r", 10)  # 0.3 s overall
    with pytest.raises(DeadlineExceeded, match="overall deadline"):
        asyncio.run(drain(d, s))
    assert s.closed and len(s.delays) > 30


def test_the_streams_own_timeout_is_not_mistaken_for_a_deadline():
    s = Stream([0.01], error=TimeoutError("transfer timed out"))
    with pytest.raises(TimeoutError, match="transfer timed out") as e:
        asyncio.run(drain(StreamDeadlines(spec(), "r", 100), s))
    assert not isinstance(e.value, DeadlineExceeded) and s.closed


def test_a_passed_deadline_is_504_over_http_and_deadline_exceeded_over_grpc():
    import grpc

    from splitserve.cluster.api.grpc_api import status_for
    from splitserve.cluster.api.openai_api import api_error

    e = DeadlineExceeded("request r: no output for 60s")
    err = api_error(e)
    assert (err.status, err.body()["error"]["code"]) == (504, "deadline_exceeded")
    assert status_for(e)[:2] == (grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
