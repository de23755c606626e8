// lmsd's dashboard: every number comes from the same socket requests lmsd-ctl sends (relayed by
// POST /lmsd), and the page follows lmsd's own event stream (GET /events) to know when to
// read them again. No framework, no network beyond this lmsd.
"use strict";

const $ = (id) => document.getElementById(id);
let key = localStorage.getItem("lmsd-key") || "";
let seq = 0;

function headers() {
  const h = { "content-type": "application/json" };
  if (key) h.authorization = "Bearer " + key;
  return h;
}

function askForKey() {
  $("key").style.display = "inline";
  $("engine").textContent = "this lmsd needs an API key ([http] api_keys)";
}

$("key").addEventListener("submit", (e) => {
  e.preventDefault();
  key = $("key-input").value.trim();
  localStorage.setItem("lmsd-key", key);
  $("key").style.display = "none";
  refreshAll();
  follow();
});

/** One socket request through the front door; its result, or throws its error. */
async function ask(type, fields = {}) {
  const response = await fetch("/lmsd", {
    method: "POST",
    headers: headers(),
    body: JSON.stringify({ v: 1, id: "d" + ++seq, type, ...fields }),
  });
  if (response.status === 401) {
    askForKey();
    throw new Error("unauthorized");
  }
  const reply = await response.json();
  // A refusal comes as the socket's error line, or in OpenAI's shape before it got that far.
  if (reply.type === "error" || !response.ok) throw new Error((reply.error || {}).message || "refused");
  return reply;
}

const gb = (bytes) => (bytes / 1e9).toFixed(1) + " GB";
const money = (usd) => "$" + usd.toFixed(usd < 1 ? 4 : 2);
function ago(seconds) {
  if (seconds < 60) return Math.round(seconds) + "s";
  if (seconds < 3600) return Math.floor(seconds / 60) + "m";
  if (seconds < 86400) return Math.floor(seconds / 3600) + "h " + Math.floor((seconds % 3600) / 60) + "m";
  return Math.floor(seconds / 86400) + "d";
}
function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}
function button(label, action) {
  const td = document.createElement("td");
  const b = document.createElement("button");
  b.textContent = label;
  b.onclick = async () => {
    b.disabled = true;
    try { await action(); } catch (e) { alert(e.message); }
    refreshAll();
  };
  td.appendChild(b);
  return td;
}
function rows(tbody, items, make) {
  tbody.replaceChildren(...items.map((item) => {
    const tr = document.createElement("tr");
    tr.append(...make(item));
    return tr;
  }));
}

async function refreshStatus() {
  const s = await ask("status");
  const b = s.backend;
  $("engine").textContent = `${b.engine} at ${b.url}: ` + (b.reachable ? "reachable" : "UNREACHABLE") +
    (b.simulated ? " (SIMULATED: fake replies)" : "") + ` · lmsd ${s.daemon.version}, up ${ago(s.daemon.uptime_s)}`;
  $("engine").className = b.reachable ? "" : "bad";
  const m = s.memory;
  $("memory-bar").replaceChildren(...s.instances.map((i) => {
    const span = document.createElement("span");
    span.style.width = (100 * i.size_bytes / Math.max(m.budget_bytes, 1)) + "%";
    span.title = `${i.model}: ${gb(i.size_bytes)}` + (i.loaded_by === "outside" ? " (loaded outside lmsd)" : "");
    if (i.loaded_by === "outside") span.className = "outside";
    return span;
  }));
  $("memory-text").textContent = `${gb(m.used_bytes)} used of ${gb(m.budget_bytes)} (${gb(m.free_bytes)} free)`;
  rows($("instances"), s.instances, (i) => [
    cell(i.model), cell(i.state, i.state === "busy" ? "ok" : ""),
    cell(`${i.in_flight}/${i.parallel ?? "?"}`), cell(String(i.context_length)),
    cell(i.state === "idle" ? ago(i.idle_s) : "—"), cell(i.ttl_left_s == null ? "never" : ago(i.ttl_left_s)),
    cell(i.pinned ? "yes" : ""), cell(i.loaded_by),
    i.state === "idle" && !i.pinned
      ? button("Unload", () => ask("unload", { instance_id: i.instance_id }))
      : button(i.pinned ? "Unpin" : "Pin", () => ask(i.pinned ? "unpin" : "pin", { model: i.model })),
  ]);
}

async function refreshTasks() {
  const t = await ask("tasks");
  const order = { interactive: 0, normal: 1, batch: 2 };
  t.tasks.sort((a, b) => order[a.priority] - order[b.priority] || b.age_ms - a.age_ms);
  rows($("tasks"), t.tasks, (task) => [
    cell(task.task_id), cell(task.priority), cell(task.model), cell(task.state),
    cell(ago(task.age_ms / 1000)), button("Cancel", () => ask("cancel", { task_id: task.task_id })),
  ]);
  const queued = t.tasks.filter((x) => x.state === "queued");
  const oldest = queued.reduce((m, x) => Math.max(m, x.age_ms), 0);
  $("queue-text").textContent = queued.length
    ? `${queued.length} queued, the oldest for ${ago(oldest / 1000)}` : "nothing waits";
}

