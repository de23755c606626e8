"""The real `openai` Python client against lmsd's front door: models, a plain chat, a streamed
chat with usage, structured output with parse(), embeddings, an unknown model and a wrong key. Run by tests/e2e/front_door.rs."""

import sys

import openai

base_url, key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)

models = [m.id for m in client.models.list()]
assert "ibm/granite-4-micro" in models and "auto" in models, models

reply = client.chat.completions.create(
    model="ibm/granite-4-micro",
    messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}],
)
assert reply.choices[0].message.content.startswith("Simulated reply"), reply
assert reply.choices[0].finish_reason == "stop"
assert reply.usage.completion_tokens > 0 and reply.model == "ibm/granite-4-micro", reply.usage

text, usage = "", None
for chunk in client.chat.completions.create(
    model="auto",
    messages=[{"role": "user", "content": "stream please"}],
    stream=True,
    stream_options={"include_usage": True},
):
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
    if chunk.usage:
        usage = chunk.usage
assert "Simulated reply" in text, text
assert usage is not None and usage.total_tokens > 0, usage

# The client asks for base64 by default and decodes it; floats must say the same.
embedded = client.embeddings.create(model="auto", input=["one", "two"])
as_floats = client.embeddings.create(model="auto", input=["one", "two"], encoding_format="float")
assert len(embedded.data) == 2 and len(embedded.data[0].embedding) > 0, embedded
for packed, plain in zip(embedded.data, as_floats.data):
    assert len(packed.embedding) == len(plain.embedding), (packed, plain)
    assert all(abs(a - b) < 1e-6 for a, b in zip(packed.embedding, plain.embedding)), (packed, plain)

# Structured output: the client's own parse() with a Pydantic model, and json_object (which
# LM Studio itself refuses; lmsd constrains it as a schema of any object).
import json

from pydantic import BaseModel


class Person(BaseModel):
    name: str
    age: int


parsed = client.chat.completions.parse(
    model="ibm/granite-4-micro",
    messages=[{"role": "user", "content": "Extract the person: Ada Lovelace, 36."}],
    response_format=Person,
)
person = parsed.choices[0].message.parsed
assert isinstance(person, Person) and person.name == "Simulated text", parsed
anything = client.chat.completions.create(
    model="ibm/granite-4-micro",
    messages=[{"role": "user", "content": "Any JSON object"}],
    response_format={"type": "json_object"},
)
assert isinstance(json.loads(anything.choices[0].message.content), dict), anything
try:
    client.chat.completions.create(
        model="ibm/granite-4-micro",
        messages=[{"role": "user", "content": "x"}],
        response_format={"type": "json_object"},
        stream=True,
    )
    raise SystemExit("a streamed response_format must be refused")
except openai.BadRequestError as error:
    assert error.body["param"] == "stream", error.body

# What lmsd cannot honour is refused by name, never silently dropped.
for field, value in [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
    ("top_p", 0.5),
]:
    try:
        client.chat.completions.create(
            model="ibm/granite-4-micro", messages=[{"role": "user", "content": "x"}], **{field: value}
        )
        raise SystemExit(f"{field} must be refused")
    except openai.BadRequestError as error:
        assert error.body["param"] == field and field in error.body["message"], error.body
try:
    client.chat.completions.create(
        model="ibm/granite-4-micro",
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}],
    )
    raise SystemExit("an image part must be refused")
except openai.BadRequestError as error:
    assert "image_url" in error.body["message"], error.body
try:
    client.embeddings.create(model="auto", input=["one"], dimensions=4)
    raise SystemExit("dimensions must be refused")
except openai.BadRequestError as error:
    assert error.body["param"] == "dimensions", error.body
# LM Studio's temperature range is 0 to 1; the front door does not map OpenAI's 0 to 2 onto it.
try:
    client.chat.completions.create(
        model="ibm/granite-4-micro", messages=[{"role": "user", "content": "x"}], temperature=1.5
    )
    raise SystemExit("a temperature above LM Studio's range must be refused")
except openai.BadRequestError as error:
    assert "0 to 1" in error.body["message"], error.body
# Harmless fields pass, and so do the neutral values clients send as defaults, and an assistant
# message echoed back from an earlier reply with its empty extras.
client.chat.completions.create(
    model="ibm/granite-4-micro",
    messages=[
        {"role": "user", "content": "x"},
        reply.choices[0].message.model_dump(),
        {"role": "user", "content": "and then?"},
    ],
    user="me",
    n=1,
    top_p=1,
    frequency_penalty=0,
    presence_penalty=0,
    temperature=0.7,
)

try:
    client.chat.completions.create(model="nobody/nothing", messages=[{"role": "user", "content": "x"}])
    raise SystemExit("an unknown model must be an error")
except openai.NotFoundError as error:
    assert "nobody/nothing" in str(error), error

try:
    openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
    raise SystemExit("a wrong key must be refused")
except openai.AuthenticationError:
    pass

print("openai client: ok")
