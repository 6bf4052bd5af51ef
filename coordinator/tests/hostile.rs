//! What a new user and hostile input meet: a closed pipe or a hangup during training
//! (the stop still checkpoints and resumes bit-identically), commands that stop at once
//! on a signal, streamed samples, allocation tables of any magnitude, oversized input
//! quoted in errors, outputs that are not silently replaced.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{corpus, json, lightrnn};

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_lightrnn"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn signal(child: &Child, sig: &str) {
    let k = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(k.success());
}

fn train_args(data: &Path, out: &Path, resume: bool) -> Vec<String> {
    let mut a: Vec<String> = [
        "train",
        "--preset",
        "tiny",
        "--set",
        "epochs=10",
        "--set",
        "threads=1",
        "--set",
        "log_every=1",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if resume {
        a.push("--resume".into());
    }
    a
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(|s| s.as_str()).collect()
}

/// `train ... 2>&1 | tee log` and Ctrl-C: the pipe closes first, then SIGINT arrives;
/// `| head -n 1`: the reader leaves after one line; a terminal that goes away: SIGHUP.
/// Every time the stop checkpoints, the process exits 0, and `--resume` ends exactly
/// where the uninterrupted run did.
#[test]
fn a_closed_pipe_and_a_hangup_still_stop_with_a_checkpoint_that_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("text");
    corpus(&data, 6000);
    let clean_out = tmp.path().join("clean");
    let (code, out, err) = lightrnn(&strs(&train_args(&data, &clean_out, false)));
    assert_eq!(code, 0, "{err}");
    let clean = json(&out);
    let mut checked = 0;
    for (name, sig, lines_read) in [
        ("tee", "-INT", 0usize),
        ("head", "-INT", 1),
        ("hangup", "-HUP", 1),
    ] {
        let run = tmp.path().join(name);
        let mut child = spawn(&strs(&train_args(&data, &run, false)));
        let (mut so, mut se) = (child.stdout.take(), child.stderr.take());
        // The reader takes `lines_read` lines of the log, then goes away.
        if lines_read > 0 {
            let mut got = Vec::new();
            let mut b = [0u8; 1];
            let e = se.as_mut().unwrap();
            while got.iter().filter(|&&c| c == b'\n').count() < lines_read {
                assert_eq!(e.read(&mut b).unwrap(), 1, "the log ended early");
                got.push(b[0]);
            }
        }
        let t0 = Instant::now();
        while !run.join("metrics.jsonl").exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "{name}: never trained"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(so.take());
        drop(se.take());
        // Log lines now meet a closed pipe.
        std::thread::sleep(Duration::from_millis(300));
        signal(&child, sig);
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(0), "{name}: {status:?}");
        let summary = json(&std::fs::read_to_string(run.join("summary.json")).unwrap());
        if summary["stopped_by"] == "epochs" {
            continue; // finished before the signal: nothing to check
        }
        assert_eq!(summary["stopped_by"], "signal", "{name}: {summary}");
        let (code, out, err) = lightrnn(&strs(&train_args(&data, &run, true)));
        assert_eq!(code, 0, "{name}: {err}");
        let resumed = json(&out);
        for k in [
            "steps",
            "valid_ppl",
            "test_ppl",
            "train_loss",
            "params_sha256",
        ] {
            assert_eq!(resumed[k], clean[k], "{name}: {k}: {resumed} vs {clean}");
        }
        checked += 1;
    }
    assert!(checked > 0, "every run ended before its signal");
}

