//! The `tollgate` command line: run, check, fmt, routes, reload, demo.
//!
//! This is the only place that prints reports and picks exit codes:
//! 0 success, 1 invalid config (or `fmt --check` found changes), 2 usage or
//! I/O error.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// glibc with over-aligned blocks served from its per-thread cache
/// (`tollgate::alloc`: fewer instructions per new connection).
#[cfg(all(
    not(feature = "mimalloc"),
    target_os = "linux",
    target_env = "gnu",
    target_pointer_width = "64"
))]
#[global_allocator]
static GLOBAL: tollgate::alloc::Carved = tollgate::alloc::Carved;

use tollgate::config::diagnostics::{self, Diagnostic, Severity};
use tollgate::config::source::SourceMap;
use tollgate::config::validate::load_config;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "An API gateway with an NGINX-shaped config language"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the config.
    Run {
        /// The config file.
        #[arg(short = 'c', long = "config", default_value = "gateway.conf")]
        config: PathBuf,
    },
    /// Parse, validate and compile a config; print every diagnostic.
    Check {
        #[arg(short = 'c', long = "config", default_value = "gateway.conf")]
        config: PathBuf,
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
    },
    /// Format config files canonically (in place; `-` reads stdin).
    Fmt {
        /// Only check: exit 1 and name the files that would change.
        #[arg(long)]
        check: bool,
        files: Vec<PathBuf>,
    },
    /// Run the bundled demo: three small services and the gateway in front.
    Demo,
    /// Print the compiled routing table.
    Routes {
        #[arg(short = 'c', long = "config", default_value = "gateway.conf")]
        config: PathBuf,
    },
    /// Check a config, then ask the running instance to reload (through the
    /// `admin` listener the config names). Exit 0 applied, 1 invalid or
    /// rejected, 2 the instance could not be asked.
    Reload {
        #[arg(short = 'c', long = "config", default_value = "gateway.conf")]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Format {
    Human,
    Json,
    Github,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Check { config, format } => check(&config, format),
        Command::Fmt { check, files } => fmt(check, &files),
        Command::Routes { config } => routes(&config),
        Command::Reload { config } => reload(&config),
        Command::Run { config } => run(&config),
        Command::Demo => {
            init_logging();
            exit(tollgate::demo::run())
        }
    }
}

fn color_on_stderr() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn print_human(diags: &[Diagnostic], sources: &SourceMap) {
    let width = 100;
    eprint!(
        "{}",
        diagnostics::render_human(diags, sources, color_on_stderr(), width)
    );
}

