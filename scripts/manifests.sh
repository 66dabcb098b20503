#!/usr/bin/env bash
# Renders deploy/kubernetes into OUT with the product images renamed to the registry and tag
# scripts/images.sh built and pushed them under (the names also appear inside the JSON of the
# template ConfigMaps, which kustomize's `images:` would not reach). Then: kubectl apply -k OUT.
#
# Usage: AGENTBOX_REGISTRY=registry.example.com/team [AGENTBOX_IMAGE_TAG=v1] scripts/manifests.sh OUT
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:?usage: scripts/manifests.sh OUT}
registry=${AGENTBOX_REGISTRY:-agentbox}
registry=${registry%/}
tag=${AGENTBOX_IMAGE_TAG:-latest}
mkdir -p "$out"
for f in deploy/kubernetes/*.yaml; do
  sed -E "s#agentbox/(controlplane|runner|python-agent|langgraph-agent):latest#$registry/\\1:$tag#g" \
    "$f" > "$out/$(basename "$f")"
done
if [ "$registry" != agentbox ]; then
  # Pulled from a registry: a moving tag must be re-pulled; a fixed one need not be.
  if [ "$tag" = latest ]; then policy=Always; else policy=IfNotPresent; fi
  sed -i -E "s#(imagePullPolicy\"?: \"?)IfNotPresent#\\1$policy#" "$out"/*.yaml
fi
left=$(grep -lE 'agentbox/(controlplane|runner|python-agent|langgraph-agent):' "$out"/*.yaml || true)
if [ "$registry" != agentbox ] && [ -n "$left" ]; then
  echo "manifests: image names left unrenamed in: $left" >&2
  exit 1
fi
echo "manifests: $out uses $registry/*:$tag; apply with: kubectl apply -k $out"
