//! The upstream side of HTTP/1, our own: the task serving the client
//! writes the request and reads the response on the upstream connection
//! itself.
//!
//! hyper's client gives every connection a task of its own and hands each
//! request to it over a channel, the response back over another and the
//! body over a third; every proxied request paid for two extra task wakes
//! and the channels. Here a pooled [`Conn`] is an owned socket and a read
//! buffer: checked out, written, read and checked in by one task (NGINX's
//! upstream module works the same way). Parsing is `httparse`'s, the parser
//! hyper uses.
//!
//! The message rules (RFC 9112): a `HEAD` request and 1xx, 204 and 304
//! responses have no body; `Transfer-Encoding` ending in `chunked` wins over
//! `Content-Length`; conflicting `Content-Length` values are an error; a
//! response with neither is read to the connection's end. Interim 1xx
//! responses are skipped (101 ends the exchange: the connection becomes a
//! tunnel). A connection is reused only after a response read to its end,
//! with keep-alive (HTTP/1.1 without `Connection: close`, HTTP/1.0 with
//! `keep-alive`) and nothing unread behind it.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use http_body::Body as HttpBody;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::forward::{Body, BoxError};

/// The largest response head accepted (status line and headers).
pub const MAX_HEAD: usize = 64 * 1024;
/// The most response headers accepted.
const MAX_HEADERS: usize = 128;
/// What a read asks for at least.
const READ_CHUNK: usize = 4 * 1024;
/// What a body read asks for at most (large bodies grow the buffer to it).
const MAX_READ: usize = 64 * 1024;
/// Body pieces smaller than this are copied out of the read buffer (one
/// small allocation) so the buffer stays unshared and is reused; larger
/// ones are split off it without a copy.
const COPY_BELOW: usize = 4 * 1024;
/// A chunk-size line (with extensions) or a trailer line longer than this
/// is refused.
const MAX_LINE: usize = 4 * 1024;
/// All trailer lines together.
const MAX_TRAILERS: usize = 16 * 1024;
/// Request body pieces up to this size are copied behind the head (one
/// write); larger ones are written on their own.
const COALESCE_BELOW: usize = 16 * 1024;
/// An idle connection keeps a read buffer up to this size.
const KEEP_BUFFER: usize = 16 * 1024;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The connection ended (or was reset) before any byte of a response:
    /// on a pooled connection, most likely the upstream's keep-alive
    /// timeout racing ours.
    #[error("connection closed before a response")]
    Closed,
    #[error("connection closed before the response was complete")]
    Incomplete,
    #[error("invalid response head: {0}")]
    Parse(#[from] httparse::Error),
    #[error("invalid response: {0}")]
    Invalid(&'static str),
    #[error("response head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// The upstream sent a response while the request body was still
    /// going up (it will not read the rest): the response is read, the
    /// connection not reused.
    #[error("the upstream answered before the request body was sent")]
    AnsweredEarly,
    /// The request body failed (the client's side).
    #[error("request body")]
    Body(#[source] BoxError),
    #[error(transparent)]
    Io(#[from] io::Error),
    /// No response head in the time given to [`Conn::exchange`].
    #[error("timed out")]
    Timeout,
}

impl ProtoError {
    /// Nothing of a response arrived: the connection went away first.
    pub fn closed_early(&self) -> bool {
        match self {
            ProtoError::Closed => true,
            ProtoError::Io(e) => gone(e),
            _ => false,
        }
    }
}

/// A reset or closed connection (as opposed to a timeout or a refusal).
fn gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionAborted
    )
}

/// An upstream socket: plain or TLS.
pub enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An upstream connection: the socket and what was read ahead of use.
pub struct Conn {
    io: Io,
    dec: Decoder,
    wbuf: Vec<u8>,
    /// The read timer, kept from request to request: it is set once and
    /// moved on only when it fires before the deadline of the request in
    /// flight (a timer per request is a timer wheel insert and removal).
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// The response side's bytes and their decoding, apart from the socket
/// (so it can be fed any bytes, split any way: the fuzz target and the
/// split-invariance test do).
#[derive(Default)]
pub struct Decoder {
    pub(crate) buf: BytesMut,
}

/// What the body decoder made of the buffered bytes.
pub(crate) enum Progress {
    Data(Bytes),
    End,
    /// More bytes are needed.
    More,
}

/// How a message body is delimited (responses here; requests in the
/// server's HTTP/1 connection, which never uses `Close`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// Read to its end (or there never was one).
    Done,
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes the connection.
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one; the bytes
    /// of trailers seen so far.
    Trailers(usize),
}

/// The head of a response and what to read after it.
pub struct Head {
    pub parts: http::response::Parts,
    pub body: ResponseBody,
    /// The header lines, when they are passed through ([`Answer::raw`]).
    pub raw: Option<RawHeaders>,
}

impl Conn {
    pub fn new(io: Io) -> Conn {
        Conn {
            io,
            dec: Decoder::default(),
            wbuf: Vec::new(),
            timer: None,
        }
    }

    /// Still good for a request: the upstream neither closed it nor sent
    /// anything unasked since the last response. Costs no system call when
    /// the socket has not become readable.
    pub fn is_reusable(&mut self) -> bool {
        if !self.dec.buf.is_empty() {
            return false;
        }
        let mut scratch = [0u8; 8];
        if let Io::Plain(tcp) = &self.io {
            // Looks at the readiness tokio already has: no system call and
            // no waker registered unless the socket became readable.
            return matches!(tcp.try_read(&mut scratch), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        }
        let mut rb = ReadBuf::new(&mut scratch);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        // Ready means an end, an error or bytes nobody asked for (a TLS
        // session ticket is consumed inside and reads as Pending).
        Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut rb)
            .is_pending()
    }

    /// Before going idle: a buffer grown by a large body is let go.
    pub fn settle(&mut self) {
        if self.dec.buf.capacity() > KEEP_BUFFER {
            self.dec.buf = BytesMut::new();
        }
        if self.wbuf.capacity() > KEEP_BUFFER {
            self.wbuf = Vec::new();
        }
    }

    /// Write `parts` (origin-form target, `Host` among the headers) and
    /// `body`, then read the response head. On an error the connection is
    /// spent. `send_timeout` bounds a write the upstream does not take
    /// (between two writes), `read_timeout` the wait for the head once the
    /// request is out and then, on the body, between two reads
    /// (`proxy_send_timeout`, `proxy_read_timeout`): a slow client body is
    /// neither. Both run on the connection's one timer.
    ///
    /// `answer`: how the response's headers are kept (see [`Answer`]).
    ///
    /// The response head is put in `out` (on `Ok`, always), not returned:
    /// it is a few hundred bytes, and returned it would be copied at every
    /// layer it passes (and at every `Result` it is wrapped in).
    pub async fn exchange(
        &mut self,
        parts: &http::request::Parts,
        pass: Option<Passthrough<'_>>,
        body: Body,
        (read_timeout, send_timeout): (Option<std::time::Duration>, Option<std::time::Duration>),
        answer: Answer<'_>,
        out: &mut Option<Head>,
    ) -> Result<(), ProtoError> {
        let phase = Phase::new(send_timeout);
        if read_timeout.is_none() && send_timeout.is_none() {
            return self
                .exchange_untimed(parts, pass, body, &phase, answer, out)
                .await;
        }
        // The timer lives on the connection, which the exchange borrows:
        // taken out for the exchange and put back after.
        let mut timer = self.timer.take();
        let mut read_deadline = None;
        let r = {
            let mut inner =
                std::pin::pin!(self.exchange_untimed(parts, pass, body, &phase, answer, &mut *out));
            std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = inner.as_mut().poll(cx) {
                    return Poll::Ready(r);
                }
                let deadline = match (phase.stall_deadline(), read_timeout) {
                    (Some(d), _) => d,
                    (None, Some(t)) if phase.written.load(Ordering::Relaxed) => {
                        *read_deadline.get_or_insert_with(|| tokio::time::Instant::now() + t)
                    }
                    // Waiting on the client's body: not the upstream's time.
                    _ => return Poll::Pending,
                };
                match poll_timer(&mut timer, deadline, cx) {
                    Poll::Ready(()) => Poll::Ready(Err(ProtoError::Timeout)),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await
        };
        self.timer = timer;
        r?;
        if let Some(head) = out.as_mut() {
            head.body.read_timeout = read_timeout;
        }
        Ok(())
    }

    async fn exchange_untimed(
        &mut self,
        parts: &http::request::Parts,
        pass: Option<Passthrough<'_>>,
        body: Body,
        phase: &Phase,
        answer: Answer<'_>,
        out: &mut Option<Head>,
    ) -> Result<(), ProtoError> {
        let head_request = parts.method == Method::HEAD;
        let written = self.write_request(parts, pass, body, phase).await;
        phase.stall.store(0, Ordering::Relaxed);
        phase.written.store(true, Ordering::Relaxed);
        if let Err(e) = written {
            // An upstream may answer (a 413, say) before reading the whole
            // body, and close or just stop reading: a response that made it
            // is the better outcome.
            if (matches!(&e, ProtoError::AnsweredEarly)
                || matches!(&e, ProtoError::Io(io) if gone(io)))
                && self.read_head(head_request, answer, out).await.is_ok()
                && let Some(head) = out.as_mut()
            {
                head.body.keep_alive = false;
                return Ok(());
            }
            return Err(e);
        }
        self.read_head(head_request, answer, out).await
    }

    async fn write_request(
        &mut self,
        parts: &http::request::Parts,
        pass: Option<Passthrough<'_>>,
        mut body: Body,
        phase: &Phase,
    ) -> Result<(), ProtoError> {
        let mut w = std::mem::take(&mut self.wbuf);
        w.clear();
        let has_body = !body.is_end_stream();
        let length = encode_head(&mut w, parts, pass, has_body, body.size_hint().exact());
        let r = if has_body {
            self.write_body(&mut w, &mut body, length, phase).await
        } else {
            self.send(&w, phase).await
        };
        self.wbuf = w;
        r?;
        if let Io::Tls(_) = self.io {
            self.io.flush().await?;
        }
        Ok(())
    }

    /// The body after the head already in `w`: small pieces ride along with
    /// it, the rest is written as it comes.
    async fn write_body(
        &mut self,
        w: &mut Vec<u8>,
        body: &mut Body,
        length: Option<u64>,
        phase: &Phase,
    ) -> Result<(), ProtoError> {
        let mut sent: u64 = 0;
        loop {
            // What is ready rides along; before waiting for more, what is
            // pending goes out (the upstream sees the head at once).
            let frame =
                match std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx)))
                    .await
                {
                    Poll::Ready(f) => f,
                    Poll::Pending => {
                        if !w.is_empty() {
                            self.send(w, phase).await?;
                            w.clear();
                        }
                        std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
                    }
                };
            let data = match frame {
                None => break,
                Some(Err(e)) => return Err(ProtoError::Body(e)),
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) => d,
                    // Trailers are not forwarded upstream.
                    Err(_) => continue,
                },
            };
            if data.is_empty() {
                continue;
            }
            sent += data.len() as u64;
            if let Some(n) = length
                && sent > n
            {
                return Err(ProtoError::Body(
                    "request body longer than its Content-Length".into(),
                ));
            }
            if length.is_none() {
                // Into the Vec directly: no String per chunk.
                let _ = std::io::Write::write_fmt(w, format_args!("{:x}\r\n", data.len()));
            }
            if data.len() < COALESCE_BELOW {
                w.extend_from_slice(&data);
            } else {
                self.send(w, phase).await?;
                w.clear();
                self.send(&data, phase).await?;
            }
            if length.is_none() {
                w.extend_from_slice(b"\r\n");
            }
            if w.len() >= COALESCE_BELOW {
                self.send(w, phase).await?;
                w.clear();
            }
        }
        if let Some(n) = length
            && sent != n
        {
            return Err(ProtoError::Body(
                "request body shorter than its Content-Length".into(),
            ));
        }
        if length.is_none() {
            w.extend_from_slice(b"0\r\n\r\n");
        }
        if !w.is_empty() {
            self.send(w, phase).await?;
            w.clear();
        }
        Ok(())
    }

    /// Write all of `b`; while the upstream is not taking more, watch for
    /// it answering instead ([`ProtoError::AnsweredEarly`]).
    async fn send(&mut self, mut b: &[u8], phase: &Phase) -> Result<(), ProtoError> {
        std::future::poll_fn(|cx| {
            while !b.is_empty() {
                match Pin::new(&mut self.io).poll_write(cx, b) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(ProtoError::Io(io::ErrorKind::WriteZero.into())));
                    }
                    Poll::Ready(Ok(n)) => {
                        b = &b[n..];
                        phase.stall.store(0, Ordering::Relaxed);
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(ProtoError::Io(e))),
                    Poll::Pending => {
                        return match self.poll_fill(cx, READ_CHUNK) {
                            Poll::Ready(Ok(0)) => Poll::Ready(Err(ProtoError::Closed)),
                            Poll::Ready(Ok(_)) => Poll::Ready(Err(ProtoError::AnsweredEarly)),
                            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                            Poll::Pending => {
                                phase.stalled();
                                Poll::Pending
                            }
                        };
                    }
                }
            }
            Poll::Ready(Ok(()))
        })
        .await
    }

    /// Read more into the buffer: at least `want` bytes of room.
    async fn fill(&mut self, want: usize) -> io::Result<usize> {
        self.dec.buf.reserve(want);
        self.io.read_buf(&mut self.dec.buf).await
    }

    async fn read_head(
        &mut self,
        head_request: bool,
        answer: Answer<'_>,
        out: &mut Option<Head>,
    ) -> Result<(), ProtoError> {
        let mut received = !self.dec.buf.is_empty();
        loop {
            if !self.dec.buf.is_empty() {
                if self.dec.parse_head_into(head_request, answer, out)? {
                    return Ok(());
                }
                if self.dec.buf.len() >= MAX_HEAD {
                    return Err(ProtoError::HeadTooLarge);
                }
            }
            match self.fill(READ_CHUNK).await {
                Ok(0) if !received => return Err(ProtoError::Closed),
                Ok(0) => return Err(ProtoError::Incomplete),
                Ok(_) => received = true,
                Err(e) if !received && gone(&e) => return Err(ProtoError::Closed),
                Err(e) => return Err(ProtoError::Io(e)),
            }
        }
    }

    /// The next piece of a body framed by `body`; `None` at its end.
    fn poll_body(
        &mut self,
        body: &mut ResponseBody,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, ProtoError>>> {
        loop {
            match self.dec.body_step(&mut body.framing)? {
                Progress::Data(d) => return Poll::Ready(Some(Ok(d))),
                Progress::End => return Poll::Ready(None),
                Progress::More => {}
            }
            match self.poll_fill(cx, body.want()) {
                Poll::Ready(n) => {
                    if n? == 0 {
                        return Poll::Ready(body.at_close().map(Err));
                    }
                    body.deadline = None;
                }
                Poll::Pending => {
                    let Some(d) = body.read_timeout else {
                        return Poll::Pending;
                    };
                    // NGINX's reading of `proxy_read_timeout`: armed when
                    // a read finds nothing, off when bytes come.
                    let deadline = *body
                        .deadline
                        .get_or_insert_with(|| tokio::time::Instant::now() + d);
                    return match self.poll_timer(deadline, cx) {
                        Poll::Ready(()) => Poll::Ready(Some(Err(ProtoError::Timeout))),
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
    }

    fn poll_timer(&mut self, deadline: tokio::time::Instant, cx: &mut Context<'_>) -> Poll<()> {
        poll_timer(&mut self.timer, deadline, cx)
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<Result<usize, ProtoError>> {
        self.dec.buf.reserve(want);
        let fut = self.io.read_buf(&mut self.dec.buf);
        let fut = std::pin::pin!(fut);
        fut.poll(cx).map_err(ProtoError::Io)
    }
}

/// A connection's timer, for `deadline`: set once per connection and moved
/// on only when it goes off before the deadline asked for (a timer per
/// request or per read would be a timer wheel insert and removal each).
fn poll_timer(
    timer: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    deadline: tokio::time::Instant,
    cx: &mut Context<'_>,
) -> Poll<()> {
    let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
    if timer.deadline() > deadline {
        timer.as_mut().reset(deadline);
    }
    while timer.as_mut().poll(cx).is_ready() {
        if deadline > timer.deadline() {
            timer.as_mut().reset(deadline);
            continue;
        }
        return Poll::Ready(());
    }
    Poll::Pending
}

impl Decoder {
    /// A complete head at the front of the buffer, taken off it; `None`
    /// when more bytes are needed. Interim (1xx) responses are dropped.
    /// (The fuzz targets' and tests' entry; the proxy's is `parse_head_into`.)
    fn parse_head(
        &mut self,
        head_request: bool,
        answer: Answer<'_>,
    ) -> Result<Option<Head>, ProtoError> {
        let mut out = None;
        self.parse_head_into(head_request, answer, &mut out)?;
        Ok(out)
    }

    /// As `parse_head`, the head put in `out` (true) rather than returned
    /// (see [`Conn::exchange`]).
    fn parse_head_into(
        &mut self,
        head_request: bool,
        answer: Answer<'_>,
        out: &mut Option<Head>,
    ) -> Result<bool, ProtoError> {
        loop {
            // Uninitialised slots (see the server's head parser).
            let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
            let mut r = httparse::Response::new(&mut []);
            let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
                &mut r,
                &self.buf,
                &mut headers,
            )? {
                // The same limit whether the head came whole or in pieces.
                httparse::Status::Complete(len) if len > MAX_HEAD => {
                    return Err(ProtoError::HeadTooLarge);
                }
                httparse::Status::Complete(len) => len,
                httparse::Status::Partial => return Ok(false),
            };
            let code = r.code.unwrap_or(0);
            let status = StatusCode::from_u16(code).map_err(|_| ProtoError::Invalid("status"))?;
            if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
                self.buf.advance(len);
                if self.buf.is_empty() {
                    return Ok(false);
                }
                continue;
            }
            let version = match r.version {
                Some(0) => Version::HTTP_10,
                _ => Version::HTTP_11,
            };
            let head = &r.headers[..];
            let said = Said::of(head);
            let (framing, mut keep_alive) = framing(&said, status, head_request)?;
            keep_alive &= keeps_alive(&said, version);
            let mut map = super::headers::spare::take(answer.room + head.len());
            let raw = match answer.raw {
                // The lines as they came, filtered; the map gets only what
                // the pipeline adds.
                Some(filter) => Some(RawHeaders::of(head, &said, &filter)),
                None => {
                    // The head is copied once; every header value shares the copy.
                    let base = self.buf.as_ptr() as usize;
                    let shared = head_copy(&self.buf[..len]);
                    for (i, h) in head.iter().enumerate() {
                        // `Transfer-Encoding` wins over `Content-Length`:
                        // the length is not passed on.
                        if said.chunked_or_close && is(h.name, "content-length") {
                            continue;
                        }
                        let name = super::headers::names::at(
                            super::headers::names::Side::Response,
                            i,
                            h.name.as_bytes(),
                        )
                        .map_err(|_| ProtoError::Invalid("header name"))?;
                        let start = h.value.as_ptr() as usize - base;
                        let value = super::headers::parsed_value(
                            shared.slice(start..start + h.value.len()),
                        );
                        map.append(name, value);
                    }
                    None
                }
            };
            self.buf.advance(len);
            let upgrade = status == StatusCode::SWITCHING_PROTOCOLS;
            // Made in `out` and then filled in (not built and copied there).
            let head = out.insert(Head {
                parts: http::Response::new(()).into_parts().0,
                raw,
                body: ResponseBody {
                    framing: if upgrade { Framing::Done } else { framing },
                    keep_alive: keep_alive && !upgrade,
                    upgrade,
                    read_timeout: None,
                    deadline: None,
                },
            });
            head.parts.status = status;
            head.parts.version = version;
            super::over_default(&mut head.parts.headers, map);
            return Ok(true);
        }
    }

    /// One step of the body framed by `framing` on what is buffered.
    pub(crate) fn body_step(&mut self, framing: &mut Framing) -> Result<Progress, ProtoError> {
        loop {
            match *framing {
                Framing::Done => return Ok(Progress::End),
                Framing::Length(0) => {
                    *framing = Framing::Done;
                    return Ok(Progress::End);
                }
                Framing::Length(rem) => {
                    if self.buf.is_empty() {
                        return Ok(Progress::More);
                    }
                    let n = (rem.min(self.buf.len() as u64)) as usize;
                    *framing = Framing::Length(rem - n as u64);
                    return Ok(Progress::Data(self.take(n)));
                }
                Framing::Close => {
                    if self.buf.is_empty() {
                        return Ok(Progress::More);
                    }
                    let n = self.buf.len();
                    return Ok(Progress::Data(self.take(n)));
                }
                Framing::Chunked(state) => match self.step_chunked(state)? {
                    Step::Data(d, next) => {
                        *framing = Framing::Chunked(next);
                        return Ok(Progress::Data(d));
                    }
                    Step::Next(next) => *framing = Framing::Chunked(next),
                    Step::End => {
                        *framing = Framing::Done;
                        return Ok(Progress::End);
                    }
                    Step::More => return Ok(Progress::More),
                },
            }
        }
    }

    /// `n` bytes off the front of the buffer.
    fn take(&mut self, n: usize) -> Bytes {
        if n < COPY_BELOW {
            let b = Bytes::copy_from_slice(&self.buf[..n]);
            self.buf.advance(n);
            b
        } else {
            self.buf.split_to(n).freeze()
        }
    }

    /// One step of the chunked decoder on what is buffered.
    fn step_chunked(&mut self, state: Chunk) -> Result<Step, ProtoError> {
        match state {
            Chunk::Size => {
                let Some(line) = self.line()? else {
                    return Ok(Step::More);
                };
                let size = chunk_size(&self.buf[..line.0])?;
                self.buf.advance(line.1);
                Ok(Step::Next(if size == 0 {
                    Chunk::Trailers(0)
                } else {
                    Chunk::Data(size)
                }))
            }
            Chunk::Data(rem) => {
                if self.buf.is_empty() {
                    return Ok(Step::More);
                }
                let n = (rem.min(self.buf.len() as u64)) as usize;
                let left = rem - n as u64;
                let d = self.take(n);
                Ok(Step::Data(
                    d,
                    if left == 0 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left)
                    },
                ))
            }
            Chunk::DataEnd => match &self.buf[..] {
                [b'\r', b'\n', ..] => {
                    self.buf.advance(2);
                    Ok(Step::Next(Chunk::Size))
                }
                [b'\n', ..] => {
                    self.buf.advance(1);
                    Ok(Step::Next(Chunk::Size))
                }
                [] | [b'\r'] => Ok(Step::More),
                _ => Err(ProtoError::Invalid("chunk not followed by CRLF")),
            },
            Chunk::Trailers(seen) => {
                let Some((end, next)) = self.line()? else {
                    return Ok(Step::More);
                };
                self.buf.advance(next);
                if end == 0 {
                    return Ok(Step::End);
                }
                let seen = seen + next;
                if seen > MAX_TRAILERS {
                    return Err(ProtoError::Invalid("trailers too large"));
                }
                Ok(Step::Next(Chunk::Trailers(seen)))
            }
        }
    }

    /// A line at the front of the buffer: (its length without the line
    /// end, the length with it).
    fn line(&self) -> Result<Option<(usize, usize)>, ProtoError> {
        match self.buf.iter().take(MAX_LINE).position(|&b| b == b'\n') {
            Some(i) => {
                let end = if i > 0 && self.buf[i - 1] == b'\r' {
                    i - 1
                } else {
                    i
                };
                Ok(Some((end, i + 1)))
            }
            None if self.buf.len() >= MAX_LINE => Err(ProtoError::Invalid("chunk line too long")),
            None => Ok(None),
        }
    }
}

/// The client's headers, passed on as they are except for `Host`, the
/// hop-by-hop ones, those its `Connection` lists, the names the request
/// itself sets (the gateway's own) and `skip`. Written straight from the
/// client's map: no per-request copy of it.
#[derive(Clone, Copy)]
pub struct Passthrough<'a> {
    pub headers: &'a HeaderMap,
    /// Which names `headers` may hold.
    pub seen: super::headers::Seen,
    pub skip: &'a [HeaderName],
    /// The gateway's own headers (forwarding, trace, request id,
    /// `proxy_set_header`, `Host`), written after the request's map; the
    /// client's of these names are not passed on. A list, not a map: a
    /// handful of names known to be distinct, never looked up by hashing.
    pub own: &'a [(HeaderName, HeaderValue)],
}