/// A small trained run for the commands that read checkpoints.
fn trained(tmp: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let data = tmp.join("text");
    corpus(&data, 400);
    let run = tmp.join("run");
    let (code, _, err) = lightrnn(&[
        "train",
        "--preset",
        "tiny",
        "--set",
        "max_steps=6",
        "--data",
        data.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    (data, run)
}

/// `sample --words 1000000000` streams its text as it draws it, and a signal ends it at
/// once (128 + the signal); a reader that goes away (`| head`) ends it with status 0.
#[test]
fn sampling_streams_and_ends_at_once_on_a_signal_or_a_closed_pipe() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, run) = trained(tmp.path());
    let args = [
        "sample",
        "--checkpoint",
        run.to_str().unwrap(),
        "--words",
        "1000000000",
        "--temperature=-1",
    ];
    // A negative temperature parses (and is refused for what it is).
    let (code, _, err) = lightrnn(&args);
    assert_eq!(code, 1);
    assert!(
        !err.contains("unexpected argument") && err.contains("temperature"),
        "{err}"
    );
    let args = &args[..5];
    for (sig, status) in [("-TERM", 143), ("-INT", 130), ("-HUP", 129)] {
        let mut child = spawn(args);
        let mut so = child.stdout.take().unwrap();
        let mut got = vec![0u8; 4096];
        so.read_exact(&mut got).unwrap(); // text arrives while it is drawn
        assert!(got.contains(&b' '), "{}", String::from_utf8_lossy(&got));
        let sent = Instant::now();
        signal(&child, sig);
        let st = child.wait().unwrap();
        assert!(
            sent.elapsed() < Duration::from_secs(5),
            "{sig}: {:?}",
            sent.elapsed()
        );
        assert_eq!(st.code(), Some(status), "{sig}");
    }
    let mut child = spawn(args);
    let mut so = child.stdout.take().unwrap();
    let mut got = vec![0u8; 100];
    so.read_exact(&mut got).unwrap();
    drop(so);
    let t0 = Instant::now();
    let st = child.wait().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(st.code(), Some(0), "a closed pipe ends sampling cleanly");
}

fn npy_f64(path: &Path, shape: &[usize], v: &[f64]) {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let d = lightrnn_core::data::npy::encode(lightrnn_core::data::npy::Dtype::F64, shape, &bytes);
    std::fs::write(path, d).unwrap();
}

fn npy_f32(path: &Path, shape: &[usize], v: &[f32]) {
    std::fs::write(path, lightrnn_core::data::npy::encode_f32(shape, v)).unwrap();
}

