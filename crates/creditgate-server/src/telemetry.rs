//! Telemetry: Prometheus metric names in one place, the global recorder, and the request
//! middleware that opens the request context, times the request, counts it, and emits
//! its analytics row.

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{OnceLock, RwLock};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use creditgate_analytics::RequestEvent;
use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::context::RequestContext;
use crate::error::ApiError;
use crate::state::AppState;

/// Metric names of the HTTP layer (the service's are in `creditgate_service::metrics`, the
/// engine's in `creditgate_limiter::metrics`).
pub mod names {
    pub const HTTP_REQUESTS: &str = "creditgate_http_requests_total";
    pub const HTTP_SECONDS: &str = "creditgate_http_request_duration_seconds";
    pub const HTTP_IN_FLIGHT: &str = "creditgate_http_requests_in_flight";
    pub const HTTP_OVERLOADED: &str = "creditgate_http_requests_rejected_overload_total";
}

/// The process-wide Prometheus recorder (installed on first use).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5,
            ];
            let builder = PrometheusBuilder::new();
            let builder = builder
                .set_buckets(&buckets)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed");
            }
            handle
        })
        .clone()
}

/// The request counter and duration histogram of `(route, status)`, looked up in the
/// recorder once per pair (a bounded set: known routes × statuses) instead of once per
/// request. Handles are taken after the server installed the recorder.
fn route_metrics(route: &'static str, status: u16) -> (Counter, Histogram) {
    type Handles = HashMap<(&'static str, u16), (Counter, Histogram)>;
    static CACHE: OnceLock<RwLock<Handles>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(h) = cache
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&(route, status))
    {
        return h.clone();
    }
    let handles = (
        metrics::counter!(names::HTTP_REQUESTS, "route" => route, "status" => status.to_string()),
        metrics::histogram!(names::HTTP_SECONDS, "route" => route),
    );
    cache
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .entry((route, status))
        .or_insert(handles)
        .clone()
}

/// Known routes, the label values of the HTTP metrics (anything else is `other`).
const ROUTES: &[&str] = &[
    "/v2/apis.createApi",
    "/v2/apis.getApi",
    "/v2/apis.listKeys",
    "/v2/apis.deleteApi",
    "/v2/keys.createKey",
    "/v2/keys.getKey",
    "/v2/keys.updateKey",
    "/v2/keys.updateCredits",
    "/v2/keys.deleteKey",
    "/v2/keys.verifyKey",
    "/v2/keys.whoami",
    "/v2/liveness",
    "/openapi.json",
    "/metrics",
];

/// Keeps at most `max_in_flight` requests in the handlers: past it, 503 with
/// `Retry-After` before anything is read or done. Liveness and metrics stay answerable.
async fn in_flight_limit<F, Fut>(state: &AppState, req: Request, inner: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let path = req.uri().path();
    if path == "/v2/liveness" || path == "/metrics" {
        return inner(req).await;
    }
    let Ok(permit) = state.in_flight.try_acquire() else {
        metrics::counter!(names::HTTP_OVERLOADED).increment(1);
        return ApiError::Overloaded {
            limit: state.config.max_in_flight,
        }
        .into_response();
    };
    let _in_flight = InFlight::enter();
    let response = inner(req).await;
    drop(permit);
    response
}

/// Counts a request in the in-flight gauge until dropped (also when cancelled).
struct InFlight;

/// The in-flight gauge's handle, looked up once.
fn in_flight_gauge() -> &'static Gauge {
    static GAUGE: OnceLock<Gauge> = OnceLock::new();
    GAUGE.get_or_init(|| metrics::gauge!(names::HTTP_IN_FLIGHT))
}

impl InFlight {
    fn enter() -> Self {
        in_flight_gauge().increment(1.0);
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        in_flight_gauge().decrement(1.0);
    }
}

fn static_method(m: &Method) -> Option<&'static str> {
    Some(match m.as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => return None,
    })
}

/// The one layer around every route the router serves: [`observe`].
/// (One layer, not two: each `from_fn` layer clones and boxes the service and the
/// future of every request.)
pub async fn request_middleware(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    observe(&state, req, |req| next.run(req)).await
}

/// What every request goes through, around its handler `inner`: opens the request
/// context, admits the request past the in-flight limit (inside the context, so a
/// rejection still has a request id, metrics and its analytics row), times and counts
/// it, and emits its analytics row. The router's layer and the routes served ahead of
/// the router (`crate::app::Routes`) both call it.
pub async fn observe<F, Fut>(state: &AppState, req: Request, inner: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let started = Instant::now();
    let ctx = RequestContext::new();
    // Known routes and methods are static strings: no copy per request.
    let known = ROUTES.iter().copied().find(|r| *r == req.uri().path());
    let path: Cow<'static, str> = match known {
        Some(route) => Cow::Borrowed(route),
        None => Cow::Owned(req.uri().path().to_owned()),
    };
    let method = static_method(req.method())
        .map_or_else(|| Cow::Owned(req.method().to_string()), Cow::Borrowed);
    let response = ctx.clone().scope(in_flight_limit(state, req, inner)).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    let route = known.unwrap_or("other");
    let (count, seconds) = route_metrics(route, status);
    count.increment(1);
    seconds.record(elapsed.as_secs_f64());
    if route != "/metrics" {
        state.service.analytics().request(RequestEvent {
            request_id: ctx.request_id.0.clone(),
            time: state.service.clock().now_ms(),
            workspace_id: ctx.workspace().cloned().unwrap_or_else(|| "".into()),
            method,
            path,
            status,
            latency_us: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            node_id: state.config.node_id.clone(),
        });
    }
    response
}
