"""The real `openai` Python client against lmsd's front door: models, chat completions (plain,
streamed, with tools and a tool result, structured output with parse()), the Responses API
(plain, streamed, continued with previous_response_id, retrieved, parse() with a schema),
embeddings, aliases, and the errors. Run by tests/e2e/front_door.rs (simulator) and
tests/e2e/real_engine.rs (llama-server).

Usage: check.py BASE_URL KEY ENGINE MODEL, ENGINE being "simulator" or "llama-server". On the
simulator answers are known; on llama-server a real model answers what it will, so only the
shapes are checked there.
"""

import json
import sys

import openai
from pydantic import BaseModel

base_url, key, engine, model = sys.argv[1:5]
simulated = engine == "simulator"
client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)
weather_tool = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def expect(error_type, call, *words):
    """`call` must raise `error_type`, its message naming each of `words`."""
    try:
        call()
    except error_type as error:
        for word in words:
            assert word in str(error), (word, error)
        return error
    raise SystemExit(f"expected {error_type.__name__} naming {words}")


models = [m.id for m in client.models.list()]
assert model in models and "auto" in models, models

# Chat completions, plain: the answer, and the instance that gave it.
reply = client.chat.completions.create(
    model=model,
    messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}],
    max_tokens=16,
)
assert reply.choices[0].message.content, reply
assert reply.usage.completion_tokens > 0 and reply.model.startswith(model), reply
if simulated:
    assert reply.choices[0].message.content.startswith("Simulated reply"), reply

# Streamed, with usage.
text, usage = "", None
for chunk in client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "stream please"}],
    max_tokens=16,
    stream=True,
    stream_options={"include_usage": True},
):
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
    if chunk.usage:
        usage = chunk.usage
assert text and usage is not None and usage.total_tokens > 0, (text, usage)

# Multi-turn history, with an assistant message echoed back from the earlier reply.
history = [{"role": "user", "content": "x"}, reply.choices[0].message.model_dump(), {"role": "user", "content": "and then?"}]
assert client.chat.completions.create(model=model, messages=history, max_tokens=8).choices[0].message.content

# Tools: the model calls one, the client runs it and sends the result back.
ask = [{"role": "user", "content": "What is the weather in Paris? Use get_weather."}]
called = client.chat.completions.create(model=model, messages=ask, tools=[weather_tool], max_tokens=32)
if simulated:
    call = called.choices[0].message.tool_calls[0]
    assert called.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather", called
    assert "city" in json.loads(call.function.arguments), call
    # The same call, streamed as tool-call deltas.
    streamed_args, streamed_name = "", None
    for chunk in client.chat.completions.create(model=model, messages=ask, tools=[weather_tool], stream=True):
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            streamed_name = delta.function.name or streamed_name
            streamed_args += delta.function.arguments or ""
    assert streamed_name == "get_weather" and json.loads(streamed_args) == json.loads(call.function.arguments)
    call_id, arguments = call.id, call.function.arguments
else:
    call_id, arguments = "call_1", json.dumps({"city": "Paris"})
answered = client.chat.completions.create(
    model=model,
    messages=ask
    + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "sunny, 21 C"},
    ],
    tools=[weather_tool],
    max_tokens=16,
)
assert answered.choices[0].message.content, answered
if simulated:
    assert "sunny, 21 C" in answered.choices[0].message.content, answered


# Structured output: the client's own parse() with a Pydantic model, and json_object (which
# LM Studio itself refuses; lmsd constrains it as a schema of any object).
class Person(BaseModel):
    name: str
    age: int


if simulated:
    parsed = client.chat.completions.parse(
        model=model,
        messages=[{"role": "user", "content": "Extract the person: Ada Lovelace, 36."}],
        response_format=Person,
    )
    person = parsed.choices[0].message.parsed
    assert isinstance(person, Person) and person.name == "Simulated text", parsed
    anything = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Any JSON object"}], response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(anything.choices[0].message.content), dict), anything
    error = expect(
        openai.BadRequestError,
        lambda: client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "x"}], response_format={"type": "json_object"}, stream=True
        ),
    )
    assert error.body["param"] == "stream", error.body

