//! The HTTP/1 server connection (`src/server/h1.rs`) on the wire, against
//! the real binary: keep-alive by version, responses to `HEAD`,
//! `Expect: 100-continue`, response framing when the length is unknown,
//! unread request bodies, pipelining, and the headers a local response
//! gets.
//!
//! Everything is raw bytes on sockets with read timeouts; the scripted
//! upstream reports every request it gets on a channel. The gateway is
//! started by the shared harness (`tests/util`).

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

mod util;

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// How long any one wait on the gateway or the upstream may take.
const BOUND: Duration = Duration::from_secs(10);

/// The real binary (the shared harness in `tests/util`), with the config's
/// `{up}` substituted and its access log off.
struct Gw {
    gw: util::Gateway,
}

impl Gw {
    fn start(conf: &str, up: SocketAddr) -> Gw {
        let conf = conf.replace("{up}", &up.to_string());
        Gw {
            gw: util::Gateway::start(&format!("access_log off;\n{conf}")),
        }
    }

    /// A fresh client connection, buffered for reading responses.
    fn connect(&self) -> Client {
        let s = TcpStream::connect(self.gw.addr()).expect("connect");
        s.set_read_timeout(Some(BOUND)).expect("read timeout");
        s.set_nodelay(true).expect("nodelay");
        let w = s.try_clone().expect("clone the socket");
        Client {
            r: BufReader::new(s),
            w,
        }
    }
}

/// One client connection: writes go out at once, responses are read off
/// the buffered side.
struct Client {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Client {
    fn send(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).expect("write to the gateway");
    }

    /// The next response; `head_request`: it answers a `HEAD` (no body).
    fn response(&mut self, head_request: bool) -> Result<Resp, String> {
        read_response(&mut self.r, head_request)
    }

    /// Whether the gateway closes the connection (within the bound) with
    /// nothing more sent: `Err` says what happened instead.
    fn closed(&mut self) -> Result<(), String> {
        match self.r.fill_buf() {
            Ok([]) => Ok(()),
            Ok(more) => Err(format!(
                "more bytes instead of the end of the connection: {:?}",
                String::from_utf8_lossy(more)
            )),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(format!("the connection is still open after {BOUND:?}: {e}")),
        }
    }
}

/// A response as it came off the wire.
#[derive(Debug)]
struct Resp {
    status: u16,
    /// The head as sent, status line and fields, up to the blank line.
    head: String,
    /// The body, de-chunked when it was chunked.
    body: Vec<u8>,
    /// The body's end was the connection closing.
    close_delimited: bool,
}

impl Resp {
    /// Every value of field `name` (case-insensitive), trimmed.
    fn headers(&self, name: &str) -> Vec<String> {
        self.head
            .split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
            .collect()
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers(name).into_iter().next()
    }

