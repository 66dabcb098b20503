#!/usr/bin/env bash
# Fuzzes both servers against their own OpenAPI descriptions with schemathesis (PyPI): starts
# the real runner and control plane (debug builds: run scripts/test.sh or `cargo build
# --workspace --bins` first) with credentials, and fails on a 5xx, a response that violates the
# description, or a crash. Bounded: --max-examples per operation and a time budget per server.
# Processes run under bubblewrap when it is available (read-only host, writable scratch only),
# since the fuzzer sends arbitrary commands to exec and configure.
set -euo pipefail
cd "$(dirname "$0")/.."

MAX_EXAMPLES="${ST_MAX_EXAMPLES:-20}"
MAX_TIME="${ST_MAX_TIME:-60}"
BIN="${ST_BIN_DIR:-$PWD/target/debug}"
command -v schemathesis >/dev/null || { echo "schemathesis is not installed (pip install 'schemathesis>=4,<5'; .ci/run does)"; exit 1; }

# The Python that has schemathesis (its virtualenv's, when it is in one) has the validator too.
py="$(dirname "$(command -v schemathesis)")/python3"
[ -x "$py" ] || py=python3

# Both descriptions are valid OpenAPI 3.1.
"$py" - <<'PY'
from openapi_spec_validator import validate
import json
for f in ("runner/openapi.json", "controlplane/openapi.json"):
    validate(json.load(open(f)))
    print(f"{f}: valid OpenAPI")
PY

work=$(mktemp -d /tmp/agentbox-st.XXXXXX)
# Every process started here carries this tag in its environment, and every sandbox's runner
# (which gets none of the control plane's environment, and outlives it by design) names its
# workspace under $work on its command line, so cleanup finds them all.
tag="${work##*/}"
pids=()
# shellcheck disable=SC2317  # called from the EXIT trap
tagged() {
  {
    grep -lsz "^ST_TAG=$tag\$" /proc/[0-9]*/environ 2>/dev/null || true
    # A regular expression, so that grep's own command line (which holds "st\.") is no match.
    grep -lsE "agentbox-st\.${tag#agentbox-st.}/" /proc/[0-9]*/cmdline 2>/dev/null || true
  } | cut -d/ -f3 | grep -vx "$$" | sort -u
}
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  for pid in "${pids[@]}" $(tagged); do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 50); do [ -z "$(tagged)" ] && break; sleep 0.1; done
  for pid in $(tagged); do kill -KILL "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# Runs "$@" in its own session (under bwrap when it works here); sets PID, and ADDR from the
# first stdout line.
start() {
  local name=$1; shift
  # A private /tmp, with the binaries (which may live under /tmp, as in a CI checkout) bound
  # back read-only and the scratch directory writable.
  local jail=(bwrap --ro-bind / / --dev /dev --proc /proc --tmpfs /tmp --ro-bind "$BIN" "$BIN"
    --bind "$work" "$work" --die-with-parent --)
  if ! command -v bwrap >/dev/null || ! "${jail[@]}" true 2>/dev/null; then
    jail=()
  fi
  env "ST_TAG=$tag" setsid "${jail[@]}" "$@" > "$work/$name.out" 2> "$work/$name.err" &
  PID=$!
  pids+=("$PID")
  for _ in $(seq 1 200); do
    if grep -q '^listening on ' "$work/$name.out" 2>/dev/null; then
      ADDR=$(sed -n 's/^listening on //p' "$work/$name.out" | head -1)
      return
    fi
    sleep 0.05
  done
  echo "$name did not start:" >&2; cat "$work/$name.err" >&2; exit 1
}

checks=not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance
run() {
  local name=$1 url=$2 config=$3; shift 3
  local t0
  t0=$(date +%s)
  # In the scratch directory: schemathesis keeps its caches in the working directory.
  (cd "$work" && schemathesis --config-file "$config" run "$url/openapi.json" \
    --checks "$checks" --max-examples "$MAX_EXAMPLES" --max-time "$MAX_TIME" \
    --request-timeout 20 --workers 1 --seed 1 --no-color \
    --report junit --report-dir "$work/report-$name" "$@") || return 1
  echo "schemathesis: $name done in $(( $(date +%s) - t0 ))s"
}

# The runner, with short timeouts so fuzzed commands end quickly.
token=st-runner-token-$RANDOM$RANDOM
mkdir -p "$work/ws"
AGENTBOX_RUNNER_TOKEN=$token start runner "$BIN/agentbox-runner" --listen 127.0.0.1:0 \
  --workspace "$work/ws" --default-timeout 5s --max-timeout 10s --install-timeout 10s \
  --max-upload-bytes 1048576
status=0
touch "$work/runner.toml"
run runner "http://$ADDR" "$work/runner.toml" -H "Authorization: Bearer $token" || status=1
kill -0 "$PID" 2>/dev/null || { echo "the runner crashed"; cat "$work/runner.err"; status=1; }

# The control plane: API keys, local backend, one Running sandbox (fuzzed ids mostly 404).
key=st-admin-key-$RANDOM$RANDOM
digest=$(printf %s "$key" | sha256sum | cut -d' ' -f1)
echo "{\"keys\": [{\"name\": \"st\", \"sha256\": \"$digest\", \"admin\": true}]}" > "$work/keys.json"
echo '{"templates": [{"name": "default", "mode": "agent", "runnerArgs": ["--default-timeout", "5s", "--max-timeout", "10s", "--install-timeout", "10s"]}]}' > "$work/templates.json"
start cp "$BIN/agentbox-controlplane" --listen 127.0.0.1:0 --state-dir "$work/cp" \
  --api-keys-file "$work/keys.json" --templates-file "$work/templates.json" \
  --runner-bin "$BIN/agentbox-runner" --isolation none
curl -sf -H "X-API-Key: $key" "http://$ADDR/api/v1/sandboxes" \
  -d '{"name": "st", "templateRef": {"name": "default"}}' >/dev/null
# Sandbox ids are pinned to that sandbox, so passthrough routes reach its runner.
printf '[parameters]\n"path.id" = "st"\n' > "$work/cp.toml"
run controlplane "http://$ADDR" "$work/cp.toml" -H "X-API-Key: $key" || status=1
kill -0 "$PID" 2>/dev/null || { echo "the control plane crashed"; cat "$work/cp.err"; status=1; }
exit $status
