//! The client's request body on its way upstream: size-limited
//! (`client_max_body_size`), with `client_body_timeout` between reads, and
//! its first frame read before anything is sent upstream so that a broken
//! body (a bad chunk size, too large) is answered 400/413 without the
//! upstream ever seeing the request.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::time::Sleep;

use crate::proxy::forward::{Body, BoxError};

/// A body of any kind behind one pointer, as `http_body_util`'s `BoxBody`;
/// one already in a box becomes one without a second box ([`Boxed::from_box`]:
/// an upstream's response body is boxed where it is made, so that the
/// response moves through the proxy at a pointer's size).
pub struct Boxed(Pin<Box<dyn HttpBody<Data = Bytes, Error = BoxError> + Send + Sync>>);

impl Boxed {
    pub fn new<B>(body: B) -> Boxed
    where
        B: HttpBody<Data = Bytes, Error = BoxError> + Send + Sync + 'static,
    {
        Boxed(Box::pin(body))
    }

    /// The box becomes the body's (no allocation, no copy).
    pub fn from_box<B>(body: Box<B>) -> Boxed
    where
        B: HttpBody<Data = Bytes, Error = BoxError> + Send + Sync + 'static,
    {
        Boxed(Box::into_pin(body))
    }
}

impl std::fmt::Debug for Boxed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Boxed").finish_non_exhaustive()
    }
}

impl HttpBody for Boxed {
    type Data = Bytes;
    type Error = BoxError;

    #[inline]
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.as_mut().poll_frame(cx)
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}

/// Why reading the client body failed.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body too large")]
    TooLarge,
    #[error("client body timeout")]
    Timeout,
    #[error("malformed request body: {0}")]
    Malformed(String),
}

fn classify(e: BoxError) -> BodyError {
    if e.downcast_ref::<http_body_util::LengthLimitError>()
        .is_some()
    {
        BodyError::TooLarge
    } else if e.downcast_ref::<BodyError>().is_some() {
        match e.downcast::<BodyError>() {
            Ok(b) => *b,
            Err(e) => BodyError::Malformed(e.to_string()),
        }
    } else {
        BodyError::Malformed(e.to_string())
    }
}

/// A client request's body as it arrives: from tollgate's own HTTP/1
/// connection ([`crate::server::h1`]) or from hyper's (HTTP/2, h2c).
pub enum RequestBody {
    Empty,
    H1(crate::server::h1::H1Body),
    Hyper(hyper::body::Incoming),
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::H1(b) => Pin::new(b).poll_frame(cx),
            RequestBody::Hyper(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|r| r.map(|r| r.map_err(|e| Box::new(e) as BoxError))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::H1(b) => b.is_end_stream(),
            RequestBody::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::H1(b) => b.size_hint(),
            RequestBody::Hyper(b) => b.size_hint(),
        }
    }
}

/// A body whose first frame was already read, with a timeout per read.
pub struct ClientBody {
    first: Option<Frame<Bytes>>,
    rest: Body,
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl ClientBody {
    /// Wrap the incoming body and read its first frame (within `timeout`).
    pub async fn start(
        incoming: RequestBody,
        limit: u64,
        timeout: Duration,
    ) -> Result<ClientBody, BodyError> {
        let mut rest: Body = if limit > 0 {
            Body::new(http_body_util::Limited::new(incoming, limit as usize))
        } else {
            Body::new(incoming)
        };
        let first = match tokio::time::timeout(timeout, rest.frame()).await {
            Err(_) => return Err(BodyError::Timeout),
            Ok(None) => None,
            Ok(Some(Ok(f))) => Some(f),
            Ok(Some(Err(e))) => return Err(classify(e)),
        };
        Ok(ClientBody {
            first,
            rest,
            timeout,
            sleep: None,
        })
    }

    pub fn boxed(self) -> Body {
        Body::new(self)
    }
}

impl HttpBody for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(f) = self.first.take() {
            return Poll::Ready(Some(Ok(f)));
        }
        match Pin::new(&mut self.rest).poll_frame(cx) {
            Poll::Ready(r) => {
                self.sleep = None;
                Poll::Ready(r.map(|r| r.map_err(|e| Box::new(classify(e)) as BoxError)))
            }
            Poll::Pending => {
                let timeout = self.timeout;
                let sleep = self
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyError::Timeout)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self.rest.size_hint();
        let n = self
            .first
            .as_ref()
            .and_then(|f| f.data_ref())
            .map(|d| d.len() as u64)
            .unwrap_or(0);
        // Upper before lower: `set_lower` above the current upper panics.
        let mut h = SizeHint::new();
        if let Some(u) = rest.upper() {
            h.set_upper(u.saturating_add(n));
        }
        h.set_lower(rest.lower().saturating_add(n));
        h
    }
}

/// The body error behind an upstream request failure, if it was the
/// client's body that failed.
pub fn body_error_in<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a BodyError> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(x) = cur {
        if let Some(b) = x.downcast_ref::<BodyError>() {
            return Some(b);
        }
        cur = x.source();
    }
    None
}
