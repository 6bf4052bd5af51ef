//! The coordinator: the tonic service that owns one distributed training job.
//!
//! It prepares the dataset once, waits for `world_size` workers (ranks assigned in join
//! order or taken from the workers' RANK), hands each the config, the data and run
//! locations, the checkpoint to resume from and every rank's collective address; leases
//! each rank its share of every epoch's streams and checks at the epoch barrier that the
//! ranks together consumed exactly the epoch's tokens; sums the ranks' partial loss tables
//! (in rank order, so the result does not depend on arrival order), solves the word
//! reallocation and streams the allocation back; commits each checkpoint (its manifest,
//! after checking the objects rank 0 wrote) once every rank has reached its step.
//!
//! Faults have one path, [`Job::fault`]: a missed heartbeat deadline, a rank's `Fail`, a
//! data-accounting mismatch, a failed solve or commit, a group that does not form in
//! time. It ends the job; waiting RPCs return ABORTED and heartbeats answer `abort`, so
//! no worker waits on a dead job. Requests of another generation are refused
//! (FAILED_PRECONDITION): a stale worker cannot act on the job.
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

use lightrnn_kernels::LossTables;
use lightrnn_proto::v1::{
    AllocationChunk, AllocationRequest, CommitReply, CommitRequest, EpochDoneReply,
    EpochDoneRequest, FailReply, FailRequest, FinishReply, FinishRequest, HeartbeatReply,
    HeartbeatRequest, JoinReply, JoinRequest, LeaseReply, LeaseRequest, PushReply, TableChunk,
    TableKind,
};
use lightrnn_proto::{CHUNK_BYTES, Coordinator, CoordinatorServer, MAX_MESSAGE_BYTES};
use lightrnn_worker::checkpoint::{self, Meta};
use lightrnn_worker::collective::share;
use lightrnn_worker::config::TrainConfig;
use lightrnn_worker::dataset::{Dataset, PrepareOptions};
use lightrnn_worker::realloc::{Allocate, Solved, solve};
use lightrnn_worker::store::Location;
use lightrnn_worker::train::Summary;
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
    pub world_size: usize,
    pub heartbeat: Duration,
    /// A rank silent for this long is lost (3 heartbeats unless set).
    pub heartbeat_timeout: Duration,
    /// Deadline of every collective read and write on the workers.
    pub collective_timeout: Duration,
    /// How long the group may take to form.
    pub join_timeout: Duration,
    pub allocator: Option<Arc<dyn Allocate>>,
    /// Tokens of the training split (data accounting).
    pub train_tokens: u64,
    pub run_id: String,
}

impl JobSpec {
    /// Prepare the dataset (once, for all workers) and find the checkpoint to resume from;
    /// refuses to start a new run over an existing one.
    pub async fn prepare(
        cfg: TrainConfig,
        data: &Location,
        out: &Location,
        resume: bool,
        world_size: usize,
    ) -> Result<Self> {
        cfg.validate()?;
        if world_size == 0 || !cfg.batch.is_multiple_of(world_size) || cfg.eval_batch < world_size {
            return Err(Error::Config(format!(
                "batch {} must split evenly over {world_size} workers, and eval_batch {} must give each at least one stream",
                cfg.batch, cfg.eval_batch
            )));
        }
        cfg.groups_for(world_size)?;
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
            heartbeat,
            heartbeat_timeout: heartbeat * 3,
            collective_timeout: Duration::from_secs(120),
            join_timeout: Duration::from_secs(600),
            allocator: None,
            train_tokens: ds.train.tokens(),
            run_id,
        })
    }
}

struct Member {
    addr: String,
    last_seen: Instant,
    step: u64,
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
    result: Option<Arc<Solved>>,
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
    members: Vec<Option<Member>>,
    formed: bool,
    epochs: BTreeMap<u64, EpochAcc>,
    rounds: BTreeMap<u64, Round>,
    commits: BTreeMap<u64, CommitSt>,
    finished: Vec<bool>,
    /// Each rank's final parameter checksum.
    final_sums: Vec<String>,
    summary: Option<String>,
    failed: Option<String>,
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
                &first[..first.len().min(12)],
                &s[..s.len().min(12)]
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
}

