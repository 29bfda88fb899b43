//! Listeners, the accept loop, graceful drain, and the one reload path.
//!
//! Every `listen` address gets one accept loop per worker. Each connection
//! is served by tollgate's own HTTP/1 connection ([`h1`], above the
//! [`guard`]), and by hyper's HTTP/2 for TLS's ALPN `h2` or when it starts
//! with the h2c preface (which [`h1`] hands over); every
//! request loads the current [`Gateway`] snapshot once. Reloads (SIGHUP
//! and config file changes) arrive on one channel, are checked with the
//! same functions `check` uses, and swap the snapshot atomically;
//! listeners are added and removed to match, and the ones that stay get
//! the new certificates and client limits for their next connections. The
//! outcome of each reload is published on a `watch` channel and logged.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};

use crate::config::diagnostics::{self, Diagnostics};
use crate::config::model::{ClientLimits, Config};
use crate::config::validate::load_config;
use crate::gateway::{Gateway, compile};
use crate::observe::metrics::{METRICS, ResultLabels};
use crate::proxy::forward::{ConnInfo, Shared};

pub mod admin;
pub mod guard;
pub mod h1;
pub mod memory;
pub mod tls;

/// Why serving could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot read `{path}`: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the config is invalid:\n{0}")]
    Invalid(String),
    #[error(transparent)]
    Compile(#[from] crate::gateway::CompileError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
}

/// The outcome of the latest (re)load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// Serving this generation.
    Applied { generation: u64 },
    /// The new config was rejected; the old one keeps serving.
    Rejected { generation: u64, reason: String },
}

/// Load, validate and compile; diagnostics rendered as text on failure.
pub fn load(
    path: &Path,
    generation: u64,
    previous: Option<&Gateway>,
) -> Result<Gateway, ServeError> {
    compile_loaded(path, load_config(path), generation, previous)
}

