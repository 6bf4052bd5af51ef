//! The coordinator: the tonic service that owns one distributed training job.
//!
//! It prepares the dataset once, waits for `world_size` workers (ranks assigned in join
//! order or taken from the workers' RANK; an elastic job forms with any number from
//! `min_world` up once no worker has joined for `form_wait`, and ranks are then
//! renumbered 0..n in that order), hands each the config, the data and run
//! locations, the checkpoint to resume from and every rank's collective address; leases
//! each rank its share of every epoch's streams and checks at the epoch barrier that the
//! ranks together consumed exactly the epoch's tokens; sums the ranks' partial loss tables
//! (in rank order, so the result does not depend on arrival order), solves the word
//! reallocation and streams the allocation back; commits each checkpoint (its manifest,
//! after checking the objects rank 0 wrote) once every rank has reached its step.
//!
//! Faults have two paths. A lost worker ([`Job::lose_worker`]: a missed heartbeat
//! deadline, a rank's retryable `Fail` such as a broken collective, a worker process that
//! exited) ends the current *generation*: the coordinator forgets the group, and the
//! workers that are left and replacements join a new generation that resumes from the
//! last committed checkpoint (up to `max_restarts` times; restarts are counted by
//! cause). An elastic group that formed below `world_size` grows when a worker asks to
//! join: at its next committed checkpoint it re-forms with the newcomer (a "grow"
//! generation, not counted as a restart). Anything else ([`Job::fault`]: a data-accounting mismatch, a failed solve or
//! commit, ranks that disagree on the parameters, a group that does not form in time,
//! restarts exhausted) ends the job. Either way every waiting RPC returns at once and
//! heartbeats answer, so no worker waits on a dead group. Requests of another
//! generation are refused (FAILED_PRECONDITION): a stale worker cannot act on the job.
//!
//! The rank-ordered table sum keeps every rank's partial tables until the last arrives:
//! world x V x (R + C) x 4 bytes on the coordinator.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

use lightrnn_alloc::{Reallocation, RoundOptions, SolveOptions};
use lightrnn_kernels::LossTables;
use lightrnn_proto::v1::{
    AllocationChunk, AllocationRequest, CommitReply, CommitRequest, EpochDoneReply,
    EpochDoneRequest, FailReply, FailRequest, FinishReply, FinishRequest, HeartbeatReply,
    HeartbeatRequest, JoinReply, JoinRequest, LeaseReply, LeaseRequest, PushReply, TableChunk,
    TableKind,
};
use lightrnn_proto::{CHUNK_BYTES, Coordinator, CoordinatorServer, MAX_MESSAGE_BYTES};
use lightrnn_worker::checkpoint::{self, Meta};
use lightrnn_worker::config::TrainConfig;
use lightrnn_worker::data::dataset::{Dataset, PrepareOptions};
use lightrnn_worker::data::store::Location;
use lightrnn_worker::dist::collective::share;
use lightrnn_worker::report::Summary;
use lightrnn_worker::{Error, Result};

/// Everything the coordinator hands out and enforces for one job.
#[derive(Clone)]
pub struct JobSpec {
    pub cfg: TrainConfig,
    /// The prepared dataset.
    pub data: Location,
    pub out: Location,
    /// The checkpoint the job resumes from.
    pub checkpoint: Option<Location>,
    pub backend: String,
    /// Workers in the job: the most (an elastic job forms with fewer, see `min_world`).
    pub world_size: usize,
    /// The fewest workers a generation forms with (= `world_size` unless elastic).
    pub min_world: usize,
    /// An elastic generation with at least `min_world` workers forms once no worker has
    /// joined for this long.
    pub form_wait: Duration,
    pub heartbeat: Duration,
    /// A rank silent for this long is lost (5 heartbeats unless set).
    pub heartbeat_timeout: Duration,
    /// Deadline of every collective read and write on the workers.
    pub collective_timeout: Duration,
    /// How long the group may take to form.
    pub join_timeout: Duration,
    /// Tokens of the training split (data accounting).
    pub train_tokens: u64,
    pub run_id: String,
    /// New generations after lost workers before the job gives up.
    pub max_restarts: u64,
    /// Words in the dataset's vocabulary (the loss tables' V).
    pub vocab: usize,
    /// Calls must present this bearer token (`None`: no authentication, loopback only).
    pub token: Option<String>,
    /// Serve over TLS with this configuration (identity and, for mutual TLS, client
    /// verification; see [`crate::tls`]).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl JobSpec {
    /// Prepare the dataset (once, for all workers) and find the checkpoint to resume from;
    /// refuses to start a new run over an existing one.
    pub async fn prepare(
        cfg: TrainConfig,
        data: &Location,
        out: &Location,
        resume: bool,
        (min_world, world_size): (usize, usize),
    ) -> Result<Self> {
        cfg.validate()?;
        if min_world == 0 || min_world > world_size {
            return Err(Error::Config(format!(
                "world size {min_world}:{world_size}: expected 1 <= MIN <= MAX"
            )));
        }
        for w in min_world..=world_size {
            if !cfg.batch.is_multiple_of(w) || cfg.eval_batch < w {
                return Err(Error::Config(format!(
                    "batch {} must split evenly over {w} workers, and eval_batch {} must give each at least one stream",
                    cfg.batch, cfg.eval_batch
                )));
            }
            cfg.groups_for(w)?;
        }
        let prep = PrepareOptions {
            text: cfg.text_options(),
            vocab_size: cfg.vocab_size,
            shard_tokens: cfg.shard_tokens,
        };
        let ds = Dataset::open_or_prepare(data, &out.join("data"), &prep).await?;
        let newest = checkpoint::list(out).await?.into_iter().next();
        let checkpoint = match (resume, newest) {
            (false, Some((step, dir))) => {
                return Err(Error::Config(format!(
                    "{out} already holds a run (checkpoint {dir} at step {step}): pass --resume to continue it, or choose another --out"
                )));
            }
            (false, None) => None,
            (true, _) => match checkpoint::newest(out).await? {
                Some(ck) => Some(Location::parse(&ck.url)?),
                None => {
                    tracing::info!(out = %out, "no checkpoint to resume from: starting a new run");
                    None
                }
            },
        };
        let heartbeat = Duration::from_secs(2);
        let run_id = format!(
            "{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis())
        );
        Ok(Self {
            cfg,
            data: ds.loc.clone(),
            out: out.clone(),
            checkpoint,
            backend: "auto".into(),
            world_size,
            min_world,
            form_wait: Duration::from_secs(10),
            heartbeat,
            heartbeat_timeout: heartbeat * 5,
            collective_timeout: Duration::from_secs(120),
            join_timeout: Duration::from_secs(600),
            train_tokens: ds.train.tokens(),
            run_id,
            max_restarts: 3,
            vocab: ds.vocab.len(),
            token: None,
            tls: None,
        })
    }
}

