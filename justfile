# agentbox recipes. `just` is optional: every recipe is a plain command you can copy.

# Debug build of every binary.
build:
    cargo build --workspace --bins

# The static (static-pie) runner to copy into any image.
build-static:
    RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target x86_64-unknown-linux-gnu -p agentbox-runner
    file target/x86_64-unknown-linux-gnu/release/agentbox-runner

# Every test, against the real binaries (what CI runs).
test *ARGS:
    scripts/test.sh {{ARGS}}

# Benchmarks; figures go to BENCHMARKS.md.
bench:
    cargo bench -p agentbox-runner --bench runner

# Formatting and lints, as CI checks them.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Start a runner, configure and invoke the quickstart agent.
demo:
    scripts/demo.sh

# The images (runner layer, python-agent, langgraph-agent), bases from Debian packages.
images:
    scripts/images.sh
