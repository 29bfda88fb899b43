//! The floor for `bench/run`: a bare hyper HTTP/1 proxy with none of the
//! gateway (no routing, headers, logs, metrics, guard) — one current-thread
//! runtime, a stack of idle upstream `SendRequest` handles. What tollgate
//! costs above this is the price of its pipeline.
//!
//! `cargo run --release --example bare-proxy -- 127.0.0.1:9400 127.0.0.1:9000`

use std::cell::RefCell;
use std::rc::Rc;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// The idle upstream connections of this (single) thread.
type Idle = Rc<RefCell<Vec<SendRequest<Incoming>>>>;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:9400".into());
    let upstream = args.next().unwrap_or_else(|| "127.0.0.1:9000".into());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let listener = tokio::net::TcpListener::bind(&listen).await?;
        let idle: Idle = Rc::default();
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let idle = idle.clone();
            let upstream = upstream.clone();
            tokio::task::spawn_local(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let idle = idle.clone();
                    let upstream = upstream.clone();
                    async move { forward(idle, &upstream, req).await }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}

async fn forward(
    idle: Idle,
    upstream: &str,
    req: Request<Incoming>,
) -> Result<Response<ReturnOnEnd>, hyper::Error> {
    let pooled = idle.borrow_mut().pop();
    let mut sender = match pooled {
        Some(s) => s,
        None => {
            let tcp = match tokio::net::TcpStream::connect(upstream).await {
                Ok(t) => t,
                Err(_) => {
                    return Ok(Response::builder()
                        .status(http::StatusCode::BAD_GATEWAY)
                        .body(ReturnOnEnd {
                            inner: None,
                            back: None,
                        })
                        .unwrap_or_default());
                }
            };
            let _ = tcp.set_nodelay(true);
            let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::task::spawn_local(conn);
            s
        }
    };
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    let (parts, body) = resp.into_parts();
    // Back on the stack when the body has ended.
    let body = ReturnOnEnd {
        inner: Some(body),
        back: Some((sender, idle)),
    };
    Ok(Response::from_parts(parts, body))
}

#[derive(Default)]
struct ReturnOnEnd {
    inner: Option<Incoming>,
    back: Option<(SendRequest<Incoming>, Idle)>,
}

impl http_body::Body for ReturnOnEnd {
    type Data = bytes::Bytes;
    type Error = hyper::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, hyper::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return std::task::Poll::Ready(None);
        };
        let r = std::pin::Pin::new(inner).poll_frame(cx);
        if (matches!(r, std::task::Poll::Ready(None)) || self.is_end_stream())
            && let Some((s, idle)) = self.back.take()
        {
            idle.borrow_mut().push(s);
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }
}
