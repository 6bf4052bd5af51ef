//! A fixed team of threads that run one closure together and meet at a spin barrier.
//!
//! The LSTM recurrence is 2T dependent steps of small GEMMs (B rows). Splitting each step
//! with a fork-join costs a wake-up per step; instead every thread of the team runs the
//! whole sequence for its own hidden units and the team meets once per step at a barrier
//! that spins (~100 ns) before it yields, so an oversubscribed machine still progresses.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Threads that execute parallel regions.
pub struct Team {
    pool: Option<rayon::ThreadPool>,
    threads: usize,
    /// Each thread's part of a region is a span while the profiler traces.
    profiler: crate::Profiler,
}

impl std::fmt::Debug for Team {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Team")
            .field("threads", &self.threads)
            .finish()
    }
}

impl Team {
    /// A team of `threads` threads (0 = one per available core).
    pub fn new(threads: usize) -> crate::Result<Self> {
        let threads = if threads == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            threads
        };
        let pool = if threads > 1 {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("lightrnn-cpu-{i}"))
                    .build()
                    .map_err(|e| {
                        crate::Error::Backend(format!("cannot start {threads} threads: {e}"))
                    })?,
            )
        } else {
            None
        };
        Ok(Self {
            pool,
            threads,
            profiler: crate::Profiler::off(),
        })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    pub fn set_profiler(&mut self, profiler: crate::Profiler) {
        self.profiler = profiler;
    }

    /// Run `f(thread_index, barrier)` on every thread of the team and wait for all.
    pub fn run<F>(&self, f: F)
    where
        F: Fn(usize, &Barrier) + Sync,
    {
        let barrier = Barrier::new(self.threads);
        let prof = &self.profiler;
        let traced = |t: usize| {
            let start = prof.tracing().then(std::time::Instant::now);
            f(t, &barrier);
            if let Some(start) = start {
                prof.thread_span(t, start);
            }
        };
        match &self.pool {
            None => traced(0),
            Some(pool) => {
                pool.broadcast(|ctx| traced(ctx.index()));
            }
        }
    }
}

/// A reusable sense-counting barrier for the threads of one region.
pub struct Barrier {
    threads: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
}

impl Barrier {
    fn new(threads: usize) -> Self {
        Self {
            threads,
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
        }
    }

    /// Block until every thread of the region has called `wait` the same number of times.
    /// Writes made before `wait` by any thread are visible after it in all threads.
    pub fn wait(&self) {
        if self.threads == 1 {
            return;
        }
        let generation = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.threads {
            self.arrived.store(0, Ordering::Relaxed);
            self.generation
                .store(generation.wrapping_add(1), Ordering::Release);
            return;
        }
        let mut spins = 0u32;
        while self.generation.load(Ordering::Acquire) == generation {
            if spins < 20_000 {
                std::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// A raw view of a buffer that the threads of a region write in disjoint parts.
#[derive(Clone, Copy)]
pub struct Shared<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: `Shared` is only a pointer; every access goes through the `unsafe` methods below,
// whose callers guarantee that concurrent accesses touch disjoint elements.
unsafe impl<T: Send> Send for Shared<T> {}
unsafe impl<T: Send> Sync for Shared<T> {}

impl<T> Shared<T> {
    pub fn new(s: &mut [T]) -> Self {
        Self {
            ptr: s.as_mut_ptr(),
            len: s.len(),
        }
    }

    pub fn ptr(&self) -> *mut T {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A mutable sub-slice.
    ///
    /// # Safety
    /// No other thread may read or write `range` while the returned slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, range: std::ops::Range<usize>) -> &mut [T] {
        assert!(range.start <= range.end && range.end <= self.len);
        // SAFETY: in bounds (checked above); exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) }
    }

    /// A shared sub-slice.
    ///
    /// # Safety
    /// No other thread may write `range` while the returned slice lives.
    pub unsafe fn slice(&self, range: std::ops::Range<usize>) -> &[T] {
        assert!(range.start <= range.end && range.end <= self.len);
        // SAFETY: in bounds (checked above); no concurrent writer is the caller's contract.
        unsafe { std::slice::from_raw_parts(self.ptr.add(range.start), range.len()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn barrier_orders_phases() {
        let team = Team::new(3).unwrap();
        let mut buf = vec![0usize; 3];
        let sh = Shared::new(&mut buf);
        let sums = std::sync::Mutex::new(Vec::new());
        team.run(|t, bar| {
            for round in 1..=100 {
                // SAFETY: each thread writes its own element, reads after the barrier.
                unsafe { sh.slice_mut(t..t + 1)[0] = round * (t + 1) };
                bar.wait();
                let s: usize = unsafe { sh.slice(0..3) }.iter().sum();
                assert_eq!(s, round * 6);
                bar.wait();
            }
            sums.lock().unwrap().push(t);
        });
        assert_eq!(sums.lock().unwrap().len(), 3);
    }
}
