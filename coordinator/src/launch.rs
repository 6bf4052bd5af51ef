//! Launching a distributed job: `lightrnn coordinator` (the control plane on its own),
//! `lightrnn worker` (one rank, on any host that reaches the coordinator), and
//! `lightrnn train --workers N`, which runs the coordinator in this process and N worker
//! processes of this same program on loopback.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use tokio::runtime::Handle;

use lightrnn_worker::data::store::Location;
use lightrnn_worker::rank::{WorkerOptions, run_worker};
use lightrnn_worker::report::Summary;

use std::sync::atomic::Ordering;

use crate::cli::{RunArgs, Stop, resolve_config};
use crate::server::{External, JobSpec, bind, run_job};

#[derive(Args, Debug, Clone)]
pub struct CoordinatorArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// gRPC address to serve on.
    #[arg(long, default_value = "0.0.0.0:29400")]
    pub listen: String,
    /// Workers in the job (torchrun's WORLD_SIZE): N, or MIN:MAX for an elastic job
    /// that forms with MIN to MAX workers, re-forms with the survivors after a loss and
    /// grows at a checkpoint when more workers ask to join.
    #[arg(long, env = "WORLD_SIZE", value_parser = parse_world)]
    pub world_size: (usize, usize),
    /// An elastic job's group forms once at least MIN workers have joined and none has
    /// joined for this many seconds (MAX workers form it at once).
    #[arg(long, default_value_t = 10)]
    pub form_wait_s: u64,
    /// Heartbeat interval of the workers, in milliseconds; a worker silent for 5 of them
    /// is lost.
    #[arg(long, default_value_t = 2000)]
    pub heartbeat_ms: u64,
    /// Deadline of every collective read and write on the workers, in seconds.
    #[arg(long, default_value_t = 120)]
    pub collective_timeout_s: u64,
    /// How long the group may take to form, in seconds.
    #[arg(long, default_value_t = 600)]
    pub join_timeout_s: u64,
    /// Times the group may re-form after lost workers before the job fails.
    #[arg(long, default_value_t = 3)]
    pub max_restarts: u64,
    /// File holding the bearer token workers must present (or LIGHTRNN_TOKEN). Beyond
    /// loopback, a token or mutual TLS (--tls-client-ca) is required.
    #[arg(long)]
    pub token_file: Option<String>,
    /// Serve gRPC over TLS with this certificate chain (PEM); required beyond loopback
    /// unless --allow-plaintext.
    #[arg(long, env = "LIGHTRNN_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<String>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "LIGHTRNN_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<String>,
    /// Mutual TLS: workers must present a certificate signed by this CA (PEM).
    #[arg(long, env = "LIGHTRNN_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<String>,
    /// Serve beyond loopback without TLS (traffic then travels in the clear: only on a
    /// network that is private or encrypted underneath, e.g. a service mesh).
    #[arg(long)]
    pub allow_plaintext: bool,
}

#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    /// The coordinator, http://HOST:PORT (default: http://$MASTER_ADDR:$MASTER_PORT).
    #[arg(long)]
    pub coordinator: Option<String>,
    /// This worker's rank (torchrun's RANK); assigned by the coordinator when absent.
    #[arg(long, env = "RANK")]
    pub rank: Option<usize>,
    /// CPU threads for the backend (default: the job's config).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Host or address the other workers reach this one at (default: this machine's
    /// address on the route to the coordinator).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Seconds to keep trying to reach the coordinator and to wait for the group.
    #[arg(long, default_value_t = 600)]
    pub connect_timeout_s: u64,
    /// File holding the coordinator's bearer token (or LIGHTRNN_TOKEN).
    #[arg(long)]
    pub token_file: Option<String>,
    /// The CA that signed an https:// coordinator's certificate (PEM).
    #[arg(long, env = "LIGHTRNN_TLS_CA")]
    pub tls_ca: Option<String>,
    /// This worker's certificate chain for mutual TLS (PEM).
    #[arg(long, env = "LIGHTRNN_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<String>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "LIGHTRNN_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<String>,
    /// The name the coordinator's certificate must carry (default: the URL's host).
    #[arg(long)]
    pub tls_domain: Option<String>,
}

/// The coordinator's TLS settings from its flags (None: plaintext).
fn server_tls(a: &CoordinatorArgs) -> Result<Option<Arc<rustls::ServerConfig>>> {
    let (Some(cert), Some(key)) = (&a.tls_cert, &a.tls_key) else {
        return Ok(None);
    };
    crate::tls::server_config(cert, key, a.tls_client_ca.as_deref()).map(Some)
}

/// A worker's TLS settings from its flags (None: plaintext).
fn client_tls(a: &WorkerArgs) -> Result<Option<tonic::transport::ClientTlsConfig>> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let Some(ca) = &a.tls_ca else {
        if a.tls_cert.is_some() {
            bail!("--tls-cert needs --tls-ca (the CA that signed the coordinator's certificate)");
        }
        return Ok(None);
    };
    crate::tls::crypto_provider();
    let mut cfg = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(crate::tls::read_pem(ca, "CA")?));
    if let (Some(cert), Some(key)) = (&a.tls_cert, &a.tls_key) {
        cfg = cfg.identity(Identity::from_pem(
            crate::tls::read_pem(cert, "TLS certificate")?,
            crate::tls::read_pem(key, "TLS key")?,
        ));
    }
    if let Some(d) = &a.tls_domain {
        cfg = cfg.domain_name(d.clone());
    }
    Ok(Some(cfg))
}

