//! TLS end to end, with certificates made at test time (rcgen): HTTPS
//! listeners, SNI among the servers of one address, ALPN h2, old protocol
//! versions refused, certificates re-read on reload, and `https://`
//! upstreams verified against `proxy_ssl_trusted_certificate`.
//!
//! Self-contained (the real binary, real sockets on 127.0.0.1): the shared
//! harness in `tests/util` is grown separately.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};

// ------------------------------------------------------------------ PKI

/// A test CA that issues leaf certificates into a directory.
struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let ca =
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("ca");
        std::fs::write(dir.join(format!("{name}.pem")), ca.pem()).expect("write ca");
        Pki {
            dir: dir.to_path_buf(),
            ca,
        }
    }

    fn ca_der(&self) -> CertificateDer<'static> {
        self.ca.der().clone()
    }

    /// Issue a leaf for `names` as `<file>.pem` / `<file>.key`; its DER.
    fn issue(&self, file: &str, names: &[&str]) -> CertificateDer<'static> {
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        params.distinguished_name.push(DnType::CommonName, names[0]);
        let cert = params.signed_by(&key, &self.ca).expect("sign");
        std::fs::write(self.dir.join(format!("{file}.pem")), cert.pem()).expect("write cert");
        std::fs::write(self.dir.join(format!("{file}.key")), key.serialize_pem())
            .expect("write key");
        cert.der().clone()
    }
}

// ------------------------------------------------------------------ gateway

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

struct Gw {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    admin: u16,
}

impl Gw {
    /// Write `conf` (plus an admin listener) into `dir` and serve it.
    fn start(dir: &Path, conf: &str, port: u16) -> Gw {
        let admin = free_port();
        let path = dir.join("gateway.conf");
        std::fs::write(
            &path,
            format!("admin {{ listen 127.0.0.1:{admin}; }}\naccess_log off;\n{conf}"),
        )
        .expect("write config");
        let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["run", "-c"])
            .arg(&path)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn tollgate");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                l.lock().expect("log").push(line);
            }
        });
        let gw = Gw { child, log, admin };
        let end = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", port)).is_err()
            || TcpStream::connect(("127.0.0.1", admin)).is_err()
        {
            assert!(
                Instant::now() < end,
                "gateway did not start:\n{}",
                gw.log.lock().expect("log").join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        gw
    }

    /// `POST /reload` on the admin listener: (status, body).
    fn reload(&self) -> (u16, String) {
        let mut s = TcpStream::connect(("127.0.0.1", self.admin)).expect("admin");
        s.set_read_timeout(Some(Duration::from_secs(35)))
            .expect("timeout");
        s.write_all(b"POST /reload HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").expect("send");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "gateway log:\n{}",
                self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------ client

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn client_config(ca: &CertificateDer<'static>, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).expect("root");
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(c)
}

/// What one HTTPS exchange saw.
#[derive(Debug)]
struct Seen {
    status: u16,
    body: String,
    version: http::Version,
    alpn: Option<Vec<u8>>,
    cert: CertificateDer<'static>,
}

/// Connect with `name` as SNI (an IP name sends none), send `GET path`
/// over whatever ALPN chose, and report what came back.
async fn https_get(
    port: u16,
    name: &str,
    cfg: Arc<rustls::ClientConfig>,
    path: &str,
) -> Result<Seen, String> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let server_name = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(server_name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (_, conn) = tls.get_ref();
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    let cert = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .cloned()
        .ok_or("no peer certificate")?;
    let req = http::Request::get(path)
        .header(http::header::HOST, name)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let io = TokioIo::new(tls);
    let resp = if alpn.as_deref() == Some(b"h2") {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        // h2 carries the authority in the URI, not a Host header.
        let mut req = req;
        req.headers_mut().remove(http::header::HOST);
        *req.uri_mut() = format!("https://{name}{path}")
            .parse()
            .map_err(|e: http::uri::InvalidUri| e.to_string())?;
        send.send_request(req).await.map_err(|e| e.to_string())?
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        send.send_request(req).await.map_err(|e| e.to_string())?
    };
    let status = resp.status().as_u16();
    let version = resp.version();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(Seen {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
        version,
        alpn,
        cert,
    })
}

// ------------------------------------------------------------------ tests

#[test]
fn https_listener_serves_with_https_scheme() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "ca");
    let leaf = pki.issue("site", &["site.test"]);
    let port = free_port();
    let conf = format!(
        "server {{ listen 127.0.0.1:{port} ssl; server_name site.test; ssl_certificate site.pem; ssl_certificate_key site.key;\n\
         location / {{ return 200 \"$scheme\"; }} }}\n"
    );
    let _gw = Gw::start(dir.path(), &conf, port);
    let seen = rt()
        .block_on(https_get(
            port,
            "site.test",
            client_config(&pki.ca_der(), &[b"http/1.1"]),
            "/",
        ))
        .expect("https get");
    assert_eq!(seen.status, 200);
    assert_eq!(seen.body, "https");
    assert_eq!(seen.cert, leaf);
    assert_eq!(seen.version, http::Version::HTTP_11);
    // Plain HTTP on the TLS port gets no HTTP answer.
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: site.test\r\n\r\n");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(
        !buf.starts_with(b"HTTP/"),
        "plain HTTP was answered on a TLS listener"
    );
}