/// The rest of [`load`], for a config already read and validated (by
/// [`load_config`]).
fn compile_loaded(
    path: &Path,
    read: Result<
        (
            Option<crate::config::model::Config>,
            crate::config::parse::Loaded,
            crate::config::diagnostics::Diagnostics,
        ),
        std::io::Error,
    >,
    generation: u64,
    previous: Option<&Gateway>,
) -> Result<Gateway, ServeError> {
    let (config, loaded, diags) = read.map_err(|source| ServeError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let compiled = match config {
        Some(c) if !diags.has_errors() => {
            log_warnings(&diags, &loaded.sources);
            compile(c, generation, previous).map_err(ServeError::from)
        }
        _ => Err(ServeError::Invalid(diagnostics::render_human(
            &diags.sorted(),
            &loaded.sources,
            false,
            100,
        ))),
    };
    // The syntax tree and the sources are done with: dropped, and what
    // parsing freed given back, off this path where the allocator allows
    // (a tree of 10,000 locations took 10-15 ms to drop).
    let trim = compiled
        .as_ref()
        .map_or_else(|_| memory::enabled(), |g| g.config.memory_trim);
    memory::dispose_after_load((loaded, diags), trim);
    compiled
}

fn log_warnings(diags: &Diagnostics, sources: &crate::config::source::SourceMap) {
    for d in diags.iter() {
        let (lc, _) = sources.line_col(d.span);
        tracing::warn!(
            code = d.code,
            "{}:{}:{}: {}",
            sources.path(d.span.file).display(),
            lc.line,
            lc.column,
            d.message
        );
    }
}

/// Run the gateway until SIGTERM/SIGINT. Returns the process exit code.
pub fn run(path: &Path) -> Result<i32, ServeError> {
    // The thread count comes from the config: read and validated once, up
    // front; compiled inside the runtime (policies may start tasks). (Read
    // twice, a config of 10,000 locations took twice as long to serve.)
    let read = load_config(path);
    let threads = read
        .as_ref()
        .ok()
        .and_then(|(c, _, _)| c.as_ref())
        .and_then(|c| c.worker_threads)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
    // One current-thread runtime per worker, each with its own
    // SO_REUSEPORT socket per address: a connection and its upstream
    // connections live on one thread (DESIGN.md: this kept the tail flat at
    // 1,000 connections where a shared multi-thread runtime did not). The
    // control plane (signals, reload, admin, health checks) has its own.
    #[cfg(feature = "otlp")]
    crate::observe::otlp::start();
    let workers = Workers::start(threads).map_err(ServeError::Runtime)?;
    let _ = WORKERS.set(workers.handles.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    let code = rt.block_on(async {
        let gw = compile_loaded(path, read, 1, None)?;
        serve(path.to_path_buf(), gw).await
    });
    workers.stop();
    code
}

/// Handles of the worker runtimes (set once by [`run`]).
static WORKERS: std::sync::OnceLock<Vec<tokio::runtime::Handle>> = std::sync::OnceLock::new();

/// The runtimes connections are served on: the workers, or the current
/// runtime when there are none (embedding, tests).
fn worker_handles() -> Vec<tokio::runtime::Handle> {
    match WORKERS.get() {
        Some(h) if !h.is_empty() => h.clone(),
        _ => vec![tokio::runtime::Handle::current()],
    }
}

/// The worker threads, each driving a current-thread runtime until stopped.
struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    fn start(n: usize) -> std::io::Result<Workers> {
        let mut w = Workers {
            handles: Vec::new(),
            stops: Vec::new(),
            threads: Vec::new(),
        };
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            w.handles.push(rt.handle().clone());
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            w.stops.push(tx);
            w.threads.push(
                std::thread::Builder::new()
                    .name(format!("tollgate-worker-{i}"))
                    .spawn(move || {
                        // A request's and a connection's state, freed
                        // and made again all the time, kept here for the
                        // next (`tollgate::alloc`).
                        crate::alloc::keep_on_this_thread();
                        rt.block_on(async {
                            let _ = rx.await;
                        });
                    })?,
            );
        }
        Ok(w)
    }

    fn stop(self) {
        for s in self.stops {
            let _ = s.send(());
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

struct ListenerHandle {
    stop: watch::Sender<bool>,
    /// One accept loop per worker.
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The TLS config new connections get (`None`: plain); swapped on reload.
    tls: tls::ListenerTls,
    /// The client limits new connections get; swapped on reload.
    limits: Arc<ArcSwap<ClientLimits>>,
    /// The `max_connections` semaphore new connections take a permit
    /// from (`None`: no limit); replaced when a reload changes the limit.
    permits: Arc<ArcSwapOption<Semaphore>>,
}

impl ListenerHandle {
    /// A reload's limits for this address: connections accepted from now
    /// on get them (those already open keep theirs, as NGINX's old
    /// workers do). A changed `max_connections` starts a new count.
    fn update_limits(&self, new: &ClientLimits) {
        let old = self.limits.load_full();
        if *old == *new {
            return;
        }
        if old.max_connections != new.max_connections {
            self.permits
                .store(new.max_connections.map(|n| Arc::new(Semaphore::new(n))));
        }
        self.limits.store(Arc::new(new.clone()));
    }

    /// Stop accepting and wait until the socket is closed and the accept
    /// task, with its handle on the graceful-shutdown tracker, is gone.
    async fn close(self) {
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Client-side limits of the server(s) on each address (first server wins).
fn limits_by_addr(config: &Config) -> HashMap<SocketAddr, ClientLimits> {
    let mut m = HashMap::new();
    for s in &config.servers {
        for l in &s.listens {
            m.entry(l.addr).or_insert_with(|| s.limits.clone());
        }
    }
    m
}

async fn serve(path: PathBuf, gw: Gateway) -> Result<i32, ServeError> {
    let shutdown_timeout = gw.config.shutdown_timeout;
    memory::set_enabled(gw.config.memory_trim);
    let files = gw.config.files.clone();
    let limits = limits_by_addr(&gw.config);
    let tls_configs = gw.tls.listeners.clone();
    crate::proxy::health::start(&gw);
    let shared = Arc::new(Shared::new(gw));
    let graceful = Drain::new();
    let mut listeners: HashMap<SocketAddr, ListenerHandle> = HashMap::new();
    for (addr, lim) in &limits {
        let tls = tls_configs.get(addr).cloned();
        let h = start_listener(*addr, lim.clone(), tls, shared.clone(), graceful.clone()).await?;
        listeners.insert(*addr, h);
    }
    let (outcome_tx, outcome_rx) = watch::channel(ReloadOutcome::Applied { generation: 1 });
    let (ready_tx, ready_rx) = watch::channel(true);
    let _ = &ready_tx;
    METRICS.config_generation.set(1);

    let (reload_tx, mut reload_rx) = mpsc::channel::<&'static str>(4);
    let admin_ctx = admin::AdminCtx {
        shared: shared.clone(),
        reload_tx: reload_tx.clone(),
        outcome: outcome_rx.clone(),
        ready: ready_rx.clone(),
    };
    let mut admin_task: Option<(crate::config::model::Admin, watch::Sender<bool>)> = None;
    let start_admin = |a: &crate::config::model::Admin| {
        let (stop_tx, stop_rx) = watch::channel(false);
        let a2 = a.clone();
        let ctx = admin_ctx.clone();
        async move {
            match admin::start(&a2, ctx, stop_rx).await {
                Ok(_) => Some((a2, stop_tx)),
                Err(e) => {
                    tracing::error!(addr = %a2.listen, error = %e, "cannot start the admin listener");
                    None
                }
            }
        }
    };
    if let Some(a) = shared.gateway.load().config.admin.clone() {
        admin_task = start_admin(&a).await;
    }
    let _watcher = watch_files(&files, reload_tx.clone());
    #[cfg(unix)]
    {
        let tx = reload_tx.clone();
        if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    let _ = tx.send("SIGHUP").await;
                }
            });
        }
    }
    let mut term = {
        #[cfg(unix)]
        {
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok()
        }
    };
    // Only now is a SIGHUP or a file change sure to be seen: "serving"
    // means ready for both (a SIGHUP before the handler exists kills us).
    tracing::info!(generation = 1, "serving {}", path.display());
    let mut generation = 1u64;
    loop {
        let why = tokio::select! {
            r = reload_rx.recv() => match r { Some(w) => w, None => continue },
            _ = tokio::signal::ctrl_c() => break,
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => break,
        };
        generation += 1;
        let prev = shared.gateway.load_full();
        match load(&path, generation, Some(&prev)) {
            Ok(new) => {
                let want = limits_by_addr(&new.config);
                let mut bind_error = None;
                let mut started = Vec::new();
                for (addr, lim) in &want {
                    if !listeners.contains_key(addr) {
                        let tls = new.tls.listeners.get(addr).cloned();
                        match start_listener(
                            *addr,
                            lim.clone(),
                            tls,
                            shared.clone(),
                            graceful.clone(),
                        )
                        .await
                        {
                            Ok(h) => {
                                listeners.insert(*addr, h);
                                started.push(*addr);
                            }
                            Err(e) => bind_error = Some(e.to_string()),
                        }
                    }
                }
                if let Some(reason) = bind_error {
                    METRICS
                        .reloads
                        .get_or_create(&ResultLabels {
                            result: "rejected".into(),
                        })
                        .inc();
                    // The old config keeps serving: it has no such listeners.
                    for a in started {
                        if let Some(h) = listeners.remove(&a) {
                            h.close().await;
                        }
                    }
                    tracing::error!(generation, reason = %reason, trigger = why, "reload rejected");
                    let _ = outcome_tx.send(ReloadOutcome::Rejected { generation, reason });
                    continue;
                }
                let gone: Vec<SocketAddr> = listeners
                    .keys()
                    .filter(|a| !want.contains_key(a))
                    .copied()
                    .collect();
                for a in gone {
                    if let Some(h) = listeners.remove(&a) {
                        h.close().await;
                        tracing::info!(addr = %a, "listener closed");
                    }
                }
                crate::proxy::health::start(&new);
                // Certificates were re-read with the new snapshot; the next
                // handshake on each listener uses them, and the next
                // connection the new client limits.
                for (addr, h) in &listeners {
                    h.tls.store(new.tls.listeners.get(addr).cloned());
                    if let Some(l) = want.get(addr) {
                        h.update_limits(l);
                    }
                }
                let new_admin = new.config.admin.clone();
                memory::set_enabled(new.config.memory_trim);
                shared.gateway.store(Arc::new(new));
                crate::observe::access_log::reopen_all();
                crate::gateway::CACHES.retain(&shared.gateway.load().config.caches);
                let admin_changed = admin_task.as_ref().map(|(a, _)| a.listen)
                    != new_admin.as_ref().map(|a| a.listen)
                    || admin_task.as_ref().map(|(a, _)| &a.allow)
                        != new_admin.as_ref().map(|a| &a.allow);
                if admin_changed {
                    if let Some((_, stop)) = admin_task.take() {
                        let _ = stop.send(true);
                    }
                    if let Some(a) = &new_admin {
                        admin_task = start_admin(a).await;
                    }
                }
                METRICS
                    .reloads
                    .get_or_create(&ResultLabels {
                        result: "applied".into(),
                    })
                    .inc();
                METRICS.config_generation.set(generation as i64);
                tracing::info!(generation, trigger = why, "reload applied");
                let _ = outcome_tx.send(ReloadOutcome::Applied { generation });
            }
            Err(e) => {
                METRICS
                    .reloads
                    .get_or_create(&ResultLabels {
                        result: "rejected".into(),
                    })
                    .inc();
                tracing::error!(
                    generation,
                    trigger = why,
                    "reload rejected, the previous config keeps serving:\n{e}"
                );
                let _ = outcome_tx.send(ReloadOutcome::Rejected {
                    generation,
                    reason: e.to_string(),
                });
            }
        }
    }
    tracing::info!("shutting down: no new connections; waiting for in-flight requests");
    for (_, h) in listeners.drain() {
        h.close().await;
    }
    match tokio::time::timeout(shutdown_timeout, graceful.shutdown()).await {
        Ok(()) => {
            tracing::info!("all requests finished");
            Ok(0)
        }
        Err(_) => {
            tracing::warn!("shutdown_timeout reached with requests still in flight");
            Ok(1)
        }
    }
}

/// `n` sockets bound to `addr` with SO_REUSEPORT (the kernel spreads new
/// connections over them); with port 0, all share the first one's port.
fn bind(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let mut out: Vec<std::net::TcpListener> = Vec::with_capacity(n);
    let mut target = addr;
    for _ in 0..n.max(1) {
        let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
        s.set_reuse_address(true)?;
        #[cfg(unix)]
        s.set_reuse_port(true)?;
        if addr.is_ipv6() {
            let _ = s.set_only_v6(true);
        }
        s.set_nonblocking(true)?;
        // Accepted sockets inherit TCP_NODELAY from the listener on Linux:
        // one system call per listener, not one per connection.
        #[cfg(target_os = "linux")]
        s.set_tcp_nodelay(true)?;
        s.bind(&target.into())?;
        s.listen(4096)?;
        let l: std::net::TcpListener = s.into();
        if target.port() == 0 {
            target = l.local_addr()?;
        }
        out.push(l);
    }
    Ok(out)
}

async fn start_listener(
    addr: SocketAddr,
    limits: ClientLimits,
    tls_config: Option<Arc<rustls::ServerConfig>>,
    shared: Arc<Shared>,
    graceful: Drain,
) -> Result<ListenerHandle, ServeError> {
    let handles = worker_handles();
    let sockets = bind(addr, handles.len()).map_err(|source| ServeError::Bind { addr, source })?;
    let local = sockets
        .first()
        .and_then(|l| l.local_addr().ok())
        .unwrap_or(addr);
    tracing::info!(addr = %local, tls = tls_config.is_some(), workers = handles.len(), "listening on {local}");
    let (stop, stopped) = watch::channel(false);
    let tls = tls::listener_tls(tls_config);
    // Above max_connections (per listener, all workers together),
    // connections wait in the accept queue.
    let permits = Arc::new(ArcSwapOption::from(
        limits.max_connections.map(|n| Arc::new(Semaphore::new(n))),
    ));
    let limits = Arc::new(ArcSwap::from_pointee(limits));
    let mut tasks = Vec::with_capacity(handles.len());
    for (h, socket) in handles.iter().zip(sockets) {
        tasks.push(h.spawn(accept_loop(
            socket,
            local,
            limits.clone(),
            tls.clone(),
            permits.clone(),
            shared.clone(),
            graceful.clone(),
            stopped.clone(),
        )));
    }
    Ok(ListenerHandle {
        stop,
        tasks,
        tls,
        limits,
        permits,
    })
}

/// Accept connections on one worker's socket and serve each in a task of
/// that worker.
#[allow(clippy::too_many_arguments)]
async fn accept_loop(
    socket: std::net::TcpListener,
    local: SocketAddr,
    limits_now: Arc<ArcSwap<ClientLimits>>,
    tls_now: tls::ListenerTls,
    permits_now: Arc<ArcSwapOption<Semaphore>>,
    shared: Arc<Shared>,
    graceful: Drain,
    mut stopped: watch::Receiver<bool>,
) {
    let listener = match TcpListener::from_std(socket) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(addr = %local, error = %e, "cannot register the listening socket");
            return;
        }
    };
    // The listener's settings as last loaded: each accept compares one
    // pointer with the current one (a reload swaps them) instead of a
    // full load of each.
    let mut limits_now = arc_swap::Cache::new(limits_now);
    let mut tls_now = arc_swap::Cache::new(tls_now);
    let mut permits_now = arc_swap::Cache::new(permits_now);
    loop {
        // Told to stop: asked here (a version compare), so that the select
        // below can poll the accept first and set up no wait on the stop
        // signal while connections are ready (it did on every other accept,
        // its polling order being random).
        if stopped.has_changed().unwrap_or(true) {
            return;
        }
        let accepted = tokio::select! {
            biased;
            a = listener.accept() => a,
            _ = stopped.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Above max_connections the accepted connection waits for a permit
        // and this worker accepts nothing more meanwhile: the rest wait in
        // the kernel's accept queue. (Taking the permit after `accept`
        // keeps workers from hoarding permits while idle.)
        let permit = match permits_now.load().clone() {
            Some(p) => tokio::select! {
                p = p.acquire_owned() => match p {
                    Ok(p) => Some(p),
                    Err(_) => return,
                },
                _ = stopped.changed() => return,
            },
            None => None,
        };
        #[cfg(not(target_os = "linux"))]
        let _ = stream.set_nodelay(true);
        let tls_config = tls_now.load().clone();
        let conn = Conn {
            shared: shared.clone(),
            info: ConnInfo {
                // Known for a specific address; asked (a syscall) only
                // for a wildcard one.
                local: if local.ip().is_unspecified() {
                    stream.local_addr().unwrap_or(local)
                } else {
                    local
                },
                peer,
                tls: tls_config.is_some(),
            },
            limits: ClientLimits::clone(limits_now.load()),
            watcher: graceful.watcher(),
        };
        METRICS.connections_active.inc();
        // The connection's future goes into a box of its own first (written
        // there, not built on the stack and copied): the task then holds a
        // pointer, and tokio's moves of the task's stage (into its cell, and
        // over it when it finishes: a copy of the stage's whole size each)
        // move eight bytes instead of the ~700 of the serving state.
        tokio::spawn(Box::into_pin(Box::write(Box::new_uninit(), async move {
            match tls_config {
                None => {
                    // Served at once: HTTP/1 framing is checked below the
                    // parser (see `guard`, which also closes a connection
                    // that sends nothing within `client_header_timeout`);
                    // one that starts with the h2 preface goes to hyper's
                    // HTTP/2 (see `h1`). No peek first (it was a system
                    // call per connection); waiting for readiness instead
                    // does not help: tokio reports a new socket readable
                    // at once. So a silent connection holds its serving
                    // state (~6 KiB, no buffers) from the accept on.
                    let (stream, gh) = guard::Guard::boxed(stream, &conn.limits);
                    conn.serve_h1(stream, gh).await
                }
                // The handshake runs here, in the connection's own task;
                // boxed, so that plain connections' tasks are not sized
                // for TLS's state.
                Some(cfg) => Box::pin(serve_tls(conn, stream, cfg, peer)).await,
            }
            METRICS.connections_active.dec();
            drop(permit);
        })));
    }
}

