//! `aggregate { call ...; }`: several upstream GETs, run in dependency
//! waves (every call whose inputs are ready runs concurrently), merged into
//! one JSON object (LANGUAGE.md §9, §13.11).

use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;

use crate::config::model::{Aggregate, AggregateCall, LocationSettings, Piece, ProxyTarget};
use crate::gateway::Gateway;
use crate::proxy::balance::{Outcome, PickContext, Tried};
use crate::proxy::forward::{Body, error_response, full_body};
use crate::proxy::pool::Endpoint;
use crate::proxy::vars::RequestVars;

/// Largest call response read.
const MAX_CALL_BODY: usize = 8 * 1024 * 1024;

/// Resolve `$CALL.a.b` against finished calls; a missing or non-scalar
/// field fails the dependent call.
fn render(
    call: &AggregateCall,
    agg: &Aggregate,
    vars: &RequestVars<'_>,
    results: &[Option<Value>],
) -> Result<String, String> {
    let mut out = String::new();
    for p in &call.uri.pieces {
        match p {
            Piece::Lit(s) => out.push_str(s),
            Piece::Var(v) => vars.push_var(v, &mut out),
            Piece::CallRef { call: name, path } => {
                let Some(i) = agg.calls.iter().position(|c| c.name == *name) else {
                    return Err(format!("unknown call `{name}`"));
                };
                let Some(mut v) = results[i].as_ref() else {
                    return Err(format!("`{name}` failed"));
                };
                for seg in path {
                    v = match v {
                        Value::Object(m) => m.get(seg),
                        Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
                        _ => None,
                    }
                    .ok_or_else(|| format!("`{name}.{}` is missing", path.join(".")))?;
                }
                match v {
                    Value::String(s) => out.push_str(
                        &percent_encoding::utf8_percent_encode(
                            s,
                            percent_encoding::NON_ALPHANUMERIC,
                        )
                        .to_string(),
                    ),
                    Value::Number(n) => out.push_str(&n.to_string()),
                    Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
                    _ => return Err(format!("`{name}.{}` is not a scalar", path.join("."))),
                }
            }
        }
    }
    Ok(out)
}

async fn one_call(
    gw: &Gateway,
    call: &AggregateCall,
    target: String,
    headers: &HeaderMap,
    settings: &LocationSettings,
) -> Result<Value, String> {
    let (endpoint, host, pick, pool) = match &call.target {
        ProxyTarget::Upstream(i) => {
            let pool = gw.upstreams.get(*i).ok_or("no such upstream")?;
            let tried = Tried::new();
            let pick = pool
                .peers
                .pick(&PickContext::new(Instant::now()).tried(&tried))
                .ok_or("no upstream server available")?;
            let p = pick.peer();
            (
                Endpoint::Addr(pool.addr(p).ok_or("no upstream server available")?),
                pool.hosts[p].clone(),
                Some(pick),
                Some(pool.clone()),
            )
        }
        ProxyTarget::Address { host, port } => (
            Endpoint::Name(Arc::from(host.as_str()), *port),
            format!("{host}:{port}"),
            None,
            None,
        ),
    };
    let uri = http::Uri::try_from(target.as_str()).map_err(|e| e.to_string())?;
    let mut b = Request::builder().method("GET").uri(uri);
    if let Some(h) = b.headers_mut() {
        *h = headers.clone();
        if let Ok(v) = HeaderValue::try_from(host.as_str()) {
            h.insert(header::HOST, v);
        }
    }
    let req = b.body(full_body("")).map_err(|e| e.to_string())?;
    let keepalive = match &call.target {
        ProxyTarget::Upstream(i) => gw
            .upstreams
            .get(*i)
            .map_or(crate::proxy::forward::DEFAULT_KEEPALIVE, |p| {
                p.def.keepalive
            }),
        ProxyTarget::Address { .. } => crate::proxy::forward::DEFAULT_KEEPALIVE,
    };
    let mut trust = None;
    let conn_target = crate::proxy::forward::pool_target(
        gw,
        settings,
        call.tls,
        endpoint,
        &host,
        keepalive,
        &mut trust,
        std::time::Instant::now(),
    );
    let result = async {
        let (parts, body) = req.into_parts();
        let resp = crate::proxy::pool::request(&conn_target, &parts, body, None)
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_CALL_BODY)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("status {status}"));
        }
        serde_json::from_slice::<Value>(&body).map_err(|e| format!("not JSON: {e}"))
    }
    .await;
    if let (Some(pool), Some(pick)) = (pool, pick) {
        let ok = result.is_ok();
        pool.peers.report(
            pick.peer(),
            if ok {
                Outcome::Success
            } else {
                Outcome::Failure
            },
            Instant::now(),
        );
    }
    result
}

