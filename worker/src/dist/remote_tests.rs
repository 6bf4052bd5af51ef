//! The worker's control channel in process, under paused tokio time: the real client of
//! [`super`] connected over an in-memory link to a fake coordinator whose every answer a
//! test scripts (late, refused, never), the link itself able to go silent or away. What
//! is shown: a lost coordinator ends the heartbeat after its deadline and not before, and
//! a pending call with it; a slow one is no failure, and join retries a full group as
//! designed; a generation that ends under the worker (fenced, ended, refused calls)
//! aborts it, breaks its ring and fails its next step.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::runtime::Handle;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::codegen::Service;
use tonic::transport::{Endpoint, Server, Uri};
use tonic::{Code, Request, Response, Status, Streaming};

use lightrnn_alloc::Report;
use lightrnn_core::report::{LinkDirection, LinkWaits, RankReport};
use lightrnn_core::{Error, wire};
use lightrnn_proto::auth::{BearerToken, Client};
use lightrnn_proto::v1::{
    AllocationChunk, AllocationRequest, CommitReply, CommitRequest, EpochDoneReply,
    EpochDoneRequest, FailReply, FailRequest, FinishReply, FinishRequest, HeartbeatReply,
    HeartbeatRequest, JoinReply, JoinRequest, LeaseReply, LeaseRequest, PushReply, SparseChunk,
    TableChunk,
};
use lightrnn_proto::{Coordinator, CoordinatorServer};

use super::{RemoteControl, Shared, blame, client, endpoint, froze, heartbeat, join_within};
use crate::dist::collective::Collective;
use crate::dist::control::Control;
use crate::dist::ring::{TcpRing, rings};
use crate::dist::watch::logs::Sink;

const SECOND: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);

// ---------------------------------------------------------------------------------------
// The fake coordinator.

/// What the fake coordinator does with one call.
#[derive(Clone, Debug)]
enum Act {
    /// Answers (the method's plain reply) after this long; zero: at once.
    After(Duration),
    /// Refuses after this long.
    Refuse(Duration, Code, &'static str),
    /// Never answers.
    Hang,
    /// A heartbeat's reply, at once.
    Reply(HeartbeatReply),
}

/// One call the fake coordinator received.
#[derive(Clone, Debug)]
struct Seen {
    method: &'static str,
    /// Since the coordinator started.
    at: Duration,
    generation: u64,
    token: Option<String>,
    heartbeat: Option<HeartbeatRequest>,
}

/// The acts of each method, in order (a method without any left answers at once), and
/// the calls received.
struct Script {
    t0: Instant,
    acts: Mutex<HashMap<&'static str, VecDeque<Act>>>,
    /// What a method does once its queue is empty (default: answer at once).
    then: Mutex<HashMap<&'static str, Act>>,
    seen: Mutex<Vec<Seen>>,
    arrived: Notify,
}

/// The allocation the fake solves (vocabulary of 4).
const CELLS: [u32; 4] = [3, 1, 0, 2];
const COUNTS: [u64; 4] = [40, 30, 20, 10];

impl Script {
    fn new() -> Self {
        Self {
            t0: Instant::now(),
            acts: Mutex::default(),
            then: Mutex::default(),
            seen: Mutex::default(),
            arrived: Notify::new(),
        }
    }

    /// `method` does `acts` with its next calls, then `then` with every later one.
    fn script(&self, method: &'static str, acts: impl IntoIterator<Item = Act>, then: Act) {
        self.acts
            .lock()
            .unwrap()
            .insert(method, acts.into_iter().collect());
        self.then.lock().unwrap().insert(method, then);
    }

    fn seen(&self, method: &str) -> Vec<Seen> {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .filter(|s| s.method == method)
            .cloned()
            .collect()
    }

    /// When the calls of `method` arrived (since the start).
    fn times(&self, method: &str) -> Vec<Duration> {
        self.seen(method).iter().map(|s| s.at).collect()
    }

    /// Until `n` calls of `method` have arrived.
    async fn arrived(&self, method: &str, n: usize) {
        loop {
            let wake = self.arrived.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            if self.seen(method).len() >= n {
                return;
            }
            wake.await;
        }
    }

