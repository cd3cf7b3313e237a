"""The reasoning split (cluster/api/reasoning.py) and a chat output read
for reasoning then tool calls (cluster/api/chat_output.py): exact splits of
each format's outputs, and the same split whether the output arrives whole,
one character at a time or in random pieces."""

import random

import pytest

from splitserve.cluster.api.chat_output import ChatOutput
from splitserve.cluster.api.reasoning import (Reasoning, ReasoningSplitter, State, parser_for,
                                              reasoning_for, start_state)
from splitserve.cluster.api.tool_calls import tool_request

QWEN3_TEMPLATE = "{{ '<|im_start|>assistant\\n' }}{% if m %}<think>\\n{{ r }}</think>{% endif %}"
R1_TEMPLATE = "{% set content = content.split('</think>')[-1] %}<｜Assistant｜>"


def split(start, pieces):
    """(reasoning, content) of an output fed as ``pieces``."""
    s = ReasoningSplitter(start)
    r, c = zip(*[s.feed(p) for p in pieces]) if pieces else ((), ())
    tail = s.finish()
    return "".join(r) + tail[0], "".join(c) + tail[1]


def chunkings(text, rng):
    yield [text]
    yield list(text)
    for _ in range(20 if len(text) > 1 else 0):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 6))))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


QWEN3, R1, INSIDE, CLOSED = State.OPEN_QWEN3, State.OPEN_R1, State.REASONING_START, State.CONTENT


@pytest.mark.parametrize("start,text,reasoning,content", [
    (QWEN3, "<think>\nplan it\n</think>\n\nThe answer.", "plan it", "The answer."),
    (QWEN3, "  <think>a</think>b", "a", "b"),
    (QWEN3, "The answer.", "", "The answer."),
    (QWEN3, " <thin>x", "", " <thin>x"),  # not the tag: content as written
    (QWEN3, "<think>cut short", "cut short", ""),  # ended inside: all reasoning
    (QWEN3, "<think>a</think>b <think>c</think>", "a", "b <think>c</think>"),
    (QWEN3, "<think>\n\n</think>\n\nhi", "", "hi"),
    (QWEN3, "", "", ""),
    (QWEN3, "  ", "", "  "),
    (QWEN3, "<thi", "", "<thi"),  # a tag's beginning at the end is content
    (QWEN3, "a</think>b", "", "a</think>b"),  # qwen3: no opening tag, no reasoning
    (R1, "plan</think>\n\nanswer", "plan", "answer"),
    (R1, "<think>plan</think>answer", "plan", "answer"),  # the model opened it anyway
    (R1, "plan, never closed", "plan, never closed", ""),
    (R1, "a </thin", "a </thin", ""),
    (INSIDE, "\nplan \n</think>\nanswer\n", "plan", "answer\n"),
    (INSIDE, "plan</think>", "plan", ""),
    (CLOSED, "<think>x</think>y", "", "<think>x</think>y"),
])
def test_exact_splits_whatever_the_chunking(start, text, reasoning, content):
    rng = random.Random(text)
    for pieces in chunkings(text, rng):
        assert split(start, pieces) == (reasoning, content), pieces


def test_random_outputs_split_the_same_in_any_chunks():
    rng = random.Random(0)
    atoms = ["<think>", "</think>", "<", "</", "<th", "think", ">", " ", "\n", "a", "b", "</thi"]
    for _ in range(400):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 12)))
        for start in (QWEN3, R1, INSIDE, CLOSED):
            whole = split(start, [text])
            for pieces in chunkings(text, rng):
                assert split(start, pieces) == whole, (start, text, pieces)


def test_nothing_is_released_that_could_still_be_a_tag_or_trailing_space():
    s = ReasoningSplitter(QWEN3)
    assert s.feed("<th") == ("", "")
    assert s.feed("ink>plan  ") == ("plan", "")
    assert s.feed(" </thi") == ("", "")
    assert s.feed("nk>\n") == ("", "")
    assert s.feed("ok") == ("", "ok")
    assert s.finish() == ("", "")


