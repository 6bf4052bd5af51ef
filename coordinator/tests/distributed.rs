//! Distributed training with real processes on loopback: `train --workers N` against
//! the single-process trainer, a standalone coordinator and workers where one worker is
//! killed, and the coordinator's fencing of stale and unknown workers over gRPC.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn lightrnn(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lightrnn"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A small corpus with structure (fixed word cycles), split three ways.
fn corpus(dir: &Path, lines: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let words: Vec<String> = (0..40).map(|i| format!("w{i}")).collect();
    let mut x = 12345u64;
    let all: Vec<String> = (0..lines)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let start = (x >> 33) as usize % words.len();
            let len = 3 + (x >> 45) as usize % 8;
            (0..len)
                .map(|k| words[(start + 3 * k) % words.len()].as_str())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let (a, b) = (lines * 8 / 10, lines * 9 / 10);
    for (name, part) in [
        ("d.train.txt", &all[..a]),
        ("d.valid.txt", &all[a..b]),
        ("d.test.txt", &all[b..]),
    ] {
        std::fs::write(dir.join(name), part.join("\n") + "\n").unwrap();
    }
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The per-step training losses of a run (log_every = 1).
fn step_losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect()
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs())
}

#[test]
fn two_workers_follow_one_worker_step_for_step() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("text");
    corpus(&data, 2500);
    let run = |name: &str, workers: Option<&str>, groups: &str| {
        let out = tmp.path().join(name);
        let mut args = vec![
            "train",
            "--set",
            groups,
            "--preset",
            "tiny",
            "--set",
            "max_steps=60",
            "--set",
            "log_every=1",
            "--set",
            "dropout=0.2",
            "--set",
            "checkpoint_every=25",
            "--set",
            "threads=1",
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        if let Some(n) = workers {
            args.extend(["--workers", n]);
        }
        let (code, stdout, err) = lightrnn(&args);
        assert_eq!(code, 0, "{name}: {err}");
        (json(&stdout), step_losses(&out))
    };
    let (alone, l_alone) = run("alone", None, "grad_groups=0");
    let (one, l_one) = run("one", Some("1"), "grad_groups=0");
    let (two, l_two) = run("two", Some("2"), "grad_groups=0");
    assert_eq!(l_alone.len(), 60);
    // One worker through the coordinator is the single-process run, bit for bit.
    assert_eq!(l_alone, l_one);
    assert_eq!(alone["test_ppl"], one["test_ppl"]);
    // Two workers with half the batch each follow it within float rounding, with dropout
    // masks drawn for the global batch.
    assert_eq!(l_two.len(), 60);
    for (i, (a, b)) in l_one.iter().zip(&l_two).enumerate() {
        assert!(close(*a, *b, 1e-4), "step {}: {a} vs {b}", i + 1);
    }
    for k in ["train_loss", "valid_ppl", "test_ppl"] {
        let (a, b) = (one[k].as_f64().unwrap(), two[k].as_f64().unwrap());
        assert!(close(a, b, 1e-4), "{k}: {a} vs {b}");
    }
    assert_eq!(two["workers"], 2);
    // With two gradient groups the run does not depend on the worker count at all: one
    // worker computing both groups ends with the very parameters two workers do.
    let (one_g2, l_one_g2) = run("one-g2", Some("1"), "grad_groups=2");
    let (two_g2, l_two_g2) = run("two-g2", Some("2"), "grad_groups=2");
    assert_eq!(one_g2["params_sha256"], two_g2["params_sha256"]);
    for (a, b) in l_one_g2.iter().zip(&l_two_g2) {
        assert!(close(*a, *b, 1e-12), "{a} vs {b}");
    }
    assert_ne!(one["params_sha256"], one_g2["params_sha256"]);
    // Both ranks reported the same parameter checksum at every commit and at the end.
    assert_eq!(two["params_sha256"].as_str().unwrap().len(), 64);
    assert_eq!(two["checkpoints_committed"], 3, "{two}");
    // The committed checkpoint holds the whole batch's state: a 1-worker resume of the
    // 2-worker run continues it.
    let (code, out, err) = lightrnn(&[
        "train",
        "--preset",
        "tiny",
        "--set",
        "max_steps=70",
        "--set",
        "dropout=0.2",
        "--set",
        "threads=1",
        "--data",
        data.to_str().unwrap(),
        "--out",
        tmp.path().join("two").to_str().unwrap(),
        "--resume",
        "--workers",
        "1",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["steps"], 70);
    // A batch that does not split evenly is refused before any worker starts.
    let (code, _, err) = lightrnn(&[
        "train",
        "--preset",
        "tiny",
        "--data",
        data.to_str().unwrap(),
        "--out",
        tmp.path().join("odd").to_str().unwrap(),
        "--workers",
        "3",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("split evenly"), "{err}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_killed_worker_ends_the_job_with_an_error_not_a_hang() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("text");
    corpus(&data, 6000);
    let port = free_port().to_string();
    let out = tmp.path().join("run");
    let coord = Command::new(env!("CARGO_BIN_EXE_lightrnn"))
        .args([
            "coordinator",
            "--preset",
            "tiny",
            "--set",
            "epochs=50",
            "--set",
            "threads=1",
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--world-size",
            "2",
            "--heartbeat-ms",
            "200",
            "--collective-timeout-s",
            "5",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let worker = |rank: &str| {
        Command::new(env!("CARGO_BIN_EXE_lightrnn"))
            .args(["worker", "--coordinator", &url, "--threads", "1"])
            .env("RANK", rank)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let w0 = worker("0");
    let mut w1 = worker("1");
    // Wait until the job trains (rank 0 writes metrics), then kill rank 1 outright.
    let t0 = Instant::now();
    while !out.join("metrics.jsonl").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the job never started"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    w1.kill().unwrap();
    w1.wait().unwrap();
    let killed = Instant::now();
    let c = coord.wait_with_output().unwrap();
    let w0 = w0.wait_with_output().unwrap();
    assert!(
        killed.elapsed() < Duration::from_secs(30),
        "the job took {:?} to end",
        killed.elapsed()
    );
    let err = String::from_utf8_lossy(&c.stderr);
    assert_eq!(c.status.code(), Some(1), "{err}");
    assert!(err.contains("rank"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!w0.status.success());
    assert!(!String::from_utf8_lossy(&w0.stderr).contains("panicked"));
}

#[test]
fn stale_generations_and_strangers_are_refused() {
    use lightrnn_coordinator::server::{JobSpec, bind, run_job};
    use lightrnn_proto::CoordinatorClient;
    use lightrnn_proto::v1::{FailRequest, HeartbeatRequest, JoinRequest};
    use lightrnn_worker::config::TrainConfig;
    use lightrnn_worker::store::Location;

    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("text");
    corpus(&data, 300);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let cfg = TrainConfig::preset("tiny").unwrap();
        let spec = JobSpec::prepare(
            cfg,
            &Location::parse(data.to_str().unwrap()).unwrap(),
            &Location::parse(tmp.path().join("run").to_str().unwrap()).unwrap(),
            false,
            1,
        )
        .await
        .unwrap();
        let incoming = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let url = format!("http://{}", incoming.local_addr().unwrap());
        let job = tokio::spawn(run_job(spec, incoming, Box::pin(std::future::pending())));
        let mut c = CoordinatorClient::connect(url).await.unwrap();
        let join = |rank: i64, version: &str| JoinRequest {
            rank,
            collective_addr: "127.0.0.1:1".into(),
            host: "test".into(),
            pid: 1,
            version: version.into(),
        };
        let e = c.join(join(-1, "0.0.0-other")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let r = c
            .join(join(-1, env!("CARGO_PKG_VERSION")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((r.rank, r.world_size, r.generation), (0, 1, 1));
        assert!(r.config_toml.contains("batch = 8"), "{}", r.config_toml);
        // The group is complete: a second worker is turned away.
        let e = c
            .join(join(-1, env!("CARGO_PKG_VERSION")))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        let hb = |generation: u64, rank: u32| HeartbeatRequest {
            generation,
            rank,
            ..Default::default()
        };
        assert!(
            c.heartbeat(hb(1, 0))
                .await
                .unwrap()
                .into_inner()
                .abort
                .is_empty()
        );
        let e = c.heartbeat(hb(7, 0)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        let e = c.heartbeat(hb(1, 3)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        // A failing rank ends the job with its error; heartbeats then answer `abort`.
        c.fail(FailRequest {
            generation: 1,
            rank: 0,
            error: "disk on fire".into(),
            retryable: false,
        })
        .await
        .unwrap();
        let abort = c.heartbeat(hb(1, 0)).await.unwrap().into_inner().abort;
        assert!(abort.contains("disk on fire"), "{abort}");
        let r = job.await.unwrap();
        let e = r.err().expect("the job failed").to_string();
        assert!(e.contains("disk on fire") && e.contains("rank 0"), "{e}");
    });
}
