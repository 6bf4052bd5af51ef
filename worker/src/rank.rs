//! A worker process of a distributed job: it reaches the coordinator over gRPC, joins
//! (rank, world size, config, the other ranks' collective addresses), forms the TCP ring
//! with its peers, heartbeats on a task of its own, and runs the training loop with the
//! coordinator as the job's owner ([`crate::dist::remote`]).
//!
//! Faults: any error of the training loop ends the generation for this worker; it tells
//! the coordinator why (`Fail`, best effort, saying whether retrying may help) and joins
//! the next generation when the coordinator re-forms the group, or exits non-zero.

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;

use lightrnn_kernels::BackendKind;
use lightrnn_proto::auth::{BearerToken, Client};
use lightrnn_proto::v1::{FailRequest, JoinReply};

use crate::dist::collective::Collective;
use crate::dist::control::Dist;
use crate::dist::remote::{RemoteControl, Shared, connect, heartbeat, join, route_to};
use crate::dist::ring::TcpRing;
use crate::dist::secure::RingSecret;
use crate::prepare::prepare_dataset;
use crate::train::{RunOptions, train_rank};
use lightrnn_core::data::store::Location;
use lightrnn_core::report::Summary;
use lightrnn_core::wire;
use lightrnn_core::{Error, Result};

/// How to reach the coordinator and present this worker.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// `http://HOST:PORT` of the coordinator.
    pub coordinator: String,
    /// The rank to take (torchrun's RANK), or any.
    pub rank: Option<usize>,
    /// Host name or address (HOST, or HOST:PORT for a forwarded port) the other ranks
    /// reach this worker's collective at (default: this machine's address on the route
    /// to the coordinator, and the port it listens on).
    pub advertise: Option<String>,
    /// The port the collective listens on (0: any free one).
    pub ring_port: u16,
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
    /// The CUDA device this worker trains on when the job's backend is CUDA (torchrun's
    /// LOCAL_RANK: one worker per GPU); the job's own ordinal otherwise.
    pub device: Option<usize>,
    /// Open the model with this instead of the job's backend (a library user's backend;
    /// the tests' CUDA backend on the emulated device).
    pub open: Option<crate::train::BackendFactory>,
}

/// The backend this worker opens for the job's `backend`: a CUDA job (or an `auto` one on
/// a machine where CUDA can run) on this worker's device.
pub fn worker_backend(job: BackendKind, device: Option<usize>) -> BackendKind {
    match (lightrnn_kernels::resolve(job), device) {
        (BackendKind::Cuda { .. }, Some(ordinal)) => BackendKind::Cuda { ordinal },
        (BackendKind::Cuda { ordinal }, None) => BackendKind::Cuda { ordinal },
        _ => job,
    }
}

