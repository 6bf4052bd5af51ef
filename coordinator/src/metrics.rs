//! The Prometheus endpoint (`--metrics-addr`): `GET /metrics` answers the job's figures
//! in the Prometheus text format (version 0.0.4) — world size, generation, step, words
//! per second of the job and of each rank, loss and perplexities, restarts by cause,
//! heartbeat ages and misses, the last committed checkpoint with its seconds and bytes.
//! A distributed job renders them from the coordinator's state and the ranks' heartbeat
//! reports; a single-process run from its own report.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use lightrnn_worker::report::RankReport;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

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
    pub tokens_accounted: u64,
    pub checkpoints_committed: u64,
    pub reallocations: u64,
    pub rpcs: u64,
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP lightrnn_{name} {help}");
        let _ = writeln!(self.0, "# TYPE lightrnn_{name} {kind}");
    }
    fn value(&mut self, name: &str, labels: &str, v: f64) {
        let v = if v.is_finite() {
            format!("{v}")
        } else if v.is_nan() {
            "NaN".into()
        } else if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        };
        if labels.is_empty() {
            let _ = writeln!(self.0, "lightrnn_{name} {v}");
        } else {
            let _ = writeln!(self.0, "lightrnn_{name}{{{labels}}} {v}");
        }
    }
    fn one(&mut self, name: &str, kind: &str, help: &str, v: f64) {
        self.family(name, kind, help);
        self.value(name, "", v);
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The snapshot in the Prometheus text format.
pub fn render(s: &Snapshot) -> String {
    let mut o = Out(String::new());
    o.family("info", "gauge", "The run (always 1).");
    o.value("info", &format!("run_id=\"{}\"", label(&s.run_id)), 1.0);
    o.one(
        "world_size",
        "gauge",
        "Workers in the current group (0 while it forms).",
        s.world as f64,
    );
    o.one(
        "max_world_size",
        "gauge",
        "Most workers the job takes.",
        s.max_world as f64,
    );
    o.one(
        "generation",
        "gauge",
        "Current generation of the group (a new one after each re-formation).",
        s.generation as f64,
    );
    let lead = s.ranks.first().and_then(|r| r.report.clone());
    let step = s.ranks.iter().map(|r| r.step).max().unwrap_or(0);
    o.one("step", "gauge", "Optimizer steps taken.", step as f64);
    if let Some(r) = &lead {
        o.one("epoch", "gauge", "Epochs completed.", r.epoch as f64);
        o.one(
            "words_per_second",
            "gauge",
            "Words per second of the whole job over the last logging window.",
            r.global_words_per_sec,
        );
        o.one(
            "train_loss",
            "gauge",
            "Training loss (nats per word) of the last logging window.",
            r.loss,
        );
        o.one(
            "train_perplexity",
            "gauge",
            "Training perplexity of the last logging window.",
            r.loss.exp(),
        );
        if r.valid_ppl > 0.0 {
            o.one(
                "valid_perplexity",
                "gauge",
                "Validation perplexity after the last epoch.",
                r.valid_ppl,
            );
        }
        o.one("learning_rate", "gauge", "Current learning rate.", r.lr);
        if r.checkpoints > 0 {
            o.one(
                "checkpoint_step",
                "gauge",
                "Step of the last committed checkpoint.",
                r.checkpoint_step as f64,
            );
            o.one(
                "checkpoint_seconds",
                "gauge",
                "Seconds the last checkpoint took (gather, write, commit).",
                r.checkpoint_seconds,
            );
            o.one(
                "checkpoint_bytes",
                "gauge",
                "Bytes of the last checkpoint.",
                r.checkpoint_bytes as f64,
            );
        }
    }
    o.family(
        "rank_step",
        "gauge",
        "Step of each rank (from its heartbeats).",
    );
    for r in &s.ranks {
        o.value("rank_step", &format!("rank=\"{}\"", r.rank), r.step as f64);
    }
    o.family(
        "rank_words_per_second",
        "gauge",
        "Words per second of each rank over its last logging window (a straggler shows here).",
    );
    for r in &s.ranks {
        if let Some(rep) = &r.report {
            o.value(
                "rank_words_per_second",
                &format!("rank=\"{}\"", r.rank),
                rep.words_per_sec,
            );
        }
    }
    if s.ranks.iter().any(|r| r.heartbeat_age.is_some()) {
        o.family(
            "rank_heartbeat_age_seconds",
            "gauge",
            "Seconds since each rank's last heartbeat.",
        );
        for r in &s.ranks {
            if let Some(a) = r.heartbeat_age {
                o.value(
                    "rank_heartbeat_age_seconds",
                    &format!("rank=\"{}\"", r.rank),
                    a,
                );
            }
        }
    }
    o.family(
        "restarts_total",
        "counter",
        "Re-formations of the group after lost workers, by cause.",
    );
    for cause in ["heartbeat", "worker_failed", "process_exit"] {
        let n = s.restarts.get(cause).copied().unwrap_or(0);
        o.value("restarts_total", &format!("cause=\"{cause}\""), n as f64);
    }
    o.one(
        "heartbeat_misses_total",
        "counter",
        "Workers declared lost for missing their heartbeats.",
        s.restarts.get("heartbeat").copied().unwrap_or(0) as f64,
    );
    o.one(
        "grows_total",
        "counter",
        "Re-formations that took in workers asking to join (elastic).",
        s.grows as f64,
    );
    o.one(
        "checkpoints_committed_total",
        "counter",
        "Checkpoints committed.",
        s.checkpoints_committed as f64,
    );
    o.one(
        "tokens_accounted_total",
        "counter",
        "Training tokens certified by the epoch barriers.",
        s.tokens_accounted as f64,
    );
    o.one(
        "reallocations_total",
        "counter",
        "Word reallocations solved.",
        s.reallocations as f64,
    );
    o.one(
        "coordinator_rpcs_total",
        "counter",
        "Calls the coordinator served (heartbeats excluded).",
        s.rpcs as f64,
    );
    o.0
}

/// The snapshot of a single-process run from its published report.
pub fn single_process(sink: &lightrnn_worker::report::ReportSink) -> Snapshot {
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

/// Serve `GET /metrics` on `listener` with `snapshot()` until the task is aborted.
pub async fn serve(listener: TcpListener, snapshot: Arc<dyn Fn() -> Snapshot + Send + Sync>) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let snapshot = snapshot.clone();
        tokio::spawn(async move {
            // The request head (bounded); the body of a GET is empty.
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            let head = tokio::time::timeout(Duration::from_secs(5), async {
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            })
            .await;
            if head.is_err() {
                return;
            }
            let line = String::from_utf8_lossy(&buf);
            let mut parts = line.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (status, ctype, body) = match (method, path.split('?').next().unwrap_or("")) {
                ("GET", "/metrics") => (
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    render(&snapshot()),
                ),
                ("GET", "/") => (
                    "200 OK",
                    "text/plain; charset=utf-8",
                    "lightrnn: metrics at /metrics\n".to_string(),
                ),
                ("GET", _) => (
                    "404 Not Found",
                    "text/plain; charset=utf-8",
                    "not found\n".into(),
                ),
                _ => (
                    "405 Method Not Allowed",
                    "text/plain; charset=utf-8",
                    "only GET\n".into(),
                ),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
            let _ = conn.shutdown().await;
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
            ..Default::default()
        };
        let t = render(&s);
        for want in [
            "lightrnn_info{run_id=\"r\\\"1\"} 1\n",
            "lightrnn_world_size 2\n",
            "lightrnn_generation 3\n",
            "lightrnn_step 10\n",
            "lightrnn_words_per_second 10\n",
            "lightrnn_train_perplexity 2.718281828459045\n",
            "lightrnn_rank_words_per_second{rank=\"0\"} 5\n",
            "lightrnn_rank_heartbeat_age_seconds{rank=\"1\"} 1.5\n",
            "lightrnn_restarts_total{cause=\"heartbeat\"} 2\n",
            "lightrnn_heartbeat_misses_total 2\n",
            "lightrnn_checkpoint_bytes 42\n",
            "# TYPE lightrnn_restarts_total counter\n",
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