struct Member {
    addr: String,
    last_seen: Instant,
    step: u64,
    /// The worker's process id (with the host: which process died).
    pid: u32,
    /// Its latest figures (from heartbeats).
    report: Option<lightrnn_worker::report::RankReport>,
}

#[derive(Default)]
struct EpochAcc {
    /// (streams, cursor) every rank must agree on.
    geometry: Option<(u64, u64)>,
    leased: Vec<bool>,
    done: Vec<bool>,
    tokens: u64,
    expected: u64,
    checked: bool,
}

#[derive(Default)]
struct Round {
    parts: Vec<Option<LossTables>>,
    cells: Option<Vec<u32>>,
    move_cost: f64,
    solving: bool,
    result: Option<Arc<Reallocation>>,
}

#[derive(Default)]
struct CommitSt {
    arrived: Vec<bool>,
    /// Each rank's parameter checksum at the step.
    sums: Vec<String>,
    dir: String,
    meta: Option<String>,
    committing: bool,
    done: bool,
}

struct State {
    generation: u64,
    /// Before the group forms, one slot per possible rank (`world_size`); after, exactly
    /// the formed group's ranks.
    members: Vec<Option<Member>>,
    formed: bool,
    /// Ranks of the formed group (`world_size` until it forms).
    world: usize,
    /// When the last worker joined this generation (an elastic group forms after a
    /// quiet `form_wait`).
    last_join: Instant,
    /// When a worker last asked to join the formed group (an elastic group below its
    /// maximum then grows at its next checkpoint).
    knocked: Option<Instant>,
    epochs: BTreeMap<u64, EpochAcc>,
    rounds: BTreeMap<u64, Round>,
    commits: BTreeMap<u64, CommitSt>,
    finished: Vec<bool>,
    /// Each rank's final parameter checksum.
    final_sums: Vec<String>,
    summary: Option<String>,
    failed: Option<String>,
    /// When the current generation began (the join deadline counts from here).
    generation_started: Instant,
    /// Why the last generation ended.
    last_cause: String,
    /// The checkpoint a new generation resumes from (the last one committed).
    resume_from: Option<String>,
}

impl State {
    fn new(world: usize, generation: u64, resume_from: Option<String>) -> Self {
        Self {
            generation,
            members: (0..world).map(|_| None).collect(),
            formed: false,
            world,
            last_join: Instant::now(),
            knocked: None,
            epochs: BTreeMap::new(),
            rounds: BTreeMap::new(),
            commits: BTreeMap::new(),
            finished: vec![false; world],
            final_sums: vec![String::new(); world],
            summary: None,
            failed: None,
            generation_started: Instant::now(),
            last_cause: String::new(),
            resume_from,
        }
    }
}

/// Fail the job while holding the state lock, so that no waiter sees the state that
/// revealed the fault before the fault itself (bump after releasing the lock).
fn fail_locked(st: &mut State, why: String) {
    if st.failed.is_none() {
        tracing::error!(generation = st.generation, cause = %why, "job failed");
        st.failed = Some(why);
    }
}

