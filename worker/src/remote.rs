//! A worker process of a distributed job: it reaches the coordinator over gRPC, joins
//! (rank, world size, config, the other ranks' collective addresses), forms the TCP ring
//! with its peers, heartbeats on a task of its own, and runs the training loop with a
//! [`Control`] whose every call is an RPC to the coordinator.
//!
//! Faults: a refused or failed RPC, a heartbeat that cannot get through for
//! `3 x heartbeat` or that the coordinator answers with `abort`, and any collective error
//! all end the training loop with an error; the worker then tells the coordinator why
//! (`Fail`, best effort) and exits non-zero. Nothing waits forever: the ring has
//! deadlines and the heartbeat task aborts a worker whose coordinator is gone.

use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::runtime::Handle;
use tonic::transport::Endpoint;

use lightrnn_kernels::LossTables;
use lightrnn_kernels::backend::BackendKind;
use lightrnn_proto::auth::{BearerToken, Client};
use lightrnn_proto::v1::{
    AllocationRequest, CommitRequest, EpochDoneRequest, FailRequest, FinishRequest,
    HeartbeatRequest, JoinReply, JoinRequest, LeaseRequest, TableChunk, TableKind,
};
use lightrnn_proto::{CHUNK_BYTES, CoordinatorClient, MAX_MESSAGE_BYTES};

use crate::checkpoint::Meta;
use crate::cluster::{Control, Dist};
use crate::collective::TcpRing;
use crate::config::TrainConfig;
use crate::store::Location;
use crate::train::{RunOptions, Summary, train_rank};
use crate::{Error, Result};
use lightrnn_alloc::{Reallocation, Report};

/// How to reach the coordinator and present this worker.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// `http://HOST:PORT` of the coordinator.
    pub coordinator: String,
    /// The rank to take (torchrun's RANK), or any.
    pub rank: Option<usize>,
    /// Host name or address the other ranks reach this worker's collective at (default:
    /// this machine's address on the route to the coordinator).
    pub advertise: Option<String>,
    /// CPU threads for the backend, overriding the job's config (several workers on one
    /// machine share its cores).
    pub threads: Option<usize>,
    /// How long to keep trying to reach the coordinator, and to wait for the group.
    pub connect_timeout: Duration,
    /// Set by this process's signal handler, or by the coordinator through heartbeats:
    /// stop at the next step all ranks agree on, with a checkpoint.
    pub stop: Arc<std::sync::atomic::AtomicBool>,
    /// The coordinator's bearer token, when it requires one.
    pub token: Option<String>,
    /// TLS to an `https://` coordinator: the CA that signed its certificate and, for
    /// mutual TLS, this worker's identity.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

fn status(what: &str, s: tonic::Status) -> Error {
    Error::Control(format!("{what}: {} ({:?})", s.message(), s.code()))
}

