"""The real `openai` Python client against lmsd's front door: models, a plain chat, a streamed
chat with usage, embeddings, an unknown model and a wrong key. Run by tests/e2e/front_door.rs."""

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

embedded = client.embeddings.create(model="auto", input=["one", "two"])
assert len(embedded.data) == 2 and len(embedded.data[0].embedding) == 8, embedded

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
