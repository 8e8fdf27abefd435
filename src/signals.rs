//! The daemon's process signals: SIGHUP reloads, SIGTERM and SIGINT stop, SIGUSR1 reopens the
//! audit log (the logrotate habit of other daemons), SIGUSR2 is logged and does nothing.
//!
//! Invariant: from the first statement of `main` until exit, none of these signals takes its
//! default action in `sealgate serve`, which ends the process on the spot (a reload sent just
//! after start killed the daemon: a CI run under load; outside pass h39b: one sent within
//! 3 ms of exec, as `systemctl reload` right after a start can, killed it, and systemd counts
//! that as a clean exit and does not restart; SIGUSR1, sent by logrotate snippets copied from
//! other daemons, ended it without the drain). [`Early`] records them from `main`'s first
//! statement; once the runtime runs, `serve` installs tokio's handlers ([`Stop`], [`Reload`],
//! [`User`]) and [`Early::hand_over`] raises again what was recorded, so each arrives once.
//! The other commands get their signals' previous dispositions back after parsing
//! ([`Early::restore`]), and what came meanwhile then takes its default action.
//!
//! Nothing is ever blocked: a mask would be inherited by every thread and, through them, by
//! every child (sandbox commands included; std keeps the parent's mask since Rust 1.66), where
//! `timeout` and `kill` stopped working (review h39e). Handlers are reset by `exec`.
//!
//! Left: the time between exec and `main` (the dynamic loader), which no program closes, and
//! a signal arriving in the instant between a tokio handler's install and the hand-over,
//! which is raised twice.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::signal::unix::{signal, Signal, SignalKind};

/// The signals [`Early`] records.
const EARLY: [libc::c_int; 5] = [
    libc::SIGHUP,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// One bit per signal number that arrived while [`Early`] recorded.
static PENDING: AtomicU64 = AtomicU64::new(0);

/// Set by [`Early::hand_over`]: from then on tokio's handlers take the signals (they call the
/// recorder too, as the handler that was there before them), and the recorder does nothing.
static HANDED: AtomicBool = AtomicBool::new(false);

/// The signal handler of [`Early`]: async-signal-safe (two atomics).
extern "C" fn record(sig: libc::c_int) {
    if !HANDED.load(Ordering::SeqCst) && (0..64).contains(&sig) {
        PENDING.fetch_or(1 << sig, Ordering::SeqCst);
    }
}

/// The five signals caught from `main`'s first statement and recorded, with what their
/// dispositions were before.
pub struct Early {
    before: Vec<(libc::c_int, libc::sigaction)>,
}

impl Early {
    /// Installs the recorder for SIGHUP, SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 (one that cannot
    /// be installed keeps its disposition).
    pub fn catch() -> Early {
        let mut before = Vec::with_capacity(EARLY.len());
        for sig in EARLY {
            // SAFETY: sigaction with a zeroed struct naming a handler that only touches atomics
            // (async-signal-safe); `old` is read only when the call succeeded.
            unsafe {
                let mut new: libc::sigaction = std::mem::zeroed();
                new.sa_sigaction = record as extern "C" fn(libc::c_int) as libc::sighandler_t;
                new.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut new.sa_mask);
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, &new, &mut old) == 0 {
                    before.push((sig, old));
                }
            }
        }
        Early { before }
    }

    /// `serve`, once tokio's handlers for all five are installed: the recorder stops, and what
    /// it recorded is raised again for them.
    pub fn hand_over(self) {
        HANDED.store(true, Ordering::SeqCst);
        raise_pending();
    }

    /// The other commands: the dispositions from before [`Early::catch`] come back, then what
    /// was recorded is raised again (Ctrl-C while parsing ends the command, as it would have).
    pub fn restore(self) {
        for (sig, old) in &self.before {
            // SAFETY: puts back the disposition sigaction returned for this signal.
            unsafe { libc::sigaction(*sig, old, std::ptr::null_mut()) };
        }
        raise_pending();
    }
}

fn raise_pending() {
    let bits = PENDING.swap(0, Ordering::SeqCst);
    for sig in EARLY.into_iter().filter(|s| bits & (1 << s) != 0) {
        // SAFETY: kill(2) on this process with a signal number; no memory is involved.
        unsafe { libc::kill(libc::getpid(), sig) };
    }
}

/// SIGHUP, installed: [`Reload::recv`] waits for the next one.
pub struct Reload(Option<Signal>);

impl Reload {
    /// Installs the handler (a failure is logged, and SIGHUP then does what it did before:
    /// its default action, or nothing in `serve`, where [`Early`]'s recorder stays).
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
    /// Installs both handlers (a failure is logged, and that signal then does what it did
    /// before: its default action, or nothing in `serve`, where [`Early`]'s recorder stays).
    pub fn install() -> Stop {
        Stop {
            term: installed(SignalKind::terminate(), "SIGTERM"),
            int: installed(SignalKind::interrupt(), "SIGINT"),
        }
    }

    /// The next SIGTERM or SIGINT, including one that arrived since [`Stop::install`]. Both
    /// pending at once (sent together while the daemon started) are one stop: the other is
    /// taken too, so that it is not the second signal's immediate exit (re-check h39f).
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = next(&mut self.term) => {}
            _ = next(&mut self.int) => {}
        }
        use futures_util::FutureExt as _;
        let _ = next(&mut self.term).now_or_never();
        let _ = next(&mut self.int).now_or_never();
    }
}

/// SIGUSR1 and SIGUSR2, installed: [`User::recv`] says which came.
pub struct User {
    usr1: Option<Signal>,
    usr2: Option<Signal>,
}

/// Which user signal [`User::recv`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserSignal {
    Usr1,
    Usr2,
}

impl User {
    /// Installs both handlers (a failure is logged, and that signal then does what it did
    /// before: its default action, or nothing in `serve`, where [`Early`]'s recorder stays).
    pub fn install() -> User {
        User {
            usr1: installed(SignalKind::user_defined1(), "SIGUSR1"),
            usr2: installed(SignalKind::user_defined2(), "SIGUSR2"),
        }
    }

    /// The next SIGUSR1 or SIGUSR2.
    pub async fn recv(&mut self) -> UserSignal {
        tokio::select! {
            _ = next(&mut self.usr1) => UserSignal::Usr1,
            _ = next(&mut self.usr2) => UserSignal::Usr2,
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
