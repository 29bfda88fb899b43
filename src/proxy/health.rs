//! Background upkeep of an upstream pool: active health checks
//! (`health_check`) and re-resolution of `server NAME:PORT resolve;`.
//!
//! Tasks belong to one pool (one config generation) and are aborted when
//! the pool is dropped. Health verdicts live in the balancer's shared state,
//! so a reload with an unchanged upstream keeps them.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;

use crate::config::model::HealthCheck;
use crate::gateway::{Gateway, UpstreamPool, resolve};

/// Start the upkeep tasks of every pool of a snapshot (call inside the
/// runtime, once per snapshot).
pub fn start(gw: &Gateway) {
    for pool in &gw.upstreams {
        let mut handles = Vec::new();
        if let Some(hc) = &pool.def.health_check {
            for i in 0..pool.addrs.len() {
                let weak = Arc::downgrade(pool);
                let hc = hc.clone();
                handles.push(tokio::spawn(check_loop(weak, i, hc)).abort_handle());
            }
        }
        for (i, s) in pool.def.servers.iter().enumerate() {
            if s.resolve {
                let weak = Arc::downgrade(pool);
                let (host, port, ttl) = (s.host.clone(), s.port, s.resolve_ttl);
                handles.push(tokio::spawn(resolve_loop(weak, i, host, port, ttl)).abort_handle());
            }
        }
        if let Ok(mut t) = pool.tasks.lock() {
            t.extend(handles);
        }
    }
}

/// One GET on a new connection (TLS when `tls` is set, verified as the
/// proxied requests are); healthy when it answers 2xx or 3xx within the
/// timeout.
pub async fn probe(
    addr: SocketAddr,
    host: &str,
    uri: &str,
    timeout: Duration,
    tls: Option<&Arc<crate::tls::UpstreamTrust>>,
) -> bool {
    use crate::proxy::pool::{Endpoint, Key, Target};
    let attempt = async {
        let target = Target {
            key: Key {
                endpoint: Endpoint::Addr(addr),
                tls: tls.map(|t| {
                    let name = crate::tls::upstream_server_name(&addr.ip().to_string(), host);
                    (Arc::<str>::from(name), t.fingerprint)
                }),
            },
            connect_timeout: timeout,
            // Never pooled: a probe is its own connection.
            keepalive: 0,
            tls_config: tls.map(|t| &t.upstream),
            fresh: true,
            // The whole probe runs under `timeout` (below).
            read_timeout: None,
            send_timeout: None,
            response_room: 0,
            raw_response: None,
            now: std::time::Instant::now(),
        };
        let req = http::Request::get(uri)
            .header(http::header::HOST, host)
            .header(http::header::USER_AGENT, "tollgate-health-check")
            .body(crate::proxy::forward::full_body(Bytes::new()))
            .ok()?;
        let (parts, body) = req.into_parts();
        let resp = crate::proxy::pool::request(&target, &parts, body, None)
            .await
            .ok()?;
        let ok = resp.status().is_success() || resp.status().is_redirection();
        let _ = resp.into_body().collect().await;
        Some(ok)
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}

async fn check_loop(pool: Weak<UpstreamPool>, peer: usize, hc: HealthCheck) {
    let mut fails = 0u32;
    let mut passes = 0u32;
    let mut tick = tokio::time::interval(hc.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(p) = pool.upgrade() else { return };
        let (Some(addr), Some(host)) = (p.addr(peer), p.hosts.get(peer).cloned()) else {
            return;
        };
        let tls = p.probe_tls.clone();
        drop(p);
        let ok = probe(addr, &host, &hc.uri, hc.timeout, tls.as_ref()).await;
        let Some(p) = pool.upgrade() else { return };
        if ok {
            passes += 1;
            fails = 0;
            if passes >= hc.passes && p.peers.set_active_health(peer, true) {
                tracing::info!(upstream = %p.name, server = %host, "health check: up");
            }
        } else {
            fails += 1;
            passes = 0;
            if fails >= hc.fails && p.peers.set_active_health(peer, false) {
                tracing::warn!(upstream = %p.name, server = %host, "health check: down");
            }
        }
    }
}

async fn resolve_loop(
    pool: Weak<UpstreamPool>,
    peer: usize,
    host: String,
    port: u16,
    ttl: Duration,
) {
    let mut tick = tokio::time::interval(ttl.max(Duration::from_secs(1)));
    tick.tick().await;
    loop {
        tick.tick().await;
        let (h, p) = (host.clone(), port);
        let found = tokio::task::spawn_blocking(move || resolve(&h, p)).await;
        let Some(pool) = pool.upgrade() else { return };
        match found {
            Ok(Ok(addr)) => {
                if let Some(slot) = pool.addrs.get(peer)
                    && **slot.load() != addr
                {
                    tracing::info!(upstream = %pool.name, server = %host, %addr, "re-resolved");
                    slot.store(Arc::new(addr));
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(upstream = %pool.name, server = %host, error = %e, "re-resolve failed; keeping the old address")
            }
            Err(_) => {}
        }
    }
}