/// The request head into `w`: request line, the passed-on client headers,
/// the request's own, and the framing — the declared `Content-Length`,
/// else the body's known size, else chunked (`None` without a body).
/// Returns the length framing the body must match (`None`: chunked or no
/// body).
#[doc(hidden)] // public for benches/pipeline.rs
pub fn encode_head(
    w: &mut Vec<u8>,
    parts: &http::request::Parts,
    pass: Option<Passthrough<'_>>,
    has_body: bool,
    exact_size: Option<u64>,
) -> Option<u64> {
    let own: &[(HeaderName, HeaderValue)] = pass.map_or(&[], |p| p.own);
    // The request's own map is most often empty (the gateway's headers
    // are `own`, the client's `pass`).
    let declared: Option<u64> = (!parts.headers.is_empty())
        .then(|| super::headers::get(&parts.headers, &header::CONTENT_LENGTH))
        .flatten()
        .or_else(|| {
            own.iter()
                .find(|(n, _)| n == header::CONTENT_LENGTH)
                .map(|(_, v)| v)
        })
        .or_else(|| {
            pass.filter(|p| p.seen.has(super::headers::Seen::CONTENT_LENGTH))
                .and_then(|p| super::headers::get(p.headers, &header::CONTENT_LENGTH))
        })
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    let length: Option<u64> = match (has_body, declared) {
        (true, Some(n)) => Some(n),
        (true, None) => exact_size,
        (false, Some(0)) => Some(0),
        (false, _) => None,
    };
    let chunked = has_body && length.is_none();
    w.extend_from_slice(parts.method.as_str().as_bytes());
    w.push(b' ');
    w.extend_from_slice(
        parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .as_bytes(),
    );
    w.extend_from_slice(b" HTTP/1.1\r\n");
    let mut line = |name: &HeaderName, value: &HeaderValue| {
        w.extend_from_slice(name.as_str().as_bytes());
        w.extend_from_slice(b": ");
        w.extend_from_slice(value.as_bytes());
        w.extend_from_slice(b"\r\n");
    };
    if let Some(p) = pass {
        // No list made (it allocated): the usual options are known at
        // once, others scanned for the few headers passed otherwise.
        let listed = if p.seen.has(super::headers::Seen::CONNECTION) {
            super::forward::Listed::of(p.headers)
        } else {
            super::forward::Listed::Nothing
        };
        for (name, value) in p.headers {
            if *name == header::HOST
                || *name == header::CONTENT_LENGTH
                || super::forward::is_hop_by_hop(name)
                || parts.headers.keys().any(|mine| mine == name)
                || own.iter().any(|(mine, _)| mine == name)
                || p.skip.contains(name)
                || listed.contains(name)
            {
                continue;
            }
            line(name, value);
        }
    }
    for (name, value) in parts.headers.iter().chain(own.iter().map(|(n, v)| (n, v))) {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        line(name, value);
    }
    if let Some(n) = length {
        w.extend_from_slice(b"content-length: ");
        w.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        w.extend_from_slice(b"\r\n");
    } else if chunked {
        w.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    w.extend_from_slice(b"\r\n");
    length
}

enum Step {
    Data(Bytes, Chunk),
    Next(Chunk),
    End,
    More,
}

/// The hex size at the start of a chunk-size line (extensions ignored).
fn chunk_size(line: &[u8]) -> Result<u64, ProtoError> {
    let mut size: u64 = 0;
    let mut digits = 0;
    for &b in line {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            b';' | b' ' | b'\t' => break,
            _ => return Err(ProtoError::Invalid("chunk size")),
        };
        digits += 1;
        if digits > 15 {
            return Err(ProtoError::Invalid("chunk size too large"));
        }
        size = size * 16 + u64::from(d);
    }
    if digits == 0 {
        return Err(ProtoError::Invalid("chunk size"));
    }
    Ok(size)
}

