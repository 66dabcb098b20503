#!/usr/bin/env bash
# The kind smoke test: a real cluster, the images built and loaded, deploy/kubernetes applied,
# then through the API: create a sandbox, configure, invoke (output and exit code), cancel, and
# a 429 when the template's two invoke slots are taken. Needs docker, kind, kubectl, curl,
# python3, cargo. This repository's CI does not run it (no cluster can run there); the GitHub
# Actions workflow .github/workflows/kind.yml does.
#
# Usage: tests/kind/smoke.sh        (KEEP_CLUSTER=1 leaves the cluster up afterwards)
set -euo pipefail
cd "$(dirname "$0")/../.."

cluster=agentbox-smoke
ns=agentbox
port=${SMOKE_PORT:-18420}

cleanup() {
  if [ -n "${forward_pid:-}" ]; then kill "$forward_pid" 2>/dev/null || true; fi
  if [ "${KEEP_CLUSTER:-}" != 1 ]; then
    kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT
fail() {
  echo "smoke: FAIL: $*" >&2
  kubectl -n "$ns" get pods,secrets,events -o wide >&2 || true
  kubectl -n "$ns" logs deploy/agentbox-controlplane --tail=50 >&2 || true
  exit 1
}

echo "smoke: cluster"
kind get clusters 2>/dev/null | grep -qx "$cluster" \
  || kind create cluster --config tests/kind/kind-config.yaml --wait 120s

echo "smoke: images"
AGENTBOX_BASES=${AGENTBOX_BASES:-public} scripts/images.sh --controlplane
for image in agentbox/controlplane:latest agentbox/python-agent:latest agentbox/langgraph-agent:latest; do
  kind load docker-image --name "$cluster" "$image"
done

echo "smoke: apply"
kubectl apply -k deploy/kubernetes
key="abx_smoke_$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
digest=$(printf '%s' "$key" | sha256sum | cut -d' ' -f1)
kubectl -n "$ns" create secret generic agentbox-api-keys --dry-run=client -o yaml \
  --from-literal=keys.json="{\"keys\": [{\"name\": \"smoke\", \"sha256\": \"$digest\", \"admin\": true}]}" \
  | kubectl apply -f -
kubectl -n "$ns" rollout restart deploy/agentbox-controlplane
kubectl -n "$ns" rollout status deploy/agentbox-controlplane --timeout=180s

kubectl -n "$ns" port-forward svc/agentbox-controlplane "$port:80" >/dev/null 2>&1 &
forward_pid=$!
api="http://127.0.0.1:$port/api/v1"
for _ in $(seq 60); do curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 1; done
curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null || fail "the control plane is not reachable"

call() { curl -sS -H "X-API-Key: $key" "$@"; }

echo "smoke: create"
status=$(call -o /tmp/smoke-create.json -w '%{http_code}' "$api/sandboxes" \
  -d '{"name": "smoke", "templateRef": {"name": "default", "kind": "ClusterSandboxTemplate"}}')
[ "$status" = 201 ] || fail "create answered $status: $(cat /tmp/smoke-create.json)"
phase=""
for _ in $(seq 120); do
  phase=$(call "$api/sandboxes/smoke" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')
  [ "$phase" = Running ] && break
  sleep 2
done
[ "$phase" = Running ] || fail "the sandbox is $phase, not Running"

echo "smoke: configure"
call -N "$api/sandboxes/smoke/configure" -d '{
  "files": [{"path": "/workspace/agent.py",
             "content": "import sys\nprint(\"hello\", sys.stdin.read())\nsys.exit(3)\n"}],
  "installCommand": ["sh", "-c", "echo installed > /workspace/installed.txt"],
  "entrypoint": ["python3", "/workspace/agent.py"]}' > /tmp/smoke-configure.txt
grep -q '"installExitCode":0' /tmp/smoke-configure.txt || fail "configure: $(cat /tmp/smoke-configure.txt)"

echo "smoke: invoke"
call -N "$api/sandboxes/smoke/invoke" -d 'kind' > /tmp/smoke-invoke.txt
grep -q '"data":"hello kind"' /tmp/smoke-invoke.txt || fail "invoke output: $(cat /tmp/smoke-invoke.txt)"
grep -q '"exitCode":3' /tmp/smoke-invoke.txt || fail "invoke exit code: $(cat /tmp/smoke-invoke.txt)"

echo "smoke: cancel, and 429 with both invoke slots taken"
call -N "$api/sandboxes/smoke/configure" -d '{"entrypoint": ["sh", "-c", "echo ready; exec sleep 600"]}' >/dev/null
call -N "$api/sandboxes/smoke/invoke" > /tmp/smoke-long1.txt &
long1=$!
call -N "$api/sandboxes/smoke/invoke" > /tmp/smoke-long2.txt &
long2=$!
for _ in $(seq 60); do
  grep -q '"data":"ready"' /tmp/smoke-long1.txt && grep -q '"data":"ready"' /tmp/smoke-long2.txt && break
  sleep 1
done
status=$(call -o /tmp/smoke-429.json -w '%{http_code}' "$api/sandboxes/smoke/invoke" -d x)
[ "$status" = 429 ] || fail "a third invoke answered $status, not 429: $(cat /tmp/smoke-429.json)"
grep -q concurrency_exceeded /tmp/smoke-429.json || fail "429 body: $(cat /tmp/smoke-429.json)"
iid=$(sed -n 's/^data: {"invokeId":"\([^"]*\)".*/\1/p' /tmp/smoke-long1.txt | head -1)
[ -n "$iid" ] || fail "no invoke id in $(cat /tmp/smoke-long1.txt)"
status=$(call -o /dev/null -w '%{http_code}' -X POST "$api/sandboxes/smoke/invokes/$iid/cancel")
[ "$status" = 202 ] || fail "cancel answered $status"
wait "$long1" || true
grep -q '"reason":"canceled"' /tmp/smoke-long1.txt || fail "cancel: $(cat /tmp/smoke-long1.txt)"
call -X POST "$api/sandboxes/smoke/invoke/cancel" >/dev/null
wait "$long2" || true

echo "smoke: delete"
status=$(call -o /dev/null -w '%{http_code}' -X DELETE "$api/sandboxes/smoke")
[ "$status" = 200 ] || fail "delete answered $status"
echo "smoke: PASS"
