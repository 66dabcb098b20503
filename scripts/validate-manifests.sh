#!/usr/bin/env bash
# Validates deploy/kubernetes offline: every resource the kustomization lists (and no other
# file) against the Kubernetes JSON schemas bundled in kubernetes-validate (PyPI; strict: unknown
# fields are errors), the JSON documents embedded in ConfigMaps and the Secret parse, and
# `kubectl kustomize` renders the whole when kubectl is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=deploy/kubernetes
k8s_version=${K8S_SCHEMA_VERSION:-1.33.0}
venv=${AGENTBOX_VALIDATE_VENV:-target/validate-venv}
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'kubernetes-validate==1.37.0'
fi

mapfile -t resources < <("$venv/bin/python" - "$dir" <<'PY'
import json, os, sys, yaml
d = sys.argv[1]
k = yaml.safe_load(open(os.path.join(d, "kustomization.yaml")))
assert k["kind"] == "Kustomization", "not a kustomization"
listed = k["resources"]
present = sorted(f for f in os.listdir(d) if f.endswith(".yaml") and f != "kustomization.yaml")
missing = [f for f in listed if f not in present]
unlisted = [f for f in present if f not in listed]
assert not missing and not unlisted, f"kustomization resources: missing {missing}, unlisted {unlisted}"
for f in listed:
    for doc in yaml.safe_load_all(open(os.path.join(d, f))):
        ns = doc["metadata"].get("namespace")
        assert doc["kind"] == "Namespace" or ns == k["namespace"], f"{f}: namespace {ns!r}"
        for key, text in (doc.get("data") or {}).items() | (doc.get("stringData") or {}).items():
            if key.endswith(".json"):
                json.loads(text)
    print(os.path.join(d, f))
PY
)
"$venv/bin/kubernetes-validate" --strict --quiet -k "$k8s_version" "${resources[@]}"
echo "manifests: ${#resources[@]} files valid against Kubernetes $k8s_version schemas (strict)"
if command -v kubectl >/dev/null; then
  kubectl kustomize "$dir" > /dev/null
  echo "manifests: kubectl kustomize renders $dir"
fi

# Renamed for a registry (scripts/manifests.sh): every image, in YAML and in the templates' JSON.
rendered=$(mktemp -d)
trap 'rm -rf "$rendered"' EXIT
AGENTBOX_REGISTRY=registry.example.com/team AGENTBOX_IMAGE_TAG=v1 scripts/manifests.sh "$rendered" > /dev/null
for image in controlplane python-agent langgraph-agent; do
  grep -rq "registry.example.com/team/$image:v1" "$rendered" || { echo "manifests: $image not renamed" >&2; exit 1; }
done
if grep -rqE 'agentbox/(controlplane|runner|python-agent|langgraph-agent):' "$rendered"; then
  echo "manifests: an image name was left unrenamed" >&2; exit 1
fi
"$venv/bin/kubernetes-validate" --strict --quiet -k "$k8s_version" "${resources[@]/#"$dir"/"$rendered"}"
echo "manifests: scripts/manifests.sh renames every image and its output is valid"
