"""The official MCP Python SDK driving lmsd-mcp over stdio, against lmsd and the simulator:
tools listed, local_task with text, files (one outside the roots refused, and readable once the
client names its directory as an MCP root), a schema (structured content), a session continued, progress, a cancel that reaches lmsd, local_embed ranking, and
isError when lmsd is not there. Run by tests/e2e/mcp.rs, which makes the first load slow."""

import asyncio
import json
import subprocess
import sys
import time

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

server, ctl, socket, allowed, outside = sys.argv[1:6]


def text(result):
    return "\n".join(c.text for c in result.content if c.type == "text")


def tasks_in_lmsd():
    out = subprocess.run([ctl, "--socket", socket, "--json", "tasks"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])["tasks"]


async def main():
    params = StdioServerParameters(command=server, args=["--socket", socket, "--allow-dir", allowed])
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            names = sorted(t.name for t in (await session.list_tools()).tools)
            assert names == ["local_batch", "local_batch_status", "local_embed", "local_models", "local_savings", "local_status", "local_task"], names

            # The first chat waits for a slow load (the test delays it): progress comes, then the
            # client gives up, and the cancel reaches lmsd, which drops the task.
            heard = []

            async def progress(value, total, message):
                heard.append(message)

            try:
                await session.call_tool(
                    "local_task",
                    {"instruction": "Say hi", "model": "ibm/granite-4-micro"},
                    read_timeout_seconds=3,
                    progress_callback=progress,
                )
                raise SystemExit("the slow call must time out")
            except Exception as error:  # the SDK's timeout error
                assert "imed out" in str(error) or "timeout" in str(error).lower(), repr(error)
            assert any("loading" in (m or "") for m in heard), heard
            deadline = time.time() + 10
            while tasks_in_lmsd() and time.time() < deadline:
                await asyncio.sleep(0.1)
            assert tasks_in_lmsd() == [], "the cancel reached lmsd"

            done = await session.call_tool("local_task", {"instruction": "Summarise", "text": "lmsd keeps models warm."})
            assert not done.is_error and "Simulated reply" in text(done), text(done)
            assert "ran locally on" in text(done) and "saved" in text(done), text(done)

            files = await session.call_tool("local_task", {"instruction": "Review", "files": ["notes*.txt"]})
            assert not files.is_error, text(files)
            refused = await session.call_tool("local_task", {"instruction": "Read", "files": [outside]})
            assert refused.is_error and "outside" in text(refused), text(refused)

            seen = await session.call_tool("local_task", {"instruction": "Describe", "files": ["chart.png"], "vision": True})
            assert not seen.is_error and "ran locally on qwen/qwen3-vl-4b" in text(seen), text(seen)
            blind = await session.call_tool("local_task", {"instruction": "Describe", "files": ["chart.png"]})
            assert blind.is_error and "not a text file" in text(blind), text(blind)

            schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
            person = await session.call_tool("local_task", {"instruction": "Extract: Ada", "schema": schema})
            assert not person.is_error and person.structured_content == {"name": "Simulated text"}, person
            label = await session.call_tool("local_task", {"instruction": "a bug report", "choices": ["bug", "feature"]})
            assert text(label).splitlines()[0] == "bug", text(label)

            first = await session.call_tool("local_task", {"instruction": "one", "model": "ibm/granite-4-micro", "session": "s"})
            second = await session.call_tool("local_task", {"instruction": "two", "model": "ibm/granite-4-micro", "session": "s"})
            assert "Simulated reply 1" in text(first) and "Simulated reply 2" in text(second), (text(first), text(second))

            ranked = await session.call_tool("local_embed", {"query": "cats purr", "texts": ["dogs bark", "cats purr"]})
            top = ranked.structured_content["ranked"][0]
            assert top["text"] == "cats purr" and abs(top["score"] - 1.0) < 1e-6, ranked.structured_content

            models = await session.call_tool("local_models", {})
            assert "ibm/granite-4-micro (llm" in text(models) and "loaded" in text(models), text(models)
            status = await session.call_tool("local_status", {})
            assert " up;" in text(status) and "ibm/granite-4-micro idle" in text(status), text(status)
            savings = await session.call_tool("local_savings", {})
            assert "today:" in text(savings), text(savings)

            # A batch job from a file the agent never reads: an id at once, then its progress.
            submitted = await session.call_tool("local_batch", {"file": "tickets.jsonl", "choices": ["bug", "feature"]})
            assert not submitted.is_error, text(submitted)
            job_id = submitted.structured_content["job_id"]
            for _ in range(100):
                status = await session.call_tool("local_batch_status", {"job_id": job_id})
                if status.structured_content["jobs"][0]["state"] == "completed":
                    break
                await asyncio.sleep(0.1)
            assert status.structured_content["jobs"][0]["done"] == 3, text(status)
            assert "batch results" in text(status), text(status)
            outside_job = await session.call_tool("local_batch", {"file": outside})
            assert outside_job.is_error and "outside" in text(outside_job), text(outside_job)

    # A client that names its MCP roots: they replace the directory lmsd-mcp started in (the
    # --allow-dir stays).
    import pathlib

    from mcp import types

    async def roots(context):
        return types.ListRootsResult(roots=[types.Root(uri=pathlib.Path(outside).parent.as_uri())])

    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write, list_roots_callback=roots) as session:
            await session.initialize()
            inside_root = await session.call_tool("local_task", {"instruction": "Read", "files": [outside]})
            assert not inside_root.is_error, text(inside_root)
            still_allowed = await session.call_tool("local_task", {"instruction": "Read", "files": [allowed + "/notes.txt"]})
            assert not still_allowed.is_error, text(still_allowed)

    # No lmsd at that socket: every tool says so, as a tool error and not a protocol error.
    gone = StdioServerParameters(command=server, args=["--socket", socket + ".gone"])
    async with stdio_client(gone) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            result = await session.call_tool("local_task", {"instruction": "x"})
            assert result.is_error and "lmsd is not running" in text(result), text(result)
    print("mcp: ok")


asyncio.run(main())