#[test]
fn sni_picks_the_certificate_of_the_matching_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "ca");
    let a = pki.issue("a", &["a.test"]);
    // The default server's certificate also names 127.0.0.1, so a client
    // that sends no SNI (connecting by IP) can verify it.
    let b = pki.issue("b", &["*.b.test", "127.0.0.1"]);
    let port = free_port();
    let conf = format!(
        "server {{ listen 127.0.0.1:{port} ssl; server_name a.test; ssl_certificate a.pem; ssl_certificate_key a.key;\n\
             location / {{ return 200 \"a\"; }} }}\n\
         server {{ listen 127.0.0.1:{port} ssl default_server; server_name *.b.test; ssl_certificate b.pem; ssl_certificate_key b.key;\n\
             location / {{ return 200 \"b\"; }} }}\n"
    );
    let _gw = Gw::start(dir.path(), &conf, port);
    let rt = rt();
    let cfg = client_config(&pki.ca_der(), &[]);
    let seen = rt
        .block_on(https_get(port, "a.test", cfg.clone(), "/"))
        .expect("a.test");
    assert_eq!((seen.cert == a, seen.body.as_str()), (true, "a"));
    let seen = rt
        .block_on(https_get(port, "x.b.test", cfg.clone(), "/"))
        .expect("x.b.test");
    assert_eq!((seen.cert == b, seen.body.as_str()), (true, "b"));
    // No SNI: the default_server's certificate.
    let seen = rt
        .block_on(https_get(port, "127.0.0.1", cfg.clone(), "/"))
        .expect("no sni");
    assert!(
        seen.cert == b,
        "no SNI should get the default server's certificate"
    );
    // An unknown name gets the default certificate too, which the client
    // then refuses: the name is not on it.
    let err = rt
        .block_on(https_get(port, "other.test", cfg, "/"))
        .expect_err("wrong name must not verify");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
}

