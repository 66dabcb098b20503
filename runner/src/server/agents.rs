//! `GET /v1/agents`: the configured agents, with what the ACP ones advertised once started.

use std::sync::Arc;

use agentbox_proto::{AgentInfo, AgentList, ErrorBody};
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};

use crate::AppState;

/// The routes (authenticated by the caller's layer).
pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new().route("/v1/agents", get(list_agents))
}

/// The configured agents
///
/// Every agent of the configuration in force, by name (`default` is the `entrypoint`), with
/// an ACP agent's `agentCapabilities` and `agentInfo` from its latest `initialize`.
#[utoipa::path(get, path = "/v1/agents", tag = "configure",
    responses(
        (status = 200, description = "The agents (empty before the first configure).", body = AgentList),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody)))]
pub(super) async fn list_agents(State(app): State<Arc<AppState>>) -> Json<AgentList> {
    let stored = app.store.get();
    let default = stored.default_agent();
    let items = stored
        .agents()
        .into_iter()
        .map(|agent| {
            let init = app.acp.initialized(&agent.name);
            AgentInfo {
                default: default.as_deref() == Some(agent.name.as_str()),
                capabilities: init
                    .as_ref()
                    .and_then(|i| i.get("agentCapabilities").cloned()),
                agent_info: init.as_ref().and_then(|i| i.get("agentInfo").cloned()),
                entrypoint: agent.entrypoint,
                protocol: agent.protocol,
                name: agent.name,
            }
        })
        .collect();
    Json(AgentList { items })
}
