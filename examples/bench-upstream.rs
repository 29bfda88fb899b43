//! A small, fast upstream for `bench/run`: prebuilt bodies, keep-alive,
//! one current-thread runtime (pin it with `taskset`).
//!
//! `cargo run --release --example bench-upstream -- 127.0.0.1:9000`
//! serves `/small` (3 bytes), `/1k`, `/64k`, and anything else as `/small`.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9000".to_string());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        let small = Bytes::from_static(b"ok\n");
        let k1 = Bytes::from(vec![b'x'; 1024]);
        let k64 = Bytes::from(vec![b'y'; 64 * 1024]);
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let (small, k1, k64) = (small.clone(), k1.clone(), k64.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let body = match req.uri().path() {
                        "/1k" => k1.clone(),
                        "/64k" => k64.clone(),
                        _ => small.clone(),
                    };
                    async move {
                        let mut r = Response::new(Full::new(body));
                        r.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("text/plain"),
                        );
                        r.headers_mut().insert(
                            http::header::CACHE_CONTROL,
                            http::HeaderValue::from_static("max-age=60"),
                        );
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}
