//! How a job's generation forms and how it ends: the group formed from the workers that
//! joined, the one path of a lost worker (a new generation from the last committed
//! checkpoint, counted against `max_restarts`), the one path of a fault that ends the
//! job, a requested stop, and the monitor that finds silent ranks and groups that do not
//! form.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::time::Instant;

use super::Job;
use super::record::RunRecord;
use super::state::{Member, State};

/// Bytes of a generation's ring secret.
const RING_KEY_BYTES: usize = 32;

impl Job {
    /// The job cannot go on: record why (the first cause wins), wake every waiter.
    pub fn fault(&self, why: String) {
        self.lock().fail(why);
        self.bump();
    }

    /// Form this generation's group when it can: every slot taken, or (elastic) at
    /// least `min_world` workers and no join for `form_wait`. The members are renumbered
    /// 0..n in slot order. True when it formed now.
    pub(super) fn try_form(&self, st: &mut State) -> bool {
        if st.formed {
            return false;
        }
        let n = st.members.iter().flatten().count();
        let (min, max) = (self.spec.min_world, self.spec.world_size);
        let quiet = min < max && n >= min && st.last_join.elapsed() >= self.spec.form_wait;
        if n < max && !quiet {
            return false;
        }
        let members: Vec<Option<Member>> = std::mem::take(&mut st.members)
            .into_iter()
            .flatten()
            .map(Some)
            .collect();
        st.members = members;
        st.world = n;
        st.finished = vec![false; n];
        st.final_sums = vec![String::new(); n];
        // Early joiners waited for the others: their heartbeat clocks start now.
        let now = Instant::now();
        for m in st.members.iter_mut().flatten() {
            m.last_seen = now;
        }
        st.formed = true;
        // A fresh ring secret per generation: a handshake of an ended generation (or
        // of anyone without this one) is refused by the new ring.
        match super::record::random_bytes(RING_KEY_BYTES) {
            Ok(k) => st.ring_key = k,
            Err(e) => st.fail(format!(
                "drawing the ring key of generation {}: {e}",
                st.generation
            )),
        }
        // A fresh NCCL id per generation: a communicator of an ended generation cannot
        // be joined by the next one's workers.
        if let Some(ids) = &self.spec.nccl_ids {
            match ids() {
                Ok(id) => st.nccl_id = id,
                Err(e) => st.fail(format!(
                    "creating the NCCL id of generation {}: {e}",
                    st.generation
                )),
            }
        }
        self.stats_mut().worlds.insert(st.generation, n);
        tracing::info!(world = n, max, generation = st.generation, "group formed");
        true
    }

    /// A worker of `generation` is gone (`kind`: heartbeat, worker_failed,
    /// process_exit): end that generation and let the group re-form from the last
    /// committed checkpoint, or fail the job once `max_restarts` are used up. Reports
    /// about a generation that has already ended are ignored (one loss, one restart).
    pub fn lose_worker(&self, generation: u64, kind: &str, why: String) {
        self.new_generation(generation, Some(kind), why);
    }

    /// End `generation` and let the group re-form from the last committed checkpoint:
    /// after a lost worker (`restart`: its cause, counted against `max_restarts`), or to
    /// take in workers that asked to join (`None`).
    pub(super) fn new_generation(&self, generation: u64, restart: Option<&str>, why: String) {
        let mut st = self.lock();
        if st.failed.is_some() || st.generation != generation || st.finished.iter().all(|&f| f) {
            return;
        }
        let used: u64 = self.stats_mut().restarts.values().sum();
        if restart.is_some() && used >= self.spec.max_restarts {
            st.fail(format!(
                "{why} (giving up after {used} restarts, --max-restarts {})",
                self.spec.max_restarts
            ));
            drop(st);
            self.bump();
            return;
        }
        {
            let mut s = self.stats_mut();
            match restart {
                Some(kind) => *s.restarts.entry(kind.to_string()).or_default() += 1,
                None => s.grows += 1,
            }
            s.generation = generation + 1;
        }
        let resume_from = st.resume_from.clone();
        tracing::warn!(
            generation,
            cause = %why,
            resume_from = resume_from.as_deref().unwrap_or("the start"),
            "generation ended: the group re-forms"
        );
        *st = State::new(self.spec.world_size, generation + 1, resume_from);
        st.last_cause = why;
        if let Some(r) = &self.spec.run_record {
            st.recorded = false;
            self.record_generation(r, generation + 1);
        }
        drop(st);
        self.bump();
    }

