//! The dataset prepared by the job's workers from text ([`lightrnn_core::data::cluster`]),
//! before the group forms: the coordinator hands out each phase's tasks (count, shard,
//! stitch) to the workers that ask, merges the counts into the vocabulary and writes the
//! manifests; it reads no input bytes.
//!
//! A worker holds its task while it reports being at it (every `heartbeat`); one silent
//! for the heartbeat timeout, or whose process exited, loses it, and the next worker to
//! ask takes it over. A task that failed in a way worth retrying (a store's hiccup) is
//! handed out again, up to [`ATTEMPTS`] times; any other failure (a corrupt input, a
//! missing field) ends the job with the task's error. Results are kept by task, so a task
//! done twice (its first worker was slow, not dead) counts once.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lightrnn_core::data::cluster::{Done, Plan, Prepared, Task};
use lightrnn_core::protocol::{PrepareAnswer, PrepareAsk, TaskReport};

use super::{Job, JobError, JobResult};

/// Times a task is handed out after failures worth retrying.
const ATTEMPTS: u32 = 3;
/// How long a worker with nothing to do waits before asking again.
const WAIT: Duration = Duration::from_millis(200);
/// How often a phase's progress is logged.
const PROGRESS: Duration = Duration::from_secs(10);

/// One task of the current phase.
struct Slot {
    id: u64,
    task: Task,
    /// The worker at it, and when it last said so.
    holder: Option<(String, Instant)>,
    done: Option<Done>,
    attempts: u32,
}

#[derive(Default)]
struct State {
    next_id: u64,
    slots: Vec<Slot>,
    ready: bool,
    failed: Option<String>,
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
                ..State::default()
            }),
            changed: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A worker's report on its task, and what it does next.
    pub fn answer(&self, ask: PrepareAsk) -> JobResult<PrepareAnswer> {
        let mut st = self.lock();
        if let Some(why) = &st.failed {
            return Err(JobError::Ended(format!(
                "preparing the dataset failed: {why}"
            )));
        }
        let worker = ask.worker;
        match ask.report {
            Some((id, TaskReport::Working)) => {
                if let Some(s) = st.slots.iter_mut().find(|s| s.id == id && s.done.is_none()) {
                    match &mut s.holder {
                        Some((w, at)) if *w == worker => *at = Instant::now(),
                        // Its hold had lapsed and nobody took the task over: it keeps it.
                        None => s.holder = Some((worker.clone(), Instant::now())),
                        Some(_) => {}
                    }
                }
                return Ok(PrepareAnswer::Wait(self.heartbeat));
            }
            Some((id, TaskReport::Done(done))) => self.done(&mut st, id, &worker, done),
            Some((id, TaskReport::Failed { error, retryable })) => {
                self.failed(&mut st, id, &worker, error, retryable)?
            }
            None => {}
        }
        if st.ready {
            return Ok(PrepareAnswer::Ready);
        }
        self.expire(&mut st);
        let Some(s) = st
            .slots
            .iter_mut()
            .find(|s| s.done.is_none() && s.holder.is_none())
        else {
            return Ok(PrepareAnswer::Wait(WAIT));
        };
        s.holder = Some((worker.clone(), Instant::now()));
        s.attempts += 1;
        tracing::info!(worker = %worker, task = s.id, "{}", s.task.describe());
        Ok(PrepareAnswer::Task {
            id: s.id,
            task: Box::new(s.task.clone()),
            heartbeat: self.heartbeat,
        })
    }

    fn done(&self, st: &mut State, id: u64, worker: &str, done: Done) {
        let Some(s) = st.slots.iter_mut().find(|s| s.id == id) else {
            return; // a task of an earlier phase, done twice
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
        let Some(s) = st.slots.iter_mut().find(|s| s.id == id && s.done.is_none()) else {
            return Ok(());
        };
        let what = s.task.describe();
        if retryable && s.attempts < ATTEMPTS {
            tracing::warn!(worker, task = id, attempt = s.attempts, error = %error, "{what} failed: it is handed out again");
            s.holder = None;
            return Ok(());
        }
        let why = format!("{what} on worker {worker}: {error}");
        st.failed = Some(why.clone());
        self.changed.notify_one();
        Err(JobError::Ended(format!(
            "preparing the dataset failed: {why}"
        )))
    }

    /// Tasks whose workers fell silent go back to the queue.
    fn expire(&self, st: &mut State) {
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
            }
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
            }
        }
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
        {
            let mut st = self.lock();
            let first = st.next_id + 1;
            st.next_id += tasks.len() as u64;
            st.slots = tasks
                .into_iter()
                .enumerate()
                .map(|(k, task)| Slot {
                    id: first + k as u64,
                    task,
                    holder: None,
                    done: None,
                    attempts: 0,
                })
                .collect();
        }
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
                self.expire(&mut st);
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
    /// manifests. Workers asking afterwards are told it is ready.
    pub async fn run(self: Arc<Self>, job: Arc<Job>) -> lightrnn_core::Result<Prepared> {
        let plan = &self.plan;
        plan.clear().await?;
        let counted = self.phase(plan.count_tasks(), &job).await?;
        let (vocab, figures) = plan.vocab(&counted).await?;
        tracing::info!(
            vocab = figures.vocab_size,
            types = figures.types,
            train_tokens = figures.train_tokens,
            "the workers' counts merged into the vocabulary"
        );
        let sharded = self.phase(plan.shard_tasks(&counted), &job).await?;
        let stitched = self.phase(plan.stitch_tasks(&sharded), &job).await?;
        plan.commit(&vocab, &sharded, &stitched).await?;
        self.lock().ready = true;
        Ok(figures)
    }
}

impl Job {
    /// A worker's `Prepare` call: its report on its task, and what it does next (with no
    /// dataset to prepare, or once it is: join).
    pub fn prepare(&self, ask: PrepareAsk) -> JobResult<PrepareAnswer> {
        self.count_rpc();
        let me = env!("CARGO_PKG_VERSION");
        if ask.version != me {
            return Err(JobError::BadRequest(format!(
                "worker version {} differs from the coordinator's {me}",
                ask.version
            )));
        }
        if let Some(why) = self.lock().failed.clone() {
            return Err(JobError::Ended(why));
        }
        match &self.prep {
            Some(p) if !self.dataset_ready() => p.answer(ask),
            _ => Ok(PrepareAnswer::Ready),
        }
    }

    fn dataset_ready(&self) -> bool {
        !self.preparing()
    }

    /// Prepare the dataset through the workers, then let the group form (its join
    /// timeout counts from then); a failure ends the job.
    pub async fn prepare_dataset(self: Arc<Self>) {
        let Some(prep) = self.prep.clone() else {
            return;
        };
        let started = Instant::now();
        match prep.run(self.clone()).await {
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
                let _ = self.dataset.set((f.train_tokens, f.vocab_size));
                self.lock().generation_started = tokio::time::Instant::now();
                self.bump();
            }
            Err(e) => self.fault(format!("preparing the dataset: {e}")),
        }
    }
}
