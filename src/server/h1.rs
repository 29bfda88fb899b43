//! tollgate's own HTTP/1 server connection: read a request head, hand the
//! request to the pipeline, write its response, and again.
//!
//! Place in the pipeline: above the connection [`guard`](super::guard),
//! which hands over only whole, well-formed heads with unambiguous framing
//! and keeps the client's timeouts, and below the request handler. Every
//! plain or TLS connection that is not HTTP/2 by ALPN starts here; one
//! that starts with the HTTP/2 preface (h2c with prior knowledge) is
//! handed back, with what was read, to hyper's HTTP/2.
//!
//! Why not hyper's: its server connection keeps two 8 KiB buffers for the
//! life of every connection and hands each request and response through a
//! dispatcher. Here an idle keep-alive connection holds no buffer (the read
//! buffer is let go whenever a read finds nothing), a head's target and
//! header values share its bytes where they were read (no copy), and a
//! response head goes out in one write with as much of its body as is
//! ready.
//!
//! What it does (RFC 9112):
//! - Request bodies by `Transfer-Encoding: chunked` or `Content-Length`
//!   (the guard refuses both at once and anything else), read as the
//!   handler polls them; `Expect: 100-continue` is answered when the body
//!   is first read, never when the response comes first.
//! - Responses keep a `Content-Length` they carry (a body that ends short
//!   or runs long closes the connection); otherwise an empty body gets
//!   `Content-Length: 0`, a body of known size its length, any other body
//!   `Transfer-Encoding: chunked` (HTTP/1.1) or the end of the connection
//!   (HTTP/1.0). Responses to `HEAD` and 1xx, 204 and 304 responses carry
//!   no body. A `Date` is added when the response has none.
//! - Keep-alive as HTTP/1.1 (unless `Connection: close`) and HTTP/1.0 (only
//!   with `Connection: keep-alive`, which the response then repeats); a
//!   response that ends the connection says `Connection: close`.
//! - Pipelined requests are answered in order (the next head may already
//!   be buffered).
//! - A body the handler did not read is skipped when what is left of it
//!   is already here (up to 1 MiB); otherwise, or when the client still
//!   waits for `100 Continue`, the connection is closed after the
//!   response.
//! - A request with `Upgrade` (HTTP/1.1) answered `101` hands the
//!   connection, with any bytes read past the head, to [`OnUpgrade`].
//! - On the drain, an idle connection closes at once; one with a request in
//!   flight answers it with `Connection: close` and closes.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::header;
use http::{Method, Request, StatusCode, Uri, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, watch};

use crate::proxy::body::RequestBody;
use crate::proxy::client::{Chunk, Decoder, Framing, Progress};
use crate::proxy::forward::BoxError;

/// A client connection's byte stream: a guarded TCP or TLS stream.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// The most header fields in a request head (the guard's limit too).
const MAX_HEADERS: usize = 100;
/// A head longer than this is refused (the guard's limit is lower).
const MAX_HEAD: usize = 256 * 1024;
/// What a read for a head asks for at least: most heads fit, and a buffer
/// this small comes from the allocator's per-thread cache (a head that
/// does not fit grows it).
const HEAD_CHUNK: usize = 1024;
/// Room left in the read buffer that a head is read into without a
/// reserve first (see `Inner::poll_head`).
const HEAD_ROOM: usize = 512;
/// What a body read asks for at least.
const READ_CHUNK: usize = 4 * 1024;
/// What a body read asks for at most.
const MAX_READ: usize = 64 * 1024;
/// Body pieces up to this size are copied behind the head or chunk line
/// (one write); larger ones are written from their own buffer.
const COALESCE_BELOW: usize = 8 * 1024;
/// The most of an unread request body skipped to keep the connection.
const DRAIN_LIMIT: usize = 1024 * 1024;
/// A write buffer larger than this is not kept between responses.
const KEEP_WRITE_BUFFER: usize = 16 * 1024;
/// What the write buffer starts with: a usual response head and a small
/// body (what it grew to from empty, in five reallocations).
const FIRST_WRITE_BUFFER: usize = 256;

/// Read buffers that idle connections let go, kept per thread for the
/// next head that arrives on any of them: its read then needs no fresh
/// allocation, and the head split off it shares a buffer that already
/// counts references (a fresh one allocates its count on the first split).
/// A few per thread, none per connection.
mod spare_buf {
    use std::cell::RefCell;

    use bytes::BytesMut;

    use crate::proxy::headers::spare::{pop, push};

    /// A buffer with more room than this is not kept (grown by a body).
    const KEEP: usize = 4 * super::HEAD_CHUNK;
    /// How many a thread keeps.
    const BUFS: usize = 16;

    thread_local! {
        static SPARE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    }

    /// A kept buffer (empty; its room reclaimed when nothing else shares
    /// it), else a new empty one.
    pub fn take() -> BytesMut {
        let mut b = pop(&SPARE).unwrap_or_default();
        if b.capacity() < super::HEAD_ROOM && b.capacity() > 0 {
            // Unique again (the heads read into it are gone): back to its
            // start, no allocation. Still shared: a new buffer.
            b.reserve(super::HEAD_CHUNK);
            if b.capacity() > KEEP {
                // Back whole, and large: let go.
                return BytesMut::new();
            }
        }
        b
    }