/// Join the job at `opts.coordinator`, train as the rank it assigns, and return the
/// run's summary (the same on every rank). Blocking; call it from a thread that may block.
pub fn run_worker(opts: &WorkerOptions, handle: &Handle) -> Result<Summary> {
    let auth = BearerToken::new(opts.token.as_deref()).map_err(Error::Config)?;
    let mut client = handle.block_on(async {
        tokio::select! {
            c = connect(&opts.coordinator, opts.connect_timeout, &auth, opts.tls.as_ref()) => c,
            e = stopped_before_joining(&opts.stop) => Err(e),
        }
    })?;
    // A dataset still to be tokenised from text is prepared by the job's workers first.
    let parallel = opts
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    handle.block_on(async {
        tokio::select! {
            r = prepare_dataset(&client, &opts.coordinator, parallel, opts.connect_timeout, &opts.stop) => r,
            e = stopped_before_joining(&opts.stop) => Err(e),
        }
    })?;
    let ip = route_to(&opts.coordinator)?;
    let mut rank = opts.rank;
    // The run this worker has joined (its directory, id and the generation), once it has.
    let mut run: Option<RunSeen> = None;
    // A lost peer ends a generation; the coordinator re-forms the group (or gives up,
    // and then refuses the next join). Bounded in case it keeps re-forming.
    for attempt in 1..=100u32 {
        match generation(&mut client, &auth, opts, ip, (&mut rank, &mut run), handle) {
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

/// Resolves once the stop flag is set (a signal to a worker that has not joined yet: a
/// scheduler ending a job whose coordinator is gone must not wait out
/// --connect-timeout-s).
async fn stopped_before_joining(stop: &std::sync::atomic::AtomicBool) -> Error {
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Error::Control("stopped by a signal before joining the job: nothing to checkpoint".into())
}

/// Join one generation of the job and train in it. The error says whether the worker
/// had joined (a broken generation, worth rejoining) or not (refused).
fn generation(
    client: &mut Client,
    auth: &BearerToken,
    opts: &WorkerOptions,
    ip: std::net::IpAddr,
    (rank_hint, run): (&mut Option<usize>, &mut Option<RunSeen>),
    handle: &Handle,
) -> std::result::Result<Summary, (Error, bool)> {
    let refused = |e: Error| (e, false);
    let (listener, advertised) = listen(opts, ip).map_err(refused)?;
    let joined = handle.block_on(async {
        let wait = opts.connect_timeout;
        tokio::select! {
            r = join(client, &opts.coordinator, &advertised, *rank_hint, wait) => r.map(Ok),
            s = run_over(run.as_ref()) => Ok(Err(s)),
            // Asked to stop before it ever joined: nothing to checkpoint, nothing to wait for.
            e = stopped_before_joining(&opts.stop), if run.is_none() => Err(e),
        }
    });
    let reply = match joined.map_err(refused)? {
        Ok(reply) => reply,
        Err(summary) => {
            tracing::info!(
                steps = summary.steps,
                "the run finished without this worker (its coordinator has exited): nothing left to train"
            );
            return Ok(summary);
        }
    };
    *run = Some(RunSeen {
        out: Location::parse(&reply.out).map_err(refused)?,
        id: reply.run_id.clone(),
        generation: reply.generation,
    });
    // From now on every call names the run: a coordinator of another run refuses it,
    // and this worker never joins another run.
    auth.set_run(&reply.run_id)
        .map_err(|e| refused(Error::Control(format!("join: {e}"))))?;
    // A survivor keeps its rank in the next generation.
    *rank_hint = Some(reply.rank as usize);
    let (rank, generation) = (reply.rank as usize, reply.generation);
    let span = tracing::info_span!("worker", rank, generation, run = %reply.run_id);
    let _g = span.enter();
    tracing::info!(world = reply.world_size, collective = %advertised, restart = reply.restart, resume_from = %reply.checkpoint, "joined");
    let peers = resolve_peers(&reply.peers).map_err(refused)?;
    let shared = Arc::new(Shared::default());
    let hb = handle.spawn(heartbeat(
        client.clone(),
        generation,
        reply.rank,
        Duration::from_millis(reply.heartbeat_ms.max(10)),
        shared.clone(),
        opts.stop.clone(),
    ));
    let result = train_in_group(client, opts, &reply, &peers, listener, &shared, handle);
    hb.abort();
    let e = match result {
        Ok(s) => return Ok(s),
        // The cause first: when the job was ended under us, the ring error that followed
        // (the heartbeat task broke the ring) is only its consequence.
        Err(e) => match shared.aborted() {
            Some(why) if matches!(e, Error::Io(_)) => Error::Control(format!("{why} (then: {e})")),
            _ => e,
        },
    };
    tracing::error!(error = %e, "training failed");
    let req = FailRequest {
        generation,
        rank: reply.rank,
        error: e.to_string(),
        retryable: e.retryable(),
    };
    let _ = handle
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), client.fail(req)).await });
    Err((e, true))
}