/// A parameter checksum as the workers send it: 64 hex digits.
fn valid_sum(s: &str) -> Result<(), Status> {
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(Status::invalid_argument(
            "params_sha256 is not 64 hex digits",
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

/// Counters of the control plane (reported at the end of the job).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct JobStats {
    pub rpcs: u64,
    pub epochs_accounted: u64,
    pub tokens_accounted: u64,
    pub reallocations: u64,
    pub checkpoints_committed: u64,
    /// Checksum of the parameters every rank ended with (verified equal).
    pub params_sha256: String,
    /// New generations started, by cause (heartbeat, worker_failed, process_exit).
    pub restarts: BTreeMap<String, u64>,
    pub generation: u64,
    /// Tokens of each completed epoch (of the surviving trajectory).
    pub epoch_tokens: BTreeMap<u64, u64>,
    /// Workers in each generation's group.
    pub worlds: BTreeMap<u64, usize>,
    /// Generations started to take in workers that asked to join (elastic growth).
    pub grows: u64,
}

/// One job's shared state behind the service.
pub struct Job {
    spec: JobSpec,
    /// A stop was requested (SIGTERM): heartbeats tell the workers.
    stop: std::sync::atomic::AtomicBool,
    state: Mutex<State>,
    version: watch::Sender<u64>,
    stats: Mutex<JobStats>,
    /// Processes of ranks lost to missed heartbeats: alive but stalled (a launcher that
    /// started them kills them and starts replacements).
    stalled: Mutex<Vec<u32>>,
}

type Guard<'a> = std::sync::MutexGuard<'a, State>;

impl Job {
    pub fn new(spec: JobSpec) -> Arc<Self> {
        let w = spec.world_size;
        let resume_from = spec.checkpoint.as_ref().map(|c| c.url().to_string());
        Arc::new(Self {
            spec,
            stop: std::sync::atomic::AtomicBool::new(false),
            state: Mutex::new(State::new(w, 1, resume_from)),
            version: watch::channel(0).0,
            stats: Mutex::new(JobStats {
                generation: 1,
                ..Default::default()
            }),
            stalled: Mutex::new(Vec::new()),
        })
    }

    fn lock(&self) -> Guard<'_> {
        // A panic while holding the lock cannot leave the state half-updated in a way
        // that matters more than losing the job: keep serving the error paths.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    fn count_rpc(&self) {
        if let Ok(mut s) = self.stats.lock() {
            s.rpcs += 1;
        }
    }

    /// The job cannot go on: record why (the first cause wins), wake every waiter.
    pub fn fault(&self, why: String) {
        let mut st = self.lock();
        if st.failed.is_none() {
            tracing::error!(generation = st.generation, cause = %why, "job failed");
            st.failed = Some(why);
        }
        drop(st);
        self.bump();
    }

    /// Form this generation's group when it can: every slot taken, or (elastic) at
    /// least `min_world` workers and no join for `form_wait`. The members are renumbered
    /// 0..n in slot order. True when it formed now.
    fn try_form(&self, st: &mut State) -> bool {
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
        if let Ok(mut s) = self.stats.lock() {
            s.worlds.insert(st.generation, n);
        }
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
    fn new_generation(&self, generation: u64, restart: Option<&str>, why: String) {
        let mut st = self.lock();
        if st.failed.is_some() || st.generation != generation || st.finished.iter().all(|&f| f) {
            return;
        }
        let used: u64 = self
            .stats
            .lock()
            .map(|s| s.restarts.values().sum())
            .unwrap_or(0);
        if restart.is_some() && used >= self.spec.max_restarts {
            drop(st);
            self.fault(format!(
                "{why} (giving up after {used} restarts, --max-restarts {})",
                self.spec.max_restarts
            ));
            return;
        }
        if let Ok(mut s) = self.stats.lock() {
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
        drop(st);
        self.bump();
    }

    /// A worker process on this machine exited (`--workers N`): a lost worker if it is a
    /// member of the current generation, nothing otherwise (its loss was handled).
    pub fn process_exited(&self, pid: u32, why: String) {
        let generation = {
            let st = self.lock();
            let member = st.members.iter().flatten().any(|m| m.pid == pid);
            if !member {
                return;
            }
            st.generation
        };
        self.lose_worker(generation, "process_exit", why);
    }

    /// Ask the workers to stop at a common step with a checkpoint (preemption); the job
    /// then finishes as usual, with `stopped_by: "signal"`.
    pub fn request_stop(&self) {
        if self.stop.swap(true, std::sync::atomic::Ordering::Relaxed) {
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

    /// The job's figures for `/metrics`.
    pub fn snapshot(&self) -> crate::metrics::Snapshot {
        let st = self.lock();
        let stats = self.stats.lock().map(|s| s.clone()).unwrap_or_default();
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
            tokens_accounted: stats.tokens_accounted,
            checkpoints_committed: stats.checkpoints_committed,
            reallocations: stats.reallocations,
            rpcs: stats.rpcs,
        }
    }

    /// Process ids of workers lost to missed heartbeats since the last call.
    pub fn take_stalled(&self) -> Vec<u32> {
        self.stalled
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }

    /// The current generation.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Whether the job has failed for good.
    pub fn failed(&self) -> bool {
        self.lock().failed.is_some()
    }

    /// Refuse requests of another generation, from unknown ranks, or to a failed job.
    fn check(&self, st: &State, generation: u64, rank: u32) -> Result<(), Status> {
        if generation != st.generation {
            return Err(Status::failed_precondition(format!(
                "stale generation {generation}: the job is at generation {}",
                st.generation
            )));
        }
        if st.members.get(rank as usize).is_none_or(|m| m.is_none()) {
            return Err(Status::permission_denied(format!(
                "rank {rank} has not joined this job"
            )));
        }
        if let Some(f) = &st.failed {
            return Err(Status::aborted(f.clone()));
        }
        Ok(())
    }

    /// Wait until `ready` yields, re-checking after every state change; a failed job
    /// ends every wait.
    async fn wait_for<T>(
        &self,
        generation: u64,
        mut ready: impl FnMut(&mut State) -> Option<Result<T, Status>>,
    ) -> Result<T, Status> {
        loop {
            let mut rx = self.version.subscribe();
            {
                let mut st = self.lock();
                if let Some(f) = &st.failed {
                    return Err(Status::aborted(f.clone()));
                }
                if st.generation != generation {
                    return Err(Status::failed_precondition(format!(
                        "generation {generation} ended ({}): join again",
                        st.last_cause
                    )));
                }
                if let Some(r) = ready(&mut st) {
                    return r;
                }
            }
            if rx.changed().await.is_err() {
                return Err(Status::unavailable("the coordinator is shutting down"));
            }
        }
    }

    /// Lost ranks and a group that does not form: checked every heartbeat interval.
    async fn monitor(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.spec.heartbeat);
        loop {
            tick.tick().await;
            let (generation, lost, cause) = {
                let mut st = self.lock();
                if self.try_form(&mut st) {
                    drop(st);
                    self.bump();
                    continue;
                }
                if st.failed.is_some() || st.finished.iter().all(|&f| f) {
                    return;
                }
                let cause = if !st.formed {
                    let n = st.members.iter().flatten().count();
                    (st.generation_started.elapsed() > self.spec.join_timeout).then(|| {
                        format!(
                            "only {n} of {} workers joined generation {} within {:?}",
                            self.spec.min_world, st.generation, self.spec.join_timeout
                        )
                    })
                } else {
                    st.members.iter().enumerate().find_map(|(r, m)| {
                        let m = m.as_ref()?;
                        let silent = m.last_seen.elapsed();
                        (!st.finished[r] && silent > self.spec.heartbeat_timeout).then(|| {
                            if let Ok(mut v) = self.stalled.lock() {
                                v.push(m.pid);
                            }
                            format!(
                                "rank {r} ({}, pid {}) missed its heartbeats for {:.1} s (last at step {})",
                                m.addr,
                                m.pid,
                                silent.as_secs_f64(),
                                m.step
                            )
                        })
                    })
                };
                (st.generation, st.formed, cause)
            };
            match cause {
                // A silent rank of a formed group is a lost worker; a group that does
                // not form in time ends the job.
                Some(c) if lost => self.lose_worker(generation, "heartbeat", c),
                Some(c) => {
                    self.fault(c);
                    return;
                }
                None => {}
            }
        }
    }

    /// Sum the ranks' tables in rank order and solve, off the async threads.
    fn start_solve(self: &Arc<Self>, round: u64) {
        let job = self.clone();
        tokio::spawn(async move {
            let (generation, parts, cells, move_cost) = {
                let mut st = job.lock();
                let generation = st.generation;
                let Some(r) = st.rounds.get_mut(&round) else {
                    return;
                };
                (
                    generation,
                    std::mem::take(&mut r.parts),
                    r.cells.take(),
                    r.move_cost,
                )
            };
            let opts = RoundOptions {
                solver: job.spec.cfg.realloc_solver,
                solve: SolveOptions {
                    threads: job.spec.cfg.threads,
                    ..Default::default()
                },
                move_cost,
            };
            let solved = tokio::task::spawn_blocking(move || -> Result<Reallocation> {
                let mut it = parts.into_iter().flatten();
                let mut sum = it
                    .next()
                    .ok_or_else(|| Error::Control("no loss tables arrived".into()))?;
                for p in it {
                    sum.add(&p)?;
                }
                let cells =
                    cells.ok_or_else(|| Error::Control("rank 0 sent no allocation".into()))?;
                Ok(lightrnn_alloc::reallocate(&sum, &cells, &opts)?)
            })
            .await;
            match solved {
                Ok(Ok(s)) => {
                    tracing::info!(
                        round,
                        solver = %s.report.solver,
                        objective_before = s.report.objective_before,
                        objective_after = s.report.objective_after,
                        words_moved = s.report.words_moved,
                        seconds = s.report.seconds_solve,
                        "allocation solved"
                    );
                    if let Ok(mut x) = job.stats.lock() {
                        x.reallocations += 1;
                    }
                    let mut st = job.lock();
                    // A solve of an ended generation is dropped with it.
                    if st.generation == generation
                        && let Some(r) = st.rounds.get_mut(&round)
                    {
                        r.result = Some(Arc::new(s));
                    }
                    drop(st);
                    job.bump();
                }
                Ok(Err(e)) => job.fault(format!("reallocation round {round}: {e}")),
                Err(e) => job.fault(format!("reallocation round {round}: solver task: {e}")),
            }
        });
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
                (
                    st.generation,
                    c.dir.clone(),
                    c.meta.clone().unwrap_or_default(),
                )
            };
            let r: Result<()> = async {
                let loc = Location::parse(&dir)?;
                let expected = job
                    .spec
                    .out
                    .join("checkpoints")
                    .join(&checkpoint::dir_name(step));
                if loc.url() != expected.url() {
                    return Err(Error::Control(format!(
                        "checkpoint {dir} lies outside the run {}",
                        job.spec.out
                    )));
                }
                let meta: Meta = serde_json::from_str(&meta)
                    .map_err(|e| Error::Control(format!("manifest of step {step}: {e}")))?;
                if meta.step != step {
                    return Err(Error::Control(format!(
                        "the manifest of step {step} says step {}",
                        meta.step
                    )));
                }
                checkpoint::commit(&loc, &meta, true).await
            }
            .await;
            match r {
                Ok(()) => {
                    tracing::info!(step, dir = %dir, "checkpoint committed");
                    if let Ok(mut x) = job.stats.lock() {
                        x.checkpoints_committed += 1;
                    }
                    let mut st = job.lock();
                    let mut grow = None;
                    if st.generation == generation {
                        st.resume_from = Some(dir.clone());
                        if let Some(c) = st.commits.get_mut(&step) {
                            c.done = true;
                        }
                        // A worker is still asking to join (it retries every 300 ms).
                        if st.world < job.spec.world_size
                            && st
                                .knocked
                                .is_some_and(|t| t.elapsed() < Duration::from_secs(5))
                        {
                            grow = Some(st.world);
                        }
                    }
                    drop(st);
                    job.bump();
                    if let Some(n) = grow {
                        job.new_generation(
                            generation,
                            None,
                            format!(
                                "a worker asked to join the group of {n} (up to {}): the group grows from the checkpoint of step {step}",
                                job.spec.world_size
                            ),
                        );
                    }
                }
                Err(e) => job.fault(format!("committing the checkpoint of step {step}: {e}")),
            }
        });
    }
}