#[test]
fn alpn_offers_h2_only_where_a_server_has_http2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "ca");
    pki.issue("site", &["site.test"]);
    let (h2_port, h1_port) = (free_port(), free_port());
    let conf = format!(
        "server {{ listen 127.0.0.1:{h2_port} ssl http2; listen 127.0.0.1:{h1_port} ssl; server_name site.test;\n\
         ssl_certificate site.pem; ssl_certificate_key site.key; location / {{ return 200 \"ok\"; }} }}\n"
    );
    let _gw = Gw::start(dir.path(), &conf, h2_port);
    let rt = rt();
    let both: &[&[u8]] = &[b"h2", b"http/1.1"];
    let seen = rt
        .block_on(https_get(
            h2_port,
            "site.test",
            client_config(&pki.ca_der(), both),
            "/",
        ))
        .expect("h2");
    assert_eq!(seen.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(
        (seen.status, seen.version, seen.body.as_str()),
        (200, http::Version::HTTP_2, "ok")
    );
    let seen = rt
        .block_on(https_get(
            h1_port,
            "site.test",
            client_config(&pki.ca_der(), both),
            "/",
        ))
        .expect("h1");
    assert_eq!(seen.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!((seen.status, seen.version), (200, http::Version::HTTP_11));
}

/// A ClientHello offering only `version` (no supported_versions
/// extension), with ECDHE-ECDSA suites and the extensions they need.
fn client_hello(version: [u8; 2], sni: &str) -> Vec<u8> {
    let mut ext = Vec::new();
    let mut push_ext = |ty: u16, data: &[u8]| {
        ext.extend_from_slice(&ty.to_be_bytes());
        ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
        ext.extend_from_slice(data);
    };
    let mut sni_ext = Vec::new();
    sni_ext.extend_from_slice(&((sni.len() + 3) as u16).to_be_bytes());
    sni_ext.push(0);
    sni_ext.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    sni_ext.extend_from_slice(sni.as_bytes());
    push_ext(0x0000, &sni_ext);
    push_ext(0x000a, &[0x00, 0x04, 0x00, 0x1d, 0x00, 0x17]); // groups: x25519, secp256r1
    push_ext(0x000b, &[0x01, 0x00]); // point formats: uncompressed
    push_ext(0x000d, &[0x00, 0x04, 0x04, 0x03, 0x08, 0x04]); // ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256
    let mut body = Vec::new();
    body.extend_from_slice(&version);
    body.extend_from_slice(&[7u8; 32]);
    body.push(0); // session id
    body.extend_from_slice(&[0x00, 0x06, 0xc0, 0x2b, 0xc0, 0x09, 0xc0, 0x0a]); // ECDHE-ECDSA AES128-GCM, AES128-CBC, AES256-CBC
    body.extend_from_slice(&[0x01, 0x00]); // compression: null
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![0x01, 0, 0, 0];
    hs[1..4].copy_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

/// The first bytes the server answers a raw ClientHello with.
fn first_reply(port: u16, hello: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(hello).expect("hello");
    let mut buf = [0u8; 7];
    let mut got = Vec::new();
    while got.len() < 7 {
        match s.read(&mut buf[got.len()..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[got.len()..got.len() + n]),
        }
    }
    got
}

#[test]
fn tls_1_1_is_refused_and_1_2_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "ca");
    pki.issue("site", &["site.test"]);
    let port = free_port();
    let conf = format!(
        "server {{ listen 127.0.0.1:{port} ssl; server_name site.test; ssl_certificate site.pem; ssl_certificate_key site.key;\n\
         location / {{ return 200 \"ok\"; }} }}\n"
    );
    let _gw = Gw::start(dir.path(), &conf, port);
    // The control: the same hello as TLS 1.2 gets a ServerHello.
    let ok = first_reply(port, &client_hello([0x03, 0x03], "site.test"));
    assert_eq!(
        ok.first(),
        Some(&0x16),
        "TLS 1.2 hello should get a handshake record, got {ok:02x?}"
    );
    // TLS 1.1 gets a fatal protocol_version alert (or a closed connection).
    let refused = first_reply(port, &client_hello([0x03, 0x02], "site.test"));
    assert_ne!(
        refused.first(),
        Some(&0x16),
        "TLS 1.1 must not get a ServerHello: {refused:02x?}"
    );
    if !refused.is_empty() {
        assert_eq!(refused[0], 0x15, "expected an alert record: {refused:02x?}");
        assert_eq!(
            refused.get(6),
            Some(&70),
            "expected protocol_version: {refused:02x?}"
        );
    }
}

#[test]
fn reload_picks_up_a_new_certificate_and_keeps_it_when_the_next_is_bad() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "ca");
    let first = pki.issue("site", &["site.test"]);
    let port = free_port();
    let conf = format!(
        "server {{ listen 127.0.0.1:{port} ssl; server_name site.test; ssl_certificate site.pem; ssl_certificate_key site.key;\n\
         location / {{ return 200 \"ok\"; }} }}\n"
    );
    let gw = Gw::start(dir.path(), &conf, port);
    let rt = rt();
    let cfg = client_config(&pki.ca_der(), &[]);
    assert!(
        rt.block_on(https_get(port, "site.test", cfg.clone(), "/"))
            .expect("first")
            .cert
            == first
    );

    let second = pki.issue("site", &["site.test"]);
    assert_ne!(first, second);
    let (status, body) = gw.reload();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"applied\""), "{body}");
    let seen = rt
        .block_on(https_get(port, "site.test", cfg.clone(), "/"))
        .expect("after reload");
    assert!(
        seen.cert == second,
        "a new handshake must see the new certificate"
    );

    // A broken certificate is rejected with the reason; the last good one keeps serving.
    std::fs::write(
        dir.path().join("site.pem"),
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    let (status, body) = gw.reload();
    assert_eq!(status, 422, "{body}");
    assert!(
        body.contains("rejected") && body.contains("invalid_certificate"),
        "{body}"
    );
    let seen = rt
        .block_on(https_get(port, "site.test", cfg, "/"))
        .expect("after rejected reload");
    assert!(seen.cert == second, "the old certificate must keep serving");
}

