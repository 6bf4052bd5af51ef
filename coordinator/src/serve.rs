//! Serving one job: the gRPC listener (plaintext or TLS, bearer-token authentication),
//! the job's monitor, whatever watches it from outside (worker processes, signals,
//! metrics), until every rank has finished or the job fails.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::server::TcpIncoming;

use lightrnn_core::report::Summary;
use lightrnn_proto::{CoordinatorServer, MAX_MESSAGE_BYTES};

use crate::guard::{Limits, guard};
use crate::job::{Job, JobSpec, JobStats};
use crate::service::Service;
use crate::{Error, Result};

/// What a finished job reports.
pub struct JobOutcome {
    pub summary: Summary,
    pub stats: JobStats,
}

impl JobOutcome {
    /// The job's own figures (over the whole run, coordinator restarts included), as
    /// the summary line and `summary.json` add them to rank 0's summary.
    pub fn job_figures(&self) -> serde_json::Map<String, serde_json::Value> {
        let (s, stats) = (&self.summary, &self.stats);
        let v = serde_json::json!({
            "workers": s.world_size,
            "control_seconds": s.control_seconds, "coordinator_rpcs": stats.rpcs,
            "tokens_accounted": stats.tokens_accounted, "params_sha256": stats.params_sha256,
            "reallocations": stats.reallocations, "checkpoints_committed": stats.checkpoints_committed,
            "generation": stats.generation, "restarts": stats.restarts,
            "coordinator_restarts": stats.coordinator_restarts, "run_id": stats.run_id,
            "prepare_seconds": stats.prepare_seconds,
            "grows": stats.grows, "worlds": stats.worlds,
            "realloc_bytes_in": stats.realloc_bytes_in,
        });
        match v {
            serde_json::Value::Object(mut m) => {
                if stats.prepare_seconds.is_none() {
                    m.remove("prepare_seconds");
                }
                m
            }
            _ => unreachable!("a JSON object literal"),
        }
    }

    /// Rewrite rank 0's `summary.json` in `out` with the job's figures added, once: a
    /// finished run resumed again (nothing trained) keeps the file as it was.
    async fn record(&self, out: &lightrnn_core::data::store::Location) -> Result<()> {
        if let Ok(b) = out.get("summary.json").await
            && let Ok(old) = serde_json::from_slice::<serde_json::Value>(&b)
            && old.get("run_id").is_some()
            && old["steps"] == self.summary.steps
        {
            return Ok(());
        }
        let mut v = serde_json::to_value(&self.summary)?;
        if let Some(m) = v.as_object_mut() {
            m.extend(self.job_figures());
        }
        let json = serde_json::to_vec_pretty(&v)?;
        out.put("summary.json", bytes::Bytes::from(json)).await?;
        Ok(())
    }
}

/// Bind the coordinator's gRPC listener (port 0 picks one).
pub fn bind(addr: std::net::SocketAddr) -> Result<TcpIncoming> {
    TcpIncoming::bind(addr)
        .map(|i| i.with_nodelay(Some(true)))
        .map_err(|e| Error::Io {
            what: format!("coordinator: cannot listen on {addr}"),
            source: e,
        })
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
        CoordinatorServer::new(Service::new(job.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        lightrnn_proto::auth::RequireToken::new(job.spec().token.as_deref())
            .for_run(&job.spec().run_id),
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async {
        let _ = stop_rx.await;
    };
    // Pings keep a live client's connection busy (the guard closes idle ones) and find
    // dead ones.
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(svc);
    let guarded = guard(incoming, Limits::for_world(job.spec().world_size));
    let server = match job.spec().tls.clone() {
        Some(tls) => tokio::spawn(
            router.serve_with_incoming_shutdown(crate::tls::accept(guarded, tls), shutdown),
        ),
        None => tokio::spawn(router.serve_with_incoming_shutdown(guarded, shutdown)),
    };
    let monitor = tokio::spawn(job.clone().monitor());
    let prepare = tokio::spawn(job.clone().prepare_dataset());
    let outcome = job.outcome().await;
    monitor.abort();
    prepare.abort();
    watcher.abort();
    // Let the last replies (Finish, Fail, heartbeats answering `abort`) reach the workers.
    let linger = if outcome.is_ok() { 50 } else { 1500 };
    tokio::time::sleep(Duration::from_millis(linger)).await;
    let _ = stop_tx.send(());
    // A worker stalled in a stream must not keep the coordinator from exiting.
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the gRPC server ended with an error"),
        Err(_) => tracing::warn!("gRPC requests still open after the job ended: dropped"),
        _ => {}
    }
    let stats = job.stats();
    match outcome {
        Ok(summary) => {
            let outcome = JobOutcome { summary, stats };
            outcome.record(&job.spec().out).await?;
            let stats = &outcome.stats;
            tracing::info!(
                world = job.spec().world_size,
                generations = stats.generation,
                restarts = stats.restarts.values().sum::<u64>(),
                reallocations = stats.reallocations,
                checkpoints = stats.checkpoints_committed,
                tokens = stats.tokens_accounted,
                rpcs = stats.rpcs,
                coordinator_restarts = stats.coordinator_restarts,
                "job finished"
            );
            Ok(outcome)
        }
        Err(e) => Err(Error::Job(e.to_string())),
    }
}