pub async fn run(
    gw: &Gateway,
    agg: &Aggregate,
    vars: &RequestVars<'_>,
    settings: &LocationSettings,
    incoming: &HeaderMap,
) -> Response<Body> {
    let mut headers = HeaderMap::new();
    if let Some(a) = incoming.get(header::AUTHORIZATION) {
        headers.insert(header::AUTHORIZATION, a.clone());
    }
    if let (Ok(n), Ok(v)) = (
        HeaderName::try_from(settings.request_id_header.as_str()),
        HeaderValue::try_from(vars.request_id),
    ) {
        headers.insert(n, v);
    }
    for h in &settings.proxy_set_header {
        let Some(n) = &h.built.name else {
            continue;
        };
        // An empty value removes the header (the client's `Authorization`
        // too), as on a proxied request.
        let v = match &h.built.value {
            Some(v) => Ok(v.clone()),
            None => match vars.render(&h.value) {
                v if v.is_empty() => {
                    headers.remove(n);
                    continue;
                }
                v => HeaderValue::try_from(v),
            },
        };
        if let Ok(v) = v {
            headers.insert(n.clone(), v);
        }
    }
    headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    let mut results: Vec<Option<Value>> = vec![None; agg.calls.len()];
    let mut timed_out = false;
    let deadline = tokio::time::Instant::now() + agg.timeout;
    for wave in &agg.waves {
        let mut futs = Vec::new();
        for &i in wave {
            let call = &agg.calls[i];
            let target = render(call, agg, vars, &results);
            let headers = &headers;
            futs.push(async move {
                match target {
                    Ok(t) => (i, one_call(gw, call, t, headers, settings).await),
                    Err(e) => (i, Err(e)),
                }
            });
        }
        match tokio::time::timeout_at(deadline, futures_join_all(futs)).await {
            Ok(done) => {
                for (i, r) in done {
                    match r {
                        Ok(v) => results[i] = Some(v),
                        Err(e) => {
                            tracing::warn!(call = %agg.calls[i].name, error = %e, "aggregate call failed")
                        }
                    }
                }
            }
            Err(_) => {
                timed_out = true;
                break;
            }
        }
    }
    let complete = results.iter().all(Option::is_some);
    if !complete && !agg.partial {
        let (status, msg) = if timed_out {
            (StatusCode::GATEWAY_TIMEOUT, "Gateway timeout")
        } else {
            (StatusCode::BAD_GATEWAY, "Bad gateway")
        };
        return error_response(status, msg, vars.request_id, &settings.request_id_header);
    }
    let mut obj = serde_json::Map::new();
    for (c, r) in agg.calls.iter().zip(results) {
        obj.insert(c.name.clone(), r.unwrap_or(Value::Null));
    }
    let mut resp = Response::new(full_body(Value::Object(obj).to_string()));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut().insert(
        "x-aggregate-complete",
        HeaderValue::from_static(if complete { "true" } else { "false" }),
    );
    resp
}

/// Run futures concurrently and collect their outputs (in completion order).
async fn futures_join_all<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut set = Vec::with_capacity(futs.len());
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut done: Vec<bool> = vec![false; pinned.len()];
    std::future::poll_fn(|cx| {
        for (i, f) in pinned.iter_mut().enumerate() {
            if done[i] {
                continue;
            }
            if let std::task::Poll::Ready(v) = f.as_mut().poll(cx) {
                done[i] = true;
                set.push(v);
            }
        }
        if done.iter().all(|d| *d) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    set
}
