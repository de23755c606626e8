"""OpenAI's Batch API through lmsd's front door with the real `openai` Python client: upload a
JSONL file, create a batch, poll it, download its output; list, cancel, delete. Run by
tests/e2e/batch.rs.

Usage: batch.py BASE_URL KEY MODEL
"""

import io
import json
import sys
import time

import openai

base_url, key, model = sys.argv[1:4]
client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)


def jsonl(ids):
    lines = [
        {
            "custom_id": i,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"Label ticket {i}"}]},
        }
        for i in ids
    ]
    return io.BytesIO("\n".join(json.dumps(line) for line in lines).encode())


ids = [f"req-{n}" for n in range(6)]
uploaded = client.files.create(file=("tickets.jsonl", jsonl(ids)), purpose="batch")
assert uploaded.purpose == "batch" and uploaded.bytes > 0, uploaded
assert client.files.retrieve(uploaded.id).id == uploaded.id
assert uploaded.id in [f.id for f in client.files.list()]

batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
assert batch.status in ("validating", "in_progress", "completed"), batch
deadline = time.time() + 60
while batch.status not in ("completed", "failed", "cancelled", "expired"):
    assert time.time() < deadline, batch
    time.sleep(0.2)
    batch = client.batches.retrieve(batch.id)
assert batch.status == "completed" and batch.request_counts.completed == len(ids), batch
assert batch.completion_window == "24h", batch

output = client.files.content(batch.output_file_id).text
results = [json.loads(line) for line in output.splitlines()]
assert sorted(r["custom_id"] for r in results) == sorted(ids), results
for result in results:
    assert result["response"]["status_code"] == 200, result
    assert result["response"]["body"]["choices"][0]["message"]["content"], result
assert batch.id in [b.id for b in client.batches.list()]

# A batch cancelled at once runs nothing more, and says so.
second = client.files.create(file=("more.jsonl", jsonl([f"late-{n}" for n in range(40)])), purpose="batch")
late = client.batches.create(input_file_id=second.id, endpoint="/v1/chat/completions", completion_window="24h")
cancelled = client.batches.cancel(late.id)
assert cancelled.status in ("cancelling", "cancelled"), cancelled
assert client.batches.retrieve(late.id).request_counts.completed < 40

# Refused whole, naming the line: a request for another endpoint than the batch's.
bad = client.files.create(
    file=("bad.jsonl", io.BytesIO(b'{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":{"model":"m","input":"x"}}')),
    purpose="batch",
)
try:
    client.batches.create(input_file_id=bad.id, endpoint="/v1/chat/completions", completion_window="24h")
    raise SystemExit("a line for another endpoint must be refused")
except openai.BadRequestError as error:
    assert "line 1" in str(error), error

assert client.files.delete(uploaded.id).deleted
try:
    client.files.retrieve(uploaded.id)
    raise SystemExit("a deleted file must be gone")
except openai.NotFoundError:
    pass

print("openai batch client: ok")
