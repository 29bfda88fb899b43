//! The integration-test harness: fake upstreams on `127.0.0.1:0`, the real
//! `tollgate` binary with its config in a tempdir, and a small client.
//!
//! Nothing here sleeps to wait: readiness and reload outcomes are awaited on
//! the gateway's log (a shared buffer with a `Condvar`), and every wait has
//! a deadline. Upstream `delay`s simulate slow services; they are not waits.

#![allow(dead_code)]

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client as LegacyClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// How long any wait in the harness may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// One runtime for client calls made from (synchronous) tests.
fn client_rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("client runtime")
    })
}

// ---------------------------------------------------------------- upstreams

/// A request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// The request target exactly as received (path and query).
    pub target: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Recorded {
    /// The header's values joined with `, `, if present.
    pub fn header(&self, name: &str) -> Option<String> {
        let v: Vec<&str> = self
            .headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap_or("?"))
            .collect();
        (!v.is_empty()).then(|| v.join(", "))
    }
}

/// How an upstream answers one request.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// `None`: the default echo JSON.
    pub body: Option<Vec<u8>>,
    /// Wait this long before sending the response head.
    pub delay: Option<Duration>,
    /// Close the connection instead of answering (after reading the request).
    pub close: bool,
}

impl Reply {
    /// 200 with the echo JSON (see [`TestUpstream`]).
    pub fn echo() -> Reply {
        Reply {
            status: 200,
            headers: Vec::new(),
            body: None,
            delay: None,
            close: false,
        }
    }
    pub fn status(code: u16) -> Reply {
        Reply {
            status: code,
            ..Reply::echo()
        }
    }
    pub fn json(v: serde_json::Value) -> Reply {
        Reply::echo()
            .header("content-type", "application/json")
            .body(v.to_string())
    }
    pub fn text(s: &str) -> Reply {
        Reply::echo().header("content-type", "text/plain").body(s)
    }
    pub fn close() -> Reply {
        Reply {
            close: true,
            ..Reply::echo()
        }
    }
    pub fn with_status(mut self, code: u16) -> Reply {
        self.status = code;
        self
    }
    pub fn header(mut self, n: &str, v: &str) -> Reply {
        self.headers.push((n.to_string(), v.to_string()));
        self
    }
    pub fn body(mut self, b: impl Into<Vec<u8>>) -> Reply {
        self.body = Some(b.into());
        self
    }
    pub fn delay(mut self, d: Duration) -> Reply {
        self.delay = Some(d);
        self
    }
}

type Handler = Arc<dyn Fn(&Recorded) -> Reply + Send + Sync>;

/// A fake upstream: an HTTP/1.1 server on `127.0.0.1:0` (its own runtime)
/// that records every request and answers with a closure. By default it
/// answers 200 with
/// `{"id", "method", "target", "headers": {name: value}, "body_len"}`.
pub struct TestUpstream {
    pub id: String,
    addr: SocketAddr,
    log: UpLog,
    rt: Option<tokio::runtime::Runtime>,
}

type UpLog = Arc<(Mutex<Vec<Recorded>>, Condvar)>;

fn echo_json(id: &str, r: &Recorded) -> serde_json::Value {
    let mut headers = serde_json::Map::new();
    for name in r.headers.keys() {
        headers.insert(
            name.as_str().to_string(),
            r.header(name.as_str()).unwrap_or_default().into(),
        );
    }
    serde_json::json!({
        "id": id,
        "method": r.method,
        "target": r.target,
        "headers": headers,
        "body_len": r.body.len(),
    })
}

impl TestUpstream {
    /// An echo upstream.
    pub fn start(id: &str) -> TestUpstream {
        TestUpstream::with(id, |_| Reply::echo())
    }