/// What a response head says about its framing and its connection, read
/// from its lines (no map needed).
#[derive(Debug, PartialEq, Eq)]
struct Said<'h> {
    /// The last `Transfer-Encoding` coding, when there is one.
    transfer_encoding: Option<&'h str>,
    /// `Transfer-Encoding` is present: `Content-Length` is not passed on.
    chunked_or_close: bool,
    /// Every `Content-Length` value, checked (`Err`: invalid or conflicting).
    length: Result<Option<u64>, &'static str>,
    /// `Connection` tokens `close` and `keep-alive`; any other token names
    /// a header to drop.
    close: bool,
    keep_alive: bool,
    connection: bool,
}

/// A header name is `want` (lowercase), in any case.
#[inline]
fn is(name: &str, want: &str) -> bool {
    name.len() == want.len() && name.eq_ignore_ascii_case(want)
}

/// A value as text when it is visible ASCII (what `HeaderValue::to_str`
/// accepts), else `None`.
fn text(v: &[u8]) -> Option<&str> {
    if v.iter().all(|&b| b == b'\t' || (32..127).contains(&b)) {
        std::str::from_utf8(v).ok()
    } else {
        None
    }
}

impl<'h> Said<'h> {
    fn of(head: &[httparse::Header<'h>]) -> Said<'h> {
        let mut said = Said {
            transfer_encoding: None,
            chunked_or_close: false,
            length: Ok(None),
            close: false,
            keep_alive: false,
            connection: false,
        };
        for h in head {
            let n = h.name;
            if is(n, "transfer-encoding") {
                said.chunked_or_close = true;
                if let Some(last) = text(h.value)
                    .into_iter()
                    .flat_map(|v| v.rsplit(','))
                    .map(str::trim)
                    .find(|t| !t.is_empty())
                {
                    said.transfer_encoding = Some(last);
                }
            } else if is(n, "content-length") {
                said.length = said.length.and_then(|have| {
                    let mut have = have;
                    for part in super::headers::items(text(h.value).ok_or("content-length")?) {
                        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
                            return Err("content-length");
                        }
                        let n = part
                            .iter()
                            .try_fold(0u64, |n, &d| {
                                n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
                            })
                            .ok_or("content-length")?;
                        if have.is_some_and(|l| l != n) {
                            return Err("conflicting content-length");
                        }
                        have = Some(n);
                    }
                    Ok(have)
                });
            } else if is(n, "connection") {
                said.connection = true;
                for t in text(h.value).into_iter().flat_map(super::headers::items) {
                    said.close |= t.eq_ignore_ascii_case(b"close");
                    said.keep_alive |= t.eq_ignore_ascii_case(b"keep-alive");
                }
            }
        }
        said
    }
}

/// The body's framing and whether it allows keep-alive (RFC 9112 §6.3).
/// A `Content-Length` beside `Transfer-Encoding` is not passed on.
fn framing(
    said: &Said<'_>,
    status: StatusCode,
    head_request: bool,
) -> Result<(Framing, bool), ProtoError> {
    if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((Framing::Done, true));
    }
    if said.chunked_or_close {
        let chunked = said
            .transfer_encoding
            .is_some_and(|t| t.eq_ignore_ascii_case("chunked"));
        // Both framings on one message: the connection is not trusted again.
        let both = said.length != Ok(None);
        return Ok(if chunked {
            (Framing::Chunked(Chunk::Size), !both)
        } else {
            (Framing::Close, false)
        });
    }
    Ok(match said.length.map_err(ProtoError::Invalid)? {
        Some(n) => (Framing::Length(n), true),
        None => (Framing::Close, false),
    })
}

