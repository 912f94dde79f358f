//! sagad's HTTP server: `GET /metrics` (Prometheus text), `GET /healthz` (the process is up),
//! `GET /readyz` (this replica can do its work: the database answers and its lease holds), and
//! the saga explorer's pages (`explorer`). Anything else is 404.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::telemetry::Metrics;

/// Whether the replica is ready now; asked on every `/readyz`, so it must be cheap.
pub type Readiness = Arc<dyn Fn() -> bool + Send + Sync>;

/// The content type of the Prometheus text format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone)]
struct Endpoints {
    metrics: Metrics,
    ready: Readiness,
}

/// The routes, with the metrics page they render, the readiness they report, and the
/// explorer's pages.
pub fn router(metrics: Metrics, ready: Readiness, explorer: Router) -> Router {
    Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .with_state(Endpoints { metrics, ready })
        .merge(explorer)
}

/// Serves `router` on `listener` until `stop` resolves; requests in progress then finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // The explorer records who acted by the visitor's address when tokens are off.
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(stop)
    .await
}

async fn metrics_page(State(endpoints): State<Endpoints>) -> Response {
    (
        [(header::CONTENT_TYPE, PROMETHEUS_TEXT)],
        endpoints.metrics.render(),
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(endpoints): State<Endpoints>) -> (StatusCode, &'static str) {
    if (endpoints.ready)() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the database is unreachable or this replica holds no lease\n",
        )
    }
}

async fn not_found() -> (StatusCode, &'static str) {
    (
        StatusCode::NOT_FOUND,
        "not found: sagad serves the explorer at /, and /metrics, /healthz and /readyz\n",
    )
}
