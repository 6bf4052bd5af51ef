//! Distributed training with real processes on loopback: `train --workers N` against
//! the single-process trainer, a standalone coordinator and workers where one worker is
//! killed, and the coordinator's fencing of stale and unknown workers over gRPC.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{corpus, json, lightrnn, pki};

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

/// Two workers reallocate on sparse tables: each rank reduce-scatters every range's
/// tables and sends the coordinator only its cut. With every entry a candidate the round
/// is the dense one (the same parameters at the end); with few, the coordinator takes in
/// a fraction of the dense tables' bytes.
#[test]
fn two_workers_reallocate_on_sparse_tables_as_on_dense_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("text");
    corpus(&data, 2500);
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let mut args = vec![
            "train",
            "--preset",
            "tiny",
            "--set",
            "epochs=2",
            "--set",
            "realloc_every=1",
            "--set",
            "realloc_move_cost=0.002",
            "--set",
            "threads=1",
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--workers",
            "2",
        ];
        for e in extra {
            args.extend(["--set", e]);
        }
        let (code, stdout, err) = lightrnn(&args);
        assert_eq!(code, 0, "{name}: {err}");
        if name != "dense" {
            let passes = err
                .matches("sparse loss tables: a range of words done")
                .count();
            assert!(passes >= 2, "{name}: {passes} passes: {err}");
        }
        let realloc: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["kind"] == "realloc")
            .collect();
        (json(&stdout), realloc)
    };
    let (dense, rd) = run("dense", &[]);
    let (sparse, rs) = run(
        "sparse",
        &["realloc_sparse=64", "realloc_max_table_gib=0.0000006"],
    );
    for s in [&dense, &sparse] {
        assert_eq!(
            (s["workers"].as_u64(), s["reallocations"].as_u64()),
            (Some(2), Some(1)),
            "{s}"
        );
    }
    assert!(rd[0]["words_moved"].as_u64().unwrap() > 0, "{}", rd[0]);
    assert_eq!(rd[0]["words_moved"], rs[0]["words_moved"]);
    assert_eq!(dense["params_sha256"], sparse["params_sha256"]);
    let (few, rf) = run(
        "few",
        &["realloc_sparse=2", "realloc_max_table_gib=0.0000006"],
    );
    assert_eq!(few["reallocations"], 1, "{few}");
    let bytes = |s: &serde_json::Value| s["realloc_bytes_in"].as_u64().unwrap();
    // Sparse with k = 2: per word 2 x 2 (index, loss) pairs, two f64 sums and a count,
    // once over the ranks; dense: every rank's f32 V x (R + C) tables and counts. Both
    // with rank 0's allocation (4 bytes a word).
    let v = bytes(&few) / (2 * 2 * 8 + 24 + 4);
    assert_eq!(bytes(&few), v * (2 * 2 * 8 + 24 + 4), "{few}");
    let r = (v as f64).sqrt().ceil() as u64;
    assert_eq!(
        bytes(&dense),
        2 * (v * 2 * r * 4 + 8 * v) + 4 * v,
        "{v} words: {dense}"
    );
    let (lo, hi) = (
        rf[0]["stats"]["objective_after_min"].as_f64().unwrap(),
        rf[0]["stats"]["objective_after_max"].as_f64().unwrap(),
    );
    assert!(
        lo <= hi && rf[0]["objective_after"].as_f64().unwrap() <= hi,
        "{}",
        rf[0]
    );
}

/// `realloc_every = "auto"` decides the same in a distributed job as in one process:
/// every rank takes the rule's decisions from the same reduced figures. With two gradient
/// groups one worker and two end with the same decisions and the same parameters.
#[test]
fn automatic_reallocation_decides_alike_on_one_worker_and_on_two() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("text");
    corpus(&data, 2500);
    let run = |name: &str, workers: &str| {
        let out = tmp.path().join(name);
        let args = [
            "train",
            "--preset",
            "tiny",
            "--set",
            "epochs=3",
            "--set",
            "realloc_every=auto",
            "--set",
            "lr_schedule=[10, 10, 2.5]",
            "--set",
            "grad_groups=2",
            "--set",
            "threads=1",
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--workers",
            workers,
        ];
        let (code, stdout, err) = lightrnn(&args);
        assert_eq!(code, 0, "{name}: {err}");
        let decisions: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["kind"] == "realloc")
            .map(|v| v["auto"].clone())
            .collect();
        (json(&stdout), decisions)
    };
    let (one, d1) = run("one", "1");
    let (two, d2) = run("two", "2");
    assert_eq!(d1.len(), 2, "{d1:?}");
    assert_ne!(d1[0]["decision"], "skip", "{d1:?}");
    // The same decisions; the figures agree to float rounding (each rank's loss tables
    // are summed in f32 before the ranks' sum).
    for (a, b) in d1.iter().zip(&d2) {
        for k in ["decision", "epoch", "words_moved", "why"] {
            if k != "why" || a["decision"] == "skip" {
                assert_eq!(a[k], b[k], "{k}: {a} vs {b}");
            }
        }
        for k in [
            "predicted_gain",
            "disruption",
            "move_cost",
            "realized",
            "moved_share",
        ] {
            match (a[k].as_f64(), b[k].as_f64()) {
                (Some(x), Some(y)) => assert!(close(x, y, 1e-5), "{k}: {a} vs {b}"),
                (x, y) => assert_eq!(x.is_some(), y.is_some(), "{k}: {a} vs {b}"),
            }
        }
    }
    assert_eq!(one["params_sha256"], two["params_sha256"]);
    assert_eq!(two["workers"], 2);
}