/// Whether the response lets the connection be used again.
fn keeps_alive(said: &Said<'_>, version: Version) -> bool {
    if version == Version::HTTP_10 {
        said.keep_alive
    } else {
        !said.close
    }
}

/// How [`Conn::exchange`] keeps the response's headers.
#[derive(Clone, Copy, Default)]
pub struct Answer<'a> {
    /// How many headers the caller will add to the response's map (made
    /// that much larger at once instead of growing later).
    pub room: usize,
    /// Pass the upstream's header lines to the client as they came (see
    /// [`RawHeaders`]) instead of parsing them into the response's map.
    pub raw: Option<RawFilter<'a>>,
}

/// Which of an upstream response's header lines a passed-through head
/// drops, besides the hop-by-hop ones, those its `Connection` lists and
/// `Content-Length` beside `Transfer-Encoding` (what the map would have
/// lost the same way).
#[derive(Clone, Copy)]
pub struct RawFilter<'a> {
    /// `proxy_hide_header` names.
    pub hide: &'a [String],
    /// Names the pipeline sets on the response, replacing the upstream's
    /// (the request-id header; the rate-limit headers when it sends them).
    pub own: &'a [&'a str],
}

impl RawFilter<'_> {
    fn drops(&self, name: &str) -> bool {
        super::forward::hop_by_hop_name(name)
            || self.own.iter().any(|o| is(name, o))
            || self.hide.iter().any(|h| name.eq_ignore_ascii_case(h))
    }
}

