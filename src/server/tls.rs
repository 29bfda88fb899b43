//! TLS on `listen ... ssl` addresses: the handshake, done in the
//! connection's own task (never in the accept loop, so one slow client
//! cannot stall the others), bounded by `client_header_timeout`.
//!
//! Each listener holds its rustls config in an [`ArcSwapOption`]; a reload
//! stores the config compiled with the new snapshot (certificates re-read),
//! and the next handshake uses it without the listener being restarted.
//! `None` means a plain listener.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use rustls::ServerConfig;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// What ALPN settled on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    H2,
    /// `http/1.1`, or nothing negotiated.
    Http1,
}

/// The per-listener TLS config, swapped on reload.
pub type ListenerTls = Arc<ArcSwapOption<ServerConfig>>;

pub fn listener_tls(initial: Option<Arc<ServerConfig>>) -> ListenerTls {
    Arc::new(ArcSwapOption::new(initial))
}

/// Why a handshake did not complete (logged at debug: scanners and
/// health probes do this all day).
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("TLS handshake timed out")]
    Timeout,
    #[error("TLS handshake failed: {0}")]
    Failed(#[from] std::io::Error),
}

/// Accept TLS on a fresh connection.
pub async fn handshake(
    stream: TcpStream,
    config: Arc<ServerConfig>,
    timeout: Duration,
) -> Result<(TlsStream<TcpStream>, Alpn), HandshakeError> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let tls = tokio::time::timeout(timeout, acceptor.accept(stream))
        .await
        .map_err(|_| HandshakeError::Timeout)??;
    let alpn = match tls.get_ref().1.alpn_protocol() {
        Some(b"h2") => Alpn::H2,
        _ => Alpn::Http1,
    };
    Ok((tls, alpn))
}