# The Responses API: plain, continued (lmsd keeps the conversation), retrieved, streamed.
first = client.responses.create(model=model, instructions="Be brief.", input="My name is Ada.", max_output_tokens=16)
assert first.output_text and first.usage.output_tokens > 0, first
second = client.responses.create(model=model, input="What is my name?", previous_response_id=first.id, max_output_tokens=16)
assert second.output_text, second
if simulated:
    # The first turn was sent again with the second (llama-server's counts here are unreliable).
    assert second.usage.input_tokens > first.usage.input_tokens, (first.usage, second.usage)
assert client.responses.retrieve(second.id).id == second.id
assert second.previous_response_id == first.id, second
events, streamed, completed = [], "", None
for event in client.responses.create(model=model, input="stream please", stream=True, max_output_tokens=16):
    events.append(event.type)
    if event.type == "response.output_text.delta":
        streamed += event.delta
    if event.type == "response.completed":
        completed = event.response
assert events[0] == "response.created" and events[-1] == "response.completed" and streamed, events
# A streamed response is kept too, and continues like any other; a streamed continuation's
# events name the response it continues.
after = client.responses.create(model=model, input="and then?", previous_response_id=completed.id, max_output_tokens=8)
assert after.output_text, after
continued = [
    event.response
    for event in client.responses.create(model=model, input="more", previous_response_id=after.id, stream=True, max_output_tokens=8)
    if event.type == "response.completed"
]
assert continued and continued[0].previous_response_id == after.id, continued
expect(openai.NotFoundError, lambda: client.responses.create(model=model, input="x", previous_response_id="resp_gone"), "resp_gone")
expect(openai.BadRequestError, lambda: client.responses.create(model=model, input="x", background=True), "background")
if simulated:
    tool = {"type": "function", "name": "get_weather", "parameters": weather_tool["function"]["parameters"]}
    called = client.responses.create(model=model, input="Weather in Oslo? Use get_weather.", tools=[tool])
    call = next(item for item in called.output if item.type == "function_call")
    answered = client.responses.create(
        model=model,
        previous_response_id=called.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "snow"}],
        tools=[tool],
    )
    assert "snow" in answered.output_text, answered
    # text.format: translated to chat completions, constrained there and checked.
    parsed = client.responses.parse(model=model, input="Extract: Ada Lovelace, 36.", text_format=Person)
    assert isinstance(parsed.output_parsed, Person), parsed

# Embeddings: the client asks for base64 by default and decodes it; floats must say the same.
if simulated:
    embedded = client.embeddings.create(model="auto", input=["one", "two"])
    as_floats = client.embeddings.create(model="auto", input=["one", "two"], encoding_format="float")
    assert len(embedded.data) == 2 and len(embedded.data[0].embedding) > 0, embedded
    for packed, plain in zip(embedded.data, as_floats.data):
        assert all(abs(a - b) < 1e-6 for a, b in zip(packed.embedding, plain.embedding)), (packed, plain)
    error = expect(openai.BadRequestError, lambda: client.embeddings.create(model="auto", input=["one"], dimensions=4))
    assert error.body["param"] == "dimensions", error.body
    # Images need a model that sees, tools one trained for them: refused before anything loads.
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]
    expect(openai.BadRequestError, lambda: client.chat.completions.create(model=model, messages=image), "images")
    expect(
        openai.BadRequestError,
        lambda: client.chat.completions.create(model="google/gemma-3-12b", messages=ask, tools=[weather_tool]),
        "tool use",
    )
    # An alias from [routing] aliases answers as the model it maps to.
    aliased = client.chat.completions.create(model="gpt-5-mini", messages=[{"role": "user", "content": "hi"}])
    assert aliased.model.startswith(model), aliased

error = expect(
    openai.NotFoundError,
    lambda: client.chat.completions.create(model="nobody/nothing", messages=[{"role": "user", "content": "x"}]),
    "nobody/nothing",
    model,
)
expect(openai.AuthenticationError, lambda: openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list())

print("openai client: ok")