/// An upstream response's own header lines, passed to an HTTP/1 client
/// as they came instead of being parsed into a `HeaderMap` and written
/// from it again (that was ~2,500 instructions of a small proxied
/// response's ~26,000). Carried beside the response, never in it (an
/// extension cost ~700 instructions to insert and take): in the pooled
/// body ([`crate::proxy::pool::PooledBody::raw`]), the upstream exchange's
/// record and [`crate::proxy::forward::Answered`]; the HTTP/1 writer
/// ([`crate::server::h1`]) writes them behind the status line and before
/// the map's headers (what the pipeline added). Used only where nothing on
/// the way reads the upstream's headers (no cache, no `wrap`, no upgrade)
/// and the client speaks HTTP/1; any other writer gets them back in the
/// map ([`RawHeaders::restore`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawHeaders {
    /// `name: value\r\n` lines, names as the upstream wrote them.
    pub lines: Vec<u8>,
    /// The length their `Content-Length` lines say, when they say one.
    pub length: Option<u64>,
    /// A `Date` is among them.
    pub date: bool,
    /// Where the lines the pipeline added ([`RawHeaders::add`]) begin.
    pub ours: usize,
    /// One bit per [`name_bit`] of the names among those lines: a name
    /// whose bit is clear is not among them (nothing to replace).
    pub our_names: u64,
}

/// The lines' buffer goes back to the thread's spares.
impl Drop for RawHeaders {
    fn drop(&mut self) {
        super::headers::spare::give_lines(std::mem::take(&mut self.lines));
    }
}

/// A name's bit in [`RawHeaders::our_names`]: two names may share one
/// (then a replacing add looks through the lines for nothing).
fn name_bit(name: &[u8]) -> u64 {
    let n = name.len();
    let last = |k: usize| usize::from(name.get(n.wrapping_sub(k)).copied().unwrap_or(0));
    1 << ((n * 7 + last(2) * 13 + last(1)) & 63)
}

impl RawHeaders {
    fn of(head: &[httparse::Header<'_>], said: &Said<'_>, filter: &RawFilter<'_>) -> RawHeaders {
        let size: usize = head.iter().map(|h| h.name.len() + h.value.len() + 4).sum();
        let mut raw = RawHeaders {
            // And room for what the pipeline usually adds (a request id,
            // a few headers of its own) without growing.
            lines: super::headers::spare::take_lines(size + ROOM_FOR_OURS),
            // Every `Content-Length` passed on says this (they were checked
            // to agree); none is passed on beside `Transfer-Encoding`.
            length: match said.length {
                Ok(n) if !said.chunked_or_close => n,
                _ => None,
            },
            date: false,
            ours: 0,
            our_names: 0,
        };
        for h in head {
            let n = h.name;
            if filter.drops(n)
                || (said.chunked_or_close && is(n, "content-length"))
                || (said.connection && connection_lists(head, n))
            {
                continue;
            }
            if is(n, "date") {
                raw.date = true;
            }
            raw.lines.extend_from_slice(n.as_bytes());
            raw.lines.extend_from_slice(b": ");
            raw.lines.extend_from_slice(h.value);
            raw.lines.extend_from_slice(b"\r\n");
        }
        raw.ours = raw.lines.len();
        raw
    }

    /// A header of the pipeline's own behind the upstream's lines, as
    /// [`http::HeaderMap::append`] would add it to the map; with
    /// `replace`, as [`http::HeaderMap::insert`] would: the pipeline's
    /// earlier lines of that name go (the upstream's were filtered out
    /// already, [`RawFilter::own`]).
    pub fn add(&mut self, name: &HeaderName, value: &[u8], replace: bool) {
        let name = name.as_str().as_bytes();
        let bit = name_bit(name);
        if replace && self.our_names & bit != 0 {
            self.remove_ours(name);
        }
        self.our_names |= bit;
        self.lines.extend_from_slice(name);
        self.lines.extend_from_slice(b": ");
        self.lines.extend_from_slice(value);
        self.lines.extend_from_slice(b"\r\n");
    }

    /// Drops the pipeline's lines named `name` (lowercase, as a
    /// `HeaderName` is).
    fn remove_ours(&mut self, name: &[u8]) {
        let mut at = self.ours;
        while at < self.lines.len() {
            let rest = &self.lines[at..];
            let end = rest
                .iter()
                .position(|&b| b == b'\n')
                .map_or(rest.len(), |i| i + 1);
            if rest.len() > name.len() && rest.starts_with(name) && rest[name.len()] == b':' {
                self.lines.drain(at..at + end);
            } else {
                at += end;
            }
        }
    }

    /// Put passed-through lines back into `resp`'s map (before what the
    /// pipeline added), for a writer that only knows the map (HTTP/2).
    pub fn restore<B>(self, resp: &mut http::Response<B>) {
        let raw = self;
        // The upstream's lines first, then what the pipeline added (the
        // names it replaces were dropped from the lines already).
        let added = std::mem::take(resp.headers_mut());
        let map = resp.headers_mut();
        for line in raw.lines.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                continue;
            };
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(&line[..colon]),
                HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
            ) {
                map.append(n, v);
            }
        }
        let mut last: Option<HeaderName> = None;
        for (n, v) in added {
            if n.is_some() {
                last = n;
            }
            if let Some(n) = &last {
                map.append(n.clone(), v);
            }
        }
    }
}

/// Bytes of line room a passed-through head is made with beyond the
/// upstream's own lines, for the pipeline's.
const ROOM_FOR_OURS: usize = 256;