    /// Keep `b` (empty) for a later [`take`].
    pub fn give(b: BytesMut) {
        // Its room is what shows here: one grown by a body and then
        // nearly filled is kept all the same (and let go when taken), so a
        // thread holds at most 16 buffers of the largest body read size.
        if b.capacity() == 0 || b.capacity() > KEEP || !b.is_empty() {
            return;
        }
        push(&SPARE, b, BUFS);
    }
}

/// The connection as its request loop and the request body in flight share
/// it (the body is read while the handler runs; the loop writes the
/// response and reads the next head).
struct Inner {
    /// `None` once the connection was handed to an upgrade.
    io: Option<Box<dyn Stream>>,
    dec: Decoder,
    /// What is left of the request body in flight (`Done`: nothing).
    body: Framing,
    /// `100 Continue` is owed before the body is read: how much of it is
    /// written.
    expect: Option<usize>,
    /// Reading the body failed: the connection is not used again.
    broken: bool,
    /// No request yet: the HTTP/2 preface may still start the connection.
    first: bool,
    /// The connection started with the HTTP/2 preface (h2c with prior
    /// knowledge): it goes to hyper's HTTP/2 with what was read.
    h2c: bool,
}

impl Drop for Inner {
    /// A connection that ends keeps no buffer either: the next one to
    /// arrive reads its first head into it (no allocation, and a buffer
    /// that already counts its references).
    fn drop(&mut self) {
        spare_buf::give(std::mem::take(&mut self.dec.buf));
    }
}

/// The HTTP/2 connection preface (the guard lets it through whole).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

type Shared = Arc<Mutex<Inner>>;

fn lock(s: &Shared) -> MutexGuard<'_, Inner> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the connection was upgraded")
}

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