    /// Write `generation` into `RUN/run.json`; its joins are answered once it is there.
    /// A run directory that cannot be written ends the job (no checkpoint could be
    /// committed either).
    fn record_generation(&self, record: &RunRecord, generation: u64) {
        let (Some(job), record) = (self.me.upgrade(), record.clone()) else {
            return;
        };
        tokio::spawn(async move {
            let r = RunRecord {
                generation,
                ..record
            };
            match r.write(&job.spec.out).await {
                Ok(()) => {
                    let mut st = job.lock();
                    if st.generation == generation {
                        st.recorded = true;
                    }
                }
                Err(e) => job.lock().fail(format!(
                    "recording generation {generation} in the run directory: {e}"
                )),
            }
            job.bump();
        });
    }

    /// A worker process on this machine exited (`--workers N`): a lost worker if it is a
    /// member of the current generation (true), nothing otherwise (false: its loss was
    /// handled, or it never joined).
    pub fn process_exited(&self, pid: u32, why: String) -> bool {
        if let Some(p) = &self.prep {
            p.process_exited(pid);
        }
        let generation = {
            let st = self.lock();
            if !st.members.iter().flatten().any(|m| m.pid == pid) {
                return false;
            }
            st.generation
        };
        self.lose_worker(generation, "process_exit", why);
        true
    }

    /// Ask the workers to stop at a common step with a checkpoint (preemption); the job
    /// then finishes as usual, with `stopped_by: "signal"`.
    pub fn request_stop(&self) {
        if self.stop.swap(true, Ordering::Relaxed) {
            return;
        }
        let formed = self.lock().formed;
        if formed {
            tracing::warn!("stop requested: the workers checkpoint at their next step");
        } else {
            // No group trains: nothing to checkpoint, nothing to wait for.
            self.fault(
                "stopped by a signal before the group formed (the run's checkpoints are unchanged)"
                    .into(),
            );
        }
    }

    /// Lost ranks and a group that does not form: checked every heartbeat interval until
    /// the job ends.
    pub async fn monitor(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.spec.heartbeat);
        loop {
            tick.tick().await;
            let (generation, formed, cause) = {
                let mut st = self.lock();
                if self.try_form(&mut st) {
                    drop(st);
                    self.bump();
                    continue;
                }
                if st.failed.is_some() || st.finished.iter().all(|&f| f) {
                    return;
                }
                (st.generation, st.formed, self.silence(&st))
            };
            match cause {
                // A silent rank of a formed group is a lost worker; a group that does
                // not form in time ends the job.
                Some(c) if formed => self.lose_worker(generation, "heartbeat", c),
                Some(c) => {
                    self.fault(c);
                    return;
                }
                None => {}
            }
        }
    }

    /// What is wrong with the generation's liveness, if anything: a group that did not
    /// form within the join timeout, or a rank silent beyond the heartbeat timeout (its
    /// process is then reported stalled).
    fn silence(&self, st: &State) -> Option<String> {
        if !st.formed {
            if self.preparing() {
                return self.preparation_unheard();
            }
            let n = st.members.iter().flatten().count();
            return (st.generation_started.elapsed() > self.spec.join_timeout).then(|| {
                format!(
                    "only {n} of {} workers joined generation {} within {:?}",
                    self.spec.min_world, st.generation, self.spec.join_timeout
                )
            });
        }
        st.members.iter().enumerate().find_map(|(r, m)| {
            let m = m.as_ref()?;
            let silent = m.last_seen.elapsed();
            (!st.finished[r] && silent > self.spec.heartbeat_timeout).then(|| {
                if let Ok(mut v) = self.stalled.lock() {
                    v.push(m.pid);
                }
                let step = m.report.as_ref().map_or(m.step, |p| p.step.max(m.step));
                let last = match m.heard {
                    Some(_) => format!("last heard at step {step}"),
                    None => "no heartbeat since its group formed".to_string(),
                };
                format!(
                    "rank {r} ({}, pid {}) sent no heartbeat for {:.1} s (the heartbeat timeout is {:.1} s): {last}",
                    m.addr,
                    m.pid,
                    silent.as_secs_f64(),
                    self.spec.heartbeat_timeout.as_secs_f64()
                )
            })
        })
    }
}
