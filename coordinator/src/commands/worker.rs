//! `lightrnn worker`: one rank of a distributed job, on any host that reaches the
//! coordinator (torchrun's RANK, MASTER_ADDR and MASTER_PORT are read).

use std::time::Duration;

use clap::Args;
use tokio::runtime::Handle;

use lightrnn_worker::rank::{WorkerOptions, run_worker};

use super::bearer_token;
use crate::error::usage;
use crate::{Result, Stop};

#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    /// The coordinator, http://HOST:PORT (default: http://$MASTER_ADDR:$MASTER_PORT).
    #[arg(long)]
    pub coordinator: Option<String>,
    /// This worker's rank (torchrun's RANK); assigned by the coordinator when absent.
    #[arg(long, env = "RANK")]
    pub rank: Option<usize>,
    /// CPU threads for the backend (default: the job's config), and inputs read at once
    /// when the worker prepares the job's text (default: this machine's cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// The CUDA device to train on when the job's backend is CUDA (torchrun's LOCAL_RANK;
    /// default: the job's device, 0).
    #[arg(long, env = "LOCAL_RANK")]
    pub device: Option<usize>,
    /// HOST or HOST:PORT the other workers reach this one's ring at (default: this
    /// machine's address on the route to the coordinator, and the port it listens on;
    /// a PORT for a forwarded or mapped port).
    #[arg(long)]
    pub advertise: Option<String>,
    /// The port this worker's ring listens on (0: any free one; a fixed one for a
    /// firewall's rules).
    #[arg(long, default_value_t = 0)]
    pub ring_port: u16,
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

/// A worker's TLS settings from its flags (None: plaintext).
fn client_tls(a: &WorkerArgs) -> Result<Option<tonic::transport::ClientTlsConfig>> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let Some(ca) = &a.tls_ca else {
        if a.tls_cert.is_some() {
            return usage(
                "--tls-cert needs --tls-ca (the CA that signed the coordinator's certificate)",
            );
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

/// `lightrnn worker`: join a job and train as one of its ranks.
pub fn run(a: &WorkerArgs, handle: &Handle, stop: &Stop) -> Result<String> {
    let coordinator = match &a.coordinator {
        Some(c) => c.clone(),
        None => match (std::env::var("MASTER_ADDR"), std::env::var("MASTER_PORT")) {
            (Ok(h), Ok(p)) => {
                let scheme = if a.tls_ca.is_some() { "https" } else { "http" };
                format!("{scheme}://{h}:{p}")
            }
            _ => {
                return usage(
                    "give --coordinator http://HOST:PORT (or set MASTER_ADDR and MASTER_PORT)",
                );
            }
        },
    };
    let opts = WorkerOptions {
        coordinator,
        rank: a.rank,
        advertise: a.advertise.clone(),
        ring_port: a.ring_port,
        threads: a.threads,
        connect_timeout: Duration::from_secs(a.connect_timeout_s.max(1)),
        stop: stop.clone(),
        token: bearer_token(&a.token_file)?,
        tls: client_tls(a)?,
        device: a.device,
        open: None,
    };
    let s = run_worker(&opts, handle)?;
    Ok(serde_json::to_string(&s)?)
}