    /// Whether a `Connection` field lists `token`.
    fn connection_says(&self, token: &str) -> bool {
        self.headers("connection")
            .iter()
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn read_line(r: &mut BufReader<TcpStream>, what: &str) -> Result<String, String> {
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(0) => Err(format!("the connection ended while reading {what}")),
        Ok(_) => Ok(line),
        Err(e) => Err(format!(
            "reading {what} failed: {e} (read so far: {line:?})"
        )),
    }
}

/// One response off a connection, framed as RFC 9112 §6.3 says a client
/// must: no body for `HEAD`, 1xx, 204 and 304; then `Transfer-Encoding`,
/// then `Content-Length`, else until the connection closes.
fn read_response(r: &mut BufReader<TcpStream>, head_request: bool) -> Result<Resp, String> {
    let mut head = String::new();
    loop {
        let line = read_line(r, "a response head")?;
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let status: u16 = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP/1.1 status line: {head:?}"))?;
    let mut resp = Resp {
        status,
        head,
        body: Vec::new(),
        close_delimited: false,
    };
    if head_request || (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(resp);
    }
    if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let line = read_line(r, "a chunk-size line")?;
            let size = line.trim_end().split(';').next().unwrap_or("");
            let size = usize::from_str_radix(size, 16)
                .map_err(|e| format!("bad chunk-size line {line:?}: {e}"))?;
            if size == 0 {
                // No trailers are expected: the blank line ends it.
                let end = read_line(r, "the end of a chunked body")?;
                if end != "\r\n" {
                    return Err(format!("trailer or junk after the last chunk: {end:?}"));
                }
                return Ok(resp);
            }
            let mut data = vec![0u8; size + 2];
            r.read_exact(&mut data)
                .map_err(|e| format!("reading a {size}-byte chunk failed: {e}"))?;
            if !data.ends_with(b"\r\n") {
                return Err(format!("a chunk not followed by CRLF: {data:?}"));
            }
            data.truncate(size);
            resp.body.extend_from_slice(&data);
        }
    }
    if let Some(len) = resp.header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|e| format!("bad content-length {len:?}: {e}"))?;
        resp.body = vec![0u8; len];
        r.read_exact(&mut resp.body)
            .map_err(|e| format!("reading a {len}-byte body failed: {e}"))?;
        return Ok(resp);
    }
    r.read_to_end(&mut resp.body).map_err(|e| {
        format!(
            "a body without a length did not end with the connection: {e} (read {:?})",
            String::from_utf8_lossy(&resp.body)
        )
    })?;
    resp.close_delimited = true;
    Ok(resp)
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

// ---------------------------------------------------------------------------
// The scripted upstream
// ---------------------------------------------------------------------------

/// A request as the upstream got it.
#[derive(Debug)]
struct Seen {
    method: String,
    path: String,
    body: Vec<u8>,
}

/// What the close-delimited and chunked upstream answers carry.
const UNFRAMED_BODY: &str = "no length here: the end is the connection closing";
const CHUNKED_PIECES: [&str; 3] = ["hello", ", chunked ", "world"];

/// A raw HTTP/1.1 upstream on 127.0.0.1:0 that reports every request it
/// gets. Any `HEAD` is answered `Content-Length: 5` and no body; otherwise
/// by the path:
/// - `/close-delimited`: a 200 with no length, ended by closing;
/// - `/chunked`: a chunked 200 in three chunks;
/// - anything else: a 200 whose body is `METHOD PATH body=BODY`.
struct Upstream {
    addr: SocketAddr,
    rx: mpsc::Receiver<Seen>,
}

impl Upstream {
    fn start() -> Upstream {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind the upstream");
        let addr = l.local_addr().expect("the upstream's address");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for s in l.incoming().map_while(Result::ok) {
                let tx = tx.clone();
                std::thread::spawn(move || serve_upstream(s, tx));
            }
        });
        Upstream { addr, rx }
    }

    /// The next request the upstream got (within the bound).
    fn next(&self) -> Seen {
        self.rx
            .recv_timeout(BOUND)
            .expect("the upstream got no request")
    }
}