    /// An upstream answering with `f`.
    pub fn with(id: &str, f: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) -> TestUpstream {
        let handler: Handler = Arc::new(f);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("upstream runtime");
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("local addr");
        let log: UpLog = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let (log2, id2) = (log.clone(), id.to_string());
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).expect("tokio listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve_upstream_conn(
                    stream,
                    log2.clone(),
                    handler.clone(),
                    id2.clone(),
                ));
            }
        });
        TestUpstream {
            id: id.to_string(),
            addr,
            log,
            rt: Some(rt),
        }
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.log.0.lock().expect("log").clone()
    }

    pub fn count(&self) -> usize {
        self.log.0.lock().expect("log").len()
    }

    /// Wait (bounded) until the upstream has received `n` requests.
    pub fn wait_requests(&self, n: usize) {
        let (m, cv) = &*self.log;
        let deadline = Instant::now() + DEADLINE;
        let mut v = m.lock().expect("log");
        while v.len() < n {
            let now = Instant::now();
            assert!(
                now < deadline,
                "upstream {} got {} of {n} requests",
                self.id,
                v.len()
            );
            v = cv.wait_timeout(v, deadline - now).expect("log").0;
        }
    }

    /// The latest request; panics when there is none.
    pub fn last(&self) -> Recorded {
        self.log
            .0
            .lock()
            .expect("log")
            .last()
            .cloned()
            .expect("the upstream saw no request")
    }

    /// Kill the server: the listener and every open connection are closed
    /// when this returns (connections are refused from then on).
    pub fn stop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
        // Prove the port refuses now.
        let deadline = Instant::now() + DEADLINE;
        while TcpStream::connect(self.addr).is_ok() {
            assert!(
                Instant::now() < deadline,
                "upstream {} still accepting after stop",
                self.id
            );
            std::thread::yield_now();
        }
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

async fn serve_upstream_conn(
    stream: tokio::net::TcpStream,
    log: UpLog,
    handler: Handler,
    id: String,
) {
    let kill = Arc::new(tokio::sync::Notify::new());
    let kill2 = kill.clone();
    let svc = service_fn(move |req: Request<Incoming>| {
        let (log, handler, id, kill) = (log.clone(), handler.clone(), id.clone(), kill2.clone());
        async move {
            let (parts, body) = req.into_parts();
            let body = match body.collect().await {
                Ok(b) => b.to_bytes().to_vec(),
                Err(_) => Vec::new(),
            };
            let rec = Recorded {
                method: parts.method.to_string(),
                target: parts
                    .uri
                    .path_and_query()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_default(),
                headers: parts.headers,
                body,
            };
            log.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(rec.clone());
            log.1.notify_all();
            let reply = handler(&rec);
            if let Some(d) = reply.delay {
                tokio::time::sleep(d).await;
            }
            if reply.close {
                kill.notify_one();
                std::future::pending::<()>().await;
            }
            let body = reply
                .body
                .clone()
                .unwrap_or_else(|| echo_json(&id, &rec).to_string().into_bytes());
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            *resp.status_mut() = http::StatusCode::from_u16(reply.status).expect("status");
            if reply.body.is_none() {
                resp.headers_mut()
                    .insert("content-type", HeaderValue::from_static("application/json"));
            }
            for (n, v) in &reply.headers {
                resp.headers_mut().append(
                    HeaderName::try_from(n.as_str()).expect("header name"),
                    HeaderValue::try_from(v.as_str()).expect("header value"),
                );
            }
            Ok::<_, Infallible>(resp)
        }
    });
    let conn =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
    tokio::select! {
        _ = conn => {}
        _ = kill.notified() => {}
    }
}

// ---------------------------------------------------------------- gateway

/// A free port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

#[derive(Default)]
struct LogState {
    text: String,
    eof: bool,
}

type SharedLog = Arc<(Mutex<LogState>, Condvar)>;

fn subst(text: &str, ports: &[u16; 3]) -> String {
    text.replace("@PORT@", &format!("127.0.0.1:{}", ports[0]))
        .replace("@PORT2@", &format!("127.0.0.1:{}", ports[1]))
        .replace("@PORT3@", &format!("127.0.0.1:{}", ports[2]))
}

/// The outcome of one reload, as logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    Applied(u64),
    Rejected(u64),
}

/// The real `tollgate run -c FILE` on a config in a tempdir.
///
/// Config text may use `@PORT@`, `@PORT2@`, `@PORT3@`: listen addresses
/// (`127.0.0.1:N`) allocated when the gateway is created, stable across
/// [`Gateway::rewrite_config`].
pub struct Gateway {
    child: Child,
    dir: tempfile::TempDir,
    conf: PathBuf,
    log: SharedLog,
    ports: [u16; 3],
}

impl Gateway {
    /// Start with `text` as `gateway.conf` and wait until it serves.
    pub fn start(text: &str) -> Gateway {
        Gateway::start_with_files(text, &[])
    }

