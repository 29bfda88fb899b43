//! Upstream connections: per worker thread, a stack of idle HTTP/1
//! connections for each (address, TLS identity).
//!
//! A request pops the most recently returned connection (the warmest one),
//! skipping those the upstream closed while they sat idle, or opens a new
//! one; the connection goes back on the stack when the response body has
//! been read to its end — a body dropped half-read closes it, since the
//! connection cannot be reused. At most `keepalive` idle connections are
//! kept per stack (the upstream's `keepalive N`); a return also drops the
//! stack's oldest entries once they have been idle for [`IDLE_TIMEOUT`]. A
//! connection the upstream closed stays open on our side (`CLOSE_WAIT`)
//! until it is next popped or ages out.
//!
//! No shared pool behind a mutex, no cross-task checkout machinery, no
//! task per connection: the task serving a request owns its upstream
//! connection while it uses it and speaks HTTP/1 on it itself
//! ([`super::client`]); see DESIGN.md.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Response;
use http_body::{Body as HttpBody, Frame, SizeHint};
use rustls_pki_types::ServerName;

use super::client::{Conn, Io, Passthrough, ProtoError, ResponseBody};
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
    /// How long the response head may take once the request is out, and
    /// then each read of the body (`proxy_read_timeout`):
    /// [`ClientError::Timeout`] (or a body error) after. Kept on the
    /// connection ([`Conn::exchange`]), not a new timer per request.
    pub read_timeout: Option<Duration>,
    /// How long a write of the request may find the upstream not taking
    /// more (`proxy_send_timeout`): [`ClientError::Timeout`] after.
    pub send_timeout: Option<Duration>,
    /// A clock reading taken as the request started (the caller has one):
    /// idle ages are measured against it, no clock read of their own.
    pub now: Instant,
    /// Headers the pipeline adds to the response (request id, `add_header`,
    /// rate-limit and cache headers): room made in its map from the start.
    pub response_room: usize,
    /// Pass the response's header lines through to an HTTP/1 client
    /// ([`crate::proxy::client::RawHeaders`]), dropping what this filters.
    pub raw_response: Option<crate::proxy::client::RawFilter<'a>>,
}

/// Why an upstream request failed.
#[derive(Debug)]
pub enum ClientError {
    /// TCP connect (or name resolution) failed or timed out.
    Connect(std::io::Error),
    /// The TLS handshake failed (certificate, protocol).
    Tls(std::io::Error),
    /// The HTTP exchange failed after the connection was up.
    Http(ProtoError),
    /// [`Target::read_timeout`] or [`Target::send_timeout`] ran out.
    Timeout,
    /// A pooled connection was closed by the upstream as the request went
    /// out, before any response byte — most likely its keep-alive timeout
    /// racing ours. Safe to send again on a new connection when the
    /// request is idempotent and has no body (NGINX does the same for its
    /// cached connections).
    Stale(ProtoError),
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

    /// See [`ClientError::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, ClientError::Timeout)
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Connect(_) => f.write_str("connect failed"),
            ClientError::Tls(_) => f.write_str("TLS handshake failed"),
            ClientError::Http(_) => f.write_str("upstream exchange failed"),
            ClientError::Timeout => f.write_str("upstream timed out"),
            ClientError::Stale(_) => f.write_str("pooled upstream connection closed"),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Connect(e) | ClientError::Tls(e) => Some(e),
            ClientError::Http(e) | ClientError::Stale(e) => Some(e),
            ClientError::Timeout => None,
        }
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// This thread's idle connections: a stack (LIFO) per key. The stack used
/// last is tried first, by comparing keys: most requests go where the one
/// before went, and a comparison is cheaper than hashing the key (which
/// the request and its return would each do).
#[derive(Default)]
struct Stacks {
    slots: Vec<(Key, Vec<Idle>)>,
    index: crate::FastMap<Key, usize>,
    last: usize,
}