impl Inner {
    /// Read more into the buffer (at least `want` bytes of room); `Ok(0)`
    /// at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        let Some(io) = self.io.as_mut() else {
            return Poll::Ready(Err(closed()));
        };
        self.dec.buf.reserve(want);
        let fut = io.read_buf(&mut self.dec.buf);
        std::pin::pin!(fut).poll(cx)
    }

    /// The next request head: its request put in `out`, what it says about
    /// the connection returned; `None` when the client closed between
    /// requests. Written into the caller's slot, not returned: the request
    /// is a few hundred bytes, and each wrapper it would be returned in
    /// (`Option`, `Result`, `Poll`) is another copy of it.
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Option<Request<RequestBody>>,
    ) -> Poll<io::Result<Option<Said>>> {
        loop {
            if !self.dec.buf.is_empty() {
                if self.first && self.dec.buf.starts_with(H2_PREFACE) {
                    self.h2c = true;
                    return Poll::Ready(Ok(None));
                }
                if let Some(said) = parse_head_into(&mut self.dec.buf, out)? {
                    self.first = false;
                    return Poll::Ready(Ok(Some(said)));
                }
                if self.dec.buf.len() > MAX_HEAD {
                    return Poll::Ready(Err(invalid("request head too large")));
                }
            }
            let received = !self.dec.buf.is_empty();
            if self.dec.buf.capacity() == 0 {
                self.dec.buf = spare_buf::take();
            }
            // The room behind the last head takes the next one when it is
            // this much (most heads fit; a longer one reserves on the next
            // turn): reserving a whole chunk would allocate anew while that
            // head still shares the buffer, and on a keep-alive connection
            // the read usually finds nothing yet and the buffer is let go.
            let room = self.dec.buf.capacity() - self.dec.buf.len();
            let want = if room >= HEAD_ROOM { 0 } else { HEAD_CHUNK };
            match self.poll_fill(cx, want) {
                Poll::Ready(Ok(0)) if received => {
                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                }
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(None)),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Waiting: an idle connection holds no read buffer
                    // (the thread keeps it for the next head that comes).
                    if self.dec.buf.is_empty() {
                        spare_buf::give(std::mem::take(&mut self.dec.buf));
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Write what is owed of `100 Continue`.
    fn poll_continue(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(done) = self.expect {
            let Some(io) = self.io.as_mut() else {
                return Poll::Ready(Err(closed()));
            };
            if done == CONTINUE.len() {
                ready!(Pin::new(io).poll_flush(cx))?;
                self.expect = None;
                break;
            }
            let n = ready!(Pin::new(io).poll_write(cx, &CONTINUE[done..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.expect = Some(done + n);
        }
        Poll::Ready(Ok(()))
    }

    /// The next piece of the request body; `None` at its end.
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        if let Err(e) = ready!(self.poll_continue(cx)) {
            self.broken = true;
            return Poll::Ready(Some(Err(e)));
        }
        loop {
            let mut framing = self.body;
            let step = self.dec.body_step(&mut framing);
            self.body = framing;
            match step {
                Ok(Progress::Data(d)) => return Poll::Ready(Some(Ok(d))),
                Ok(Progress::End) => return Poll::Ready(None),
                Ok(Progress::More) => {}
                Err(e) => {
                    self.broken = true;
                    return Poll::Ready(Some(Err(invalid(e))));
                }
            }
            let want = match self.body {
                Framing::Length(n) => (n.min(MAX_READ as u64) as usize).max(READ_CHUNK),
                _ => READ_CHUNK,
            };
            match ready!(self.poll_fill(cx, want)) {
                Ok(0) => {
                    self.broken = true;
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the client closed the connection before the request body ended",
                    ))));
                }
                Ok(_) => {}
                Err(e) => {
                    self.broken = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn body_done(&self) -> bool {
        matches!(self.body, Framing::Done | Framing::Length(0))
    }
}

fn invalid(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// A parsed request head and what it says about its connection (the
/// tests' view: the connection parses the request into its slot and keeps
/// the rest as [`Said`]).
#[cfg(test)]
struct Head {
    req: Request<RequestBody>,
    framing: Framing,
    keep_alive: bool,
    upgrade: bool,
    expect_continue: bool,
}

/// What a request head says about its connection.
#[derive(Clone, Copy)]
struct Said {
    framing: Framing,
    keep_alive: bool,
    upgrade: bool,
    expect_continue: bool,
}

/// A complete head at the front of `buf`, taken off it; `None` when more
/// bytes are needed.
#[cfg(test)]
fn parse_head(buf: &mut BytesMut) -> io::Result<Option<Head>> {
    let mut req = None;
    let said = parse_head_into(buf, &mut req)?;
    Ok(said.zip(req).map(|(said, req)| Head {
        req,
        framing: said.framing,
        keep_alive: said.keep_alive,
        upgrade: said.upgrade,
        expect_continue: said.expect_continue,
    }))
}

/// A complete head at the front of `buf`, taken off it: its request put in
/// `out` (built there: not built and then copied, a few hundred bytes), and
/// what it says about the connection returned; `None` when more bytes are
/// needed.
fn parse_head_into(
    buf: &mut BytesMut,
    out: &mut Option<Request<RequestBody>>,
) -> io::Result<Option<Said>> {
    // The target and every header value share the head's bytes, taken off
    // the read buffer without a copy (the connection lets the buffer go
    // when it next waits, to the thread's spares: see `spare_buf`).
    let all = buf.split().freeze();
    // Uninitialised slots: filling 100 empty headers first cost more than
    // parsing a usual head.
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut r = httparse::Request::new(&mut []);
    let parsed = r.parse_with_uninit_headers(&all, &mut headers);
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) | Err(_) => {
            *buf = all
                .try_into_mut()
                .unwrap_or_else(|b| BytesMut::from(&b[..]));
            return match parsed {
                Err(e) => Err(invalid(e)),
                _ => Ok(None),
            };
        }
    };
    if len < all.len() {
        // What follows the head (body bytes, a pipelined request) stays
        // in the read buffer.
        buf.extend_from_slice(&all[len..]);
    }
    let base = all.as_ptr() as usize;
    let slice = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        all.slice(start..start + s.len())
    };
    let method = Method::from_bytes(r.method.unwrap_or_default().as_bytes()).map_err(invalid)?;
    let uri =
        Uri::from_maybe_shared(slice(r.path.unwrap_or_default().as_bytes())).map_err(invalid)?;
    let version = match r.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut map = crate::proxy::headers::spare::take(r.headers.len());
    let mut framing = Framing::Done;
    let (mut close, mut keep_alive_token, mut upgrade, mut expect) = (false, false, false, false);
    for (i, h) in r.headers.iter().enumerate() {
        let name = crate::proxy::headers::names::at(
            crate::proxy::headers::names::Side::Request,
            i,
            h.name.as_bytes(),
        )
        .map_err(invalid)?;
        let value = crate::proxy::headers::parsed_value(slice(h.value));
        if name == header::TRANSFER_ENCODING {
            framing = Framing::Chunked(Chunk::Size);
        } else if name == header::CONTENT_LENGTH {
            if framing == Framing::Done {
                let n = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or_else(|| invalid("content-length"))?;
                framing = Framing::Length(n);
            }
        } else if name == header::CONNECTION {
            for t in h.value.split(|&b| b == b',') {
                let t = t.trim_ascii();
                close |= t.eq_ignore_ascii_case(b"close");
                keep_alive_token |= t.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name == header::UPGRADE {
            upgrade = true;
        } else if name == header::EXPECT {
            expect = h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        }
        map.append(name, value);
    }
    if framing == Framing::Length(0) {
        framing = Framing::Done;
    }
    let http11 = version == Version::HTTP_11;
    let req = out.insert(Request::new(RequestBody::Empty));
    *req.method_mut() = method;
    crate::proxy::over_default(req.uri_mut(), uri);
    *req.version_mut() = version;
    crate::proxy::over_default(req.headers_mut(), map);
    Ok(Some(Said {
        framing,
        keep_alive: if http11 { !close } else { keep_alive_token },
        upgrade: upgrade && http11,
        expect_continue: expect && http11 && framing != Framing::Done,
    }))
}

/// A request body read from its connection as the handler polls it.
pub struct H1Body {
    conn: Shared,
}

impl HttpBody for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        lock(&self.conn)
            .poll_body(cx)
            .map(|r| r.map(|r| r.map(Frame::data).map_err(|e| Box::new(e) as BoxError)))
    }

    fn is_end_stream(&self) -> bool {
        lock(&self.conn).body_done()
    }

    fn size_hint(&self) -> SizeHint {
        match lock(&self.conn).body {
            Framing::Done => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

/// The connection of a request that may upgrade, once its `101` response
/// is written (an error when the response was anything else).
/// (Cloneable, as request extensions must be; the first to wait takes it.)
#[derive(Clone)]
pub struct OnUpgrade {
    rx: Arc<Mutex<Option<oneshot::Receiver<Upgraded>>>>,
}

impl OnUpgrade {
    pub async fn upgraded(self) -> io::Result<Upgraded> {
        let rx = self.rx.lock().unwrap_or_else(|e| e.into_inner()).take();
        match rx {
            Some(rx) => rx
                .await
                .map_err(|_| io::Error::other("the request was not upgraded")),
            None => Err(io::Error::other("the upgrade was already taken")),
        }
    }
}

/// An upgraded connection: the stream and what was read past the head.
pub struct Upgraded {
    pub io: Box<dyn Stream>,
    pub read: Bytes,
}

/// Resolves once the drain has started (never if the drain is gone).
async fn stopping(stop: &mut watch::Receiver<bool>) {
    super::stopping(stop).await
}

/// What answers the requests of a connection. A request's future borrows
/// the handler (the gateway's state, the connection's guard) for its
/// time: no reference counts taken and dropped per request, and no
/// closure's future around the pipeline's.
pub trait Handler {
    /// Answer the request in `req` (the handler takes it out of the slot:
    /// moved in by value it would be copied into each future on the way).
    fn call<'s>(
        &'s mut self,
        req: &'s mut Option<Request<RequestBody>>,
    ) -> impl Future<Output = crate::proxy::forward::Answered> + 's;
}

/// Serve HTTP/1 on `io` until the client closes, a response ends the
/// connection, or the drain closes it between requests. `close_notify`:
/// shut the stream down before closing it (TLS: its close_notify alert).
/// A connection that starts with the HTTP/2 preface is handed back
/// (with the bytes read) for hyper's HTTP/2.
#[allow(clippy::manual_async_fn)] // on purpose, see the first comment inside
pub fn serve<H: Handler>(
    io: Box<dyn Stream>,
    mut handler: H,
    mut stop: watch::Receiver<bool>,
    close_notify: bool,
) -> impl Future<Output = Option<Upgraded>> {
    // Not an `async fn`: its arguments would sit in its state twice (the
    // argument and its binding); the block captures them once.
    async move {
        let conn: Shared = Arc::new(Mutex::new(Inner {
            io: Some(io),
            dec: Decoder::default(),
            body: Framing::Done,
            expect: None,
            broken: false,
            first: true,
            h2c: false,
        }));
        let mut wbuf: Vec<u8> = Vec::new();
        // The drain signal is looked at for real only when its watch moved or
        // the task's waker changed (as `drive` does): registering a waker
        // takes a lock, and the connection waits for a head on every request.
        let peek = stop.clone();
        // Per request, the drain is read only when its watch moved since
        // (an atomic load; reading the value takes the watch's lock).
        let stopped_before = *peek.borrow();
        let mut signal = std::pin::pin!(stopping(&mut stop));
        let mut registered: Option<std::task::Waker> = None;
        // The next request is parsed into this slot and the handler takes
        // it from there (see `Inner::poll_head`).
        let mut next: Option<Request<RequestBody>> = None;
        loop {
            let read = std::future::poll_fn(|cx| {
                let polled = lock(&conn).poll_head(cx, &mut next);
                if let Poll::Ready(r) = polled {
                    return Poll::Ready(Some(r));
                }
                if let Some(w) = &registered
                    && w.will_wake(cx.waker())
                    && !peek.has_changed().unwrap_or(true)
                {
                    return Poll::Pending;
                }
                match signal.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(None),
                    Poll::Pending => {
                        registered = Some(cx.waker().clone());
                        Poll::Pending
                    }
                }
            })
            .await;
            // Built in a plain function: the head, and what building the
            // request borrows, are not kept in this future's state while the
            // handler runs.
            let Some(Started {
                upgrade_tx,
                version,
                head_request,
                keep_alive,
            }) = start(read, &mut next, &conn)
            else {
                break;
            };
            let answered = handler.call(&mut next).await;
            let mut keep = keep_alive
                && !stopped_before
                && !(peek.has_changed().unwrap_or(true) && *peek.borrow());
            if let Some(tx) = upgrade_tx
                && answered.resp.status() == StatusCode::SWITCHING_PROTOCOLS
            {
                wbuf.clear();
                let (parts, _) = answered.resp.into_parts();
                let seen = status_and_headers(&mut wbuf, &parts, answered.raw.as_ref());
                end_head(&mut wbuf, &seen, parts.status, version, false, None, false);
                if let Err(e) = write_all(&conn, &[&wbuf]).await {
                    tracing::debug!(error = %e, "writing a 101 response failed");
                    break;
                }
                let mut i = lock(&conn);
                if let Some(io) = i.io.take() {
                    let read = i.dec.buf.split().freeze();
                    let _ = tx.send(Upgraded { io, read });
                }
                return None;
            }
            // Whether the connection outlives this response is known before
            // its head is written (it says so): a body the handler left
            // unread is skipped now if the rest of it is here.
            let (broken, unread, owed) = {
                let i = lock(&conn);
                (i.broken, !i.body_done(), i.expect.is_some())
            };
            if broken || unread && (owed || Arc::strong_count(&conn) > 1 || !skip_body(&conn).await)
            {
                keep = false;
            }
            if let Err(e) =
                write_response(&conn, &mut wbuf, answered, version, head_request, &mut keep).await
            {
                tracing::debug!(error = %e, "writing a response failed");
                break;
            }
            // Only a body still unread when the handler answered can have
            // failed since (skipping it); a done one reads no more.
            if !keep || (unread && lock(&conn).broken) {
                break;
            }
            if wbuf.capacity() > KEEP_WRITE_BUFFER {
                wbuf = Vec::new();
            }
        }
        let h2c = {
            let mut i = lock(&conn);
            match (i.h2c, i.io.take()) {
                (true, Some(io)) => Some(Upgraded {
                    io,
                    read: i.dec.buf.split().freeze(),
                }),
                (_, io) => {
                    i.io = io;
                    None
                }
            }
        };
        if h2c.is_some() {
            return h2c;
        }
        // TLS says goodbye (close_notify) before the socket closes; for plain
        // TCP the close itself sends the FIN (a shutdown first would be one
        // more system call for the same packet).
        let io = lock(&conn).io.take();
        if let Some(mut io) = io
            && close_notify
        {
            let _ = io.shutdown().await;
        }
        None
    }
}

/// A request ready for the handler, and what the loop needs of its head
/// afterwards.
struct Started {
    upgrade_tx: Option<oneshot::Sender<Upgraded>>,
    version: Version,
    head_request: bool,
    keep_alive: bool,
}

/// Make the request of the head read (in `next`) ready for the handler,
/// its body read from `conn` as the handler polls it; `None` when the
/// connection ends instead (closed, drained, or a head that could not be
/// read).
fn start(
    read: Option<io::Result<Option<Said>>>,
    next: &mut Option<Request<RequestBody>>,
    conn: &Shared,
) -> Option<Started> {
    let head = match read {
        None | Some(Ok(None)) => return None,
        Some(Ok(Some(said))) => said,
        Some(Err(e)) => {
            tracing::debug!(error = %e, "connection ended while reading a request head");
            return None;
        }
    };
    let req = next.as_mut()?;
    let version = req.version();
    let head_request = req.method() == Method::HEAD;
    if head.framing != Framing::Done {
        let mut i = lock(conn);
        i.body = head.framing;
        i.expect = head.expect_continue.then_some(0);
        drop(i);
        crate::proxy::over_default(
            req.body_mut(),
            RequestBody::H1(H1Body { conn: conn.clone() }),
        );
    }
    let upgrade_tx = if head.upgrade {
        let (tx, rx) = oneshot::channel();
        req.extensions_mut().insert(OnUpgrade {
            rx: Arc::new(Mutex::new(Some(rx))),
        });
        Some(tx)
    } else {
        None
    };
    Some(Started {
        upgrade_tx,
        version,
        head_request,
        keep_alive: head.keep_alive,
    })
}

/// A stream with bytes already read off it put back in front of it.
pub struct Rewind {
    read: Bytes,
    io: Box<dyn Stream>,
}

impl Rewind {
    pub fn new(up: Upgraded) -> Rewind {
        Rewind {
            read: up.read,
            io: up.io,
        }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.read.is_empty() {
            let n = this.read.len().min(buf.remaining());
            buf.put_slice(&this.read.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Skip what is left of an unread request body if it is here already (up
/// to [`DRAIN_LIMIT`]); false when the connection cannot be kept.
async fn skip_body(conn: &Shared) -> bool {
    let mut skipped = 0usize;
    std::future::poll_fn(|cx| {
        let mut i = lock(conn);
        loop {
            if i.body_done() {
                return Poll::Ready(true);
            }
            match i.poll_body(cx) {
                Poll::Ready(Some(Ok(d))) => {
                    skipped += d.len();
                    if skipped > DRAIN_LIMIT {
                        return Poll::Ready(false);
                    }
                }
                Poll::Ready(None) => return Poll::Ready(true),
                Poll::Ready(Some(Err(_))) | Poll::Pending => return Poll::Ready(false),
            }
        }
    })
    .await
}

/// How the response body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    /// No body (HEAD, 1xx, 204, 304).
    None,
    /// Exactly this many bytes.
    Length(u64),
    Chunked,
    /// Until the connection closes (HTTP/1.0, unknown length).
    Close,
}

/// Write the response (and an upstream's header lines passed through
/// with it); `keep` is cleared when the connection cannot carry another
/// request after it.
async fn write_response(
    conn: &Shared,
    wbuf: &mut Vec<u8>,
    answered: crate::proxy::forward::Answered,
    version: Version,
    head_request: bool,
    keep: &mut bool,
) -> io::Result<()> {
    let raw = answered.raw;
    let (parts, mut body) = answered.resp.into_parts();
    let status = parts.status;
    wbuf.clear();
    // A first response on the connection: room for a usual head at once
    // (growing from empty reallocated five times, on every new connection).
    wbuf.reserve(FIRST_WRITE_BUFFER);
    // One pass over the response's headers writes them and notes what
    // framing and connection handling need; the gateway's own framing,
    // `Date` and `Connection` headers follow them.
    let seen = status_and_headers(wbuf, &parts, raw.as_ref());
    if seen.close {
        *keep = false;
    }
    let bodiless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    // The framing, and the length header when the response has none.
    let (out, length_header) = if bodiless {
        (Out::None, None)
    } else if let Some(n) = seen.length {
        (
            if head_request {
                Out::None
            } else {
                Out::Length(n)
            },
            None,
        )
    } else if seen.transfer_encoding {
        (
            if head_request {
                Out::None
            } else {
                Out::Chunked
            },
            None,
        )
    } else if body.is_end_stream() {
        (
            if head_request {
                Out::None
            } else {
                Out::Length(0)
            },
            Some(0),
        )
    } else if let Some(n) = body.size_hint().exact() {
        (
            if head_request {
                Out::None
            } else {
                Out::Length(n)
            },
            Some(n),
        )
    } else if head_request {
        (Out::None, None)
    } else if version == Version::HTTP_11 {
        (Out::Chunked, None)
    } else {
        *keep = false;
        (Out::Close, None)
    };
    let chunked_header = out == Out::Chunked && !seen.transfer_encoding;
    end_head(
        wbuf,
        &seen,
        status,
        version,
        *keep,
        length_header,
        chunked_header,
    );
    crate::proxy::headers::spare::give(parts.headers);
    if out == Out::None {
        drop(body);
        return write_all(conn, &[wbuf]).await;
    }
    // The body: what is ready goes behind the head in one write; a write
    // happens when the body has nothing more ready.
    let mut left = match out {
        Out::Length(n) => n,
        _ => u64::MAX,
    };
    loop {
        let next = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await;
        let frame = match next {
            Poll::Ready(f) => f,
            Poll::Pending => {
                if !wbuf.is_empty() {
                    write_all(conn, &[wbuf]).await?;
                    wbuf.clear();
                }
                std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
            }
        };
        match frame {
            None => {
                end_body(wbuf, out, left, keep);
                return write_all(conn, &[wbuf]).await;
            }
            Some(Err(e)) => {
                // Nothing can say so now but an incomplete message.
                if !wbuf.is_empty() {
                    let _ = write_all(conn, &[wbuf]).await;
                }
                return Err(io::Error::other(e));
            }
            Some(Ok(frame)) => {
                let Ok(mut data) = frame.into_data() else {
                    continue; // trailers are not passed on
                };
                if data.is_empty() {
                    continue;
                }
                if out != Out::Chunked && (data.len() as u64) > left {
                    // More than announced: cut, and the connection ends.
                    data.truncate(left as usize);
                    *keep = false;
                }
                let len = data.len();
                if out == Out::Chunked {
                    chunk_line(wbuf, len);
                }
                if len < COALESCE_BELOW {
                    wbuf.extend_from_slice(&data);
                    if out == Out::Chunked {
                        wbuf.extend_from_slice(b"\r\n");
                    }
                } else {
                    let tail: &[u8] = if out == Out::Chunked { b"\r\n" } else { b"" };
                    write_all(conn, &[wbuf, &data, tail]).await?;
                    wbuf.clear();
                }
                if out != Out::Chunked {
                    left -= len as u64;
                }
                if body.is_end_stream() {
                    // The last frame (the body says so): ended without
                    // asking it once more only to hear that.
                    end_body(wbuf, out, left, keep);
                    return write_all(conn, &[wbuf]).await;
                }
            }
        }
    }
}

/// What follows a response body's last frame: the last chunk, or, for a
/// body that ended short of its length, the connection's end (the client
/// can only tell by the connection closing).
fn end_body(wbuf: &mut Vec<u8>, out: Out, left: u64, keep: &mut bool) {
    match out {
        Out::Chunked => wbuf.extend_from_slice(b"0\r\n\r\n"),
        Out::Length(_) if left > 0 => *keep = false,
        _ => {}
    }
}

fn has_token(v: &[u8], token: &[u8]) -> bool {
    v.split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

fn chunk_line(wbuf: &mut Vec<u8>, len: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = len;
    loop {
        i -= 1;
        digits[i] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    wbuf.extend_from_slice(&digits[i..]);
    wbuf.extend_from_slice(b"\r\n");
}

/// What the response's own headers say, noted while they are written.
#[derive(Default)]
struct Seen {
    /// A valid `Content-Length`.
    length: Option<u64>,
    transfer_encoding: bool,
    date: bool,
    /// `Connection: close` / `keep-alive`.
    close: bool,
    keep_alive: bool,
}

/// The status line and the response's own headers: an upstream's lines
/// passed through, then the map's.
fn status_and_headers(
    wbuf: &mut Vec<u8>,
    parts: &http::response::Parts,
    raw: Option<&crate::proxy::client::RawHeaders>,
) -> Seen {
    let status = parts.status;
    if status == StatusCode::OK {
        wbuf.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        wbuf.extend_from_slice(b"HTTP/1.1 ");
        wbuf.extend_from_slice(status.as_str().as_bytes());
        wbuf.push(b' ');
        wbuf.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        wbuf.extend_from_slice(b"\r\n");
    }
    let mut seen = Seen::default();
    if let Some(raw) = raw {
        // Filtered when they were read: no hop-by-hop header among them.
        wbuf.extend_from_slice(&raw.lines);
        seen.length = raw.length;
        seen.date = raw.date;
    }
    for (name, value) in &parts.headers {
        let v = value.as_bytes();
        if *name == header::CONTENT_LENGTH {
            seen.length = std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.trim().parse().ok());
        } else if *name == header::TRANSFER_ENCODING {
            seen.transfer_encoding = true;
        } else if *name == header::DATE {
            seen.date = true;
        } else if *name == header::CONNECTION {
            seen.close |= has_token(v, b"close");
            seen.keep_alive |= has_token(v, b"keep-alive");
        }
        wbuf.extend_from_slice(name.as_str().as_bytes());
        wbuf.extend_from_slice(b": ");
        wbuf.extend_from_slice(v);
        wbuf.extend_from_slice(b"\r\n");
    }
    seen
}

/// The gateway's headers after the response's own, and the blank line.
fn end_head(
    wbuf: &mut Vec<u8>,
    seen: &Seen,
    status: StatusCode,
    version: Version,
    keep: bool,
    length: Option<u64>,
    chunked: bool,
) {
    if let Some(n) = length {
        wbuf.extend_from_slice(b"content-length: ");
        wbuf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        wbuf.extend_from_slice(b"\r\n");
    }
    if chunked {
        wbuf.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !seen.date {
        wbuf.extend_from_slice(b"date: ");
        date::extend(wbuf);
        wbuf.extend_from_slice(b"\r\n");
    }
    if !keep && status != StatusCode::SWITCHING_PROTOCOLS && !seen.close {
        wbuf.extend_from_slice(b"connection: close\r\n");
    } else if keep && version == Version::HTTP_10 && !seen.keep_alive {
        wbuf.extend_from_slice(b"connection: keep-alive\r\n");
    }
    wbuf.extend_from_slice(b"\r\n");
}

/// Write all of `bufs` in order, then flush.
async fn write_all(conn: &Shared, bufs: &[&[u8]]) -> io::Result<()> {
    let (mut idx, mut off) = (0usize, 0usize);
    std::future::poll_fn(|cx| {
        let mut i = lock(conn);
        let Some(io) = i.io.as_mut() else {
            return Poll::Ready(Err(closed()));
        };
        loop {
            while idx < bufs.len() && off >= bufs[idx].len() {
                idx += 1;
                off = 0;
            }
            if idx == bufs.len() {
                return Pin::new(io).poll_flush(cx);
            }
            let mut slices = [IoSlice::new(&[]); 3];
            let mut k = 0;
            for (j, b) in bufs[idx..].iter().enumerate().take(slices.len()) {
                slices[k] = IoSlice::new(if j == 0 { &b[off..] } else { b });
                k += 1;
            }
            let mut n = ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..k]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            while n > 0 && idx < bufs.len() {
                let rest = bufs[idx].len() - off;
                if n >= rest {
                    n -= rest;
                    idx += 1;
                    off = 0;
                } else {
                    off += n;
                    n = 0;
                }
            }
        }
    })
    .await
}

/// The `Date` header's value, formatted once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, [u8; 29])> = const { RefCell::new((0, [0; 29])) };
    }

    pub fn extend(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let secs = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        CACHED.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != secs {
                let s = httpdate::fmt_http_date(now);
                if s.len() == 29 {
                    c.1.copy_from_slice(s.as_bytes());
                    c.0 = secs;
                } else {
                    out.extend_from_slice(s.as_bytes());
                    return;
                }
            }
            out.extend_from_slice(&c.1);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_read_buffers_are_kept_per_thread_and_reclaimed() {
        let head = |fill: usize| {
            let mut b = BytesMut::with_capacity(HEAD_CHUNK);
            b.extend_from_slice(&vec![b'a'; fill]);
            let start = b.as_ptr();
            let head = b.split().freeze();
            (b, head, start)
        };
        // Its heads gone, a buffer with little room left comes back whole,
        // in place.
        let (b, h, start) = head(HEAD_CHUNK - 100);
        drop(h);
        spare_buf::give(b);
        let again = spare_buf::take();
        assert_eq!(again.as_ptr(), start);
        assert!(again.capacity() >= HEAD_CHUNK, "{}", again.capacity());
        // Still shared with a head: a new buffer, the head untouched.
        let (b, h, start) = head(HEAD_CHUNK - 100);
        spare_buf::give(b);
        let mut fresh = spare_buf::take();
        assert_ne!(fresh.as_ptr(), start);
        assert!(fresh.capacity() >= HEAD_CHUNK);
        fresh.extend_from_slice(b"bbbb");
        assert!(h.iter().all(|&c| c == b'a'));
        // Room enough for a head: taken as it is.
        let (b, _h, start) = head(10);
        spare_buf::give(b);
        assert_eq!(spare_buf::take().as_ptr(), start.wrapping_add(10));
        // Grown by a body and nearly filled: kept, but let go when taken
        // (a fresh buffer comes instead).
        let mut grown = BytesMut::with_capacity(64 * 1024);
        grown.extend_from_slice(&vec![b'a'; 64 * 1024 - 100]);
        drop(grown.split());
        assert!(grown.capacity() < HEAD_ROOM);
        spare_buf::give(grown);
        assert_eq!(spare_buf::take().capacity(), 0);
        // Grown by a body with its room, or holding bytes: not kept.
        spare_buf::give(BytesMut::with_capacity(64 * 1024));
        let mut holding = BytesMut::with_capacity(HEAD_CHUNK);
        holding.extend_from_slice(b"x");
        spare_buf::give(holding);
        assert_eq!(spare_buf::take().capacity(), 0);
    }

    #[test]
    fn an_ended_connection_leaves_its_read_buffer_to_the_next() {
        while spare_buf::take().capacity() > 0 {}
        let ended = |buf: BytesMut| Inner {
            io: Some(Box::new(tokio::io::duplex(64).0)),
            dec: Decoder { buf },
            body: Framing::Done,
            expect: None,
            broken: false,
            first: false,
            h2c: false,
        };
        // Its last head read and gone: the buffer is the next one's.
        let mut buf = BytesMut::with_capacity(HEAD_CHUNK);
        buf.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        drop(buf.split());
        let start = buf.as_ptr();
        drop(ended(buf));
        assert_eq!(spare_buf::take().as_ptr(), start);
        // Bytes left unread (a pipelined request it never answered): let go.
        let mut buf = BytesMut::with_capacity(HEAD_CHUNK);
        buf.extend_from_slice(b"GET /");
        drop(ended(buf));
        assert_eq!(spare_buf::take().capacity(), 0);
    }

    fn parse(s: &str) -> io::Result<Option<Head>> {
        parse_head(&mut BytesMut::from(s.as_bytes()))
    }

    proptest::proptest! {
        /// Header values are taken as httparse accepted them, unchecked
        /// (`headers::parsed_value`): whatever bytes a head carries, each
        /// value it yields is one `HeaderValue`'s own check accepts, and
        /// a head with a byte no value may hold is refused.
        #[test]
        fn parsed_values_are_valid_values(values in crate::proxy::headers::random_values()) {
            use crate::proxy::headers::{head_with_values, invalid_value};
            let head = head_with_values(b"GET / HTTP/1.1\r\nHost: x\r\n", &values);
            if let Ok(Some(h)) = parse_head(&mut BytesMut::from(&head[..])) {
                proptest::prop_assert_eq!(invalid_value(h.req.headers()), None);
            }
            // A value with a byte no value may hold (and no CR or LF, which
            // would end its line and leave the rest to be read as more).
            let forbidden = |b: u8| (b < b' ' && b != b'\t') || b == 0x7f;
            let line_ends = |b: u8| b == b'\r' || b == b'\n';
            if !values.iter().flatten().copied().any(line_ends)
                && values.iter().flatten().copied().any(forbidden)
            {
                proptest::prop_assert!(parse_head(&mut BytesMut::from(&head[..])).is_err());
            }
        }
    }

    #[test]
    fn heads_say_their_framing_and_keep_alive() {
        let h = parse("GET /a?b HTTP/1.1\r\nHost: x\r\n\r\n").ok().flatten();
        let h = h.expect("a complete head");
        assert_eq!(*h.req.uri(), "/a?b");
        assert_eq!(h.framing, Framing::Done);
        assert!(h.keep_alive && !h.upgrade && !h.expect_continue);

        let h = parse("POST / HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\n");
        let h = h.ok().flatten().expect("a complete head");
        assert_eq!(h.framing, Framing::Length(5));
        assert!(!h.keep_alive);

        let h = parse(
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\nConnection: Keep-Alive\r\nExpect: 100-continue\r\n\r\n",
        );
        let h = h.ok().flatten().expect("a complete head");
        assert_eq!(h.framing, Framing::Chunked(Chunk::Size));
        assert!(h.keep_alive);
        assert!(!h.expect_continue, "HTTP/1.0 has no 100 Continue");

        let h = parse("GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n");
        assert!(h.ok().flatten().expect("a complete head").upgrade);

        assert!(
            parse("GET / HTTP/1.1\r\nHost: x\r\n")
                .ok()
                .is_some_and(|h| h.is_none())
        );
        assert!(parse("GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n").is_err());
    }

    #[test]
    fn a_head_leaves_what_follows_it_in_the_buffer() {
        let mut buf = BytesMut::from(&b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET"[..]);
        let h = parse_head(&mut buf)
            .ok()
            .flatten()
            .expect("a complete head");
        assert_eq!(h.req.headers()["content-length"], "3");
        assert_eq!(&buf[..], b"abcGET");
    }

    #[test]
    fn chunk_lines_are_hex() {
        for (n, want) in [(1usize, "1\r\n"), (255, "ff\r\n"), (4096, "1000\r\n")] {
            let mut v = Vec::new();
            chunk_line(&mut v, n);
            assert_eq!(v, want.as_bytes());
        }
    }

    #[test]
    fn heads_say_close_and_keep_alive_only_when_they_must() {
        let resp = http::Response::builder()
            .status(404)
            .header("x-a", "1")
            .body(())
            .expect("a response")
            .into_parts()
            .0;
        let head = |version, keep, length| {
            let mut v = Vec::new();
            let seen = status_and_headers(&mut v, &resp, None);
            end_head(&mut v, &seen, resp.status, version, keep, length, false);
            String::from_utf8(v).expect("ascii")
        };
        let s = head(Version::HTTP_11, false, Some(3));
        assert!(s.starts_with("HTTP/1.1 404 Not Found\r\nx-a: 1\r\ncontent-length: 3\r\ndate: "));
        assert!(s.ends_with("GMT\r\nconnection: close\r\n\r\n"), "{s}");
        let s = head(Version::HTTP_10, true, None);
        assert!(s.ends_with("connection: keep-alive\r\n\r\n"), "{s}");
    }
}