/// A run that restarted ends exactly where the fault-free one `clean` does: the same
/// figures and parameters, every epoch's tokens counted once.
fn ends_as(s: &serde_json::Value, clean: &serde_json::Value, what: &str) {
    for k in [
        "valid_ppl",
        "test_ppl",
        "train_loss",
        "steps",
        "tokens_accounted",
    ] {
        assert_eq!(s[k], clean[k], "{what}: {k}: {s} vs {clean}");
    }
    assert_eq!(s["params_sha256"], clean["params_sha256"], "{what}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A coordinator for 2 workers on a free loopback port, with fast fault detection.
fn coordinator(data: &Path, out: &Path, extra: &[&str]) -> (std::process::Child, String) {
    coordinator_at(free_port(), data, out, extra)
}

/// [`coordinator`] on loopback port `port` (a restarted coordinator takes its place).
fn coordinator_at(
    port: u16,
    data: &Path,
    out: &Path,
    extra: &[&str],
) -> (std::process::Child, String) {
    let mut args: Vec<String> = [
        "coordinator",
        "--preset",
        "tiny",
        "--set",
        "epochs=12",
        "--set",
        "threads=1",
        "--set",
        "checkpoint_every=40",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--heartbeat-ms",
        "500",
        "--collective-timeout-s",
        "5",
        "--join-timeout-s",
        "60",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(["--listen".into(), format!("127.0.0.1:{port}")]);
    if !extra.contains(&"--world-size") {
        args.extend(["--world-size".into(), "2".into()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let child = Command::new(env!("CARGO_BIN_EXE_lightrnn"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (child, format!("http://127.0.0.1:{port}"))
}

fn worker_cmd(url: &str, rank: usize) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lightrnn"));
    // A worker waits this long for a coordinator that is gone (not the default 10 min).
    c.args(["worker", "--coordinator", url, "--threads", "1"])
        .args(["--connect-timeout-s", "60"])
        .env("RANK", rank.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

fn worker(url: &str, rank: usize) -> std::process::Child {
    worker_cmd(url, rank).spawn().unwrap()
}

/// A child's stderr read to the end on a thread of its own (a long run logs more than a
/// pipe holds): its text when joined.
fn drain(child: &mut std::process::Child) -> std::thread::JoinHandle<String> {
    let mut err = child.stderr.take().expect("stderr piped");
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    })
}

/// Wait until rank 0 has committed a checkpoint: the group trains.
fn wait_training(out: &Path) {
    wait_until(Duration::from_secs(60), "the job never started", || {
        out.join("checkpoints").exists()
    });
}

/// Poll `done` every 20 ms; fail with `what` after `limit`.
fn wait_until(limit: Duration, what: &str, done: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < limit, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn chaos_a_worker_killed_at_a_random_step_is_replaced_and_the_run_ends_as_without_faults() {
    chaos(&[], false);
}

/// The same with a CUDA job whose workers run on the emulated device
/// (`LIGHTRNN_CUDA_EMULATOR=1`: the `.cu` kernels built for the host; gradients through
/// the ring): the CUDA backend's fault path resumes exactly as the CPU's.
#[cfg(feature = "cuda")]
#[test]
fn chaos_with_emulated_cuda_workers_ends_as_without_faults() {
    chaos(&["--backend", "cuda", "--set", "epochs=2"], true);
}

/// SIGKILL one of 2 workers at a seeded random moment of each of 3 trials, start a
/// replacement: every run that restarted ends with the fault-free run's figures and
/// parameters, every token counted once.
fn chaos(extra: &[&str], emulated: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("text");
    corpus(&data, 6000);
    let start = |url: &str, rank: usize| {
        let mut w = worker_cmd(url, rank);
        if emulated {
            w.env("LIGHTRNN_CUDA_EMULATOR", "1");
        }
        w.spawn().unwrap()
    };
    // The fault-free run.
    let (c, url) = coordinator(&data, &tmp.path().join("clean"), extra);
    let ws = [start(&url, 0), start(&url, 1)];
    let c = c.wait_with_output().unwrap();
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
    let clean = json(&String::from_utf8_lossy(&c.stdout));
    if emulated {
        let summary = std::fs::read_to_string(tmp.path().join("clean/summary.json")).unwrap();
        let b = json(&summary)["backend"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(b.starts_with("cuda: emulated"), "{b}");
    }
    for w in ws {
        let o = w.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    // Three trials: SIGKILL one worker after a seeded random delay, start a replacement.
    let mut x = 2024u64;
    let mut restarted = 0;
    for trial in 0..3 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let delay = Duration::from_millis(50 + (x >> 33) % 600);
        let victim = ((x >> 20) % 2) as usize;
        let out = tmp.path().join(format!("chaos-{trial}"));
        let (c, url) = coordinator(&data, &out, extra);
        let mut ws = vec![start(&url, 0), start(&url, 1)];
        wait_training(&out);
        std::thread::sleep(delay);
        ws[victim].kill().unwrap();
        ws[victim].wait().unwrap();
        ws.push(start(&url, victim));
        let c = c.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&c.stderr);
        assert!(c.status.success(), "trial {trial}: {err}");
        let s = json(&String::from_utf8_lossy(&c.stdout));
        for w in ws
            .into_iter()
            .enumerate()
            .filter(|(i, _)| *i != victim)
            .map(|(_, w)| w)
        {
            let o = w.wait_with_output().unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        if s["generation"] == 1 {
            // The run ended before the kill landed: nothing to check.
            continue;
        }
        assert!(err.contains("generation ended"), "{err}");
        restarted += 1;
        // Same world size, resumed from a committed checkpoint: the run ends exactly
        // where the fault-free one does, and every epoch's tokens were counted once.
        ends_as(&s, &clean, &format!("trial {trial}"));
    }
    assert!(
        restarted >= 2,
        "only {restarted} of 3 kills landed before the end"
    );
}

/// A worker SIGKILLed in the middle of a sparse reallocation round (the ranks between two
/// of the round's range passes, reduce-scattering tables): the fault takes the one fault
/// path, the group re-forms from the epoch-end checkpoint (committed before the round),
/// the round runs again from its first range, and the run ends exactly as the fault-free
/// one.
#[test]
fn a_worker_killed_in_a_sparse_reallocation_round_is_replaced_and_the_run_ends_as_without_faults() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("text");
    corpus(&data, 6000);
    // 42 words, 64 bytes of dense tables each: two words a range, 21 passes a round.
    let extra = [
        "--set",
        "epochs=2",
        "--set",
        "realloc_every=1",
        "--set",
        "realloc_move_cost=0.002",
        "--set",
        "realloc_sparse=3",
        "--set",
        "realloc_max_table_gib=0.00000014",
    ];
    const PASS: &str = "sparse loss tables: a range of words done";
    // Rank 0 (the one that logs the passes) with its stderr read line by line; `seen`
    // hears of the first pass.
    let leader = |url: &str| {
        let mut w = worker_cmd(url, 0);
        let mut child = w.spawn().unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, seen) = std::sync::mpsc::channel();
        let log = std::thread::spawn(move || {
            let mut all = String::new();
            for line in std::io::BufReader::new(err).lines() {
                let line = line.unwrap();
                if line.contains(PASS) {
                    let _ = tx.send(());
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        (child, log, seen)
    };
    let finish = |c: std::process::Child| {
        let c = c.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&c.stderr).into_owned();
        assert!(c.status.success(), "{err}");
        (json(&String::from_utf8_lossy(&c.stdout)), err)
    };
    let (c, url) = coordinator(&data, &tmp.path().join("clean"), &extra);
    let (w0, log0, _) = leader(&url);
    let w1 = worker(&url, 1);
    let (clean, _) = finish(c);
    for w in [w0, w1] {
        assert!(w.wait_with_output().unwrap().status.success());
    }
    let passes = log0.join().unwrap().matches(PASS).count();
    assert_eq!(clean["reallocations"], 1, "{clean}");
    assert!(passes >= 10, "{passes} passes");

    let (c, url) = coordinator(&data, &tmp.path().join("faulty"), &extra);
    let (w0, log0, seen) = leader(&url);
    let mut w1 = worker(&url, 1);
    seen.recv_timeout(Duration::from_secs(120))
        .expect("the round's first pass");
    w1.kill().unwrap();
    w1.wait().unwrap();
    let w1 = worker(&url, 1);
    let (s, err) = finish(c);
    for w in [w0, w1] {
        assert!(w.wait_with_output().unwrap().status.success());
    }
    let again = log0.join().unwrap().matches(PASS).count();
    eprintln!("{passes} passes a round; rank 0 logged {again} with the fault");
    assert!(err.contains("generation ended"), "{err}");
    // The kill landed inside the round: rank 0 began it, then ran it whole once more.
    assert!(
        again > passes && again < 2 * passes,
        "{again} passes logged, {passes} a round"
    );
    assert_eq!(s["reallocations"], 1, "{s}");
    ends_as(&s, &clean, "");
}

#[test]
fn with_no_restarts_left_a_killed_worker_ends_the_job_with_an_error_not_a_hang() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("text");
    corpus(&data, 6000);
    let out = tmp.path().join("run");
    let (c, url) = coordinator(&data, &out, &["--max-restarts", "0"]);
    let w0 = worker(&url, 0);
    let mut w1 = worker(&url, 1);
    wait_training(&out);
    w1.kill().unwrap();
    w1.wait().unwrap();
    let killed = Instant::now();
    let c = c.wait_with_output().unwrap();
    let w0 = w0.wait_with_output().unwrap();
    assert!(
        killed.elapsed() < Duration::from_secs(30),
        "the job took {:?} to end",
        killed.elapsed()
    );
    let err = String::from_utf8_lossy(&c.stderr);
    assert_eq!(c.status.code(), Some(1), "{err}");
    assert!(err.contains("rank") && err.contains("giving up"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!w0.status.success());
    assert!(!String::from_utf8_lossy(&w0.stderr).contains("panicked"));
}

#[test]
fn strangers_stale_generations_and_callers_without_the_token_are_refused() {
    use lightrnn_coordinator::job::JobSpec;
    use lightrnn_coordinator::serve::{bind, run_job};
    use lightrnn_core::config::TrainConfig;
    use lightrnn_core::data::store::Location;
    use lightrnn_proto::CoordinatorClient;
    use lightrnn_proto::auth::BearerToken;
    use lightrnn_proto::v1::{FailRequest, HeartbeatRequest, JoinRequest};

    use lightrnn_core::data::dataset::{Dataset, PrepareOptions};

    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("text");
    corpus(&text, 300);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let cfg = TrainConfig::preset("tiny").unwrap();
        // A prepared dataset: this test's calls join at once (text would be prepared by
        // workers asking Prepare first).
        let data = Location::parse(tmp.path().join("data").to_str().unwrap()).unwrap();
        let prep = PrepareOptions {
            text: cfg.text_options(),
            vocab_size: cfg.vocab_size,
            shard_tokens: cfg.shard_tokens,
        };
        Dataset::open_or_prepare(
            &Location::parse(text.to_str().unwrap()).unwrap(),
            &data,
            &prep,
        )
        .await
        .unwrap();
        let mut spec = JobSpec::prepare(
            cfg,
            (&data, lightrnn_coordinator::job::spec::PrepareBy::Auto),
            &Location::parse(tmp.path().join("run").to_str().unwrap()).unwrap(),
            false,
            (1, 1),
        )
        .await
        .unwrap();
        let token = "a-test-token-of-some-length";
        spec.token = Some(token.into());
        let incoming = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let url = format!("http://{}", incoming.local_addr().unwrap());
        let job = tokio::spawn(run_job(
            spec,
            incoming,
            Box::new(|_| Box::pin(std::future::pending())),
        ));
        let client = |t: Option<&'static str>| {
            let url = url.clone();
            async move {
                let ch = tonic::transport::Endpoint::from_shared(url)
                    .unwrap()
                    .connect()
                    .await
                    .unwrap();
                CoordinatorClient::with_interceptor(ch, BearerToken::new(t).unwrap())
            }
        };
        let join = |rank: i64, version: &str| JoinRequest {
            rank,
            collective_addr: "127.0.0.1:1".into(),
            host: "test".into(),
            pid: 1,
            version: version.into(),
        };
        // No token, a wrong token: refused before anything else is looked at.
        for t in [None, Some("a-wrong-token-of-some-length")] {
            let e = client(t)
                .await
                .join(join(-1, env!("CARGO_PKG_VERSION")))
                .await
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        }
        let mut c = client(Some(token)).await;
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

#[test]
fn sigterm_stops_at_a_common_step_with_a_checkpoint_and_the_resumed_run_ends_as_without_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("text");
    corpus(&data, 6000);
    for workers in [Some("2"), None] {
        let args = |out: &Path, resume: bool| {
            let mut a: Vec<String> = [
                "train",
                "--preset",
                "tiny",
                "--set",
                "epochs=10",
                "--set",
                "threads=1",
                "--data",
                data.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            if let Some(n) = workers {
                a.extend(["--workers".into(), n.into()]);
            }
            if resume {
                a.push("--resume".into());
            }
            a
        };
        let name = workers.unwrap_or("alone");
        let clean_out = tmp.path().join(format!("clean-{name}"));
        let a = args(&clean_out, false);
        let (code, out, err) = lightrnn(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        assert_eq!(code, 0, "{err}");
        let clean = json(&out);
        // Stop after the first epoch's checkpoint, in the middle of the second epoch or so.
        let run = tmp.path().join(format!("stopped-{name}"));
        let child = Command::new(env!("CARGO_BIN_EXE_lightrnn"))
            .args(args(&run, false))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_training(&run);
        std::thread::sleep(Duration::from_millis(150));
        let sent = Instant::now();
        let k = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(k.success());
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{name}: {err}");
        assert!(
            sent.elapsed() < Duration::from_secs(25),
            "{name}: past the grace period"
        );
        let stopped = json(&String::from_utf8_lossy(&o.stdout));
        if stopped["stopped_by"] == "epochs" {
            continue; // finished before the signal: nothing to check
        }
        assert_eq!(stopped["stopped_by"], "signal", "{name}: {stopped}");
        assert!(stopped["steps"].as_u64().unwrap() < clean["steps"].as_u64().unwrap());
        // The same command with --resume continues from the stop's checkpoint and ends
        // exactly where the uninterrupted run did.
        let a = args(&run, true);
        let (code, out, err) = lightrnn(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        assert_eq!(code, 0, "{name}: {err}");
        let resumed = json(&out);
        for k in ["steps", "valid_ppl", "test_ppl", "train_loss"] {
            assert_eq!(resumed[k], clean[k], "{name}: {k}: {resumed} vs {clean}");
        }
        if workers.is_some() {
            assert_eq!(resumed["params_sha256"], clean["params_sha256"]);
        }
    }
}

#[test]
fn a_coordinator_beyond_loopback_needs_authentication_and_tls() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("text");
    corpus(&data, 300);
    let token = tmp.path().join("token");
    std::fs::write(&token, "0123456789abcdef0123\n").unwrap();
    let run = tmp.path().join("run");
    let beyond = |extra: &[&str]| {
        let mut a = vec![
            "coordinator",
            "--preset",
            "tiny",
            "--data",
            data.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
            "--listen",
            "0.0.0.0:0",
            "--world-size",
            "1",
        ];
        a.extend_from_slice(extra);
        lightrnn(&a)
    };
    let (code, _, err) = beyond(&[]);
    assert_eq!(code, 1);
    assert!(err.contains("needs authentication"), "{err}");
    let (code, _, err) = beyond(&["--token-file", token.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("needs TLS") && err.contains("--allow-plaintext"),
        "{err}"
    );
}

/// Mutual TLS: workers with a certificate from the job's CA train; a plaintext client,
/// one without a certificate and one whose certificate another CA signed are refused
/// (and take no rank).
#[test]
fn mutual_tls_admits_the_job_s_workers_and_refuses_everyone_else() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("text");
    corpus(&data, 2000);
    let pk = tmp.path().join("pki");
    pki(&pk, "DNS:localhost,IP:127.0.0.1");
    let f = |n: &str| pk.join(n).to_str().unwrap().to_string();
    let (c, url) = coordinator(
        &data,
        &tmp.path().join("run"),
        &[
            "--set",
            "epochs=2",
            "--tls-cert",
            &f("server.pem"),
            "--tls-key",
            &f("server.key"),
            "--tls-client-ca",
            &f("ca.pem"),
        ],
    );
    let https = url.replace("http://", "https://");
    let run_worker = |url: &str, rank: usize, extra: &[String]| {
        Command::new(env!("CARGO_BIN_EXE_lightrnn"))
            .args(["worker", "--coordinator", url, "--threads", "1"])
            .args(["--connect-timeout-s", "4"])
            .args(extra)
            .env("RANK", rank.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let strangers = [
        run_worker(&url, 0, &[]),
        run_worker(&https, 0, &s(&["--tls-ca", &f("ca.pem")])),
        run_worker(
            &https,
            1,
            &s(&[
                "--tls-ca",
                &f("ca.pem"),
                "--tls-cert",
                &f("rogue.pem"),
                "--tls-key",
                &f("rogue.key"),
            ]),
        ),
    ];
    for (k, w) in strangers.into_iter().enumerate() {
        let o = w.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "stranger {k} was let in: {err}");
        let why = err.lines().last().unwrap_or_default().to_string();
        eprintln!("stranger {k}: {why}");
        assert!(
            why.contains("coordinator") && !why.contains("usage"),
            "stranger {k}: {err}"
        );
    }
    let good = s(&[
        "--tls-ca",
        &f("ca.pem"),
        "--tls-cert",
        &f("client.pem"),
        "--tls-key",
        &f("client.key"),
    ]);
    let ws = [run_worker(&https, 0, &good), run_worker(&https, 1, &good)];
    let c = c.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&c.stderr);
    assert!(c.status.success(), "{err}");
    // Each refusal is logged with the peer.
    assert!(
        err.matches("refused a TLS connection").count() >= 3,
        "{err}"
    );
    let summary = json(&String::from_utf8_lossy(&c.stdout));
    assert_eq!(summary["generation"], 1, "{summary}");
    assert!(summary["test_ppl"].as_f64().unwrap() > 1.0);
    for w in ws {
        let o = w.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

fn train_args(data: &Path, out: &Path) -> Vec<String> {
    [
        "train",
        "--preset",
        "tiny",
        "--set",
        "epochs=12",
        "--set",
        "threads=1",
        "--set",
        "checkpoint_every=40",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--workers",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A worker that stops answering without dying (SIGSTOP: a hung process, a frozen VM)
/// is declared lost by its missed heartbeats; the survivor is let out of its collective
/// at once, the launcher kills the stalled process and starts a replacement, and the run
/// ends exactly as the fault-free one.
#[test]
fn a_stalled_worker_is_killed_and_replaced_and_the_run_ends_as_without_faults() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("text");
    corpus(&data, 6000);
    let a = train_args(&data, &tmp.path().join("clean"));
    let (code, out, err) = lightrnn(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    let clean = json(&out);

    let run = tmp.path().join("stalled");
    let child = Command::new(env!("CARGO_BIN_EXE_lightrnn"))
        .args(train_args(&data, &run))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_training(&run);
    let kids = Command::new("pgrep")
        .args(["-P", &child.id().to_string()])
        .output()
        .unwrap();
    let victim = String::from_utf8_lossy(&kids.stdout)
        .lines()
        .next()
        .expect("a worker process")
        .trim()
        .to_string();
    let stopped = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-STOP", &victim])
            .status()
            .unwrap()
            .success()
    );
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let s = json(&String::from_utf8_lossy(&o.stdout));
    eprintln!(
        "stalled run: generation {}, ended {:?} after the stop",
        s["generation"],
        stopped.elapsed()
    );
    if s["generation"] == 1 {
        // Finished before the stop landed (the run is short): nothing to check.
        assert!(stopped.elapsed() < Duration::from_secs(10), "{err}");
        return;
    }
    assert!(
        err.contains("sent no heartbeat for")
            && err.contains("last heard at step")
            && err.contains("killing a stalled worker"),
        "{err}"
    );
    assert_eq!(s["restarts"]["heartbeat"], 1, "{s}");
    // Detection takes 5 heartbeats (10 s); the survivor does not wait out its collective
    // deadline (120 s): the coordinator's verdict shuts its ring down.
    assert!(
        stopped.elapsed() < Duration::from_secs(60),
        "{:?}",
        stopped.elapsed()
    );
    ends_as(&s, &clean, "");
}

/// A worker that joins and dies before the rest of its group arrives frees its rank:
/// the group forms with the next worker, with no restart and no wait for a deadline.
#[test]
fn a_worker_lost_before_its_group_forms_frees_its_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("text");
    corpus(&data, 2000);
    let out = tmp.path().join("run");
    let (c, url) = coordinator(&data, &out, &["--set", "epochs=2"]);
    let mut early = worker(&url, 1);
    // Joined (and waiting for rank 0) once it has listened long enough; then it dies.
    std::thread::sleep(Duration::from_secs(3));
    early.kill().unwrap();
    early.wait().unwrap();
    let ws = [worker(&url, 0), worker(&url, 1)];
    let c = c.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&c.stderr);
    assert!(c.status.success(), "{err}");
    assert!(err.contains("its rank is free again"), "{err}");
    let s = json(&String::from_utf8_lossy(&c.stdout));
    assert_eq!(s["generation"], 1, "{s}");
    for w in ws {
        let o = w.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

/// An elastic job (`--world-size 1:2`): a worker is killed and not replaced, so the
/// survivor re-forms the group alone; a new worker then asks to join and the group grows
/// back to two at its next checkpoint. With `grad_groups=2` one and two workers compute
/// bit-identical steps, so the run ends exactly as a single process does.
#[test]
fn an_elastic_group_shrinks_to_its_survivors_and_grows_at_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("text");
    corpus(&data, 6000);
    let common = [
        "--preset",
        "tiny",
        "--set",
        "epochs=16",
        "--set",
        "threads=1",
        "--set",
        "checkpoint_every=40",
        "--set",
        "grad_groups=2",
    ];
    let clean_out = tmp.path().join("clean");
    let mut a = vec!["train", "--data", data.to_str().unwrap()];
    a.extend_from_slice(&["--out", clean_out.to_str().unwrap()]);
    a.extend_from_slice(&common);
    let (code, out, err) = lightrnn(&a);
    assert_eq!(code, 0, "{err}");
    let clean = json(&out);

    let run = tmp.path().join("elastic");
    let mut extra = vec!["--world-size", "1:2", "--form-wait-s", "2"];
    extra.extend_from_slice(&common[2..]);
    let (mut c, url) = coordinator(&data, &run, &extra);
    // The coordinator's log, read as it comes: the test waits for the survivor's group
    // to form before a newcomer knocks (on a loaded machine that takes longer than any
    // fixed sleep).
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stderr = c.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let mut w1 = worker(&url, 1);
    let mut w0 = worker(&url, 0);
    // Its log read as it comes: a pipe nobody reads fills up and stops the worker.
    let w0_log = drain(&mut w0);
    wait_training(&run);
    w1.kill().unwrap();
    w1.wait().unwrap();
    let t0 = Instant::now();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(120).saturating_sub(t0.elapsed()))
            .expect("the survivor's group never formed");
        if line.contains("group formed") && line.contains("generation=2") {
            break;
        }
    }
    // The survivor trains alone for a while; then a newcomer knocks.
    std::thread::sleep(Duration::from_secs(2));
    let mut newcomer = worker(&url, 1);
    let newcomer_log = drain(&mut newcomer);
    let status = c.wait().unwrap();
    let err = reader.join().unwrap();
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut c.stdout.take().unwrap(), &mut stdout).unwrap();
    assert!(status.success(), "{err}");
    let s = json(&stdout);
    eprintln!("elastic run: {s}");
    for (mut w, log) in [(w0, w0_log), (newcomer, newcomer_log)] {
        let status = w.wait().unwrap();
        let log = log.join().unwrap();
        assert!(status.success(), "{log}");
    }
    assert_eq!(s["worlds"]["1"], 2, "{s}");
    assert_eq!(s["worlds"]["2"], 1, "the survivor did not go on alone: {s}");
    assert_eq!(s["grows"], 1, "the group did not grow back: {s}");
    assert_eq!(s["worlds"]["3"], 2, "{s}");
    assert_eq!(s["workers"], 2, "{s}");
    for k in ["valid_ppl", "test_ppl", "train_loss", "steps"] {
        assert_eq!(s[k], clean[k], "{k}: {s} vs {clean}");
    }
}

fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// `--metrics-addr` serves Prometheus metrics while the job trains: with workers
/// (from the coordinator, fed by heartbeats) and in a single process.
#[test]
fn the_metrics_endpoint_shows_the_job_while_it_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("text");
    corpus(&data, 6000);
    for workers in ["2", "1"] {
        let addr = format!("127.0.0.1:{}", free_port());
        let out = tmp.path().join(format!("run-{workers}"));
        let mut args = vec![
            "train",
            "--preset",
            "tiny",
            "--set",
            "epochs=200",
            "--set",
            "threads=1",
            "--set",
            "log_every=10",
            "--set",
            "checkpoint_every=40",
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--metrics-addr",
            &addr,
        ];
        if workers == "2" {
            args.extend_from_slice(&["--workers", "2"]);
        }
        let child = Command::new(env!("CARGO_BIN_EXE_lightrnn"))
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        let body = loop {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "no metrics with a checkpoint within 60 s"
            );
            std::thread::sleep(Duration::from_millis(200));
            if let Some(b) = http_get(&addr, "/metrics")
                && b.contains("lightrnn_checkpoint_bytes")
                && b.contains("lightrnn_valid_perplexity")
            {
                break b;
            }
        };
        let (world, ranks): (&str, &[&str]) = if workers == "2" {
            ("2", &["0", "1"])
        } else {
            ("1", &["0"])
        };
        assert!(body.starts_with("HTTP/1.1 200 OK\r\n"), "{body}");
        assert!(
            body.contains("Content-Type: text/plain; version=0.0.4"),
            "{body}"
        );
        for want in [
            format!("lightrnn_world_size {world}\n"),
            "lightrnn_generation 1\n".to_string(),
            "lightrnn_restarts_total{cause=\"heartbeat\"} 0\n".to_string(),
            "lightrnn_heartbeat_misses_total 0\n".to_string(),
            "# TYPE lightrnn_words_per_second gauge\n".to_string(),
            "lightrnn_train_perplexity ".to_string(),
            "lightrnn_checkpoint_step ".to_string(),
            "lightrnn_checkpoint_seconds ".to_string(),
        ] {
            assert!(
                body.contains(&want),
                "{workers} workers: no {want:?} in\n{body}"
            );
        }
        for r in ranks {
            let want = format!("lightrnn_rank_words_per_second{{rank=\"{r}\"}} ");
            assert!(
                body.contains(&want),
                "{workers} workers: no {want:?} in\n{body}"
            );
            if workers == "2" {
                let want = format!("lightrnn_rank_heartbeat_age_seconds{{rank=\"{r}\"}} ");
                assert!(body.contains(&want), "no {want:?} in\n{body}");
                // Each rank's waits on its neighbour, both ways, from its heartbeats.
                let peer = if *r == "0" { "1" } else { "0" };
                for dir in ["receive", "send"] {
                    let labels = format!("{{rank=\"{r}\",peer=\"{peer}\",direction=\"{dir}\"}}");
                    for want in [
                        format!("lightrnn_collective_wait_seconds_count{labels} "),
                        format!("lightrnn_collective_stalls_total{labels} "),
                    ] {
                        assert!(body.contains(&want), "no {want:?} in\n{body}");
                    }
                }
            }
        }
        let step: f64 = body
            .lines()
            .find_map(|l| l.strip_prefix("lightrnn_step "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(step >= 40.0, "{body}");
        let missing = http_get(&addr, "/nothing").unwrap();
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        // Stop the run (with its checkpoint).
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

/// A stop that lands on a step whose checkpoint was just committed (here every step has
/// one) keeps that checkpoint instead of writing the step twice, and the run resumes.
#[test]
fn a_stop_on_a_checkpointed_step_keeps_that_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("text");
    corpus(&data, 3000);
    let run = tmp.path().join("run");
    let args = |resume: bool| {
        let mut a = vec![
            "train",
            "--preset",
            "tiny",
            "--set",
            "epochs=30",
            "--set",
            "max_steps=400",
            "--set",
            "threads=1",
            "--set",
            "checkpoint_every=1",
            "--set",
            "keep_checkpoints=2",
            "--data",
            data.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
            "--workers",
            "2",
        ];
        if resume {
            a.push("--resume");
        }
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let child = Command::new(env!("CARGO_BIN_EXE_lightrnn"))
        .args(args(false))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_training(&run);
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("committed already"), "{err}");
    let stopped = json(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(stopped["generation"], 1, "{stopped}");
    eprintln!("stopped at step {}", stopped["steps"]);
    if stopped["stopped_by"] != "signal" {
        return; // finished before the signal
    }
    let a = args(true);
    let (code, out, err) = lightrnn(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["stopped_by"], "max_steps");
}

/// A distributed run resumed after it finished (the deploy templates always pass
/// `--resume`) trains nothing: the workers report the stored summary and no object of
/// the run changes.
#[test]
fn resuming_a_finished_distributed_run_trains_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, out) = (tmp.path().join("data"), tmp.path().join("run"));
    // Long enough that max_steps stops the run inside its epoch.
    corpus(&data, 2000);
    let mut args = vec![
        "train",
        "--preset",
        "tiny",
        "--set",
        "max_steps=20",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--workers",
        "2",
    ];
    let (code, first, err) = lightrnn(&args);
    assert_eq!(code, 0, "{err}");
    let files = |dir: &Path| -> Vec<(std::path::PathBuf, Vec<u8>)> {
        let mut v = Vec::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    if !p.ends_with("data") {
                        todo.push(p);
                    }
                } else if !p.ends_with("run.json") {
                    // run.json records every coordinator start, this one too.
                    v.push((p.clone(), std::fs::read(&p).unwrap()));
                }
            }
        }
        v.sort();
        v
    };
    let before = files(&out);
    args.push("--resume");
    let (code, again, err) = lightrnn(&args);
    assert_eq!(code, 0, "{err}");
    let (first, again) = (json(&first), json(&again));
    for k in ["steps", "test_ppl", "valid_ppl", "train_loss", "stopped_by"] {
        assert_eq!(again[k], first[k], "{k}: {again} vs {first}");
    }
    assert_eq!(first["stopped_by"], "max_steps", "{first}");
    // The counters are the run's, continued from its last checkpoint.
    assert_eq!(
        again["checkpoints_committed"], first["checkpoints_committed"],
        "{again}"
    );
    assert_eq!(again["coordinator_restarts"], 1, "{again}");
    assert!(files(&out) == before, "the resumed run changed its objects");
}

/// Slow-client exhaustion: connections that never send the HTTP/2 preface are closed
/// after 10 s, a peer's connections beyond its bound at once, both logged; the job's
/// workers still join and train to the end.
#[test]
fn connections_that_send_nothing_are_closed_and_the_job_still_runs() {
    use std::io::Read;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("text");
    corpus(&data, 600);
    let out = tmp.path().join("run");
    let (coord, url) = coordinator(&data, &out, &["--set", "epochs=1"]);
    let addr = url.trim_start_matches("http://").to_string();
    let t0 = Instant::now();
    let mut idle = Vec::new();
    while idle.len() < 100 {
        match std::net::TcpStream::connect(&addr) {
            Ok(s) => idle.push(s),
            Err(_) if t0.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("the coordinator never listened: {e}"),
        }
    }
    // 2 workers: at most 32 + 16 = 48 connections from this address stay open.
    // Whether the server closes `s` within `wait` (its HTTP/2 settings frame, sent at
    // once to an admitted connection, is read past).
    let closed_within = |s: &std::net::TcpStream, wait: Duration| {
        let end = Instant::now() + wait;
        let mut b = [0u8; 256];
        let mut r = s;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s.set_read_timeout(Some(left)).unwrap();
            match r.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) => {
                    return !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    );
                }
            }
        }
    };
    let surplus = idle
        .iter()
        .skip(48)
        .filter(|s| closed_within(s, Duration::from_millis(500)))
        .count();
    assert!(
        surplus >= 50,
        "only {surplus} of the 52 surplus connections were refused"
    );
    // The silent ones within the bound are closed after 10 s.
    let silent = idle
        .iter()
        .take(48)
        .filter(|s| closed_within(s, Duration::from_secs(15)))
        .count();
    assert!(
        silent >= 46,
        "only {silent} of 48 silent connections were closed"
    );
    drop(idle);
    let ws = [worker(&url, 0), worker(&url, 1)];
    let o = coord.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("too many open from this peer"), "{err}");
    assert!(err.contains("sent nothing for 10 s"), "{err}");
    for mut w in ws {
        assert!(w.wait().unwrap().success());
    }
}

/// Committed checkpoints of a run directory (those with a manifest).
fn committed(out: &Path) -> usize {
    std::fs::read_dir(out.join("checkpoints"))
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().join("meta.json").is_file())
            })
            .count()
        })
        .unwrap_or(0)
}