impl Stacks {
    fn find(&mut self, key: &Key) -> Option<usize> {
        if let Some((k, _)) = self.slots.get(self.last)
            && k == key
        {
            return Some(self.last);
        }
        let i = *self.index.get(key)?;
        self.last = i;
        Some(i)
    }

    fn stack(&mut self, key: &Key) -> Option<&mut Vec<Idle>> {
        let i = self.find(key)?;
        self.slots.get_mut(i).map(|(_, s)| s)
    }

    fn stack_or_new(&mut self, key: Key) -> &mut Vec<Idle> {
        let i = match self.find(&key) {
            Some(i) => i,
            None => {
                let i = self.slots.len();
                self.index.insert(key.clone(), i);
                self.slots.push((key, Vec::new()));
                self.last = i;
                i
            }
        };
        &mut self.slots[i].1
    }
}

thread_local! {
    static IDLE: RefCell<Stacks> = RefCell::new(Stacks::default());
}

fn checkout(key: &Key, now: Instant) -> Option<Conn> {
    IDLE.try_with(|idle| {
        let mut idle = idle.borrow_mut();
        let stack = idle.stack(key)?;
        while let Some(mut c) = stack.pop() {
            // Closed by the upstream (or sent something unasked) while idle.
            if now.saturating_duration_since(c.since) > IDLE_TIMEOUT || !c.conn.is_reusable() {
                continue;
            }
            return Some(c.conn);
        }
        None
    })
    .ok()
    .flatten()
}

fn checkin(key: Key, mut conn: Conn, keepalive: usize, now: Instant) {
    if keepalive == 0 {
        return;
    }
    conn.settle();
    let _ = IDLE.try_with(|idle| {
        let mut idle = idle.borrow_mut();
        let stack = idle.stack_or_new(key);
        // The oldest sit at the bottom: drop the expired.
        let stale = stack
            .iter()
            .take_while(|c| now.saturating_duration_since(c.since) > IDLE_TIMEOUT)
            .count();
        if stale > 0 {
            stack.drain(..stale);
        }
        if stack.len() >= keepalive {
            // Full: the oldest goes (closing it), the warm one stays.
            stack.remove(0);
        }
        stack.push(Idle { conn, since: now });
    });
}

/// Send the request `parts` and `body` (origin-form URI, `Host` set) over a
/// pooled or new connection, with the client's headers `pass` passes on.
/// The head by reference: the exchange only reads it, and a request moved
/// in would be copied into this future and again out of it. A pooled
/// connection the upstream closed while it sat idle is skipped; one that
/// closes as the request goes out is a [`ClientError::Stale`].
// Not an `async fn`: its arguments would sit in its state twice (the
// argument and its binding); the block captures them once.
#[allow(clippy::manual_async_fn)] // on purpose, see above
pub fn request<'a>(
    t: &'a Target<'_>,
    parts: &'a http::request::Parts,
    body: Body,
    pass: Option<Passthrough<'a>>,
) -> impl std::future::Future<Output = Result<Response<Box<PooledBody>>, ClientError>> + 'a {
    async move {
        let pooled = if t.fresh {
            None
        } else {
            match checkout(&t.key, t.now) {
                Some(c) => Some(c),
                // None idle: let this worker run what is already ready once
                // (responses in flight return their connections) before paying
                // for a new one. Under a burst this cut the connections opened
                // per request from 0.87 to 0.10 (bench/RESULTS.md); with idle
                // ones, it never runs.
                None => {
                    tokio::task::yield_now().await;
                    checkout(&t.key, t.now)
                }
            }
        };
        let (mut conn, reused) = match pooled {
            Some(c) => (c, true),
            // Boxed: connecting (TLS included) is the rare path and its state
            // is large; every request's future would carry it.
            None => (Box::pin(connect(t)).await?, false),
        };
        let mut head = None;
        match conn
            .exchange(
                parts,
                pass,
                body,
                (t.read_timeout, t.send_timeout),
                crate::proxy::client::Answer {
                    room: t.response_room,
                    raw: t.raw_response,
                },
                &mut head,
            )
            .await
        {
            // `exchange` puts a head in the slot whenever it says `Ok`.
            Ok(()) => match head {
                None => Err(ClientError::Http(ProtoError::Incomplete)),
                Some(head) => {
                    // Boxed where it is made: the response then moves through
                    // the proxy's layers (and its retries) at the size of a
                    // pointer, not of the body's ~330 bytes, copied at each.
                    let mut body = Box::write(
                        Box::new_uninit(),
                        PooledBody {
                            raw: head.raw,
                            body: head.body,
                            conn: Some(conn),
                            failed: None,
                            ret: Some(Return {
                                key: t.key.clone(),
                                keepalive: t.keepalive,
                                since: t.now,
                            }),
                        },
                    );
                    if body.body.is_upgrade() {
                        body.ret = None;
                    } else if body.body.is_done() {
                        body.give_back();
                    }
                    Ok(Response::from_parts(head.parts, body))
                }
            },
            Err(ProtoError::Timeout) => Err(ClientError::Timeout),
            Err(e) if reused && e.closed_early() => Err(ClientError::Stale(e)),
            Err(e) => Err(ClientError::Http(e)),
        }
    }
}

