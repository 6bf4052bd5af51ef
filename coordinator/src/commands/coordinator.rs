//! `lightrnn coordinator`: the control plane of one distributed job on its own, for
//! workers on other hosts (TLS and authentication required beyond loopback).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Args;
use tokio::runtime::Handle;

use super::{RunArgs, bearer_token, resolve_config};
use crate::error::usage;
use crate::job::spec::PrepareBy;
use crate::launch::{RunSpec, job_spec, metrics_listener, summary_line, with_metrics};
use crate::serve::{External, bind, run_job};
use crate::{Error, Result, Stop};

#[derive(Args, Debug, Clone)]
pub struct CoordinatorArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// gRPC address to serve on (loopback unless given: serving other hosts needs
    /// authentication and TLS, e.g. --listen 0.0.0.0:29400 with --token-file and
    /// --tls-cert).
    #[arg(long, default_value = "127.0.0.1:29400")]
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
    /// How long the group may take to form, in seconds (counted once the dataset is
    /// ready: the workers' preparation of a text dataset has no deadline of its own).
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
    /// Who tokenises text --data into OUT/data: the workers, as tasks before the group
    /// forms (the coordinator reads none of it); the coordinator alone; or auto: the
    /// workers where the text is in object storage, the coordinator where it is a local
    /// path (use workers where every worker's host shares that filesystem).
    #[arg(long, value_enum, default_value_t = PrepareBy::Auto)]
    pub prepare_by: PrepareBy,
    /// Serve beyond loopback without TLS (traffic then travels in the clear: only on a
    /// network that is private or encrypted underneath, e.g. a service mesh).
    #[arg(long)]
    pub allow_plaintext: bool,
}

/// The coordinator's TLS settings from its flags (None: plaintext).
fn server_tls(a: &CoordinatorArgs) -> Result<Option<Arc<rustls::ServerConfig>>> {
    let (Some(cert), Some(key)) = (&a.tls_cert, &a.tls_key) else {
        return Ok(None);
    };
    crate::tls::server_config(cert, key, a.tls_client_ca.as_deref()).map(Some)
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

/// `lightrnn coordinator`: serve one job until it ends.
pub fn run(a: &CoordinatorArgs, handle: &Handle, stop: &Stop) -> Result<String> {
    let r = &a.run;
    let run = RunSpec {
        cfg: resolve_config(&r.config)?,
        data: &r.data,
        out: &r.out,
        resume: r.resume,
        backend: &r.backend,
        prepare_by: a.prepare_by,
    };
    let addr: std::net::SocketAddr = a
        .listen
        .parse()
        .map_err(|e| Error::Usage(format!("--listen {:?} is not HOST:PORT: {e}", a.listen)))?;
    // Authentication and TLS are settled before any work (the data is not read yet).
    let token = bearer_token(&a.token_file)?;
    let tls = server_tls(a)?;
    if !addr.ip().is_loopback() {
        if token.is_none() && a.tls_client_ca.is_none() {
            return usage(format!(
                "listening on {addr} needs authentication: a bearer token (LIGHTRNN_TOKEN or \
                 --token-file, given to the workers too) or mutual TLS (--tls-client-ca)"
            ));
        }
        if tls.is_none() && !a.allow_plaintext {
            return usage(format!(
                "listening on {addr} needs TLS: --tls-cert and --tls-key (workers then use \
                 https:// and --tls-ca), or --allow-plaintext on a network that is private or \
                 encrypted underneath"
            ));
        }
        if tls.is_none() {
            tracing::warn!(listen = %addr, "serving without TLS (--allow-plaintext): traffic, the token included, travels in the clear");
        }
    }
    let mut spec = job_spec(run, a.world_size, handle)?;
    spec.form_wait = Duration::from_secs(a.form_wait_s);
    spec.heartbeat = Duration::from_millis(a.heartbeat_ms.max(10));
    spec.heartbeat_timeout = spec.heartbeat * 5;
    spec.collective_timeout = Duration::from_secs(a.collective_timeout_s.max(1));
    spec.join_timeout = Duration::from_secs(a.join_timeout_s.max(1));
    spec.max_restarts = a.max_restarts;
    spec.token = token;
    spec.tls = tls;
    let out = spec.out.url().to_string();
    let metrics = metrics_listener(a.run.metrics_addr.as_deref(), handle)?;
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
    Ok(summary_line(&outcome, &out))
}