/// Wait until a run has more than `n` committed checkpoints.
fn wait_committed(out: &Path, n: usize) {
    wait_until(
        Duration::from_secs(120),
        &format!("no checkpoint after {n}"),
        || committed(out) > n,
    );
}

/// The coordinator SIGKILLed twice while it trains and restarted with `--resume` on its
/// address: the workers, never restarted, wait for it and rejoin; the run ends with the
/// fault-free run's figures and parameters, its counters cover the whole run (every
/// epoch's tokens once, every checkpoint), the restarts are reported, no worker of the
/// killed coordinator's generations is counted as a failure, and the logs say what
/// happened.
#[test]
fn a_coordinator_killed_and_restarted_is_rejoined_and_the_run_ends_as_without_faults() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("text");
    corpus(&data, 6000);
    let extra = ["--set", "epochs=6"];
    let (c, url) = coordinator(&data, &tmp.path().join("clean"), &extra);
    let ws = [worker(&url, 0), worker(&url, 1)];
    let c = c.wait_with_output().unwrap();
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
    let clean = json(&String::from_utf8_lossy(&c.stdout));
    for w in ws {
        assert!(w.wait_with_output().unwrap().status.success());
    }
    let out = tmp.path().join("restarted");
    let port = free_port();
    let (mut c, url) = coordinator_at(port, &data, &out, &extra);
    let start = |rank| {
        let mut w = worker_cmd(&url, rank).spawn().unwrap();
        let log = drain(&mut w);
        (w, log)
    };
    let ws = [start(0), start(1)];
    let mut killed_logs = Vec::new();
    for (kill, pause) in [(1, Duration::from_millis(1500)), (2, Duration::ZERO)] {
        wait_committed(&out, committed(&out));
        c.kill().unwrap();
        let o = c.wait_with_output().unwrap();
        killed_logs.push(String::from_utf8_lossy(&o.stderr).into_owned());
        std::thread::sleep(pause);
        let mut a = extra.to_vec();
        a.push("--resume");
        c = coordinator_at(port, &data, &out, &a).0;
        eprintln!("coordinator restart {kill} done");
    }
    let o = c.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let s = json(&String::from_utf8_lossy(&o.stdout));
    ends_as(&s, &clean, "coordinator restarted twice");
    assert_eq!(
        s["checkpoints_committed"], clean["checkpoints_committed"],
        "{s}"
    );
    assert_eq!(s["coordinator_restarts"], 2, "{s}");
    assert_eq!(
        s["restarts"],
        serde_json::json!({}),
        "no worker failure was counted: {s}"
    );
    assert!(s["generation"].as_u64().unwrap() >= 3, "{s}");
    assert_eq!(
        s["run_id"],
        json(&std::fs::read_to_string(out.join("run.json")).unwrap())["run_id"]
    );
    // summary.json holds the same figures as the line.
    let file = json(&std::fs::read_to_string(out.join("summary.json")).unwrap());
    for k in [
        "params_sha256",
        "tokens_accounted",
        "coordinator_restarts",
        "run_id",
    ] {
        assert_eq!(file[k], s[k], "{k}");
    }
    assert!(
        err.contains("a coordinator of this run ran before"),
        "{err}"
    );
    for (mut w, log) in ws {
        let status = w.wait().unwrap();
        let e = log.join().unwrap();
        assert!(status.success(), "{e}");
        // The worker said what it waited for, and not that TLS might be wrong.
        assert!(e.contains("nothing listens at"), "{e}");
        assert!(e.contains("the coordinator answers again"), "{e}");
        assert!(!e.contains("TLS handshake"), "{e}");
    }
}