/// `lightrnn allocate` over random finite tables whose values span 1e-30..1e300 (f64)
/// and 1e-30..3e38 (f32), with ties and zeros: every solver writes a permutation and
/// prints finite figures, or refuses tables too large to sum with the figure; never a
/// panic, never a null cost.
#[test]
fn allocate_solves_tables_of_any_magnitude_or_refuses_them_never_a_panic_or_a_null() {
    let tmp = tempfile::tempdir().unwrap();
    let mut x = 0x2545f4914f6cdd1du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut value = |hi: f64| match (next() * 10.0) as u32 {
        0 => 0.0,
        1 => 1.0,
        _ => 10f64.powf(-30.0 + (hi + 30.0) * next()),
    };
    let mut cases = Vec::new();
    for case in 0..8 {
        let (r, c) = (3 + case % 4, 2 + case % 5);
        let v = r * c - case % 3;
        let hi = if case % 4 == 3 { 308.2 } else { 300.0 };
        let lr: Vec<f64> = (0..v * r).map(|_| value(hi)).collect();
        let lc: Vec<f64> = (0..v * c).map(|_| value(hi)).collect();
        let (pr, pc) = (
            tmp.path().join(format!("r{case}.npy")),
            tmp.path().join(format!("c{case}.npy")),
        );
        if case % 2 == 0 {
            npy_f64(&pr, &[v, r], &lr);
            npy_f64(&pc, &[v, c], &lc);
        } else {
            let f = |t: &[f64]| -> Vec<f32> { t.iter().map(|&x| x.min(3e38) as f32).collect() };
            npy_f32(&pr, &[v, r], &f(&lr));
            npy_f32(&pc, &[v, c], &f(&lc));
        }
        cases.push((pr, pc, v));
    }
    let big = (tmp.path().join("big_r.npy"), tmp.path().join("big_c.npy"));
    npy_f64(&big.0, &[4, 2], &[1e308; 8]);
    npy_f64(&big.1, &[4, 2], &[1.0; 8]);
    cases.push((big.0, big.1, 4));
    let (mut solved, mut refused) = (0, 0);
    for (k, (pr, pc, v)) in cases.iter().enumerate() {
        for solver in ["exact", "scalable", "greedy"] {
            let out = tmp.path().join(format!("a{k}-{solver}.npy"));
            let (code, stdout, err) = lightrnn(&[
                "allocate",
                "--row-loss",
                pr.to_str().unwrap(),
                "--col-loss",
                pc.to_str().unwrap(),
                "--solver",
                solver,
                "--out",
                out.to_str().unwrap(),
            ]);
            assert!(!err.contains("panicked"), "{k} {solver}: {err}");
            if code == 1 {
                assert!(
                    err.contains("too large") && err.contains("overflow"),
                    "{k} {solver}: {err}"
                );
                assert!(!out.exists());
                refused += 1;
                continue;
            }
            assert_eq!(code, 0, "{k} {solver}: {err}");
            let j = json(&stdout);
            for f in ["cost", "lower_bound", "relaxation_bound"] {
                assert!(
                    j[f].as_f64().is_some_and(f64::is_finite),
                    "{k} {solver}: {f} in {stdout}"
                );
            }
            let a = lightrnn_core::data::npy::decode(std::fs::read(&out).unwrap().into(), "out")
                .unwrap();
            let mut cells = a.to_i64().unwrap();
            assert_eq!(cells.len(), *v);
            cells.sort();
            cells.dedup();
            assert_eq!(cells.len(), *v, "{k} {solver}: cells are not distinct");
            solved += 1;
        }
    }
    assert!(
        solved >= 18 && refused >= 3,
        "{solved} solved, {refused} refused"
    );
    // The output exists now: replacing it needs --force.
    let (pr, pc, _) = &cases[0];
    let out = tmp.path().join("a0-exact.npy");
    let base = [
        "allocate",
        "--row-loss",
        pr.to_str().unwrap(),
        "--col-loss",
        pc.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    let (code, _, err) = lightrnn(&base);
    assert_eq!(code, 1);
    assert!(err.contains("exists") && err.contains("--force"), "{err}");
    let mut forced = base.to_vec();
    forced.push("--force");
    let (code, _, err) = lightrnn(&forced);
    assert_eq!(code, 0, "{err}");
}

/// Oversized input is quoted in errors by at most ~200 characters: a huge value in a
/// configuration file, a long nested line, a huge `--set` value; typos get a
/// suggestion and type errors speak of the setting, not of Rust types.
#[test]
fn errors_quote_hostile_input_briefly_and_speak_of_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("text");
    corpus(&data, 200);
    let out = tmp.path().join("out");
    let run = |extra: &[&str]| {
        let mut a = vec![
            "train",
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        if !extra.contains(&"--config") {
            a.extend(["--preset", "tiny"]);
        }
        a.extend_from_slice(extra);
        lightrnn(&a)
    };
    let huge = tmp.path().join("huge.toml");
    std::fs::write(&huge, format!("optimizer = \"{}\"\n", "x".repeat(3 << 20))).unwrap();
    let nested = tmp.path().join("nested.toml");
    std::fs::write(&nested, format!("lr_schedule = {}\n", "[".repeat(40_000))).unwrap();
    let typed = tmp.path().join("typed.toml");
    std::fs::write(&typed, format!("batch = \"{}\"\n", "y".repeat(50_000))).unwrap();
    let long_set = format!("optimizer={}", "z".repeat(100_000));
    for (what, extra) in [
        ("huge value", vec!["--config", huge.to_str().unwrap()]),
        ("nested line", vec!["--config", nested.to_str().unwrap()]),
        ("typed value", vec!["--config", typed.to_str().unwrap()]),
        ("long --set", vec!["--set", long_set.as_str()]),
    ] {
        let (code, _, err) = run(&extra);
        assert_eq!(code, 1, "{what}: accepted");
        assert!(err.len() < 2000, "{what}: {} bytes of error", err.len());
        assert!(err.contains("configuration"), "{what}: {err}");
    }
    let (code, _, err) = run(&["--set", "batchh=3"]);
    assert_eq!(code, 1);
    assert!(err.contains("did you mean batch?"), "{err}");
    let (code, _, err) = run(&["--set", "batch=abc"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("batch must be a whole number") && !err.contains("usize"),
        "{err}"
    );
    // --data that is missing or a file is said so, once.
    for (path, says) in [
        (tmp.path().join("absent"), "does not exist"),
        (huge.clone(), "is a file"),
    ] {
        let (code, _, err) = lightrnn(&[
            "train",
            "--preset",
            "tiny",
            "--data",
            path.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 1);
        assert!(
            err.contains(says) && err.matches("error").count() == 1,
            "{err}"
        );
    }
}