/// Serve one upstream connection until the gateway closes it (or an answer
/// ends it); any failure just ends the connection.
fn serve_upstream(mut s: TcpStream, tx: mpsc::Sender<Seen>) {
    let mut buf: Vec<u8> = Vec::new();
    let mut tmp = [0u8; 8192];
    let mut more = |s: &mut TcpStream, buf: &mut Vec<u8>| match s.read(&mut tmp) {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&tmp[..n]);
            true
        }
    };
    loop {
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if !more(&mut s, &mut buf) {
                return;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end);
        let lower = head.to_ascii_lowercase();
        let mut words = head.split(' ');
        let method = words.next().unwrap_or("").to_string();
        let path = words.next().unwrap_or("").to_string();
        let mut body = Vec::new();
        if lower.contains("\r\ntransfer-encoding: chunked\r\n") {
            loop {
                let Some(eol) = find(&buf, b"\r\n") else {
                    if !more(&mut s, &mut buf) {
                        return;
                    }
                    continue;
                };
                let line = String::from_utf8_lossy(&buf[..eol]).into_owned();
                let Ok(size) = usize::from_str_radix(line.split(';').next().unwrap_or(""), 16)
                else {
                    return;
                };
                // The chunk, its CRLF (or, for the last one, the blank line).
                let need = eol + 2 + size + 2;
                while buf.len() < need {
                    if !more(&mut s, &mut buf) {
                        return;
                    }
                }
                body.extend_from_slice(&buf[eol + 2..eol + 2 + size]);
                buf.drain(..need);
                if size == 0 {
                    break;
                }
            }
        } else if let Some(n) = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
        {
            while buf.len() < n {
                if !more(&mut s, &mut buf) {
                    return;
                }
            }
            body = buf.drain(..n).collect();
        }
        let text = String::from_utf8_lossy(&body).into_owned();
        let head_request = method == "HEAD";
        let _ = tx.send(Seen {
            method: method.clone(),
            path: path.clone(),
            body,
        });
        let reply: Vec<u8> = if head_request {
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n".to_vec()
        } else if path == "/close-delimited" {
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n{UNFRAMED_BODY}"
            );
            let _ = s.write_all(reply.as_bytes());
            return;
        } else if path == "/chunked" {
            let mut r = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_string();
            for p in CHUNKED_PIECES {
                r.push_str(&format!("{:x}\r\n{p}\r\n", p.len()));
            }
            r.push_str("0\r\n\r\n");
            r.into_bytes()
        } else {
            let b = format!("{method} {path} body={text}");
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{b}", b.len()).into_bytes()
        };
        if s.write_all(&reply).is_err() {
            return;
        }
    }
}

const CONF: &str = "
server {
    listen @PORT@;
    location = /r { return 200 \"hello\"; }
    location = /ok { return 200 \"ok\"; }
    location /small { client_max_body_size 10; proxy_pass http://{up}; }
    location / { proxy_pass http://{up}; }
}
";

fn start() -> (Gw, Upstream) {
    let up = Upstream::start();
    let gw = Gw::start(CONF, up.addr);
    (gw, up)
}

// ---------------------------------------------------------------------------
// Keep-alive by version
// ---------------------------------------------------------------------------

#[test]
fn http10_closes_after_the_response_unless_the_client_asks_for_keep_alive() {
    let (gw, _up) = start();

    // Without `Connection: keep-alive`: the response, then the end.
    let mut c = gw.connect();
    c.send(b"GET /r HTTP/1.0\r\nHost: h\r\n\r\n");
    let r = c.response(false).expect("a response");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body_text(), "hello", "{r:?}");
    assert!(
        r.connection_says("close"),
        "a response that ends the connection says so: {:?}",
        r.head
    );
    assert_eq!(c.closed(), Ok(()), "HTTP/1.0 without keep-alive");

    // With it: the response repeats it and the connection carries another
    // request (and then one more, which closes it).
    let mut c = gw.connect();
    for i in 0..2 {
        c.send(b"GET /r HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n");
        let r = c.response(false).expect("a response");
        assert_eq!(r.status, 200, "request {i}: {r:?}");
        assert_eq!(r.body_text(), "hello", "request {i}: {r:?}");
        assert!(
            r.connection_says("keep-alive") && !r.connection_says("close"),
            "request {i}: HTTP/1.0 keep-alive is repeated: {:?}",
            r.head
        );
    }
    c.send(b"GET /r HTTP/1.0\r\nHost: h\r\n\r\n");
    let r = c.response(false).expect("a response");
    assert_eq!(r.status, 200, "the last request: {r:?}");
    assert_eq!(
        c.closed(),
        Ok(()),
        "HTTP/1.0 without keep-alive after keep-alive ones"
    );
}

// ---------------------------------------------------------------------------
// HEAD
// ---------------------------------------------------------------------------

#[test]
fn a_proxied_head_response_has_its_length_and_no_body_and_the_connection_goes_on() {
    let (gw, up) = start();
    let mut c = gw.connect();
    c.send(b"HEAD /head HTTP/1.1\r\nHost: h\r\n\r\n");
    let r = c.response(true).expect("a response");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.header("content-length").as_deref(),
        Some("5"),
        "the upstream's length is kept: {:?}",
        r.head
    );
    assert_eq!(r.header("transfer-encoding"), None, "{:?}", r.head);
    assert!(!r.connection_says("close"), "{:?}", r.head);
    let seen = up.next();
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("HEAD", "/head")
    );

    // Any body bytes after the HEAD response would be read here as the
    // start of the next response.
    c.send(b"GET /after-head HTTP/1.1\r\nHost: h\r\n\r\n");
    let r = c.response(false).expect("a response");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body_text(), "GET /after-head body=", "{r:?}");
    assert_eq!(up.next().path, "/after-head");
}

