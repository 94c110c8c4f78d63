#!/usr/bin/env bash
# Smoke test of the NestJS baseline: a private redis-server and the baseline on
# free loopback ports, one ticket, one data stream, one PUBLISH.
# Asserts a realtime-update frame and a heartbeat arrive, and that the slot is
# released after the client leaves. Kills only the processes it started.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/nestjs-baseline-smoke.XXXXXX")"
PIDS=()
cleanup() {
  local rc=$?
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  if [ "$rc" -ne 0 ]; then
    echo "--- baseline log ---" >&2; tail -n 40 "$WORK/app.log" 2>/dev/null >&2 || true
    echo "--- stream capture ---" >&2; cat "$WORK/stream.txt" 2>/dev/null >&2 || true
    echo "SMOKE FAIL" >&2
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() { echo "FAIL: $*" >&2; exit 1; }
free_port() { node -e "const s=require('net').createServer();s.listen(0,'127.0.0.1',()=>{console.log(s.address().port);s.close()})"; }

# 1. redis-server (installed by apt elsewhere; wait up to 3 minutes for it).
for _ in $(seq 1 180); do command -v redis-server >/dev/null && command -v redis-cli >/dev/null && break; sleep 1; done
command -v redis-server >/dev/null || fail "redis-server not found after 3 minutes"
command -v redis-cli >/dev/null || fail "redis-cli not found"

# 2. dependencies and build.
if [ ! -d node_modules ]; then timeout 300 npm ci --no-audit --no-fund >/dev/null; fi
if [ ! -f dist/main.js ] || [ -n "$(find src -newer dist/main.js -name '*.ts' | head -1)" ]; then
  timeout 300 npm run build >/dev/null
fi

REDIS_PORT="$(free_port)"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
  --dir "$WORK" --daemonize no >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
RC="redis-cli -h 127.0.0.1 -p $REDIS_PORT"
for _ in $(seq 1 50); do $RC ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
$RC ping | grep -q PONG || fail "redis-server did not start"

# 3. the baseline.
PORT="$(free_port)"
SECRET="smoke-secret-$$"
PORT="$PORT" HOST=127.0.0.1 REDIS_URL="redis://127.0.0.1:$REDIS_PORT" JWT_SECRET="$SECRET" \
  SSE_HEARTBEAT_SECS=0.5 LOG_LEVEL=debug node dist/main.js >"$WORK/app.log" 2>&1 &
PIDS+=($!)
BASE="http://127.0.0.1:$PORT"
for _ in $(seq 1 100); do curl -sf --max-time 1 "$BASE/health" >/dev/null 2>&1 && break; sleep 0.1; done
HEALTH="$(curl -s --max-time 2 "$BASE/health")"
echo "$HEALTH" | grep -q '"redis":"up"' || fail "health: $HEALTH"

# 4. identity, ownership, ticket.
TOKEN="$(node -e "console.log(require('jsonwebtoken').sign({sub:'smoke-user'},process.argv[1],{algorithm:'HS256',expiresIn:300}))" "$SECRET")"
$RC sadd "user:smoke-user:devices" "Machine 1" >/dev/null
$RC set "machine:Machine 1:status" '{"online":true}' >/dev/null

CODE="$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$BASE/sse/stream?deviceId=x")"
[ "$CODE" = 401 ] || fail "stream without ticket: expected 401, got $CODE"

RESP="$(curl -s --max-time 3 -X POST "$BASE/sse/stream-ticket" -H "Authorization: Bearer $TOKEN" \
  -H 'Content-Type: application/json' -d '{"purpose":"data","ttlSeconds":120}')"
TICKET="$(node -e "const r=JSON.parse(process.argv[1]);if(!r.ticket||!r.ticketId||r.expiresInSeconds!==120)process.exit(1);console.log(r.ticket)" "$RESP")" \
  || fail "ticket response: $RESP"

# 5. open the stream, publish, collect.
curl -s -N --max-time 5 "$BASE/sse/stream?ticket=$TICKET&deviceId=Machine%201" >"$WORK/stream.txt" 2>/dev/null &
CURL_PID=$!
PIDS+=($CURL_PID)
for _ in $(seq 1 50); do grep -q '^: connected' "$WORK/stream.txt" 2>/dev/null && break; sleep 0.1; done
grep -q '^retry: 3000' "$WORK/stream.txt" || fail "no retry/opening comment on the stream"

$RC publish mqtt:realtime:processed '{"deviceId":"Machine 1","data":{"Data":{"T1":247}}}' >/dev/null
$RC publish mqtt:realtime:processed '{"deviceId":"Machine 9","data":{"Data":{"T1":1}}}' >/dev/null

ok_rt=0; ok_hb=0
for _ in $(seq 1 40); do
  grep -q '^event: realtime-update' "$WORK/stream.txt" && ok_rt=1
  grep -q '^data: {"kind":"heartbeat","ts":"' "$WORK/stream.txt" && ok_hb=1
  [ $ok_rt = 1 ] && [ $ok_hb = 1 ] && break
  sleep 0.1
done
[ $ok_rt = 1 ] || fail "no realtime-update frame"
[ $ok_hb = 1 ] || fail "no heartbeat frame"
grep -q '^data: {"deviceId":"Machine 1","data":{"Data":{"T1":247}},"timestamp":"[0-9T:.-]*Z"}$' "$WORK/stream.txt" \
  || fail "realtime-update data not as expected"
grep -q '^event: machine-status' "$WORK/stream.txt" || fail "no machine-status snapshot"
grep -q 'Machine 9' "$WORK/stream.txt" && fail "event of another device leaked into the stream"
grep -Eq '^id: [0-9]+-[0-9]+$' "$WORK/stream.txt" || fail "no <epoch_ms>-<seq> ids"

# 6. the client leaves: its slot is released.
kill "$CURL_PID" 2>/dev/null || true
wait "$CURL_PID" 2>/dev/null || true
released=0
for _ in $(seq 1 30); do
  curl -s --max-time 1 "$BASE/health" | grep -q '"connections":0' && { released=1; break; }
  sleep 0.1
done
[ $released = 1 ] || fail "connection slot not released after disconnect"

echo "frames:"; sed 's/^/  /' "$WORK/stream.txt" | head -n 24
echo "SMOKE PASS"
