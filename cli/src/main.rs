//! `agentbox`: not built yet. The command-line client is tracked in its own issue; until it lands,
//! use curl against `agentbox-runner` (see README.md).

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "agentbox: not available yet in this version; \
         use curl against agentbox-runner (see README.md)"
    );
    ExitCode::from(2)
}
