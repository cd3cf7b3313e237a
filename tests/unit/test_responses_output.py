"""Responses output items and stream events built from chat deltas
(cluster/api/responses_output.py): exact events for reasoning, text and
calls; the items a stream builds equal those of the same deltas whole."""

from splitserve.cluster.api.chat_output import ChatDelta
from splitserve.cluster.api.responses_output import OutputItems, status_of


def run(deltas, status="completed"):
    items = OutputItems()
    events = [e for d in deltas for e in items.add(d)] + items.finish(status)
    return items.items, events


def call(index, args, name=None, id_=None):
    d = {"index": index, "function": {"arguments": args}}
    if id_:
        d.update(id=id_, type="function")
        d["function"]["name"] = name
    return d


def test_reasoning_then_text_then_a_call():
    items, events = run([ChatDelta(reasoning="plan"), ChatDelta(reasoning=" more"),
                         ChatDelta(content="Hi"), ChatDelta(content="\n"),
                         ChatDelta(tool_calls=[call(0, '{"a": 1}', "f", "call_1")],
                                   finish_reason="tool_calls")])
    assert [(e["type"], e.get("output_index")) for e in events] == [
        ("response.output_item.added", 0), ("response.content_part.added", 0),
        ("response.reasoning_text.delta", 0), ("response.reasoning_text.delta", 0),
        ("response.reasoning_text.done", 0), ("response.content_part.done", 0),
        ("response.output_item.done", 0),
        ("response.output_item.added", 1), ("response.content_part.added", 1),
        ("response.output_text.delta", 1), ("response.output_text.delta", 1),
        ("response.output_text.done", 1), ("response.content_part.done", 1),
        ("response.output_item.done", 1),
        ("response.output_item.added", 2), ("response.function_call_arguments.delta", 2),
        ("response.function_call_arguments.done", 2), ("response.output_item.done", 2)]
    assert [i["type"] for i in items] == ["reasoning", "message", "function_call"]
    assert items[0]["content"] == [{"type": "reasoning_text", "text": "plan more"}]
    assert items[1]["content"][0]["text"] == "Hi\n" and items[1]["status"] == "completed"
    assert {k: items[2][k] for k in ("call_id", "name", "arguments", "status")} == {
        "call_id": "call_1", "name": "f", "arguments": '{"a": 1}', "status": "completed"}
    added = events[0]["item"]
    assert added["status"] == "in_progress" and added["content"] == []  # a copy, as it was then


def test_whitespace_before_calls_is_dropped_and_otherwise_kept():
    items, _ = run([ChatDelta(content="\n"), ChatDelta(tool_calls=[call(0, "{}", "f", "c")])])
    assert [i["type"] for i in items] == ["function_call"]
    items, _ = run([ChatDelta(content="  ")])
    assert [i["content"][0]["text"] for i in items] == ["  "]


def test_a_named_calls_arguments_stream_as_deltas():
    items, events = run([ChatDelta(tool_calls=[call(0, '{"a"', "f", "c")]),
                         ChatDelta(tool_calls=[call(0, ": 1}")])])
    deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert deltas == ['{"a"', ": 1}"] and items[0]["arguments"] == '{"a": 1}'


def test_a_cut_answer_leaves_its_last_item_incomplete():
    items, events = run([ChatDelta(content="abc")], status_of("length"))
    assert items[0]["status"] == "incomplete" and events[-1]["item"]["status"] == "incomplete"
    assert (status_of("stop"), status_of("tool_calls"), status_of("abort")) == (
        "completed", "completed", "incomplete")
