//! The threads that share a tensor's blocks with the thread that steps it.
//!
//! An optimizer step hands the CPU twin one tensor at a time, each a few µs to a few hundred µs
//! of work, from a thread outside any pool. Waking a sleeping thread costs the waker a system
//! call and the woken thread from 5 µs to milliseconds on virtual machines (about 100 µs on
//! average after a forward pass, measured on the 2-core test machine), and a lock a sleeper
//! waits on costs as much again. Through rayon's pools (`par_iter`, or the caller working inside
//! `in_place_scope`), tasks of 2–4 Ki elements made the optimizer step of a model of 16–64
//! Ki-element tensors 1.5–2× as slow as stepping each of them on the calling thread.
//!
//! So the caller runs tasks itself while the helpers that are awake claim the others from an
//! atomic counter: the caller never waits for a helper to wake, and a helper that comes late
//! finds less to do. A helper stays awake for [`SPIN`] after its last job, long enough to bridge
//! the gaps between one step's tensors, short enough not to hold a core through the forward pass
//! that follows (OpenMP's spin-wait, shorter). Whoever waits yields its core rather than spinning
//! on it, since the thread it waits for may need that core.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

/// How long an idle helper keeps looking for work before it parks.
const SPIN: Duration = Duration::from_micros(500);

/// One parallel run: what helpers execute, and the first panic of a helper's part.
struct Job {
    /// Claims and runs tasks until none is left. Its lifetime is the caller's stack frame,
    /// erased: [`Helpers::run`] does not return before every helper that saw this job has let
    /// it go.
    work: *const (dyn Fn() + Sync),
    /// Distinguishes this job from an earlier one at the same address.
    serial: u64,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

/// The helper threads, shared by every caller; one job at a time.
struct Helpers {
    /// The job on offer, null when none is.
    current: AtomicPtr<Job>,
    /// The serial of the job on offer, 0 when none is: lets a helper that has run the job on
    /// offer wait for the next one without touching `holding`, which the caller waits on.
    offered: AtomicU64,
    /// Helpers between taking hold of `current` and letting it go.
    holding: AtomicUsize,
    /// Helpers parked or about to park.
    parked: AtomicUsize,
    serials: AtomicU64,
    threads: Vec<Thread>,
}

// SAFETY: `Job::work` is only dereferenced under the protocol of `Helpers::run`, while the
// closure it points to is alive; the closure is `Sync`.
unsafe impl Send for Job {}
unsafe impl Sync for Job {}

impl Helpers {
    /// The helpers of this process: one per thread of rayon's global pool beyond the first, so
    /// `RAYON_NUM_THREADS` bounds the step's threads as it bounds Burn's.
    fn get() -> &'static Helpers {
        static HELPERS: OnceLock<&'static Helpers> = OnceLock::new();
        HELPERS.get_or_init(|| {
            let count = rayon::current_num_threads().saturating_sub(1);
            // Each helper finds the instance through `get`, which blocks until it is set.
            let threads = (0..count)
                .filter_map(|index| {
                    let spawned = thread::Builder::new()
                        .name(format!("burn-8bit-helper-{index}"))
                        .spawn(|| Helpers::get().serve());
                    spawned.ok().map(|handle| handle.thread().clone())
                })
                .collect();
            Box::leak(Box::new(Helpers {
                current: AtomicPtr::new(std::ptr::null_mut()),
                offered: AtomicU64::new(0),
                holding: AtomicUsize::new(0),
                parked: AtomicUsize::new(0),
                serials: AtomicU64::new(0),
                threads,
            }))
        })
    }

    /// A helper's life: run every job it sees once, stay awake (yielding its core) while jobs
    /// keep coming, park when none came for [`SPIN`].
    fn serve(&self) {
        let mut last_serial = 0;
        let mut idle_since = Instant::now();
        loop {
            let offered = self.offered.load(SeqCst);
            if offered != 0 && offered != last_serial {
                self.holding.fetch_add(1, SeqCst);
                let job = self.current.load(SeqCst);
                if !job.is_null() {
                    // SAFETY: `holding` was raised before `job` was read, so the caller waits
                    // for this helper before its frame, which holds the job, ends.
                    let job = unsafe { &*job };
                    if job.serial != last_serial {
                        last_serial = job.serial;
                        // SAFETY: as above, the closure outlives this call.
                        let work = unsafe { &*job.work };
                        if let Err(panic) = catch_unwind(AssertUnwindSafe(work)) {
                            job.panic.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(panic);
                        }
                    }
                }
                self.holding.fetch_sub(1, SeqCst);
                idle_since = Instant::now();
            } else if idle_since.elapsed() < SPIN {
                thread::yield_now();
            } else {
                self.parked.fetch_add(1, SeqCst);
                if self.current.load(SeqCst).is_null() {
                    thread::park();
                }
                self.parked.fetch_sub(1, SeqCst);
                idle_since = Instant::now();
            }
        }
    }

    /// `work` on the calling thread and, at the same time, on every helper that takes it up;
    /// returns when all of them have finished. Runs it on the caller alone when another job is
    /// on offer (a second thread stepping at the same time).
    fn run(&self, work: &(dyn Fn() + Sync)) {
        // SAFETY: only the lifetime is erased; `Offer::drop` withdraws the job and waits for
        // every helper holding it before this frame ends, even when `work` panics.
        let work: &'static (dyn Fn() + Sync) = unsafe { std::mem::transmute(work) };
        let job = Job { work, serial: self.serials.fetch_add(1, SeqCst) + 1, panic: Mutex::new(None) };
        let offered = self
            .current
            .compare_exchange(std::ptr::null_mut(), (&job as *const Job).cast_mut(), SeqCst, SeqCst)
            .is_ok();
        if offered {
            self.offered.store(job.serial, SeqCst);
        }
        if offered && self.parked.load(SeqCst) > 0 {
            self.threads.iter().for_each(Thread::unpark);
        }
        {
            let _offer = offered.then_some(Offer(self));
            work();
        }
        if let Some(panic) = job.panic.into_inner().unwrap_or_else(PoisonError::into_inner) {
            resume_unwind(panic);
        }
    }
}