async function refreshSavings() {
  const days = await ask("savings", { since: "30d", by: "day" });
  const groups = days.groups || [];
  const most = groups.reduce((m, g) => Math.max(m, g.usd_saved), 0) || 1;
  const width = 300 / 30;
  $("savings-chart").replaceChildren(...groups.slice(-30).map((g, n) => {
    const r = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    const h = 110 * g.usd_saved / most;
    r.setAttribute("x", n * width + 1); r.setAttribute("width", width - 2);
    r.setAttribute("y", 120 - h); r.setAttribute("height", h);
    const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
    title.textContent = `${g.key}: ${money(g.usd_saved)}, ${g.input_tokens + g.output_tokens} tokens`;
    r.appendChild(title);
    return r;
  }));
  const tasks = days.tasks === 1 ? "1 task" : `${days.tasks} tasks`;
  $("savings-text").textContent = `${tasks} served locally, ${days.input_tokens + days.output_tokens} tokens: ` +
    `${money(days.usd_saved)} saved at $${days.input_usd_per_mtok}/$${days.output_usd_per_mtok} per million tokens`;
  const models = await ask("savings", { since: "30d", by: "model" });
  rows($("savings-models"), models.groups || [], (g) => [
    cell(g.key), cell(String(g.tasks)), cell(String(g.input_tokens + g.output_tokens)), cell(money(g.usd_saved)),
  ]);
}

/** A job's progress: a bar, and done/total in words. */
function progress(job) {
  const td = cell(`${job.done + job.failed}/${job.total}` + (job.failed ? ` (${job.failed} failed)` : ""));
  const bar = document.createElement("div");
  bar.className = "bar";
  const done = document.createElement("span");
  done.style.width = (100 * (job.done + job.failed) / Math.max(job.total, 1)) + "%";
  bar.appendChild(done);
  td.prepend(bar);
  return td;
}

async function refreshBatches() {
  const list = await ask("batch_status");
  rows($("batches"), list.jobs || [], (j) => [
    cell((j.name || j.job_id).slice(0, 24)), cell(j.state + (j.error ? ": " + j.error : ""), j.state === "paused" ? "bad" : ""),
    progress(j),
    cell(j.state === "running" ? j.rate_per_s.toFixed(1) + "/s" : ""), cell(j.eta_s == null ? "" : ago(j.eta_s)),
    j.state === "running" ? button("Cancel", () => ask("batch_cancel", { job_id: j.job_id })) : cell(""),
  ]);
}

async function refreshFitness() {
  const f = await ask("fitness");
  rows($("fitness"), f.models, (r) => [
    cell(r.model), cell(r.kind + (r.constrained ? "" : " (unconstrained)")), cell(String(r.tasks)),
    cell((100 * r.pass_rate).toFixed(0) + "%", r.pass_rate < 0.8 ? "bad" : "ok"),
  ]);
}

function refreshAll() {
  for (const refresh of [refreshStatus, refreshTasks, refreshSavings, refreshBatches, refreshFitness]) {
    refresh().catch((e) => { if (e.message !== "unauthorized") console.warn(e); });
  }
}

// Reads again what an event changed, at most every 250 ms.
const pending = new Set();
let timer = null;
function soon(refresh) {
  pending.add(refresh);
  timer = timer || setTimeout(() => {
    timer = null;
    for (const r of pending) r().catch(() => {});
    pending.clear();
  }, 250);
}

function describe(e) {
  switch (e.event) {
    case "loaded": return `loaded ${e.model} in ${(e.load_ms / 1000).toFixed(1)} s`;
    case "load_started": return `loading ${e.model}`;
    case "load_failed": return `load of ${e.model} FAILED: ${e.error}`;
    case "unloaded": return `unloaded ${e.instance_id} (${e.reason})`;
    case "task_queued": return `task ${e.task_id} queued (${e.kind} on ${e.model})`;
    case "task_started": return `task ${e.task_id} running on ${e.instance_id}`;
    case "task_finished": return `task ${e.task_id} finished: ${e.outcome} in ${(e.total_ms / 1000).toFixed(2)} s`;
    case "backend": return e.reachable ? "the engine is reachable" : "the engine is UNREACHABLE";
    case "context_mismatch": return `${e.instance_id} loaded with ${e.loaded} tokens of context, not ${e.requested}`;
    case "batch_progress": return null;
    default: return e.event;
  }
}

function logEvent(e) {
  const text = describe(e);
  if (text === null) return;
  const li = document.createElement("li");
  li.dataset.at = Date.now();
  li.dataset.text = text;
  li.title = new Date().toLocaleTimeString();
  li.textContent = `now  ${text}`;
  if (e.event === "load_failed" || (e.event === "task_finished" && e.outcome !== "ok")) li.className = "bad";
  $("events").prepend(li);
  while ($("events").children.length > 200) $("events").lastChild.remove();
}

/** Follows GET /events (fetch, not EventSource: it sends the key) and reconnects. */
async function follow() {
  try {
    const response = await fetch("/events", { headers: headers() });
    if (response.status === 401) return askForKey();
    $("live").textContent = "● live";
    $("live").className = "ok";
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = frame.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5)).join("\n");
        if (!data) continue;
        const e = JSON.parse(data);
        logEvent(e);
        if (e.event.startsWith("task_")) soon(refreshTasks);
        if (["loaded", "load_started", "unloaded", "load_failed", "task_started", "task_finished", "backend"].includes(e.event)) soon(refreshStatus);
        // The ledger is written every 500 ms: savings and pass rates are read after that.
        if (e.event === "task_finished") setTimeout(() => { soon(refreshSavings); soon(refreshFitness); }, 600);
        if (e.event === "batch_progress") soon(refreshBatches);
      }
    }
  } catch (e) { console.warn(e); }
  $("live").textContent = "○ reconnecting";
  $("live").className = "bad";
  setTimeout(follow, 2000);
}

refreshAll();
follow();
// Idle and TTL clocks move without events; so does "2m ago".
setInterval(() => {
  soon(refreshStatus);
  for (const li of $("events").children) {
    li.textContent = `${ago((Date.now() - li.dataset.at) / 1000)} ago  ${li.dataset.text}`;
  }
}, 5000);