/// Whether a `Connection` header of `head` lists `name`.
fn connection_lists(head: &[httparse::Header<'_>], name: &str) -> bool {
    head.iter()
        .filter(|h| is(h.name, "connection"))
        .filter_map(|h| text(h.value))
        .flat_map(super::headers::items)
        .any(|t| t.eq_ignore_ascii_case(name.as_bytes()))
}

/// A response body, read from its connection as it is polled.
pub struct ResponseBody {
    framing: Framing,
    keep_alive: bool,
    upgrade: bool,
    /// `proxy_read_timeout` between two reads of the body.
    read_timeout: Option<std::time::Duration>,
    /// When the wait for the next body bytes times out (set when a read
    /// finds nothing, cleared when bytes come).
    deadline: Option<tokio::time::Instant>,
}

impl ResponseBody {
    /// Read to its end (or bodiless).
    pub fn is_done(&self) -> bool {
        matches!(self.framing, Framing::Done | Framing::Length(0))
    }

    /// Done, and the connection may carry another request.
    pub fn reusable(&self) -> bool {
        self.is_done() && self.keep_alive
    }

    /// A 101: the connection is the tunnel's now.
    pub fn is_upgrade(&self) -> bool {
        self.upgrade
    }

    /// How much room the next read of this body wants.
    fn want(&self) -> usize {
        match self.framing {
            Framing::Length(rem) => (rem.min(MAX_READ as u64) as usize).max(READ_CHUNK),
            Framing::Close => MAX_READ,
            _ => READ_CHUNK,
        }
    }

    /// The connection ended: the end of a body delimited by it, or an
    /// incomplete one.
    fn at_close(&mut self) -> Option<ProtoError> {
        if self.framing == Framing::Close {
            self.framing = Framing::Done;
            None
        } else {
            Some(ProtoError::Incomplete)
        }
    }

    pub fn size_hint(&self) -> http_body::SizeHint {
        match self.framing {
            Framing::Done => http_body::SizeHint::with_exact(0),
            Framing::Length(n) => http_body::SizeHint::with_exact(n),
            _ => http_body::SizeHint::default(),
        }
    }

    pub fn poll_data(
        &mut self,
        conn: &mut Conn,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, ProtoError>>> {
        let r = conn.poll_body(self, cx);
        if let Poll::Ready(Some(Err(_))) = &r {
            self.framing = Framing::Done;
            self.keep_alive = false;
        }
        r
    }
}

/// A copy of a response head that its header values share: one
/// allocation for the usual head (a `Vec`-backed copy takes a second one,
/// for the shared count, the first time it is sliced).
fn head_copy(head: &[u8]) -> Bytes {
    struct Inline<const N: usize> {
        buf: [u8; N],
        len: usize,
    }
    impl<const N: usize> AsRef<[u8]> for Inline<N> {
        fn as_ref(&self) -> &[u8] {
            &self.buf[..self.len]
        }
    }
    fn inline<const N: usize>(head: &[u8]) -> Bytes {
        let mut i = Inline {
            buf: [0u8; N],
            len: head.len(),
        };
        i.buf[..head.len()].copy_from_slice(head);
        Bytes::from_owner(i)
    }
    match head.len() {
        0..=256 => inline::<256>(head),
        257..=1024 => inline::<1024>(head),
        _ => Bytes::copy_from_slice(head),
    }
}

/// A whole decoded response: status, headers (name, value), body.
#[doc(hidden)]
pub type Decoded = (u16, Vec<(String, Vec<u8>)>, Vec<u8>);

/// A response decoded from `input` arriving in pieces of the sizes in
/// `pieces` (cycled; 0 or none: all the rest), as the socket would deliver
/// it: the status, the headers and the body, or the error's text. Used by
/// the fuzz target and the split-invariance test; the gateway decodes
/// through [`Conn`].
#[doc(hidden)]
pub fn decode(input: &[u8], pieces: &[usize], head_request: bool) -> Result<Decoded, String> {
    let mut dec = Decoder::default();
    let mut fed = 0;
    let mut turn = 0;
    let mut feed = |dec: &mut Decoder| -> bool {
        if fed >= input.len() {
            return false;
        }
        let left = input.len() - fed;
        let n = match pieces.get(turn % pieces.len().max(1)) {
            Some(&n) if n > 0 => n.min(left),
            _ => left,
        };
        turn += 1;
        dec.buf.extend_from_slice(&input[fed..fed + n]);
        fed += n;
        true
    };
    let head = loop {
        if !dec.buf.is_empty() {
            if let Some(h) = dec
                .parse_head(head_request, Answer::default())
                .map_err(|e| e.to_string())?
            {
                break h;
            }
            if dec.buf.len() >= MAX_HEAD {
                return Err(ProtoError::HeadTooLarge.to_string());
            }
        }
        if !feed(&mut dec) {
            return Err(if input.is_empty() {
                ProtoError::Closed
            } else {
                ProtoError::Incomplete
            }
            .to_string());
        }
    };
    let mut body = head.body;
    let mut out = Vec::new();
    loop {
        match dec
            .body_step(&mut body.framing)
            .map_err(|e| e.to_string())?
        {
            Progress::Data(d) if d.is_empty() => return Err("an empty body piece".into()),
            Progress::Data(d) => out.extend_from_slice(&d),
            Progress::End => break,
            Progress::More => {
                if !feed(&mut dec) {
                    if let Some(e) = body.at_close() {
                        return Err(e.to_string());
                    }
                    break;
                }
            }
        }
    }
    let headers = head
        .parts
        .headers
        .iter()
        .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
        .collect();
    Ok((head.parts.status.as_u16(), headers, out))
}

/// What a client gets of a response head: its headers (sorted by name: a
/// map's removals reorder the other names, the values of one name keep
/// their order), the body's framing and keep-alive, or the error.
type HeadOutcome = Result<(Vec<(String, Vec<u8>)>, Framing, bool), String>;

/// A head parsed both ways: into the map, as the pipeline sees it after
/// `upstream_response` (hop-by-hop and hidden names gone, the pipeline's
/// own names replaced), and passed through with the lines put back into a
/// map ([`RawHeaders::restore`]).
fn head_both_ways(
    input: &[u8],
    head_request: bool,
    hide: &[String],
    own: &[&str],
) -> [HeadOutcome; 2] {
    let parse = |raw: Option<RawFilter<'_>>| {
        let mut d = Decoder::default();
        d.buf.extend_from_slice(input);
        d.parse_head(head_request, Answer { room: 0, raw })
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "partial".to_string())
    };
    let list = |h: &HeaderMap| {
        let mut l = h
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
            .collect::<Vec<_>>();
        l.sort_by(|a, b| a.0.cmp(&b.0));
        l
    };
    let mapped = parse(None).map(|head| {
        let mut h = head.parts.headers;
        super::forward::strip_hop_by_hop(&mut h);
        for n in hide.iter().map(String::as_str).chain(own.iter().copied()) {
            h.remove(n);
        }
        (list(&h), head.body.framing, head.body.keep_alive)
    });
    let passed = parse(Some(RawFilter { hide, own })).map(|head| {
        let mut resp = http::Response::from_parts(head.parts, ());
        if let Some(raw) = head.raw {
            raw.restore(&mut resp);
        }
        (
            list(resp.headers()),
            head.body.framing,
            head.body.keep_alive,
        )
    });
    [mapped, passed]
}

/// Whether a response head gives the client the same headers, framing and
/// keep-alive (or the same error) passed through as parsed into the map,
/// with `Secret` hidden and `X-Request-Id` set by the pipeline. Used by
/// the fuzz target and the property test; the gateway never calls it.
#[doc(hidden)]
pub fn pass_through_matches(input: &[u8], head_request: bool) -> Result<(), String> {
    let hide = ["secret".to_string()];
    let [map, raw] = head_both_ways(input, head_request, &hide, &["x-request-id"]);
    if map == raw {
        Ok(())
    } else {
        Err(format!("parsed: {map:?}\npassed through: {raw:?}"))
    }
}

