//! `tollgate reload` against a real running instance: checks first (an
//! invalid file never reaches the instance), then `POST /reload` on the
//! admin listener, and reports applied / rejected with its exit code.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn config(admin: u16, port: u16, extra: &str) -> String {
    format!(
        "admin {{ listen 127.0.0.1:{admin}; }}\naccess_log off;\n\
         server {{ listen 127.0.0.1:{port}; location / {{ return 200 \"ok\"; }} }}\n{extra}"
    )
}

struct Gw {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    admin: u16,
}

impl Gw {
    fn start(path: &Path, admin: u16, port: u16) -> Gw {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["run", "-c"])
            .arg(path)
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
            assert!(Instant::now() < end, "gateway did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        gw
    }

    /// The generation the instance serves (`GET /config`).
    fn generation(&self) -> u64 {
        let mut s = TcpStream::connect(("127.0.0.1", self.admin)).expect("admin");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(b"GET /config HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            .expect("send");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        let v: serde_json::Value = serde_json::from_str(body).expect("json");
        v["generation"].as_u64().expect("generation")
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

fn reload(path: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["reload", "-c"])
        .arg(path)
        .output()
        .expect("run tollgate reload")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn reload_applies_and_reports_the_generation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (admin, port) = (free_port(), free_port());
    let path = dir.path().join("gateway.conf");
    std::fs::write(&path, config(admin, port, "")).expect("write");
    let gw = Gw::start(&path, admin, port);
    assert_eq!(gw.generation(), 1);
    let out = reload(&path);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "applied: generation 2");
    assert_eq!(gw.generation(), 2);
}

#[test]
fn an_invalid_file_is_reported_and_never_reaches_the_instance() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (admin, port) = (free_port(), free_port());
    let path = dir.path().join("gateway.conf");
    std::fs::write(&path, config(admin, port, "")).expect("write");
    let gw = Gw::start(&path, admin, port);
    // A separate file (the instance does not watch it) naming the same admin.
    let bad = dir.path().join("next.conf");
    std::fs::write(&bad, config(admin, port, "proxy_pas http://x;\n")).expect("write");
    let out = reload(&bad);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("unknown_directive"), "{err}");
    assert!(err.contains("not reloaded"), "{err}");
    assert_eq!(
        gw.generation(),
        1,
        "the instance must not have been asked to reload"
    );
}

#[test]
fn a_rejection_by_the_instance_is_reported_with_its_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (admin, port) = (free_port(), free_port());
    let path = dir.path().join("gateway.conf");
    std::fs::write(&path, config(admin, port, "")).expect("write");
    let gw = Gw::start(&path, admin, port);
    // Valid for `check`, but the instance cannot bind the new address.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = taken.local_addr().expect("addr").port();
    let extra =
        format!("server {{ listen 127.0.0.1:{busy}; location / {{ return 200 \"two\"; }} }}\n");
    std::fs::write(&path, config(admin, port, &extra)).expect("write");
    let out = reload(&path);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(err.starts_with("rejected"), "{err}");
    assert!(err.contains(&busy.to_string()), "{err}");
    // Still serving the old config.
    assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
    drop(gw);
}

#[test]
fn without_an_admin_listener_reload_says_how_to_add_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.conf");
    std::fs::write(
        &path,
        "server { listen 127.0.0.1:1; location / { return 200; } }\n",
    )
    .expect("write");
    let out = reload(&path);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("admin { listen") && err.contains("SIGHUP"),
        "{err}"
    );
}