// ---------------------------------------------------------------------------
// Expect: 100-continue
// ---------------------------------------------------------------------------

#[test]
fn expect_100_continue_is_answered_when_the_body_is_read_and_never_before_a_413() {
    let (gw, up) = start();

    // The body is wanted: 100 first, then the body goes, then the answer.
    let mut c = gw.connect();
    c.send(
        b"POST /continue HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    );
    let r = c.response(false).expect("a response");
    assert_eq!(r.status, 100, "100 Continue before the body is sent: {r:?}");
    assert_eq!(r.head, "HTTP/1.1 100 Continue\r\n\r\n");
    c.send(b"hello");
    let r = c.response(false).expect("a response");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body_text(), "POST /continue body=hello", "{r:?}");
    let seen = up.next();
    assert_eq!(seen.path, "/continue");
    assert_eq!(seen.body, b"hello", "the upstream got the body");
    c.send(b"GET /r HTTP/1.1\r\nHost: h\r\n\r\n");
    let r = c.response(false).expect("a response");
    assert_eq!(
        (r.status, r.body_text().as_str()),
        (200, "hello"),
        "the request after the 100-continue one: {r:?}"
    );

    // The body is refused by its announced length: the 413 comes with no
    // 100 before it, and the connection ends (the body never came).
    let mut c = gw.connect();
    c.send(
        b"POST /small HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n",
    );
    let r = c.response(false).expect("a response");
    assert_eq!(r.status, 413, "the 413 and no 100 Continue first: {r:?}");
    assert_eq!(
        c.closed(),
        Ok(()),
        "after a 413 to a client still waiting for 100 Continue"
    );
    assert!(
        r.connection_says("close"),
        "the 413 ends the connection, so it says so: {:?}",
        r.head
    );
}

// ---------------------------------------------------------------------------
// Response framing when the length is unknown
// ---------------------------------------------------------------------------

