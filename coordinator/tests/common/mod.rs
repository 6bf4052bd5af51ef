//! Helpers the binary-level tests share: run `lightrnn`, a structured corpus, a JSON
//! line.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// Run the binary; (exit code, stdout, stderr).
pub fn lightrnn(args: &[&str]) -> (i32, String, String) {
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
pub fn corpus(dir: &Path, lines: usize) {
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

pub fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}