    /// Records a call; its act.
    fn take<T>(
        &self,
        method: &'static str,
        req: &Request<T>,
        generation: u64,
        heartbeat: Option<HeartbeatRequest>,
    ) -> Act {
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        self.seen.lock().unwrap().push(Seen {
            method,
            at: self.t0.elapsed(),
            generation,
            token,
            heartbeat,
        });
        self.arrived.notify_waiters();
        let next = self
            .acts
            .lock()
            .unwrap()
            .get_mut(method)
            .and_then(VecDeque::pop_front);
        next.or_else(|| self.then.lock().unwrap().get(method).cloned())
            .unwrap_or(Act::After(Duration::ZERO))
    }
}

/// Does `act`: `Ok(Some(reply))` for a scripted heartbeat reply, `Ok(None)` for the plain
/// one.
async fn perform(act: Act) -> Result<Option<HeartbeatReply>, Status> {
    match act {
        Act::After(d) => {
            pause(d).await;
            Ok(None)
        }
        Act::Refuse(d, code, why) => {
            pause(d).await;
            Err(Status::new(code, why))
        }
        Act::Hang => std::future::pending().await,
        Act::Reply(r) => Ok(Some(r)),
    }
}

/// Sleeps `d`; no timer for none (an answer at once goes out before the clock moves).
async fn pause(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

struct Fake(Arc<Script>);

type ChunkStream = Pin<Box<dyn futures::Stream<Item = Result<AllocationChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for Fake {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        perform(self.0.take("join", &req, 0, None)).await?;
        Ok(Response::new(JoinReply {
            generation: 7,
            rank: 1,
            world_size: 2,
            heartbeat_ms: 1000,
            ..Default::default()
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let hb = req.get_ref().clone();
        let act = self.0.take("heartbeat", &req, hb.generation, Some(hb));
        Ok(Response::new(perform(act).await?.unwrap_or_default()))
    }

    async fn lease(&self, req: Request<LeaseRequest>) -> Result<Response<LeaseReply>, Status> {
        let r = *req.get_ref();
        perform(self.0.take("lease", &req, r.generation, None)).await?;
        Ok(Response::new(LeaseReply {
            epoch: r.epoch,
            stream_begin: 3,
            stream_end: 5,
        }))
    }

    async fn epoch_done(
        &self,
        req: Request<EpochDoneRequest>,
    ) -> Result<Response<EpochDoneReply>, Status> {
        let r = *req.get_ref();
        perform(self.0.take("epoch_done", &req, r.generation, None)).await?;
        Ok(Response::new(EpochDoneReply {
            tokens: 2 * r.tokens,
        }))
    }

    async fn push_loss_tables(
        &self,
        req: Request<Streaming<TableChunk>>,
    ) -> Result<Response<PushReply>, Status> {
        let act = self.0.take("push_loss_tables", &req, 0, None);
        let mut s = req.into_inner();
        while s.message().await?.is_some() {}
        perform(act).await?;
        Ok(Response::new(PushReply {}))
    }

    async fn push_sparse_tables(
        &self,
        req: Request<Streaming<SparseChunk>>,
    ) -> Result<Response<PushReply>, Status> {
        let act = self.0.take("push_sparse_tables", &req, 0, None);
        let mut s = req.into_inner();
        while s.message().await?.is_some() {}
        perform(act).await?;
        Ok(Response::new(PushReply {}))
    }

    type FetchAllocationStream = ChunkStream;

    async fn fetch_allocation(
        &self,
        req: Request<AllocationRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let generation = req.get_ref().generation;
        perform(self.0.take("fetch_allocation", &req, generation, None)).await?;
        let chunks = wire::allocation_chunks(&CELLS, &COUNTS, &Report::default());
        Ok(Response::new(Box::pin(futures::stream::iter(
            chunks.into_iter().map(Ok),
        ))))
    }

    async fn commit(&self, req: Request<CommitRequest>) -> Result<Response<CommitReply>, Status> {
        let generation = req.get_ref().generation;
        perform(self.0.take("commit", &req, generation, None)).await?;
        Ok(Response::new(CommitReply {}))
    }

    async fn finish(&self, req: Request<FinishRequest>) -> Result<Response<FinishReply>, Status> {
        let generation = req.get_ref().generation;
        perform(self.0.take("finish", &req, generation, None)).await?;
        Ok(Response::new(FinishReply {}))
    }

    async fn fail(&self, req: Request<FailRequest>) -> Result<Response<FailReply>, Status> {
        let generation = req.get_ref().generation;
        perform(self.0.take("fail", &req, generation, None)).await?;
        Ok(Response::new(FailReply {}))
    }

    /// No dataset to prepare: join.
    async fn prepare(
        &self,
        _: Request<lightrnn_proto::v1::PrepareRequest>,
    ) -> Result<Response<lightrnn_proto::v1::PrepareReply>, Status> {
        Ok(Response::new(lightrnn_proto::v1::PrepareReply {
            ready: true,
            ..Default::default()
        }))
    }
}

// ---------------------------------------------------------------------------------------
// The in-memory link between the worker and the fake coordinator.

/// The state of the link to the coordinator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Link {
    Up,
    /// Connections stay open but carry nothing, new ones too (a hung host, a cut cable).
    Silent,
    /// Connections are closed and new ones refused (the process is gone).
    Gone,
}

/// Carries `from`'s bytes to `to` while the link is up; holds them while it is silent;
/// closes both when it is gone.
async fn pump(
    mut from: tokio::io::ReadHalf<DuplexStream>,
    mut to: tokio::io::WriteHalf<DuplexStream>,
    mut link: watch::Receiver<Link>,
) {
    let mut buf = vec![0u8; 1 << 14];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = link.wait_for(|l| *l == Link::Gone) => break,
        };
        let up = link
            .wait_for(|l| *l != Link::Silent)
            .await
            .is_ok_and(|l| *l == Link::Up);
        if !up || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// tonic's connector: each connection is a duplex pair relayed through two pumps, its
/// far end handed to the fake's server.
#[derive(Clone)]
struct Connector {
    server: mpsc::UnboundedSender<DuplexStream>,
    link: watch::Sender<Link>,
}

impl Service<Uri> for Connector {
    type Response = TokioIo<DuplexStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let r = if *self.link.borrow() == Link::Gone {
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "the coordinator is gone",
            ))
        } else {
            let (worker, near) = tokio::io::duplex(1 << 16);
            let (far, server) = tokio::io::duplex(1 << 16);
            let (near_r, near_w) = tokio::io::split(near);
            let (far_r, far_w) = tokio::io::split(far);
            tokio::spawn(pump(near_r, far_w, self.link.subscribe()));
            tokio::spawn(pump(far_r, near_w, self.link.subscribe()));
            self.server
                .send(server)
                .map(|()| TokioIo::new(worker))
                .map_err(|_| std::io::Error::other("the fake coordinator stopped"))
        };
        Box::pin(async move { r })
    }
}