/// The run a worker joined: its directory, its id, the last generation it joined.
struct RunSeen {
    out: Location,
    id: String,
    generation: u64,
}

/// Returns once the run this worker belongs to has finished: its summary, as the
/// coordinator wrote it at the end with the run's id and its last generation (one of
/// this worker's or later: an older summary of a run resumed to train further is not
/// its end). A worker left out of the last group (a replacement, a survivor too late for
/// it) then stops waiting for a coordinator that has exited. Never returns before it
/// has joined.
async fn run_over(run: Option<&RunSeen>) -> Summary {
    let Some(run) = run else {
        return std::future::pending().await;
    };
    loop {
        if let Ok(b) = run.out.get("summary.json").await
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b)
            && v["run_id"] == run.id.as_str()
            && v["generation"]
                .as_u64()
                .is_some_and(|g| g >= run.generation)
            && let Ok(s) = serde_json::from_value::<Summary>(v)
        {
            return s;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// The collective's listener and the address the other ranks reach it at.
fn listen(opts: &WorkerOptions, ip: std::net::IpAddr) -> Result<(TcpListener, String)> {
    // With an advertised name the address peers use may be another interface (or NAT):
    // listen on all of them.
    let bind_ip = match (&opts.advertise, ip) {
        (None, ip) => ip,
        (Some(_), std::net::IpAddr::V4(_)) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        (Some(_), std::net::IpAddr::V6(_)) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    };
    let listener = TcpRing::bind(SocketAddr::new(bind_ip, opts.ring_port))?;
    let port = listener
        .local_addr()
        .map_err(|e| Error::Io(format!("collective listener: {e}")))?
        .port();
    let advertised = match &opts.advertise {
        Some(h) => advertised(h, port),
        None => SocketAddr::new(ip, port).to_string(),
    };
    Ok((listener, advertised))
}

/// `--advertise HOST` or `HOST:PORT` as the address the other ranks dial (the port this
/// worker listens on unless one is given).
fn advertised(h: &str, port: u16) -> String {
    if let Ok(ip) = h.parse::<std::net::IpAddr>() {
        return SocketAddr::new(ip, port).to_string();
    }
    let named_port = h
        .rsplit_once(':')
        .is_some_and(|(host, p)| !host.is_empty() && p.parse::<u16>().is_ok());
    if named_port {
        h.to_string()
    } else {
        format!("{h}:{port}")
    }
}

fn resolve_peers(peers: &[String]) -> Result<Vec<SocketAddr>> {
    peers
        .iter()
        .map(|p| {
            p.to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| Error::Config(format!("peer address {p:?} does not resolve")))
        })
        .collect()
}

/// Form the ring with the generation's peers and run the training loop in it.
fn train_in_group(
    client: &Client,
    opts: &WorkerOptions,
    reply: &JoinReply,
    peers: &[SocketAddr],
    listener: TcpListener,
    shared: &Arc<Shared>,
    handle: &Handle,
) -> Result<Summary> {
    let secret = RingSecret::new(&reply.ring_key, &reply.run_id, reply.generation)?;
    let ring = TcpRing::connect(
        reply.rank as usize,
        peers,
        listener,
        Duration::from_millis(reply.collective_timeout_ms.max(100)),
        &secret,
    )?;
    shared.set_breaker(ring.breaker()?);
    let backend = worker_backend(reply.backend.parse::<BackendKind>()?, opts.device);
    let collective = group_collective(ring, reply, backend, opts.open.is_some(), shared)?;
    let mut cfg = wire::join_config(reply)?;
    if let Some(t) = opts.threads {
        cfg.threads = t;
    }
    let run = RunOptions {
        data: Location::parse(&reply.data)?,
        out: Location::parse(&reply.out)?,
        // A re-formed group continues the run in place (from the checkpoint, or from the
        // start when none was committed).
        resume: reply.restart,
        checkpoint: if reply.checkpoint.is_empty() {
            None
        } else {
            Some(Location::parse(&reply.checkpoint)?)
        },
        backend,
        progress: false,
        stop: Some(opts.stop.clone()),
        report: None,
        open: opts.open,
    };
    let mut dist = Dist {
        collective,
        control: Box::new(
            RemoteControl::new(
                client.clone(),
                handle.clone(),
                reply.generation,
                reply.rank,
                shared.clone(),
            )
            .naming(&opts.coordinator),
        ),
    };
    train_rank(&cfg, &run, handle, &mut dist)
}

/// The generation's collective: NCCL beside the ring for a GPU worker of a CUDA job (of
/// an `auto` job too where the coordinator sent an NCCL id), the ring alone for CPU
/// workers and for a worker that opens its own backend or the emulated device (the
/// tests': the ring stages its gradients through the host).
fn group_collective(
    ring: TcpRing,
    reply: &JoinReply,
    backend: BackendKind,
    own_backend: bool,
    shared: &Arc<Shared>,
) -> Result<Box<dyn Collective>> {
    let BackendKind::Cuda { ordinal } = lightrnn_kernels::resolve(backend) else {
        return Ok(Box::new(ring));
    };
    if own_backend || lightrnn_kernels::cuda::emulator_requested() {
        return Ok(Box::new(ring));
    }
    if reply.nccl_id.is_empty() {
        if reply.backend.parse::<BackendKind>().ok() == Some(BackendKind::Auto) {
            // `auto` asks for whatever runs: a GPU found by a worker of a coordinator
            // without NCCL still trains, its gradients staged through the host.
            tracing::warn!(
                gpu = ordinal,
                "no NCCL id from the coordinator: this GPU worker sums its gradients through the TCP ring (host staging)"
            );
            return Ok(Box::new(ring));
        }
        return Err(Error::Config(
            "the coordinator sent no NCCL id for this CUDA job: it creates one only where it loads libnccl.so and was built with CUDA (see its log)".into(),
        ));
    }
    nccl_collective(ring, reply, ordinal, shared)
}

#[cfg(feature = "cuda")]
fn nccl_collective(
    ring: TcpRing,
    reply: &JoinReply,
    ordinal: usize,
    shared: &Arc<Shared>,
) -> Result<Box<dyn Collective>> {
    Ok(Box::new(crate::dist::nccl::NcclRing::join(
        ring,
        &reply.nccl_id,
        ordinal,
        reply.generation,
        Duration::from_millis(reply.collective_timeout_ms.max(100)),
        shared.cancel_flag(),
    )?))
}

#[cfg(not(feature = "cuda"))]
fn nccl_collective(
    _: TcpRing,
    _: &JoinReply,
    _: usize,
    _: &Arc<Shared>,
) -> Result<Box<dyn Collective>> {
    Err(Error::Config(
        "a CUDA job's worker built without CUDA (rebuild with --features cuda)".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_advertised_host_takes_the_listening_port_unless_it_names_one() {
        assert_eq!(advertised("node-3", 4100), "node-3:4100");
        assert_eq!(advertised("node-3:29500", 4100), "node-3:29500");
        assert_eq!(advertised("10.0.0.7", 4100), "10.0.0.7:4100");
        assert_eq!(advertised("10.0.0.7:81", 4100), "10.0.0.7:81");
        assert_eq!(advertised("fd00::7", 4100), "[fd00::7]:4100");
        assert_eq!(advertised("[fd00::7]:81", 4100), "[fd00::7]:81");
    }

    fn ring_of_one() -> TcpRing {
        let l = TcpRing::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let secret = RingSecret::random("test", 1);
        TcpRing::connect(0, &[addr], l, Duration::from_secs(5), &secret).unwrap()
    }

    #[test]
    fn a_gpu_worker_without_an_nccl_id_refuses_a_cuda_job_and_stages_an_auto_one() {
        if lightrnn_kernels::cuda::emulator_requested() {
            return;
        }
        let shared = Arc::new(Shared::default());
        let gpu = BackendKind::Cuda { ordinal: 0 };
        let reply = |backend: &str| JoinReply {
            backend: backend.into(),
            world_size: 1,
            ..Default::default()
        };
        let e = group_collective(ring_of_one(), &reply("cuda"), gpu, false, &shared)
            .err()
            .expect("a CUDA job without an NCCL id is refused");
        assert!(
            !e.retryable() && e.to_string().contains("no NCCL id"),
            "{e}"
        );
        let c = group_collective(ring_of_one(), &reply("auto"), gpu, false, &shared).unwrap();
        assert_eq!((c.rank(), c.world()), (0, 1));
        // A worker with its own backend (the tests' emulated device) uses the ring.
        assert!(group_collective(ring_of_one(), &reply("cuda"), gpu, true, &shared).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_sees_its_run_finished_only_by_its_own_generation_or_a_later_one() {
        let out = Location::parse("memory://rank-tests/run").unwrap();
        let seen = RunSeen {
            out: out.clone(),
            id: "run-a".into(),
            generation: 3,
        };
        let summary = |run: &str, generation: u64| {
            let cfg = lightrnn_core::config::TrainConfig::default();
            let mut v = serde_json::to_value(Summary {
                train_loss: 1.0,
                train_ppl: 1.0,
                valid_loss: 1.0,
                valid_ppl: 1.0,
                test_loss: 1.0,
                test_ppl: 1.0,
                words_per_sec: 1.0,
                params: 1,
                seconds: 1.0,
                train_seconds: 1.0,
                steps: 42,
                epochs_completed: 1,
                stopped_by: lightrnn_core::report::StoppedBy::Epochs,
                vocab_size: 1,
                backend: "cpu".into(),
                world_size: 2,
                control_seconds: 0.0,
                config: cfg,
                history: vec![],
                auto_realloc: None,
                params_sha256: String::new(),
            })
            .unwrap();
            v["run_id"] = run.into();
            v["generation"] = generation.into();
            bytes::Bytes::from(serde_json::to_vec(&v).unwrap())
        };
        let wait = std::time::Duration::from_secs(10);
        // Nothing yet; another run's; an earlier generation's end (a run since resumed).
        assert!(
            tokio::time::timeout(wait, run_over(Some(&seen)))
                .await
                .is_err()
        );
        out.put("summary.json", summary("run-b", 5)).await.unwrap();
        assert!(
            tokio::time::timeout(wait, run_over(Some(&seen)))
                .await
                .is_err()
        );
        out.put("summary.json", summary("run-a", 2)).await.unwrap();
        assert!(
            tokio::time::timeout(wait, run_over(Some(&seen)))
                .await
                .is_err()
        );
        // Its run's end, by its generation or a later one.
        out.put("summary.json", summary("run-a", 4)).await.unwrap();
        let s = tokio::time::timeout(wait, run_over(Some(&seen)))
            .await
            .unwrap();
        assert_eq!(s.steps, 42);
        // A worker that never joined waits for its coordinator only.
        assert!(tokio::time::timeout(wait, run_over(None)).await.is_err());
    }

    #[test]
    fn a_worker_trains_a_cuda_job_on_its_own_device() {
        let cuda = |ordinal| BackendKind::Cuda { ordinal };
        assert_eq!(worker_backend(cuda(0), Some(3)), cuda(3));
        assert_eq!(worker_backend(cuda(2), None), cuda(2));
        assert_eq!(worker_backend(BackendKind::Cpu, Some(3)), BackendKind::Cpu);
        let auto = worker_backend(BackendKind::Auto, Some(1));
        if lightrnn_kernels::cuda::gpu_present() {
            assert_eq!(auto, cuda(1));
        } else {
            assert_eq!(auto, BackendKind::Auto);
        }
    }
}
