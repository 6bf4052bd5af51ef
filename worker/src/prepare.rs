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
use lightrnn_core::data::cluster::{Done, inline_or_stored};
use lightrnn_core::data::store::Location;
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
    let me = worker_name();
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
            // An answer to a report on a task this worker no longer has: ask again.
            PrepareAnswer::Abandon => continue,
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
        let mut beats = Heartbeats::start(
            client,
            ask(Some((id, TaskReport::Working))),
            heartbeat,
            stop,
        );
        let run = async {
            let task = task.clone().load().await?;
            let done = task.run(parallel, false).await?;
            let dataset = Location::parse(task.dataset().unwrap_or_default())?;
            let name = format!("results/task-{id}.json");
            inline_or_stored(done, &dataset, &name, |url| Done::Stored { url }).await
        };
        let result = tokio::select! {
            r = run => r,
            why = beats.ended() => match why {
                Beat::Abandon => {
                    tracing::info!(task = id, "abandoned: another worker has it, or it is done");
                    continue;
                }
                Beat::Fatal(e) => return Err(e),
            },
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

/// This process among the job's workers: its host, a random tag (containers' processes
/// share pids), its pid last (a launcher on this host names its exited workers by pid).
fn worker_name() -> String {
    use std::hash::{BuildHasher, Hasher};
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("{host}/{:08x}:{}", h.finish() as u32, std::process::id())
}

/// How a task's heartbeats ended.
enum Beat {
    /// The coordinator no longer wants this worker at the task.
    Abandon,
    /// The job ended, or this worker was stopped.
    Fatal(Error),
}

/// A task's heartbeats, on a task of their own (the work may hold its thread for a
/// while); stopped when dropped.
struct Heartbeats {
    handle: tokio::task::JoinHandle<Beat>,
}

impl Heartbeats {
    fn start(client: &Client, beat: PrepareAsk, every: Duration, stop: &Arc<AtomicBool>) -> Self {
        let (client, stop) = (client.clone(), stop.clone());
        let beat = v1::PrepareRequest::from(&beat);
        let handle = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if stop.load(Ordering::Relaxed) {
                    return Beat::Fatal(stopped());
                }
                // A lost beat only risks the task being handed to another worker too; a
                // coordinator out of reach (restarting) is asked again at the next one,
                // and the report waits for it.
                match client.clone().prepare(beat.clone()).await {
                    Ok(r) if r.get_ref().abandon => return Beat::Abandon,
                    Ok(_) => {}
                    Err(s) if transient(&s) => {}
                    Err(s) => {
                        return Beat::Fatal(Error::Control(format!(
                            "preparing the dataset: {} ({:?})",
                            s.message(),
                            s.code()
                        )));
                    }
                }
            }
        });
        Self { handle }
    }

    /// Resolves when the heartbeats end (never while the task is wanted).
    async fn ended(&mut self) -> Beat {
        match (&mut self.handle).await {
            Ok(b) => b,
            Err(e) => Beat::Fatal(Error::Control(format!("the heartbeats' task: {e}"))),
        }
    }
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        self.handle.abort();
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