/// A run SIGKILLed between a write of `metrics.jsonl` and its next checkpoint, then
/// resumed: the file holds every step's line exactly once, as the uninterrupted run's.
#[test]
fn a_run_killed_after_a_checkpoint_keeps_every_metrics_line_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("text");
    corpus(&data, 3000);
    let args = |out: &Path, resume: bool| {
        let mut a: Vec<String> = [
            "train",
            "--preset",
            "tiny",
            "--set",
            "epochs=3",
            "--set",
            "threads=1",
            "--set",
            "log_every=1",
            "--set",
            "checkpoint_every=15",
            "--data",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.push(data.to_str().unwrap().into());
        a.extend(["--out".into(), out.to_str().unwrap().into()]);
        if resume {
            a.push("--resume".into());
        }
        a
    };
    let lines = |out: &Path| -> Vec<serde_json::Value> {
        // Timings differ between runs: drop them.
        fn strip(v: &mut serde_json::Value) {
            if let Some(m) = v.as_object_mut() {
                m.retain(|k, _| !k.contains("seconds") && !k.contains("per_sec"));
                m.values_mut().for_each(strip);
            }
        }
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let mut v = json(l);
                strip(&mut v);
                v
            })
            .collect()
    };
    let clean = tmp.path().join("clean");
    let a = args(&clean, false);
    let (code, _, err) = lightrnn(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    let killed = tmp.path().join("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_lightrnn"))
        .args(args(&killed, false))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The file was first written at step 1; the kill lands after the second checkpoint,
    // well within the 10 s between timed writes.
    wait_committed(&killed, 1);
    child.kill().unwrap();
    child.wait().unwrap();
    let a = args(&killed, true);
    let (code, _, err) = lightrnn(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    let (want, got) = (lines(&clean), lines(&killed));
    assert!(want.len() > 40, "{}", want.len());
    assert_eq!(got, want);
    // Pruned checkpoints leave no empty folders behind.
    for e in std::fs::read_dir(killed.join("checkpoints")).unwrap() {
        let p = e.unwrap().path();
        assert!(p.join("meta.json").is_file(), "{p:?} is not a checkpoint");
    }
}

