//! Busy-polling a proxy worker through short idle gaps (`[proxy] busy_poll_us`).
//!
//! A worker that runs out of work parks in `epoll_wait`, and the next event has to wake its
//! thread. On a virtual machine whose idle vCPUs halt (the kernel's own halt-polling off, as
//! on the machine the benchmarks run on) that wake-up is an inter-processor interrupt through
//! the hypervisor: tens of µs on every hand-off, twice per request through a proxy. So before
//! parking, a worker whose clients moved bytes moments ago polls its I/O driver without
//! blocking for a while (tokio's park hook wakes a task that does nothing, and a runtime with
//! a task to run polls the driver with a zero timeout instead of blocking), yielding the CPU
//! to any other runnable thread on every round.
//!
//! How long it polls adapts as the kernel's cpuidle-haltpoll governor does: each idle gap
//! (from running out of work to the next bytes moved on a client connection of this worker)
//! that was longer than the window but within `busy_poll_us` doubles the window (starting at a
//! quarter of it); a gap longer than `busy_poll_us` halves it, down to zero. Gaps that polling
//! could have caught keep it open; gaps it could not (an origin across the internet, a client
//! thinking) close it, so a worker serving slow traffic stops spinning.
//!
//! Invariants:
//! - a worker only polls when it has nothing else to run (tokio calls the hook only then);
//! - it polls for at most the window (≤ `busy_poll_us`) after it ran out of work, and only
//!   client activity ([`moved`]) opens a new gap, so an idle daemon sleeps;
//! - it polls for at most [`MAX_POLLED`] of every [`PERIOD`], whatever the traffic;
//! - every round yields the CPU (`sched_yield`) to the runnable threads of its run queue.

use std::cell::Cell;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::Notify;

/// Below this the window is zero: polling for less than a syscall or two catches nothing.
const MIN_WINDOW: Duration = Duration::from_micros(5);

/// The duty cycle's period: a worker polls for at most [`MAX_POLLED`] of every such period.
const PERIOD: Duration = Duration::from_millis(100);

/// The polling a worker may do per [`PERIOD`] (half). Bounds what a trickle of bytes timed
/// to keep the window open can cost: without the cap, a record every window's length would
/// keep a worker polling all the time.
const MAX_POLLED: Duration = Duration::from_millis(50);

/// One worker's idle gaps and polling window.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Gaps {
    /// When the worker last ran out of work with no bytes moved since; None while working.
    idle_since: Option<Instant>,
    /// How long to poll after running out of work.
    window: Duration,
    /// `busy_poll_us` (set by the park hook, so before `idle_since` is ever set).
    max: Duration,
    /// When the last polling round began, while polling goes on; None once the worker parked
    /// or bytes moved.
    last_round: Option<Instant>,
    /// When the current duty-cycle period began.
    period_start: Option<Instant>,
    /// Time spent polling in the current period.
    polled: Duration,
}

thread_local! {
    /// This thread's gaps (worker threads only; elsewhere `idle_since` stays None).
    static GAPS: Cell<Gaps> = const {
        Cell::new(Gaps::new(Duration::ZERO))
    };
}

impl Gaps {
    /// No gap yet, the window closed, nothing polled.
    const fn new(max: Duration) -> Gaps {
        Gaps {
            idle_since: None,
            window: Duration::ZERO,
            max,
            last_round: None,
            period_start: None,
            polled: Duration::ZERO,
        }
    }

    /// Bytes moved at `now`: the idle gap, if one was open, ends and adapts the window.
    fn moved(&mut self, now: Instant) {
        self.last_round = None;
        if let Some(since) = self.idle_since.take() {
            self.window = adapt(self.window, now.saturating_duration_since(since), self.max);
        }
    }

    /// The worker ran out of work at `now`: whether to poll once more instead of parking, and
    /// how long it polled since the previous round (zero if it was not polling). Polls while
    /// the gap is shorter than the window and this period's polling is under [`MAX_POLLED`].
    fn poll_instead_of_park(&mut self, now: Instant) -> (bool, Duration) {
        let since = *self.idle_since.get_or_insert(now);
        let start = *self.period_start.get_or_insert(now);
        if now.saturating_duration_since(start) >= PERIOD {
            self.period_start = Some(now);
            self.polled = Duration::ZERO;
        }
        let round = self
            .last_round
            .take()
            .map_or(Duration::ZERO, |prev| now.saturating_duration_since(prev));
        self.polled += round;
        let poll = now.saturating_duration_since(since) < self.window && self.polled < MAX_POLLED;
        if poll {
            self.last_round = Some(now);
        }
        (poll, round)
    }
}