/// `N` or `MIN:MAX` workers.
fn parse_world(s: &str) -> std::result::Result<(usize, usize), String> {
    let num = |x: &str| {
        x.trim()
            .parse::<usize>()
            .map_err(|_| format!("{s:?}: expected N or MIN:MAX workers"))
    };
    let (min, max) = match s.split_once(':') {
        Some((a, b)) => (num(a)?, num(b)?),
        None => (num(s)?, num(s)?),
    };
    if min == 0 || min > max {
        return Err(format!("{s:?}: expected 1 <= MIN <= MAX"));
    }
    Ok((min, max))
}

/// The bearer token from a file (trimmed) or the LIGHTRNN_TOKEN variable.
fn token(file: &Option<String>) -> Result<Option<String>> {
    let t = match file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading the token file {f}"))?
                .trim()
                .to_string(),
        ),
        None => std::env::var("LIGHTRNN_TOKEN").ok(),
    };
    match t {
        Some(t) if t.len() < 16 => bail!("the bearer token must have at least 16 characters"),
        t => Ok(t),
    }
}

/// A fresh random token for a job on loopback.
fn random_token() -> Result<String> {
    use std::io::Read;
    let mut b = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom for the job's token")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn job_spec(run: &RunArgs, world: (usize, usize), handle: &Handle) -> Result<JobSpec> {
    let RunArgs {
        config,
        data,
        out,
        resume,
        backend,
        metrics_addr: _,
    } = run;
    let cfg = resolve_config(config)?;
    // Fail here, not in every worker, on a backend this build lacks.
    lightrnn_kernels::check_backend(backend.parse()?)?;
    let (data, out) = (Location::parse(data)?, Location::parse(out)?);
    let mut spec = handle.block_on(JobSpec::prepare(cfg, &data, &out, *resume, world))?;
    spec.backend = backend.to_string();
    Ok(spec)
}

fn summary_line(s: &Summary, out: &str, stats: &crate::server::JobStats) -> String {
    serde_json::json!({
        "train_loss": s.train_loss, "train_ppl": s.train_ppl, "valid_ppl": s.valid_ppl,
        "test_ppl": s.test_ppl, "words_per_sec": s.words_per_sec, "params": s.params,
        "seconds": s.seconds, "steps": s.steps, "epochs_completed": s.epochs_completed,
        "stopped_by": s.stopped_by, "out": out, "workers": s.world_size,
        "control_seconds": s.control_seconds, "coordinator_rpcs": stats.rpcs,
        "tokens_accounted": stats.tokens_accounted, "params_sha256": stats.params_sha256,
        "reallocations": stats.reallocations, "checkpoints_committed": stats.checkpoints_committed,
        "generation": stats.generation, "restarts": stats.restarts,
        "grows": stats.grows, "worlds": stats.worlds,
    })
    .to_string()
}

/// `lightrnn coordinator`: serve one job until it ends.
pub fn coordinator(a: &CoordinatorArgs, handle: &Handle, stop: &Stop) -> Result<String> {
    let mut spec = job_spec(&a.run, a.world_size, handle)?;
    spec.form_wait = Duration::from_secs(a.form_wait_s);
    spec.heartbeat = Duration::from_millis(a.heartbeat_ms.max(10));
    spec.heartbeat_timeout = spec.heartbeat * 5;
    spec.collective_timeout = Duration::from_secs(a.collective_timeout_s.max(1));
    spec.join_timeout = Duration::from_secs(a.join_timeout_s.max(1));
    spec.max_restarts = a.max_restarts;
    let addr: std::net::SocketAddr = a
        .listen
        .parse()
        .with_context(|| format!("--listen {:?} is not HOST:PORT", a.listen))?;
    spec.token = token(&a.token_file)?;
    spec.tls = server_tls(a)?;
    if !addr.ip().is_loopback() {
        if spec.token.is_none() && a.tls_client_ca.is_none() {
            bail!(
                "listening on {addr} needs authentication: a bearer token (LIGHTRNN_TOKEN or \
                 --token-file, given to the workers too) or mutual TLS (--tls-client-ca)"
            );
        }
        if spec.tls.is_none() && !a.allow_plaintext {
            bail!(
                "listening on {addr} needs TLS: --tls-cert and --tls-key (workers then use \
                 https:// and --tls-ca), or --allow-plaintext on a network that is private or \
                 encrypted underneath"
            );
        }
        if spec.tls.is_none() {
            tracing::warn!(listen = %addr, "serving without TLS (--allow-plaintext): traffic, the token included, travels in the clear");
        }
    }
    let out = spec.out.url().to_string();
    let metrics = match &a.run.metrics_addr {
        Some(m) => Some(handle.block_on(crate::metrics::bind(m))?),
        None => None,
    };
    let outcome = handle.block_on(async move {
        let incoming = bind(addr)?;
        tracing::info!(listen = %addr, min_world = spec.min_world, world = spec.world_size, run = %spec.run_id, "coordinator serving");
        // SIGTERM/SIGINT: the workers stop at a common step with a checkpoint.
        let stop = stop.clone();
        let signal: External = Box::new(|job| {
            Box::pin(async move {
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                job.request_stop();
            })
        });
        run_job(spec, incoming, with_metrics(metrics, signal)).await
    })?;
    Ok(summary_line(&outcome.summary, &out, &outcome.stats))
}