/// A job on offer; withdrawn, and every helper holding it waited for, when dropped.
struct Offer<'a>(&'a Helpers);

impl Drop for Offer<'_> {
    fn drop(&mut self) {
        self.0.offered.store(0, SeqCst);
        self.0.current.store(std::ptr::null_mut(), SeqCst);
        while self.0.holding.load(SeqCst) != 0 {
            thread::yield_now();
        }
    }
}

/// `task` applied to every item, results in order: the calling thread and the awake helpers
/// claim items one at a time from a shared counter, so the caller never waits for a helper to
/// wake, and a helper that comes late finds less to do or nothing.
pub(super) fn run_tasks<T: Send, R: Send>(tasks: Vec<T>, task: impl Fn(T) -> R + Sync) -> Vec<R> {
    if tasks.len() <= 1 || rayon::current_num_threads() <= 1 {
        return tasks.into_iter().map(task).collect();
    }
    let items: Vec<Mutex<Item<T, R>>> = tasks.into_iter().map(|task| Mutex::new(Item::Waiting(task))).collect();
    let next = AtomicUsize::new(0);
    let work = || {
        loop {
            let index = next.fetch_add(1, SeqCst);
            let Some(item) = items.get(index) else { break };
            // Each index is claimed once, so every lock here is uncontended.
            let mut item = item.lock().unwrap_or_else(PoisonError::into_inner);
            if let Item::Waiting(input) = std::mem::replace(&mut *item, Item::Running) {
                *item = Item::Done(task(input));
            }
        }
    };
    Helpers::get().run(&work);
    items
        .into_iter()
        .map(|item| match item.into_inner().unwrap_or_else(PoisonError::into_inner) {
            Item::Done(result) => result,
            Item::Waiting(_) | Item::Running => unreachable!("every item was claimed and ran"),
        })
        .collect()
}

/// One item of [`run_tasks`].
enum Item<T, R> {
    Waiting(T),
    Running,
    Done(R),
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    #[test]
    fn results_come_back_in_order() {
        let squares = run_tasks((0..1000u64).collect(), |i| i * i);
        assert_eq!(squares, (0..1000u64).map(|i| i * i).collect::<Vec<_>>());
        assert_eq!(run_tasks(vec![7u8], |x| x + 1), [8]);
        assert!(run_tasks(Vec::<u8>::new(), |x| x).is_empty());
    }

    /// Runs 64 tasks, the first of which waits (up to 1 s) until a task has started on another
    /// thread, and `on_helper` in every task a helper runs; whether a helper ran one. A run can
    /// find the helpers on another test's job (tests run on several threads) and then runs on
    /// the caller alone, so callers retry.
    fn joined_by_a_helper(on_helper: impl Fn(usize) + Sync) -> bool {
        let caller = thread::current().id();
        let elsewhere = AtomicBool::new(false);
        let deadline = Instant::now() + Duration::from_secs(1);
        run_tasks((0..64).collect(), |task| {
            if thread::current().id() != caller {
                elsewhere.store(true, SeqCst);
                on_helper(task);
            }
            if task == 0 {
                while !elsewhere.load(SeqCst) && Instant::now() < deadline {
                    thread::yield_now();
                }
            }
        });
        elsewhere.load(SeqCst)
    }

    #[test]
    fn a_helper_works_while_the_caller_does() {
        if rayon::current_num_threads() > 1 {
            assert!((0..60).any(|_| joined_by_a_helper(|_| ())), "no helper took a task in 60 tries of 1 s");
        }
    }

    /// Every task panics, on whichever thread runs it: the panic reaches the caller, and the
    /// next run works.
    #[test]
    fn a_panicking_task_panics_the_caller() {
        for _ in 0..4 {
            let outcome = catch_unwind(|| run_tasks((0..64).collect(), |task: usize| -> usize { panic!("task {task} fails") }));
            assert!(outcome.is_err());
            assert_eq!(run_tasks((0..64).collect(), |task: usize| task + 1), (1..65).collect::<Vec<_>>());
        }
    }

    /// Only a helper's tasks panic: the panic crosses to the caller, and the helper, which
    /// caught it, serves the next job.
    #[test]
    fn a_panic_on_a_helper_reaches_the_caller_and_the_helper_keeps_working() {
        if rayon::current_num_threads() <= 1 {
            return;
        }
        let panicked = (0..60).any(|_| {
            let fails = |task| panic!("task {task} fails on a helper");
            catch_unwind(AssertUnwindSafe(|| joined_by_a_helper(fails))).is_err()
        });
        assert!(panicked, "no helper took a task in 60 tries of 1 s");
        assert_eq!(run_tasks((0..64).collect(), |task: usize| task * 2), (0..64).map(|t| t * 2).collect::<Vec<_>>());
    }

    #[test]
    fn callers_on_several_threads_at_once_each_get_their_results() {
        thread::scope(|scope| {
            for caller in 0..4u64 {
                scope.spawn(move || {
                    for round in 0..50 {
                        let offset = caller * 1000 + round;
                        let sums = run_tasks((0..32u64).collect(), |i| (0..1000).map(|j| i * j + offset).sum::<u64>());
                        let expected: Vec<u64> = (0..32u64).map(|i| (0..1000).map(|j| i * j + offset).sum()).collect();
                        assert_eq!(sums, expected);
                    }
                });
            }
        });
    }
}
