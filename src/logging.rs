//! Tracing setup with a level that can change on reload.

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

use crate::config::LogFormat;

static HANDLE: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Installs the global subscriber writing to `writer` (stderr for the binary, a capture buffer
/// in tests). Later calls are no-ops.
pub fn init<W>(level: &str, format: LogFormat, writer: W)
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    init_with(level, format, writer, false);
}

/// Logs to stderr, with colours only when stderr is a terminal.
pub fn init_stderr(level: &str, format: LogFormat) {
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    init_with(level, format, std::io::stderr, ansi);
}

fn init_with<W>(level: &str, format: LogFormat, writer: W, ansi: bool)
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_target(false)
        .with_ansi(ansi);
    let result = match format {
        LogFormat::Json => tracing_subscriber::registry()
            .with(filter)
            .with(fmt.json())
            .try_init(),
        LogFormat::Text => tracing_subscriber::registry()
            .with(filter)
            .with(fmt)
            .try_init(),
    };
    if result.is_ok() {
        let _ = HANDLE.set(handle);
    }
}

/// Changes the level of the installed subscriber (reload). Invalid directives are ignored
/// (config validation already rejected them).
pub fn set_level(level: &str) {
    if let (Some(h), Ok(f)) = (HANDLE.get(), EnvFilter::try_new(level)) {
        let _ = h.reload(f);
    }
}
