#!/usr/bin/env bash
# Builds agentbox's images on the local Docker engine, from Debian packages only, so it works
# where no registry can be reached:
#   agentbox-base/debian:bookworm   debootstrap (minbase) into a folder, then `docker import`
#   agentbox-base/python:bookworm   that plus Debian's python3 and venv (images/base/python.Dockerfile)
#   agentbox-base/busybox:latest    an empty image plus Debian's static busybox (the drop-in test)
#   REGISTRY/runner:TAG             FROM scratch, only the static agentbox-runner
#   REGISTRY/python-agent:TAG       images/python-agent with --build-arg BASE=agentbox-base/python:bookworm
#   REGISTRY/langgraph-agent:TAG    images/langgraph-agent, LangGraph wheels fetched by pip on the host
#   REGISTRY/controlplane:TAG       with --controlplane or --push: the static control plane (images/controlplane)
# REGISTRY is AGENTBOX_REGISTRY, default `agentbox` (local names, pushed nowhere).
# Base images that exist are kept (delete them to rebuild); the others go through Docker's layer
# cache, so a second run takes seconds. Needs root (debootstrap), docker, debootstrap,
# busybox-static, cargo, python3 with pip.
#
# Usage: scripts/images.sh [--bases-only | --controlplane | --push]
#   --push: also build the control plane, then `docker push` the four product images (log in to
#   the registry first); scripts/manifests.sh then renders deploy/kubernetes with the same names.
#   env: AGENTBOX_REGISTRY (default agentbox), AGENTBOX_IMAGE_TAG (default latest),
#        DEBIAN_MIRROR (default http://deb.debian.org/debian),
#        AGENTBOX_BASES=public: build the product images on public bases (python:3.12-slim,
#        debian:bookworm-slim) instead of the local ones (where a registry is reachable)
set -euo pipefail
cd "$(dirname "$0")/.."

tag=${AGENTBOX_IMAGE_TAG:-latest}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
debian_image=agentbox-base/debian:$suite
python_image=agentbox-base/python:$suite
busybox_image=agentbox-base/busybox:latest
registry=${AGENTBOX_REGISTRY:-agentbox}
registry=${registry%/}
runner_image=$registry/runner:$tag
python_agent_image=$registry/python-agent:$tag
langgraph_image=$registry/langgraph-agent:$tag
controlplane_image=$registry/controlplane:$tag
bases_only=false
controlplane=false
push=false
case "${1:-}" in
  --bases-only) bases_only=true ;;
  --controlplane) controlplane=true ;;
  --push) controlplane=true; push=true ;;
  "") ;;
  *) echo "usage: scripts/images.sh [--bases-only | --controlplane | --push]" >&2; exit 64 ;;
esac
public=false
if [ "${AGENTBOX_BASES:-local}" = public ]; then
  public=true
  python_image=python:3.12-slim
fi

# No buildx here: the classic builder (the Dockerfiles need nothing newer).
if ! docker buildx version >/dev/null 2>&1; then
  export DOCKER_BUILDKIT=0
fi

have() { docker image inspect "$1" >/dev/null 2>&1; }
step_start=0
step() { step_start=$(date +%s); echo "images: $*"; }
done_step() { echo "images: ... $(( $(date +%s) - step_start ))s"; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if $public; then
  echo "images: public bases ($python_image); no local base images"
elif have "$debian_image"; then
  echo "images: $debian_image exists"
else
  step "debootstrap $suite into a folder, then docker import as $debian_image"
  command -v debootstrap >/dev/null || { echo "images: needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }
  debootstrap --variant=minbase "$suite" "$work/rootfs" "$mirror" > "$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
  tar -C "$work/rootfs" --numeric-owner -c . \
    | docker import --change 'CMD ["/bin/bash"]' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        - "$debian_image" >/dev/null
  rm -rf "$work/rootfs"
  done_step
fi

if $public; then
  :
elif have "$python_image"; then
  echo "images: $python_image exists"
else
  step "build $python_image"
  docker build -q -t "$python_image" --build-arg "DEBIAN=$debian_image" \
    -f images/base/python.Dockerfile images/base >/dev/null
  done_step
fi

if $public; then
  :
elif have "$busybox_image"; then
  echo "images: $busybox_image exists"
else
  step "build $busybox_image"
  busybox=$(command -v busybox || true)
  if [ -z "$busybox" ] || ! file -L "$busybox" | grep -q 'statically linked'; then
    echo "images: needs a static busybox (apt-get install busybox-static)" >&2
    exit 1
  fi
  mkdir -p "$work/busybox/bin" "$work/busybox/tmp"
  cp "$busybox" "$work/busybox/bin/busybox"
  for applet in sh cat ls sleep echo env id wget nc; do ln -s busybox "$work/busybox/bin/$applet"; done
  chmod 1777 "$work/busybox/tmp"
  tar -C "$work/busybox" --numeric-owner -c . \
    | docker import --change 'ENV PATH=/bin' - "$busybox_image" >/dev/null
  done_step
fi

$bases_only && exit 0

step "static agentbox-runner and $runner_image"
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --locked --target x86_64-unknown-linux-gnu -p agentbox-runner
mkdir -p "$work/runner"
cp target/x86_64-unknown-linux-gnu/release/agentbox-runner "$work/runner/"
cp images/runner/Dockerfile "$work/runner/"
docker build -q -t "$runner_image" "$work/runner" >/dev/null
done_step

step "build $python_agent_image"
docker build -q -t "$python_agent_image" --build-arg "BASE=$python_image" \
  --build-arg "RUNNER_IMAGE=$runner_image" images/python-agent >/dev/null
done_step

step "build $langgraph_image"
pyver=$(docker run --rm --entrypoint python3 "$python_image" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
wheels=images/langgraph-agent/wheels
pin=$(sed -n 's/^langgraph==//p' images/langgraph-agent/requirements.txt)
if [ -f "$wheels/.python-$pyver" ] && [ -f "$wheels/langgraph-$pin-py3-none-any.whl" ]; then
  echo "images: wheels for Python $pyver already downloaded"
elif ! python3 -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
    --python-version "$pyver" --implementation cp --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -r images/langgraph-agent/requirements.txt -d "$wheels"; then
  echo "images: pip download failed; the build will try PyPI from inside the container" >&2
else
  rm -f "$wheels"/.python-*
  touch "$wheels/.python-$pyver"
fi
docker build -q -t "$langgraph_image" --build-arg "AGENT_BASE=$python_agent_image" \
  images/langgraph-agent >/dev/null
done_step
if $controlplane; then
  step "static agentbox-controlplane and $controlplane_image"
  RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked --target x86_64-unknown-linux-gnu -p agentbox-controlplane
  mkdir -p "$work/controlplane"
  cp target/x86_64-unknown-linux-gnu/release/agentbox-controlplane images/controlplane/Dockerfile "$work/controlplane/"
  if $public; then base=debian:bookworm-slim; else base=$debian_image; fi
  docker build -q -t "$controlplane_image" --build-arg "BASE=$base" "$work/controlplane" >/dev/null
  done_step
fi

if $push; then
  for image in "$runner_image" "$python_agent_image" "$langgraph_image" "$controlplane_image"; do
    step "push $image"
    docker push -q "$image"
    done_step
  done
fi

docker images --format '{{.Repository}}:{{.Tag}} {{.Size}}' \
  | grep -E "^(agentbox-base/|$registry/)" | sort