/// A CA in `dir` with a `site.test` certificate for the gateway and an
/// `upstream` one for localhost, and the address `localhost` resolves to
/// (where the upstream must listen for the gateway to find it).
fn site_and_upstream_pki(dir: &Path) -> (Pki, SocketAddr) {
    let pki = Pki::new(dir, "ca");
    pki.issue("site", &["site.test"]);
    pki.issue("upstream", &["localhost", "127.0.0.1", "::1"]);
    let at = ("localhost", 0)
        .to_socket_addrs()
        .expect("resolve")
        .next()
        .expect("an address");
    (pki, at)
}

/// An HTTPS upstream with `cert`/`key` from `dir`: answers every request
/// with the SNI it saw, the X-Forwarded-Proto, the Host and the ALPN
/// protocol negotiated (it offers h2 and http/1.1).
fn tls_upstream(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    file: &str,
    addr: SocketAddr,
) -> SocketAddr {
    tls_upstream_counting(rt, dir, file, addr, Arc::new(AtomicUsize::new(0)))
}

/// [`tls_upstream`], counting the health checks it answers (requests with
/// tollgate's health-check user agent) in `probes`.
fn tls_upstream_counting(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    file: &str,
    addr: SocketAddr,
    probes: Arc<AtomicUsize>,
) -> SocketAddr {
    let certs = rustls::pki_types::pem::PemObject::pem_file_iter(dir.join(format!("{file}.pem")))
        .expect("pem")
        .collect::<Result<Vec<CertificateDer<'static>>, _>>()
        .expect("certs");
    let key = <rustls::pki_types::PrivateKeyDer<'static> as rustls::pki_types::pem::PemObject>::from_pem_file(dir.join(format!("{file}.key"))).expect("key");
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server config");
    let mut cfg = cfg;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(addr))
        .expect("bind upstream");
    let local = listener.local_addr().expect("addr");
    rt.spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let probes = probes.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let sni = tls.get_ref().1.server_name().unwrap_or("-").to_string();
                let alpn = tls
                    .get_ref()
                    .1
                    .alpn_protocol()
                    .map_or("-".to_string(), |p| String::from_utf8_lossy(p).into_owned());
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let h = |n: &str| {
                            req.headers()
                                .get(n)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("-")
                                .to_string()
                        };
                        if h("user-agent") == "tollgate-health-check" {
                            probes.fetch_add(1, Ordering::SeqCst);
                        }
                        let body = format!(
                            "sni={sni} xfp={} host={} alpn={alpn}",
                            h("x-forwarded-proto"),
                            h("host")
                        );
                        async move {
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from(body),
                            )))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    local
}

