//! The Prometheus endpoint (`--metrics-addr`): `GET /metrics` answers the job's figures
//! in the Prometheus text format (version 0.0.4) — world size, generation, step, words
//! per second of the job and of each rank, loss and perplexities, restarts by cause,
//! heartbeat ages and misses, the last committed checkpoint with its seconds and bytes,
//! each rank's waits on its ring neighbours (a histogram and the stalls, by peer and
//! direction), each rank's seconds per step of each phase of its steps.
//! A distributed job renders them from the coordinator's state and the ranks' heartbeat
//! reports; a single-process run from its own report. The figures are read at scrape
//! time (a prometheus-client collector over a [`Snapshot`]); HTTP is hyper's, routed by
//! axum.

use std::collections::BTreeMap;
use std::fmt::Error as FmtError;
use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use lightrnn_core::report::{RankReport, WAIT_BUCKETS};

/// One rank as the metrics show it.
#[derive(Clone, Debug, Default)]
pub struct RankView {
    pub rank: usize,
    /// Step from the rank's last heartbeat.
    pub step: u64,
    /// Seconds since its last heartbeat (None: no heartbeats in this process).
    pub heartbeat_age: Option<f64>,
    pub report: Option<RankReport>,
}

/// Everything `/metrics` shows, taken at one instant.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub run_id: String,
    /// Ranks of the current group (0 while it forms).
    pub world: usize,
    pub max_world: usize,
    pub generation: u64,
    pub ranks: Vec<RankView>,
    pub restarts: BTreeMap<String, u64>,
    pub grows: u64,
    /// Coordinator processes that served the run before this one.
    pub coordinator_restarts: u64,
    pub tokens_accounted: u64,
    pub checkpoints_committed: u64,
    pub reallocations: u64,
    pub rpcs: u64,
}

type Source = Arc<dyn Fn() -> Snapshot + Send + Sync>;

/// The collector that reads a [`Snapshot`] at every scrape.
struct Job(Source);

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("lightrnn job metrics")
    }
}

fn gauge<N: EncodeGaugeValue>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: N,
) -> Result<(), FmtError> {
    ConstGauge::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// A counter `name` (exposed as `name_total`).
fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> Result<(), FmtError> {
    ConstCounter::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Counter)?)
}

/// A family of gauges or counters with one label.
fn family<N: Copy>(
    e: &mut DescriptorEncoder,
    (name, help, kind): (&str, &str, MetricType),
    label: &str,
    items: impl IntoIterator<Item = (String, N)>,
) -> Result<(), FmtError>
where
    ConstGauge<N>: EncodeMetric,
    ConstCounter<N>: EncodeMetric,
{
    let mut m = e.encode_descriptor(name, help, None, kind)?;
    for (l, v) in items {
        let labels = [(label.to_string(), l)];
        let f = m.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(v).encode(f)?,
            _ => ConstGauge::new(v).encode(f)?,
        }
    }
    Ok(())
}

impl Collector for Job {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), FmtError> {
        let s = (self.0)();
        let gauges = MetricType::Gauge;
        family(
            &mut e,
            ("info", "The run (always 1).", gauges),
            "run_id",
            [(s.run_id.clone(), 1u64)],
        )?;
        gauge(
            &mut e,
            "world_size",
            "Workers in the current group (0 while it forms).",
            s.world as u64,
        )?;
        gauge(
            &mut e,
            "max_world_size",
            "Most workers the job takes.",
            s.max_world as u64,
        )?;
        gauge(
            &mut e,
            "generation",
            "Current generation of the group (a new one after each re-formation).",
            s.generation,
        )?;
        let step = s.ranks.iter().map(|r| r.step).max().unwrap_or(0);
        gauge(&mut e, "step", "Optimizer steps taken.", step)?;
        if let Some(r) = s.ranks.first().and_then(|r| r.report.as_ref()) {
            lead_rank(&mut e, r)?;
        }
        ranks(&mut e, &s)?;
        waits(&mut e, &s)?;
        phases(&mut e, &s)?;
        job_counters(&mut e, &s)
    }
}