/// A fake coordinator served in process and a worker's client connected to it.
struct Coord {
    script: Arc<Script>,
    link: watch::Sender<Link>,
    client: Client,
}

impl Coord {
    async fn start() -> Self {
        let script = Arc::new(Script::new());
        let (tx, rx) = mpsc::unbounded_channel::<DuplexStream>();
        let incoming = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|io| (Ok::<_, std::io::Error>(io), rx))
        });
        tokio::spawn(
            Server::builder()
                .add_service(CoordinatorServer::new(Fake(script.clone())))
                .serve_with_incoming(incoming),
        );
        let (link, _) = watch::channel(Link::Up);
        let connector = Connector {
            server: tx,
            link: link.clone(),
        };
        // The worker's own connection settings (keep-alive, timeouts) and client.
        let ch = endpoint(Endpoint::from_static("http://coordinator.test"))
            .connect_with_connector(connector)
            .await
            .expect("connecting in memory");
        let client = client(ch, BearerToken::new(Some("s3cret")).unwrap());
        Self {
            script,
            link,
            client,
        }
    }

    fn set(&self, link: Link) {
        self.link.send_replace(link);
    }

    /// Since the coordinator started.
    fn now(&self) -> Duration {
        self.script.t0.elapsed()
    }

    fn control(&self, generation: u64, rank: u32, shared: &Arc<Shared>) -> RemoteControl {
        RemoteControl::new(
            self.client.clone(),
            Handle::current(),
            generation,
            rank,
            shared.clone(),
        )
    }

    /// The heartbeat task of rank 0 in `generation`, every `every`: its handle, what it
    /// shares with the training thread, the stop flag.
    fn heartbeat(
        &self,
        generation: u64,
        every: Duration,
    ) -> (JoinHandle<()>, Arc<Shared>, Arc<AtomicBool>) {
        let shared = Arc::new(Shared::default());
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(heartbeat(
            self.client.clone(),
            generation,
            0,
            every,
            shared.clone(),
            stop.clone(),
        ));
        (task, shared, stop)
    }
}

/// Runs a blocking call (the training thread's side of [`RemoteControl`]) on a thread of
/// its own; its result and when it ended on the runtime's clock.
fn on_thread<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> oneshot::Receiver<(T, Instant)> {
    let handle = Handle::current();
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let r = f();
        let _rt = handle.enter();
        let _ = tx.send((r, Instant::now()));
    });
    rx
}

