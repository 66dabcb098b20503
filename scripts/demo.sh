#!/usr/bin/env bash
# The runner on its own, no control plane: build it, start it on a scratch workspace, configure
# a small agent, invoke it and show the raw event stream, then keep serving so you can curl it
# or drive it with `agentbox` (the variables it prints are the ones the CLI reads).
# Needs only cargo, curl and python3: no Docker, no cluster. (For agentbox as a whole, the
# README's first five minutes start with `agentbox up --demo`.)
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked -p agentbox-runner
dir=$(mktemp -d)
token=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
printf '%s\n' "$token" > "$dir/token"
chmod 600 "$dir/token"
target/release/agentbox-runner --listen 127.0.0.1:0 --workspace "$dir/workspace" \
  --token-file "$dir/token" > "$dir/stdout" 2> "$dir/runner.log" &
runner=$!
trap 'kill "$runner" 2>/dev/null; wait "$runner" 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 200); do
  grep -q '^listening on ' "$dir/stdout" 2>/dev/null && break
  sleep 0.05
done
addr=$(sed -n 's/^listening on //p' "$dir/stdout")
url="http://$addr"
auth="Authorization: Bearer $token"

echo "== runner listening on $url (workspace $dir/workspace)"
echo "== POST /v1/configure"
curl -sS -N -H "$auth" "$url/v1/configure" -d '{
  "files": [{"path": "/workspace/agent.py",
             "content": "import sys\nprint(f\"hello {sys.stdin.read()}\")\n"}],
  "installCommand": ["python3", "-c", "print(\"installing...\")"],
  "entrypoint": ["python3", "/workspace/agent.py"]
}'
echo "== POST /v1/invoke (body: world)"
curl -sS -N -H "$auth" "$url/v1/invoke" -d 'world'
echo "== try it yourself (Ctrl-C stops the runner):"
echo "   export AGENTBOX_RUNNER_URL=$url AGENTBOX_RUNNER_TOKEN=$token"
echo "   agentbox invoke - --prompt you       # the CLI talks to this runner (the sandbox name is ignored)"
# shellcheck disable=SC2016 # printed for the reader to copy, not expanded here
echo '   curl -N -H "Authorization: Bearer $AGENTBOX_RUNNER_TOKEN" "$AGENTBOX_RUNNER_URL/v1/invoke" -d you'
if [ "${1:-}" = "--no-wait" ]; then exit 0; fi
wait "$runner"
