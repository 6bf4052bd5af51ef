//! A distributed job's dataset prepared from text by its workers: the bytes one process
//! writes, also with a worker killed in the middle of its shard task (the launcher
//! replaces it, its task goes to a worker that asks), and a corrupt input ends the job
//! with an error naming it, committing nothing.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use common::{assert_same_dataset, gzip_file, json, lightrnn};

/// `files` gzipped JSON-lines files of `split` (`SPLIT.NNN.jsonl.gz`, by Debian's gzip),
/// of different sizes, ~`kb` KB of text each on average.
fn jsonl_gz(dir: &Path, split: &str, files: usize, kb: usize, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let mut x = seed;
    for f in 0..files {
        let mut body = String::new();
        let want = kb * 1000 * (1 + f % 3) / 2;
        while body.len() < want {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let words: Vec<String> = (0..4 + (x >> 59) as usize)
                .map(|k| format!("w{}", ((x >> 33) as usize + 13 * k) % 700))
                .collect();
            body.push_str(&serde_json::json!({ "text": words.join(" "), "id": f }).to_string());
            body.push('\n');
        }
        let path = dir.join(format!("{split}.{f:03}.jsonl"));
        std::fs::write(&path, body).unwrap();
        gzip_file(&path);
    }
}

fn corpus(dir: &Path, train_kb: usize) {
    jsonl_gz(dir, "train", 8, train_kb, 7);
    jsonl_gz(dir, "valid", 2, 60, 8);
    jsonl_gz(dir, "test", 3, 40, 9);
}

/// `lightrnn train` on `data` into `out` for one step, shards of 16,384 tokens, with
/// `extra` arguments.
fn train_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "train",
        "--preset",
        "tiny",
        "--set",
        "max_steps=2",
        "--set",
        "threads=1",
        "--set",
        "shard_tokens=16384",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// A temporary directory with `corpus(text, train_kb)` and its one-process dataset
/// (`one/data`): (the directory, the text, the one-process run).
fn setup(train_kb: usize) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("text");
    corpus(&data, train_kb);
    let one = tmp.path().join("one");
    one_process(&data, &one);
    (tmp, data, one)
}

