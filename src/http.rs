//! `/livez`, `/readyz`, `/metrics`, and `/inspect/user?id=` for `alarm-digest inspect` while
//! the instance runs (sled lets only one process open the data dir).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing;
use axum::Json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::bus::Topology;
use crate::metrics::Metrics;
use crate::readiness::Readiness;
use crate::store::Store;

#[derive(Clone)]
pub struct HttpState {
    pub readiness: Readiness,
    pub metrics: Arc<Metrics>,
    pub store: Store,
    pub topology: Arc<Topology>,
    /// Set once connected; readiness also requires the connection to be up right now.
    pub nats: Arc<OnceLock<async_nats::Client>>,
}

/// A minimal HTTP/1.0 GET against an instance's endpoint (for `inspect` and the tests):
/// returns the status code and the body. `path` must already be percent-encoded.
pub async fn get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

pub async fn serve(listener: TcpListener, state: HttpState, cancel: CancellationToken) {
    let app = axum::Router::new()
        .route("/livez", routing::get(|| async { "ok\n" }))
        .route("/readyz", routing::get(readyz))
        .route("/metrics", routing::get(metrics))
        .route("/inspect/user", routing::get(inspect_user))
        .with_state(state);
    let shutdown = async move { cancel.cancelled().await };
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!(%error, "HTTP server failed");
    }
}

async fn readyz(State(state): State<HttpState>) -> Response {
    let mut waiting = state
        .readiness
        .not_ready()
        .unwrap_or_else(|| vec!["unknown".into()]);
    let connected = state
        .nats
        .get()
        .is_some_and(|c| c.connection_state() == async_nats::connection::State::Connected);
    if !connected {
        waiting.push("nats".into());
    }
    if waiting.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        let body = format!("not ready: {}\n", waiting.join(", "));
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn metrics(State(state): State<HttpState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn inspect_user(
    State(state): State<HttpState>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let Some(user_id) = query.get("id") else {
        return (StatusCode::BAD_REQUEST, "missing ?id=<UserID>\n").into_response();
    };
    let shard = state.topology.shard_of(user_id);
    let store = state.store.clone();
    let user_id = user_id.clone();
    match tokio::task::spawn_blocking(move || store.inspect_user(shard, &user_id)).await {
        Ok(Ok(report)) => Json(report).into_response(),
        Ok(Err(error)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")).into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")).into_response(),
    }
}
