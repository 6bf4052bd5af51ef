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
    // TensorBoard's event files are in the bucket too, one per session, and TensorBoard's
    // reader finds in them what the bucket's metrics.jsonl says (fetched with boto3).
    let local = tmp.path().join("run-from-s3");
    let fetch = r#"
import boto3, os, sys
ep, bucket, prefix, out = sys.argv[1:5]
s3 = boto3.client("s3", endpoint_url=ep, aws_access_key_id="testing",
                  aws_secret_access_key="testing", region_name="us-east-1")
keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "tb/")["Contents"]]
assert len(keys) == 2, keys
for k in keys + [prefix + "metrics.jsonl"]:
    path = os.path.join(out, k[len(prefix):])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    s3.download_file(bucket, k, path)
"#;
    let python = std::env::var("LIGHTRNN_TEST_PYTHON").expect("scripts/test.sh sets it");
    let prefix = format!("{unique}/run/");
    let o = Command::new(&python)
        .args(["-c", fetch, &ep, "lightrnn-test", &prefix])
        .arg(&local)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../scripts/check_tensorboard.py"
        ))
        .arg(&local)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
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

/// Put an object with a plain (unsigned) PUT, which moto accepts.
fn put_object(endpoint: &str, bucket: &str, key: &str, body: &[u8]) {
    let hostport = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let mut s = std::net::TcpStream::connect(hostport).expect("connect to the S3 server");
    write!(
        s,
        "PUT /{bucket}/{key} HTTP/1.1\r\nHost: {hostport}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "putting {key}: {reply}");
}

/// README's recipe for the One Billion Word benchmark, on an archive of its layout (the
/// real one: 1-billion-word-language-modeling-benchmark-r13output.tar.gz, 1.7 GB) made
/// by Debian's tar and gzip and put in the bucket: the dataset prepared straight from
/// the archive equals the one prepared from its files extracted, and trains.
#[test]
fn the_one_billion_word_recipe_prepares_from_its_tar_gz_in_s3() {
    let ep = endpoint();
    create_bucket(&ep, "lightrnn-test");
    let tmp = tempfile::tempdir().unwrap();
    let root = "1-billion-word-language-modeling-benchmark-r13output";
    let text = tmp.path().join("text");
    corpus(&text);
    let read = |n: &str| std::fs::read_to_string(text.join(n)).unwrap();
    let (train, valid, test) = (read("s.train.txt"), read("s.valid.txt"), read("s.test.txt"));
    let lines: Vec<&str> = train.lines().collect();
    let files = [
        (
            "training-monolingual.tokenized.shuffled/news.en-00001-of-00100",
            lines[..300].join("\n") + "\n",
        ),
        (
            "training-monolingual.tokenized.shuffled/news.en-00002-of-00100",
            lines[300..].join("\n") + "\n",
        ),
        (
            "heldout-monolingual.tokenized.shuffled/news.en.heldout-00000-of-00050",
            test.clone(),
        ),
        (
            "heldout-monolingual.tokenized.shuffled/news.en.heldout-00001-of-00050",
            valid.clone(),
        ),
        (
            "README",
            "The One Billion Word benchmark (a stand-in).\n".to_string(),
        ),
    ];
    let tree = tmp.path().join("tree");
    for (name, body) in &files {
        let p = tree.join(root).join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, body).unwrap();
    }
    let archive = tmp.path().join(format!("{root}.tar.gz"));
    let o = Command::new("tar")
        .arg("czf")
        .arg(&archive)
        .arg("-C")
        .arg(&tree)
        .arg(root)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let unique = unique();
    let key = format!("{unique}/{root}.tar.gz");
    put_object(
        &ep,
        "lightrnn-test",
        &key,
        &std::fs::read(&archive).unwrap(),
    );
    // The recipe (README, "Corpora as they come").
    let a = format!("s3://lightrnn-test/{key}");
    let ds = format!("s3://lightrnn-test/{unique}/1b");
    let members = |m: &str| format!("{root}/{m}");
    let train_m = members("training-monolingual.tokenized.shuffled/");
    let (code, out, err) = lightrnn(&["vocab", "--input", &a, "--members", &train_m, "--out", &ds]);
    assert_eq!(code, 0, "{err}");
    let vocab = json(&out);
    for (split, m) in [
        ("train", train_m.clone()),
        (
            "valid",
            members("heldout-monolingual.tokenized.shuffled/news.en.heldout-00001-of-00050"),
        ),
        (
            "test",
            members("heldout-monolingual.tokenized.shuffled/news.en.heldout-00000-of-00050"),
        ),
    ] {
        let (code, out, err) = lightrnn(&[
            "shard",
            "--input",
            &a,
            "--members",
            &m,
            "--vocab",
            &ds,
            "--out",
            &ds,
            "--split",
            split,
        ]);
        assert_eq!(code, 0, "{err}");
        // The same split from the extracted files.
        let local = tmp.path().join("local");
        let l = local.to_str().unwrap();
        let dir = tree.join(&m);
        if split == "train" {
            let (code, out, err) =
                lightrnn(&["vocab", "--input", dir.to_str().unwrap(), "--out", l]);
            assert_eq!(code, 0, "{err}");
            assert_eq!(json(&out)["vocab_sha256"], vocab["vocab_sha256"]);
            assert_eq!(json(&out)["tokens"], vocab["tokens"]);
        }
        let (code, plain, err) = lightrnn(&[
            "shard",
            "--input",
            dir.to_str().unwrap(),
            "--vocab",
            l,
            "--out",
            l,
            "--split",
            split,
        ]);
        assert_eq!(code, 0, "{err}");
        for k in ["tokens", "unk_tokens", "shards"] {
            assert_eq!(json(&out)[k], json(&plain)[k], "{split}: {k}");
        }
    }
    assert!(
        vocab["curve"]["curve"]
            .as_array()
            .is_some_and(|c| c.len() == 11),
        "{vocab}"
    );
    let run = format!("s3://lightrnn-test/{unique}/1b-run");
    let (code, out, err) = lightrnn(&[
        "train",
        "--preset",
        "tiny",
        "--set",
        "max_steps=20",
        "--data",
        &ds,
        "--out",
        &run,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(json(&out)["test_ppl"].as_f64().unwrap().is_finite());
}
