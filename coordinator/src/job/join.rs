//! Joining a generation, staying in it (heartbeats) and leaving it (`Fail`).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::time::Instant;

use lightrnn_core::protocol::{Fail, Heartbeat, HeartbeatAnswer, Join, Joined};

use super::state::Member;
use super::{Job, JobError, JobResult};

/// A rank taken by a worker waiting in Join for its group to form: dropped (the worker's
/// call went away) before the group forms, it frees the rank for another worker.
struct Slot {
    job: Arc<Job>,
    generation: u64,
    rank: usize,
    /// The worker's collective address (host and port: unique among live workers).
    addr: String,
    armed: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut st = self.job.lock();
        if st.generation != self.generation || st.formed {
            return;
        }
        let m = &mut st.members[self.rank];
        if m.as_ref().is_some_and(|m| m.addr == self.addr) {
            *m = None;
            tracing::warn!(
                rank = self.rank,
                addr = %self.addr,
                "a worker left before its group formed: its rank is free again"
            );
            drop(st);
            self.job.bump();
        }
    }
}

impl Job {
    /// Take a rank in the forming generation and wait until the group forms; the reply
    /// says everything the worker needs to train in it.
    pub async fn join(self: &Arc<Self>, r: Join) -> JobResult<Joined> {
        self.count_rpc();
        same_version(&r.version)?;
        if self.preparing() {
            return Err(JobError::OutOfTurn(
                "the workers are still preparing the dataset: a worker asks Prepare until it is ready, then joins".into(),
            ));
        }
        let (rank, generation) = self.take_rank(&r)?;
        self.bump();
        let mut slot = Slot {
            job: self.clone(),
            generation,
            rank,
            addr: r.collective_addr.clone(),
            armed: true,
        };
        let me = r.collective_addr.clone();
        let (rank, world, peers, resume_from, nccl_id, ring_key) = self
            .wait_for(generation, |st| {
                if !st.formed || !st.recorded {
                    return None;
                }
                // The formed group's ranks (renumbered when an elastic group formed
                // below its maximum).
                let Some(rank) = st
                    .members
                    .iter()
                    .position(|m| m.as_ref().is_some_and(|m| m.addr == me))
                else {
                    return Some(Err(JobError::Internal(
                        "this worker is missing from its group".into(),
                    )));
                };
                let peers = st
                    .members
                    .iter()
                    .map(|m| m.as_ref().map(|m| m.addr.clone()).unwrap_or_default())
                    .collect::<Vec<_>>();
                Some(Ok((
                    rank,
                    st.world,
                    peers,
                    st.resume_from.clone(),
                    st.nccl_id.clone(),
                    st.ring_key.clone(),
                )))
            })
            .await?;
        slot.armed = false;
        // The wait may have been long: the heartbeat clock starts now.
        if let Some(m) = self.lock().members[rank].as_mut() {
            m.last_seen = Instant::now();
        }
        let spec = &self.spec;
        Ok(Joined {
            generation,
            rank,
            world_size: world,
            peers,
            config: spec.cfg.clone(),
            data: spec.data.url().to_string(),
            out: spec.out.url().to_string(),
            checkpoint: resume_from,
            // A group re-formed by this coordinator continues the run in place.
            restart: generation > spec.first_generation,
            backend: spec.backend.clone(),
            heartbeat: spec.heartbeat,
            collective_timeout: spec.collective_timeout,
            run_id: spec.run_id.clone(),
            nccl_id,
            ring_key,
        })
    }

    /// The rank a joining worker takes in the forming generation (its own RANK, or the
    /// lowest free one), or why it cannot join now.
    fn take_rank(&self, r: &Join) -> JobResult<(usize, u64)> {
        let w = self.spec.world_size;
        let mut st = self.lock();
        if let Some(f) = &st.failed {
            return Err(JobError::Ended(f.clone()));
        }
        if st.formed {
            if st.world < w {
                // Elastic and below its maximum: the group takes this worker in at its
                // next checkpoint (the worker keeps asking meanwhile).
                st.knocked = Some(Instant::now());
                return Err(JobError::NoRoom(format!(
                    "the group of generation {} trains with {} of up to {w} workers: it takes this one in at its next checkpoint",
                    st.generation, st.world
                )));
            }
            return Err(JobError::NoRoom(format!(
                "the group of generation {} is complete ({w} workers)",
                st.generation
            )));
        }
        let rank = if let Some(k) = r.rank {
            if k >= w {
                return Err(JobError::BadRequest(format!("rank {k} in a world of {w}")));
            }
            if st.members[k].is_some() {
                return Err(JobError::Duplicate(format!("rank {k} has joined already")));
            }
            k
        } else {
            // Requested ranks first: assign the lowest rank no one holds or asked for.
            st.members
                .iter()
                .position(|m| m.is_none())
                .ok_or_else(|| JobError::NoRoom("no free rank".into()))?
        };
        st.members[rank] = Some(Member {
            addr: r.collective_addr.clone(),
            last_seen: Instant::now(),
            step: 0,
            heard: None,
            pid: r.pid,
            report: None,
        });
        tracing::info!(rank, addr = %r.collective_addr, host = %r.host, pid = r.pid, "worker joined");
        st.last_join = Instant::now();
        self.try_form(&mut st);
        Ok((rank, st.generation))
    }

    /// A rank is alive at `step`; the reply says whether the job goes on and whether it
    /// is asked to stop.
    pub fn heartbeat(&self, r: Heartbeat) -> JobResult<HeartbeatAnswer> {
        let mut st = self.lock();
        if let Some(f) = &st.failed {
            return Ok(HeartbeatAnswer {
                abort: Some(f.clone()),
                stop: false,
            });
        }
        self.check(&st, r.generation, r.rank)?;
        if let Some(m) = st.members[r.rank as usize].as_mut() {
            m.last_seen = Instant::now();
            m.heard = Some(m.last_seen);
            m.step = r.step;
            if let Some(p) = r.report {
                m.report = Some(p);
            }
        }
        Ok(HeartbeatAnswer {
            abort: None,
            stop: self.stop.load(Ordering::Relaxed),
        })
    }

    /// A rank cannot go on: a lost worker when retrying may help, the end of the job
    /// otherwise.
    pub fn fail(&self, r: Fail) -> JobResult<()> {
        // A report from another generation (a worker of a group that has re-formed,
        // or of an earlier coordinator) is refused and counts for nothing.
        self.check(&self.lock(), r.generation, r.rank)?;
        let why = format!("rank {} failed: {}", r.rank, r.error);
        if r.retryable {
            self.lose_worker(r.generation, "worker_failed", why);
        } else {
            self.fault(why);
        }
        Ok(())
    }
}
/// A worker of this program's version, or its refusal.
pub(super) fn same_version(version: &str) -> JobResult<()> {
    let me = env!("CARGO_PKG_VERSION");
    if version != me {
        return Err(JobError::BadRequest(format!(
            "worker version {version} differs from the coordinator's {me}"
        )));
    }
    Ok(())
}
