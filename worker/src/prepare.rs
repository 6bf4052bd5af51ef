//! A worker's part in preparing its job's dataset, before it joins
//! ([`lightrnn_core::data::cluster`]): it asks the coordinator for a task, runs it while
//! saying every heartbeat that it is at it, reports how it went and asks again, until the
//! coordinator says the dataset is ready.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lightrnn_proto::auth::Client;
use lightrnn_proto::v1;

use crate::dist::remote::Reach;
use lightrnn_core::protocol::{PrepareAnswer, PrepareAsk, TaskReport};
use lightrnn_core::{Error, Result};

/// Take part in the dataset's preparation until the coordinator says it is ready (at
/// once where there is none). `parallel` inputs are read at a time; an unreachable
/// coordinator is waited for up to `wait`.
pub async fn prepare_dataset(
    client: &Client,
    coordinator: &str,
    parallel: usize,
    wait: Duration,
    stop: &Arc<AtomicBool>,
) -> Result<()> {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    let me = format!("{host}:{}", std::process::id());
    let ask = |report| PrepareAsk {
        worker: me.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        report,
    };
    let mut report = None;
    let mut tasks = 0u32;
    loop {
        let answer = call(client, coordinator, &ask(report.take()), wait).await?;
        let (id, task, heartbeat) = match answer {
            PrepareAnswer::Ready => {
                if tasks > 0 {
                    tracing::info!(tasks, "the dataset is ready");
                }
                return Ok(());
            }
            PrepareAnswer::Wait(d) => {
                if stop.load(Ordering::Relaxed) {
                    return Err(stopped());
                }
                tokio::time::sleep(d).await;
                continue;
            }
            PrepareAnswer::Task {
                id,
                task,
                heartbeat,
            } => (id, task, heartbeat),
        };
        tasks += 1;
        let started = Instant::now();
        tracing::info!(task = id, "{}", task.describe());
        let working = async {
            loop {
                tokio::time::sleep(heartbeat).await;
                if stop.load(Ordering::Relaxed) {
                    return stopped();
                }
                // A lost beat only risks the task being handed to another worker too; a
                // coordinator out of reach (restarting) is asked again at the next one,
                // and the report waits for it.
                let beat = v1::PrepareRequest::from(&ask(Some((id, TaskReport::Working))));
                if let Err(s) = client.clone().prepare(beat).await
                    && !transient(&s)
                {
                    return Error::Control(format!(
                        "preparing the dataset: {} ({:?})",
                        s.message(),
                        s.code()
                    ));
                }
            }
        };
        let run = task.run(parallel, false);
        let result = tokio::select! {
            r = run => r,
            e = working => return Err(e),
        };
        let mb = task.bytes() as f64 / 1e6;
        let seconds = started.elapsed().as_secs_f64();
        report = Some(match result {
            Ok(done) => {
                tracing::info!(
                    task = id,
                    seconds = format!("{seconds:.2}"),
                    mb_per_sec = format!("{:.1}", mb / seconds.max(1e-9)),
                    "done"
                );
                (id, TaskReport::Done(done))
            }
            Err(e) => {
                tracing::warn!(task = id, error = %e, "{} failed", task.describe());
                let retryable = e.retryable();
                (
                    id,
                    TaskReport::Failed {
                        error: e.to_string(),
                        retryable,
                    },
                )
            }
        });
    }
}

/// A call that did not reach the coordinator or broke on the way (it is down, restarting,
/// behind a partition): worth asking again, unlike its refusals.
fn transient(s: &tonic::Status) -> bool {
    use tonic::Code;
    Reach::of(s).unreachable()
        || matches!(
            s.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
        )
}

fn stopped() -> Error {
    Error::Control("stopped by a signal while preparing the dataset: nothing to checkpoint".into())
}

/// One `Prepare` call; an unreachable coordinator (restarting, behind a partition) is
/// asked again with back-off for up to `wait`.
async fn call(
    client: &Client,
    coordinator: &str,
    ask: &PrepareAsk,
    wait: Duration,
) -> Result<PrepareAnswer> {
    let deadline = Instant::now() + wait;
    let mut backoff = Duration::from_millis(250);
    loop {
        let mut c = client.clone();
        match c.prepare(v1::PrepareRequest::from(ask)).await {
            Ok(r) => return PrepareAnswer::try_from(r.into_inner()),
            Err(s) => {
                let reach = Reach::of(&s);
                if transient(&s) && Instant::now() + backoff < deadline {
                    tracing::warn!(
                        coordinator,
                        "cannot reach the coordinator{}: retrying",
                        reach.hint(coordinator)
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
                return Err(Error::Control(format!(
                    "preparing the dataset: {} ({:?})",
                    s.message(),
                    s.code()
                )));
            }
        }
    }
}
