//! The dataset prepared by the job's workers from text ([`lightrnn_core::data::cluster`]),
//! before the group forms: the coordinator hands out each phase's tasks (count, shard,
//! stitch) to the workers that ask, merges the counts into the vocabulary and writes the
//! manifests; it reads no input bytes.
//!
//! A worker holds its task while it reports being at it (every `heartbeat`); one silent
//! for the heartbeat timeout, or whose process exited, loses it, and the next worker to
//! ask takes it over. A worker reporting on a task it no longer holds (taken over, done
//! by another, of an earlier coordinator) is told to abandon it. A task that failed in a
//! way worth retrying (a store's hiccup) is handed out again, up to [`FAILURES`] times;
//! one lost by [`HANDOUTS`] workers in a row (it kills them) ends the job, as does any
//! other failure (a corrupt input, a missing field), with the task's error, and no
//! worker asking at all for the join timeout. Results are kept by task, so a task done
//! twice counts once. Tasks and results too large for a control message travel as
//! objects below `parts/`.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lightrnn_core::data::cluster::{Done, Plan, Prepared, Task, inline_or_stored};
use lightrnn_core::protocol::{PrepareAnswer, PrepareAsk, TaskReport};

use super::{Job, JobError, JobResult};

/// Failures worth retrying a task may have before the job ends.
const FAILURES: u32 = 3;
/// Workers a task may be handed to (each lost it) before the job ends.
const HANDOUTS: u32 = 5;
/// How long a worker with nothing to do waits before asking again.
const WAIT: Duration = Duration::from_millis(200);
/// The longest a worker with nothing to do is kept waiting for a task in one call.
const LONG_POLL: Duration = Duration::from_secs(1);
/// How often a phase's progress is logged.
const PROGRESS: Duration = Duration::from_secs(10);
/// Attempts at the coordinator's own store work (clearing, merging counts, manifests).
const STORE_ATTEMPTS: u32 = 4;

/// One task of the current phase.
struct Slot {
    id: u64,
    task: Task,
    /// What is sent: the task, or the object holding it where it is large.
    wire: Task,
    /// The worker at it, and when it last said so.
    holder: Option<(String, Instant)>,
    done: Option<Done>,
    handouts: u32,
    failures: u32,
    /// Workers whose attempt failed.
    failed_by: Vec<String>,
}

struct State {
    next_id: u64,
    slots: Vec<Slot>,
    /// Every phase is done and the manifests are written.
    ready: bool,
    failed: Option<String>,
    /// When a worker last asked or reported.
    heard: Instant,
}

/// A job's preparation of its dataset by its workers.
pub struct Preparation {
    plan: Arc<Plan>,
    /// How often a worker at a task says so.
    heartbeat: Duration,
    /// A worker silent this long loses its task.
    timeout: Duration,
    state: Mutex<State>,
    changed: tokio::sync::Notify,
    /// Workers waiting for a task: told when one may be there (a phase began, a task
    /// went back to the queue) or the preparation ended.
    available: tokio::sync::Notify,
}