/// A connection handed over after a 101: what was read past the response
/// head comes first.
impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.dec.buf.is_empty() {
            let n = this.dec.buf.len().min(buf.remaining());
            buf.put_slice(&this.dec.buf[..n]);
            this.dec.buf.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Where an exchange stands, for its timer (the exchange borrows the
/// connection, so this lives beside it). Atomics, not cells: the
/// exchange's future must stay `Send`.
struct Phase {
    /// Set by the first stalled write (no clock read for exchanges whose
    /// writes never stall).
    base: std::sync::OnceLock<tokio::time::Instant>,
    send_timeout: Option<std::time::Duration>,
    /// When the stalled write times out, in nanoseconds after `base`
    /// (0: no write is stalled).
    stall: AtomicU64,
    /// The request is out: the wait for the response has begun.
    written: AtomicBool,
}

impl Phase {
    fn new(send_timeout: Option<std::time::Duration>) -> Phase {
        Phase {
            base: std::sync::OnceLock::new(),
            send_timeout,
            stall: AtomicU64::new(0),
            written: AtomicBool::new(false),
        }
    }

    /// A write found the upstream not taking more: its timeout starts now,
    /// unless it already runs.
    fn stalled(&self) {
        if let Some(t) = self.send_timeout
            && self.stall.load(Ordering::Relaxed) == 0
        {
            let now = tokio::time::Instant::now();
            let base = *self.base.get_or_init(|| now);
            let at = (now + t).duration_since(base);
            let nanos = u64::try_from(at.as_nanos()).unwrap_or(u64::MAX).max(1);
            self.stall.store(nanos, Ordering::Relaxed);
        }
    }

    fn stall_deadline(&self) -> Option<tokio::time::Instant> {
        match self.stall.load(Ordering::Relaxed) {
            0 => None,
            n => self
                .base
                .get()
                .map(|b| *b + std::time::Duration::from_nanos(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_copies_hold_the_head_at_every_size() {
        for n in [0, 1, 100, 256, 257, 1000, 1024, 1025, 5000] {
            let head: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            let b = head_copy(&head);
            assert_eq!(&b[..], &head[..], "{n}");
            if n > 10 {
                assert_eq!(&b.slice(3..10)[..], &head[3..10], "{n}");
            }
        }
    }

    #[test]
    fn chunk_sizes_parse_and_refuse() {
        assert_eq!(chunk_size(b"1a").ok(), Some(26));
        assert_eq!(chunk_size(b"A;ext=1").ok(), Some(10));
        assert_eq!(chunk_size(b"0").ok(), Some(0));
        assert!(chunk_size(b"").is_err());
        assert!(chunk_size(b"-1").is_err());
        assert!(chunk_size(b"1000000000000000").is_err());
    }

    /// What a head of these lines says.
    fn said<'h>(lines: &[(&'h str, &'h str)]) -> Said<'h> {
        let head: Vec<httparse::Header<'h>> = lines
            .iter()
            .map(|&(name, value)| httparse::Header {
                name,
                value: value.as_bytes(),
            })
            .collect();
        Said::of(&head)
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let ok = |lines: &[(&str, &str)]| framing(&said(lines), StatusCode::OK, false).ok();
        let five = [("Content-Length", "5")];
        assert_eq!(ok(&five), Some((Framing::Length(5), true)));
        assert_eq!(
            framing(&said(&five), StatusCode::OK, true).ok(),
            Some((Framing::Done, true))
        );
        assert_eq!(
            framing(&said(&five), StatusCode::NOT_MODIFIED, false).ok(),
            Some((Framing::Done, true))
        );
        // The same length twice, in one line or two, is one length.
        assert_eq!(
            ok(&[("content-length", "5, 5")]),
            Some((Framing::Length(5), true))
        );
        assert_eq!(
            ok(&[("content-length", "5"), ("CONTENT-LENGTH", "5")]),
            Some((Framing::Length(5), true))
        );
        let conflicting = [("Content-Length", "5"), ("content-length", "6")];
        assert!(framing(&said(&conflicting), StatusCode::OK, false).is_err());
        assert!(framing(&said(&[("content-length", "+5")]), StatusCode::OK, false).is_err());
        // Transfer-Encoding wins; with both, the connection is not reused.
        let both = [
            ("Content-Length", "5"),
            ("content-length", "6"),
            ("Transfer-Encoding", "gzip, chunked"),
        ];
        assert_eq!(ok(&both), Some((Framing::Chunked(Chunk::Size), false)));
        assert!(said(&both).chunked_or_close);
        assert_eq!(
            ok(&[
                ("transfer-encoding", "gzip"),
                ("transfer-encoding", "chunked, ")
            ]),
            Some((Framing::Chunked(Chunk::Size), true))
        );
        assert_eq!(
            ok(&[("Transfer-Encoding", "gzip")]),
            Some((Framing::Close, false))
        );
        assert_eq!(ok(&[]), Some((Framing::Close, false)));
    }

    #[test]
    fn the_head_passes_client_headers_filtered_and_the_gateways_own() {
        let client = http::Request::post("/x")
            .header("host", "public.example")
            .header("connection", "keep-alive, x-secret")
            .header("keep-alive", "timeout=5")
            .header("x-secret", "hop")
            .header("x-forwarded-for", "6.6.6.6")
            .header("accept", "a")
            .header("accept", "b")
            .header("x-drop", "1")
            .header("content-length", "3")
            .body(())
            .expect("request")
            .into_parts()
            .0;
        let mut own = http::Request::post("/up/x?q=1")
            .header("host", "10.0.0.1:80")
            .body(())
            .expect("request")
            .into_parts()
            .0;
        let skip = [HeaderName::from_static("x-drop")];
        // The gateway's list: written after the map, and the client's
        // header of the same name is not passed on.
        let list = [(
            HeaderName::from_static("x-forwarded-for"),
            HeaderValue::from_static("6.6.6.6, 127.0.0.1"),
        )];
        let pass = Some(Passthrough {
            headers: &client.headers,
            seen: crate::proxy::headers::Seen::ANY,
            skip: &skip,
            own: &list,
        });
        let mut w = Vec::new();
        assert_eq!(encode_head(&mut w, &own, pass, true, None), Some(3));
        assert_eq!(
            String::from_utf8_lossy(&w),
            "POST /up/x?q=1 HTTP/1.1\r\naccept: a\r\naccept: b\r\nhost: 10.0.0.1:80\r\n\
             x-forwarded-for: 6.6.6.6, 127.0.0.1\r\ncontent-length: 3\r\n\r\n"
        );
        // Without a declared length: the body's size, else chunked.
        own.headers.clear();
        w.clear();
        assert_eq!(encode_head(&mut w, &own, None, true, Some(7)), Some(7));
        assert!(w.ends_with(b"content-length: 7\r\n\r\n"));
        w.clear();
        assert_eq!(encode_head(&mut w, &own, None, true, None), None);
        assert!(w.ends_with(b"transfer-encoding: chunked\r\n\r\n"));
        w.clear();
        assert_eq!(encode_head(&mut w, &own, None, false, None), None);
        assert_eq!(&w[..], b"POST /up/x?q=1 HTTP/1.1\r\n\r\n");
    }

    /// A response with a body in every framing, and the same bytes cut.
    fn responses() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let body = proptest::collection::vec(any::<u8>(), 0..300);
        let chunks = proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..40), 0..6);
        prop_oneof![
            body.clone().prop_map(|b| {
                let mut v = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-A: 1\r\n\r\n", b.len())
                    .into_bytes();
                v.extend_from_slice(&b);
                v
            }),
            (chunks, any::<bool>()).prop_map(|(cs, trailer)| {
                let mut v = b"HTTP/1.1 103 Early\r\nLink: <x>\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
                for c in cs {
                    v.extend_from_slice(format!("{:X};e=1\r\n", c.len()).as_bytes());
                    v.extend_from_slice(&c);
                    v.extend_from_slice(b"\r\n");
                }
                v.extend_from_slice(if trailer { b"0\r\nT: x\r\n\r\n" } else { b"0\r\n\r\n" });
                v
            }),
            body.clone().prop_map(|b| {
                let mut v = b"HTTP/1.0 200 OK\r\n\r\n".to_vec();
                v.extend_from_slice(&b);
                v
            }),
            proptest::collection::vec(any::<u8>(), 0..400),
            (body, 0usize..120).prop_map(|(b, cut)| {
                let mut v = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", b.len() + 1)
                    .into_bytes();
                v.extend_from_slice(&b);
                v.truncate(v.len().saturating_sub(cut));
                v
            }),
        ]
    }

    #[test]
    fn headers_added_behind_lines_are_what_the_map_would_hold() {
        use crate::proxy::headers::Added;
        // Names that share a bit of `our_names` with others (a replacing
        // add then looks through the lines) and some that do not.
        let names: Vec<HeaderName> = [
            "x-request-id",
            "ratelimit-limit",
            "ratelimit-reset",
            "ratelimit-remaining",
            "x-gateway",
            "set-cookie",
            "a",
            "ab",
            "x-request-ie",
            "x-bw",
            "r-ai",
        ]
        .iter()
        .map(|n| HeaderName::from_static(n))
        .collect();
        // What the pipeline replaces rather than adds to: the names the
        // filter drops from the upstream's lines.
        let own = [
            "x-request-id",
            "ratelimit-limit",
            "ratelimit-reset",
            "a",
            "x-request-ie",
            "x-bw",
            "r-ai",
        ];
        assert_eq!(name_bit(b"x-bw"), name_bit(b"x-request-id"));
        assert_eq!(name_bit(b"r-ai"), name_bit(b"ratelimit-limit"));
        let head = "HTTP/1.1 200 OK\r\nServer: up\r\nSet-Cookie: u=1\r\n\
                    X-Request-Id: up\r\nContent-Length: 0\r\n\r\n";
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..500 {
            let mut d = Decoder::default();
            d.buf.extend_from_slice(head.as_bytes());
            let got = d
                .parse_head(
                    false,
                    Answer {
                        room: 0,
                        raw: Some(RawFilter {
                            hide: &[],
                            own: &own,
                        }),
                    },
                )
                .expect("a valid head")
                .expect("a whole head");
            let mut raw = got.raw.expect("lines");
            let mut map = HeaderMap::new();
            map.append("server", HeaderValue::from_static("up"));
            map.append("set-cookie", HeaderValue::from_static("u=1"));
            map.append("content-length", HeaderValue::from_static("0"));
            for _ in 0..(next() % 8) {
                let name = &names[(next() % names.len() as u64) as usize];
                let n = next() % 1000;
                let v = HeaderValue::from(n);
                let replaces = own.contains(&name.as_str());
                for out in [&mut Added::Map(&mut map), &mut Added::Lines(&mut raw)] {
                    match n % 3 {
                        _ if !replaces => out.append(name, v.clone()),
                        0 => out.append(name, v.clone()),
                        1 => out.insert(name, &v),
                        _ => out.insert_number(name, n, HeaderValue::from),
                    }
                }
            }
            let mut resp = http::Response::new(());
            raw.restore(&mut resp);
            for name in &names {
                let all = |h: &HeaderMap| h.get_all(name).iter().cloned().collect::<Vec<_>>();
                assert_eq!(all(resp.headers()), all(&map), "{name}");
            }
            assert_eq!(resp.headers().len(), map.len());
        }
    }

    #[test]
    fn passed_through_lines_drop_what_the_map_loses() {
        let head = "HTTP/1.1 200 OK\r\n\
            Server: up\r\n\
            Connection: keep-alive, X-Private\r\n\
            x-private: 1\r\n\
            Keep-Alive: timeout=5\r\n\
            Content-Length: 3\r\n\
            X-Request-Id: from-upstream\r\n\
            Secret: s\r\n\
            RateLimit-Limit: 9\r\n\
            Date: Sun, 29 Nov 2026 09:00:00 GMT\r\n\
            Set-Cookie: a=1\r\n\
            Set-Cookie: b=2\r\n\r\nabc";
        let mut d = Decoder::default();
        d.buf.extend_from_slice(head.as_bytes());
        let hide = ["secret".to_string()];
        let own = ["x-request-id", "ratelimit-limit"];
        let got = d
            .parse_head(
                false,
                Answer {
                    room: 2,
                    raw: Some(RawFilter {
                        hide: &hide,
                        own: &own,
                    }),
                },
            )
            .expect("a valid head")
            .expect("a whole head");
        let raw = got.raw.as_ref().expect("lines");
        assert_eq!(
            String::from_utf8_lossy(&raw.lines),
            "Server: up\r\nContent-Length: 3\r\nDate: Sun, 29 Nov 2026 09:00:00 GMT\r\n\
             Set-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
        );
        assert_eq!((raw.length, raw.date), (Some(3), true));
        assert!(got.parts.headers.is_empty());
        assert_eq!(got.body.framing, Framing::Length(3));
        assert!(got.body.keep_alive);
        // Back into a map: the upstream's lines first, then what the
        // pipeline added, same names kept together in order.
        let mut resp = http::Response::from_parts(got.parts, ());
        resp.headers_mut()
            .insert("x-request-id", HeaderValue::from_static("mine"));
        resp.headers_mut()
            .append("set-cookie", HeaderValue::from_static("c=3"));
        got.raw.expect("lines").restore(&mut resp);
        let h = resp.headers();
        assert_eq!(h.get_all("set-cookie").iter().count(), 3);
        assert_eq!(h.get_all("x-request-id").iter().count(), 1);
        assert_eq!(
            h.get("x-request-id").map(HeaderValue::as_bytes),
            Some(&b"mine"[..])
        );
        assert_eq!(h.len(), 7);
        // With Transfer-Encoding the length is not passed on.
        let chunked = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\
                       Transfer-Encoding: chunked\r\nX: y\r\n\r\n";
        let [map, raw] = head_both_ways(chunked.as_bytes(), false, &[], &[]);
        assert_eq!(map, raw);
        assert_eq!(
            raw.expect("parsed").0,
            vec![("x".to_string(), b"y".to_vec())]
        );
    }

    /// Heads of names and values from a small pool (framing, hop-by-hop,
    /// `Connection` lists, the pipeline's own names, odd case and
    /// whitespace, non-ASCII bytes), in any order.
    fn heads() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let name = prop_oneof![
            Just("Content-Length"),
            Just("content-length"),
            Just("Transfer-Encoding"),
            Just("Connection"),
            Just("Keep-Alive"),
            Just("TE"),
            Just("Upgrade"),
            Just("Proxy-Authenticate"),
            Just("X-Listed"),
            Just("x-listed"),
            Just("X-Request-Id"),
            Just("Secret"),
            Just("Date"),
            Just("Set-Cookie"),
            Just("X-A"),
        ];
        let value = prop_oneof![
            Just("3"),
            Just("4"),
            Just("3, 3"),
            Just(" 3 "),
            Just("x3"),
            Just("chunked"),
            Just("gzip"),
            Just("gzip, chunked"),
            Just("close"),
            Just("keep-alive, X-Listed"),
            Just("x-listed , Secret"),
            Just(""),
            Just("caf\u{e9}"),
            Just("a\tb"),
        ];
        let version = prop_oneof![Just("1.1"), Just("1.0")];
        (version, proptest::collection::vec((name, value), 0..8)).prop_map(|(v, hs)| {
            let mut out = format!("HTTP/{v} 200 OK\r\n");
            for (n, val) in hs {
                out.push_str(&format!("{n}: {val}\r\n"));
            }
            out.push_str("\r\nabc");
            out.into_bytes()
        })
    }

    proptest::proptest! {
        /// Header values of a response parsed into a map are taken as
        /// httparse accepted them (`headers::parsed_value`): each is one
        /// `HeaderValue`'s own check accepts.
        #[test]
        fn parsed_values_are_valid_values(values in crate::proxy::headers::random_values()) {
            use crate::proxy::headers::{head_with_values, invalid_value};
            let input = head_with_values(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n", &values);
            let mut d = Decoder::default();
            d.buf.extend_from_slice(&input);
            if let Ok(Some(h)) = d.parse_head(false, Answer::default()) {
                proptest::prop_assert_eq!(invalid_value(&h.parts.headers), None);
            }
        }

        /// However the bytes arrive, the decoded response (or the error)
        /// is the same, and nothing panics.
        #[test]
        fn decoding_does_not_depend_on_how_the_bytes_arrive(
            input in responses(),
            pieces in proptest::collection::vec(0usize..50, 1..8),
            head in proptest::bool::ANY,
        ) {
            let whole = decode(&input, &[], head);
            proptest::prop_assert_eq!(&decode(&input, &pieces, head), &whole);
            proptest::prop_assert_eq!(&decode(&input, &[1], head), &whole);
        }

        /// Passed through or parsed into the map, a head gives the client
        /// the same headers, the same framing and the same keep-alive (or
        /// the same error).
        #[test]
        fn passing_lines_through_keeps_what_the_map_keeps(
            input in heads(),
            head in proptest::bool::ANY,
        ) {
            let hide = ["secret".to_string()];
            let [map, raw] = head_both_ways(&input, head, &hide, &["x-request-id"]);
            proptest::prop_assert_eq!(map, raw);
            proptest::prop_assert!(pass_through_matches(&input, head).is_ok());
        }
    }

    #[test]
    fn decoded_responses_in_every_framing() {
        let r = decode(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            &[7],
            false,
        );
        assert_eq!(
            r,
            Ok((
                200,
                vec![("transfer-encoding".into(), b"chunked".to_vec())],
                b"abc".to_vec()
            ))
        );
        let r = decode(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", &[], true);
        assert!(matches!(r, Ok((200, _, ref b)) if b.is_empty()), "{r:?}");
        let r = decode(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab",
            &[],
            false,
        );
        assert_eq!(r, Err(ProtoError::Incomplete.to_string()));
        assert_eq!(decode(b"", &[], false), Err(ProtoError::Closed.to_string()));
        let mut big = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        big.resize(MAX_HEAD + 10, b'a');
        big.extend_from_slice(b"\r\n\r\n");
        assert_eq!(
            decode(&big, &[], false),
            Err(ProtoError::HeadTooLarge.to_string())
        );
        assert_eq!(
            decode(&big, &[1000], false),
            Err(ProtoError::HeadTooLarge.to_string())
        );
    }

    #[test]
    fn keep_alive_by_version_and_connection() {
        assert!(keeps_alive(&said(&[]), Version::HTTP_11));
        assert!(!keeps_alive(&said(&[]), Version::HTTP_10));
        let ka = said(&[("Connection", "Keep-Alive")]);
        assert!(keeps_alive(&ka, Version::HTTP_10));
        assert!(!keeps_alive(
            &said(&[("connection", "x, close")]),
            Version::HTTP_11
        ));
    }
}
