//! Launching a distributed job from this process: the job's spec from a run's arguments,
//! the metrics endpoint beside it, and for `lightrnn train --workers N` the coordinator
//! here with N worker processes of this same program on loopback, replaced when they die.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::runtime::Handle;

use lightrnn_core::config::TrainConfig;
use lightrnn_core::data::store::Location;
use lightrnn_core::report::StoppedBy;
use lightrnn_kernels::BackendKind;

use crate::error::{IoContext, usage};
use crate::job::JobSpec;
use crate::job::spec::PrepareBy;
use crate::serve::{External, JobOutcome, bind, run_job};
use crate::signals;
use crate::{Result, Stop};

/// What a run's command line asks for, resolved: the job is prepared from it.
pub struct RunSpec<'a> {
    pub cfg: TrainConfig,
    pub data: &'a str,
    pub out: &'a str,
    pub resume: bool,
    pub backend: &'a str,
    /// Who tokenises text `--data`.
    pub prepare_by: PrepareBy,
}

/// Prepare the job (dataset, checkpoint to resume from) for `world` = (MIN, MAX) workers.
pub fn job_spec(run: RunSpec<'_>, world: (usize, usize), handle: &Handle) -> Result<JobSpec> {
    // A backend that does not parse fails here, not in every worker. Whether it can run
    // is the workers' machines' question (a coordinator of GPU workers needs no GPU);
    // `train --workers` asks it of this machine before it starts any (`worker_count`).
    let kind: BackendKind = run.backend.parse()?;
    let (data, out) = (Location::parse(run.data)?, Location::parse(run.out)?);
    let mut spec = handle.block_on(JobSpec::prepare(
        run.cfg,
        (&data, run.prepare_by),
        &out,
        run.resume,
        world,
    ))?;
    spec.backend = run.backend.to_string();
    spec.nccl_ids = crate::job::spec::nccl_ids(kind);
    Ok(spec)
}

/// How many workers `train --workers N` starts for `backend`: N, or for a CUDA job with
/// N = 0 one per visible GPU; a CUDA job gets one GPU per worker or is refused here.
pub fn worker_count(workers: usize, backend: &str) -> Result<usize> {
    let kind: BackendKind = backend.parse()?;
    if !matches!(lightrnn_kernels::resolve(kind), BackendKind::Cuda { .. }) {
        if workers == 0 {
            return usage(
                "--workers 0 starts one worker per GPU: it needs --backend cuda (or auto) on a machine with GPUs",
            );
        }
        return Ok(workers);
    }
    lightrnn_kernels::check_backend(kind)?;
    let gpus = if lightrnn_kernels::cuda::emulator_requested() {
        // Every worker opens its own emulated device.
        workers.max(1)
    } else {
        lightrnn_kernels::cuda::device::cuda_devices()?.len()
    };
    match workers {
        0 => Ok(gpus),
        n if n > gpus => usage(format!(
            "{n} workers of a CUDA job need a GPU each; this machine has {gpus} (lightrnn devices lists them)"
        )),
        n => Ok(n),
    }
}

/// The one JSON line of a distributed run: its summary's figures and the job's, and
/// `stop_signal` when a signal stopped it.
pub fn summary_line(o: &JobOutcome, out: &str) -> String {
    let mut j = o.summary.line(out);
    if let Some(a) = j.as_object_mut() {
        a.extend(o.job_figures());
        // Which signal stopped the job: a script requeues after SLURM's warning only.
        if let (StoppedBy::Signal, Some(sig)) = (o.summary.stopped_by, signals::stop_signal()) {
            a.insert("stop_signal".into(), sig.into());
        }
    }
    j.to_string()
}

/// A fresh random token for a job on loopback.
fn random_token() -> Result<String> {
    Ok(crate::job::record::random_hex(24)?)
}

/// The metrics endpoint's listener, when asked for.
pub fn metrics_listener(
    addr: Option<&str>,
    handle: &Handle,
) -> Result<Option<tokio::net::TcpListener>> {
    match addr {
        Some(m) => Ok(Some(handle.block_on(crate::metrics::bind(m))?)),
        None => Ok(None),
    }
}

/// `watch` with the metrics endpoint served beside it while the job runs.
pub fn with_metrics(listener: Option<tokio::net::TcpListener>, watch: External) -> External {
    Box::new(move |job| {
        Box::pin(async move {
            let metrics = {
                let job = job.clone();
                async move {
                    match listener {
                        Some(l) => crate::metrics::serve(l, Arc::new(move || job.snapshot())).await,
                        None => std::future::pending().await,
                    }
                }
            };
            // Ends when the job does (run_job aborts its watcher).
            let ((), ()) = tokio::join!(metrics, watch(job));
        })
    })
}

/// Kills the worker processes it holds when dropped (the job failed, or this process is
/// unwinding), so no worker outlives its job.
struct Children(Arc<Mutex<Vec<Child>>>);

impl Drop for Children {
    fn drop(&mut self) {
        if let Ok(mut cs) = self.0.lock() {
            for c in cs.iter_mut() {
                if let Ok(None) = c.try_wait() {
                    let _ = c.kill();
                }
                let _ = c.wait();
            }
        }
    }
}