impl Preparation {
    pub fn new(plan: Arc<Plan>, heartbeat: Duration, timeout: Duration) -> Self {
        // Task ids of this coordinator only: a worker reporting on a task of an earlier
        // coordinator of the run (killed, restarted) names none of these.
        let first = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64)
            << 8;
        Self {
            plan,
            heartbeat,
            timeout,
            state: Mutex::new(State {
                next_id: first,
                slots: Vec::new(),
                ready: false,
                failed: None,
                heard: Instant::now(),
            }),
            changed: tokio::sync::Notify::new(),
            available: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A worker's report on its task, and what it does next.
    fn answer(&self, ask: PrepareAsk) -> JobResult<PrepareAnswer> {
        let mut st = self.lock();
        st.heard = Instant::now();
        if let Some(why) = &st.failed {
            return Err(JobError::Ended(format!(
                "preparing the dataset failed: {why}"
            )));
        }
        let worker = ask.worker;
        match ask.report {
            Some((id, TaskReport::Working)) => return Ok(self.working(&mut st, id, &worker)),
            Some((id, TaskReport::Done(done))) => self.done(&mut st, id, &worker, done),
            Some((id, TaskReport::Failed { error, retryable })) => {
                self.failed(&mut st, id, &worker, error, retryable)?
            }
            None => {}
        }
        if st.ready {
            return Ok(PrepareAnswer::Ready);
        }
        self.expire(&mut st)?;
        // A task this worker failed goes to another where there is one to take it.
        let free = |s: &Slot| s.done.is_none() && s.holder.is_none();
        let k = st
            .slots
            .iter()
            .position(|s| free(s) && !s.failed_by.contains(&worker))
            .or_else(|| st.slots.iter().position(free));
        let Some(s) = k.map(|k| &mut st.slots[k]) else {
            return Ok(PrepareAnswer::Wait(WAIT));
        };
        s.holder = Some((worker.clone(), Instant::now()));
        s.handouts += 1;
        tracing::info!(worker = %worker, task = s.id, "{}", s.task.describe());
        Ok(PrepareAnswer::Task {
            id: s.id,
            task: Box::new(s.wire.clone()),
            heartbeat: self.heartbeat,
        })
    }

    /// A worker is at task `id`: its hold renewed, or, where it no longer holds it (taken
    /// over, done, of another phase or coordinator), told to abandon it.
    fn working(&self, st: &mut State, id: u64, worker: &str) -> PrepareAnswer {
        let Some(s) = st.slots.iter_mut().find(|s| s.id == id && s.done.is_none()) else {
            return PrepareAnswer::Abandon;
        };
        match &mut s.holder {
            Some((w, at)) if *w == worker => *at = Instant::now(),
            // Its hold had lapsed and nobody took the task over: it keeps it.
            None => s.holder = Some((worker.to_string(), Instant::now())),
            Some(_) => return PrepareAnswer::Abandon,
        }
        PrepareAnswer::Wait(self.heartbeat)
    }

    fn done(&self, st: &mut State, id: u64, worker: &str, done: Done) {
        let Some(s) = st.slots.iter_mut().find(|s| s.id == id) else {
            return; // a task of an earlier phase or coordinator
        };
        if s.done.is_none() {
            tracing::debug!(worker, task = id, "done: {}", s.task.describe());
            s.done = Some(done);
            s.holder = None;
            self.changed.notify_one();
        }
    }

    fn failed(
        &self,
        st: &mut State,
        id: u64,
        worker: &str,
        error: String,
        retryable: bool,
    ) -> JobResult<()> {
        // Only its holder's failure counts: another worker's copy may still succeed.
        let Some(s) = st.slots.iter_mut().find(|s| {
            s.id == id && s.done.is_none() && s.holder.as_ref().is_some_and(|(w, _)| w == worker)
        }) else {
            return Ok(());
        };
        let what = s.task.describe();
        s.failures += 1;
        s.failed_by.push(worker.to_string());
        if retryable && s.failures < FAILURES {
            tracing::warn!(worker, task = id, failures = s.failures, error = %error, "{what} failed: it is handed out again");
            s.holder = None;
            self.available.notify_waiters();
            return Ok(());
        }
        let why = format!("{what} on worker {worker}: {error}");
        Err(self.fail(st, why))
    }

    /// End the preparation: the job's error.
    fn fail(&self, st: &mut State, why: String) -> JobError {
        st.failed = Some(why.clone());
        self.changed.notify_one();
        self.available.notify_waiters();
        JobError::Ended(format!("preparing the dataset failed: {why}"))
    }

    /// Tasks whose workers fell silent go back to the queue; one lost by [`HANDOUTS`]
    /// workers ends the preparation.
    fn expire(&self, st: &mut State) -> JobResult<()> {
        let mut lost_too_often = None;
        for s in st.slots.iter_mut().filter(|s| s.done.is_none()) {
            if let Some((w, at)) = &s.holder
                && at.elapsed() > self.timeout
            {
                tracing::warn!(
                    worker = %w,
                    task = s.id,
                    silent_s = format!("{:.1}", at.elapsed().as_secs_f64()),
                    "{}: its worker fell silent; the next worker to ask takes it over",
                    s.task.describe()
                );
                s.holder = None;
                self.available.notify_waiters();
                if s.handouts >= HANDOUTS {
                    lost_too_often = Some(s.task.describe());
                }
            }
        }
        match lost_too_often {
            Some(what) => Err(self.fail(
                st,
                format!("{what}: {HANDOUTS} workers in a row were lost at it (their logs say why)"),
            )),
            None => Ok(()),
        }
    }

    /// A worker process on this machine exited: the tasks it held go back to the queue.
    pub fn process_exited(&self, pid: u32) {
        let suffix = format!(":{pid}");
        let mut st = self.lock();
        for s in st.slots.iter_mut().filter(|s| s.done.is_none()) {
            if s.holder.as_ref().is_some_and(|(w, _)| w.ends_with(&suffix)) {
                tracing::warn!(
                    pid,
                    task = s.id,
                    "{}: its worker exited; the next worker to ask takes it over",
                    s.task.describe()
                );
                s.holder = None;
                self.available.notify_waiters();
            }
        }
    }

    /// No worker has asked or reported for longer than `limit`: why, for the job's end.
    pub fn unheard(&self, limit: Duration) -> Option<String> {
        let st = self.lock();
        (!st.ready && st.heard.elapsed() > limit).then(|| {
            format!(
                "no worker asked for a task of the dataset's preparation within {limit:?} (are the workers started, and can they reach this coordinator?)"
            )
        })
    }

    /// One line on the phase's tasks: done, held, waiting, and the input bytes done.
    fn progress(&self, st: &State, started: Instant) {
        let done: Vec<&Slot> = st.slots.iter().filter(|s| s.done.is_some()).collect();
        let bytes: u64 = st.slots.iter().map(|s| s.task.bytes()).sum();
        let done_bytes: u64 = done.iter().map(|s| s.task.bytes()).sum();
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            done = done.len(),
            running = st
                .slots
                .iter()
                .filter(|s| s.done.is_none() && s.holder.is_some())
                .count(),
            tasks = st.slots.len(),
            done_mb = done_bytes as f64 / 1e6,
            total_mb = bytes as f64 / 1e6,
            mb_per_sec = format!("{:.1}", done_bytes as f64 / 1e6 / seconds.max(1e-9)),
            "preparing the dataset"
        );
    }

