//! The control channel of a worker to its coordinator over gRPC: connecting (TLS, bearer
//! token), joining a generation, the [`Control`] whose every call is an RPC, and the
//! heartbeat task that runs beside the training thread.
//!
//! Faults: a refused or failed RPC, a heartbeat that cannot get through for
//! `3 x heartbeat` or that the coordinator answers with `abort` all end the training loop
//! with an error (the heartbeat task breaks the ring so a blocked collective returns at
//! once). Nothing waits forever. A call that takes far longer than that call usually does
//! (max(2 s, 5 x the median of its recent durations): [`Usual`]) is logged while it lasts
//! (the heartbeat task looks at it every interval), naming the coordinator, the call and
//! the wait.

use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::runtime::Handle;
use tonic::transport::Endpoint;

use lightrnn_alloc::{Reallocation, SparsePart};
use lightrnn_kernels::LossTables;
use lightrnn_proto::auth::{BearerToken, Client};
use lightrnn_proto::v1::{
    AllocationRequest, CommitRequest, EpochDoneRequest, FinishRequest, HeartbeatRequest, JoinReply,
    JoinRequest, LeaseRequest, SparseChunk, TableChunk,
};
use lightrnn_proto::{CoordinatorClient, MAX_MESSAGE_BYTES};

use super::control::Control;
use super::ring::RingBreaker;
use super::watch::{Usual, secs};
use lightrnn_core::checkpoint::Meta;
use lightrnn_core::data::store::Location;
use lightrnn_core::report::{RankReport, Summary};
use lightrnn_core::wire;
use lightrnn_core::{Error, Result};

fn status(what: &str, s: tonic::Status) -> Error {
    Error::Control(format!("{what}: {} ({:?})", s.message(), s.code()))
}