fn check(path: &Path, format: Format) -> ExitCode {
    let (config, loaded, diags) = match load_config(path) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: cannot read `{}`: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    let list = diags.sorted();
    match format {
        Format::Human => {
            print_human(&list, &loaded.sources);
            summary(path, &list, config.as_ref());
        }
        Format::Json => {
            let json = diagnostics::to_json(&list, &loaded.sources);
            println!(
                "{}",
                serde_json::to_string_pretty(&json).unwrap_or_else(|_| "[]".into())
            );
        }
        Format::Github => print!("{}", diagnostics::to_github(&list, &loaded.sources)),
    }
    if config.is_some() && !diags.has_errors() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// One line after the human report. Counts what was printed (the sorted,
/// deduplicated list), not what validation pushed.
fn summary(path: &Path, diags: &[Diagnostic], config: Option<&tollgate::config::model::Config>) {
    let e = diags
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .count();
    let w = diags.len() - e;
    let plural = |n: usize, s: &str| format!("{n} {s}{}", if n == 1 { "" } else { "s" });
    match config {
        Some(c) if e == 0 => {
            let locations: usize = c.servers.iter().map(|s| s.locations.len()).sum();
            eprintln!(
                "{}: ok ({}, {}, {}{})",
                path.display(),
                plural(c.servers.len(), "server"),
                plural(locations, "location"),
                plural(c.upstreams.len(), "upstream"),
                if w > 0 {
                    format!(", {}", plural(w, "warning"))
                } else {
                    String::new()
                }
            );
        }
        _ => eprintln!(
            "{}: {}, {}",
            path.display(),
            plural(e, "error"),
            plural(w, "warning")
        ),
    }
}

fn fmt(check: bool, files: &[PathBuf]) -> ExitCode {
    if files.is_empty() {
        eprintln!("error: name the files to format (or `-` for stdin)");
        return ExitCode::from(2);
    }
    let mut changed = Vec::new();
    let mut failed = false;
    for f in files {
        let stdin = f.as_os_str() == "-";
        let text = if stdin {
            let mut s = String::new();
            if let Err(e) = std::io::stdin().read_to_string(&mut s) {
                eprintln!("error: cannot read stdin: {e}");
                return ExitCode::from(2);
            }
            s
        } else {
            match std::fs::read_to_string(f) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: cannot read `{}`: {e}", f.display());
                    return ExitCode::from(2);
                }
            }
        };
        match tollgate::config::format::format_source(&text) {
            Ok(out) => {
                if stdin {
                    if !check {
                        let _ = std::io::stdout().write_all(out.as_bytes());
                    } else if out != text {
                        changed.push(f.clone());
                    }
                } else if out != text {
                    changed.push(f.clone());
                    if !check && let Err(e) = std::fs::write(f, out) {
                        eprintln!("error: cannot write `{}`: {e}", f.display());
                        return ExitCode::from(2);
                    }
                }
            }
            Err(diags) => {
                failed = true;
                let mut sources = SourceMap::new();
                sources.add(f.clone(), text.into());
                print_human(&diags.sorted(), &sources);
            }
        }
    }
    if check {
        for f in &changed {
            println!("{}", f.display());
        }
        if !changed.is_empty() {
            eprintln!("{} file(s) would be reformatted", changed.len());
            return ExitCode::from(1);
        }
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn routes(path: &Path) -> ExitCode {
    let (config, loaded, diags) = match load_config(path) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: cannot read `{}`: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    let Some(config) = config else {
        print_human(&diags.sorted(), &loaded.sources);
        return ExitCode::from(1);
    };
    print!("{}", tollgate::routes::table(&config));
    ExitCode::SUCCESS
}

fn reload(path: &Path) -> ExitCode {
    let (config, loaded, diags) = match load_config(path) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: cannot read `{}`: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    let list = diags.sorted();
    print_human(&list, &loaded.sources);
    let config = match config {
        Some(c) if !diags.has_errors() => c,
        c => {
            summary(path, &list, c.as_ref());
            eprintln!("not reloaded: the running instance keeps its config");
            return ExitCode::from(1);
        }
    };
    let Some(admin) = &config.admin else {
        eprintln!(
            "error: `tollgate reload` asks the running instance through its admin listener, and `{}` configures none\n  \
             help: add `admin {{ listen 127.0.0.1:9901; }}`, or send SIGHUP to the process",
            path.display()
        );
        return ExitCode::from(2);
    };
    match tollgate::ctl::request_reload(admin.listen, std::time::Duration::from_secs(40)) {
        Ok(tollgate::ctl::ReloadReply::Applied { generation }) => {
            println!("applied: generation {generation}");
            ExitCode::SUCCESS
        }
        Ok(tollgate::ctl::ReloadReply::Rejected { generation, reason }) => {
            let g = generation
                .map(|g| format!(" (generation {g})"))
                .unwrap_or_default();
            eprintln!("rejected{g}: the running instance keeps its previous config\n{reason}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(color_on_stderr())
        .try_init();
}

fn exit(r: Result<i32, tollgate::server::ServeError>) -> ExitCode {
    match r {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("error: {e}");
            match e {
                tollgate::server::ServeError::Invalid(_) => ExitCode::from(1),
                _ => ExitCode::from(2),
            }
        }
    }
}

fn run(path: &Path) -> ExitCode {
    init_logging();
    exit(tollgate::server::run(path))
}
