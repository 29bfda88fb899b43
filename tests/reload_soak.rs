//! Reload under sustained load (LANGUAGE.md §11: "no connection is
//! dropped"): tens of thousands of requests over keep-alive HTTP/1.1, a new
//! connection per request and h2c while the config alternates between two
//! versions; and many reloads leave file descriptors and memory where they
//! were. Figures are printed (`--nocapture`) and recorded in
//! bench/RESULTS.md, "Reload soak".

mod util;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use util::*;

/// Requests the first test must complete, across all clients.
const MIN_REQUESTS: usize = 20_000;
/// Reloads in the first test.
const RELOADS: usize = 20;
/// How long the first test may keep going to reach [`MIN_REQUESTS`].
const SOAK_DEADLINE: Duration = Duration::from_secs(120);

/// Config `which` (0 or 1): every path proxied to its own upstream, whose
/// body names the config. `access_log off` so that the client, not log
/// writing, is what limits the request rate.
fn config(which: usize, up: &TestUpstream) -> String {
    let extra = if which == 0 {
        ""
    } else {
        "    location = /only-b { return 200 \"b\"; }\n"
    };
    format!(
        "access_log off;\nserver {{\n    listen @PORT@;\n    location / {{ proxy_pass http://{}; }}\n{extra}}}\n",
        up.addr()
    )
}

/// Apply `text`, by rename (file watcher) or by in-place write and SIGHUP,
/// and require that it was applied.
fn apply(gw: &Gateway, text: &str, sighup: bool) {
    let outcome = if sighup {
        gw.write_config(text);
        gw.reload()
    } else {
        gw.rewrite_config(text)
    };
    assert!(matches!(outcome, Reload::Applied(_)), "{outcome:?}");
}

/// Requests completed by every client, with a condition variable the
/// clients signal every [`NOTIFY_EVERY`] requests.
#[derive(Default)]
struct Progress {
    done: Mutex<usize>,
    cv: Condvar,
}

const NOTIFY_EVERY: usize = 50;

impl Progress {
    fn add(&self, n: usize) {
        *self.done.lock().expect("progress") += n;
        self.cv.notify_all();
    }

    /// Wait until at least `n` requests are done, or `deadline`; returns
    /// the count.
    fn wait_for(&self, n: usize, deadline: Instant) -> usize {
        let mut d = self.done.lock().expect("progress");
        while *d < n {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            d = self.cv.wait_timeout(d, deadline - now).expect("progress").0;
        }
        *d
    }
}

/// What one client thread saw.
#[derive(Default)]
struct Tally {
    ok: usize,
    per_body: [usize; 2],
    bad: Vec<String>,
}

type MakeClient = fn() -> Client;