/// A TLS connection: the handshake, then HTTP/2 or HTTP/1 as ALPN says.
async fn serve_tls(
    conn: Conn,
    stream: tokio::net::TcpStream,
    cfg: Arc<rustls::ServerConfig>,
    peer: SocketAddr,
) {
    match Box::pin(tls::handshake(stream, cfg, conn.limits.header_timeout)).await {
        Ok((stream, tls::Alpn::H2)) => Box::pin(conn.serve_h2(TokioIo::new(stream), None)).await,
        Ok((stream, _)) => {
            let (stream, gh) = guard::Guard::boxed(stream, &conn.limits);
            Box::pin(conn.serve_h1(stream, gh)).await
        }
        Err(e) => tracing::debug!(peer = %peer, error = %e, "TLS handshake failed"),
    }
}

/// The graceful drain: every connection holds a receiver; shutting down
/// tells them all to finish (hyper's graceful shutdown: in-flight requests
/// complete, idle connections close) and waits until the last is gone.
#[derive(Clone)]
struct Drain {
    tx: Arc<watch::Sender<bool>>,
}

impl Drain {
    fn new() -> Drain {
        Drain {
            tx: Arc::new(watch::channel(false).0),
        }
    }

    fn watcher(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }

    async fn shutdown(&self) {
        self.tx.send_replace(true);
        self.tx.closed().await;
    }
}

