#!/usr/bin/env bash
# The test command (README, `just test` and CI all run this): builds the static runner that the
# drop-in test copies into an empty directory, then runs every test of the workspace against the
# real binaries.
set -euo pipefail
cd "$(dirname "$0")/.."

RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --locked --target x86_64-unknown-linux-gnu -p agentbox-runner
export AGENTBOX_STATIC_RUNNER="$PWD/target/x86_64-unknown-linux-gnu/release/agentbox-runner"

cargo build --locked --workspace --bins
cargo test --locked --workspace "$@"
