//! The typed HTTP client of agentbox, used by the `agentbox` command and by tests. It talks to
//! a control plane (`/api/v1/sandboxes/{id}/...`) or straight to one runner (`/v1/...`) through
//! the same methods.

pub mod client;
pub mod sse;