/// The window after an idle gap of `gap` (cpuidle-haltpoll's grow and shrink, factor 2).
fn adapt(window: Duration, gap: Duration, max: Duration) -> Duration {
    if gap > max {
        let half = window / 2;
        if half < MIN_WINDOW {
            Duration::ZERO
        } else {
            half
        }
    } else if gap > window {
        (window * 2).max(max / 4).min(max)
    } else {
        window
    }
}

/// Records that bytes moved at `now` on a client connection of this thread (a thread-local
/// read; `now` is the caller's clock read, not another).
pub fn moved(now: Instant) {
    GAPS.with(|g| {
        let mut gaps = g.get();
        if gaps.idle_since.is_some() {
            gaps.moved(now);
            g.set(gaps);
        }
    });
}

/// A worker's busy-poll: the park hook and the task it wakes.
#[derive(Clone, Debug)]
pub struct Spinner {
    max: Duration,
    wake: Arc<Notify>,
    /// `sealgate_busy_poll_seconds_total`.
    polled: Counter<f64, AtomicU64>,
}

impl Spinner {
    /// Busy-polling with windows of at most `max`, counting the time polled in `polled`;
    /// `None` for zero (off).
    pub fn new(max: Duration, polled: Counter<f64, AtomicU64>) -> Option<Spinner> {
        (!max.is_zero()).then(|| Spinner {
            max,
            wake: Arc::new(Notify::new()),
            polled,
        })
    }

    /// The longest window.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// tokio's park hook (`on_thread_park`), on the worker's thread: within the window, yields
    /// the CPU once and wakes the spin task, so the runtime polls its driver without blocking
    /// and calls the hook again; past it, lets the worker park.
    pub fn before_park(&self) {
        let (poll, round) = GAPS.with(|g| {
            let mut gaps = g.get();
            gaps.max = self.max;
            let decided = gaps.poll_instead_of_park(Instant::now());
            g.set(gaps);
            decided
        });
        if !round.is_zero() {
            self.polled.inc_by(round.as_secs_f64());
        }
        if poll {
            std::thread::yield_now();
            self.wake.notify_one();
        }
    }

