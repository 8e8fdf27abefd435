//! The daemon's process signals: SIGHUP reloads, SIGTERM and SIGINT stop, SIGUSR1 reopens the
//! audit log (the logrotate habit of other daemons), SIGUSR2 is logged and does nothing.
//!
//! Invariant: from the first statement of `main` until `sealgate serve`'s start has returned,
//! these signals are blocked ([`Held`]) in every thread, so one sent meanwhile stays
//! pending instead of taking its default action, which ends the process on the spot (a reload
//! sent just after the daemon answered killed it: a CI run under load; outside pass h39b: one
//! sent within 3 ms of exec, as `systemctl reload` right after a start can, killed it, and
//! systemd counts that as a clean exit and does not restart; SIGUSR1, sent by logrotate
//! snippets copied from other daemons, ended it without the drain). [`Stop`], [`Reload`] and
//! [`User`] are installed before the release, which delivers what is pending: a SIGHUP is then a reload and
//! a SIGTERM or SIGINT the graceful stop, right after the start.
//!
//! Left: the time between exec and `main` (the dynamic loader), which no program closes.

use tokio::signal::unix::{signal, Signal, SignalKind};

/// The five signals blocked in the calling thread, and so in every thread it starts while
/// this lives; dropping it restores the thread's previous mask, which delivers what is
/// pending to this thread (the others keep them blocked: a signal sent to the process goes
/// to a thread that does not block it).
pub struct Held(Option<libc::sigset_t>, std::marker::PhantomData<*const ()>);

impl Held {
    /// Blocks SIGHUP, SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 in the calling thread. Children started with
    /// `std::process::Command` begin with an empty mask whatever this thread holds.
    pub fn hold() -> Held {
        // SAFETY: sigemptyset/sigaddset write the local set; pthread_sigmask reads it and
        // writes the previous mask into `old`, which is used only when it returned 0.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in [
                libc::SIGHUP,
                libc::SIGTERM,
                libc::SIGINT,
                libc::SIGUSR1,
                libc::SIGUSR2,
            ] {
                libc::sigaddset(&mut set, sig);
            }
            let mut old: libc::sigset_t = std::mem::zeroed();
            match libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old) {
                0 => Held(Some(old), std::marker::PhantomData),
                _ => Held(None, std::marker::PhantomData),
            }
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(old) = self.0.take() {
            // SAFETY: restores the mask pthread_sigmask returned in `hold`, on the same thread
            // (the marker keeps Held on the thread whose mask it holds).
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
        }
    }
}

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
    /// Installs both handlers (a failure is logged, and that signal keeps its default action).
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
