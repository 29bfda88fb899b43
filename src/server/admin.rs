//! The admin listener (LANGUAGE.md §10): metrics, health, the routing table,
//! cache purge and reload. Off unless `admin { listen ...; }` is configured;
//! `allow` entries restrict who may connect.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::sync::{mpsc, watch};

use crate::config::model::Admin;
use crate::observe::metrics::{METRICS, ServerLabels};
use crate::proxy::forward::Shared;
use crate::server::ReloadOutcome;

/// What the admin endpoints need from the server.
#[derive(Clone)]
pub struct AdminCtx {
    pub shared: Arc<Shared>,
    pub reload_tx: mpsc::Sender<&'static str>,
    pub outcome: watch::Receiver<ReloadOutcome>,
    /// Set once every listener of the current config is bound.
    pub ready: watch::Receiver<bool>,
}

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    text(status, "application/json", v.to_string())
}

/// Refresh the gauges that are read from live state at scrape time.
fn refresh_gauges(shared: &Shared) {
    let gw = shared.gateway.load();
    let now = Instant::now();
    for pool in &gw.upstreams {
        for p in pool.peers.snapshot(now) {
            let labels = ServerLabels {
                upstream: pool.name.clone(),
                server: p.address.clone(),
            };
            METRICS
                .upstream_up
                .get_or_create(&labels)
                .set(i64::from(p.up));
            METRICS
                .upstream_active
                .get_or_create(&labels)
                .set(p.active_requests as i64);
        }
    }
    METRICS.config_generation.set(gw.generation as i64);
}

async fn route(ctx: AdminCtx, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/metrics") => {
            refresh_gauges(&ctx.shared);
            text(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                METRICS.encode(),
            )
        }
        (&Method::GET, "/healthz") => json(StatusCode::OK, serde_json::json!({"status": "ok"})),
        (&Method::GET, "/readyz") => {
            if *ctx.ready.borrow() {
                json(
                    StatusCode::OK,
                    serde_json::json!({"status": "ready", "generation": ctx.shared.gateway.load().generation}),
                )
            } else {
                json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({"status": "starting"}),
                )
            }
        }
        (&Method::GET, "/config") => {
            let gw = ctx.shared.gateway.load();
            let loaded = crate::observe::access_log::httpdate_rfc3339(gw.loaded_at);
            json(
                StatusCode::OK,
                serde_json::json!({
                    "generation": gw.generation,
                    "loaded_at": loaded,
                    "routes": crate::routes::rows(&gw.config),
                }),
            )
        }
        (&Method::POST, "/reload") => {
            let mut rx = ctx.outcome.clone();
            rx.borrow_and_update();
            if ctx.reload_tx.send("admin").await.is_err() {
                return json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({"error": "shutting down"}),
                );
            }
            let waited =
                tokio::time::timeout(std::time::Duration::from_secs(30), rx.changed()).await;
            if waited.is_err() {
                return json(
                    StatusCode::GATEWAY_TIMEOUT,
                    serde_json::json!({"error": "reload did not finish in 30s"}),
                );
            }
            let outcome = rx.borrow().clone();
            match outcome {
                ReloadOutcome::Applied { generation } => json(
                    StatusCode::OK,
                    serde_json::json!({"result": "applied", "generation": generation}),
                ),
                ReloadOutcome::Rejected { generation, reason } => json(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    serde_json::json!({"result": "rejected", "generation": generation, "reason": reason}),
                ),
            }
        }
        (&Method::DELETE, p) if p.starts_with("/cache/") => {
            let name = &p["/cache/".len()..];
            let gw = ctx.shared.gateway.load();
            let Some(i) = gw.config.caches.iter().position(|c| c.name == name) else {
                return json(
                    StatusCode::NOT_FOUND,
                    serde_json::json!({"error": format!("no cache named `{name}`"), "status": 404}),
                );
            };
            // `?key=` is the rendered key, URL-encoded (§13.6).
            let key = req.uri().query().and_then(|q| {
                q.split('&').find_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    (k == "key").then(|| {
                        percent_encoding::percent_decode_str(&v.replace('+', " "))
                            .decode_utf8_lossy()
                            .into_owned()
                    })
                })
            });
            let purged = gw
                .caches
                .get(i)
                .map(|c| c.purge(key.as_deref()))
                .unwrap_or(0);
            json(StatusCode::OK, serde_json::json!({"purged": purged}))
        }
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "Not found", "status": 404}),
        ),
    }
}

/// Bind and serve the admin listener; the task ends when `stop` fires.
pub async fn start(
    admin: &Admin,
    ctx: AdminCtx,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(admin.listen).await?;
    let local: SocketAddr = listener.local_addr()?;
    tracing::info!(addr = %local, "admin listening on {local}");
    let allow = admin.allow.clone();
    Ok(tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.changed() => return,
            };
            let Ok((stream, peer)) = accepted else {
                continue;
            };
            if !allow.is_empty() && !allow.iter().any(|c| c.contains(peer.ip())) {
                continue;
            }
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let ctx = ctx.clone();
                    async move { Ok::<_, std::convert::Infallible>(route(ctx, req).await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }))
}