    /// Run one phase's tasks to their end: the results, in task order.
    async fn phase(&self, tasks: Vec<Task>, job: &Job) -> lightrnn_core::Result<Vec<(Task, Done)>> {
        let first = {
            let mut st = self.lock();
            st.next_id += tasks.len() as u64;
            st.next_id - tasks.len() as u64 + 1
        };
        let mut slots = Vec::with_capacity(tasks.len());
        for (k, task) in tasks.into_iter().enumerate() {
            let id = first + k as u64;
            let name = format!("tasks/task-{id}.json");
            let wire = retry("storing a task", || {
                inline_or_stored(task.clone(), &self.plan.dataset, &name, |url| {
                    Task::Stored { url }
                })
            })
            .await?;
            slots.push(Slot {
                id,
                task,
                wire,
                holder: None,
                done: None,
                handouts: 0,
                failures: 0,
                failed_by: Vec::new(),
            });
        }
        self.lock().slots = slots;
        self.available.notify_waiters();
        let (started, mut logged) = (Instant::now(), Instant::now());
        loop {
            {
                let mut st = self.lock();
                if logged.elapsed() >= PROGRESS {
                    logged = Instant::now();
                    self.progress(&st, started);
                }
                if let Some(why) = &st.failed {
                    return Err(lightrnn_core::Error::Data(why.clone()));
                }
                if st.slots.iter().all(|s| s.done.is_some()) {
                    let slots = std::mem::take(&mut st.slots);
                    return Ok(slots
                        .into_iter()
                        .filter_map(|s| Some((s.task, s.done?)))
                        .collect());
                }
                // A task lost too often ends the preparation (and `failed` says why).
                let _ = self.expire(&mut st);
            }
            if job.failed() {
                return Err(lightrnn_core::Error::Control(
                    "the job ended while its dataset was being prepared".into(),
                ));
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), self.changed.notified()).await;
        }
    }

    /// Prepare the dataset through the workers: the vocabulary, every split's shards and
    /// manifests.
    async fn run(&self, job: &Job) -> lightrnn_core::Result<Prepared> {
        let plan = &self.plan;
        retry("clearing an earlier attempt", || plan.clear()).await?;
        let counted = self.phase(plan.count_tasks(), job).await?;
        let (vocab, figures) = retry("merging the counts", || plan.vocab(&counted)).await?;
        tracing::info!(
            vocab = figures.vocab_size,
            types = figures.types,
            train_tokens = figures.train_tokens,
            "the workers' counts merged into the vocabulary"
        );
        let sharded = self.phase(plan.shard_tasks(&counted), job).await?;
        let stitched = self.phase(plan.stitch_tasks(&sharded), job).await?;
        retry("writing the manifests", || {
            plan.commit(&vocab, &sharded, &stitched)
        })
        .await?;
        Ok(figures)
    }

    /// The dataset is ready: workers asking are told so.
    fn set_ready(&self) {
        self.lock().ready = true;
        self.available.notify_waiters();
    }

    /// A worker's report whose result was stored as an object, with the result read.
    async fn load(&self, ask: PrepareAsk) -> lightrnn_core::Result<PrepareAsk> {
        let Some((id, TaskReport::Done(done @ Done::Stored { .. }))) = ask.report else {
            return Ok(ask);
        };
        let done = done.load(&self.plan.dataset).await?;
        Ok(PrepareAsk {
            report: Some((id, TaskReport::Done(done))),
            ..ask
        })
    }
}