/// The job's figures as rank 0 reports them.
fn lead_rank(e: &mut DescriptorEncoder, r: &RankReport) -> Result<(), FmtError> {
    gauge(e, "epoch", "Epochs completed.", r.epoch)?;
    gauge(
        e,
        "words_per_second",
        "Words per second of the whole job over the last logging window.",
        r.global_words_per_sec,
    )?;
    gauge(
        e,
        "train_loss",
        "Training loss (nats per word) of the last logging window.",
        r.loss,
    )?;
    gauge(
        e,
        "train_perplexity",
        "Training perplexity of the last logging window.",
        r.loss.exp(),
    )?;
    if r.valid_ppl > 0.0 {
        gauge(
            e,
            "valid_perplexity",
            "Validation perplexity after the last epoch.",
            r.valid_ppl,
        )?;
    }
    gauge(e, "learning_rate", "Current learning rate.", r.lr)?;
    if r.checkpoints > 0 {
        gauge(
            e,
            "checkpoint_step",
            "Step of the last committed checkpoint.",
            r.checkpoint_step,
        )?;
        gauge(
            e,
            "checkpoint_seconds",
            "Seconds the last checkpoint took (gather, write, commit).",
            r.checkpoint_seconds,
        )?;
        gauge(
            e,
            "checkpoint_bytes",
            "Bytes of the last checkpoint.",
            r.checkpoint_bytes,
        )?;
    }
    Ok(())
}

/// Every rank's step, speed and heartbeat age.
fn ranks(e: &mut DescriptorEncoder, s: &Snapshot) -> Result<(), FmtError> {
    let g = MetricType::Gauge;
    family(
        e,
        ("rank_step", "Step of each rank (from its heartbeats).", g),
        "rank",
        s.ranks.iter().map(|r| (r.rank.to_string(), r.step)),
    )?;
    family(
        e,
        (
            "rank_words_per_second",
            "Words per second of each rank over its last logging window (a straggler shows here).",
            g,
        ),
        "rank",
        s.ranks
            .iter()
            .filter_map(|r| Some((r.rank.to_string(), r.report.as_ref()?.words_per_sec))),
    )?;
    if s.ranks.iter().any(|r| r.heartbeat_age.is_some()) {
        family(
            e,
            (
                "rank_heartbeat_age_seconds",
                "Seconds since each rank's last heartbeat.",
                g,
            ),
            "rank",
            s.ranks
                .iter()
                .filter_map(|r| Some((r.rank.to_string(), r.heartbeat_age?))),
        )?;
    }
    Ok(())
}

