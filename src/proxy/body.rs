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
        incoming: hyper::body::Incoming,
        limit: u64,
        timeout: Duration,
    ) -> Result<ClientBody, BodyError> {
        let mut rest: Body = if limit > 0 {
            http_body_util::Limited::new(incoming, limit as usize).boxed()
        } else {
            incoming.map_err(|e| Box::new(e) as BoxError).boxed()
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
        BodyExt::boxed(self)
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
        let mut h = self.rest.size_hint();
        if let Some(f) = &self.first {
            let n = f.data_ref().map(|d| d.len() as u64).unwrap_or(0);
            // Upper first: `set_lower` asserts lower <= upper.
            let lower = h.lower().saturating_add(n);
            if let Some(u) = h.upper() {
                h.set_upper(u.saturating_add(n));
            }
            h.set_lower(lower);
        }
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