/// Drive one connection to its end; when the drain starts, ask it to shut
/// down gracefully and keep driving it until it has.
async fn drive<C, E>(conn: C, mut stop: watch::Receiver<bool>, shutdown: fn(Pin<&mut C>))
where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut conn = std::pin::pin!(conn);
    // The drain signal is looked at for real only when the watch moved (an
    // atomic load) or the task's waker changed: polling it registers a
    // waker under a lock, and the connection is polled several times per
    // request.
    let peek = stop.clone();
    let mut signal = std::pin::pin!(stopping(&mut stop));
    let mut registered: Option<std::task::Waker> = None;
    let stop_signal = std::future::poll_fn(|cx| {
        if let Some(w) = &registered
            && w.will_wake(cx.waker())
            && !peek.has_changed().unwrap_or(true)
        {
            return std::task::Poll::Pending;
        }
        let r = signal.as_mut().poll(cx);
        if r.is_pending() {
            registered = Some(cx.waker().clone());
        }
        r
    });
    let r = tokio::select! {
        biased;
        r = conn.as_mut() => r,
        _ = stop_signal => {
            shutdown(conn.as_mut());
            conn.await
        }
    };
    if let Err(e) = r {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Resolves once the drain has started (never if the drain is gone).
async fn stopping(stop: &mut watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// An HTTP/1 connection's requests go through the guard to the pipeline.
struct Pipeline {
    shared: Arc<Shared>,
    info: ConnInfo,
    guard: guard::GuardHandle,
}

impl h1::Handler for Pipeline {
    fn call<'s>(
        &'s mut self,
        req: &'s mut Option<hyper::Request<crate::proxy::body::RequestBody>>,
    ) -> impl std::future::Future<Output = crate::proxy::forward::Answered> + 's {
        guard::serve(&self.guard, &self.shared, self.info, req)
    }
}