    /// Start with extra files (relative path, text) next to the config.
    pub fn start_with_files(text: &str, files: &[(&str, &str)]) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let ports = [free_port(), free_port(), free_port()];
        let conf = dir.path().join("gateway.conf");
        for (name, body) in files {
            let path = dir.path().join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).expect("mkdir");
            }
            std::fs::write(path, subst(body, &ports)).expect("write file");
        }
        std::fs::write(&conf, subst(text, &ports)).expect("write config");
        let args = ["run".as_ref(), "-c".as_ref(), conf.as_os_str()];
        let (child, log) = launch(&args);
        let gw = Gateway {
            child,
            dir,
            conf,
            log,
            ports,
        };
        gw.wait_log("serving", |t| t.contains(" serving "));
        gw
    }

    /// `tollgate demo` (fixed ports: services on 3001-3003, gateway on 8000).
    pub fn demo() -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("unused.conf");
        let (child, log) = launch(&["demo".as_ref()]);
        let gw = Gateway {
            child,
            dir,
            conf,
            log,
            ports: [8000, 8000, 8000],
        };
        gw.wait_log("serving", |t| t.contains(" serving "));
        gw
    }

    fn subst(&self, text: &str) -> String {
        subst(text, &self.ports)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `127.0.0.1:PORT` of `@PORT@`.
    pub fn addr(&self) -> String {
        self.addr_n(0)
    }

    /// The address of `@PORT@` (0), `@PORT2@` (1), `@PORT3@` (2).
    pub fn addr_n(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.ports[i])
    }

    /// `http://127.0.0.1:PORT{path}`
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.log.0.lock().expect("log").text.clone()
    }

    /// Wait (bounded) until `pred(log)` holds; panics with the log otherwise.
    pub fn wait_log(&self, what: &str, pred: impl Fn(&str) -> bool) {
        let (m, cv) = &*self.log;
        let deadline = Instant::now() + DEADLINE;
        let mut st = m.lock().expect("log");
        loop {
            if pred(&st.text) {
                return;
            }
            let now = Instant::now();
            if st.eof || now >= deadline {
                let text = st.text.clone();
                drop(st);
                let why = if now >= deadline {
                    "timed out"
                } else {
                    "tollgate exited"
                };
                panic!("{why} waiting for {what}; log:\n{text}");
            }
            st = cv.wait_timeout(st, deadline - now).expect("log").0;
        }
    }

    /// Every reload outcome logged so far, in order.
    pub fn reloads(&self) -> Vec<Reload> {
        parse_reloads(&self.log())
    }

    fn last_generation(&self) -> u64 {
        self.reloads()
            .iter()
            .map(|r| match r {
                Reload::Applied(g) | Reload::Rejected(g) => *g,
            })
            .max()
            .unwrap_or(1)
    }

    /// Wait for the outcome of generation `generation`.
    pub fn wait_generation(&self, generation: u64) -> Reload {
        self.wait_log(&format!("reload generation={generation}"), |t| {
            parse_reloads(t)
                .iter()
                .any(|r| matches!(r, Reload::Applied(g) | Reload::Rejected(g) if *g >= generation))
        });
        self.reloads()
            .into_iter()
            .find(|r| matches!(r, Reload::Applied(g) | Reload::Rejected(g) if *g >= generation))
            .expect("outcome")
    }

    /// SIGHUP, then wait for the outcome of the next generation.
    pub fn reload(&self) -> Reload {
        let next = self.last_generation() + 1;
        self.signal("HUP");
        self.wait_generation(next)
    }

    /// Replace the config the way editors save (write a temporary file in
    /// the same directory, rename it over the config), then wait for the
    /// reload it triggers.
    pub fn rewrite_config(&self, text: &str) -> Reload {
        let next = self.last_generation() + 1;
        self.rewrite_file("gateway.conf", text);
        self.wait_generation(next)
    }

    /// Replace `name` (relative to the config dir) by rename, without waiting.
    pub fn rewrite_file(&self, name: &str, text: &str) {
        let tmp = self.dir.path().join(format!(".{name}.swp"));
        std::fs::write(&tmp, self.subst(text)).expect("write temp");
        std::fs::rename(&tmp, self.dir.path().join(name)).expect("rename");
    }

    /// Write the config in place without any signal (for a later `reload`).
    pub fn write_config(&self, text: &str) {
        self.rewrite_file("gateway.conf", text);
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// SIGTERM and wait (bounded) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait_exit()
    }

    /// Wait (bounded) for the process to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        {
            let (m, cv) = &*self.log;
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut st = m.lock().expect("log");
            while !st.eof {
                let now = Instant::now();
                if now >= deadline {
                    let text = st.text.clone();
                    drop(st);
                    panic!("tollgate did not exit; log:\n{text}");
                }
                st = cv.wait_timeout(st, deadline - now).expect("log").0;
            }
        }
        self.child.wait().expect("wait")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn launch(args: &[&std::ffi::OsStr]) -> (Child, SharedLog) {
    let log: SharedLog = Arc::new((Mutex::new(LogState::default()), Condvar::new()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tollgate");
    capture(child.stderr.take().expect("stderr"), log.clone());
    (child, log)
}

fn capture(stderr: std::process::ChildStderr, log: SharedLog) {
    std::thread::spawn(move || {
        let mut r = std::io::BufReader::new(stderr);
        let mut buf = [0u8; 8192];
        loop {
            let n = r.read(&mut buf).unwrap_or(0);
            let (m, cv) = &*log;
            let mut st = m.lock().unwrap_or_else(|e| e.into_inner());
            if n == 0 {
                st.eof = true;
                cv.notify_all();
                return;
            }
            st.text.push_str(&String::from_utf8_lossy(&buf[..n]));
            cv.notify_all();
        }
    });
}

/// Reload outcomes in the log: `reload applied generation=N` and
/// `reload rejected ... generation=N` (the generation field follows the
/// possibly multi-line message).
fn parse_reloads(text: &str) -> Vec<Reload> {
    let re = regex::Regex::new(r"reload (applied|rejected)").expect("regex");
    let gen_re = regex::Regex::new(r"generation=(\d+)").expect("regex");
    let mut out = Vec::new();
    for m in re.captures_iter(text) {
        let whole = m.get(0).expect("match");
        let Some(g) = gen_re.captures(&text[whole.end()..]) else {
            continue;
        };
        let n: u64 = g[1].parse().expect("number");
        out.push(if &m[1] == "applied" {
            Reload::Applied(n)
        } else {
            Reload::Rejected(n)
        });
    }
    out
}

// ---------------------------------------------------------------- client

/// A response, fully read.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("ascii header").to_string())
    }
    /// The upstream's echo: what it received.
    pub fn echo_header(&self, name: &str) -> Option<String> {
        self.json()["headers"][name].as_str().map(str::to_string)
    }
}

