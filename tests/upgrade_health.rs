//! WebSocket-style upgrades are tunnelled both ways, and active health
//! checks take a failing server out and bring it back.
//!
//! Self-contained (raw sockets, the real binary): the shared harness in
//! `tests/util` is grown separately.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

struct Gw {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Gw {
    fn start(conf: &str, port: u16) -> Gw {
        let dir = tempfile::tempdir().expect("tempdir").keep();
        let path = dir.join("gateway.conf");
        std::fs::write(&path, conf).expect("write config");
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
        wait_until(Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Gw { child, log }
    }

    fn logged(&self, needle: &str) -> bool {
        self.log
            .lock()
            .expect("log")
            .iter()
            .any(|l| l.contains(needle))
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("condition not met within {limit:?}");
}

/// A raw upstream: answers an upgrade with 101 and then echoes bytes
/// upper-cased; answers anything else with 200 and its own name.
fn upgrade_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for s in l.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut s = s;
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                if head.contains("upgrade: websocket") && head.contains("connection: upgrade") {
                    let _ = s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n");
                    let mut buf = [0u8; 1024];
                    loop {
                        let n = s.read(&mut buf).unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        let up = buf[..n].to_ascii_uppercase();
                        if s.write_all(&up).is_err() {
                            return;
                        }
                    }
                } else {
                    let _ = s.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    );
                }
            });
        }
    });
    addr
}

#[test]
fn websocket_upgrade_is_tunnelled_both_ways() {
    let up = upgrade_upstream();
    let port = free_port();
    let conf = format!(
        "server {{ listen 127.0.0.1:{port}; location /ws {{ proxy_pass http://{up}; }} }}\naccess_log off;\n"
    );
    let _gw = Gw::start(&conf, port);
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .expect("write");
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut b).expect("read head"),
            1,
            "connection closed during the 101"
        );
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    for msg in ["hello", "second message"] {
        s.write_all(msg.as_bytes()).expect("write frame");
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).expect("echo");
        assert_eq!(got, msg.to_ascii_uppercase().as_bytes());
    }
}

/// An upstream whose /healthz answers 200 or 503 depending on a switch.
fn switchable_upstream(name: &'static str, healthy: Arc<AtomicBool>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for s in l.incoming().map_while(Result::ok) {
            let healthy = healthy.clone();
            std::thread::spawn(move || {
                let mut s = s;
                let mut reader = BufReader::new(s.try_clone().expect("clone"));
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                    }
                    let (status, body) = if target == "/healthz" {
                        if healthy.load(Ordering::SeqCst) {
                            ("200 OK", "up".to_string())
                        } else {
                            ("503 Unavailable", "down".to_string())
                        }
                    } else {
                        ("200 OK", name.to_string())
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if s.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn get_body(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split("\r\n\r\n").nth(1).unwrap_or("").to_string()
}

#[test]
fn active_health_check_takes_a_server_out_and_back() {
    let a_ok = Arc::new(AtomicBool::new(true));
    let b_ok = Arc::new(AtomicBool::new(true));
    let a = switchable_upstream("a", a_ok.clone());
    let b = switchable_upstream("b", b_ok.clone());
    let port = free_port();
    let conf = format!(
        "upstream pool {{\n  server {a};\n  server {b};\n  health_check uri=/healthz interval=100ms timeout=500ms fails=2 passes=2;\n}}\n\
         access_log off;\nserver {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://pool; }} }}\n"
    );
    let gw = Gw::start(&conf, port);
    // Both serve at first.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..10 {
        seen.insert(get_body(port));
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    // b fails its checks: after two failures, only a serves.
    b_ok.store(false, Ordering::SeqCst);
    wait_until(Duration::from_secs(10), || gw.logged("health check: down"));
    for _ in 0..20 {
        assert_eq!(get_body(port), "a");
    }
    // b recovers: after two passes it is back.
    b_ok.store(true, Ordering::SeqCst);
    wait_until(Duration::from_secs(10), || gw.logged("health check: up"));
    wait_until(Duration::from_secs(5), || {
        (0..6).any(|_| get_body(port) == "b")
    });
}