/// One accepted connection, served over a plain or TLS stream.
struct Conn {
    shared: Arc<Shared>,
    info: ConnInfo,
    limits: ClientLimits,
    watcher: watch::Receiver<bool>,
}

impl Conn {
    /// Serve HTTP/1 on a guarded stream with tollgate's own connection
    /// ([`h1`]) until it closes.
    async fn serve_h1(self, io: Box<dyn h1::Stream>, guard: guard::GuardHandle) {
        let handler = Pipeline {
            shared: self.shared.clone(),
            info: self.info,
            guard: guard.clone(),
        };
        // Boxed here: the connection's state at its own size (written into
        // its box, not built and then copied there).
        let h2c = Box::into_pin(Box::write(
            Box::new_uninit(),
            h1::serve(io, handler, self.watcher.clone(), self.info.tls),
        ))
        .await;
        if let Some(up) = h2c {
            // h2c with prior knowledge: hyper's HTTP/2 from the preface on.
            let io = TokioIo::new(h1::Rewind::new(up));
            Box::pin(self.serve_h2(io, Some(guard))).await
        }
    }

    /// Serve HTTP until the connection closes.
    async fn serve_h2<I>(self, io: I, guard: Option<guard::GuardHandle>)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let Conn {
            shared,
            info,
            limits: _,
            watcher,
        } = self;
        let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let (shared, guard) = (shared.clone(), guard.clone());
            let req = req.map(crate::proxy::body::RequestBody::Hyper);
            async move {
                let mut req = Some(req);
                let answered = match &guard {
                    Some(gh) => guard::serve(gh, &shared, info, &mut req).await,
                    None => crate::proxy::forward::handle(&shared, info, &mut req, None).await,
                };
                // Passed-through header lines are for HTTP/1's writer (an
                // HTTP/2 request never asks for them): back into the map.
                Ok::<_, std::convert::Infallible>(answered.into_response())
            }
        });
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder.timer(TokioTimer::new());
        let conn = builder.serve_connection(io, svc);
        // Boxed here, at its own size.
        Box::pin(drive(conn, watcher, |c| c.graceful_shutdown())).await;
    }
}