/// `lightrnn worker`: join a job and train as one of its ranks.
pub fn worker(a: &WorkerArgs, handle: &Handle, stop: &Stop) -> Result<String> {
    let coordinator = match &a.coordinator {
        Some(c) => c.clone(),
        None => match (std::env::var("MASTER_ADDR"), std::env::var("MASTER_PORT")) {
            (Ok(h), Ok(p)) => {
                let scheme = if a.tls_ca.is_some() { "https" } else { "http" };
                format!("{scheme}://{h}:{p}")
            }
            _ => bail!("give --coordinator http://HOST:PORT (or set MASTER_ADDR and MASTER_PORT)"),
        },
    };
    let opts = WorkerOptions {
        coordinator,
        rank: a.rank,
        advertise: a.advertise.clone(),
        threads: a.threads,
        connect_timeout: Duration::from_secs(a.connect_timeout_s.max(1)),
        stop: stop.clone(),
        token: token(&a.token_file)?,
        tls: client_tls(a)?,
    };
    let s = run_worker(&opts, handle)?;
    Ok(serde_json::to_string(&s)?)
}

/// `watch` with the metrics endpoint served beside it while the job runs.
fn with_metrics(listener: Option<tokio::net::TcpListener>, watch: External) -> External {
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

/// `lightrnn train --workers N`: the coordinator here, N worker processes on loopback.
pub fn train_workers(a: &crate::cli::TrainArgs, handle: &Handle, stop: &Stop) -> Result<String> {
    let workers = a.workers.unwrap_or(1);
    if workers == 0 {
        bail!("--workers must be at least 1");
    }
    let out = a.run.out.as_str();
    let mut spec = job_spec(&a.run, (workers, workers), handle)?;
    // Only this process and its workers know the job's token.
    let job_token = random_token()?;
    spec.token = Some(job_token.clone());
    let threads = if spec.cfg.threads > 0 {
        spec.cfg.threads
    } else {
        (std::thread::available_parallelism().map_or(2, |n| n.get()) / workers).max(1)
    };
    let incoming = handle.block_on(async { bind("127.0.0.1:0".parse().expect("literal")) })?;
    let addr = incoming.local_addr().context("coordinator address")?;
    let url = format!("http://{addr}");
    let exe = std::env::current_exe().context("locating this program to start workers")?;
    let spawn = move |rank: usize| -> std::io::Result<Child> {
        Command::new(&exe)
            .args(["worker", "--coordinator", &url, "--rank"])
            .arg(rank.to_string())
            .args(["--threads", &threads.to_string()])
            .env_remove("RANK")
            .env("LIGHTRNN_TOKEN", &job_token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
    };
    let children = Children(Arc::new(Mutex::new(Vec::new())));
    for rank in 0..workers {
        let child = spawn(rank).with_context(|| format!("starting worker {rank}"))?;
        children.0.lock().expect("fresh lock").push(child);
    }
    tracing::info!(workers, coordinator = %addr, threads_per_worker = threads, "workers started");
    // A worker process that exits before its job is done is a lost worker: the group
    // re-forms with a replacement process for its rank (up to the job's restart limit).
    let watched = children.0.clone();
    let stop = stop.clone();
    let watch: External = Box::new(move |job| {
        Box::pin(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if job.failed() {
                    return;
                }
                if stop.load(Ordering::Relaxed) {
                    job.request_stop();
                }
                let Ok(mut cs) = watched.lock() else {
                    job.fault("worker bookkeeping failed".into());
                    return;
                };
                // A worker that stopped answering but did not exit (stalled, stopped,
                // stuck in the kernel) is killed; the loop below then replaces it.
                for pid in job.take_stalled() {
                    if let Some(c) = cs.iter_mut().find(|c| c.id() == pid) {
                        tracing::warn!(pid, "killing a stalled worker");
                        let _ = c.kill();
                    }
                }
                for (rank, c) in cs.iter_mut().enumerate() {
                    let Ok(Some(status)) = c.try_wait() else {
                        continue;
                    };
                    if status.success() {
                        continue;
                    }
                    job.process_exited(c.id(), format!("worker process {rank} exited: {status}"));
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
    });
    let metrics = match &a.run.metrics_addr {
        Some(m) => Some(handle.block_on(crate::metrics::bind(m))?),
        None => None,
    };
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
    Ok(summary_line(&outcome.summary, out, &outcome.stats))
}