/// Start the three kinds of client (two of each), looping on `path` until
/// `stop`; each response must be a 200 with one of `bodies`.
fn clients(
    url: &str,
    stop: &Arc<AtomicBool>,
    progress: &Arc<Progress>,
    bodies: [&'static str; 2],
) -> Vec<(&'static str, std::thread::JoinHandle<Tally>)> {
    let kinds: [(&'static str, MakeClient); 3] = [
        ("keep-alive", Client::new),
        ("fresh", Client::fresh),
        ("h2c", Client::h2),
    ];
    let mut out = Vec::new();
    for (name, make) in kinds.iter().chain(kinds.iter()) {
        let (url, stop, progress) = (url.to_string(), stop.clone(), progress.clone());
        let make = *make;
        out.push((
            *name,
            std::thread::spawn(move || {
                let client = make();
                let mut t = Tally::default();
                let mut pending = 0;
                while !stop.load(Ordering::Relaxed) {
                    match client.try_request("GET", &url, &[], "") {
                        Ok(r) if r.status == 200 && bodies.contains(&r.text().as_str()) => {
                            t.ok += 1;
                            t.per_body[usize::from(r.text() == bodies[1])] += 1;
                        }
                        Ok(r) => t.bad.push(format!("{} {:?}", r.status, r.text())),
                        Err(e) => t.bad.push(e),
                    }
                    pending += 1;
                    if pending == NOTIFY_EVERY {
                        progress.add(pending);
                        pending = 0;
                    }
                }
                progress.add(pending);
                t
            }),
        ));
    }
    out
}

#[test]
fn twenty_thousand_requests_across_twenty_reloads_all_succeed() {
    let ups = [
        TestUpstream::with("A", |_| Reply::text("config-A")),
        TestUpstream::with("B", |_| Reply::text("config-B")),
    ];
    let confs = [config(0, &ups[0]), config(1, &ups[1])];
    let gw = Gateway::start(&confs[0]);
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(Progress::default());
    let started = Instant::now();
    let workers = clients(&gw.url("/soak"), &stop, &progress, ["config-A", "config-B"]);
    let deadline = started + SOAK_DEADLINE;
    let per_reload = MIN_REQUESTS / RELOADS;
    let probe = Client::fresh();
    for i in 1..=RELOADS {
        // Let the current config serve its share before replacing it.
        let want = per_reload * i;
        let got = progress.wait_for(want, deadline);
        assert!(got >= want, "only {got} requests after {i} reloads");
        let which = i % 2;
        apply(&gw, &confs[which], i % 4 >= 2);
        // A request on a new connection after the reload sees the new config.
        let r = probe.get(&gw.url("/probe"));
        assert_eq!(
            (r.status, r.text()),
            (200, format!("config-{}", ["A", "B"][which]))
        );
    }
    let got = progress.wait_for(MIN_REQUESTS + per_reload, deadline);
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();

    let mut total = 0;
    let mut bad = Vec::new();
    let mut by_kind: Vec<String> = Vec::new();
    let mut per_body = [0; 2];
    for (kind, w) in workers {
        let t = w.join().expect("client thread");
        total += t.ok + t.bad.len();
        per_body[0] += t.per_body[0];
        per_body[1] += t.per_body[1];
        by_kind.push(format!("{kind}={}", t.ok + t.bad.len()));
        bad.extend(t.bad);
    }
    let reloads = gw.reloads();
    println!(
        "reload soak: {total} requests in {:.1} s ({:.0}/s) across {} reloads ({} applied by test); by client: {}; bodies: config-A={} config-B={}; errors={}",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        reloads.len(),
        RELOADS,
        by_kind.join(" "),
        per_body[0],
        per_body[1],
        bad.len(),
    );
    assert!(bad.is_empty(), "{} failed requests: {bad:?}", bad.len());
    assert!(
        got >= MIN_REQUESTS && total >= MIN_REQUESTS,
        "only {total} requests in {elapsed:?}"
    );
    assert!(per_body[0] > 0 && per_body[1] > 0, "{per_body:?}");
    assert!(
        reloads.iter().all(|r| matches!(r, Reload::Applied(_))),
        "{reloads:?}"
    );
    assert!(reloads.len() >= RELOADS, "{reloads:?}");
}

/// Open file descriptors of `pid`.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .count()
}

/// Resident set size of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Poll (bounded) until `pred(fd count)` holds; returns the last count.
fn wait_fds(pid: u32, what: &str, pred: impl Fn(usize) -> bool) -> usize {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let n = fd_count(pid);
        if pred(n) {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {n} fds after {DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A burst of requests on every kind of client, which are then dropped (so
/// their connections close).
fn burst(gw: &Gateway, n: usize) {
    for make in [Client::new, Client::fresh, Client::h2] {
        let c = make();
        for _ in 0..n {
            let r = c.get(&gw.url("/burst"));
            assert_eq!(r.status, 200, "{}", r.text());
        }
    }
}

#[test]
fn fifty_reloads_leave_fds_and_rss_flat() {
    const FD_SLACK: usize = 4;
    const RSS_SLACK_KIB: u64 = 20 * 1024;
    let ups = [
        TestUpstream::with("A", |_| Reply::text("config-A")),
        TestUpstream::with("B", |_| Reply::text("config-B")),
    ];
    let confs = [config(0, &ups[0]), config(1, &ups[1])];
    let gw = Gateway::start(&confs[0]);
    let pid = gw.pid();

    // Warm up: both configs once, every client kind, so pools, allocator
    // arenas and the watcher have reached their working size.
    let at_start = fd_count(pid);
    for which in [1, 0] {
        burst(&gw, 200);
        apply(&gw, &confs[which], false);
    }
    burst(&gw, 200);
    // The clients are gone: wait for their connections to close on the
    // gateway's side (upstream connections stay pooled).
    let fds_before = wait_fds(pid, "after warm-up", |n| n <= at_start + 2 * FD_SLACK);
    let rss_before = rss_kib(pid);

    for i in 1..=50 {
        apply(&gw, &confs[i % 2], i % 4 >= 2);
        burst(&gw, 10);
    }
    let reloads = gw.reloads().len();
    let fds_after = wait_fds(pid, "after 50 reloads", |n| n <= fds_before + FD_SLACK);
    let rss_after = rss_kib(pid);
    println!(
        "fifty reloads: {reloads} reloads applied; fds at start {at_start}, after warm-up {fds_before}, after reloads {fds_after}; RSS after warm-up {rss_before} KiB, after reloads {rss_after} KiB ({:+} KiB)",
        rss_after as i64 - rss_before as i64
    );
    assert!(reloads >= 52, "{reloads}");
    assert!(
        rss_after <= rss_before + RSS_SLACK_KIB,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
}