/// `f` again after a store error worth retrying, with back-off, up to [`STORE_ATTEMPTS`].
async fn retry<T, F, Fut>(what: &str, mut f: F) -> lightrnn_core::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = lightrnn_core::Result<T>>,
{
    let mut wait = Duration::from_millis(250);
    for attempt in 1.. {
        match f().await {
            Err(e) if e.retryable() && attempt < STORE_ATTEMPTS => {
                tracing::warn!(attempt, error = %e, "{what} failed: trying again");
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            r => return r,
        }
    }
    unreachable!("the loop returns")
}

impl Job {
    /// A worker's `Prepare` call: its report on its task, and what it does next (with no
    /// dataset to prepare, or once it is: join). A worker with nothing to do waits here
    /// for a task, up to [`LONG_POLL`], rather than asking again and again.
    pub async fn prepare(&self, ask: PrepareAsk) -> JobResult<PrepareAnswer> {
        self.count_rpc();
        super::join::same_version(&ask.version)?;
        let Some(p) = self.prep.as_ref().filter(|_| self.preparing()) else {
            return self.ended().map(|()| PrepareAnswer::Ready);
        };
        let mut ask = p
            .load(ask)
            .await
            .map_err(|e| JobError::BadRequest(format!("a task's stored result: {e}")))?;
        let deadline = tokio::time::Instant::now() + LONG_POLL;
        let working = matches!(ask.report, Some((_, TaskReport::Working)));
        loop {
            let notified = p.available.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.ended()?;
            let report = ask.report.take();
            let answer = p.answer(PrepareAsk {
                report,
                ..ask.clone()
            })?;
            if !matches!(answer, PrepareAnswer::Wait(_)) || working {
                return Ok(answer);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(answer);
            }
        }
    }

    /// The job's failure, if it has failed.
    fn ended(&self) -> JobResult<()> {
        match self.lock().failed.clone() {
            Some(why) => Err(JobError::Ended(why)),
            None => Ok(()),
        }
    }

    /// Why the preparation looks abandoned (no worker heard of for the join timeout).
    pub(super) fn preparation_unheard(&self) -> Option<String> {
        self.prep
            .as_ref()
            .filter(|_| self.preparing())
            .and_then(|p| p.unheard(self.spec.join_timeout))
    }

    /// Prepare the dataset through the workers, then let the group form (its join
    /// timeout counts from then); a failure ends the job.
    pub async fn prepare_dataset(self: Arc<Self>) {
        let Some(prep) = self.prep.clone() else {
            return;
        };
        let started = Instant::now();
        match prep.run(&self).await {
            Ok(f) => {
                let seconds = started.elapsed().as_secs_f64();
                tracing::info!(
                    seconds = format!("{seconds:.2}"),
                    input_mb = f.bytes as f64 / 1e6,
                    mb_per_sec = format!("{:.1}", f.bytes as f64 / 1e6 / seconds.max(1e-9)),
                    tokens = f.tokens,
                    vocab = f.vocab_size,
                    "dataset prepared by the workers"
                );
                self.stats_mut().prepare_seconds = Some(seconds);
                // The dataset's facts first: a worker told it is ready may join at once.
                let _ = self.dataset.set((f.train_tokens, f.vocab_size));
                self.lock().generation_started = tokio::time::Instant::now();
                prep.set_ready();
                self.bump();
            }
            Err(e) => self.fault(format!("preparing the dataset: {e}")),
        }
    }
}

#[cfg(test)]
#[path = "prepare_tests.rs"]
mod tests;
