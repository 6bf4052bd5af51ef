//! Checkpoints and the end of the run: a checkpoint exists once every rank has reached
//! its step with the same parameters and the coordinator has written its manifest
//! (create-only, after checking the objects rank 0 wrote); the run ends once every rank
//! has finished with the same parameters.

use std::sync::Arc;
use std::time::Duration;

use lightrnn_core::checkpoint::{self, Meta};
use lightrnn_core::data::store::Location;
use lightrnn_core::protocol::{Commit, Finish};
use lightrnn_core::{Error, Result};

use super::{Job, JobError, JobResult};

/// A parameter checksum as the workers send it: 64 hex digits.
fn valid_sum(s: &str) -> JobResult<()> {
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(JobError::BadRequest(
            "params_sha256 is not 64 hex digits".into(),
        ))
    }
}

/// The first disagreement between the ranks' parameter checksums.
fn diverged(sums: &[String]) -> Option<String> {
    let first = sums.first()?;
    sums.iter()
        .enumerate()
        .find(|(_, s)| *s != first)
        .map(|(r, s)| {
            format!(
                "the ranks hold different parameters: rank 0 {}, rank {r} {}",
                first.chars().take(12).collect::<String>(),
                s.chars().take(12).collect::<String>()
            )
        })
}

impl Job {
    /// A rank sent what cannot be right (a manifest or summary that does not convert):
    /// the job ends with it.
    fn refuse(&self, why: String) -> JobError {
        self.fault(why.clone());
        JobError::Ended(why)
    }

    /// Rank `r.rank` reached the checkpoint of `r.step` (rank 0 with its manifest);
    /// returns once the checkpoint is committed.
    pub async fn commit(self: &Arc<Self>, r: Commit) -> JobResult<()> {
        self.count_rpc();
        valid_sum(&r.params_sha256)?;
        self.check(&self.lock(), r.generation, r.rank)?;
        // Only rank 0's manifest is committed (the wire does not read the others').
        let meta = match r.manifest.transpose() {
            Ok(m) => m,
            Err(e) => return Err(self.refuse(format!("step {}: rank 0's manifest: {e}", r.step))),
        };
        let ready = {
            let mut st = self.lock();
            self.check(&st, r.generation, r.rank)?;
            let w = st.world;
            let c = st.commits.entry(r.step).or_default();
            if c.done || c.arrived.get(r.rank as usize) == Some(&true) {
                return Err(JobError::OutOfTurn(format!(
                    "step {} is committed already, or rank {} asked twice",
                    r.step, r.rank
                )));
            }
            if c.arrived.is_empty() {
                c.arrived = vec![false; w];
                c.sums = vec![String::new(); w];
                c.dir = r.dir.clone();
            }
            if c.dir != r.dir {
                return Err(JobError::BadRequest(format!(
                    "step {}: rank {} commits {}, another rank {}",
                    r.step, r.rank, r.dir, c.dir
                )));
            }
            c.arrived[r.rank as usize] = true;
            c.sums[r.rank as usize] = r.params_sha256.clone();
            if r.rank == 0 {
                c.meta =
                    Some(meta.ok_or_else(|| {
                        JobError::BadRequest("rank 0 must send the manifest".into())
                    })?);
            }
            let ready = !c.committing && c.meta.is_some() && c.arrived.iter().all(|&a| a);
            if ready && let Some(why) = diverged(&c.sums) {
                // Never commit a checkpoint the ranks disagree on.
                let why = format!("step {}: {why}", r.step);
                st.fail(why.clone());
                drop(st);
                self.bump();
                return Err(JobError::Ended(why));
            }
            if ready {
                c.committing = true;
            }
            // Old commits are settled: keep the map small.
            let step = r.step;
            st.commits.retain(|&s, c| s >= step || !c.done);
            ready
        };
        if ready {
            self.start_commit(r.step);
        }
        let step = r.step;
        self.wait_for(r.generation, |st| {
            st.commits.get(&step).and_then(|c| c.done.then_some(Ok(())))
        })
        .await
    }

