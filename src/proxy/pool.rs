//! Upstream connections: per worker thread, a stack of idle HTTP/1
//! connections for each (address, TLS identity).
//!
//! A request pops the most recently returned connection (the warmest one)
//! or opens a new one; the connection goes back on the stack when the
//! response body has been read to its end — a body dropped half-read closes
//! it, since the connection cannot be reused. At most `keepalive` idle
//! connections are kept per stack (the upstream's `keepalive N`); a return
//! also drops the stack's oldest entries once they have been idle for
//! [`IDLE_TIMEOUT`] or their upstream closed them.
//!
//! This replaces hyper-util's legacy `Client`: no shared pool behind a
//! mutex, no cross-task checkout machinery — the worker that owns the
//! connection is the only one that uses it (see DESIGN.md).

use std::cell::RefCell;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{Builder, SendRequest};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;

use super::forward::Body;

/// How long an idle upstream connection is kept (NGINX's upstream
/// `keepalive_timeout` default is 60 s).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a connection goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A resolved address (upstream block servers).
    Addr(SocketAddr),
    /// `host:port` as written in `proxy_pass` (resolved when connecting).
    Name(Arc<str>, u16),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Addr(a) => a.fmt(f),
            Endpoint::Name(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

/// The identity of a pooled connection: where it goes and, for TLS, the
/// name it was verified against and the trust it was verified with.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub endpoint: Endpoint,
    /// `(server name, trust fingerprint)`; `None` for plain HTTP.
    pub tls: Option<(Arc<str>, u64)>,
}

/// One upstream request's connection parameters.
pub struct Target<'a> {
    pub key: Key,
    pub connect_timeout: Duration,
    /// Idle connections kept for this key (the upstream's `keepalive`).
    pub keepalive: usize,
    /// The TLS client config when `key.tls` is set.
    pub tls_config: Option<&'a Arc<rustls::ClientConfig>>,
    /// Open a new connection even if one is idle (the retry after a
    /// pooled connection turned out stale).
    pub fresh: bool,
}

/// Why an upstream request failed.
#[derive(Debug)]
pub enum ClientError {
    /// TCP connect (or name resolution) failed or timed out.
    Connect(std::io::Error),
    /// The TLS handshake failed (certificate, protocol).
    Tls(std::io::Error),
    /// The HTTP exchange failed after the connection was up.
    Http(hyper::Error),
    /// A pooled connection was closed by the upstream as the request went
    /// out, before any response byte — most likely its keep-alive timeout
    /// racing ours. Safe to send again on a new connection when the
    /// request is idempotent and has no body (NGINX does the same for its
    /// cached connections).
    Stale(hyper::Error),
}

impl ClientError {
    /// Nothing reached the upstream: always safe to try another server.
    pub fn is_connect(&self) -> bool {
        matches!(self, ClientError::Connect(_) | ClientError::Tls(_))
    }

    /// See [`ClientError::Stale`].
    pub fn is_stale(&self) -> bool {
        matches!(self, ClientError::Stale(_))
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Connect(_) => f.write_str("connect failed"),
            ClientError::Tls(_) => f.write_str("TLS handshake failed"),
            ClientError::Http(_) => f.write_str("upstream exchange failed"),
            ClientError::Stale(_) => f.write_str("pooled upstream connection closed"),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Connect(e) | ClientError::Tls(e) => Some(e),
            ClientError::Http(e) | ClientError::Stale(e) => Some(e),
        }
    }
}

struct Idle {
    sender: SendRequest<Body>,
    since: Instant,
}

thread_local! {
    /// This thread's idle connections (LIFO per key).
    static IDLE: RefCell<crate::FastMap<Key, Vec<Idle>>> = RefCell::new(crate::FastMap::default());
}

fn checkout(key: &Key) -> Option<SendRequest<Body>> {
    IDLE.try_with(|idle| {
        let mut idle = idle.borrow_mut();
        let stack = idle.get_mut(key)?;
        let now = Instant::now();
        while let Some(c) = stack.pop() {
            if c.sender.is_closed() || now.duration_since(c.since) > IDLE_TIMEOUT {
                continue;
            }
            return Some(c.sender);
        }
        None
    })
    .ok()
    .flatten()
}

fn checkin(key: Key, sender: SendRequest<Body>, keepalive: usize) {
    if keepalive == 0 || sender.is_closed() {
        return;
    }
    let _ = IDLE.try_with(|idle| {
        let mut idle = idle.borrow_mut();
        let now = Instant::now();
        let stack = idle.entry(key).or_default();
        // The oldest sit at the bottom: drop the expired and the closed.
        let stale = stack
            .iter()
            .take_while(|c| c.sender.is_closed() || now.duration_since(c.since) > IDLE_TIMEOUT)
            .count();
        if stale > 0 {
            stack.drain(..stale);
        }
        if stack.len() >= keepalive {
            // Full: the oldest goes (closing it), the warm one stays.
            stack.remove(0);
        }
        stack.push(Idle { sender, since: now });
    });
}