/// A client of the coordinator at `url` presenting `auth` (its clones share the run it
/// names once the worker has joined); keeps trying to connect for `timeout`.
pub async fn connect(
    url: &str,
    timeout: Duration,
    auth: &BearerToken,
    tls: Option<&tonic::transport::ClientTlsConfig>,
) -> Result<Client> {
    let auth = auth.clone();
    let mut ep = endpoint(
        Endpoint::from_shared(url.to_string())
            .map_err(|e| Error::Config(format!("coordinator address {url:?}: {e}")))?,
    );
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
            Ok(ch) => return Ok(client(ch, auth)),
            Err(e) if Instant::now() >= deadline => {
                return Err(Error::Control(format!(
                    "cannot reach the coordinator at {url} within {timeout:?}: {e}{}",
                    Reach::of(&e).hint(url)
                )));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The settings of every connection to the coordinator (its own function so that the
/// tests connect the same client to an in-memory coordinator).
pub(crate) fn endpoint(ep: Endpoint) -> Endpoint {
    ep.connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
}

/// The coordinator's client over a connected channel: the token, the message limits.
pub(crate) fn client(ch: tonic::transport::Channel, auth: BearerToken) -> Client {
    CoordinatorClient::with_interceptor(ch, auth)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// The address this machine uses to reach `url`'s host (no packet is sent).
pub fn route_to(url: &str) -> Result<std::net::IpAddr> {
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
pub struct Shared {
    step: AtomicU64,
    epoch: AtomicU64,
    cursor: AtomicU64,
    /// Why the job ended under us (set by the heartbeat task).
    abort: Mutex<Option<String>>,
    /// Shuts the ring down when the job ends under us, so a collective blocked on a
    /// stalled peer returns at once.
    breaker: Mutex<Option<RingBreaker>>,
    /// Set with the abort: a pending NCCL call of this generation aborts its communicator.
    cancel: Arc<std::sync::atomic::AtomicBool>,
    /// The training thread's latest figures, sent with the next heartbeat.
    report: Mutex<Option<RankReport>>,
    /// Wakes a pending call when the job ends under us.
    ended: tokio::sync::Notify,
    /// The training thread's control call in flight.
    call: Mutex<Option<Pending>>,
}

impl Shared {
    /// Install the ring's breaker; a job ended while the ring was being built breaks it
    /// at once.
    pub fn set_breaker(&self, b: RingBreaker) {
        if let Ok(mut slot) = self.breaker.lock() {
            if self.aborted().is_some() {
                b.break_ring();
            }
            *slot = Some(b);
        }
    }

    fn set_abort(&self, why: String) {
        if let Ok(mut a) = self.abort.lock()
            && a.is_none()
        {
            *a = Some(why);
            drop(a);
            self.cancel.store(true, Ordering::Relaxed);
            self.ended.notify_waiters();
            if let Ok(b) = self.breaker.lock()
                && let Some(b) = b.as_ref()
            {
                b.break_ring();
            }
        }
    }
    /// The flag the generation's NCCL communicator polls (set when the job ends under
    /// this worker).
    pub fn cancel_flag(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.cancel.clone()
    }

    /// Why the job was ended under this worker, if it was.
    pub fn aborted(&self) -> Option<String> {
        self.abort.lock().ok().and_then(|a| a.clone())
    }

    /// Returns once the job has ended under this worker, with why.
    async fn ended(&self) -> String {
        loop {
            let woken = self.ended.notified();
            tokio::pin!(woken);
            // Registered before the check, so an abort in between is not missed.
            woken.as_mut().enable();
            if let Some(why) = self.aborted() {
                return why;
            }
            woken.await;
        }
    }

    /// The heartbeat task's look at the training thread's call in flight: one past its
    /// threshold is warned about, once, while it lasts.
    fn look_at_call(&self) {
        let Ok(mut c) = self.call.lock() else {
            return;
        };
        let Some(p) = c.as_mut().filter(|p| !p.warned) else {
            return;
        };
        let waited = p.since.elapsed();
        if waited <= p.threshold {
            return;
        }
        p.warned = true;
        let (op, who) = (p.op, &p.coordinator);
        tracing::warn!(
            coordinator = %who, call = op, waited_s = waited.as_secs_f64(),
            "{op}: {who} has not answered for {} s (usually {} s)",
            secs(waited), secs(p.usual)
        );
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
    /// Who the calls go to, as the logs name it.
    coordinator: String,
    /// How long each call usually takes (its stall threshold).
    usual: Usual,
}

impl RemoteControl {
    /// The control of rank `rank` in `generation`, sharing `shared` with its heartbeat.
    pub fn new(
        client: Client,
        handle: Handle,
        generation: u64,
        rank: u32,
        shared: Arc<Shared>,
    ) -> Self {
        Self {
            client,
            handle,
            generation,
            rank,
            shared,
            rpc_seconds: 0.0,
            coordinator: "the coordinator".into(),
            usual: Usual::default(),
        }
    }

    /// The coordinator's address, for the logs.
    pub fn naming(mut self, coordinator: &str) -> Self {
        self.coordinator = format!("the coordinator at {coordinator}");
        self
    }

    /// Run the RPC `op` on the runtime from the training thread, timing it. The
    /// heartbeat task watches it meanwhile (no timer of its own: [`Shared::look_at_call`]);
    /// one that was warned about says when it ended. A call pending when the heartbeats
    /// find the job ended (a coordinator gone silent, a generation fenced) ends then,
    /// with that reason, instead of waiting for the connection's keep-alive.
    fn call<T, F>(&mut self, op: &'static str, f: impl FnOnce(Client) -> F) -> Result<T>
    where
        F: std::future::Future<Output = Result<T>>,
    {
        let t = Instant::now();
        let pending = Pending {
            op,
            since: tokio::time::Instant::now(),
            threshold: self.usual.threshold(op),
            usual: self.usual.median(op),
            coordinator: self.coordinator.clone(),
            warned: false,
        };
        let (rpc, shared) = (f(self.client.clone()), &self.shared);
        let (r, took) = self.handle.block_on(async move {
            // Tokio's clock (the wall clock outside tests, paused time in them), read as
            // the call starts and ends.
            let since = tokio::time::Instant::now();
            if let Ok(mut c) = shared.call.lock() {
                *c = Some(Pending { since, ..pending });
            }
            let r = tokio::select! {
                r = rpc => r,
                why = shared.ended() => Err(Error::Control(why)),
            };
            (r, since.elapsed())
        });
        let pending = self.shared.call.lock().ok().and_then(|mut c| c.take());
        if pending.is_some_and(|p| p.warned) {
            let who = &self.coordinator;
            tracing::info!(coordinator = %who, call = op, waited_s = took.as_secs_f64(),
                "{op}: {who} answered after {} s", secs(took));
        }
        self.usual.record(op, took);
        self.rpc_seconds += t.elapsed().as_secs_f64();
        r
    }
}

/// The training thread's control call in flight, watched by the heartbeat task.
struct Pending {
    op: &'static str,
    since: tokio::time::Instant,
    /// Past this it is a stall: max(2 s, 5 x the median of the call's recent durations).
    threshold: Duration,
    usual: Duration,
    coordinator: String,
    warned: bool,
}

impl RemoteControl {
    /// One push of sparse tables (a part, or the rank's last push), in chunks; returns
    /// once the coordinator has taken it whole, so a rank is never more than one part
    /// ahead of the coordinator.
    fn push_sparse_chunks(
        &mut self,
        round: u64,
        vocab: usize,
        move_cost: f64,
        part: Option<SparsePart>,
        cells: Vec<u32>,
        last: bool,
    ) -> Result<()> {
        let (rows, cols) = part
            .as_ref()
            .map_or((0, 0), |p| (p.tables.rows, p.tables.cols));
        let head = SparseChunk {
            generation: self.generation,
            rank: self.rank,
            round,
            vocab: vocab as u64,
            rows: rows as u64,
            cols: cols as u64,
            move_cost,
            last,
            ..Default::default()
        };
        let chunks = futures::stream::iter(wire::sparse_chunks(part, cells, head));
        self.call("sending sparse loss tables", |mut c| async move {
            c.push_sparse_tables(chunks)
                .await
                .map(|_| ())
                .map_err(|s| status("sending sparse loss tables", s))
        })
    }

    /// The allocation of `round`, once solved (waits for the solve).
    fn fetch_allocation(&mut self, round: u64, vocab: usize) -> Result<Reallocation> {
        let req = AllocationRequest {
            generation: self.generation,
            rank: self.rank,
            round,
        };
        let (cells, counts, report) = self.call("fetching the allocation", |mut c| async move {
            let mut s = c
                .fetch_allocation(req)
                .await
                .map_err(|s| status("fetching the allocation", s))?
                .into_inner();
            let mut got = wire::AllocationAssembly::new(vocab);
            while let Some(ch) = s.next().await {
                got.add(ch.map_err(|s| status("fetching the allocation", s))?)?;
            }
            got.finish()
        })?;
        Ok(Reallocation {
            cells,
            counts,
            report,
        })
    }
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
        let r = self.call("lease", |mut c| async move {
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
        self.call("epoch barrier", |mut c| async move {
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
        let chunks = futures::stream::iter(wire::table_chunks(tables, cells, head));
        self.call("sending loss tables", |mut c| async move {
            c.push_loss_tables(chunks)
                .await
                .map(|_| ())
                .map_err(|s| status("sending loss tables", s))
        })?;
        self.fetch_allocation(round, vocab)
    }

    fn push_sparse(&mut self, round: u64, part: SparsePart) -> Result<()> {
        let vocab = part.vocab;
        self.push_sparse_chunks(round, vocab, part.move_cost, Some(part), Vec::new(), false)
    }

    fn allocate_sparse(
        &mut self,
        round: u64,
        current: &[u32],
        move_cost: f64,
    ) -> Result<Reallocation> {
        let cells = if self.rank == 0 {
            current.to_vec()
        } else {
            Vec::new()
        };
        self.push_sparse_chunks(round, current.len(), move_cost, None, cells, true)?;
        self.fetch_allocation(round, current.len())
    }

    fn commit(
        &mut self,
        step: u64,
        dir: &Location,
        meta: Option<&Meta>,
        params_sha256: &str,
    ) -> Result<()> {
        let req = CommitRequest {
            generation: self.generation,
            rank: self.rank,
            step,
            dir: dir.url().to_string(),
            manifest: meta.map(Into::into),
            params_sha256: params_sha256.to_string(),
        };
        self.call("checkpoint commit", |mut c| async move {
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
        let req = FinishRequest {
            generation: self.generation,
            rank: self.rank,
            summary: summary.map(Into::into),
            params_sha256: params_sha256.to_string(),
        };
        self.call("finish", |mut c| async move {
            c.finish(req)
                .await
                .map(|_| ())
                .map_err(|s| status("finish", s))
        })
    }

    fn rpc_seconds(&self) -> f64 {
        self.rpc_seconds
    }

    fn report(&mut self, report: &RankReport) {
        if let Ok(mut r) = self.shared.report.lock() {
            *r = Some(report.clone());
        }
    }
}

/// Heartbeats every `every` until the training ends (the task is aborted) or the
/// coordinator ends the job or stays unreachable for 3 intervals. A tick that comes far
/// too late means this process did not run (SIGSTOP, swapping, a paused VM): it is
/// logged, the silence is not blamed on the coordinator, and a generation ended
/// meanwhile says so.
pub async fn heartbeat(
    mut client: Client,
    generation: u64,
    rank: u32,
    every: Duration,
    shared: Arc<Shared>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    // Tokio's clock (the wall clock outside tests), so the tests run it in paused time.
    let mut last_ok = tokio::time::Instant::now();
    let mut last_tick = last_ok;
    // How long this process was frozen, until the next heartbeat gets through.
    let mut frozen: Option<Duration> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = tokio::time::Instant::now();
        let gap = now - last_tick;
        last_tick = now;
        if froze(gap, every) {
            tracing::warn!(
                seconds = format!("{:.1}", gap.as_secs_f64()),
                "this worker did not run for {:.1} s (frozen or descheduled: SIGSTOP, swapping, a paused VM?)",
                gap.as_secs_f64()
            );
            frozen = Some(gap);
            // The coordinator was not the silent one: its allowance starts again.
            last_ok = now;
        }
        shared.look_at_call();
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
                last_ok = tokio::time::Instant::now();
                let r = r.into_inner();
                if r.stop {
                    stop.store(true, Ordering::Relaxed);
                }
                let abort = r.abort;
                if !abort.is_empty() {
                    shared.set_abort(blame(frozen, format!("the job was ended: {abort}")));
                    return;
                }
                frozen = None;
            }
            Ok(Err(s)) if s.code() == tonic::Code::FailedPrecondition => {
                shared.set_abort(blame(
                    frozen,
                    format!(
                        "the coordinator ended this worker's generation {generation}: {}",
                        s.message()
                    ),
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

/// Whether a gap of `gap` between heartbeat ticks every `every` means this process did
/// not run (the runtime alone delays a tick by far less).
pub(crate) fn froze(gap: Duration, every: Duration) -> bool {
    gap > (every * 3).max(Duration::from_secs(2))
}

/// Why the generation ended for this worker, saying first that it was itself frozen for
/// `frozen` when it was.
pub(crate) fn blame(frozen: Option<Duration>, why: String) -> String {
    match frozen {
        Some(g) => format!(
            "this worker was frozen for {:.0} s (its clock jumped) and meanwhile {why}",
            g.as_secs_f64()
        ),
        None => why,
    }
}

/// Join the job's current generation with this worker's collective address `advertised`
/// (as rank `rank` when given); waits up to `wait` for the group to form. A refusal says
/// what to check (TLS, token, version).
pub async fn join(
    client: &mut Client,
    coordinator: &str,
    advertised: &str,
    rank: Option<usize>,
    wait: Duration,
) -> Result<JoinReply> {
    let join = JoinRequest {
        rank: rank.map_or(-1, |r| r as i64),
        collective_addr: advertised.to_string(),
        host: std::env::var("HOSTNAME").unwrap_or_default(),
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    join_within(client, coordinator, join, wait).await
}

/// Why a call did not reach the coordinator, read from the transport's error chain.
#[derive(Debug, PartialEq)]
pub(crate) enum Reach {
    /// Connection refused: no process listens at the address (the coordinator is not
    /// running, or not yet).
    NothingListens,
    /// No answer at all (a timeout, an unreachable host or network): packets are lost.
    NoAnswer(String),
    /// The TLS handshake failed.
    Tls(String),
    /// Something else, or a refusal the coordinator sent itself.
    Other,
}

impl Reach {
    pub(crate) fn of(e: &(dyn std::error::Error + 'static)) -> Self {
        use std::io::ErrorKind as K;
        let mut cur = Some(e);
        let mut text = String::new();
        while let Some(x) = cur {
            if let Some(io) = x.downcast_ref::<std::io::Error>() {
                match io.kind() {
                    K::ConnectionRefused => return Self::NothingListens,
                    K::TimedOut | K::HostUnreachable | K::NetworkUnreachable => {
                        return Self::NoAnswer(io.to_string());
                    }
                    _ => {}
                }
            }
            text.push_str(&format!("{x:?} "));
            cur = x.source();
        }
        let lower = text.to_lowercase();
        if ["certificate", "tls", "handshake", "alert"]
            .iter()
            .any(|k| lower.contains(k))
        {
            return Self::Tls(e.source().map_or_else(|| e.to_string(), |s| s.to_string()));
        }
        if lower.contains("timeoutexpired") || lower.contains("timed out") {
            return Self::NoAnswer("timed out".into());
        }
        Self::Other
    }

    /// Whether the coordinator may come back (a restarted one): worth waiting for.
    pub(crate) fn unreachable(&self) -> bool {
        matches!(self, Self::NothingListens | Self::NoAnswer(_))
    }

    /// What to check, for an error message about the coordinator at `url`.
    pub(crate) fn hint(&self, url: &str) -> String {
        match self {
            Self::NothingListens => format!(
                "; nothing listens at {url} (connection refused): the coordinator is not running"
            ),
            Self::NoAnswer(why) => format!(
                "; no answer from {url} ({why}): the network or a firewall drops the packets"
            ),
            Self::Tls(why) => format!(
                "; the TLS handshake failed ({why}): check --tls-ca, and --tls-cert/--tls-key when the coordinator requires client certificates"
            ),
            Self::Other if url.starts_with("https://") => "; the TLS handshake may have been refused: check --tls-ca, and --tls-cert/--tls-key when the coordinator requires client certificates".into(),
            Self::Other => "; if the coordinator serves TLS, use https:// and --tls-ca".into(),
        }
    }
}

/// [`join`]'s retries and deadline, on tokio's clock (the tests run it in paused time):
/// a full group is asked again every 300 ms; an unreachable coordinator (down, being
/// restarted, behind a partition) with back-off up to 5 s; both until `wait`.
async fn join_within(
    client: &mut Client,
    coordinator: &str,
    join: JoinRequest,
    wait: Duration,
) -> Result<JoinReply> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut backoff = Duration::from_millis(250);
    let mut unreachable_since: Option<tokio::time::Instant> = None;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let r = tokio::time::timeout(left, client.join(join.clone()))
            .await
            .map_err(|_| {
                Error::Control(format!("the group did not form within {wait:?} (join)"))
            })?;
        let s = match r {
            Ok(r) => {
                if let Some(t) = unreachable_since {
                    tracing::info!(
                        coordinator,
                        after_s = format!("{:.1}", t.elapsed().as_secs_f64()),
                        "the coordinator answers again"
                    );
                }
                return Ok(r.into_inner());
            }
            Err(s) => s,
        };
        let now = tokio::time::Instant::now();
        // A replacement can arrive before the coordinator has noticed the worker it
        // replaces: the group re-forms within a few heartbeats.
        if s.code() == tonic::Code::ResourceExhausted && now + Duration::from_millis(300) < deadline
        {
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        }
        let reach = Reach::of(&s);
        if reach.unreachable() && now + backoff < deadline {
            if unreachable_since.is_none() {
                unreachable_since = Some(now);
                tracing::warn!(
                    coordinator,
                    wait_s = wait.as_secs(),
                    "cannot reach the coordinator{}: retrying until it answers (--connect-timeout-s)",
                    reach.hint(coordinator)
                );
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            continue;
        }
        let waited = unreachable_since.map_or(String::new(), |t| {
            format!(" (unreachable for {:.0} s)", t.elapsed().as_secs_f64())
        });
        return Err(Error::Control(format!(
            "join: {} ({:?}){waited}{}",
            s.message(),
            s.code(),
            if matches!(
                s.code(),
                tonic::Code::Unknown
                    | tonic::Code::Internal
                    | tonic::Code::Unavailable
                    | tonic::Code::Cancelled
            ) {
                reach.hint(coordinator)
            } else {
                String::new()
            }
        )));
    }
}

#[cfg(test)]
#[path = "remote_tests.rs"]
mod tests;
