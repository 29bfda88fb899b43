//! `tollgate demo`: the seed article's users / orders / products services on
//! loopback, and the gateway in front of them with `examples/demo.conf`.
//!
//! The services are tiny hyper servers with canned JSON, so that a newcomer
//! sees routing, path rewriting and aggregation work with one command.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

/// The demo config, as shipped in `examples/demo.conf`.
pub const DEMO_CONF: &str = include_str!("../examples/demo.conf");

fn json(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// One demo service: `kind` is `users`, `orders` or `products`.
pub fn respond(kind: &str, path: &str) -> Response<Full<Bytes>> {
    let rest = path.strip_prefix('/').unwrap_or(path);
    let mut parts = rest.splitn(2, '/');
    let collection = parts.next().unwrap_or("");
    let id: Option<u64> = parts
        .next()
        .and_then(|s| s.trim_end_matches('/').parse().ok());
    if collection != kind {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not found", "path": path}),
        );
    }
    let body = match (kind, id) {
        ("users", Some(id)) => {
            serde_json::json!({"id": id, "name": format!("User {id}"), "email": format!("user{id}@example.com")})
        }
        ("orders", Some(id)) => {
            serde_json::json!({"id": id, "userId": 7, "productId": 3, "quantity": 2, "status": "shipped"})
        }
        ("products", Some(id)) => {
            serde_json::json!({"id": id, "name": format!("Product {id}"), "price": 19.99})
        }
        (k, None) => serde_json::json!({"service": k, "items": [1, 2, 3]}),
        _ => serde_json::json!({}),
    };
    json(StatusCode::OK, body)
}

/// Serve one demo service on `addr` until the process ends.
pub async fn service(kind: &'static str, addr: SocketAddr) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| async move {
                    Ok::<_, Infallible>(respond(kind, req.uri().path()))
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(())
}

/// The secret of `auth_jwt demo_users` in `examples/demo.conf`.
pub const DEMO_SECRET: &str = "demo-secret-change-me-demo-secret-change-me";

/// An HS256 token for the demo (`sub` = 7, valid for a day).
pub fn demo_token() -> String {
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 86_400;
    let head = b64(br#"{"alg":"HS256","typ":"JWT"}"#);
    let body = b64(format!(r#"{{"sub":"7","name":"Demo User","exp":{exp}}}"#).as_bytes());
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, DEMO_SECRET.as_bytes());
    let sig = aws_lc_rs::hmac::sign(&key, format!("{head}.{body}").as_bytes());
    format!("{head}.{body}.{}", b64(sig.as_ref()))
}

/// Start the services and the gateway. Returns the exit code.
pub fn run() -> Result<i32, crate::server::ServeError> {
    let dir = std::env::temp_dir().join(format!("tollgate-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(crate::server::ServeError::Runtime)?;
    let conf = dir.join("demo.conf");
    std::fs::write(&conf, DEMO_CONF).map_err(crate::server::ServeError::Runtime)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("demo-services")
        .enable_all()
        .build()
        .map_err(crate::server::ServeError::Runtime)?;
    for (kind, port) in [("users", 3001u16), ("orders", 3002), ("products", 3003)] {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        rt.block_on(service(kind, addr))
            .map_err(|source| crate::server::ServeError::Bind { addr, source })?;
    }
    let token = demo_token();
    eprintln!(
        "tollgate demo: users, orders and products services on 127.0.0.1:3001-3003\n\
         gateway on http://127.0.0.1:8000 (config: {conf}), admin on http://127.0.0.1:9901\n\n\
         try:\n  \
           curl -i http://127.0.0.1:8000/api/users/7                 # routed, path rewritten, wrapped\n  \
           curl -i http://127.0.0.1:8000/api/orders/42               # 401: no token\n  \
           curl -i -H 'Authorization: Bearer {token}' http://127.0.0.1:8000/api/orders/42\n  \
           for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{{http_code}} ' http://127.0.0.1:8000/api/products/3; done; echo   # cached, then 429\n  \
           curl -i http://127.0.0.1:8000/api/order-details/42        # three services, one JSON\n  \
           curl -s http://127.0.0.1:9901/metrics | grep gateway_requests\n  \
           tollgate routes -c {conf}\n\n\
         Ctrl-C stops it.\n",
        conf = conf.display()
    );
    let code = crate::server::run(&conf);
    drop(rt);
    let _ = std::fs::remove_dir_all(&dir);
    code
}