#[test]
fn a_body_of_unknown_length_is_chunked_for_http11_and_close_delimited_for_http10() {
    let (gw, _up) = start();
    let chunked_body: String = CHUNKED_PIECES.concat();
    for (path, want) in [
        ("/close-delimited", UNFRAMED_BODY.to_string()),
        ("/chunked", chunked_body),
    ] {
        // HTTP/1.1: chunked, and the connection carries another request.
        let mut c = gw.connect();
        c.send(format!("GET {path} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes());
        let r = c.response(false).expect("a response");
        assert_eq!(r.status, 200, "{path} over HTTP/1.1: {r:?}");
        assert_eq!(
            r.header("transfer-encoding").as_deref(),
            Some("chunked"),
            "{path} over HTTP/1.1: {:?}",
            r.head
        );
        assert_eq!(r.header("content-length"), None, "{path}: {:?}", r.head);
        assert_eq!(r.body_text(), want, "{path} over HTTP/1.1, de-chunked");
        c.send(b"GET /r HTTP/1.1\r\nHost: h\r\n\r\n");
        let r = c.response(false).expect("a response");
        assert_eq!(
            (r.status, r.body_text().as_str()),
            (200, "hello"),
            "{path}: the request after a chunked response: {r:?}"
        );

        // HTTP/1.0 (asking for keep-alive or not): the end of the body is
        // the end of the connection, and the response says so.
        for ask in ["", "Connection: keep-alive\r\n"] {
            let mut c = gw.connect();
            c.send(format!("GET {path} HTTP/1.0\r\nHost: h\r\n{ask}\r\n").as_bytes());
            let r = c.response(false).expect("a response");
            assert_eq!(r.status, 200, "{path} over HTTP/1.0 {ask:?}: {r:?}");
            assert_eq!(
                r.header("transfer-encoding"),
                None,
                "{path} over HTTP/1.0 {ask:?}: {:?}",
                r.head
            );
            assert_eq!(r.header("content-length"), None, "{path}: {:?}", r.head);
            assert!(
                r.close_delimited,
                "{path} over HTTP/1.0 {ask:?}: not ended by the close"
            );
            assert_eq!(r.body_text(), want, "{path} over HTTP/1.0 {ask:?}");
            assert!(
                r.connection_says("close") && !r.connection_says("keep-alive"),
                "{path} over HTTP/1.0 {ask:?}: the response says the connection ends: {:?}",
                r.head
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Unread request bodies
// ---------------------------------------------------------------------------

#[test]
fn a_small_body_the_handler_never_reads_is_skipped_and_the_connection_goes_on() {
    let (gw, _up) = start();
    let mut c = gw.connect();
    c.send(b"POST /ok HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nabcd");
    let r = c.response(false).expect("a response");
    assert_eq!((r.status, r.body_text().as_str()), (200, "ok"), "{r:?}");
    assert!(
        !r.connection_says("close"),
        "the connection is kept: {:?}",
        r.head
    );
    // Were the body not skipped, "abcd" would be read as the next head.
    c.send(b"GET /r HTTP/1.1\r\nHost: h\r\n\r\n");
    let r = c.response(false).expect("a response");
    assert_eq!(
        (r.status, r.body_text().as_str()),
        (200, "hello"),
        "the request after the unread body: {r:?}"
    );
}

// ---------------------------------------------------------------------------
// Pipelining
// ---------------------------------------------------------------------------

#[test]
fn pipelined_requests_in_one_write_are_answered_in_order() {
    let (gw, up) = start();
    let mut c = gw.connect();
    c.send(
        b"POST /first HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello\
          GET /second HTTP/1.1\r\nHost: h\r\n\r\n",
    );
    let r = c.response(false).expect("a response");
    assert_eq!(
        (r.status, r.body_text().as_str()),
        (200, "POST /first body=hello"),
        "the first answer: {r:?}"
    );
    let r = c.response(false).expect("a response");
    assert_eq!(
        (r.status, r.body_text().as_str()),
        (200, "GET /second body="),
        "the second answer: {r:?}"
    );
    let first = up.next();
    assert_eq!(
        (first.method.as_str(), first.path.as_str(), &first.body[..]),
        ("POST", "/first", &b"hello"[..]),
        "the upstream's first request"
    );
    let second = up.next();
    assert_eq!(
        (
            second.method.as_str(),
            second.path.as_str(),
            &second.body[..]
        ),
        ("GET", "/second", &b""[..]),
        "the upstream's second request"
    );
}

// ---------------------------------------------------------------------------
// Local responses
// ---------------------------------------------------------------------------

#[test]
fn a_local_response_has_its_length_and_a_date() {
    let (gw, _up) = start();
    let mut c = gw.connect();
    c.send(b"GET /r HTTP/1.1\r\nHost: h\r\n\r\n");
    let r = c.response(false).expect("a response");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.headers("content-length"),
        vec!["5".to_string()],
        "{:?}",
        r.head
    );
    assert_eq!(r.header("transfer-encoding"), None, "{:?}", r.head);
    assert_eq!(r.body_text(), "hello");
    let dates = r.headers("date");
    assert_eq!(dates.len(), 1, "one date: {:?}", r.head);
    // IMF-fixdate, e.g. "Sun, 06 Nov 1994 08:49:37 GMT".
    let date = &dates[0];
    assert!(
        date.len() == 29 && date.ends_with(" GMT") && date.as_bytes()[3] == b',',
        "not an IMF-fixdate: {date:?}"
    );
}