/// A rank taken by a worker waiting in Join for its group to form.
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

/// The tonic service over a [`Job`].
#[derive(Clone)]
pub struct Service {
    job: Arc<Job>,
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<AllocationChunk, Status>> + Send>>;

fn bytes_of<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    v.iter().flat_map(|&x| f(x)).collect()
}

#[tonic::async_trait]
impl Coordinator for Service {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        let job = &self.job;
        job.count_rpc();
        let r = req.into_inner();
        let me = env!("CARGO_PKG_VERSION");
        if r.version != me {
            return Err(Status::invalid_argument(format!(
                "worker version {} differs from the coordinator's {me}",
                r.version
            )));
        }
        let w = job.spec.world_size;
        let (rank, generation) = {
            let mut st = job.lock();
            if let Some(f) = &st.failed {
                return Err(Status::aborted(f.clone()));
            }
            if st.formed {
                if st.world < w {
                    // Elastic and below its maximum: the group takes this worker in at
                    // its next checkpoint (the worker keeps asking meanwhile).
                    st.knocked = Some(Instant::now());
                    return Err(Status::resource_exhausted(format!(
                        "the group of generation {} trains with {} of up to {w} workers: it takes this one in at its next checkpoint",
                        st.generation, st.world
                    )));
                }
                return Err(Status::resource_exhausted(format!(
                    "the group of generation {} is complete ({w} workers)",
                    st.generation
                )));
            }
            let rank = if r.rank >= 0 {
                let k = r.rank as usize;
                if k >= w {
                    return Err(Status::invalid_argument(format!(
                        "rank {k} in a world of {w}"
                    )));
                }
                if st.members[k].is_some() {
                    return Err(Status::already_exists(format!(
                        "rank {k} has joined already"
                    )));
                }
                k
            } else {
                // Requested ranks first: assign the lowest rank no one holds or asked for.
                st.members
                    .iter()
                    .position(|m| m.is_none())
                    .ok_or_else(|| Status::resource_exhausted("no free rank"))?
            };
            st.members[rank] = Some(Member {
                addr: r.collective_addr.clone(),
                last_seen: Instant::now(),
                step: 0,
                pid: r.pid,
                report: None,
            });
            tracing::info!(rank, addr = %r.collective_addr, host = %r.host, pid = r.pid, "worker joined");
            st.last_join = Instant::now();
            job.try_form(&mut st);
            (rank, st.generation)
        };
        job.bump();
        // A worker that goes away while waiting for the others (its call is dropped)
        // frees its rank for another.
        let mut slot = Slot {
            job: job.clone(),
            generation,
            rank,
            addr: r.collective_addr.clone(),
            armed: true,
        };
        let spec = &job.spec;
        let me = r.collective_addr.clone();
        let (rank, world, peers, resume_from) = job
            .wait_for(generation, |st| {
                if !st.formed {
                    return None;
                }
                // The formed group's ranks (renumbered when an elastic group formed
                // below its maximum).
                let Some(rank) = st
                    .members
                    .iter()
                    .position(|m| m.as_ref().is_some_and(|m| m.addr == me))
                else {
                    return Some(Err(Status::internal(
                        "this worker is missing from its group",
                    )));
                };
                Some(Ok((
                    rank,
                    st.world,
                    st.members
                        .iter()
                        .map(|m| m.as_ref().map(|m| m.addr.clone()).unwrap_or_default())
                        .collect::<Vec<_>>(),
                    st.resume_from.clone(),
                )))
            })
            .await?;
        slot.armed = false;
        // The wait may have been long: the heartbeat clock starts now.
        if let Some(m) = job.lock().members[rank].as_mut() {
            m.last_seen = Instant::now();
        }
        Ok(Response::new(JoinReply {
            generation,
            rank: rank as u32,
            world_size: world as u32,
            peers,
            config_toml: spec.cfg.to_toml(),
            data: spec.data.url().to_string(),
            out: spec.out.url().to_string(),
            checkpoint: resume_from.unwrap_or_default(),
            restart: generation > 1,
            backend: spec.backend.clone(),
            heartbeat_ms: spec.heartbeat.as_millis() as u64,
            collective_timeout_ms: spec.collective_timeout.as_millis() as u64,
            run_id: spec.run_id.clone(),
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let r = req.into_inner();
        let mut st = self.job.lock();
        if let Some(f) = &st.failed {
            return Ok(Response::new(HeartbeatReply {
                abort: f.clone(),
                stop: false,
            }));
        }
        self.job.check(&st, r.generation, r.rank)?;
        if let Some(m) = st.members[r.rank as usize].as_mut() {
            m.last_seen = Instant::now();
            m.step = r.step;
            if let Some(p) = r.report {
                m.report = Some(p.into());
            }
        }
        Ok(Response::new(HeartbeatReply {
            abort: String::new(),
            stop: self.job.stop.load(std::sync::atomic::Ordering::Relaxed),
        }))
    }

    async fn lease(&self, req: Request<LeaseRequest>) -> Result<Response<LeaseReply>, Status> {
        let job = &self.job;
        job.count_rpc();
        let r = req.into_inner();
        let mut st = job.lock();
        job.check(&st, r.generation, r.rank)?;
        let w = st.world;
        let acc = st.epochs.entry(r.epoch).or_default();
        if acc.leased.is_empty() {
            acc.leased = vec![false; w];
            acc.done = vec![false; w];
        }
        let geometry = (r.streams, r.cursor);
        match acc.geometry {
            None => {
                let per_stream = job.spec.train_tokens / r.streams.max(1);
                acc.geometry = Some(geometry);
                acc.expected = per_stream
                    .saturating_sub(1)
                    .saturating_sub(r.cursor)
                    .saturating_mul(r.streams);
            }
            Some(g) if g != geometry => {
                let why = format!(
                    "epoch {}: rank {} asks for {} streams from position {}, another rank for {} from {}",
                    r.epoch, r.rank, r.streams, r.cursor, g.0, g.1
                );
                fail_locked(&mut st, why.clone());
                drop(st);
                job.bump();
                return Err(Status::aborted(why));
            }
            Some(_) => {}
        }
        acc.leased[r.rank as usize] = true;
        let s = share(r.streams as usize, w, r.rank as usize);
        Ok(Response::new(LeaseReply {
            epoch: r.epoch,
            stream_begin: s.start as u64,
            stream_end: s.end as u64,
        }))
    }

    async fn epoch_done(
        &self,
        req: Request<EpochDoneRequest>,
    ) -> Result<Response<EpochDoneReply>, Status> {
        let job = &self.job;
        job.count_rpc();
        let r = req.into_inner();
        let mismatch = {
            let mut st = job.lock();
            job.check(&st, r.generation, r.rank)?;
            let Some(acc) = st.epochs.get_mut(&r.epoch) else {
                return Err(Status::failed_precondition(format!(
                    "epoch {} was never leased",
                    r.epoch
                )));
            };
            if !acc.leased[r.rank as usize] || acc.done[r.rank as usize] {
                return Err(Status::failed_precondition(format!(
                    "rank {} has no open lease of epoch {}",
                    r.rank, r.epoch
                )));
            }
            acc.done[r.rank as usize] = true;
            acc.tokens = acc.tokens.saturating_add(r.tokens);
            let mut bad = None;
            if acc.done.iter().all(|&d| d) && !acc.checked {
                acc.checked = true;
                if acc.tokens != acc.expected {
                    bad = Some(format!(
                        "epoch {}: the ranks consumed {} tokens, the epoch's leases hold {}",
                        r.epoch, acc.tokens, acc.expected
                    ));
                    fail_locked(&mut st, bad.clone().unwrap_or_default());
                } else {
                    // The tokens before the lease's cursor were consumed by an earlier
                    // generation or session and are certified by the checkpoint the
                    // cursor comes from; those since were counted here.
                    let (streams, cursor) = acc.geometry.unwrap_or_default();
                    let epoch_tokens = acc.tokens.saturating_add(cursor.saturating_mul(streams));
                    tracing::info!(epoch = r.epoch, tokens = epoch_tokens, "epoch accounted");
                    if let Ok(mut x) = job.stats.lock() {
                        // An epoch finished again after a rollback replaces its count:
                        // the model kept only the second pass.
                        x.epoch_tokens.insert(r.epoch, epoch_tokens);
                        x.epochs_accounted = x.epoch_tokens.len() as u64;
                        x.tokens_accounted = x.epoch_tokens.values().sum();
                    }
                }
            }
            bad
        };
        job.bump();
        if let Some(why) = mismatch {
            return Err(Status::aborted(why));
        }
        let epoch = r.epoch;
        let tokens = job
            .wait_for(r.generation, |st| {
                let acc = st.epochs.get(&epoch)?;
                acc.done.iter().all(|&d| d).then_some(Ok(acc.tokens))
            })
            .await?;
        Ok(Response::new(EpochDoneReply { tokens }))
    }

    async fn push_loss_tables(
        &self,
        req: Request<Streaming<TableChunk>>,
    ) -> Result<Response<PushReply>, Status> {
        let job = &self.job;
        job.count_rpc();
        let mut s = req.into_inner();
        let mut tables: Option<LossTables> = None;
        let mut cells: Vec<u32> = Vec::new();
        let mut head: Option<TableChunk> = None;
        // Elements received per kind: a push must cover every table exactly.
        let mut got = [0usize; 4];
        while let Some(ch) = s.next().await {
            let ch = ch?;
            let h = match &head {
                Some(h) => h,
                None => {
                    let st = job.lock();
                    job.check(&st, ch.generation, ch.rank)?;
                    // Refuse before allocating anything: a second push of the rank, or
                    // tables of another size than this job's.
                    if st.rounds.get(&ch.round).is_some_and(|r| {
                        r.solving || r.parts.get(ch.rank as usize).is_some_and(|p| p.is_some())
                    }) {
                        return Err(Status::already_exists(format!(
                            "rank {} pushed round {} already",
                            ch.rank, ch.round
                        )));
                    }
                    drop(st);
                    if ch.vocab != job.spec.vocab as u64 {
                        return Err(Status::invalid_argument(format!(
                            "tables of {} words for a vocabulary of {}",
                            ch.vocab, job.spec.vocab
                        )));
                    }
                    let (v, rr, cc) = (ch.vocab as usize, ch.rows as usize, ch.cols as usize);
                    let c = &job.spec.cfg;
                    let d = lightrnn_kernels::ModelDims::square(v, c.emb, c.hidden, c.layers)
                        .map_err(|e| Status::invalid_argument(e.to_string()))?;
                    if (d.rows, d.cols) != (rr, cc) {
                        return Err(Status::invalid_argument(format!(
                            "tables of {v} x ({rr} + {cc}) do not fit this job's {} x {} table",
                            d.rows, d.cols
                        )));
                    }
                    let bytes = (v * (rr + cc) * 4) as f64;
                    if bytes > c.realloc_max_table_gib * (1u64 << 30) as f64 {
                        return Err(Status::resource_exhausted(format!(
                            "loss tables of {:.1} GiB exceed realloc_max_table_gib",
                            bytes / (1u64 << 30) as f64
                        )));
                    }
                    tables = Some(LossTables {
                        vocab: v,
                        rows: rr,
                        cols: cc,
                        lr: vec![0.0; v * rr],
                        lc: vec![0.0; v * cc],
                        counts: vec![0; v],
                    });
                    head.insert(TableChunk {
                        data: Vec::new(),
                        ..ch.clone()
                    })
                }
            };
            if (ch.generation, ch.rank, ch.round) != (h.generation, h.rank, h.round) {
                return Err(Status::invalid_argument("chunks of several pushes in one"));
            }
            let Some(t) = tables.as_mut() else {
                return Err(Status::internal("tables missing after the first chunk"));
            };
            let off = ch.offset as usize;
            let bad = || Status::invalid_argument(format!("table chunk at {off} out of range"));
            let kind = TableKind::try_from(ch.kind).unwrap_or(TableKind::Unspecified);
            let size = if kind == TableKind::Counts { 8 } else { 4 };
            if !ch.data.len().is_multiple_of(size) {
                return Err(Status::invalid_argument("table chunk of a partial element"));
            }
            let end = off.checked_add(ch.data.len() / size).ok_or_else(bad)?;
            got[(kind as usize).clamp(1, 4) - 1] += end - off;
            match kind {
                TableKind::Rows | TableKind::Cols => {
                    let dst = if kind == TableKind::Rows {
                        &mut t.lr
                    } else {
                        &mut t.lc
                    };
                    let dst = dst.get_mut(off..end).ok_or_else(bad)?;
                    for (d, b) in dst.iter_mut().zip(ch.data.chunks_exact(4)) {
                        *d = f32::from_le_bytes(b.try_into().expect("4 bytes"));
                    }
                }
                TableKind::Counts => {
                    let dst = t.counts.get_mut(off..end).ok_or_else(bad)?;
                    for (d, b) in dst.iter_mut().zip(ch.data.chunks_exact(8)) {
                        *d = u64::from_le_bytes(b.try_into().expect("8 bytes"));
                    }
                }
                TableKind::Cells => {
                    if off != cells.len() || end > t.vocab {
                        return Err(bad());
                    }
                    cells.extend(
                        ch.data
                            .chunks_exact(4)
                            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes"))),
                    );
                }
                TableKind::Unspecified => {
                    return Err(Status::invalid_argument("table chunk of no kind"));
                }
            }
        }
        let (Some(h), Some(t)) = (head, tables) else {
            return Err(Status::invalid_argument("an empty push"));
        };
        // Chunks may overlap or miss parts: the element counts must match exactly.
        if got[0] != t.lr.len() || got[1] != t.lc.len() || got[2] != t.counts.len() {
            return Err(Status::invalid_argument(format!(
                "an incomplete push: {} of {} row, {} of {} column, {} of {} count elements",
                got[0],
                t.lr.len(),
                got[1],
                t.lc.len(),
                got[2],
                t.counts.len()
            )));
        }
        let all_in = {
            let mut st = job.lock();
            job.check(&st, h.generation, h.rank)?;
            let w = st.world;
            let round = st.rounds.entry(h.round).or_default();
            if round.parts.is_empty() {
                round.parts = (0..w).map(|_| None).collect();
            }
            if round.solving || round.parts[h.rank as usize].is_some() {
                return Err(Status::already_exists(format!(
                    "rank {} pushed round {} already",
                    h.rank, h.round
                )));
            }
            if h.rank == 0 {
                if cells.len() != t.vocab {
                    return Err(Status::invalid_argument(format!(
                        "rank 0 sent {} of {} cells",
                        cells.len(),
                        t.vocab
                    )));
                }
                round.cells = Some(cells);
                round.move_cost = h.move_cost;
            }
            round.parts[h.rank as usize] = Some(t);
            let all = round.parts.iter().all(|p| p.is_some());
            if all {
                round.solving = true;
            }
            all
        };
        if all_in {
            job.start_solve(h.round);
        }
        Ok(Response::new(PushReply {}))
    }

    type FetchAllocationStream = ChunkStream;

    async fn fetch_allocation(
        &self,
        req: Request<AllocationRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let job = &self.job;
        job.count_rpc();
        let r = req.into_inner();
        {
            let st = job.lock();
            job.check(&st, r.generation, r.rank)?;
        }
        let round = r.round;
        let solved = job
            .wait_for(r.generation, |st| {
                st.rounds.get(&round).and_then(|x| x.result.clone()).map(Ok)
            })
            .await?;
        let report = serde_json::to_string(&solved.report)
            .map_err(|e| Status::internal(format!("report: {e}")))?;
        let v = solved.cells.len();
        let mut chunks = Vec::new();
        for (kind, size) in [(TableKind::Cells, 4usize), (TableKind::Counts, 8)] {
            let per = CHUNK_BYTES / size;
            let mut off = 0;
            while off < v {
                let end = (off + per).min(v);
                let data = if kind == TableKind::Cells {
                    bytes_of(&solved.cells[off..end], u32::to_le_bytes)
                } else {
                    bytes_of(&solved.counts[off..end], u64::to_le_bytes)
                };
                chunks.push(Ok(AllocationChunk {
                    report_json: if chunks.is_empty() {
                        report.clone()
                    } else {
                        String::new()
                    },
                    vocab: v as u64,
                    kind: kind as i32,
                    offset: off as u64,
                    data,
                }));
                off = end;
            }
        }
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }

    async fn commit(&self, req: Request<CommitRequest>) -> Result<Response<CommitReply>, Status> {
        let job = &self.job;
        job.count_rpc();
        let r = req.into_inner();
        valid_sum(&r.params_sha256)?;
        let ready = {
            let mut st = job.lock();
            job.check(&st, r.generation, r.rank)?;
            let w = st.world;
            let c = st.commits.entry(r.step).or_default();
            if c.done || c.arrived.get(r.rank as usize) == Some(&true) {
                return Err(Status::failed_precondition(format!(
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
                return Err(Status::invalid_argument(format!(
                    "step {}: rank {} commits {}, another rank {}",
                    r.step, r.rank, r.dir, c.dir
                )));
            }
            c.arrived[r.rank as usize] = true;
            c.sums[r.rank as usize] = r.params_sha256.clone();
            if r.rank == 0 {
                if r.meta_json.is_empty() {
                    return Err(Status::invalid_argument("rank 0 must send the manifest"));
                }
                c.meta = Some(r.meta_json);
            }
            let ready = !c.committing && c.meta.is_some() && c.arrived.iter().all(|&a| a);
            if ready && let Some(why) = diverged(&c.sums) {
                // Never commit a checkpoint the ranks disagree on.
                let why = format!("step {}: {why}", r.step);
                fail_locked(&mut st, why.clone());
                drop(st);
                job.bump();
                return Err(Status::aborted(why));
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
            job.start_commit(r.step);
        }
        let step = r.step;
        job.wait_for(r.generation, |st| {
            st.commits.get(&step).and_then(|c| c.done.then_some(Ok(())))
        })
        .await?;
        Ok(Response::new(CommitReply {}))
    }

    async fn finish(&self, req: Request<FinishRequest>) -> Result<Response<FinishReply>, Status> {
        let job = &self.job;
        job.count_rpc();
        let r = req.into_inner();
        {
            valid_sum(&r.params_sha256)?;
            let mut st = job.lock();
            job.check(&st, r.generation, r.rank)?;
            st.finished[r.rank as usize] = true;
            st.final_sums[r.rank as usize] = r.params_sha256;
            if r.rank == 0 {
                st.summary = Some(r.summary_json);
            }
            if st.finished.iter().all(|&f| f) {
                match diverged(&st.final_sums) {
                    Some(why) => {
                        let why = format!("at the end of the run: {why}");
                        fail_locked(&mut st, why.clone());
                        drop(st);
                        job.bump();
                        return Err(Status::aborted(why));
                    }
                    None => {
                        if let Ok(mut x) = job.stats.lock() {
                            x.params_sha256 = st.final_sums[0].clone();
                        }
                    }
                }
            }
        }
        job.bump();
        Ok(Response::new(FinishReply {}))
    }

    async fn fail(&self, req: Request<FailRequest>) -> Result<Response<FailReply>, Status> {
        let r = req.into_inner();
        {
            let st = self.job.lock();
            if r.generation != st.generation {
                return Err(Status::failed_precondition("stale generation"));
            }
        }
        let why = format!("rank {} failed: {}", r.rank, r.error);
        if r.retryable {
            self.job.lose_worker(r.generation, "worker_failed", why);
        } else {
            self.job.fault(why);
        }
        Ok(Response::new(FailReply {}))
    }
}

/// What a finished job reports.
pub struct JobOutcome {
    pub summary: Summary,
    pub stats: JobStats,
}

/// Bind the coordinator's gRPC listener (port 0 picks one).
pub fn bind(addr: std::net::SocketAddr) -> Result<TcpIncoming> {
    TcpIncoming::bind(addr)
        .map(|i| i.with_nodelay(Some(true)))
        .map_err(|e| Error::Io(format!("coordinator: cannot listen on {addr}: {e}")))
}

/// What watches the job from outside (worker processes, signals) and reports to it
/// through [`Job::process_exited`], [`Job::lose_worker`] or [`Job::fault`].
pub type External =
    Box<dyn FnOnce(Arc<Job>) -> Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send>;

/// Serve `spec`'s job on `incoming` until every rank has finished (the summary) or the
/// job fails (the first cause), re-forming the group after lost workers.
pub async fn run_job(
    spec: JobSpec,
    incoming: TcpIncoming,
    external: External,
) -> Result<JobOutcome> {
    let job = Job::new(spec);
    let watcher = tokio::spawn(external(job.clone()));
    let svc = tonic::service::interceptor::InterceptedService::new(
        CoordinatorServer::new(Service { job: job.clone() })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        lightrnn_proto::auth::RequireToken::new(job.spec.token.as_deref()),
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async {
        let _ = stop_rx.await;
    };
    let router = tonic::transport::Server::builder().add_service(svc);
    let server = match job.spec.tls.clone() {
        Some(tls) => tokio::spawn(
            router.serve_with_incoming_shutdown(crate::tls::accept(incoming, tls), shutdown),
        ),
        None => tokio::spawn(router.serve_with_incoming_shutdown(incoming, shutdown)),
    };
    let monitor = tokio::spawn(job.clone().monitor());
    let w = job.spec.world_size;
    // Across generations: a re-formed group ends the wait of the one before.
    let outcome = loop {
        let generation = job.generation();
        let r = job
            .wait_for(generation, |st| {
                st.finished
                    .iter()
                    .all(|&f| f)
                    .then(|| Ok(st.summary.clone().unwrap_or_default()))
            })
            .await;
        match r {
            Err(s) if s.code() == tonic::Code::FailedPrecondition => continue,
            r => break r,
        }
    };
    monitor.abort();
    watcher.abort();
    // Let the last replies (Finish, Fail, heartbeats answering `abort`) reach the workers.
    tokio::time::sleep(Duration::from_millis(if outcome.is_ok() {
        50
    } else {
        1500
    }))
    .await;
    let _ = stop_tx.send(());
    // A worker stalled in a stream must not keep the coordinator from exiting.
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the gRPC server ended with an error"),
        Err(_) => tracing::warn!("gRPC requests still open after the job ended: dropped"),
        _ => {}
    }
    let stats = job.stats.lock().map(|s| s.clone()).unwrap_or_default();
    match outcome {
        Ok(json) => {
            let summary: Summary = serde_json::from_str(&json)
                .map_err(|e| Error::Control(format!("rank 0's summary does not parse: {e}")))?;
            tracing::info!(world = w, stats = ?stats, "job finished");
            Ok(JobOutcome { summary, stats })
        }
        Err(s) => Err(Error::Control(s.message().to_string())),
    }
}
