//! The one pipeline of a reallocation round, for dense ([`super::rounds`]) and sparse
//! ([`super::sparse`]) tables alike: the round's memory checked at its first push, each
//! rank's complete push filed in the round under the job's lock, the solve started by the
//! last one and run off the async threads, its allocation published to the ranks that
//! fetch it (or the job failed with why).

use std::sync::Arc;

use lightrnn_alloc::{Reallocation, RoundOptions, SolveOptions};
use lightrnn_core::Result;
use lightrnn_core::protocol::FetchAllocation;

use super::state::Round;
use super::{Job, JobError, JobResult};

/// What a round solves once every rank is in: the ranks' tables as they were put
/// together.
pub(super) trait RoundInput: Send + 'static {
    /// The move cost the round's solve is discounted by.
    fn move_cost(&self) -> f64;
    /// Finish putting the tables together and solve (off the async threads).
    fn solve(self, opts: &RoundOptions) -> Result<Reallocation>;
}

impl Job {
    /// The round's memory here (`need` bytes), checked at its first push: a round that
    /// does not fit ends the job, and the push is refused.
    pub(super) fn check_round_memory(&self, what: &str, need: u64) -> JobResult<()> {
        if let Err(e) = lightrnn_core::util::check_fits(what, need) {
            self.fault(e.to_string());
            return Err(JobError::NoRoom(e.to_string()));
        }
        Ok(())
    }

    /// File rank `rank`'s complete push in `round` under the job's lock: `file` takes it
    /// into the round (of a group of `world` ranks) or refuses it, and says whether every
    /// rank is now in. The last one starts the solve of what `take` then takes from the
    /// round.
    pub(super) fn arrive<I: RoundInput>(
        self: &Arc<Self>,
        (generation, rank, round): (u64, u32, u64),
        file: impl FnOnce(&mut Round, usize) -> JobResult<bool>,
        take: impl FnOnce(&mut Round) -> Option<I> + Send + 'static,
    ) -> JobResult<()> {
        let all_in = {
            let mut st = self.lock();
            self.check(&st, generation, rank)?;
            let w = st.world;
            let r = st.rounds.entry(round).or_default();
            let all = file(r, w)?;
            if all {
                r.solving = true;
            }
            all
        };
        if all_in {
            self.start_solve(round, take);
        }
        Ok(())
    }

    /// Solve a round whose pushes are all in, off the async threads.
    fn start_solve<I: RoundInput>(
        self: &Arc<Self>,
        round: u64,
        take: impl FnOnce(&mut Round) -> Option<I> + Send + 'static,
    ) {
        let job = self.clone();
        tokio::spawn(async move {
            let (generation, input) = {
                let mut st = job.lock();
                let generation = st.generation;
                let Some(input) = st.rounds.get_mut(&round).and_then(take) else {
                    return;
                };
                (generation, input)
            };
            let opts = job.round_options(input.move_cost());
            let solved = tokio::task::spawn_blocking(move || input.solve(&opts)).await;
            job.settle(generation, round, solved);
        });
    }

    /// How this job solves a round discounted by `move_cost`.
    fn round_options(&self, move_cost: f64) -> RoundOptions {
        RoundOptions {
            solver: self.spec.cfg.realloc_solver,
            solve: SolveOptions {
                threads: self.spec.cfg.threads,
                ..Default::default()
            },
            move_cost,
        }
    }

    /// A round's solver task ended: its allocation is ready, or the job fails with why.
    fn settle(
        &self,
        generation: u64,
        round: u64,
        solved: std::result::Result<Result<Reallocation>, tokio::task::JoinError>,
    ) {
        match solved {
            Ok(Ok(s)) => self.solved(generation, round, s),
            Ok(Err(e)) => self.fault(format!("reallocation round {round}: {e}")),
            Err(e) => self.fault(format!("reallocation round {round}: solver task: {e}")),
        }
    }

    /// A round's allocation is ready for the ranks (dropped if its generation ended).
    fn solved(&self, generation: u64, round: u64, s: Reallocation) {
        tracing::info!(
            round,
            solver = %s.report.solver,
            objective_before = s.report.objective_before,
            objective_after = s.report.objective_after,
            words_moved = s.report.words_moved,
            seconds = s.report.seconds_solve,
            "allocation solved"
        );
        self.stats_mut().reallocations += 1;
        let mut st = self.lock();
        if st.generation == generation
            && let Some(r) = st.rounds.get_mut(&round)
        {
            r.result = Some(Arc::new(s));
        }
        drop(st);
        self.bump();
    }

    /// The allocation of `round`, once solved (dense or sparse alike).
    pub async fn fetch_allocation(&self, r: FetchAllocation) -> JobResult<Arc<Reallocation>> {
        self.count_rpc();
        {
            let st = self.lock();
            self.check(&st, r.generation, r.rank)?;
        }
        let round = r.round;
        self.wait_for(r.generation, |st| {
            st.rounds.get(&round).and_then(|x| x.result.clone()).map(Ok)
        })
        .await
    }
}