/// Each rank's seconds per step of each phase over its last logging window, labelled by
/// rank and phase (absent while no rank reported any).
fn phases(e: &mut DescriptorEncoder, s: &Snapshot) -> Result<(), FmtError> {
    let all: Vec<_> = s
        .ranks
        .iter()
        .filter_map(|r| Some((r.rank, r.report.as_ref()?)))
        .flat_map(|(rank, rep)| rep.phases.iter().map(move |(p, v)| (rank, p, *v)))
        .collect();
    if all.is_empty() {
        return Ok(());
    }
    let mut m = e.encode_descriptor(
        "phase_seconds_per_step",
        "Seconds per training step of each phase (data, forward_backward, all_reduce, update, ...) over each rank's last logging window.",
        None,
        MetricType::Gauge,
    )?;
    for (rank, phase, v) in all {
        let labels = [
            ("rank".to_string(), rank.to_string()),
            ("phase".to_string(), phase.clone()),
        ];
        ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Each rank's waits on its ring neighbours in collectives, labelled by rank, peer and
/// direction (absent while no rank reported any).
fn waits(e: &mut DescriptorEncoder, s: &Snapshot) -> Result<(), FmtError> {
    let links: Vec<_> = s
        .ranks
        .iter()
        .filter_map(|r| Some((r.rank, r.report.as_ref()?)))
        .flat_map(|(rank, rep)| rep.waits.iter().map(move |w| (rank, w)))
        .collect();
    if links.is_empty() {
        return Ok(());
    }
    let labels = |rank: usize, w: &lightrnn_core::report::LinkWaits| {
        [
            ("rank".to_string(), rank.to_string()),
            ("peer".to_string(), w.peer.to_string()),
            ("direction".to_string(), w.direction.name().to_string()),
        ]
    };
    let mut m = e.encode_descriptor(
        "collective_wait_seconds",
        "Seconds each rank waited on a ring neighbour per message of a collective (receive: for its bytes; send: for room).",
        None,
        MetricType::Histogram,
    )?;
    for &(rank, w) in &links {
        let bounds = WAIT_BUCKETS.iter().copied().chain([f64::INFINITY]);
        let buckets: Vec<(f64, u64)> = bounds.zip(w.buckets).collect();
        m.encode_family(&labels(rank, w))?
            .encode_histogram::<NoLabelSet>(w.seconds, w.count, &buckets, None)?;
    }
    let mut m = e.encode_descriptor(
        "collective_stalls",
        "Waits on a ring neighbour past max(2 s, 5 x the median of recent ones); each logged a warning.",
        None,
        MetricType::Counter,
    )?;
    for &(rank, w) in &links {
        ConstCounter::new(w.stalls).encode(m.encode_family(&labels(rank, w))?)?;
    }
    Ok(())
}

/// The control plane's counters.
fn job_counters(e: &mut DescriptorEncoder, s: &Snapshot) -> Result<(), FmtError> {
    let restarts = |cause: &str| s.restarts.get(cause).copied().unwrap_or(0);
    family(
        e,
        (
            "restarts",
            "Re-formations of the group after lost workers, by cause.",
            MetricType::Counter,
        ),
        "cause",
        ["heartbeat", "worker_failed", "process_exit"].map(|c| (c.to_string(), restarts(c))),
    )?;
    counter(
        e,
        "heartbeat_misses",
        "Workers declared lost for missing their heartbeats.",
        restarts("heartbeat"),
    )?;
    counter(
        e,
        "grows",
        "Re-formations that took in workers asking to join (elastic).",
        s.grows,
    )?;
    counter(
        e,
        "coordinator_restarts",
        "Coordinator processes that served the run before this one (killed or preempted, then resumed).",
        s.coordinator_restarts,
    )?;
    counter(
        e,
        "checkpoints_committed",
        "Checkpoints committed.",
        s.checkpoints_committed,
    )?;
    counter(
        e,
        "tokens_accounted",
        "Training tokens certified by the epoch barriers.",
        s.tokens_accounted,
    )?;
    counter(
        e,
        "reallocations",
        "Word reallocations solved.",
        s.reallocations,
    )?;
    counter(
        e,
        "coordinator_rpcs",
        "Calls the coordinator served (heartbeats excluded).",
        s.rpcs,
    )
}

/// The registry of the endpoint: the job's figures under the `lightrnn_` prefix.
fn registry(source: Source) -> Registry {
    let mut r = Registry::with_prefix("lightrnn");
    r.register_collector(Box::new(Job(source)));
    r
}

/// The snapshot in the Prometheus text format.
pub fn render(s: &Snapshot) -> String {
    let s = s.clone();
    expose(&registry(Arc::new(move || s.clone())))
}

fn expose(r: &Registry) -> String {
    let mut out = String::new();
    match prometheus_client::encoding::prometheus_text::encode(&mut out, r) {
        Ok(()) => out,
        Err(_) => String::new(),
    }
}

/// The snapshot of a single-process run from its published report.
pub fn single_process(sink: &lightrnn_core::report::ReportSink) -> Snapshot {
    let report = sink.lock().ok().and_then(|r| r.clone());
    let r = report.clone().unwrap_or_default();
    Snapshot {
        run_id: String::new(),
        world: 1,
        max_world: 1,
        generation: 1,
        ranks: vec![RankView {
            rank: 0,
            step: r.step,
            heartbeat_age: None,
            report,
        }],
        checkpoints_committed: r.checkpoints,
        ..Default::default()
    }
}

/// Serve `GET /metrics` on `listener` with `snapshot()` until the task is aborted. Each
/// connection answers one request and closes (scrapers reconnect; nothing is held open).
pub async fn serve(listener: TcpListener, snapshot: Source) {
    let reg = Arc::new(registry(snapshot));
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let reg = reg.clone();
                async move {
                    (
                        [
                            (
                                header::CONTENT_TYPE,
                                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                            ),
                            (header::CONNECTION, "close"),
                        ],
                        expose(&reg),
                    )
                }
            }),
        )
        .route("/", get(|| async { "lightrnn: metrics at /metrics\n" }))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n").into_response() });
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint: accepting a connection failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(tcp);
            let conn = hyper::server::conn::http1::Builder::new()
                .title_case_headers(true)
                .keep_alive(false)
                .header_read_timeout(std::time::Duration::from_secs(5))
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(io, svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "metrics endpoint: a connection failed");
            }
        });
    }
}

