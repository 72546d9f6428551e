#!/usr/bin/env bash
# make demo: a gateway on an embedded bbolt store, an agent next to a demo
# target, a user login and a `wicket connect`, all on loopback. It prints what
# to type to try it by hand, and stops everything on Ctrl-C.
#
# WICKET_DEMO_ONESHOT=1 exits after the first request (used by the tests).
# Ports: WICKET_DEMO_GATEWAY (8443), WICKET_DEMO_TARGET (18080), WICKET_DEMO_LOCAL (18081).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${WICKET_BIN:-bin/wicket}
DIR=${WICKET_DEMO_DIR:-demo-data}
GW_PORT=${WICKET_DEMO_GATEWAY:-8443}
TARGET_PORT=${WICKET_DEMO_TARGET:-18080}
LOCAL_PORT=${WICKET_DEMO_LOCAL:-18081}

[ -x "$BIN" ] || { echo "demo: $BIN is missing; run 'make build' first" >&2; exit 1; }
rm -rf "$DIR"
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

wait_for() { # wait_for FILE REGEX: until a log line matches (30 s)
  for _ in $(seq 1 300); do
    grep -Eq "$2" "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "demo: timed out waiting for '$2' in $1:" >&2; cat "$1" >&2; exit 1
}

cat > "$DIR/policy.yaml" <<POLICY
rules:
  - users: ["demo"]
    resources: ["web"]
POLICY

echo "== 1. gateway on 127.0.0.1:$GW_PORT (CA, bbolt and audit log in $DIR/gateway)"
"$BIN" gateway --data-dir "$DIR/gateway" --listen "127.0.0.1:$GW_PORT" --policy "$DIR/policy.yaml" >"$DIR/gateway.log" 2>&1 &
pids+=($!)
wait_for "$DIR/gateway.log" 'msg=listening'

echo "== 2. demo target (the private resource) on 127.0.0.1:$TARGET_PORT"
go build -o "$DIR/target" ./examples/demo/target
"$DIR/target" --listen "127.0.0.1:$TARGET_PORT" >"$DIR/target.log" 2>&1 &
pids+=($!)
wait_for "$DIR/target.log" 'listening'

echo "== 3. agent: one-time token, enroll, dial out"
AGENT_TOKEN=$("$BIN" token create agent demo-agent --resources web --data-dir "$DIR/gateway")
"$BIN" agent --token "$AGENT_TOKEN" --data-dir "$DIR/agent" --expose "web=127.0.0.1:$TARGET_PORT" >"$DIR/agent.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 300); do
  "$BIN" agents list --data-dir "$DIR/gateway" 2>/dev/null | grep -q 'demo-agent.*online' && break
  sleep 0.1
done
"$BIN" agents list --data-dir "$DIR/gateway"

echo "== 4. user: one-time token, login, connect"
USER_TOKEN=$("$BIN" token create user demo --data-dir "$DIR/gateway")
"$BIN" login --token "$USER_TOKEN" --data-dir "$DIR/user"
"$BIN" connect web --listen "127.0.0.1:$LOCAL_PORT" --data-dir "$DIR/user" >"$DIR/connect.log" 2>&1 &
pids+=($!)
wait_for "$DIR/connect.log" 'listening on'

echo "== 5. a request through the tunnel: 127.0.0.1:$LOCAL_PORT -> gateway -> agent -> target"
exec 3<>"/dev/tcp/127.0.0.1/$LOCAL_PORT"
printf 'GET / HTTP/1.0\r\nHost: web\r\n\r\n' >&3
reply=$(cat <&3)
exec 3<&-
echo "$reply" | tail -n 1
echo "$reply" | grep -q "hello from the private demo target" || { echo "demo: unexpected reply" >&2; exit 1; }

"$BIN" sessions list --data-dir "$DIR/gateway" || true

if [ "${WICKET_DEMO_ONESHOT:-}" = 1 ]; then
  "$BIN" audit verify "$DIR/gateway/audit.log"
  echo "demo: ok"
  exit 0
fi

cat <<HELP

Everything is running. Try it by hand in another terminal:

  curl http://127.0.0.1:$LOCAL_PORT/                             # through the tunnel
  $BIN agents list   --data-dir $DIR/gateway
  $BIN sessions list --data-dir $DIR/gateway
  $BIN audit verify  $DIR/gateway/audit.log
  $BIN agents revoke demo-agent --data-dir $DIR/gateway          # cuts the agent off within a second
  tail -f $DIR/*.log

Press Ctrl-C to stop.
HELP
wait
