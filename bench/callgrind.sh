#!/usr/bin/env bash
# Instructions lmsd executes per chat, counted by callgrind: noise-free where P1's timings are
# not. lmsd runs under callgrind against a zero-delay simulator in a process of its own; after
# 20 warm-up chats the counters are zeroed, CHATS chats run one after another on one connection,
# and the total is divided by CHATS.
#
#   cargo build --release -p lmsd -p lmstudio-sim    # the daemon alone, as installed
#   bench/callgrind.sh [TARGET_DIR] [CHATS]           # needs valgrind (apt-get install valgrind)
set -euo pipefail
target=${1:-target/release}
chats=${2:-500}
command -v valgrind >/dev/null || { echo "callgrind.sh: valgrind is not installed" >&2; exit 1; }
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$target/lmstudio-sim" --zero-delay --port "$port" > "$dir/sim.log" 2>&1 &
printf '[server]\nsocket = "%s/lmsd.sock"\n[lmstudio]\nurl = "http://127.0.0.1:%s"\n' "$dir" "$port" > "$dir/lmsd.toml"
STATE_DIRECTORY=$dir/state LOGS_DIRECTORY=$dir/logs \
  valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out" "$target/lmsd" --config "$dir/lmsd.toml" \
  > "$dir/lmsd.log" 2>&1 &
lmsd=$!
for _ in $(seq 600); do [ -S "$dir/lmsd.sock" ] && break; sleep 0.1; done
[ -S "$dir/lmsd.sock" ] || { cat "$dir/lmsd.log"; echo "callgrind.sh: lmsd did not start" >&2; exit 1; }
run_chats() {
  python3 - "$dir/lmsd.sock" "$1" <<'PY'
import json, socket, sys
path, n = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_UNIX)
s.connect(path)
f = s.makefile("rwb")
for i in range(n):
    line = {"v": 1, "id": f"c{i}", "type": "chat", "model": "ibm/granite-4-micro", "input": "hello there"}
    f.write((json.dumps(line) + "\n").encode())
    f.flush()
    while True:
        reply = json.loads(f.readline())
        if reply["type"] != "event":
            assert reply["type"] == "result", reply
            break
PY
}
run_chats 20
callgrind_control -z "$lmsd" > /dev/null 2>&1
run_chats "$chats"
callgrind_control -d "$lmsd" > /dev/null 2>&1
sleep 1
total=$(grep -h '^summary:' "$dir"/callgrind.out.* | awk '{print $2}' | tail -1)
echo "lmsd: $((total / chats)) instructions per chat ($total over $chats chats)"