@pytest.mark.parametrize("template,name,want", [
    (QWEN3_TEMPLATE, "auto", "qwen3"),
    (R1_TEMPLATE, "auto", "deepseek_r1"),
    ("{{ messages }}", "auto", None),
    (None, "auto", None),
    (QWEN3_TEMPLATE, "none", None),
    ("{{ messages }}", "deepseek_r1", "deepseek_r1"),
])
def test_the_format_is_detected_from_the_template_unless_named(template, name, want):
    assert parser_for(template, name) == want


@pytest.mark.parametrize("parser,prompt,constrained,want", [
    ("qwen3", "<|im_start|>assistant\n", False, QWEN3),
    ("qwen3", "<|im_start|>assistant\n<think>\n", False, INSIDE),  # the template opened it
    ("qwen3", "assistant\n<think>\n\n</think>\n\n", False, CLOSED),  # enable_thinking false
    ("deepseek_r1", "<｜Assistant｜>", False, R1),
    ("deepseek_r1", "<｜Assistant｜><think>\n", False, INSIDE),
    ("deepseek_r1", "<｜Assistant｜><think>\n", True, QWEN3),  # a grammar governs it from the start
    ("deepseek_r1", "<｜Assistant｜>", True, QWEN3),
])
def test_the_rendered_prompt_decides_where_the_output_starts(parser, prompt, constrained, want):
    assert start_state(parser, prompt, constrained) == want


def test_reasoning_for_a_model_without_a_format_is_none():
    assert reasoning_for("auto", "{{ messages }}", "x", False) is None
    assert reasoning_for("qwen3", None, "x", False, include=False) == Reasoning(QWEN3, False)


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
CALL_OUTPUT = ('<think>I should call it</think>\n<tool_call>\n{"name": "get_weather", '
               '"arguments": {"city": "oslo"}}\n</tool_call>')


def run_chat(output, pieces, reasoning=Reasoning(QWEN3), tools=None):
    """(the streamed deltas joined, the whole message) of a chat output fed as ``pieces``."""
    chat = ChatOutput(reasoning, tools.calls() if tools else None)
    joined = {"reasoning": "", "content": "", "calls": [], "finish": None}
    for k, p in enumerate(pieces):
        last = k == len(pieces) - 1
        d = chat.step(p, 1, last, "stop" if last else None)
        joined["reasoning"] += d.reasoning
        joined["content"] += d.content
        joined["calls"] += [(c["function"]["name"], c["function"]["arguments"]) for c in d.tool_calls]
        joined["finish"] = d.finish_reason
    return joined, chat.message()


@pytest.mark.parametrize("chunked", [False, True])
def test_tool_calls_are_parsed_from_the_content_after_the_reasoning(chunked):
    tools = tool_request([WEATHER], None, None, "<tool_call>")
    pieces = list(CALL_OUTPUT) if chunked else [CALL_OUTPUT]
    joined, message = run_chat(CALL_OUTPUT, pieces, tools=tools)
    assert joined == {"reasoning": "I should call it", "content": "",
                      "calls": [("get_weather", '{"city": "oslo"}')], "finish": "tool_calls"}
    assert message["reasoning_content"] == "I should call it" and message["content"] is None
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]


def test_a_tool_call_inside_the_reasoning_is_not_a_call():
    tools = tool_request([WEATHER], None, None, "<tool_call>")
    text = '<think><tool_call>{"name": "get_weather", "arguments": {}}</tool_call></think>fine'
    joined, message = run_chat(text, list(text), tools=tools)
    assert joined["calls"] == [] and joined["content"] == "fine" and joined["finish"] == "stop"
    assert message == {"role": "assistant", "content": "fine",
                       "reasoning_content": text[len("<think>"):-len("</think>fine")]}


def test_include_reasoning_false_drops_it_but_still_splits():
    text = "<think>plan</think>answer"
    joined, message = run_chat(text, list(text), Reasoning(QWEN3, include=False))
    assert (joined["reasoning"], joined["content"]) == ("", "answer")
    assert message == {"role": "assistant", "content": "answer"}


def test_reasoning_tokens_count_the_outputs_made_while_thinking():
    chat = ChatOutput(Reasoning(QWEN3))
    for piece, last in (("<think>", False), ("a b", False), ("</think>", False), ("\n", False),
                        ("ans", False), ("wer", True)):
        chat.step(piece, 1, last, "stop" if last else None)
    assert chat.reasoning_tokens == 3 and chat.message()["content"] == "answer"