#[test]
fn https_upstream_is_verified_against_the_trusted_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (pki, at) = site_and_upstream_pki(dir.path());
    let _other = Pki::new(dir.path(), "other-ca");
    let rt = rt();
    let up = tls_upstream(&rt, dir.path(), "upstream", at);
    let port = free_port();
    let conf = format!(
        "upstream secure {{ server localhost:{up_port} max_fails=0; }}\n\
         server {{ listen 127.0.0.1:{port} ssl; server_name site.test; ssl_certificate site.pem; ssl_certificate_key site.key;\n\
             location /trusted {{ proxy_ssl_trusted_certificate ca.pem; proxy_pass https://secure; }}\n\
             location /other-ca {{ proxy_ssl_trusted_certificate other-ca.pem; proxy_pass https://secure; proxy_next_upstream off; }}\n\
             location /system-roots {{ proxy_pass https://secure; proxy_next_upstream off; }}\n\
         }}\n",
        up_port = up.port()
    );
    let _gw = Gw::start(dir.path(), &conf, port);
    let cfg = client_config(&pki.ca_der(), &[]);
    let seen = rt
        .block_on(https_get(port, "site.test", cfg.clone(), "/trusted"))
        .expect("trusted");
    assert_eq!(seen.status, 200, "{}", seen.body);
    assert_eq!(
        seen.body,
        format!(
            "sni=localhost xfp=https host=localhost:{} alpn=http/1.1",
            up.port()
        )
    );
    for path in ["/other-ca", "/system-roots"] {
        let seen = rt
            .block_on(https_get(port, "site.test", cfg.clone(), path))
            .expect("untrusted");
        assert_eq!(seen.status, 502, "{path}: {}", seen.body);
    }
}

#[test]
fn health_checks_of_an_https_upstream_speak_tls() {
    // Probed over plain HTTP, a TLS server fails every check and the
    // upstream is marked down (503 for everything).
    let dir = tempfile::tempdir().expect("tempdir");
    let (pki, at) = site_and_upstream_pki(dir.path());
    let rt = rt();
    let probes = Arc::new(AtomicUsize::new(0));
    let up = tls_upstream_counting(&rt, dir.path(), "upstream", at, probes.clone());
    let port = free_port();
    let conf = format!(
        "upstream secure {{ server localhost:{up_port}; health_check uri=/healthz interval=50ms timeout=1s fails=1 passes=1; }}\n\
         server {{ listen 127.0.0.1:{port} ssl; server_name site.test; ssl_certificate site.pem; ssl_certificate_key site.key;\n\
             location / {{ proxy_ssl_trusted_certificate ca.pem; proxy_pass https://secure; }}\n\
         }}\n",
        up_port = up.port()
    );
    let gw = Gw::start(dir.path(), &conf, port);
    // Wait (bounded) until the upstream has answered a few health checks.
    let end = Instant::now() + Duration::from_secs(10);
    while probes.load(Ordering::SeqCst) < 3 {
        assert!(
            Instant::now() < end,
            "no health check reached the TLS upstream:\n{}",
            gw.log.lock().expect("log").join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let cfg = client_config(&pki.ca_der(), &[]);
    let seen = rt
        .block_on(https_get(port, "site.test", cfg, "/x"))
        .expect("request");
    assert_eq!(seen.status, 200, "{}", seen.body);
    let log = gw.log.lock().expect("log").join("\n");
    assert!(!log.contains("health check: down"), "{log}");
}

#[test]
fn check_reports_unusable_certificates_at_their_directive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "ca");
    pki.issue("good", &["good.test"]);
    pki.issue("other", &["other.test"]);
    std::fs::write(dir.path().join("garbage.pem"), "not a certificate\n").expect("write");
    let conf = "server {\n    listen 8443 ssl;\n    ssl_certificate garbage.pem;\n    ssl_certificate_key good.key;\n    location / { return 200; }\n}\n\
                server {\n    listen 8444 ssl;\n    ssl_certificate good.pem;\n    ssl_certificate_key other.key;\n    location / { return 200; }\n}\n\
                server {\n    listen 8445;\n    location / { proxy_ssl_trusted_certificate garbage.pem; proxy_pass https://127.0.0.1:9443; }\n}\n";
    let path = dir.path().join("gateway.conf");
    std::fs::write(&path, conf).expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["check", "--format", "json", "-c"])
        .arg(&path)
        .output()
        .expect("run check");
    assert_eq!(out.status.code(), Some(1));
    let diags: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let found: Vec<(String, u64)> = diags
        .as_array()
        .expect("array")
        .iter()
        .map(|d| {
            (
                d["code"].as_str().unwrap_or("").to_string(),
                d["line"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    let invalid: Vec<u64> = found
        .iter()
        .filter(|(c, _)| c == "tollgate::invalid_certificate")
        .map(|(_, l)| *l)
        .collect();
    // garbage certificate (line 3), key of another certificate (line 9: the
    // pair is reported at the certificate), garbage CA file (line 15).
    assert_eq!(invalid, vec![3, 9, 15], "{found:?}");
}