/// A thread's result, the paused clock held still meanwhile (the runtime never idles, so
/// it never advances): for calls that end without a timer.
async fn settle<T>(mut rx: oneshot::Receiver<T>) -> T {
    let real = std::time::Instant::now();
    loop {
        match rx.try_recv() {
            Ok(v) => return v,
            Err(oneshot::error::TryRecvError::Empty) => {
                assert!(real.elapsed() < 20 * SECOND, "the call does not end");
                tokio::task::yield_now().await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

fn control_error(r: lightrnn_core::Result<impl std::fmt::Debug>) -> String {
    match r {
        Err(Error::Control(why)) => why,
        other => panic!("expected a control error, got {other:?}"),
    }
}

/// Two ranks of a TCP ring on the loopback (a collective's read deadline of a minute).
fn ring_pair() -> (TcpRing, TcpRing) {
    let mut rs = rings(2, 60 * SECOND)
        .into_iter()
        .map(|h| h.join().unwrap().unwrap());
    (rs.next().unwrap(), rs.next().unwrap())
}

/// Rank 1's all-reduce on its own thread (blocked until rank 0 takes part or its ring
/// breaks): the result and the real time it took.
fn blocked_collective(
    mut ring: TcpRing,
) -> oneshot::Receiver<(lightrnn_core::Result<()>, std::time::Duration)> {
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let t = std::time::Instant::now();
        let r = ring.all_reduce_sum(&mut [1.0; 1024]);
        let _ = tx.send((r, t.elapsed()));
    });
    rx
}

// ---------------------------------------------------------------------------------------
// (a) A lost coordinator.

#[tokio::test(start_paused = true)]
async fn a_silent_coordinator_ends_the_heartbeat_after_four_intervals_not_three() {
    let c = Coord::start().await;
    let (task, shared, stop) = c.heartbeat(1, SECOND);
    // Heartbeats at 0, 1, 2 s are answered; the link then carries nothing.
    tokio::time::sleep_until(c.script.t0 + 2500 * MS).await;
    c.set(Link::Silent);
    // The heartbeats of 3, 4 and 5 s time out one interval later each: at 6 s nothing was
    // answered for 4 intervals, more than the 3 allowed.
    tokio::time::sleep_until(c.script.t0 + 5999 * MS).await;
    assert!(shared.aborted().is_none(), "aborted before the deadline");
    assert!(!shared.cancel_flag().load(Ordering::Relaxed));
    task.await.unwrap();
    assert_eq!(c.now(), 6 * SECOND);
    assert_eq!(
        shared.aborted().as_deref(),
        Some("the coordinator has not answered heartbeats for 4 s")
    );
    assert!(shared.cancel_flag().load(Ordering::Relaxed));
    assert!(
        !stop.load(Ordering::Relaxed),
        "a lost coordinator is no stop"
    );
    // Only the answered heartbeats reached it.
    assert_eq!(c.script.times("heartbeat"), [0, 1, 2].map(|s| s * SECOND));
}

#[tokio::test(start_paused = true)]
async fn a_coordinator_gone_ends_a_pending_call_at_once_and_the_heartbeat_after_four_intervals() {
    let c = Coord::start().await;
    let shared = Arc::new(Shared::default());
    c.script.script("epoch_done", [], Act::Hang);
    let mut control = c.control(1, 0, &shared);
    // The epoch barrier waits on the coordinator (the other ranks, as it were).
    let call = on_thread(move || control.epoch_done(4, 1000));
    c.script.arrived("epoch_done", 1).await;
    let t0 = Instant::now();
    let (task, shared, _) = c.heartbeat(1, SECOND);
    // Heartbeats at 0, 1, 2 s are answered; then the coordinator's process is gone.
    tokio::time::sleep_until(t0 + 2500 * MS).await;
    c.set(Link::Gone);
    // The connection closes: the pending call ends at once with a control error.
    let (r, ended) = settle(call).await;
    assert_eq!(ended - t0, 2500 * MS, "the call outlived its connection");
    let why = control_error(r);
    assert!(why.starts_with("epoch barrier: "), "{why}");
    // The heartbeats of 3, 4 and 5 s fail at once (connection refused); the one of 6 s
    // finds the coordinator silent for 4 intervals (the last answer at 2 s).
    tokio::time::sleep_until(t0 + 5999 * MS).await;
    assert!(shared.aborted().is_none(), "aborted before the deadline");
    task.await.unwrap();
    assert_eq!(t0.elapsed(), 6 * SECOND);
    assert_eq!(
        shared.aborted().as_deref(),
        Some("the coordinator has not answered heartbeats for 4 s")
    );
    assert_eq!(c.script.seen("heartbeat").len(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_pending_call_on_a_silent_link_ends_with_the_http2_keep_alive() {
    let c = Coord::start().await;
    let shared = Arc::new(Shared::default());
    c.script.script("epoch_done", [], Act::Hang);
    let mut control = c.control(1, 0, &shared);
    let call = on_thread(move || control.epoch_done(4, 1000));
    c.script.arrived("epoch_done", 1).await;
    let cut = c.now();
    c.set(Link::Silent);
    // No answer, no ping answered: the connection's keep-alive (a ping after 30 s without
    // a frame, 20 s for its answer) ends the call; nothing else would.
    let (r, ended) = call.await.unwrap();
    let took = ended - c.script.t0 - cut;
    let why = control_error(r);
    assert!(why.starts_with("epoch barrier: "), "{why}");
    assert!(
        took >= 50 * SECOND && took <= 51 * SECOND,
        "ended {took:?} after the link went silent: {why}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_pending_call_on_a_silent_link_ends_when_the_heartbeats_give_up() {
    let c = Coord::start().await;
    c.script.script("epoch_done", [], Act::Hang);
    let (task, shared, _) = c.heartbeat(1, SECOND);
    let mut control = c.control(1, 0, &shared);
    let call = on_thread(move || control.epoch_done(4, 1000));
    c.script.arrived("epoch_done", 1).await;
    let cut = c.now();
    c.set(Link::Silent);
    // The heartbeats find the coordinator silent for 4 intervals; the pending barrier
    // ends with that reason then, not at the keep-alive's 50 s.
    task.await.unwrap();
    let (r, ended) = settle(call).await;
    let took = ended - c.script.t0 - cut;
    assert!(
        took <= 5 * SECOND,
        "ended {took:?} after the link went silent"
    );
    assert_eq!(
        control_error(r),
        "the coordinator has not answered heartbeats for 4 s"
    );
}

// ---------------------------------------------------------------------------------------
// (b) A slow coordinator.

#[tokio::test(start_paused = true)]
async fn late_heartbeat_answers_within_the_interval_are_no_failure() {
    let c = Coord::start().await;
    c.script.script("heartbeat", [], Act::After(SECOND - MS));
    let (task, shared, _) = c.heartbeat(1, SECOND);
    tokio::time::sleep(60 * SECOND + 500 * MS).await;
    assert!(shared.aborted().is_none(), "{:?}", shared.aborted());
    assert!(!task.is_finished());
    // One heartbeat per interval, each answered before the next.
    assert_eq!(
        c.script.times("heartbeat"),
        (0..=60).map(|s| s * SECOND).collect::<Vec<_>>()
    );
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn two_lost_heartbeats_are_tolerated_three_are_not() {
    let c = Coord::start().await;
    let ok = || Act::After(Duration::ZERO);
    // Answered at 0, 1, 2 s; lost at 3, 4; answered at 5; lost from 6 s on.
    c.script.script(
        "heartbeat",
        [ok(), ok(), ok(), Act::Hang, Act::Hang, ok()],
        Act::Hang,
    );
    let (task, shared, _) = c.heartbeat(1, SECOND);
    tokio::time::sleep_until(c.script.t0 + 8999 * MS).await;
    assert!(shared.aborted().is_none(), "{:?}", shared.aborted());
    task.await.unwrap();
    assert_eq!(c.now(), 9 * SECOND);
    assert_eq!(
        shared.aborted().as_deref(),
        Some("the coordinator has not answered heartbeats for 4 s")
    );
    assert_eq!(
        c.script.times("heartbeat"),
        (0..9).map(|s| s * SECOND).collect::<Vec<_>>()
    );
}

#[tokio::test(start_paused = true)]
async fn heartbeat_refusals_other_than_fencing_count_as_silence() {
    let c = Coord::start().await;
    c.script.script(
        "heartbeat",
        [Act::After(Duration::ZERO)],
        Act::Refuse(Duration::ZERO, Code::Unavailable, "overloaded"),
    );
    let (task, shared, _) = c.heartbeat(1, SECOND);
    tokio::time::sleep_until(c.script.t0 + 3999 * MS).await;
    assert!(shared.aborted().is_none(), "{:?}", shared.aborted());
    task.await.unwrap();
    assert_eq!(c.now(), 4 * SECOND);
    assert_eq!(
        shared.aborted().as_deref(),
        Some("the coordinator has not answered heartbeats for 4 s")
    );
    assert_eq!(c.script.seen("heartbeat").len(), 5);
}

#[tokio::test(start_paused = true)]
async fn calls_wait_for_a_slow_coordinator_without_a_deadline_of_their_own() {
    let c = Coord::start().await;
    let (task, shared, _) = c.heartbeat(3, SECOND);
    c.script.script("lease", [], Act::After(600 * SECOND));
    c.script
        .script("fetch_allocation", [], Act::After(900 * SECOND));
    let mut control = c.control(3, 0, &shared).naming("http://10.0.0.1:50051");
    // The heartbeat task (this thread) warns; the training thread says when a call ended.
    let sink = Sink::default();
    let _here = sink.attach();
    let there = sink.clone();
    let calls = on_thread(move || {
        let _there = there.attach();
        let lease = control.lease(2, 8, 17);
        // Rank 0's last sparse push carries the current allocation; the solve is slow.
        let alloc = control.allocate_sparse(1, &[0, 1, 2, 3], 0.5);
        (lease, alloc)
    });
    let ((lease, alloc), _) = calls.await.unwrap();
    let log = sink.text();
    // The two slow calls were each warned about once, at the first heartbeat past their
    // stall threshold (the floor: they had no history), and said when they ended; the
    // quick push was not.
    let who = "the coordinator at http://10.0.0.1:50051";
    let seconds = |what: &str| -> Vec<f64> {
        log.split(what)
            .skip(1)
            .filter_map(|rest| rest.split(' ').next()?.parse().ok())
            .collect()
    };
    assert_eq!(
        log.lines().filter(|l| l.contains("WARN")).count(),
        2,
        "{log}"
    );
    // Paused time jumps to the next heartbeat whenever the runtime is idle, also while
    // the calling thread (a real one) waits to be scheduled: on a busy machine a call's
    // end is seen a few heartbeats late, so the figures get that much slack.
    const SLACK: f64 = 4.0;
    for call in ["lease", "fetching the allocation"] {
        let warned = seconds(&format!("{call}: {who} has not answered for "));
        assert!(
            warned.len() == 1 && (2.0..=3.1 + SLACK).contains(&warned[0]),
            "{log}"
        );
    }
    let answered = seconds(&format!("lease: {who} answered after "));
    assert!(
        answered.len() == 1 && (600.0..=601.0 + SLACK).contains(&answered[0]),
        "{log}"
    );
    assert!(!log.contains("sending sparse loss tables"), "{log}");
    assert_eq!(lease.unwrap(), 3..5);
    let alloc = alloc.unwrap();
    assert_eq!(
        (alloc.cells, alloc.counts),
        (CELLS.to_vec(), COUNTS.to_vec())
    );
    // One try each, no retry; the heartbeats went on meanwhile and no one gave up.
    for m in ["lease", "push_sparse_tables", "fetch_allocation"] {
        assert_eq!(c.script.seen(m).len(), 1, "{m}");
    }
    let fetched = c.script.seen("fetch_allocation")[0].at;
    assert!(c.now() >= fetched + 900 * SECOND);
    assert!(c.script.seen("heartbeat").len() >= 1500);
    assert!(shared.aborted().is_none(), "{:?}", shared.aborted());
    assert!(!task.is_finished());
    task.abort();
}

/// A join request as [`super::join`] sends it.
fn join_req() -> JoinRequest {
    JoinRequest {
        rank: -1,
        collective_addr: "10.0.0.2:7000".into(),
        host: "test".into(),
        pid: 42,
        version: env!("CARGO_PKG_VERSION").into(),
    }
}

#[tokio::test(start_paused = true)]
async fn join_retries_a_full_group_every_300_ms_until_its_deadline() {
    let c = Coord::start().await;
    let full = || Act::Refuse(Duration::ZERO, Code::ResourceExhausted, "the group is full");
    c.script
        .script("join", [full(), full(), full()], Act::After(Duration::ZERO));
    let mut client = c.client.clone();
    let reply = join_within(&mut client, "http://c", join_req(), 10 * SECOND)
        .await
        .unwrap();
    assert_eq!((reply.generation, reply.rank), (7, 1));
    assert_eq!(c.script.times("join"), [0, 300, 600, 900].map(|ms| ms * MS));

    // Always full: the last try is the one with no 300 ms left before the deadline.
    let c = Coord::start().await;
    c.script.script("join", [], full());
    let mut client = c.client.clone();
    let why = control_error(join_within(&mut client, "http://c", join_req(), SECOND).await);
    assert_eq!(why, "join: the group is full (ResourceExhausted)");
    assert_eq!(c.now(), 900 * MS);
    assert_eq!(c.script.times("join"), [0, 300, 600, 900].map(|ms| ms * MS));
}

#[tokio::test(start_paused = true)]
async fn join_waits_for_a_slow_group_up_to_its_deadline_and_no_longer() {
    let c = Coord::start().await;
    c.script.script("join", [Act::After(9999 * MS)], Act::Hang);
    let mut client = c.client.clone();
    let reply = join_within(&mut client, "http://c", join_req(), 10 * SECOND).await;
    assert_eq!(reply.unwrap().generation, 7);
    assert_eq!(c.now(), 9999 * MS);

    let t = c.now();
    let why = control_error(join_within(&mut client, "http://c", join_req(), 10 * SECOND).await);
    assert_eq!(why, "the group did not form within 10s (join)");
    assert_eq!(c.now() - t, 10 * SECOND);
    assert_eq!(
        c.script.seen("join").len(),
        2,
        "no retry after the deadline"
    );
}

#[tokio::test(start_paused = true)]
async fn join_refusals_other_than_a_full_group_end_at_once_with_what_to_check() {
    let c = Coord::start().await;
    let refuse = |code, why| Act::Refuse(Duration::ZERO, code, why);
    c.script.script(
        "join",
        [
            refuse(Code::Unavailable, "no route"),
            refuse(Code::Unavailable, "no route"),
            refuse(Code::Unauthenticated, "no token"),
            refuse(Code::FailedPrecondition, "version 0.0.1 is not 0.1.0"),
        ],
        Act::After(Duration::ZERO),
    );
    let mut client = c.client.clone();
    for (url, want) in [
        (
            "http://c",
            "join: no route (Unavailable); if the coordinator serves TLS, use https:// and --tls-ca",
        ),
        (
            "https://c",
            "join: no route (Unavailable); the TLS handshake may have been refused: check --tls-ca, and --tls-cert/--tls-key when the coordinator requires client certificates",
        ),
        ("http://c", "join: no token (Unauthenticated)"),
        (
            "http://c",
            "join: version 0.0.1 is not 0.1.0 (FailedPrecondition)",
        ),
    ] {
        let r = join_within(&mut client, url, join_req(), 10 * SECOND).await;
        assert_eq!(control_error(r), want);
    }
    assert_eq!(c.now(), Duration::ZERO, "a refusal is not retried");
    assert_eq!(c.script.seen("join").len(), 4);
}

// ---------------------------------------------------------------------------------------
// (c) A generation that ends under the worker.

#[tokio::test(start_paused = true)]
async fn a_fenced_worker_aborts_at_once_breaks_its_ring_and_fails_its_next_step() {
    let c = Coord::start().await;
    // A new generation formed at 2 s: the coordinator fences generation 1.
    c.script.script(
        "heartbeat",
        [Act::After(Duration::ZERO), Act::After(Duration::ZERO)],
        Act::Refuse(
            Duration::ZERO,
            Code::FailedPrecondition,
            "generation 1 is over",
        ),
    );
    let (ring0, ring1) = ring_pair();
    let (task, shared, stop) = c.heartbeat(1, SECOND);
    shared.set_breaker(ring0.breaker().unwrap());
    // Rank 1 waits on rank 0 (which never joins the collective).
    let collective = blocked_collective(ring1);
    let control = c.control(1, 0, &shared);
    assert!(control.progress(10, 0, 5).is_ok());
    task.await.unwrap();
    assert_eq!(c.now(), 2 * SECOND, "not at once");
    let why = "the coordinator ended this worker's generation 1: generation 1 is over";
    assert_eq!(shared.aborted().as_deref(), Some(why));
    assert!(shared.cancel_flag().load(Ordering::Relaxed));
    assert!(!stop.load(Ordering::Relaxed));
    // The training thread's next step fails with the reason.
    assert_eq!(control_error(control.progress(11, 0, 6)), why);
    // The broken ring ends the blocked collective long before its one-minute deadline.
    let (r, took) = collective.await.unwrap();
    assert!(r.is_err());
    assert!(took < 30 * SECOND, "{took:?}");
    // No heartbeat after the fence.
    tokio::time::sleep(10 * SECOND).await;
    assert_eq!(c.script.seen("heartbeat").len(), 3);
    drop(ring0);
}

#[tokio::test(start_paused = true)]
async fn a_job_ended_by_the_coordinator_aborts_the_worker_at_once() {
    let c = Coord::start().await;
    let ended = HeartbeatReply {
        abort: "rank 1 was lost".into(),
        stop: false,
    };
    c.script.script(
        "heartbeat",
        [Act::After(Duration::ZERO), Act::Reply(ended)],
        Act::After(Duration::ZERO),
    );
    let (task, shared, _) = c.heartbeat(1, SECOND);
    task.await.unwrap();
    assert_eq!(c.now(), SECOND);
    assert_eq!(
        shared.aborted().as_deref(),
        Some("the job was ended: rank 1 was lost")
    );
    assert!(shared.cancel_flag().load(Ordering::Relaxed));
    // A ring built after the end breaks as soon as its breaker is installed.
    let (ring0, ring1) = ring_pair();
    let collective = blocked_collective(ring1);
    shared.set_breaker(ring0.breaker().unwrap());
    let (r, took) = collective.await.unwrap();
    assert!(r.is_err());
    assert!(took < 30 * SECOND, "{took:?}");
    assert_eq!(c.script.seen("heartbeat").len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_stop_request_sets_the_stop_flag_and_heartbeats_go_on() {
    let c = Coord::start().await;
    let stop_now = HeartbeatReply {
        abort: String::new(),
        stop: true,
    };
    c.script.script(
        "heartbeat",
        [Act::After(Duration::ZERO), Act::Reply(stop_now)],
        Act::After(Duration::ZERO),
    );
    let (task, shared, stop) = c.heartbeat(1, SECOND);
    tokio::time::sleep(500 * MS).await;
    assert!(!stop.load(Ordering::Relaxed));
    tokio::time::sleep(SECOND).await;
    assert!(stop.load(Ordering::Relaxed));
    tokio::time::sleep(5 * SECOND).await;
    assert!(shared.aborted().is_none());
    assert!(!task.is_finished());
    assert_eq!(c.script.seen("heartbeat").len(), 7);
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn calls_of_an_ended_generation_fail_with_the_refusal_and_are_not_retried() {
    let c = Coord::start().await;
    let over = |after| Act::Refuse(after, Code::FailedPrecondition, "generation 7 is over");
    c.script.script("lease", [], over(Duration::ZERO));
    // The barrier pending when the group re-forms is answered with the refusal (well
    // before the heartbeat of 8 s finds the generation fenced: paused time may jump a
    // few heartbeats while the calling thread waits to be scheduled).
    c.script.script("epoch_done", [], over(2500 * MS));
    c.script.script(
        "heartbeat",
        [0; 8].map(|_| Act::After(Duration::ZERO)),
        over(Duration::ZERO),
    );
    let (task, shared, _) = c.heartbeat(7, SECOND);
    let mut control = c.control(7, 0, &shared);
    let ((lease, mut control), _) =
        settle(on_thread(move || (control.lease(3, 8, 0), control))).await;
    assert_eq!(
        control_error(lease),
        "lease: generation 7 is over (FailedPrecondition)"
    );
    // A refused call fails the training step; ending the generation is the heartbeat's.
    assert!(shared.aborted().is_none());
    let barrier = on_thread(move || control.epoch_done(3, 100));
    // The clock held until the barrier is at the coordinator (at 0 s).
    let real = std::time::Instant::now();
    while c.script.seen("epoch_done").is_empty() {
        assert!(real.elapsed() < 20 * SECOND, "the barrier never arrives");
        tokio::task::yield_now().await;
    }
    let (barrier, _) = barrier.await.unwrap();
    assert_eq!(
        control_error(barrier),
        "epoch barrier: generation 7 is over (FailedPrecondition)"
    );
    task.await.unwrap();
    assert_eq!(
        shared.aborted().as_deref(),
        Some("the coordinator ended this worker's generation 7: generation 7 is over")
    );
    // One try each; every call named the worker's generation and presented its token.
    assert_eq!(c.script.seen("lease").len(), 1);
    assert_eq!(c.script.seen("epoch_done").len(), 1);
    let seen = c.script.seen.lock().unwrap().clone();
    for s in &seen {
        assert_eq!(s.generation, 7, "{s:?}");
        assert_eq!(s.token.as_deref(), Some("Bearer s3cret"), "{s:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn heartbeats_carry_the_ranks_progress_and_latest_report() {
    let c = Coord::start().await;
    let (task, shared, _) = c.heartbeat(5, SECOND);
    let mut control = c.control(5, 0, &shared);
    c.script.arrived("heartbeat", 1).await;
    control.progress(120, 2, 33).unwrap();
    let report = RankReport {
        step: 120,
        epoch: 2,
        loss: 4.5,
        words_per_sec: 1000.0,
        waits: vec![
            LinkWaits {
                peer: 1,
                direction: LinkDirection::Send,
                seconds: 0.5,
                count: 3,
                stalls: 0,
                buckets: [0, 1, 2, 0, 0, 0, 0],
            },
            LinkWaits {
                peer: 2,
                direction: LinkDirection::Receive,
                seconds: 75.0,
                count: 2,
                stalls: 1,
                buckets: [0, 0, 0, 0, 1, 0, 1],
            },
        ],
        ..Default::default()
    };
    control.report(&report);
    c.script.arrived("heartbeat", 2).await;
    let hb: Vec<HeartbeatRequest> = c
        .script
        .seen("heartbeat")
        .into_iter()
        .map(|s| s.heartbeat.unwrap())
        .collect();
    let at = |h: &HeartbeatRequest| (h.generation, h.rank, h.step, h.epoch, h.cursor);
    assert_eq!(at(&hb[0]), (5, 0, 0, 0, 0));
    assert!(hb[0].report.is_none());
    assert_eq!(at(&hb[1]), (5, 0, 120, 2, 33));
    assert_eq!(RankReport::from(hb[1].report.clone().unwrap()), report);
    assert_eq!(c.script.times("heartbeat"), [Duration::ZERO, SECOND]);
    task.abort();
}

// ---------------------------------------------------------------------------------------
// (e) Messages that name the right party.

#[test]
fn a_worker_that_did_not_run_says_so_instead_of_blaming_the_coordinator() {
    // Ticks every 2 s: a late tick from a busy runtime is no freeze, 41 s is.
    assert!(!froze(2500 * MS, 2 * SECOND));
    assert!(!froze(6 * SECOND, 2 * SECOND));
    assert!(froze(41 * SECOND, 2 * SECOND));
    // Fast heartbeats still need 2 s of silence.
    assert!(!froze(1500 * MS, 100 * MS));
    assert!(froze(2100 * MS, 100 * MS));
    let why =
        "the coordinator ended this worker's generation 3: generation 3 has ended".to_string();
    assert_eq!(blame(None, why.clone()), why);
    assert_eq!(
        blame(Some(41 * SECOND), why),
        "this worker was frozen for 41 s (its clock jumped) and meanwhile the coordinator ended this worker's generation 3: generation 3 has ended"
    );
}

#[tokio::test(start_paused = true)]
async fn join_waits_for_a_coordinator_that_is_down_and_says_nothing_listens() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let auth = BearerToken::new(None).unwrap();
    let mut client = client(
        endpoint(Endpoint::from_shared(url.clone()).unwrap()).connect_lazy(),
        auth,
    );
    let t0 = Instant::now();
    let e = control_error(join_within(&mut client, &url, join_req(), 20 * SECOND).await);
    // It kept trying (with back-off) until its deadline, and says why it failed.
    assert!(t0.elapsed() >= 15 * SECOND, "{:?}", t0.elapsed());
    assert!(
        e.contains(&format!(
            "nothing listens at {url} (connection refused): the coordinator is not running"
        )) && e.contains("unreachable for"),
        "{e}"
    );
    assert!(!e.contains("TLS"), "{e}");
}
