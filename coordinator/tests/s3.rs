//! The whole pipeline against an S3-compatible server (moto, started by scripts/test.sh
//! and .ci/run, or any server named by LIGHTRNN_TEST_S3_ENDPOINT): vocabulary and shards
//! written to a bucket, training that reads them from there and writes its checkpoints
//! and metrics there, a resume from those checkpoints, and clear errors for a missing
//! bucket.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;

fn endpoint() -> String {
    std::env::var("LIGHTRNN_TEST_S3_ENDPOINT").unwrap_or_else(|_| {
        panic!(
            "these tests need an S3-compatible server: run scripts/test.sh (it installs and \
             starts moto), or set LIGHTRNN_TEST_S3_ENDPOINT=http://HOST:PORT"
        )
    })
}

/// Create a bucket with a plain (unsigned) PUT, which moto accepts.
fn create_bucket(endpoint: &str, bucket: &str) {
    let hostport = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let mut s = std::net::TcpStream::connect(hostport).expect("connect to the S3 server");
    write!(
        s,
        "PUT /{bucket} HTTP/1.1\r\nHost: {hostport}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(
        reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.0 200"),
        "creating bucket {bucket}: {reply}"
    );
}

fn lightrnn(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lightrnn"))
        .args(args)
        .env("AWS_ENDPOINT_URL", endpoint())
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ALLOW_HTTP", "true")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn corpus(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta"];
    let mut x = 99u64;
    let mut lines = Vec::new();
    for _ in 0..900 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let start = (x >> 33) as usize % words.len();
        let len = 2 + (x >> 40) as usize % 6;
        lines.push(
            (0..len)
                .map(|k| words[(start + 2 * k) % words.len()])
                .collect::<Vec<_>>()
                .join(" "),
        );
    }
    for (name, part) in [
        ("s.train.txt", &lines[..700]),
        ("s.valid.txt", &lines[700..800]),
        ("s.test.txt", &lines[800..]),
    ] {
        std::fs::write(dir.join(name), part.join("\n") + "\n").unwrap();
    }
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// A fresh prefix per run: the server may outlive one test run.
fn unique() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

/// `vocab` and `shard` of the three splits of `text` into the prefix `ds`.
fn dataset_in_s3(text: &Path, ds: &str) {
    let (code, out, err) = lightrnn(&[
        "vocab",
        "--input",
        text.join("s.train.txt").to_str().unwrap(),
        "--out",
        ds,
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["out"], format!("{ds}/vocab.txt"));
    for split in ["train", "valid", "test"] {
        let (code, out, err) = lightrnn(&[
            "shard",
            "--input",
            text.join(format!("s.{split}.txt")).to_str().unwrap(),
            "--vocab",
            ds,
            "--out",
            ds,
            "--split",
            split,
        ]);
        assert_eq!(code, 0, "{err}");
        let s = json(&out);
        assert_eq!(s["manifest"], format!("{ds}/{split}.manifest.json"));
        assert_eq!(s["shards"], 1, "{s}");
    }
}

#[test]
fn dataset_training_and_checkpoints_in_s3() {
    let ep = endpoint();
    create_bucket(&ep, "lightrnn-test");
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("text");
    corpus(&text);
    let unique = unique();
    let ds = &format!("s3://lightrnn-test/{unique}/ds");
    dataset_in_s3(&text, ds);
    // Training reads the shards from the bucket and writes its run there; then resumes.
    let run = &format!("s3://lightrnn-test/{unique}/run");
    let train = |steps: &str, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--preset",
            "tiny",
            "--set",
            steps,
            "--set",
            "checkpoint_every=20",
            "--set",
            "epochs=4",
            "--data",
            ds,
            "--out",
            run,
        ];
        args.extend_from_slice(extra);
        lightrnn(&args)
    };
    let (code, out, err) = train("max_steps=40", &[]);
    assert_eq!(code, 0, "{err}");
    let first = json(&out);
    assert_eq!(first["steps"], 40);
    assert!(first["test_ppl"].as_f64().unwrap().is_finite());
    let (code, out, err) = train("max_steps=60", &["--resume"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["steps"], 60);
    assert!(err.contains("resum"), "{err}");
    // The run's checkpoints are in the bucket: tables and inspect read them there.
    let (code, out, err) = lightrnn(&["inspect", "--checkpoint", run, "--rows", "2"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("alpha") || out.contains("beta"), "{out}");
    // A bucket that does not exist: a clear error naming it, no panic.
    let (code, _, err) = lightrnn(&[
        "vocab",
        "--input",
        text.join("s.train.txt").to_str().unwrap(),
        "--out",
        "s3://no-such-bucket-here/x",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("no-such-bucket-here") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn two_workers_reallocate_through_the_coordinator_with_data_and_checkpoints_in_s3() {
    let ep = endpoint();
    create_bucket(&ep, "lightrnn-test");
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("text");
    corpus(&text);
    let unique = unique();
    let ds = &format!("s3://lightrnn-test/{unique}/ds");
    dataset_in_s3(&text, ds);
    let run = &format!("s3://lightrnn-test/{unique}/run");
    let train = |epochs: &str, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--preset",
            "tiny",
            "--set",
            epochs,
            "--set",
            "realloc_every=1",
            "--set",
            "realloc_rounds=1",
            "--set",
            "threads=1",
            "--data",
            ds,
            "--out",
            run,
            "--workers",
            "2",
        ];
        args.extend_from_slice(extra);
        lightrnn(&args)
    };
    let (code, out, err) = train("epochs=2", &[]);
    assert_eq!(code, 0, "{err}");
    let s = json(&out);
    assert_eq!(s["workers"], 2);
    assert_eq!(s["epochs_completed"], 2, "{s}");
    // One reallocation, solved by the coordinator from both ranks' tables.
    assert_eq!(s["reallocations"], 1, "{s}");
    assert!(err.contains("allocation solved"), "{err}");
    // Both epochs' data accounted exactly once, both epoch-end checkpoints committed.
    assert!(s["tokens_accounted"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["checkpoints_committed"], 2, "{s}");
    // The run in the bucket resumes through the coordinator with the reallocated model.
    let (code, out, err) = train("epochs=3", &["--resume"]);
    assert_eq!(code, 0, "{err}");
    let s = json(&out);
    assert_eq!(s["epochs_completed"], 3, "{s}");
    // The counters are the run's (continued from the checkpoint's job record): the one
    // reallocation of the first session, none in this one; one more checkpoint.
    assert_eq!(s["reallocations"], 1, "{s}");
    assert_eq!(s["checkpoints_committed"], 3, "{s}");
    assert_eq!(s["coordinator_restarts"], 1, "{s}");
    assert!(s["test_ppl"].as_f64().unwrap().is_finite());
    let (code, out, err) = lightrnn(&["inspect", "--checkpoint", run, "--rows", "2"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("alpha") || out.contains("beta"), "{out}");
}
