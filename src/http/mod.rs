//! `/livez`, `/readyz`, `/metrics`, and `/inspect/user?id=` for `alarm-digest inspect` while
//! the instance runs (sled lets only one process open the data dir). `/inspect` answers with a
//! user's alarms, so it is served only on a loopback listener: the main one when
//! `http.listen` is loopback, else a second one on `http.inspect_listen`.

mod client;

pub use client::{get, percent_encode, GetError};

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing;
use axum::Json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::bus::Topology;
use crate::metrics::Metrics;
use crate::readiness::Readiness;
use crate::store::Store;
use crate::wire::UserReport;

#[derive(Clone)]
pub struct HttpState {
    pub readiness: Readiness,
    pub metrics: Arc<Metrics>,
    pub store: Store,
    pub topology: Arc<Topology>,
    /// Set once connected; readiness also requires the connection to be up right now.
    pub nats: Arc<OnceLock<async_nats::Client>>,
}

/// Serves the probes and `/metrics`, and `/inspect` only if `with_inspect` (the caller passes
/// true for a loopback listener alone).
pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    with_inspect: bool,
    cancel: CancellationToken,
) {
    let mut app = axum::Router::new()
        .route("/livez", routing::get(|| async { "ok\n" }))
        .route("/readyz", routing::get(readyz))
        .route("/metrics", routing::get(metrics));
    if with_inspect {
        app = app.route("/inspect/user", routing::get(inspect_user));
    }
    run(listener, app.with_state(state), cancel).await;
}

/// Serves `/inspect` alone, on the loopback listener of an instance whose main listener is
/// open to the network.
pub async fn serve_inspect(listener: TcpListener, state: HttpState, cancel: CancellationToken) {
    let app = axum::Router::new()
        .route("/inspect/user", routing::get(inspect_user))
        .with_state(state);
    run(listener, app, cancel).await;
}

async fn run(listener: TcpListener, app: axum::Router, cancel: CancellationToken) {
    let shutdown = async move { cancel.cancelled().await };
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!(%error, "HTTP server failed");
    }
}

/// The parts that are not ready, and why; empty when the instance is ready.
fn not_ready(state: &HttpState) -> Vec<String> {
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
    waiting
}

async fn readyz(State(state): State<HttpState>) -> Response {
    let waiting = not_ready(&state);
    let standbys = state.readiness.standbys();
    let standbys = if standbys.is_empty() {
        String::new()
    } else {
        format!("standby for: {}\n", standbys.join(", "))
    };
    let warnings: String = state
        .readiness
        .warnings()
        .into_iter()
        .map(|warning| format!("warning: {warning}\n"))
        .collect();
    let standbys = standbys + &warnings;
    if waiting.is_empty() {
        (StatusCode::OK, format!("ready\n{standbys}")).into_response()
    } else {
        let body = format!("not ready: {}\n{standbys}", waiting.join(", "));
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

/// OpenMetrics when the client asks for it (Prometheus' scraper does), else the classic text
/// format, which every other reader (curl, `promtool check metrics`) parses.
async fn metrics(State(state): State<HttpState>, headers: axum::http::HeaderMap) -> Response {
    // Judged as /readyz judges it, when scraped.
    state
        .metrics
        .ready
        .set(i64::from(not_ready(&state).is_empty()));
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|accept| accept.to_str().ok())
        .is_some_and(|accept| accept.contains("application/openmetrics-text"));
    if openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                crate::metrics::OPENMETRICS_CONTENT_TYPE,
            )],
            state.metrics.render(),
        )
            .into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                crate::metrics::PROMETHEUS_TEXT_CONTENT_TYPE,
            )],
            state.metrics.render_prometheus_text(),
        )
            .into_response()
    }
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
    let read = move || {
        let stored = store.inspect_user(shard, &user_id)?;
        Ok::<_, crate::store::StoreError>(UserReport::new(
            &user_id,
            shard,
            &stored.alarms,
            stored.pending_digests,
        ))
    };
    match tokio::task::spawn_blocking(read).await {
        Ok(Ok(report)) => Json(report).into_response(),
        Ok(Err(error)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")).into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")).into_response(),
    }
}