    /// The task the hook wakes: being woken is all it does.
    pub async fn run(self) {
        loop {
            self.wake.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(200);

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// Whether the worker polls at `now` (the decision without the round).
    fn polls(g: &mut Gaps, now: Instant) -> bool {
        g.poll_instead_of_park(now).0
    }

    /// Now, and a worker's gaps with the window open at `window`.
    fn open_at(window: Duration) -> (Instant, Gaps) {
        let g = Gaps {
            window,
            ..Gaps::new(MAX)
        };
        (Instant::now(), g)
    }

    #[test]
    fn a_gap_polling_could_have_caught_opens_the_window_from_a_quarter() {
        assert_eq!(adapt(Duration::ZERO, us(80), MAX), us(50));
        assert_eq!(adapt(us(50), us(80), MAX), us(100));
        assert_eq!(adapt(us(100), us(150), MAX), us(200));
        assert_eq!(
            adapt(us(200), us(199), MAX),
            us(200),
            "never past the maximum"
        );
    }

    #[test]
    fn a_gap_within_the_window_keeps_it() {
        assert_eq!(adapt(us(100), us(60), MAX), us(100));
        assert_eq!(adapt(Duration::ZERO, Duration::ZERO, MAX), Duration::ZERO);
    }

    #[test]
    fn a_gap_past_the_maximum_halves_it_down_to_zero() {
        assert_eq!(adapt(us(200), us(201), MAX), us(100));
        assert_eq!(adapt(us(100), Duration::from_secs(1), MAX), us(50));
        assert_eq!(adapt(us(8), Duration::from_secs(1), MAX), Duration::ZERO);
        assert_eq!(
            adapt(Duration::ZERO, Duration::from_secs(1), MAX),
            Duration::ZERO
        );
    }

    #[test]
    fn slow_traffic_closes_the_window_and_fast_traffic_reopens_it() {
        let (t0, mut g) = open_at(MAX);
        // An origin 50 ms away: each gap halves the window until the worker parks at once.
        let mut t = t0;
        for _ in 0..6 {
            assert_eq!(polls(&mut g, t), !g.window.is_zero());
            t += Duration::from_millis(50);
            g.moved(t);
        }
        assert_eq!(g.window, Duration::ZERO);
        assert!(!polls(&mut g, t), "a closed window parks at once");
        // An origin 80 µs away: the first gap reopens it at a quarter, the next doubles it.
        g.moved(t + us(80));
        assert_eq!(g.window, us(50));
        t += us(200);
        assert!(polls(&mut g, t));
        assert!(polls(&mut g, t + us(49)));
        g.moved(t + us(80));
        assert_eq!(g.window, us(100));
    }

    #[test]
    fn polling_ends_a_window_after_running_out_of_work() {
        let (t0, mut g) = open_at(us(100));
        assert!(polls(&mut g, t0));
        assert!(polls(&mut g, t0 + us(99)));
        assert!(!polls(&mut g, t0 + us(100)), "then it parks");
        assert!(
            !polls(&mut g, t0 + us(5000)),
            "and a wake-up without bytes moved does not reopen it"
        );
        g.moved(t0 + us(5000));
        assert_eq!(g.idle_since, None);
        assert!(polls(&mut g, t0 + us(6000)), "bytes moved: a new gap");
    }

    #[test]
    fn polling_takes_at_most_half_of_every_100_ms() {
        // A trickle timed to keep the window open: a byte every 150 µs, polled in between in
        // rounds of 5 µs.
        let (t0, mut g) = open_at(MAX);
        let mut t = t0;
        let mut polled = Duration::ZERO;
        while t < t0 + Duration::from_millis(300) {
            let gap_end = t + us(150);
            while t < gap_end {
                let poll = polls(&mut g, t);
                if !poll {
                    break;
                }
                polled += us(5);
                t += us(5);
            }
            t = gap_end;
            g.moved(t);
        }
        let share = polled.as_secs_f64() / (t - t0).as_secs_f64();
        assert!(
            (0.45..=0.52).contains(&share),
            "polled {polled:?} of {:?}",
            t - t0
        );
        // A new period polls again.
        polls(&mut g, t + PERIOD);
        assert!(polls(&mut g, t + PERIOD + us(5)));
    }

    #[test]
    fn the_hook_counts_the_time_it_polled() {
        // A loaded machine can oversleep the 40 µs past the gap maximum, and then the window
        // rightly stays closed (the whole suite's load did once): the scenario is tried again,
        // a few times, until its precondition held.
        let mut polled = 0.0;
        for _ in 0..20 {
            let counter: Counter<f64, AtomicU64> = Counter::default();
            let spinner = Spinner::new(MAX, counter.clone()).unwrap();
            std::thread::spawn(move || {
                spinner.before_park(); // runs out of work: a gap opens, the window is closed
                std::thread::sleep(us(40));
                moved(Instant::now()); // a gap within the maximum: the window opens (50 µs)
                spinner.before_park(); // polls
                std::thread::sleep(us(20));
                spinner.before_park(); // polls again: the 20 µs in between were polled
            })
            .join()
            .unwrap();
            polled = counter.get();
            if polled > 0.0 {
                break;
            }
        }
        assert!((20e-6..0.1).contains(&polled), "{polled} s");
    }

    #[test]
    fn off_is_none_and_a_thread_that_never_parked_records_nothing() {
        assert!(Spinner::new(Duration::ZERO, Counter::default()).is_none());
        assert_eq!(Spinner::new(MAX, Counter::default()).unwrap().max(), MAX);
        std::thread::spawn(|| {
            moved(Instant::now());
            assert_eq!(GAPS.with(Cell::get).idle_since, None);
            assert_eq!(GAPS.with(Cell::get).window, Duration::ZERO);
        })
        .join()
        .unwrap();
    }
}