// ---- The ring's security: intruders, replays, tampering, encryption (issue 37) ----

use lightrnn_worker::dist::secure::{FINISH_LEN, GREETING, HELLO_LEN};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The coordinator's summary once it succeeds, after every worker exited 0.
fn job_ends(c: std::process::Child, ws: Vec<std::process::Child>) -> (serde_json::Value, String) {
    let c = c.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&c.stderr).into_owned();
    assert!(c.status.success(), "{err}");
    for w in ws {
        let o = w.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    (json(&String::from_utf8_lossy(&c.stdout)), err)
}

/// A worker of rank `rank` whose ring listens on `ring_port` and is dialled at
/// `advertised` (another port: a proxy in front of it).
fn ring_worker(url: &str, rank: usize, ring_port: u16, advertised: u16, extra: &[&str]) -> Command {
    let mut c = worker_cmd(url, rank);
    c.args(["--ring-port", &ring_port.to_string()])
        .args(["--advertise", &format!("127.0.0.1:{advertised}")])
        .args(extra);
    c
}

/// What a [`proxy`] keeps of each connection: its first 64 MiB.
const CAPTURED: usize = 64 << 20;

/// A TCP proxy on loopback in front of port `upstream`: what each connection's client
/// sent (its first [`CAPTURED`] bytes), by connection; `before(k, captured)` runs before connection
/// k is forwarded; on connection 0, the bit `flip` (counted from its first byte) is
/// flipped on the way.
struct Proxy {
    port: u16,
    captured: Arc<Mutex<Vec<Vec<u8>>>>,
}

