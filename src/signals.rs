//! The daemon's process signals: SIGHUP reloads, SIGTERM and SIGINT stop.
//!
//! Invariant: `sealgate serve` installs [`Stop`] before the daemon starts and
//! `daemon::start` installs [`Reload`] before anything else, so by the time a
//! listener is bound none of these signals can take its default action. That action ends
//! the process on the spot: a reload sent just after the daemon answered killed it (a CI run
//! under load), and a stop skipped the graceful drain and the audit log's flush.
//!
//! A stop that arrives while the daemon is still starting is kept and acted on as soon as
//! the start returns, through the same graceful path.

use tokio::signal::unix::{signal, Signal, SignalKind};

/// SIGHUP, installed: [`Reload::recv`] waits for the next one.
pub struct Reload(Option<Signal>);

impl Reload {
    /// Installs the handler (a failure is logged, and SIGHUP then keeps its default action).
    pub fn install() -> Reload {
        Reload(installed(SignalKind::hangup(), "SIGHUP"))
    }

    /// The next SIGHUP (pending for ever when the handler could not be installed).
    pub async fn recv(&mut self) {
        next(&mut self.0).await
    }
}

/// SIGTERM and SIGINT, installed: [`Stop::recv`] waits for the next of either.
pub struct Stop {
    term: Option<Signal>,
    int: Option<Signal>,
}

impl Stop {
    /// Installs both handlers (a failure is logged, and that signal keeps its default action).
    pub fn install() -> Stop {
        Stop {
            term: installed(SignalKind::terminate(), "SIGTERM"),
            int: installed(SignalKind::interrupt(), "SIGINT"),
        }
    }

    /// The next SIGTERM or SIGINT, including one that arrived since [`Stop::install`].
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = next(&mut self.term) => {}
            _ = next(&mut self.int) => {}
        }
    }
}

fn installed(kind: SignalKind, name: &str) -> Option<Signal> {
    signal(kind)
        .inspect_err(|e| tracing::warn!(signal = name, error = %e, "cannot handle the signal"))
        .ok()
}

async fn next(s: &mut Option<Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}
