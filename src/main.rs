//! The sealgate binary: parse the CLI, set up logging, run the command; errors become exit codes.

use std::process::ExitCode;

use clap::Parser;
use sealgate::cli::{AuditCmd, Cli, Command};
use sealgate::config::Config;
use sealgate::daemon::{self, Overrides};

/// The daemon's allocator: jemalloc, with the options of [`sealgate::alloc::JEMALLOC_CONF`]
/// (ARCHITECTURE.md, "The allocator: jemalloc").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The `malloc_conf` pointer jemalloc looks for (prefixed as tikv-jemalloc-sys builds it): the
/// first byte of the NUL-terminated options. jemalloc's own definition is weak and empty; this
/// strong one replaces it.
#[export_name = "_rjem_malloc_conf"]
#[used]
static MALLOC_CONF: &u8 = &sealgate::alloc::JEMALLOC_CONF[0];

fn main() -> ExitCode {
    // First: a reload or stop sent while the daemon starts is kept for it (`signals`).
    let early = sealgate::signals::Early::catch();
    sealgate::alloc::declare_jemalloc();
    sealgate::crash_point::pause("main");
    // Before anything else: descriptors inherited from whoever started us never reach a child.
    sealgate::isolation::fds::cloexec_inherited();
    let cli = Cli::parse();
    // Only `serve` keeps them: the other commands handle their signals (or not) from here on.
    let early = match cli.command {
        Command::Serve => Some(early),
        _ => {
            early.restore();
            None
        }
    };
    // The configuration comes first: `[proxy] worker_threads` sizes the runtime.
    let cfg = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => return fail(e.into()),
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if cfg.proxy.worker_threads > 0 && matches!(cli.command, Command::Serve) {
        builder.worker_threads(cfg.proxy.worker_threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => return fail(anyhow::anyhow!("cannot start the async runtime: {e}")),
    };
    let ran = runtime.block_on(run(cli, cfg, early));
    // Not the runtime's drop, which waits for every blocking task: an audit flush stuck in a
    // write to a stalled sink held the stop for ever (outside pass). What `run` left is done.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match ran {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn fail(e: anyhow::Error) -> ExitCode {
    // `{e:#}` would repeat a cause whose text the outer message already includes.
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    sealgate::cli::say(format_args!("sealgate: error: {msg}"));
    ExitCode::FAILURE
}

async fn run(
    cli: Cli,
    mut cfg: Config,
    early: Option<sealgate::signals::Early>,
) -> anyhow::Result<()> {
    if let Some(d) = &cli.data_dir {
        cfg.data_dir = d.clone();
    }
    match &cli.command {
        Command::Serve => serve(cfg, &cli, early).await,
        Command::RotateMasterKey { new_key_file } => sealgate::rotate::rotate_configured(
            &cfg,
            std::env::var("SEALGATE_MASTER_KEY").ok().as_deref(),
            std::env::var("SEALGATE_DATABASE_URL").ok().as_deref(),
            new_key_file,
        ),
        Command::Audit(AuditCmd::Tail { file, no_follow }) => {
            let path = file.clone().or(cfg.audit_path.clone()).ok_or_else(|| {
                anyhow::anyhow!("the audit log goes to stdout ([audit] path is empty); give --file")
            })?;
            sealgate::audit::tail(&path, !no_follow).await
        }
        _ => sealgate::cli::run_client(&cli, &cfg).await,
    }
}

/// `early` has recorded the signals since `main` began; they go to tokio's handlers here.
async fn serve(
    cfg: Config,
    cli: &Cli,
    early: Option<sealgate::signals::Early>,
) -> anyhow::Result<()> {
    sealgate::logging::init_stderr(&cfg.log_level, cfg.log_format);
    let json_log = cfg.log_format == sealgate::logging::LogFormat::Json;
    let ov = Overrides {
        master_key: std::env::var("SEALGATE_MASTER_KEY").ok(),
        admin_token: std::env::var("SEALGATE_ADMIN_TOKEN").ok(),
        config_path: cli.config.clone(),
        database_url: std::env::var("SEALGATE_DATABASE_URL").ok(),
    };
    // Before the start: a signal sent while it runs waits in these for the daemon it starts.
    let mut stop = sealgate::signals::Stop::install();
    let signals = daemon::Signals {
        reload: sealgate::signals::Reload::install(),
        user: sealgate::signals::User::install(),
    };
    if let Some(early) = early {
        early.hand_over();
    }
    let running = daemon::start_with(cfg, ov, signals).await?;
    if json_log {
        // Every stderr line is JSON for a log shipper: the summary is one line's field, written
        // whatever `[log] level` filters (as the text summary is).
        eprintln!("{}", summary_json(&running.summary()));
    } else {
        eprint!("{}", running.summary());
    }
    sealgate::notify::ready();
    stop.recv().await;
    sealgate::notify::stopping();
    let grace = running.proxy.settings().proxy.shutdown_grace;
    tracing::info!(
        grace_secs = grace.as_secs(),
        "shutting down: listeners closed, in-flight requests may finish"
    );
    let audit = running.proxy.audit.clone();
    tokio::select! {
        flushed = running.shutdown() => match flushed {
            true => tracing::info!("shutdown complete"),
            false => tracing::info!("shutdown complete, without the audit log's last lines"),
        },
        _ = stop.recv() => {
            tracing::warn!("second signal: exiting without waiting");
            // The proxy's workers may still hold the log; what is queued is written (1 s at
            // most). The stuck flush keeps its handle on the log, so dropping the daemon
            // (isolated sandboxes' teardown included) does not join a writer stuck in a
            // write, and `main` does not wait for the flush either.
            let flush = tokio::task::spawn_blocking(move || audit.flush());
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), flush).await;
        }
    }
    Ok(())
}

/// The start-up summary as one JSON line shaped like the log's events.
fn summary_json(summary: &str) -> String {
    let ts = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    serde_json::json!({
        "timestamp": ts,
        "level": "INFO",
        "fields": {"message": "sealgate running", "summary": summary},
    })
    .to_string()
}
