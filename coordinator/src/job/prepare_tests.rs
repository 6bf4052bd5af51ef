//! The preparation's task queue in process, with workers played by the test (each runs
//! its tasks for real against an in-memory store): a silent worker's task taken over and
//! the first worker told to abandon it, a late result counted once, failures by holders
//! and by others, a task that loses every worker, no worker at all.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use lightrnn_core::config::TrainConfig;
use lightrnn_core::data::cluster::{Plan, Task};
use lightrnn_core::data::dataset::{Dataset, Opened, PrepareOptions};
use lightrnn_core::data::store::Location;
use lightrnn_core::protocol::{PrepareAnswer, PrepareAsk, TaskReport};

use crate::job::{Job, JobError, JobSpec};

fn opts() -> PrepareOptions {
    let cfg = TrainConfig::preset("tiny").unwrap();
    PrepareOptions {
        text: cfg.text_options(),
        vocab_size: 0,
        shard_tokens: 16_384,
    }
}

/// A text directory at `memory://prepare-tests/NAME/text` (3 training files, ~50k
/// tokens) and a job for 2 workers preparing it into `.../data`, with a 50 ms heartbeat,
/// 250 ms of silence losing a task and a join timeout of `join`.
async fn job(name: &str, join: Duration) -> (Arc<Job>, Location, Location) {
    let root = format!("memory://prepare-tests/{name}");
    let text = Location::parse(&format!("{root}/text")).unwrap();
    for (file, lines) in [
        ("a.train.txt", 4000),
        ("b.train.txt", 3000),
        ("c.train.txt", 5000),
        ("v.valid.txt", 500),
        ("t.test.txt", 500),
    ] {
        let body: String = (0..lines)
            .map(|l| format!("w{} x{} y{}\n", l % 97, l % 13, (l * 7) % 31))
            .collect();
        text.put(file, Bytes::from(body)).await.unwrap();
    }
    let data = Location::parse(&format!("{root}/data")).unwrap();
    let Opened::Text(splits) = Dataset::open_or_plan(&text, &data, &opts()).await.unwrap() else {
        panic!("text to prepare")
    };
    let cfg = TrainConfig::preset("tiny").unwrap();
    let mut spec = JobSpec::new(
        cfg,
        data.clone(),
        Location::parse(&format!("{root}/run")).unwrap(),
        (2, 2),
        0,
        0,
    );
    spec.pending = Some(Arc::new(Plan {
        dataset: data.clone(),
        opts: opts(),
        splits,
        parts: 2,
    }));
    spec.heartbeat = Duration::from_millis(50);
    spec.heartbeat_timeout = Duration::from_millis(250);
    spec.join_timeout = join;
    let job = Job::new(spec);
    tokio::spawn(job.clone().prepare_dataset());
    (job, text, data)
}

fn ask(worker: &str, report: Option<(u64, TaskReport)>) -> PrepareAsk {
    PrepareAsk {
        worker: worker.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        report,
    }
}

/// Ask as `worker` until it gets a task (or the dataset is ready: None).
async fn next_task(job: &Job, worker: &str) -> Option<(u64, Task)> {
    loop {
        match job.prepare(ask(worker, None)).await.unwrap() {
            PrepareAnswer::Task { id, task, .. } => return Some((id, *task)),
            PrepareAnswer::Ready => return None,
            PrepareAnswer::Wait(d) => tokio::time::sleep(d).await,
            PrepareAnswer::Abandon => panic!("abandon without a report"),
        }
    }
}

/// Run `task` and report it done as `worker`: the answer.
async fn run_and_report(job: &Job, worker: &str, id: u64, task: &Task) -> PrepareAnswer {
    let done = task
        .clone()
        .load()
        .await
        .unwrap()
        .run(1, false)
        .await
        .unwrap();
    job.prepare(ask(worker, Some((id, TaskReport::Done(done)))))
        .await
        .unwrap()
}

