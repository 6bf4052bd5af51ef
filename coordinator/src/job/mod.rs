//! One distributed training job as the coordinator owns it.
//!
//! It has a text dataset prepared once, by the workers that come ([`prepare`]; a prepared
//! one is opened in [`spec`]), waits for `world_size` workers (ranks assigned
//! in join order or taken from the workers' RANK; an elastic job forms with any number
//! from `min_world` up once no worker has joined for `form_wait`, and ranks are then
//! renumbered 0..n in that order), hands each the config, the data and run locations, the
//! checkpoint to resume from and every rank's collective address ([`join`]); leases each
//! rank its share of every epoch's streams and checks at the epoch barrier that the ranks
//! together consumed exactly the epoch's tokens ([`epochs`]); sums the ranks' partial loss
//! tables (in rank order, so the result does not depend on arrival order), solves the
//! word reallocation and streams the allocation back ([`rounds`], [`sparse`] for sparse
//! tables, both through the one round pipeline of [`pipeline`]); commits each checkpoint
//! (its manifest, after checking the objects rank 0 wrote) once every rank has reached its
//! step ([`commit`]).
//!
//! Faults have one path per kind ([`faults`]). A lost worker ([`Job::lose_worker`]: a
//! missed heartbeat deadline, a rank's retryable `Fail` such as a broken collective, a
//! worker process that exited) ends the current *generation*: the coordinator forgets the
//! group, and the workers that are left and replacements join a new generation that
//! resumes from the last committed checkpoint (up to `max_restarts` times; restarts are
//! counted by cause). An elastic group that formed below `world_size` grows when a worker
//! asks to join: at its next committed checkpoint it re-forms with the newcomer (a "grow"
//! generation, not counted as a restart). Anything else ([`Job::fault`]: a
//! data-accounting mismatch, a failed solve or commit, ranks that disagree on the
//! parameters, a group that does not form in time, restarts exhausted) ends the job.
//! Either way every waiting call returns at once and heartbeats answer, so no worker
//! waits on a dead group. Requests of another generation are refused
//! ([`JobError::Stale`], FAILED_PRECONDITION on the wire): a stale worker cannot act on the
//! job.
//!
//! The job speaks domain types ([`lightrnn_core::protocol`]) and refuses with a
//! [`JobError`]; the service converts both to and from the wire.
//!
//! The rank-ordered table sum keeps every rank's partial tables until the last arrives:
//! world x V x (R + C) x 4 bytes on the coordinator.

mod commit;
mod epochs;
mod error;
mod faults;
mod join;
mod pipeline;
mod prepare;
pub mod record;
mod rounds;
mod sparse;
pub mod spec;
mod state;

use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use tokio::sync::watch;

pub use error::{JobError, JobResult};
pub use spec::JobSpec;
pub use state::JobStats;
use state::State;

/// One job's shared state behind the service.
pub struct Job {
    /// This job, for the tasks it spawns from a `&self` (recording a generation).
    me: std::sync::Weak<Job>,
    spec: JobSpec,
    /// A stop was requested (SIGTERM): heartbeats tell the workers.
    stop: AtomicBool,
    state: Mutex<State>,
    version: watch::Sender<u64>,
    stats: Mutex<JobStats>,
    /// Processes of ranks lost to missed heartbeats: alive but stalled (a launcher that
    /// started them kills them and starts replacements).
    stalled: Mutex<Vec<u32>>,
    /// The dataset's preparation by the workers, when it is tokenised from text.
    prep: Option<std::sync::Arc<prepare::Preparation>>,
    /// The training split's tokens and the vocabulary's words, once the dataset is ready.
    dataset: std::sync::OnceLock<(u64, usize)>,
}

type Guard<'a> = std::sync::MutexGuard<'a, State>;

impl Job {
    pub fn new(spec: JobSpec) -> std::sync::Arc<Self> {
        let w = spec.world_size;
        let resume_from = spec.checkpoint.as_ref().map(|c| c.url().to_string());
        // A restarted coordinator continues the counters of the checkpoint it resumes.
        let stats = JobStats {
            generation: spec.first_generation,
            coordinator_restarts: spec.coordinator_starts.saturating_sub(1),
            run_id: spec.run_id.clone(),
            ..spec
                .restored
                .as_ref()
                .map(JobStats::restored)
                .unwrap_or_default()
        };
        let state = State::new(w, spec.first_generation, resume_from);
        let dataset = std::sync::OnceLock::new();
        let prep = match &spec.pending {
            Some(plan) => Some(std::sync::Arc::new(prepare::Preparation::new(
                plan.clone(),
                spec.heartbeat,
                spec.heartbeat_timeout,
            ))),
            None => {
                let _ = dataset.set((spec.train_tokens, spec.vocab));
                None
            }
        };
        std::sync::Arc::new_cyclic(|me| Self {
            me: me.clone(),
            spec,
            stop: AtomicBool::new(false),
            state: Mutex::new(state),
            version: watch::channel(0).0,
            stats: Mutex::new(stats),
            stalled: Mutex::new(Vec::new()),
            prep,
            dataset,
        })
    }