fn proxy(
    upstream: u16,
    flip: Option<usize>,
    before: impl Fn(usize, &[Vec<u8>]) + Send + 'static,
) -> Proxy {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let captured: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let log = captured.clone();
    std::thread::spawn(move || {
        for (k, from) in l.incoming().enumerate() {
            let Ok(mut from) = from else { return };
            let seen = log.lock().unwrap().clone();
            before(k, &seen);
            let t0 = Instant::now();
            let mut to = loop {
                match TcpStream::connect(("127.0.0.1", upstream)) {
                    Ok(s) => break s,
                    Err(_) if t0.elapsed() < Duration::from_secs(30) => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(e) => panic!("proxy upstream {upstream}: {e}"),
                }
            };
            log.lock().unwrap().push(Vec::new());
            let (mut back_from, mut back_to) = (to.try_clone().unwrap(), from.try_clone().unwrap());
            std::thread::spawn(move || std::io::copy(&mut back_from, &mut back_to));
            let log = log.clone();
            std::thread::spawn(move || {
                let (mut b, mut at) = (vec![0u8; 1 << 16], 0usize);
                loop {
                    let n = match from.read(&mut b) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if let Some(bit) = flip.filter(|_| k == 0)
                        && (at * 8..(at + n) * 8).contains(&bit)
                    {
                        b[bit / 8 - at] ^= 1 << (bit % 8);
                    }
                    if to.write_all(&b[..n]).is_err() {
                        break;
                    }
                    let mut seen = log.lock().unwrap();
                    if seen[k].len() < CAPTURED {
                        seen[k].extend_from_slice(&b[..n]);
                    }
                    at += n;
                }
                let _ = to.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    Proxy { port, captured }
}

/// Whether rank 1's log has a line refusing a loopback connection for `why`.
fn refused_by_rank_1(log: &str, why: &str) -> bool {
    log.lines()
        .any(|l| l.contains("ring: rank 1 refused a connection from 127.0.0.1:") && l.contains(why))
}

/// Send `bytes` to a ring port as a connector would, and read what comes back until the
/// peer closes (a refused handshake is closed).
fn knock(port: u16, bytes: &[u8]) -> Vec<u8> {
    use std::io::{Read, Write};
    let t0 = Instant::now();
    let mut s = loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(e) if t0.elapsed() > Duration::from_secs(10) => panic!("port {port}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(&bytes[..HELLO_LEN]);
    let mut reply = Vec::new();
    let mut b = [0u8; 64];
    if s.read_exact(&mut b).is_ok() {
        reply.extend_from_slice(&b);
        let _ = s.write_all(&bytes[HELLO_LEN..]);
        let _ = s.read_to_end(&mut reply);
    }
    reply
}

/// The ring tests' job: 3 epochs of the tiny preset on a small corpus.
const RING_JOB: [&str; 2] = ["--set", "epochs=3"];

/// A folder with the ring tests' corpus, and the summary of its job run without faults.
fn ring_job() -> (tempfile::TempDir, std::path::PathBuf, serde_json::Value) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("text");
    corpus(&data, 2000);
    let (c, url) = coordinator(&data, &tmp.path().join("clean"), &RING_JOB);
    let (clean, _) = job_ends(c, vec![worker(&url, 0), worker(&url, 1)]);
    (tmp, data, clean)
}

#[test]
fn ring_an_intruder_at_a_forming_ring_is_refused_and_the_run_ends_as_without_it() {
    use std::io::{Read, Write};
    let (tmp, data, clean) = ring_job();
    // Rank 1 listens on a known port; an intruder knocks there (as rank 0, rank 1's left
    // neighbour, of generation 1, with the right greeting) from before rank 0 starts
    // until the job ends, answering each challenge with what it has: no key.
    let port = free_port();
    let (c, url) = coordinator(&data, &tmp.path().join("intruded"), &RING_JOB);
    let mut w1 = worker_cmd(&url, 1)
        .args(["--ring-port", &port.to_string()])
        .spawn()
        .unwrap();
    let log1 = drain(&mut w1);
    let stop = Arc::new(AtomicBool::new(false));
    let halt = stop.clone();
    let intruder = std::thread::spawn(move || {
        let mut challenged = 0;
        while !halt.load(Ordering::Relaxed) {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut hello = GREETING.to_vec();
                hello.extend_from_slice(&0u64.to_le_bytes());
                hello.extend_from_slice(&1u64.to_le_bytes());
                hello.extend_from_slice(&[7u8; 32]);
                let mut reply = [0u8; 64];
                if s.write_all(&hello).is_ok() && s.read_exact(&mut reply).is_ok() {
                    challenged += 1;
                    let _ = s.write_all(&[0u8; FINISH_LEN]);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        challenged
    });
    std::thread::sleep(Duration::from_millis(1500));
    let w0 = worker(&url, 0);
    let (s, _) = job_ends(c, vec![w0]);
    stop.store(true, Ordering::Relaxed);
    assert!(w1.wait().unwrap().success());
    let log1 = log1.join().unwrap();
    assert!(
        intruder.join().unwrap() >= 1,
        "the intruder never reached a handshake: {log1}"
    );
    let refused = |why: &str| refused_by_rank_1(&log1, why);
    assert!(refused("its proof does not check"), "{log1}");
    // Nothing of the intruder's reached the model: one generation, the clean run's end.
    assert_eq!(s["generation"], 1, "{s}");
    ends_as(&s, &clean, "intruded");
}

#[test]
fn ring_a_flipped_bit_ends_its_generation_and_a_replayed_handshake_is_refused() {
    let (tmp, data, clean) = ring_job();
    // Rank 0 reaches rank 1 through a proxy that flips one bit 300 kB into the first
    // connection's data (a gradient's frame); when generation 2's connection comes, the
    // proxy first replays generation 1's recorded handshake to rank 1, as recorded and
    // with the generation rewritten to 2.
    let port = free_port();
    let replies: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let got = replies.clone();
    let p = proxy(
        port,
        Some(8 * (HELLO_LEN + FINISH_LEN + 300_000) + 5),
        move |k, seen| {
            if k == 1 {
                let recorded = seen[0][..HELLO_LEN + FINISH_LEN].to_vec();
                let mut patched = recorded.clone();
                patched[16..24].copy_from_slice(&2u64.to_le_bytes());
                let mut got = got.lock().unwrap();
                got.push(knock(port, &recorded));
                got.push(knock(port, &patched));
            }
        },
    );
    let (c, url) = coordinator(&data, &tmp.path().join("tampered"), &RING_JOB);
    let mut w1 = ring_worker(&url, 1, port, p.port, &[]).spawn().unwrap();
    let log1 = drain(&mut w1);
    let (s, err) = job_ends(c, vec![worker(&url, 0)]);
    assert!(w1.wait().unwrap().success());
    let log1 = log1.join().unwrap();
    // The frame failed its check on rank 1, which ended generation 1 through the fault
    // path; generation 2 resumed from the last checkpoint.
    assert!(
        log1.contains("ring: rank 1 of 2") && log1.contains("failed its authentication check"),
        "{log1}"
    );
    assert!(err.contains("generation ended"), "{err}");
    assert_eq!(s["generation"], 2, "{s}");
    // Both replays were refused, and said why: the one as recorded at its greeting, the
    // one rewritten to generation 2 after its challenge, at its proof.
    let replies = replies.lock().unwrap();
    assert_eq!(replies.len(), 2);
    assert!(
        replies[0].is_empty(),
        "a replay of generation 1 got an answer"
    );
    assert_eq!(
        replies[1].len(),
        64,
        "the rewritten replay's challenge, no more"
    );
    let refused = |why: &str| refused_by_rank_1(&log1, why);
    assert!(
        refused("it claims generation 1, this ring is generation 2"),
        "{log1}"
    );
    assert!(refused("its proof does not check"), "{log1}");
    ends_as(&s, &clean, "tampered");
}

/// The bytes of tensor `name` in a safetensors file.
fn safetensor(path: &Path, name: &str) -> Vec<u8> {
    let b = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let header = json(std::str::from_utf8(&b[8..8 + n]).unwrap());
    let at = |i: usize| header[name]["data_offsets"][i].as_u64().unwrap() as usize;
    b[8 + n + at(0)..8 + n + at(1)].to_vec()
}

#[test]
fn ring_with_tls_or_without_what_crosses_the_ring_is_never_the_data() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("text");
    corpus(&data, 2000);
    let pk = tmp.path().join("pki");
    pki(&pk, "DNS:localhost,IP:127.0.0.1");
    let f = |n: &str| pk.join(n).to_str().unwrap().to_string();
    // The same job twice, with TLS and without, rank 0's sends to rank 1 captured.
    let run = |name: &str, tls: bool| {
        let port = free_port();
        let p = proxy(port, None, |_, _| {});
        let (cert, key, ca) = (f("server.pem"), f("server.key"), f("ca.pem"));
        let mut extra = vec!["--set", "epochs=2"];
        if tls {
            extra.extend(["--tls-cert", &cert, "--tls-key", &key]);
        }
        let (c, url) = coordinator(&data, &tmp.path().join(name), &extra);
        let url = if tls {
            url.replace("http://", "https://")
        } else {
            url
        };
        let w = if tls {
            vec!["--tls-ca", ca.as_str()]
        } else {
            vec![]
        };
        let ws = vec![
            worker_cmd(&url, 0).args(&w).spawn().unwrap(),
            ring_worker(&url, 1, port, p.port, &w).spawn().unwrap(),
        ];
        let (s, _) = job_ends(c, ws);
        assert_eq!(s["generation"], 1, "{s}");
        let seen = p.captured.lock().unwrap()[0].clone();
        (s, seen)
    };
    let (tls_s, tls) = run("tls", true);
    let (plain_s, plain) = run("plain", false);
    // The same run, the same frames; the recorder saw the greeting in the clear.
    assert_eq!(plain_s["params_sha256"], tls_s["params_sha256"]);
    assert_eq!(plain.len(), tls.len());
    let h = HELLO_LEN + FINISH_LEN;
    assert!(plain.len() > h + (1 << 20), "{} bytes", plain.len());
    assert!(
        plain.len() < CAPTURED,
        "the capture was cut: {} bytes",
        plain.len()
    );
    assert!(tls.starts_with(GREETING) && plain.starts_with(GREETING));
    // Data in the clear would be the same bytes at the same places in both runs: past
    // the handshake, not one 32-byte window is.
    let same = (h..plain.len() - 32)
        .step_by(32)
        .filter(|&i| plain[i..i + 32] == tls[i..i + 32])
        .count();
    assert_eq!(same, 0, "windows sent alike by two runs");
    // A buffer known to cross the ring: the LSTM state the ranks gathered for the last
    // checkpoint (an all-reduce in which each element is non-zero on one rank only, so
    // rank 0's streams travel to rank 1 as they are stored). None of it crosses in the
    // clear, in either run.
    let last = std::fs::read_dir(tmp.path().join("tls/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .unwrap();
    let state = safetensor(&last.join("state.safetensors"), "h");
    let pieces: std::collections::HashSet<&[u8]> = state
        .chunks_exact(16)
        .filter(|p| p.iter().any(|&b| b != 0))
        .collect();
    assert!(pieces.len() >= 32, "{} pieces of state", pieces.len());
    for (name, seen) in [("tls", &tls), ("plain", &plain)] {
        let found = seen.windows(16).filter(|w| pieces.contains(w)).count();
        assert_eq!(
            found, 0,
            "{name}: the checkpoint's state crossed the ring in the clear"
        );
    }
}

#[test]
fn a_worker_asked_to_stop_before_it_joined_ends_at_once() {
    // No coordinator answers (a job whose coordinator failed, being ended by its
    // scheduler): the worker does not wait out --connect-timeout-s after a SIGTERM, nor
    // after SIGUSR1 (which sets no deadline of its own).
    for signal in ["-TERM", "-USR1"] {
        let port = free_port();
        let w = Command::new(env!("CARGO_BIN_EXE_lightrnn"))
            .args([
                "worker",
                "--coordinator",
                &format!("http://127.0.0.1:{port}"),
            ])
            .args(["--rank", "0", "--grace-s", "60"])
            .env("LIGHTRNN_TOKEN", "stop-before-join-0123456789")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let sent = Instant::now();
        let k = Command::new("kill")
            .args([signal, &w.id().to_string()])
            .status()
            .unwrap();
        assert!(k.success());
        let o = w.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(sent.elapsed() < Duration::from_secs(5), "{signal}: {err}");
        assert_eq!(o.status.code(), Some(1), "{signal}: {err}");
        assert!(
            err.contains("stopped by a signal before joining the job"),
            "{signal}: {err}"
        );
    }
}
