//! `agentbox-controlplane`: not built yet. The control plane (authentication, routing to each
//! sandbox's runner, a streaming proxy that keeps no state) is tracked in its own issue; until it
//! lands, talk to `agentbox-runner` directly (see README.md).

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "agentbox-controlplane: not available yet in this version; \
         run agentbox-runner and talk to it directly (see README.md)"
    );
    ExitCode::from(2)
}