async fn connect(t: &Target<'_>) -> Result<Conn, ClientError> {
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
            Ok(Conn::new(Io::Tls(Box::new(stream))))
        }
        _ => Ok(Conn::new(Io::Plain(tcp))),
    }
}

struct Return {
    key: Key,
    keepalive: usize,
    /// When the request started: the connection's idle time is counted
    /// from it (a little early, never late).
    since: Instant,
}

/// An upstream response body, read from its connection as it is polled;
/// the connection goes back in the pool once the body is read to its end.
pub struct PooledBody {
    body: ResponseBody,
    conn: Option<Conn>,
    ret: Option<Return>,
    /// A read error, reported on the next poll: the bytes before it get
    /// passed on first (hyper's server drops what it has not flushed when
    /// a body fails, and a reset right behind the last bytes would
    /// otherwise cost the client all of them).
    failed: Option<ProtoError>,
    /// The response's header lines, when they are passed through
    /// ([`crate::proxy::client::RawHeaders`]): taken by the proxy before
    /// the body goes on.
    pub raw: Option<crate::proxy::client::RawHeaders>,
}

impl PooledBody {
    fn give_back(&mut self) {
        if let (Some(r), Some(conn)) = (self.ret.take(), self.conn.take())
            && self.body.reusable()
        {
            checkin(r.key, conn, r.keepalive, r.since);
        }
    }

    /// After a 101: the upstream connection, for the tunnel.
    pub fn into_upgraded(mut self) -> Option<Conn> {
        if self.body.is_upgrade() {
            self.conn.take()
        } else {
            None
        }
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    // The proxy's body error: the body becomes a response's as it is.
    type Error = crate::proxy::forward::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Some(e) = this.failed.take() {
            return Poll::Ready(Some(Err(Box::new(e))));
        }
        let Some(conn) = this.conn.as_mut() else {
            return Poll::Ready(None);
        };
        if this.body.is_upgrade() {
            return Poll::Ready(None);
        }
        match this.body.poll_data(conn, cx) {
            Poll::Ready(None) => {
                this.give_back();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(d))) => {
                if this.body.is_done() {
                    this.give_back();
                }
                Poll::Ready(Some(Ok(Frame::data(d))))
            }
            Poll::Ready(Some(Err(e))) => {
                this.ret = None;
                this.conn = None;
                this.failed = Some(e);
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed.is_none()
            && (self.conn.is_none() || self.body.is_done() || self.body.is_upgrade())
    }

    fn size_hint(&self) -> SizeHint {
        if self.conn.is_none() {
            return SizeHint::with_exact(0);
        }
        self.body.size_hint()
    }
}