async fn connect(
    url: &str,
    timeout: Duration,
    token: Option<&str>,
    tls: Option<&tonic::transport::ClientTlsConfig>,
) -> Result<Client> {
    let auth = BearerToken::new(token).map_err(Error::Config)?;
    let mut ep = Endpoint::from_shared(url.to_string())
        .map_err(|e| Error::Config(format!("coordinator address {url:?}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30));
    match (url.starts_with("https://"), tls) {
        (true, Some(t)) => {
            ep = ep
                .tls_config(t.clone())
                .map_err(|e| Error::Config(format!("TLS to {url}: {e}")))?;
        }
        (true, None) => {
            return Err(Error::Config(format!(
                "{url} is TLS: give the CA that signed its certificate (--tls-ca)"
            )));
        }
        (false, Some(_)) => {
            return Err(Error::Config(format!(
                "TLS settings were given but {url} is not https://"
            )));
        }
        (false, None) => {}
    }
    let deadline = Instant::now() + timeout;
    loop {
        match ep.connect().await {
            Ok(ch) => {
                return Ok(CoordinatorClient::with_interceptor(ch, auth)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES));
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(Error::Control(format!(
                    "cannot reach the coordinator at {url} within {timeout:?}: {e}"
                )));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The address this machine uses to reach `url`'s host (no packet is sent).
fn route_to(url: &str) -> Result<std::net::IpAddr> {
    let u = url::Url::parse(url).map_err(|e| Error::Config(format!("{url:?}: {e}")))?;
    let host = u.host_str().unwrap_or("127.0.0.1");
    let port = u.port_or_known_default().unwrap_or(80);
    let target = (host, port)
        .to_socket_addrs()
        .map_err(|e| Error::Config(format!("cannot resolve {host}: {e}")))?
        .next()
        .ok_or_else(|| Error::Config(format!("{host} resolves to nothing")))?;
    let any: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let s = UdpSocket::bind(any).map_err(|e| Error::Io(format!("route lookup: {e}")))?;
    s.connect(target)
        .map_err(|e| Error::Io(format!("no route to {target}: {e}")))?;
    Ok(s.local_addr()
        .map_err(|e| Error::Io(format!("route lookup: {e}")))?
        .ip())
}

/// What the heartbeat task and the training thread share.
#[derive(Default)]
struct Shared {
    step: AtomicU64,
    epoch: AtomicU64,
    cursor: AtomicU64,
    /// Why the job ended under us (set by the heartbeat task).
    abort: Mutex<Option<String>>,
    /// Shuts the ring down when the job ends under us, so a collective blocked on a
    /// stalled peer returns at once.
    breaker: Mutex<Option<crate::collective::RingBreaker>>,
    /// The training thread's latest figures, sent with the next heartbeat.
    report: Mutex<Option<crate::cluster::Report>>,
}

impl Shared {
    fn set_abort(&self, why: String) {
        if let Ok(mut a) = self.abort.lock()
            && a.is_none()
        {
            *a = Some(why);
            drop(a);
            if let Ok(b) = self.breaker.lock()
                && let Some(b) = b.as_ref()
            {
                b.break_ring();
            }
        }
    }
    fn aborted(&self) -> Option<String> {
        self.abort.lock().ok().and_then(|a| a.clone())
    }
}

/// [`Control`] through the coordinator's RPCs.
pub struct RemoteControl {
    client: Client,
    handle: Handle,
    generation: u64,
    rank: u32,
    shared: Arc<Shared>,
    rpc_seconds: f64,
}

impl RemoteControl {
    /// Run one RPC on the runtime from the training thread, timing it.
    fn call<T, F>(&mut self, f: impl FnOnce(Client) -> F) -> Result<T>
    where
        F: std::future::Future<Output = Result<T>>,
    {
        let t = Instant::now();
        let r = self.handle.block_on(f(self.client.clone()));
        self.rpc_seconds += t.elapsed().as_secs_f64();
        r
    }
}

fn le_bytes<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    v.iter().flat_map(|&x| f(x)).collect()
}

/// The chunks of one rank's tables: rows, columns, counts and (rank 0) the current cells.
fn table_chunks(
    tables: LossTables,
    cells: Vec<u32>,
    head: TableChunk,
) -> impl Iterator<Item = TableChunk> + Send + 'static {
    let per = |bytes: usize| (CHUNK_BYTES / bytes).max(1);
    let mut parts: Vec<(TableKind, usize, usize)> = Vec::new();
    for (kind, len, size) in [
        (TableKind::Rows, tables.lr.len(), 4),
        (TableKind::Cols, tables.lc.len(), 4),
        (TableKind::Counts, tables.counts.len(), 8),
        (TableKind::Cells, cells.len(), 4),
    ] {
        let n = per(size);
        let mut off = 0;
        while off < len {
            parts.push((kind, off, (off + n).min(len)));
            off += n;
        }
    }
    parts.into_iter().map(move |(kind, a, b)| {
        let data = match kind {
            TableKind::Rows => le_bytes(&tables.lr[a..b], f32::to_le_bytes),
            TableKind::Cols => le_bytes(&tables.lc[a..b], f32::to_le_bytes),
            TableKind::Counts => le_bytes(&tables.counts[a..b], u64::to_le_bytes),
            _ => le_bytes(&cells[a..b], u32::to_le_bytes),
        };
        TableChunk {
            kind: kind as i32,
            offset: a as u64,
            data,
            ..head.clone()
        }
    })
}

impl Control for RemoteControl {
    fn lease(&mut self, epoch: u64, streams: usize, cursor: u64) -> Result<Range<usize>> {
        let req = LeaseRequest {
            generation: self.generation,
            rank: self.rank,
            epoch,
            streams: streams as u64,
            cursor,
        };
        let r = self.call(|mut c| async move {
            c.lease(req)
                .await
                .map(|r| r.into_inner())
                .map_err(|s| status("lease", s))
        })?;
        Ok(r.stream_begin as usize..r.stream_end as usize)
    }

    fn epoch_done(&mut self, epoch: u64, tokens: u64) -> Result<()> {
        let req = EpochDoneRequest {
            generation: self.generation,
            rank: self.rank,
            epoch,
            tokens,
        };
        self.call(|mut c| async move {
            c.epoch_done(req)
                .await
                .map(|_| ())
                .map_err(|s| status("epoch barrier", s))
        })
    }

    fn allocate(
        &mut self,
        round: u64,
        tables: LossTables,
        current: &[u32],
        move_cost: f64,
    ) -> Result<Reallocation> {
        let head = TableChunk {
            generation: self.generation,
            rank: self.rank,
            round,
            vocab: tables.vocab as u64,
            rows: tables.rows as u64,
            cols: tables.cols as u64,
            move_cost,
            ..Default::default()
        };
        let vocab = tables.vocab;
        let cells = if self.rank == 0 {
            current.to_vec()
        } else {
            Vec::new()
        };
        let chunks = futures::stream::iter(table_chunks(tables, cells, head));
        self.call(|mut c| async move {
            c.push_loss_tables(chunks)
                .await
                .map(|_| ())
                .map_err(|s| status("sending loss tables", s))
        })?;
        let req = AllocationRequest {
            generation: self.generation,
            rank: self.rank,
            round,
        };
        let (report, cells, counts) = self.call(|mut c| async move {
            let mut s = c
                .fetch_allocation(req)
                .await
                .map_err(|s| status("fetching the allocation", s))?
                .into_inner();
            let mut report = None;
            let (mut cells, mut counts) = (vec![0u32; vocab], vec![0u64; vocab]);
            let (mut got_cells, mut got_counts) = (0usize, 0usize);
            while let Some(ch) = s.next().await {
                let ch = ch.map_err(|s| status("fetching the allocation", s))?;
                if !ch.report_json.is_empty() {
                    report = Some(ch.report_json);
                }
                let off = ch.offset as usize;
                let bad = || Error::Control(format!("allocation chunk at {off} out of range"));
                if ch.kind == TableKind::Cells as i32 {
                    let n = ch.data.len() / 4;
                    let dst = cells.get_mut(off..off + n).ok_or_else(bad)?;
                    for (d, b) in dst.iter_mut().zip(ch.data.chunks_exact(4)) {
                        *d = u32::from_le_bytes(b.try_into().expect("4 bytes"));
                    }
                    got_cells += n;
                } else if ch.kind == TableKind::Counts as i32 {
                    let n = ch.data.len() / 8;
                    let dst = counts.get_mut(off..off + n).ok_or_else(bad)?;
                    for (d, b) in dst.iter_mut().zip(ch.data.chunks_exact(8)) {
                        *d = u64::from_le_bytes(b.try_into().expect("8 bytes"));
                    }
                    got_counts += n;
                }
            }
            if got_cells != vocab || got_counts != vocab {
                return Err(Error::Control(format!(
                    "the allocation arrived incomplete ({got_cells} cells, {got_counts} counts of {vocab})"
                )));
            }
            Ok((report, cells, counts))
        })?;
        let report: Report = serde_json::from_str(report.as_deref().unwrap_or(""))
            .map_err(|e| Error::Control(format!("the allocation's report: {e}")))?;
        Ok(Reallocation {
            cells,
            counts,
            report,
        })
    }

    fn commit(
        &mut self,
        step: u64,
        dir: &Location,
        meta: Option<&Meta>,
        params_sha256: &str,
    ) -> Result<()> {
        let meta_json = match meta {
            Some(m) => serde_json::to_string(m).map_err(|e| Error::Data(e.to_string()))?,
            None => String::new(),
        };
        let req = CommitRequest {
            generation: self.generation,
            rank: self.rank,
            step,
            dir: dir.url().to_string(),
            meta_json,
            params_sha256: params_sha256.to_string(),
        };
        self.call(|mut c| async move {
            c.commit(req)
                .await
                .map(|_| ())
                .map_err(|s| status("checkpoint commit", s))
        })
    }

    fn progress(&self, step: u64, epoch: u64, cursor: u64) -> Result<()> {
        self.shared.step.store(step, Ordering::Relaxed);
        self.shared.epoch.store(epoch, Ordering::Relaxed);
        self.shared.cursor.store(cursor, Ordering::Relaxed);
        match self.shared.aborted() {
            Some(why) => Err(Error::Control(why)),
            None => Ok(()),
        }
    }

    fn finish(&mut self, summary: Option<&Summary>, params_sha256: &str) -> Result<()> {
        let summary_json = match summary {
            Some(s) => serde_json::to_string(s).map_err(|e| Error::Data(e.to_string()))?,
            None => String::new(),
        };
        let req = FinishRequest {
            generation: self.generation,
            rank: self.rank,
            summary_json,
            params_sha256: params_sha256.to_string(),
        };
        self.call(|mut c| async move {
            c.finish(req)
                .await
                .map(|_| ())
                .map_err(|s| status("finish", s))
        })
    }

    fn rpc_seconds(&self) -> f64 {
        self.rpc_seconds
    }

    fn report(&mut self, report: &crate::cluster::Report) {
        if let Ok(mut r) = self.shared.report.lock() {
            *r = Some(report.clone());
        }
    }
}

/// Heartbeats every `every` until the training ends (the task is aborted) or the
/// coordinator ends the job or stays unreachable for 3 intervals.
async fn heartbeat(
    mut client: Client,
    generation: u64,
    rank: u32,
    every: Duration,
    shared: Arc<Shared>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut last_ok = Instant::now();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let req = HeartbeatRequest {
            generation,
            rank,
            step: shared.step.load(Ordering::Relaxed),
            epoch: shared.epoch.load(Ordering::Relaxed),
            cursor: shared.cursor.load(Ordering::Relaxed),
            report: shared
                .report
                .lock()
                .ok()
                .and_then(|r| r.as_ref().map(Into::into)),
        };
        match tokio::time::timeout(every, client.heartbeat(req)).await {
            Ok(Ok(r)) => {
                last_ok = Instant::now();
                let r = r.into_inner();
                if r.stop {
                    stop.store(true, Ordering::Relaxed);
                }
                let abort = r.abort;
                if !abort.is_empty() {
                    shared.set_abort(format!("the job was ended: {abort}"));
                    return;
                }
            }
            Ok(Err(s)) if s.code() == tonic::Code::FailedPrecondition => {
                shared.set_abort(format!(
                    "the coordinator fenced this worker: {}",
                    s.message()
                ));
                return;
            }
            _ if last_ok.elapsed() > every * 3 => {
                shared.set_abort(format!(
                    "the coordinator has not answered heartbeats for {:.0} s",
                    last_ok.elapsed().as_secs_f64()
                ));
                return;
            }
            _ => {}
        }
    }
}

/// Join the job at `opts.coordinator`, train as the rank it assigns, and return the
/// run's summary (the same on every rank). Blocking; call it from a thread that may block.
pub fn run_worker(opts: &WorkerOptions, handle: &Handle) -> Result<Summary> {
    let mut client = handle.block_on(connect(
        &opts.coordinator,
        opts.connect_timeout,
        opts.token.as_deref(),
        opts.tls.as_ref(),
    ))?;
    let ip = route_to(&opts.coordinator)?;
    let mut rank = opts.rank;
    // A lost peer ends a generation; the coordinator re-forms the group (or gives up,
    // and then refuses the next join). Bounded in case it keeps re-forming.
    for attempt in 1..=100u32 {
        match generation(&mut client, opts, ip, &mut rank, handle) {
            Ok(s) => return Ok(s),
            Err((e, true)) if e.retryable() => {
                tracing::warn!(attempt, error = %e, "the group broke: joining again");
            }
            Err((e, _)) => return Err(e),
        }
    }
    Err(Error::Control(
        "the group re-formed 100 times without finishing".into(),
    ))
}

/// Join one generation of the job and train in it. The error says whether the worker
/// had joined (a broken generation, worth rejoining) or not (refused).
fn generation(
    client: &mut Client,
    opts: &WorkerOptions,
    ip: std::net::IpAddr,
    rank_hint: &mut Option<usize>,
    handle: &Handle,
) -> std::result::Result<Summary, (Error, bool)> {
    let refused = |e: Error| (e, false);
    // With an advertised name the address peers use may be another interface (or NAT):
    // listen on all of them.
    let bind_ip = match (&opts.advertise, ip) {
        (None, ip) => ip,
        (Some(_), std::net::IpAddr::V4(_)) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        (Some(_), std::net::IpAddr::V6(_)) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    };
    let listener = TcpRing::bind(SocketAddr::new(bind_ip, 0)).map_err(refused)?;
    let port = listener
        .local_addr()
        .map_err(|e| refused(Error::Io(format!("collective listener: {e}"))))?
        .port();
    let advertised = match &opts.advertise {
        Some(h) => format!("{h}:{port}"),
        None => SocketAddr::new(ip, port).to_string(),
    };
    let join = JoinRequest {
        rank: rank_hint.map_or(-1, |r| r as i64),
        collective_addr: advertised.clone(),
        host: std::env::var("HOSTNAME").unwrap_or_default(),
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let wait = opts.connect_timeout;
    let reply: JoinReply = handle
        .block_on(async {
            let deadline = Instant::now() + wait;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let r = tokio::time::timeout(left, client.join(join.clone()))
                    .await
                    .map_err(|_| {
                        Error::Control(format!("the group did not form within {wait:?} (join)"))
                    })?;
                match r {
                    Ok(r) => return Ok(r.into_inner()),
                    // A replacement can arrive before the coordinator has noticed the
                    // worker it replaces: the group re-forms within a few heartbeats.
                    Err(s)
                        if s.code() == tonic::Code::ResourceExhausted
                            && Instant::now() + Duration::from_millis(300) < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    Err(s) => {
                        let hint = match s.code() {
                            tonic::Code::Unknown
                            | tonic::Code::Internal
                            | tonic::Code::Unavailable
                            | tonic::Code::Cancelled => {
                                if opts.coordinator.starts_with("https://") {
                                    "; the TLS handshake may have been refused: check --tls-ca, and --tls-cert/--tls-key when the coordinator requires client certificates"
                                } else {
                                    "; if the coordinator serves TLS, use https:// and --tls-ca"
                                }
                            }
                            _ => "",
                        };
                        return Err(Error::Control(format!(
                            "join: {} ({:?}){hint}",
                            s.message(),
                            s.code()
                        )));
                    }
                }
            }
        })
        .map_err(refused)?;
    // A survivor keeps its rank in the next generation.
    *rank_hint = Some(reply.rank as usize);
    let (rank, world, generation) = (
        reply.rank as usize,
        reply.world_size as usize,
        reply.generation,
    );
    let span = tracing::info_span!("worker", rank, generation, run = %reply.run_id);
    let _g = span.enter();
    tracing::info!(world, collective = %advertised, restart = reply.restart, resume_from = %reply.checkpoint, "joined");
    let peers: Vec<SocketAddr> = reply
        .peers
        .iter()
        .map(|p| {
            p.to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| Error::Config(format!("peer address {p:?} does not resolve")))
        })
        .collect::<Result<_>>()
        .map_err(refused)?;
    let shared = Arc::new(Shared::default());
    let hb = handle.spawn(heartbeat(
        client.clone(),
        generation,
        reply.rank,
        Duration::from_millis(reply.heartbeat_ms.max(10)),
        shared.clone(),
        opts.stop.clone(),
    ));
    let result = (|| {
        let ring = TcpRing::connect(
            rank,
            &peers,
            listener,
            Duration::from_millis(reply.collective_timeout_ms.max(100)),
        )?;
        if let Ok(mut b) = shared.breaker.lock() {
            *b = Some(ring.breaker()?);
        }
        if shared.aborted().is_some() {
            // Ended while the ring was being built.
            if let Ok(b) = shared.breaker.lock()
                && let Some(b) = b.as_ref()
            {
                b.break_ring();
            }
        }
        let mut cfg = TrainConfig::from_toml(&reply.config_toml, "the coordinator's config")?;
        if let Some(t) = opts.threads {
            cfg.threads = t;
        }
        let run = RunOptions {
            data: Location::parse(&reply.data)?,
            out: Location::parse(&reply.out)?,
            // A re-formed group continues the run in place (from the checkpoint, or
            // from the start when none was committed).
            resume: reply.restart,
            checkpoint: if reply.checkpoint.is_empty() {
                None
            } else {
                Some(Location::parse(&reply.checkpoint)?)
            },
            backend: reply.backend.parse::<BackendKind>()?,
            progress: false,
            stop: Some(opts.stop.clone()),
            report: None,
        };
        let mut dist = Dist {
            collective: Box::new(ring),
            control: Box::new(RemoteControl {
                client: client.clone(),
                handle: handle.clone(),
                generation,
                rank: reply.rank,
                shared: shared.clone(),
                rpc_seconds: 0.0,
            }),
        };
        train_rank(&cfg, &run, handle, &mut dist)
    })();
    hb.abort();
    if let Err(e) = &result {
        // Prefer the coordinator's reason when the job was ended under us.
        let msg = match shared.aborted() {
            Some(why) if matches!(e, Error::Io(_)) => format!("{why} (then: {e})"),
            _ => e.to_string(),
        };
        tracing::error!(error = %msg, "training failed");
        let req = FailRequest {
            generation,
            rank: reply.rank,
            error: msg,
            retryable: e.retryable(),
        };
        let _ = handle.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), client.fail(req)).await
        });
    }
    result.map_err(|e| (e, true))
}