/// Watch the directories of every config file (editors save by rename),
/// debounced, and send a reload on any change to one of the files.
fn watch_files(
    files: &[PathBuf],
    tx: mpsc::Sender<&'static str>,
) -> Option<
    notify_debouncer_full::Debouncer<
        notify::RecommendedWatcher,
        notify_debouncer_full::RecommendedCache,
    >,
> {
    use notify::RecursiveMode;
    let watched: Vec<PathBuf> = files
        .iter()
        .map(|f| std::fs::canonicalize(f).unwrap_or_else(|_| f.clone()))
        .collect();
    let names = watched.clone();
    let mut debouncer = notify_debouncer_full::new_debouncer(
        Duration::from_millis(200),
        None,
        move |res: notify_debouncer_full::DebounceEventResult| {
            if let Ok(events) = res {
                // Opening and reading a file (as every reload does) is an
                // access event: only changes may trigger a reload, or one
                // change would reload forever.
                let hit = events
                    .iter()
                    .filter(|e| !matches!(e.kind, notify::EventKind::Access(_)))
                    .any(|e| {
                        e.paths.iter().any(|p| {
                            let p = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
                            names.iter().any(|n| {
                                *n == p
                                    || n.file_name() == p.file_name() && n.parent() == p.parent()
                            })
                        })
                    });
                if hit {
                    let _ = tx.try_send("file change");
                }
            }
        },
    )
    .ok()?;
    let mut dirs: Vec<PathBuf> = watched
        .iter()
        .filter_map(|f| f.parent().map(Path::to_path_buf))
        .collect();
    dirs.sort();
    dirs.dedup();
    for d in dirs {
        if let Err(e) = debouncer.watch(&d, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %d.display(), error = %e, "cannot watch config directory");
        }
    }
    Some(debouncer)
}