    /// Rank `r.rank` is done (rank 0 with the run's summary).
    pub fn finish(&self, r: Finish) -> JobResult<()> {
        self.count_rpc();
        valid_sum(&r.params_sha256)?;
        self.check(&self.lock(), r.generation, r.rank)?;
        let summary = match r.summary.transpose() {
            Ok(s) => s,
            Err(e) => return Err(self.refuse(format!("rank 0's summary: {e}"))),
        };
        {
            let mut st = self.lock();
            self.check(&st, r.generation, r.rank)?;
            if r.rank == 0 {
                st.summary =
                    Some(summary.ok_or_else(|| {
                        JobError::BadRequest("rank 0 must send the summary".into())
                    })?);
            }
            st.finished[r.rank as usize] = true;
            st.final_sums[r.rank as usize] = r.params_sha256;
            if st.finished.iter().all(|&f| f) {
                if let Some(why) = diverged(&st.final_sums) {
                    let why = format!("at the end of the run: {why}");
                    st.fail(why.clone());
                    drop(st);
                    self.bump();
                    return Err(JobError::Ended(why));
                }
                self.stats_mut().params_sha256 = st.final_sums[0].clone();
            }
        }
        self.bump();
        Ok(())
    }

    /// Write the manifest of a checkpoint whose objects rank 0 wrote.
    fn start_commit(self: &Arc<Self>, step: u64) {
        let job = self.clone();
        tokio::spawn(async move {
            let (generation, dir, meta) = {
                let st = job.lock();
                let Some(c) = st.commits.get(&step) else {
                    return;
                };
                (st.generation, c.dir.clone(), c.meta.clone())
            };
            match job.write_manifest(generation, step, &dir, meta).await {
                Ok(()) => job.committed(generation, step, dir),
                Err(e) => job.fault(format!("committing the checkpoint of step {step}: {e}")),
            }
        });
    }

    /// The manifest carries the job's record (run, generation, counters), so that a
    /// coordinator restarted from this checkpoint continues them.
    async fn write_manifest(
        &self,
        generation: u64,
        step: u64,
        dir: &str,
        meta: Option<Meta>,
    ) -> Result<()> {
        let loc = Location::parse(dir)?;
        let expected = self
            .spec
            .out
            .join("checkpoints")
            .join(&checkpoint::dir_name(step));
        if loc.url() != expected.url() {
            return Err(Error::Control(format!(
                "checkpoint {dir} lies outside the run {}",
                self.spec.out
            )));
        }
        let mut meta =
            meta.ok_or_else(|| Error::Control(format!("no manifest for step {step}")))?;
        meta.job = Some(self.stats().record(
            &self.spec.run_id,
            generation,
            self.spec.coordinator_starts,
        ));
        if meta.step != step {
            return Err(Error::Control(format!(
                "the manifest of step {step} says step {}",
                meta.step
            )));
        }
        checkpoint::commit(&loc, &meta, true).await
    }

    /// The checkpoint of `step` exists: later generations resume from it, and an elastic
    /// group below its maximum with a worker asking to join grows now.
    fn committed(&self, generation: u64, step: u64, dir: String) {
        tracing::info!(step, dir = %dir, "checkpoint committed");
        self.stats_mut().checkpoints_committed += 1;
        let mut st = self.lock();
        let mut grow = None;
        if st.generation == generation {
            st.resume_from = Some(dir);
            if let Some(c) = st.commits.get_mut(&step) {
                c.done = true;
            }
            // A worker is still asking to join (it retries every 300 ms).
            if st.world < self.spec.world_size
                && st
                    .knocked
                    .is_some_and(|t| t.elapsed() < Duration::from_secs(5))
            {
                grow = Some(st.world);
            }
        }
        drop(st);
        self.bump();
        if let Some(n) = grow {
            self.new_generation(
                generation,
                None,
                format!(
                    "a worker asked to join the group of {n} (up to {}): the group grows from the checkpoint of step {step}",
                    self.spec.world_size
                ),
            );
        }
    }
}