    /// Tokens of the training split (0 until the dataset is ready).
    pub fn train_tokens(&self) -> u64 {
        self.dataset.get().map_or(0, |d| d.0)
    }

    /// Words of the vocabulary (0 until the dataset is ready).
    pub fn vocab(&self) -> usize {
        self.dataset.get().map_or(0, |d| d.1)
    }

    /// Whether the workers are still preparing the dataset.
    pub fn preparing(&self) -> bool {
        self.dataset.get().is_none()
    }

    pub fn spec(&self) -> &JobSpec {
        &self.spec
    }

    fn lock(&self) -> Guard<'_> {
        // A panic while holding the lock cannot leave the state half-updated in a way
        // that matters more than losing the job: keep serving the error paths.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wake every waiter to look at the state again.
    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    fn count_rpc(&self) {
        if let Ok(mut s) = self.stats.lock() {
            s.rpcs += 1;
        }
    }

    fn stats_mut(&self) -> std::sync::MutexGuard<'_, JobStats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The control plane's counters so far.
    pub fn stats(&self) -> JobStats {
        self.stats_mut().clone()
    }

    /// The current generation.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Whether the job has failed for good.
    pub fn failed(&self) -> bool {
        self.lock().failed.is_some()
    }

    /// Process ids of workers lost to missed heartbeats since the last call.
    pub fn take_stalled(&self) -> Vec<u32> {
        self.stalled
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }

    /// Refuse requests of another generation, from unknown ranks, or to a failed job.
    fn check(&self, st: &State, generation: u64, rank: u32) -> JobResult<()> {
        if generation != st.generation {
            return Err(JobError::Stale(stale(generation, st)));
        }
        if st.members.get(rank as usize).is_none_or(|m| m.is_none()) {
            return Err(JobError::NotMember(format!(
                "rank {rank} has not joined this job"
            )));
        }
        if let Some(f) = &st.failed {
            return Err(JobError::Ended(f.clone()));
        }
        Ok(())
    }

    /// Wait until `ready` yields, re-checking after every state change; a failed job or
    /// the end of `generation` ends every wait.
    async fn wait_for<T>(
        &self,
        generation: u64,
        mut ready: impl FnMut(&mut State) -> Option<JobResult<T>>,
    ) -> JobResult<T> {
        loop {
            let mut rx = self.version.subscribe();
            {
                let mut st = self.lock();
                if let Some(f) = &st.failed {
                    return Err(JobError::Ended(f.clone()));
                }
                if st.generation != generation {
                    return Err(JobError::Stale(format!(
                        "{}: join again",
                        stale(generation, &st)
                    )));
                }
                if let Some(r) = ready(&mut st) {
                    return r;
                }
            }
            if rx.changed().await.is_err() {
                return Err(JobError::ShuttingDown);
            }
        }
    }

    /// Until every rank of a generation has finished (the summary) or the job fails
    /// (the first cause); across generations, a re-formed group ends the wait of the one
    /// before.
    pub async fn outcome(&self) -> JobResult<lightrnn_core::report::Summary> {
        loop {
            let generation = self.generation();
            let r = self
                .wait_for(generation, |st| {
                    st.finished.iter().all(|&f| f).then(|| {
                        st.summary.clone().ok_or_else(|| {
                            JobError::Internal("rank 0 finished without a summary".into())
                        })
                    })
                })
                .await;
            match r {
                Err(JobError::Stale(_)) => continue,
                r => return r,
            }
        }
    }

    /// The job's figures for `/metrics`.
    pub fn snapshot(&self) -> crate::metrics::Snapshot {
        let st = self.lock();
        let stats = self.stats();
        let ranks = if st.formed {
            st.members
                .iter()
                .enumerate()
                .filter_map(|(rank, m)| {
                    let m = m.as_ref()?;
                    Some(crate::metrics::RankView {
                        rank,
                        step: m.step,
                        heartbeat_age: Some(m.last_seen.elapsed().as_secs_f64()),
                        report: m.report.clone(),
                    })
                })
                .collect()
        } else {
            Vec::new()
        };
        crate::metrics::Snapshot {
            run_id: self.spec.run_id.clone(),
            world: if st.formed { st.world } else { 0 },
            max_world: self.spec.world_size,
            generation: st.generation,
            ranks,
            restarts: stats.restarts,
            grows: stats.grows,
            coordinator_restarts: stats.coordinator_restarts,
            tokens_accounted: stats.tokens_accounted,
            checkpoints_committed: stats.checkpoints_committed,
            reallocations: stats.reallocations,
            rpcs: stats.rpcs,
        }
    }
}

/// Why a request of `generation` is not this generation's: it ended (and why the last
/// one did), or it was never this coordinator's.
fn stale(generation: u64, st: &State) -> String {
    if generation > st.generation {
        return format!(
            "generation {generation} is not this coordinator's (it is at generation {}): a worker of another coordinator",
            st.generation
        );
    }
    let cause = if st.last_cause.is_empty() {
        String::new()
    } else {
        format!("; the last generation ended because {}", st.last_cause)
    };
    format!(
        "generation {generation} has ended (the job is at generation {}{cause})",
        st.generation
    )
}

#[cfg(test)]
mod tests;