/// Bind `addr` for the metrics endpoint.
pub async fn bind(addr: &str) -> crate::Result<TcpListener> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|e| crate::Error::Io {
            what: format!("--metrics-addr {addr}: cannot listen"),
            source: e,
        })?;
    if let Ok(a) = l.local_addr() {
        tracing::info!(url = %format!("http://{a}/metrics"), "metrics endpoint");
    }
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lightrnn_core::report::{LinkDirection, LinkWaits};

    #[test]
    fn renders_the_text_format() {
        let s = Snapshot {
            run_id: "r\"1".into(),
            world: 2,
            max_world: 2,
            generation: 3,
            ranks: vec![
                RankView {
                    rank: 0,
                    step: 10,
                    heartbeat_age: Some(0.5),
                    report: Some(RankReport {
                        loss: 1.0,
                        words_per_sec: 5.0,
                        global_words_per_sec: 10.0,
                        checkpoints: 1,
                        checkpoint_bytes: 42,
                        phases: [("data".into(), 0.25)].into(),
                        waits: vec![LinkWaits {
                            peer: 1,
                            direction: LinkDirection::Receive,
                            seconds: 3.5,
                            count: 4,
                            stalls: 1,
                            buckets: [1, 0, 2, 0, 1, 0, 0],
                        }],
                        ..Default::default()
                    }),
                },
                RankView {
                    rank: 1,
                    step: 9,
                    heartbeat_age: Some(1.5),
                    report: None,
                },
            ],
            restarts: [("heartbeat".to_string(), 2)].into_iter().collect(),
            coordinator_restarts: 1,
            ..Default::default()
        };
        let t = render(&s);
        for want in [
            "lightrnn_info{run_id=\"r\\\"1\"} 1\n",
            "lightrnn_world_size 2\n",
            "lightrnn_generation 3\n",
            "lightrnn_step 10\n",
            "lightrnn_words_per_second 10.0\n",
            "lightrnn_train_perplexity 2.718281828459045\n",
            "lightrnn_rank_words_per_second{rank=\"0\"} 5.0\n",
            "lightrnn_rank_heartbeat_age_seconds{rank=\"1\"} 1.5\n",
            "lightrnn_restarts_total{cause=\"heartbeat\"} 2\n",
            "lightrnn_heartbeat_misses_total 2\n",
            "lightrnn_coordinator_restarts_total 1\n",
            "lightrnn_checkpoint_bytes 42\n",
            "# TYPE lightrnn_restarts_total counter\n",
            "# TYPE lightrnn_collective_wait_seconds histogram\n",
            "lightrnn_collective_wait_seconds_sum{rank=\"0\",peer=\"1\",direction=\"receive\"} 3.5\n",
            "lightrnn_collective_wait_seconds_count{rank=\"0\",peer=\"1\",direction=\"receive\"} 4\n",
            "lightrnn_collective_wait_seconds_bucket{rank=\"0\",peer=\"1\",direction=\"receive\",le=\"0.001\"} 1\n",
            "lightrnn_collective_wait_seconds_bucket{rank=\"0\",peer=\"1\",direction=\"receive\",le=\"0.1\"} 3\n",
            "lightrnn_collective_wait_seconds_bucket{rank=\"0\",peer=\"1\",direction=\"receive\",le=\"10\"} 4\n",
            "lightrnn_collective_wait_seconds_bucket{rank=\"0\",peer=\"1\",direction=\"receive\",le=\"+Inf\"} 4\n",
            "lightrnn_collective_stalls_total{rank=\"0\",peer=\"1\",direction=\"receive\"} 1\n",
            "lightrnn_phase_seconds_per_step{rank=\"0\",phase=\"data\"} 0.25\n",
        ] {
            assert!(t.contains(want), "missing {want:?} in\n{t}");
        }
        // Every sample line is NAME{LABELS} VALUE.
        for l in t.lines().filter(|l| !l.starts_with('#')) {
            let (name, v) = l.rsplit_once(' ').unwrap();
            assert!(name.starts_with("lightrnn_"), "{l}");
            assert!(v.parse::<f64>().is_ok(), "{l}");
        }
    }
}
