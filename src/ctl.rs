//! Talking to a running instance through its admin listener
//! (`tollgate reload`). Blocking and tiny on purpose: one HTTP/1.1 request
//! over a std `TcpStream`, no runtime.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// What the running instance answered to `POST /reload`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadReply {
    /// The new config serves from this generation on.
    Applied { generation: u64 },
    /// The instance refused it and keeps serving its previous config.
    Rejected {
        generation: Option<u64>,
        reason: String,
    },
}

/// Why the instance could not be asked (or gave no usable answer).
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("cannot connect to the admin listener at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("talking to the admin listener at {addr}: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("unexpected answer from the admin listener at {addr}: {what}")]
    Answer { addr: SocketAddr, what: String },
}

/// Where to connect for a listen address: a wildcard bind is reached on
/// loopback.
pub fn connect_addr(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), listen.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), listen.port())
        }
        _ => listen,
    }
}

/// `POST /reload` to the admin listener bound at `listen`, waiting up to
/// `timeout` for the outcome (the instance itself gives up after 30s).
pub fn request_reload(listen: SocketAddr, timeout: Duration) -> Result<ReloadReply, CtlError> {
    let addr = connect_addr(listen);
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|source| CtlError::Connect { addr, source })?;
    let io = |source| CtlError::Io { addr, source };
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    s.write_all(format!("POST /reload HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes())
        .map_err(io)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(io)?;
    parse_reply(&raw).map_err(|what| CtlError::Answer { addr, what })
}

fn parse_reply(raw: &[u8]) -> Result<ReloadReply, String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP response")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no status line")?;
    let json: serde_json::Value = serde_json::from_str(body.trim())
        .map_err(|_| format!("status {status}, body `{}`", body.trim()))?;
    let generation = json.get("generation").and_then(serde_json::Value::as_u64);
    match (
        status,
        json.get("result").and_then(serde_json::Value::as_str),
    ) {
        (200, Some("applied")) => Ok(ReloadReply::Applied {
            generation: generation.ok_or("no generation")?,
        }),
        (422, Some("rejected")) => Ok(ReloadReply::Rejected {
            generation,
            reason: json
                .get("reason")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("")
                .to_string(),
        }),
        _ => Err(
            match json.get("error").and_then(serde_json::Value::as_str) {
                Some(e) => format!("status {status}: {e}"),
                None => format!("status {status}, body `{}`", body.trim()),
            },
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 36\r\n\r\n{\"result\":\"applied\",\"generation\":4}";
        assert_eq!(parse_reply(ok), Ok(ReloadReply::Applied { generation: 4 }));
        let no = b"HTTP/1.1 422 Unprocessable Entity\r\n\r\n{\"result\":\"rejected\",\"generation\":5,\"reason\":\"bad\"}";
        assert_eq!(
            parse_reply(no),
            Ok(ReloadReply::Rejected {
                generation: Some(5),
                reason: "bad".into()
            })
        );
        let busy = b"HTTP/1.1 503 Service Unavailable\r\n\r\n{\"error\":\"shutting down\"}";
        assert_eq!(parse_reply(busy), Err("status 503: shutting down".into()));
        assert!(parse_reply(b"garbage").is_err());
    }

    #[test]
    fn wildcard_binds_are_reached_on_loopback() {
        assert_eq!(
            connect_addr("0.0.0.0:9901".parse().expect("addr")),
            "127.0.0.1:9901".parse().expect("addr")
        );
        assert_eq!(
            connect_addr("[::]:9901".parse().expect("addr")),
            "[::1]:9901".parse().expect("addr")
        );
        assert_eq!(
            connect_addr("10.1.2.3:9901".parse().expect("addr")),
            "10.1.2.3:9901".parse().expect("addr")
        );
    }
}