async fn objects(loc: &Location) -> Vec<(String, Bytes)> {
    let mut out = Vec::new();
    for (name, _) in loc.list_recursive().await.unwrap() {
        out.push((name.clone(), loc.get(&name).await.unwrap()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_worker_s_task_is_taken_over_and_counted_once() {
    let (job, text, data) = job("takeover", Duration::from_secs(60)).await;
    // Worker a takes the first task and falls silent.
    let (first, task) = next_task(&job, "a:1").await.unwrap();
    // Worker b does every other task, then the silent one once its hold lapses.
    let mut took_over = false;
    while let Some((id, t)) = next_task(&job, "b:2").await {
        took_over |= id == first;
        if id == first {
            // The first worker, heard again, is told to let it go.
            let a = job.prepare(ask("a:1", Some((first, TaskReport::Working))));
            assert!(matches!(a.await.unwrap(), PrepareAnswer::Abandon));
        }
        run_and_report(&job, "b:2", id, &t).await;
    }
    assert!(
        took_over,
        "the silent worker's task was never handed out again"
    );
    // Its late result is taken and ignored.
    let late = run_and_report(&job, "a:1", first, &task).await;
    assert!(matches!(late, PrepareAnswer::Ready), "{late:?}");
    assert!(!job.preparing());
    let one = Location::parse("memory://prepare-tests/takeover/one").unwrap();
    Dataset::open_or_prepare(&text, &one, &opts())
        .await
        .unwrap();
    // (A late duplicate may leave its counts below parts/: the next preparation's
    // clearing removes them; no reader looks there.)
    let got: Vec<_> = objects(&data)
        .await
        .into_iter()
        .filter(|(n, _)| !n.starts_with("parts/"))
        .collect();
    let want = objects(&one).await;
    assert_eq!(
        got.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        want.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    assert!(
        got == want,
        "the workers' dataset differs from one process's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_count_for_their_holder_only_and_a_data_error_ends_the_job() {
    let (job, _, _) = job("failures", Duration::from_secs(60)).await;
    let (id, _) = next_task(&job, "a:1").await.unwrap();
    let failed = |worker: &str, retryable| {
        ask(
            worker,
            Some((
                id,
                TaskReport::Failed {
                    error: "x.train.txt: corrupt gzip stream at byte 7".into(),
                    retryable,
                },
            )),
        )
    };
    // Another worker's failure of a task it does not hold changes nothing.
    job.prepare(failed("b:2", false)).await.unwrap();
    let a = job.prepare(ask("a:1", Some((id, TaskReport::Working))));
    assert!(matches!(a.await.unwrap(), PrepareAnswer::Wait(_)));
    // The holder's failure worth retrying hands it out again, to another worker.
    let a = job.prepare(failed("a:1", true)).await.unwrap();
    assert!(
        matches!(a, PrepareAnswer::Task { id: other, .. } if other != id),
        "{a:?}"
    );
    let (again, _) = next_task(&job, "b:2").await.unwrap();
    assert_eq!(again, id);
    // A failure not worth retrying ends the job with the task's error.
    let e = job.prepare(failed("b:2", false)).await.unwrap_err();
    assert!(matches!(e, JobError::Ended(_)), "{e}");
    assert!(e.to_string().contains("corrupt gzip stream"), "{e}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(job.failed());
    let e = job.prepare(ask("c:3", None)).await.unwrap_err();
    assert!(e.to_string().contains("corrupt gzip stream"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_loses_every_worker_ends_the_job() {
    let (job, _, _) = job("lost", Duration::from_secs(60)).await;
    let (id, _) = next_task(&job, "w:0").await.unwrap();
    let mut ended = None;
    for k in 1..10 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        match job.prepare(ask(&format!("w:{k}"), None)).await {
            Ok(PrepareAnswer::Task { id: got, .. }) => assert_eq!(got, id),
            Ok(a) => panic!("{a:?}"),
            Err(e) => {
                ended = Some((k, e));
                break;
            }
        }
    }
    let (k, e) = ended.expect("the job never gave up on the task");
    assert_eq!(k, 5, "after the 5th worker lost it: {e}");
    assert!(e.to_string().contains("5 workers in a row"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_worker_asking_within_the_join_timeout_ends_the_job() {
    let (job, _, _) = job("nobody", Duration::from_millis(400)).await;
    tokio::spawn(job.clone().monitor());
    let started = std::time::Instant::now();
    while !job.failed() {
        assert!(started.elapsed() < Duration::from_secs(10), "never ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let e = job.prepare(ask("late:1", None)).await.unwrap_err();
    assert!(e.to_string().contains("no worker asked"), "{e}");
}