/// One job's shared state behind the service.
pub struct Job {
    spec: JobSpec,
    state: Mutex<State>,
    version: watch::Sender<u64>,
    stats: Mutex<JobStats>,
    started: Instant,
}

type Guard<'a> = std::sync::MutexGuard<'a, State>;

impl Job {
    pub fn new(spec: JobSpec) -> Arc<Self> {
        let w = spec.world_size;
        Arc::new(Self {
            spec,
            state: Mutex::new(State {
                generation: 1,
                members: (0..w).map(|_| None).collect(),
                formed: false,
                epochs: BTreeMap::new(),
                rounds: BTreeMap::new(),
                commits: BTreeMap::new(),
                finished: vec![false; w],
                final_sums: vec![String::new(); w],
                summary: None,
                failed: None,
            }),
            version: watch::channel(0).0,
            stats: Mutex::new(JobStats::default()),
            started: Instant::now(),
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

    /// The one way a job fails: record why (the first cause wins), wake every waiter.
    pub fn fault(&self, why: String) {
        let mut st = self.lock();
        if st.failed.is_none() {
            tracing::error!(generation = st.generation, cause = %why, "job failed");
            st.failed = Some(why);
        }
        drop(st);
        self.bump();
    }

    /// Refuse requests of another generation, from unknown ranks, or to a failed job.
    fn check(&self, st: &State, generation: u64, rank: u32) -> Result<(), Status> {
        if generation != st.generation {
            return Err(Status::failed_precondition(format!(
                "stale generation {generation}: the job is at generation {}",
                st.generation
            )));
        }
        if rank as usize >= self.spec.world_size || st.members[rank as usize].is_none() {
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
        mut ready: impl FnMut(&mut State) -> Option<Result<T, Status>>,
    ) -> Result<T, Status> {
        loop {
            let mut rx = self.version.subscribe();
            {
                let mut st = self.lock();
                if let Some(f) = &st.failed {
                    return Err(Status::aborted(f.clone()));
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
            let cause = {
                let st = self.lock();
                if st.failed.is_some() || st.finished.iter().all(|&f| f) {
                    return;
                }
                if !st.formed {
                    let n = st.members.iter().flatten().count();
                    (self.started.elapsed() > self.spec.join_timeout).then(|| {
                        format!(
                            "only {n} of {} workers joined within {:?}",
                            self.spec.world_size, self.spec.join_timeout
                        )
                    })
                } else {
                    st.members.iter().enumerate().find_map(|(r, m)| {
                        let m = m.as_ref()?;
                        let silent = m.last_seen.elapsed();
                        (!st.finished[r] && silent > self.spec.heartbeat_timeout).then(|| {
                            format!(
                                "rank {r} ({}) missed its heartbeats for {:.1} s (last at step {})",
                                m.addr,
                                silent.as_secs_f64(),
                                m.step
                            )
                        })
                    })
                }
            };
            if let Some(c) = cause {
                self.fault(c);
                return;
            }
        }
    }

    /// Sum the ranks' tables in rank order and solve, off the async threads.
    fn start_solve(self: &Arc<Self>, round: u64) {
        let job = self.clone();
        tokio::spawn(async move {
            let (parts, cells, move_cost) = {
                let mut st = job.lock();
                let Some(r) = st.rounds.get_mut(&round) else {
                    return;
                };
                (std::mem::take(&mut r.parts), r.cells.take(), r.move_cost)
            };
            let allocator = job.spec.allocator.clone();
            let solved = tokio::task::spawn_blocking(move || -> Result<Solved> {
                let mut it = parts.into_iter().flatten();
                let mut sum = it
                    .next()
                    .ok_or_else(|| Error::Control("no loss tables arrived".into()))?;
                for p in it {
                    sum.add(&p)?;
                }
                let cells =
                    cells.ok_or_else(|| Error::Control("rank 0 sent no allocation".into()))?;
                let a = allocator
                    .ok_or_else(|| Error::Config("the coordinator has no word allocator".into()))?;
                solve(&sum, &cells, move_cost, &*a)
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
                    if let Some(r) = job.lock().rounds.get_mut(&round) {
                        r.result = Some(Arc::new(s));
                    }
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
            let (dir, meta) = {
                let st = job.lock();
                let Some(c) = st.commits.get(&step) else {
                    return;
                };
                (c.dir.clone(), c.meta.clone().unwrap_or_default())
            };
            let r: Result<()> = async {
                let loc = Location::parse(&dir)?;
                if !loc.url().starts_with(job.spec.out.url()) {
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
                checkpoint::commit(&loc, &meta).await
            }
            .await;
            match r {
                Ok(()) => {
                    tracing::info!(step, dir = %dir, "checkpoint committed");
                    if let Ok(mut x) = job.stats.lock() {
                        x.checkpoints_committed += 1;
                    }
                    if let Some(c) = job.lock().commits.get_mut(&step) {
                        c.done = true;
                    }
                    job.bump();
                }
                Err(e) => job.fault(format!("committing the checkpoint of step {step}: {e}")),
            }
        });
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
        let rank = {
            let mut st = job.lock();
            if let Some(f) = &st.failed {
                return Err(Status::aborted(f.clone()));
            }
            if st.formed {
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
            });
            tracing::info!(rank, addr = %r.collective_addr, host = %r.host, pid = r.pid, "worker joined");
            if st.members.iter().all(|m| m.is_some()) {
                st.formed = true;
                tracing::info!(world = w, generation = st.generation, "group formed");
            }
            rank
        };
        job.bump();
        let spec = &job.spec;
        let (generation, peers) = job
            .wait_for(|st| {
                st.formed.then(|| {
                    Ok((
                        st.generation,
                        st.members
                            .iter()
                            .map(|m| m.as_ref().map(|m| m.addr.clone()).unwrap_or_default())
                            .collect::<Vec<_>>(),
                    ))
                })
            })
            .await?;
        // The wait may have been long: the heartbeat clock starts now.
        if let Some(m) = job.lock().members[rank].as_mut() {
            m.last_seen = Instant::now();
        }
        Ok(Response::new(JoinReply {
            generation,
            rank: rank as u32,
            world_size: w as u32,
            peers,
            config_toml: spec.cfg.to_toml(),
            data: spec.data.url().to_string(),
            out: spec.out.url().to_string(),
            checkpoint: spec
                .checkpoint
                .as_ref()
                .map(|c| c.url().to_string())
                .unwrap_or_default(),
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
            return Ok(Response::new(HeartbeatReply { abort: f.clone() }));
        }
        self.job.check(&st, r.generation, r.rank)?;
        if let Some(m) = st.members[r.rank as usize].as_mut() {
            m.last_seen = Instant::now();
            m.step = r.step;
        }
        Ok(Response::new(HeartbeatReply::default()))
    }

    async fn lease(&self, req: Request<LeaseRequest>) -> Result<Response<LeaseReply>, Status> {
        let job = &self.job;
        job.count_rpc();
        let r = req.into_inner();
        let w = job.spec.world_size;
        let mut st = job.lock();
        job.check(&st, r.generation, r.rank)?;
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
                acc.expected = per_stream.saturating_sub(1).saturating_sub(r.cursor) * r.streams;
            }
            Some(g) if g != geometry => {
                let why = format!(
                    "epoch {}: rank {} asks for {} streams from position {}, another rank for {} from {}",
                    r.epoch, r.rank, r.streams, r.cursor, g.0, g.1
                );
                drop(st);
                job.fault(why.clone());
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
            acc.tokens += r.tokens;
            let mut bad = None;
            if acc.done.iter().all(|&d| d) && !acc.checked {
                acc.checked = true;
                if acc.tokens != acc.expected {
                    bad = Some(format!(
                        "epoch {}: the ranks consumed {} tokens, the epoch's leases hold {}",
                        r.epoch, acc.tokens, acc.expected
                    ));
                } else {
                    tracing::info!(epoch = r.epoch, tokens = acc.tokens, "epoch accounted");
                    if let Ok(mut x) = job.stats.lock() {
                        x.epochs_accounted += 1;
                        x.tokens_accounted += acc.tokens;
                    }
                }
            }
            bad
        };
        match mismatch {
            Some(why) => job.fault(why),
            None => job.bump(),
        }
        let epoch = r.epoch;
        let tokens = job
            .wait_for(|st| {
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
        while let Some(ch) = s.next().await {
            let ch = ch?;
            let h = match &head {
                Some(h) => h,
                None => {
                    let st = job.lock();
                    job.check(&st, ch.generation, ch.rank)?;
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
            let t = tables.as_mut().expect("set with head");
            let off = ch.offset as usize;
            let bad = || Status::invalid_argument(format!("table chunk at {off} out of range"));
            let kind = TableKind::try_from(ch.kind).unwrap_or(TableKind::Unspecified);
            match kind {
                TableKind::Rows | TableKind::Cols => {
                    let dst = if kind == TableKind::Rows {
                        &mut t.lr
                    } else {
                        &mut t.lc
                    };
                    let n = ch.data.len() / 4;
                    let dst = dst.get_mut(off..off + n).ok_or_else(bad)?;
                    for (d, b) in dst.iter_mut().zip(ch.data.chunks_exact(4)) {
                        *d = f32::from_le_bytes(b.try_into().expect("4 bytes"));
                    }
                }
                TableKind::Counts => {
                    let n = ch.data.len() / 8;
                    let dst = t.counts.get_mut(off..off + n).ok_or_else(bad)?;
                    for (d, b) in dst.iter_mut().zip(ch.data.chunks_exact(8)) {
                        *d = u64::from_le_bytes(b.try_into().expect("8 bytes"));
                    }
                }
                TableKind::Cells => {
                    let n = ch.data.len() / 4;
                    if off != cells.len() || off + n > t.vocab {
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
        let w = job.spec.world_size;
        let all_in = {
            let mut st = job.lock();
            job.check(&st, h.generation, h.rank)?;
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
            .wait_for(|st| st.rounds.get(&round).and_then(|x| x.result.clone()).map(Ok))
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
        let w = job.spec.world_size;
        let ready = {
            let mut st = job.lock();
            job.check(&st, r.generation, r.rank)?;
            let c = st.commits.entry(r.step).or_default();
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
                drop(st);
                job.fault(why.clone());
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
        job.wait_for(|st| st.commits.get(&step).and_then(|c| c.done.then_some(Ok(()))))
            .await?;
        Ok(Response::new(CommitReply {}))
    }

    async fn finish(&self, req: Request<FinishRequest>) -> Result<Response<FinishReply>, Status> {
        let job = &self.job;
        job.count_rpc();
        let r = req.into_inner();
        {
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
                        drop(st);
                        job.fault(format!("at the end of the run: {why}"));
                        return Ok(Response::new(FinishReply {}));
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
        self.job.fault(format!(
            "rank {} failed ({}): {}",
            r.rank,
            if r.retryable {
                "retryable"
            } else {
                "not retryable"
            },
            r.error
        ));
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

/// Serve `spec`'s job on `incoming` until every rank has finished (the summary) or the
/// job fails (the first cause). `external` ends the job when it completes, with its
/// output as the cause (a worker process that died, a signal).
pub async fn run_job(
    spec: JobSpec,
    incoming: TcpIncoming,
    external: Pin<Box<dyn std::future::Future<Output = String> + Send>>,
) -> Result<JobOutcome> {
    let job = Job::new(spec);
    let watcher = {
        let job = job.clone();
        tokio::spawn(async move {
            let why = external.await;
            job.fault(why);
        })
    };
    let svc = CoordinatorServer::new(Service { job: job.clone() })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            }),
    );
    let monitor = tokio::spawn(job.clone().monitor());
    let w = job.spec.world_size;
    let outcome = job
        .wait_for(|st| {
            st.finished
                .iter()
                .all(|&f| f)
                .then(|| Ok(st.summary.clone().unwrap_or_default()))
        })
        .await;
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
    let _ = server.await;
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