/// A replacement worker that dies before joining this many times in a row is not started
/// again: it fails for a reason that does not go away (its log says which).
const EARLY_EXITS: u32 = 3;

/// `lightrnn train --workers N`: the coordinator here, N worker processes on loopback.
pub fn train_workers(
    mut spec: JobSpec,
    workers: usize,
    metrics_addr: Option<&str>,
    handle: &Handle,
    stop: &Stop,
) -> Result<JobOutcome> {
    if workers == 0 {
        return usage("--workers must be at least 1");
    }
    // Only this process and its workers know the job's token.
    let job_token = random_token()?;
    spec.token = Some(job_token.clone());
    let threads = if spec.cfg.threads > 0 {
        spec.cfg.threads
    } else {
        (std::thread::available_parallelism().map_or(2, |n| n.get()) / workers).max(1)
    };
    let incoming = handle.block_on(async { bind("127.0.0.1:0".parse().expect("literal")) })?;
    let addr = incoming
        .local_addr()
        .doing(|| "the coordinator's address".into())?;
    let url = format!("http://{addr}");
    let exe = std::env::current_exe().doing(|| "locating this program to start workers".into())?;
    // One GPU per worker: worker k trains on device k.
    let per_gpu = matches!(
        lightrnn_kernels::resolve(spec.backend.parse()?),
        BackendKind::Cuda { .. }
    );
    let spawn = move |rank: usize| -> std::io::Result<Child> {
        let mut cmd = Command::new(&exe);
        cmd.args(["worker", "--coordinator", &url, "--rank"])
            .arg(rank.to_string())
            .args(["--threads", &threads.to_string()]);
        if per_gpu {
            cmd.args(["--device", &rank.to_string()]);
        }
        cmd.env_remove("RANK")
            .env_remove("LOCAL_RANK")
            .env("LIGHTRNN_TOKEN", &job_token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
    };
    let children = Children(Arc::new(Mutex::new(Vec::new())));
    for rank in 0..workers {
        let child = spawn(rank).doing(|| format!("starting worker {rank}"))?;
        children.0.lock().expect("fresh lock").push(child);
    }
    tracing::info!(workers, coordinator = %addr, threads_per_worker = threads, "workers started");
    let watch = watch_children(children.0.clone(), Arc::new(spawn), stop.clone());
    let metrics = metrics_listener(metrics_addr, handle)?;
    let outcome = handle.block_on(run_job(spec, incoming, with_metrics(metrics, watch)))?;
    // The workers exit once their Finish is answered.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let all_done = children
            .0
            .lock()
            .map(|mut cs| cs.iter_mut().all(|c| matches!(c.try_wait(), Ok(Some(_)))))
            .unwrap_or(true);
        if all_done || std::time::Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(children);
    Ok(outcome)
}

type Spawn = Arc<dyn Fn(usize) -> std::io::Result<Child> + Send + Sync>;

/// The launcher's watch over its workers: a worker process that exits before its job is
/// done is a lost worker, and the group re-forms with a replacement process for its rank
/// (up to the job's restart limit); a worker that stopped answering without exiting is
/// killed first; a stop request reaches the job.
fn watch_children(cs: Arc<Mutex<Vec<Child>>>, spawn: Spawn, stop: Stop) -> External {
    Box::new(move |job| {
        Box::pin(async move {
            let mut early = vec![0u32; cs.lock().map_or(0, |c| c.len())];
            // Stalled workers this launcher killed: their exits are not early deaths.
            let mut killed = std::collections::HashSet::new();
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if job.failed() {
                    return;
                }
                if stop.load(Ordering::Relaxed) {
                    job.request_stop();
                }
                let Ok(mut cs) = cs.lock() else {
                    job.fault("worker bookkeeping failed".into());
                    return;
                };
                // A worker that stopped answering but did not exit (stalled, stopped,
                // stuck in the kernel) is killed; the loop below then replaces it.
                for pid in job.take_stalled() {
                    if let Some(c) = cs.iter_mut().find(|c| c.id() == pid) {
                        tracing::warn!(pid, "killing a stalled worker");
                        let _ = c.kill();
                        killed.insert(pid);
                    }
                }
                for (rank, c) in cs.iter_mut().enumerate() {
                    let Ok(Some(status)) = c.try_wait() else {
                        continue;
                    };
                    if status.success() {
                        continue;
                    }
                    let why = format!("worker process {rank} exited: {status}");
                    if job.process_exited(c.id(), why.clone()) || killed.remove(&c.id()) {
                        early[rank] = 0;
                    } else {
                        early[rank] += 1;
                        if early[rank] >= EARLY_EXITS {
                            job.fault(format!(
                                "{why}, {EARLY_EXITS} times in a row before joining the job (its log above says why)"
                            ));
                            return;
                        }
                    }
                    if job.failed() {
                        return;
                    }
                    match spawn(rank) {
                        Ok(n) => {
                            tracing::warn!(rank, pid = n.id(), "replacement worker started");
                            *c = n;
                        }
                        Err(e) => {
                            job.fault(format!("cannot start a replacement for worker {rank}: {e}"));
                            return;
                        }
                    }
                }
            }
        })
    })
}
