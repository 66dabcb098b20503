#!/usr/bin/env bash
# The test command (README, `just test` and CI all run this): builds the static runner that the
# drop-in test copies into an empty directory and the images (scripts/images.sh), then runs every
# test of the workspace against the real binaries.
set -euo pipefail
cd "$(dirname "$0")/.."

RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --locked --target x86_64-unknown-linux-gnu -p agentbox-runner
export AGENTBOX_STATIC_RUNNER="$PWD/target/x86_64-unknown-linux-gnu/release/agentbox-runner"

# The images the docker-backend suite runs (controlplane/tests/docker.rs); cached after the first
# build. Without Docker, AGENTBOX_SKIP_DOCKER_TESTS=1 skips both (otherwise that suite fails).
if [ "${AGENTBOX_SKIP_DOCKER_TESTS:-}" != 1 ]; then
  scripts/images.sh
fi

cargo build --locked --workspace --bins
cargo test --locked --workspace "$@"
