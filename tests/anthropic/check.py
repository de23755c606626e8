"""The real `anthropic` Python client against lmsd's front door: messages plain and with a
system prompt (and a system-role entry, as Claude Code sends), streamed with messages.stream,
tools with a tool result round trip, count_tokens, and errors in Anthropic's shape. Run by
tests/e2e/front_door.rs (simulator) and tests/e2e/real_engine.rs (llama-server).

Usage: check.py BASE_URL KEY ENGINE MODEL (ENGINE: "simulator" or "llama-server"). The base URL
is the server's root, as Anthropic's SDKs take it (ANTHROPIC_BASE_URL).
"""

import sys

import anthropic

base_url, key, engine, model = sys.argv[1:5]
simulated = engine == "simulator"
client = anthropic.Anthropic(base_url=base_url, api_key=key, max_retries=0)
weather = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def expect(error_type, call, *words):
    try:
        call()
    except error_type as error:
        for word in words:
            assert word in str(error), (word, error)
        return error
    raise SystemExit(f"expected {error_type.__name__} naming {words}")


def text(message):
    return "".join(block.text for block in message.content if block.type == "text")


plain = client.messages.create(model=model, max_tokens=16, messages=[{"role": "user", "content": "Say hello"}])
assert plain.type == "message" and text(plain) and plain.usage.output_tokens > 0, plain
assert plain.model.startswith(model), plain
if simulated:
    assert text(plain).startswith("Simulated reply"), plain

briefed = client.messages.create(
    model=model,
    max_tokens=16,
    system="Be brief.",
    messages=[{"role": "system", "content": "Use British spelling."}, {"role": "user", "content": "Say colour"}],
)
assert text(briefed), briefed

with client.messages.stream(model=model, max_tokens=16, messages=[{"role": "user", "content": "stream please"}]) as stream:
    streamed = "".join(stream.text_stream)
    final = stream.get_final_message()
assert streamed and streamed == text(final), (streamed, final)
assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0, final.usage

ask = [{"role": "user", "content": "What is the weather in Paris? Use get_weather."}]
if simulated:
    called = client.messages.create(model=model, max_tokens=64, tools=[weather], messages=ask)
    use = next(block for block in called.content if block.type == "tool_use")
    assert called.stop_reason == "tool_use" and use.name == "get_weather" and "city" in use.input, called
    with client.messages.stream(model=model, max_tokens=64, tools=[weather], messages=ask) as stream:
        streamed_use = next(b for b in stream.get_final_message().content if b.type == "tool_use")
    assert streamed_use.input == use.input, (streamed_use, use)
    use_id, use_input = use.id, use.input
else:
    use_id, use_input = "toolu_1", {"city": "Paris"}
answered = client.messages.create(
    model=model,
    max_tokens=16,
    tools=[weather],
    messages=ask
    + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": use_id, "name": "get_weather", "input": use_input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use_id, "content": "sunny, 21 C"}]},
    ],
)
assert text(answered), answered
if simulated:
    assert "sunny, 21 C" in text(answered), answered

counted = client.messages.count_tokens(model=model, messages=[{"role": "user", "content": "How many tokens is this?"}])
assert counted.input_tokens > 0, counted

expect(anthropic.NotFoundError, lambda: client.messages.create(model="nobody/nothing", max_tokens=8, messages=ask), "nobody/nothing")
expect(
    anthropic.BadRequestError,
    lambda: client.messages.create(
        model=model, max_tokens=8, messages=ask, tools=[{"type": "web_search_20250305", "name": "web_search"}]
    ),
    "web_search_20250305",
)
if simulated:
    # An alias from [routing] aliases (a glob here: "claude-*" = "auto").
    assert text(client.messages.create(model="claude-haiku-4-5", max_tokens=16, messages=[{"role": "user", "content": "hi"}]))
expect(
    anthropic.AuthenticationError,
    lambda: anthropic.Anthropic(base_url=base_url, api_key="wrong", max_retries=0).messages.create(
        model=model, max_tokens=8, messages=ask
    ),
)

print("anthropic client: ok")
