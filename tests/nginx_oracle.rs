//! NGINX as the oracle for location matching (LANGUAGE.md §3: "NGINX itself
//! can serve as a test oracle for routing").
//!
//! Random location sets (exact, prefix, `^~`, `~`, `~*`) are served by a real
//! `nginx` (each location answers its own index) and compiled by tollgate's
//! router; random paths must pick the same location in both. `.ci/run`
//! installs nginx; without it this test fails under CI and says why
//! elsewhere.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tollgate::compile::normalize::normalize_path;
use tollgate::compile::router::{Lookup, RouterBuilder, ServerNameSpec};
use tollgate::config::model::Modifier;

/// A small deterministic generator (xorshift), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick(&mut self, xs: &[&'static str]) -> &'static str {
        xs[(self.next() % xs.len() as u64) as usize]
    }
}

const PREFIXES: &[&str] = &[
    "/", "/a", "/a/", "/ab", "/a/b", "/a/b/", "/b", "/b/", "/b/c", "/api/", "/api/v1/", "/img",
    "/img/", "/A/",
];
const REGEXES: &[&str] = &[
    r"^/a/[0-9]+$",
    r"\.png$",
    r"\.(gif|jpg)$",
    r"^/b",
    r"/c$",
    r"^/api/v[0-9]/",
    r"^/A",
    r"b/c",
    r"^/img/.*\.png$",
    r"^/$",
];
const PATH_PIECES: &[&str] = &[
    "a", "b", "c", "ab", "api", "v1", "v2", "img", "A", "B", "12", "x.png", "y.PNG", "z.jpg", "",
];

fn random_locations(rng: &mut Rng) -> Vec<(Modifier, String)> {
    let mut out: Vec<(Modifier, String)> = Vec::new();
    let n = 4 + rng.next() % 12;
    for _ in 0..n {
        let kind = rng.next() % 5;
        let (m, p) = match kind {
            0 => (Modifier::Exact, rng.pick(PREFIXES).to_string()),
            1 | 2 => (Modifier::Prefix, rng.pick(PREFIXES).to_string()),
            3 => (Modifier::PrefixNoRegex, rng.pick(PREFIXES).to_string()),
            _ => {
                let m = if rng.next().is_multiple_of(2) {
                    Modifier::Regex
                } else {
                    Modifier::RegexCaseless
                };
                (m, rng.pick(REGEXES).to_string())
            }
        };
        // NGINX refuses duplicates (`/x` and `^~ /x` are the same location);
        // so does tollgate's checker: skip them here.
        let dup = out.iter().any(|(om, op)| {
            *op == p
                && (om == &m
                    || (matches!(om, Modifier::Prefix | Modifier::PrefixNoRegex)
                        && matches!(m, Modifier::Prefix | Modifier::PrefixNoRegex)))
        });
        if !dup {
            out.push((m, p));
        }
    }
    out
}

fn random_path(rng: &mut Rng) -> String {
    let n = 1 + rng.next() % 4;
    let mut p = String::new();
    for _ in 0..n {
        p.push('/');
        p.push_str(rng.pick(PATH_PIECES));
    }
    if rng.next().is_multiple_of(7) {
        p = p.replace('/', "//");
    }
    p
}

struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split(' ').nth(1)?.to_string();
    if status == "404" {
        return Some("404".into());
    }
    Some(out.split("\r\n\r\n").nth(1)?.trim().to_string())
}

#[test]
fn location_matching_agrees_with_nginx() {
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let Some(nginx) = nginx else {
        assert!(
            std::env::var_os("CI").is_none(),
            "nginx is required in CI (.ci/run installs it)"
        );
        eprintln!(
            "SKIPPED: nginx is not installed (apt-get install -y nginx); the oracle test did not run"
        );
        return;
    };
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let configs = 100;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut servers = String::new();
    let mut cases = Vec::new();
    // Hold every port until all are chosen, so no two servers share one.
    let held: Vec<TcpListener> = (0..configs)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let ports: Vec<u16> = held
        .iter()
        .map(|l| l.local_addr().expect("addr").port())
        .collect();
    drop(held);
    for port in ports {
        let locs = random_locations(&mut rng);
        let mut body = String::new();
        for (i, (m, p)) in locs.iter().enumerate() {
            let quoted = format!("\"{}\"", p.replace('\\', "\\\\"));
            body.push_str(&format!(
                "        location {} {} {{ return 200 \"{i}\"; }}\n",
                m.as_str(),
                quoted
            ));
        }
        servers.push_str(&format!(
            "    server {{\n        listen 127.0.0.1:{port};\n{body}    }}\n"
        ));
        cases.push((port, locs));
    }
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 256; }}\nhttp {{\n    access_log off;\n    default_type text/plain;\n{servers}}}\n",
        d = dir.path().display()
    );
    let conf_path = dir.path().join("nginx.conf");
    std::fs::write(&conf_path, conf).expect("write nginx.conf");
    let child = Command::new(nginx)
        .arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(&conf_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx");
    let _guard = Nginx(child);
    let first = cases[0].0;
    let end = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", first)).is_err() {
        assert!(Instant::now() < end, "nginx did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut compared = 0;
    let mut mismatches = Vec::new();
    for (port, locs) in &cases {
        let mut b = RouterBuilder::new();
        let s = b.server(
            &[(format!("127.0.0.1:{port}").parse().expect("addr"), false)],
            &[ServerNameSpec::Exact(String::new())],
        );
        for (m, p) in locs {
            b.location(s, *m, p, false).expect("location");
        }
        let router = b.build().expect("router");
        for _ in 0..60 {
            let path = random_path(&mut rng);
            let ours = match normalize_path(&path) {
                Err(_) => "400".to_string(),
                Ok(norm) => match router.lookup(s, &norm) {
                    Lookup::Found { location, .. } => location.to_string(),
                    Lookup::RedirectSlash { .. } => "301".to_string(),
                    Lookup::NotFound => "404".to_string(),
                },
            };
            let theirs = get(*port, &path).unwrap_or_else(|| "no answer".into());
            compared += 1;
            if ours != theirs {
                mismatches.push(format!(
                    "{path}: nginx {theirs}, tollgate {ours}; locations {locs:?}"
                ));
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {compared} paths differ:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    assert_eq!(compared, configs * 60);
}