/// A hyper-util legacy client driven from synchronous tests.
#[derive(Clone)]
pub struct Client {
    inner: LegacyClient<HttpConnector, Full<Bytes>>,
}

impl Default for Client {
    fn default() -> Self {
        Client::new()
    }
}

impl Client {
    /// HTTP/1.1 with pooled keep-alive connections.
    pub fn new() -> Client {
        let _g = client_rt().enter();
        Client {
            inner: LegacyClient::builder(TokioExecutor::new()).build(HttpConnector::new()),
        }
    }

    /// HTTP/1.1, a new connection per request.
    pub fn fresh() -> Client {
        let _g = client_rt().enter();
        Client {
            inner: LegacyClient::builder(TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build(HttpConnector::new()),
        }
    }

    /// HTTP/2 with prior knowledge (h2c).
    pub fn h2() -> Client {
        let _g = client_rt().enter();
        Client {
            inner: LegacyClient::builder(TokioExecutor::new())
                .http2_only(true)
                .build(HttpConnector::new()),
        }
    }

    pub fn get(&self, url: &str) -> Resp {
        self.request("GET", url, &[], "")
    }

    pub fn request(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Resp {
        self.try_request(method, url, headers, body)
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
    }

    /// Like [`Client::request`], with transport errors as `Err`.
    pub fn try_request(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<Resp, String> {
        let mut b = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?)
            .uri(url);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        let req = b.body(Full::new(body.into())).map_err(|e| e.to_string())?;
        let inner = self.inner.clone();
        client_rt().block_on(async move {
            let fut = async {
                let resp = inner.request(req).await.map_err(|e| format!("{e:?}"))?;
                let (parts, body) = resp.into_parts();
                let body = body
                    .collect()
                    .await
                    .map_err(|e| format!("body: {e:?}"))?
                    .to_bytes()
                    .to_vec();
                Ok(Resp {
                    status: parts.status.as_u16(),
                    headers: parts.headers,
                    body,
                })
            };
            tokio::time::timeout(Duration::from_secs(30), fut)
                .await
                .unwrap_or_else(|_| Err("client timeout".into()))
        })
    }
}

/// GET with a one-off pooled client.
pub fn get(url: &str) -> Resp {
    Client::new().get(url)
}

pub fn request(method: &str, url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Resp {
    Client::new().request(method, url, headers, body)
}

/// Send raw bytes, read until the server closes (bounded); returns what came back.
pub fn raw(addr: &str, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                panic!(
                    "raw: no close within {DEADLINE:?}; got {:?}",
                    String::from_utf8_lossy(&out)
                )
            }
            Err(_) => break,
        }
    }
    out
}

/// The status code of a raw HTTP/1.x response.
pub fn raw_status(resp: &[u8]) -> u16 {
    let text = String::from_utf8_lossy(resp);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"))
}
