//! Listeners, the accept loop, graceful drain, and the one reload path.
//!
//! Every `listen` address gets one accept loop. Each connection is served by
//! hyper-util's auto builder (HTTP/1.1, or h2c with prior knowledge) and
//! every request loads the current [`Gateway`] snapshot once. Reloads (SIGHUP
//! and config file changes) arrive on one channel, are checked with the same
//! functions `check` uses, and swap the snapshot atomically; listeners are
//! added and removed to match. The outcome of each reload is published on a
//! `watch` channel and logged.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
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
    let (config, loaded, diags) = load_config(path).map_err(|source| ServeError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    match config {
        Some(c) if !diags.has_errors() => {
            log_warnings(&diags, &loaded.sources);
            Ok(compile(c, generation, previous)?)
        }
        _ => Err(ServeError::Invalid(diagnostics::render_human(
            &diags.sorted(),
            &loaded.sources,
            false,
            100,
        ))),
    }
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
    let gw = load(path, 1, None)?;
    let threads = gw.config.worker_threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    rt.block_on(serve(path.to_path_buf(), gw))
}

struct ListenerHandle {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
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
    let files = gw.config.files.clone();
    let limits = limits_by_addr(&gw.config);
    crate::proxy::health::start(&gw);
    let shared = Arc::new(Shared::new(gw));
    let graceful = Arc::new(GracefulShutdown::new());
    let mut listeners: HashMap<SocketAddr, ListenerHandle> = HashMap::new();
    for (addr, lim) in &limits {
        let h = start_listener(*addr, lim.clone(), shared.clone(), graceful.clone()).await?;
        listeners.insert(*addr, h);
    }
    let (outcome_tx, outcome_rx) = watch::channel(ReloadOutcome::Applied { generation: 1 });
    let (ready_tx, ready_rx) = watch::channel(true);
    let _ = &ready_tx;
    tracing::info!(generation = 1, "serving {}", path.display());
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
                for (addr, lim) in &want {
                    if !listeners.contains_key(addr) {
                        match start_listener(*addr, lim.clone(), shared.clone(), graceful.clone())
                            .await
                        {
                            Ok(h) => {
                                listeners.insert(*addr, h);
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
                        let _ = h.stop.send(true);
                        h.task.abort();
                        tracing::info!(addr = %a, "listener closed");
                    }
                }
                crate::proxy::health::start(&new);
                let new_admin = new.config.admin.clone();
                shared.gateway.store(Arc::new(new));
                crate::observe::access_log::reopen_all();
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
        let _ = h.stop.send(true);
        h.task.abort();
    }
    let graceful = Arc::try_unwrap(graceful).unwrap_or_else(|_| GracefulShutdown::new());
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

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        let _ = s.set_only_v6(true);
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

async fn start_listener(
    addr: SocketAddr,
    limits: ClientLimits,
    shared: Arc<Shared>,
    graceful: Arc<GracefulShutdown>,
) -> Result<ListenerHandle, ServeError> {
    let listener = bind(addr).map_err(|source| ServeError::Bind { addr, source })?;
    let local = listener.local_addr().unwrap_or(addr);
    tracing::info!(addr = %local, "listening on {local}");
    let (stop, mut stopped) = watch::channel(false);
    let permits = limits.max_connections.map(|n| Arc::new(Semaphore::new(n)));
    let task = tokio::spawn(async move {
        loop {
            // Above max_connections, connections wait in the accept queue.
            let permit = match &permits {
                Some(p) => match p.clone().acquire_owned().await {
                    Ok(p) => Some(p),
                    Err(_) => return,
                },
                None => None,
            };
            let accepted = tokio::select! {
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
            let _ = stream.set_nodelay(true);
            let info = ConnInfo {
                local: stream.local_addr().unwrap_or(local),
                peer,
                tls: false,
            };
            let shared = shared.clone();
            let (stream, gh) = guard::Guard::new(stream, &limits);
            let svc = service_fn(move |req| {
                let (shared, gh) = (shared.clone(), gh.clone());
                async move {
                    Ok::<_, std::convert::Infallible>(guard::serve(gh, shared, info, req).await)
                }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(guard::hyper_header_timeout(&limits))
                .half_close(true)
                .max_buf_size((limits.max_header_size as usize).max(8192));
            builder.http2().timer(TokioTimer::new());
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .into_owned();
            let fut = graceful.watch(conn);
            METRICS.connections_active.inc();
            tokio::spawn(async move {
                if let Err(e) = fut.await {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                METRICS.connections_active.dec();
                drop(permit);
            });
        }
    });
    Ok(ListenerHandle { stop, task })
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
                let hit = events.iter().any(|e| {
                    e.paths.iter().any(|p| {
                        let p = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
                        names.iter().any(|n| {
                            *n == p || n.file_name() == p.file_name() && n.parent() == p.parent()
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