/// The one-process dataset of `data` (`train` without workers prepares it itself).
fn one_process(data: &Path, out: &Path) {
    let a = train_args(data, out, &[]);
    let (code, stdout, stderr) = lightrnn(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{stdout}{stderr}");
}

#[test]
fn a_two_worker_job_prepares_its_text_as_one_process_would() {
    let (tmp, data, one) = setup(150);
    let two = tmp.path().join("two");
    let a = train_args(&data, &two, &["--workers", "2"]);
    let (code, stdout, stderr) = lightrnn(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{stdout}{stderr}");
    let s = json(&stdout);
    assert!(
        s["prepare_seconds"].as_f64().is_some_and(|t| t > 0.0),
        "{s}"
    );
    assert_same_dataset(&two.join("data"), &one.join("data"));
    assert!(!two.join("data/parts").exists(), "parts left behind");
    let shards = std::fs::read_dir(two.join("data"))
        .unwrap()
        .filter(|e| {
            let n = e.as_ref().unwrap().file_name();
            n.to_string_lossy().starts_with("train-")
        })
        .count();
    assert!(
        shards >= 3,
        "{shards} training shards: too few to test placement"
    );
    // Every task was a worker's: the coordinator handed out counts, shards and stitches.
    for what in [
        "count train part",
        "shard train part",
        "stitch shard train-",
    ] {
        assert!(stderr.contains(what), "no {what:?} task in\n{stderr}");
    }
    // A second run over the same text reuses the prepared dataset.
    let again = tmp.path().join("again");
    let a = train_args(&data, &again, &["--workers", "2"]);
    let (code, stdout, stderr) = lightrnn(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{stdout}{stderr}");
}

/// Worker processes of `train --workers 2`: the one whose shard task the coordinator
/// logs first is killed (SIGKILL) as it starts it. The launcher starts a replacement, the
/// task goes to a worker that asks, and the dataset is the one-process one.
#[test]
fn a_worker_killed_mid_shard_is_replaced_and_its_share_redone() {
    let (tmp, data, one) = setup(2500);
    let two = tmp.path().join("two");
    let mut child = Command::new(env!("CARGO_BIN_EXE_lightrnn"))
        .args(train_args(&data, &two, &["--workers", "2"]))
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let killed = Arc::new(Mutex::new(None::<u32>));
    let reader = {
        let (log, killed) = (log.clone(), killed.clone());
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let line = line.unwrap();
                let mut k = killed.lock().unwrap();
                if k.is_none()
                    && line.contains("shard train part")
                    && let Some(pid) = line
                        .split("worker=")
                        .nth(1)
                        .and_then(|w| w.split_whitespace().next())
                        .and_then(|w| w.rsplit(':').next())
                        .and_then(|p| p.parse::<u32>().ok())
                {
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                    *k = Some(pid);
                }
                drop(k);
                let mut l = log.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        })
    };
    let mut stdout = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    let status = child.wait().unwrap();
    reader.join().unwrap();
    let log = log.lock().unwrap().clone();
    assert!(status.success(), "{stdout}\n{log}");
    let pid = killed
        .lock()
        .unwrap()
        .expect("no shard task was handed out");
    assert!(
        log.contains("its worker exited; the next worker to ask takes it over"),
        "worker {pid}'s task was not taken over:\n{log}"
    );
    assert!(log.contains("replacement worker started"), "{log}");
    assert_same_dataset(&two.join("data"), &one.join("data"));
    let s = json(&stdout);
    assert_eq!(s["steps"], 2, "{s}");
}

/// A truncated input ends the job: the error names the object, and no split of the
/// dataset is committed.
#[test]
fn a_corrupt_input_ends_the_job_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("text");
    corpus(&data, 40);
    let bad = data.join("train.005.jsonl.gz");
    let body = std::fs::read(&bad).unwrap();
    std::fs::write(&bad, &body[..body.len() * 2 / 3]).unwrap();
    let out = tmp.path().join("run");
    let a = train_args(&data, &out, &["--workers", "2"]);
    let (code, stdout, stderr) = lightrnn(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_ne!(code, 0, "{stdout}{stderr}");
    assert!(
        stderr.contains("train.005.jsonl.gz") && stderr.contains("preparing the dataset"),
        "{stderr}"
    );
    for split in ["train", "valid", "test"] {
        assert!(
            !out.join(format!("data/{split}.manifest.json")).exists(),
            "{split} committed"
        );
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `lightrnn coordinator --prepare-by workers` for 2 workers on `port`.
fn coordinator(data: &Path, out: &Path, port: u16) -> std::process::Child {
    let mut a = train_args(data, out, &["--resume", "--prepare-by", "workers"]);
    a[0] = "coordinator".into();
    a.extend(
        [
            "--world-size",
            "2",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ]
        .map(String::from),
    );
    a.extend(["--heartbeat-ms", "500", "--join-timeout-s", "60"].map(String::from));
    Command::new(env!("CARGO_BIN_EXE_lightrnn"))
        .args(&a)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The coordinator killed (SIGKILL) while its workers shard, and started again: the
/// workers wait for it, the preparation starts over (their reports on the first
/// coordinator's tasks name none of the new one's), and the dataset is the one-process
/// one.
#[test]
fn a_coordinator_killed_mid_preparation_starts_it_over_with_the_same_workers() {
    let (tmp, data, one) = setup(2500);
    let out = tmp.path().join("run");
    let port = free_port();
    let mut first = coordinator(&data, &out, port);
    let url = format!("http://127.0.0.1:{port}");
    let logs: Vec<_> = (0..2)
        .map(|k| tmp.path().join(format!("worker{k}.log")))
        .collect();
    let workers: Vec<_> = logs
        .iter()
        .map(|log| {
            Command::new(env!("CARGO_BIN_EXE_lightrnn"))
                .args(["worker", "--coordinator", &url, "--threads", "1"])
                .args(["--connect-timeout-s", "60"])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(log).unwrap())
                .spawn()
                .unwrap()
        })
        .collect();
    let worker_logs = || {
        logs.iter()
            .map(|l| std::fs::read_to_string(l).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    let err = first.stderr.take().unwrap();
    let mut seen = String::new();
    for line in BufReader::new(err).lines() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("shard train part") {
            first.kill().unwrap();
            break;
        }
    }
    first.wait().unwrap();
    assert!(seen.contains("shard train part"), "{seen}");
    assert!(!out.join("data/train.manifest.json").exists());
    let second = coordinator(&data, &out, port);
    let o = second.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(
        o.status.success(),
        "{stdout}\n{stderr}\nworkers:\n{}",
        worker_logs()
    );
    assert!(
        stderr.contains("dataset prepared by the workers"),
        "{stderr}"
    );
    for mut w in workers {
        assert!(w.wait().unwrap().success(), "{}", worker_logs());
    }
    assert_same_dataset(&out.join("data"), &one.join("data"));
    assert_eq!(json(&stdout)["steps"], 2);
}
