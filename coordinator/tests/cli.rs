//! The `lightrnn` binary as users run it: exit codes, one JSON line on stdout, logs and
//! errors on stderr, no panics on bad input.

use std::path::Path;
use std::process::Command;

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

/// A small corpus: counting sentences ("one two three ...") starting at random places.
fn corpus(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let words = [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    ];
    let mut x = 12345u64;
    let mut lines = Vec::new();
    for _ in 0..1200 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let start = (x >> 33) as usize % 10;
        let len = 3 + (x >> 40) as usize % 6;
        lines.push(
            (0..len)
                .map(|k| words[(start + k) % 10])
                .collect::<Vec<_>>()
                .join(" "),
        );
    }
    for (name, part) in [
        ("c.train.txt", &lines[..1000]),
        ("c.valid.txt", &lines[1000..1100]),
        ("c.test.txt", &lines[1100..]),
    ] {
        std::fs::write(dir.join(name), part.join("\n") + "\n").unwrap();
    }
}

#[test]
fn train_eval_bench_print_one_json_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    corpus(&data);
    let run = tmp.path().join("run");
    let (code, out, err) = lightrnn(&[
        "train",
        "--preset",
        "tiny",
        "--set",
        "max_steps=40",
        "--set",
        "log_every=10",
        "--data",
        data.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "stderr: {err}");
    assert_eq!(out.lines().count(), 1, "stdout: {out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for k in [
        "train_loss",
        "valid_ppl",
        "test_ppl",
        "words_per_sec",
        "params",
        "seconds",
    ] {
        assert!(v[k].is_number(), "{k} missing: {out}");
    }
    assert!(
        err.contains("train") && err.contains("step=10"),
        "no progress lines on stderr: {err}"
    );
    assert!(
        !err.contains('\u{1b}'),
        "colour codes in a non-terminal log"
    );

    let test = data.join("c.test.txt");
    let (code, out, err) = lightrnn(&[
        "eval",
        "--checkpoint",
        run.to_str().unwrap(),
        "--data",
        test.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "stderr: {err}");
    let e: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(e["ppl"].as_f64().unwrap() > 1.0 && e["words"].as_u64().unwrap() > 0);

    let (code, out, err) = lightrnn(&[
        "bench",
        "--vocab",
        "1000",
        "--emb",
        "8",
        "--hidden",
        "8",
        "--batch",
        "2",
        "--bptt",
        "3",
        "--steps",
        "2",
        "--threads",
        "1",
    ]);
    assert_eq!(code, 0, "stderr: {err}");
    let b: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(b["words_per_sec"].is_number() && b["peak_rss_mib"].is_number());
}

#[test]
fn bad_input_fails_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "train".into(),
                "--data".into(),
                tmp.path().join("missing").display().to_string(),
                "--out".into(),
                tmp.path().join("o1").display().to_string(),
            ],
            "*train*",
        ),
        (
            vec![
                "train".into(),
                "--set".into(),
                "hidden=0".into(),
                "--data".into(),
                "x".into(),
                "--out".into(),
                "y".into(),
            ],
            "hidden",
        ),
        (
            vec![
                "eval".into(),
                "--checkpoint".into(),
                tmp.path().display().to_string(),
                "--data".into(),
                "x.txt".into(),
            ],
            "checkpoint",
        ),
        (
            vec![
                "train".into(),
                "--backend".into(),
                "cuda".into(),
                "--data".into(),
                "x".into(),
                "--out".into(),
                "y".into(),
            ],
            "CUDA",
        ),
    ];
    for (args, needle) in cases {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out, err) = lightrnn(&refs);
        assert_eq!(code, 1, "{args:?}: stdout {out} stderr {err}");
        assert!(
            err.contains("error:") && err.contains(needle),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(out.is_empty());
    }
    // An empty training file.
    let data = tmp.path().join("empty");
    std::fs::create_dir_all(&data).unwrap();
    for f in ["e.train.txt", "e.valid.txt", "e.test.txt"] {
        std::fs::write(data.join(f), if f.contains("train") { "" } else { "a b\n" }).unwrap();
    }
    let (code, _, err) = lightrnn(&[
        "train",
        "--data",
        data.to_str().unwrap(),
        "--out",
        tmp.path().join("o2").to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("e.train.txt is empty"), "{err}");
}