/// Send `req` (origin-form URI, `Host` set) over a pooled or new connection.
/// A pooled connection that turns out closed before the request was
/// written is replaced transparently.
pub async fn request(
    t: &Target<'_>,
    mut req: Request<Body>,
) -> Result<Response<PooledBody>, ClientError> {
    loop {
        let pooled = if t.fresh {
            None
        } else {
            match checkout(&t.key) {
                Some(s) => Some(s),
                // None idle: let this worker run what is already ready
                // once (responses in flight return their connections)
                // before paying for a new one. Under a burst this cut the
                // connections opened per request from 0.87 to 0.10
                // (bench/RESULTS.md); with idle ones, it never runs.
                None => {
                    tokio::task::yield_now().await;
                    checkout(&t.key)
                }
            }
        };
        let (mut sender, reused) = match pooled {
            Some(s) => (s, true),
            // Boxed: connecting (TLS included) is the rare path and its
            // state is large; every request's future would carry it.
            None => (Box::pin(connect(t)).await?, false),
        };
        if let Err(e) = sender.ready().await {
            if reused {
                continue;
            }
            return Err(ClientError::Http(e));
        }
        match sender.try_send_request(req).await {
            Ok(resp) => {
                let upgraded = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
                let (parts, body) = resp.into_parts();
                let ret = (!upgraded).then(|| Return {
                    key: t.key.clone(),
                    sender,
                    keepalive: t.keepalive,
                });
                let mut body = PooledBody { inner: body, ret };
                if body.inner.is_end_stream() {
                    body.give_back();
                }
                return Ok(Response::from_parts(parts, body));
            }
            Err(mut e) => match e.take_message() {
                // Not written: the pooled connection was closing. Try the
                // next one (or a fresh connection).
                Some(r) if reused => req = r,
                _ => {
                    let e = e.into_error();
                    return Err(if reused && closed_early(&e) {
                        ClientError::Stale(e)
                    } else {
                        ClientError::Http(e)
                    });
                }
            },
        }
    }
}

/// The connection went away before any response: closed or reset.
fn closed_early(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() || e.is_canceled() || e.is_closed() {
        return true;
    }
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(x) = cur {
        if let Some(io) = x.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        cur = x.source();
    }
    false
}

async fn connect(t: &Target<'_>) -> Result<SendRequest<Body>, ClientError> {
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
    let deadline = tokio::time::Instant::now() + t.connect_timeout;
    let tcp = match &t.key.endpoint {
        Endpoint::Addr(a) => {
            tokio::time::timeout_at(deadline, tokio::net::TcpStream::connect(a)).await
        }
        Endpoint::Name(h, p) => {
            tokio::time::timeout_at(
                deadline,
                tokio::net::TcpStream::connect((h.trim_matches(['[', ']']), *p)),
            )
            .await
        }
    }
    .map_err(|_| ClientError::Connect(timed_out()))?
    .map_err(ClientError::Connect)?;
    let _ = tcp.set_nodelay(true);
    match (&t.key.tls, t.tls_config) {
        (Some((name, _)), Some(config)) => {
            let server_name = ServerName::try_from(name.to_string()).map_err(|e| {
                ClientError::Tls(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("`{name}`: {e}"),
                ))
            })?;
            let tls = tokio_rustls::TlsConnector::from(config.clone());
            let stream = tokio::time::timeout_at(deadline, tls.connect(server_name, tcp))
                .await
                .map_err(|_| ClientError::Tls(timed_out()))?
                .map_err(ClientError::Tls)?;
            handshake(stream).await
        }
        _ => handshake(tcp).await,
    }
}

async fn handshake<S>(io: S) -> Result<SendRequest<Body>, ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(ClientError::Http)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

struct Return {
    key: Key,
    sender: SendRequest<Body>,
    keepalive: usize,
}

/// An upstream response body that puts its connection back in the pool
/// once read to the end.
pub struct PooledBody {
    inner: Incoming,
    ret: Option<Return>,
}

impl PooledBody {
    fn give_back(&mut self) {
        if let Some(r) = self.ret.take() {
            checkin(r.key, r.sender, r.keepalive);
        }
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => this.give_back(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.give_back(),
            Poll::Ready(Some(Err(_))) => this.ret = None,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            self.give_back();
        }
    }
}
