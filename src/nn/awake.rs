//! Keeping the worker threads awake through a training step.
//!
//! Why: a step is a few thousand parallel regions (each fused op, product and fill), and between
//! two of them the thread that runs the step does serial work (candle's graph and gradient
//! sums, allocation). A rayon worker that finds no job for ~32 `sched_yield` rounds (tens of µs)
//! goes to sleep, and waking it costs what the machine's wake-up costs: on the 2-vCPU Firecracker
//! VM this project is measured on (`haltpoll.guest_halt_poll_ns=0`: an idle vCPU halts at once)
//! a futex wake-up reached the other thread after 29 µs (median) when it had slept 10 µs and
//! 57 µs after 1 ms (two pinned threads, futex ping-pong; docs/BENCHMARKS.md, session 19). A
//! ~100M bf16 step slept and woke ~2,700 times, and the second worker was idle a third of the
//! step; two threads ran 1.11x one thread. OpenMP (PyTorch's threads) spins between regions for
//! the same reason.
//!
//! [`Awake::start`] keeps small jobs circulating in the pool: each runs pending jobs
//! (`rayon::yield_now`: the worker's own deque first, then stealing) and, once it has found none
//! a few times in a row (a few µs, yielding the CPU with `sched_yield` between tries), queues
//! itself again and returns. A worker that keeps finding such a job never counts as idle and
//! never sleeps. It returns that soon because rayon runs jobs inside its waits too: a worker
//! waiting in a `join` may pick it up there, and the wait sees its latch only when the job
//! returns (a loop that spun until the step ended hung a DPO run that way, session 19); and it
//! drains the worker's own deque before it idles, so the half of a `join` that the waiting worker
//! pushed is never left under it. The cost is the usual one of spinning pools: the workers use
//! their cores while a step runs, even in its serial parts.
//!
//! When: `QTUNE_SPIN=1` always, `0` never; unset, for models whose hidden size is at most
//! [`AUTO_MAX_HIDDEN`]. Measured (session 19, 2 vCPUs, alternating, with candle's element-wise
//! pool off as `qtune` sets it): ~100M Llama (hidden 768) bf16 1.02-1.09x with the loop than
//! without on a quiet host (up to 1.29x against the session's start when the host was slow to
//! wake a vCPU); Llama-2-7B (4096) 1.01x; Falcon-7B (4544) 0.92-0.95x, not understood (the polls
//! do not slow the other core's arithmetic or memory streams in isolation). The threshold is the
//! largest size measured without a loss: thin evidence (three shapes), stated as such.
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// Guards active now (nested steps, such as an evaluation inside a run, start one loop only).
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// Runs of the job on a worker that polls (counted in tests only: the job is a hot loop).
#[cfg(test)]
static POLLS: AtomicUsize = AtomicUsize::new(0);

/// Tries that find no job before the job queues itself again and returns.
const IDLE_TRIES: u32 = 4;

/// While alive, the pool's other workers poll for jobs instead of sleeping (see the module docs).
pub struct Awake {
    stop: Option<Arc<AtomicBool>>,
}

impl Awake {
    /// Starts one circulating job per worker but one (from outside the pool, the last worker
    /// never polls, which keeps a core for the caller), for a model of hidden size `hidden` (see
    /// the module docs for when); a no-op with one thread or when a guard is already active.
    pub fn start(hidden: usize) -> Awake {
        let threads = rayon::current_num_threads();
        if threads < 2 || !wanted(hidden) {
            return Awake { stop: None };
        }
        if ACTIVE.fetch_add(1, Ordering::AcqRel) > 0 {
            ACTIVE.fetch_sub(1, Ordering::AcqRel);
            return Awake { stop: None };
        }
        let stop = Arc::new(AtomicBool::new(false));
        // From outside the pool, one worker never polls: the caller needs a core of its own.
        let keep = match rayon::current_thread_index() {
            Some(_) => None,
            None => Some(threads - 1),
        };
        for _ in 1..threads {
            let s = stop.clone();
            rayon::spawn(move || poll(s, keep));
        }
        Awake { stop: Some(stop) }
    }
}

impl Drop for Awake {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop.store(true, Ordering::Release);
            ACTIVE.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// The circulating job: runs pending jobs until it finds none [`IDLE_TRIES`] times in a row;
/// then, unless `stop`, queues itself again and returns. On the worker `keep` it ends at once.
fn poll(stop: Arc<AtomicBool>, keep: Option<usize>) {
    if stop.load(Ordering::Acquire) || rayon::current_thread_index() == keep {
        return;
    }
    #[cfg(test)]
    POLLS.fetch_add(1, Ordering::Relaxed);
    let mut idle = 0;
    while idle < IDLE_TRIES && !stop.load(Ordering::Acquire) {
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            idle = 0;
        } else {
            idle += 1;
            std::thread::yield_now();
        }
    }
    if !stop.load(Ordering::Acquire) {
        rayon::spawn(move || poll(stop, keep));
    }
}

/// Hidden sizes up to which `QTUNE_SPIN` unset keeps the workers awake (see the module docs).
pub const AUTO_MAX_HIDDEN: usize = 4096;

/// Whether a step of a model with hidden size `hidden` keeps the workers awake: `QTUNE_SPIN`
/// 1 (or any other value but 0) always, 0 never, unset up to [`AUTO_MAX_HIDDEN`].
fn wanted(hidden: usize) -> bool {
    static MODE: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    let mode = MODE.get_or_init(|| std::env::var("QTUNE_SPIN").ok().map(|v| v != "0"));
    mode.unwrap_or(hidden <= AUTO_MAX_HIDDEN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;
    use std::time::Duration;

    /// Polls counted over `ms` milliseconds while the caller sleeps.
    fn polls_over(ms: u64) -> usize {
        let before = POLLS.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(ms));
        POLLS.load(Ordering::Relaxed) - before
    }

    #[test]
    fn the_other_worker_polls_while_the_guard_lives() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            let awake = Awake::start(64);
            assert!(polls_over(50) > 10, "the other worker does not poll");
            // nested joins inside parallel loops finish while the job circulates (a worker
            // waiting in a join runs it there: it must return to see its latch)
            for _ in 0..200 {
                let s: u64 = (0..64u64)
                    .into_par_iter()
                    .map(|i| (0..64u64).into_par_iter().map(|j| i * j).sum::<u64>())
                    .sum();
                assert_eq!(s, 2016 * 2016);
            }
            // a nested guard starts nothing; dropping it stops nothing
            drop(Awake::start(64));
            assert!(polls_over(20) > 0);
            drop(awake);
            std::thread::sleep(Duration::from_millis(10));
            assert_eq!(polls_over(20), 0, "the job outlived its guard");
        });
    }
}
