//! The `lightrnn` binary as users run it: exit codes, one JSON line on stdout, logs and
//! errors on stderr, no panics on bad input.

use std::path::Path;
use std::process::Command;

mod common;
use common::lightrnn;

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
            "does not exist",
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
        (
            vec![
                "train".into(),
                "--workers".into(),
                "2".into(),
                "--backend".into(),
                "cuda".into(),
                "--data".into(),
                "x".into(),
                "--out".into(),
                "y".into(),
            ],
            "CUDA",
        ),
        (
            vec![
                "train".into(),
                "--workers".into(),
                "0".into(),
                "--data".into(),
                "x".into(),
                "--out".into(),
                "y".into(),
            ],
            "one worker per GPU",
        ),
        (
            vec![
                "train".into(),
                "--workers".into(),
                "auto".into(),
                "--data".into(),
                "x".into(),
                "--out".into(),
                "y".into(),
            ],
            "one worker per GPU",
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

fn write_npy_f32(path: &Path, shape: &[usize], v: &[f32]) {
    std::fs::write(path, lightrnn_core::data::npy::encode_f32(shape, v)).unwrap();
}

#[test]
fn allocate_reads_npy_tables_and_writes_a_permutation() {
    let tmp = tempfile::tempdir().unwrap();
    let (v, side) = (90usize, 10usize);
    let mut x = 7u64;
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 40) as f32 / (1u64 << 24) as f32
    };
    let lr: Vec<f32> = (0..v * side)
        .map(|k| (1 + k / side % 3) as f32 * next() * 10.0)
        .collect();
    let lc: Vec<f32> = (0..v * side).map(|_| next() * 10.0).collect();
    let (r, c) = (tmp.path().join("r.npy"), tmp.path().join("c.npy"));
    write_npy_f32(&r, &[v, side], &lr);
    write_npy_f32(&c, &[v, side], &lc);
    let mut costs = Vec::new();
    for solver in ["greedy", "scalable", "exact"] {
        let out = tmp.path().join(format!("{solver}.npy"));
        let (code, stdout, err) = lightrnn(&[
            "allocate",
            "--row-loss",
            r.to_str().unwrap(),
            "--col-loss",
            c.to_str().unwrap(),
            "--solver",
            solver,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{solver}: {err}");
        let j: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        for k in [
            "solver",
            "cost",
            "lower_bound",
            "relaxation_bound",
            "seconds",
            "peak_rss_mib",
        ] {
            assert!(!j[k].is_null(), "{solver}: {k} missing in {stdout}");
        }
        assert!(j["cost"].as_f64().unwrap() >= j["relaxation_bound"].as_f64().unwrap());
        assert!(j["relaxation_bound"].as_f64().unwrap() >= j["lower_bound"].as_f64().unwrap());
        let a =
            lightrnn_core::data::npy::decode(std::fs::read(&out).unwrap().into(), "out").unwrap();
        let mut cells = a.to_i64().unwrap();
        assert_eq!(cells.len(), v);
        cells.sort();
        cells.dedup();
        assert_eq!(cells.len(), v, "{solver}: cells are not distinct");
        assert!(cells.iter().all(|&c| (0..100).contains(&c)));
        costs.push(j["cost"].as_f64().unwrap());
    }
    assert!(
        costs[2] <= costs[1] + 1e-6 && costs[1] <= costs[0] + 1e-6,
        "exact <= scalable <= greedy: {costs:?}"
    );
    // Bad tables: NaN, V > R*C, mismatched shapes.
    let mut bad = lr.clone();
    bad[17] = f32::NAN;
    let b = tmp.path().join("bad.npy");
    write_npy_f32(&b, &[v, side], &bad);
    let (code, _, err) = lightrnn(&[
        "allocate",
        "--row-loss",
        b.to_str().unwrap(),
        "--col-loss",
        c.to_str().unwrap(),
        "--out",
        tmp.path().join("never.npy").to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("not finite"), "{err}");
    let big = tmp.path().join("big.npy");
    write_npy_f32(&big, &[101, 10], &vec![1.0; 1010]);
    let (code, _, err) = lightrnn(&[
        "allocate",
        "--row-loss",
        big.to_str().unwrap(),
        "--col-loss",
        big.to_str().unwrap(),
        "--out",
        "x.npy",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("do not fit"), "{err}");
    let (code, _, err) = lightrnn(&[
        "allocate",
        "--row-loss",
        r.to_str().unwrap(),
        "--col-loss",
        big.to_str().unwrap(),
        "--out",
        "x.npy",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("same V"), "{err}");
}

#[test]
fn training_with_reallocation_tables_and_inspect() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    corpus(&data);
    let run = tmp.path().join("run");
    let (code, _, err) = lightrnn(&[
        "train",
        "--preset",
        "tiny",
        "--set",
        "epochs=3",
        "--set",
        "realloc_every=1",
        "--set",
        "realloc_rounds=1",
        "--set",
        "realloc_check=true",
        "--set",
        "realloc_solver=exact",
        "--data",
        data.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let re: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "realloc")
        .collect();
    assert_eq!(
        re.len(),
        1,
        "one reallocation (realloc_rounds = 1): {metrics}"
    );
    let r = &re[0];
    assert_eq!(r["epoch"], 1);
    assert!(
        r["objective_after"].as_f64().unwrap() <= r["objective_before"].as_f64().unwrap() + 1e-9
    );
    assert!(r["lower_bound"].as_f64().unwrap() <= r["objective_after"].as_f64().unwrap() + 1e-9);
    assert!(r["train_loss_after"].is_number(), "{r}");
    // Either words moved to a strictly better allocation, or the current one was kept.
    let moved = r["words_moved"].as_u64().unwrap();
    assert_eq!(r["kept_current"].as_bool().unwrap(), moved == 0, "{r}");
    if moved > 0 {
        assert!(
            r["objective_after"].as_f64().unwrap() < r["objective_before"].as_f64().unwrap(),
            "{r}"
        );
    }
    // The checkpoint carries the new allocation; tables and inspect read it.
    let out = tmp.path().join("tables");
    let (code, stdout, err) = lightrnn(&[
        "tables",
        "--checkpoint",
        run.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let t: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(t["words"].as_u64().unwrap() > 0);
    for f in ["L_r.npy", "L_c.npy", "counts.npy", "alloc.npy"] {
        assert!(out.join(f).exists(), "{f}");
    }
    // Sparse tables, built one range of words per pass, are the cut of the dense ones.
    let sparse = tmp.path().join("sparse");
    let (code, stdout, err) = lightrnn(&[
        "tables",
        "--checkpoint",
        run.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        sparse.to_str().unwrap(),
        "--sparse",
        "3",
        "--max-table-gib",
        "0.0000002",
    ]);
    assert_eq!(code, 0, "{err}");
    let st: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(st["passes"].as_u64().unwrap() > 1, "{st}");
    assert_eq!(st["words"], t["words"]);
    assert!((st["loss"].as_f64().unwrap() - t["loss"].as_f64().unwrap()).abs() < 1e-9);
    let read = |d: &Path, f: &str| {
        lightrnn_core::data::npy::decode(std::fs::read(d.join(f)).unwrap().into(), f).unwrap()
    };
    let lr = read(&out, "L_r.npy");
    let (v, r) = (lr.shape[0], lr.shape[1]);
    let (lr, rows, row_loss, row_sum) = (
        lr.to_f32(),
        read(&sparse, "rows.npy").to_i64().unwrap(),
        read(&sparse, "row_loss.npy").to_f32(),
        read(&sparse, "row_sum.npy").to_f64(),
    );
    for w in 0..v {
        let mut e: Vec<(f32, usize)> = (0..r).map(|i| (lr[w * r + i], i)).collect();
        e.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let want: Vec<i64> = e[..3].iter().map(|x| x.1 as i64).collect();
        assert_eq!(rows[w * 3..w * 3 + 3], want[..], "word {w}");
        assert_eq!(row_loss[w * 3], e[0].0, "word {w}");
        let sum: f64 = lr[w * r..(w + 1) * r].iter().map(|&x| x as f64).sum();
        assert!(
            (row_sum[w] - sum).abs() <= 1e-9 * sum.abs().max(1.0),
            "word {w}"
        );
    }
    assert_eq!(
        std::fs::read(sparse.join("counts.npy")).unwrap(),
        std::fs::read(out.join("counts.npy")).unwrap()
    );
    // `allocate` reads both directories; the lower bound (each word's best cell) is the same.
    let mut lower = Vec::new();
    for d in [&out, &sparse] {
        let (code, stdout, err) = lightrnn(&[
            "allocate",
            "--tables",
            d.to_str().unwrap(),
            "--solver",
            "exact",
            "--out",
            d.join("new.npy").to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{err}");
        let a: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        lower.push(a["lower_bound"].as_f64().unwrap());
    }
    assert!((lower[0] - lower[1]).abs() <= 1e-5 * lower[0], "{lower:?}");
    let (code, stdout, err) = lightrnn(&[
        "inspect",
        "--checkpoint",
        run.to_str().unwrap(),
        "--rows",
        "3",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        stdout.contains("row") && stdout.contains("1 reallocation"),
        "{stdout}"
    );
    assert_eq!(stdout.lines().count(), 4, "{stdout}");
}

/// `vocab` and `shard` build a dataset that `train` opens directly, with the same
/// token counts as tokenising the text inside `train`.
#[test]
fn vocab_and_shard_make_a_dataset_train_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    corpus(&data);
    let ds = tmp.path().join("ds");
    let ds_s = ds.to_str().unwrap();
    let (code, out, err) = lightrnn(&[
        "vocab",
        "--input",
        data.join("c.train.txt").to_str().unwrap(),
        "--out",
        ds_s,
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["inputs"], 1);
    assert_eq!(v["lines"], 1000);
    assert!(v["mb_per_sec"].as_f64().unwrap() > 0.0);
    for split in ["train", "valid", "test"] {
        let input = data.join(format!("c.{split}.txt"));
        let (code, out, err) = lightrnn(&[
            "shard",
            "--input",
            input.to_str().unwrap(),
            "--vocab",
            &format!("{ds_s}/vocab.txt"),
            "--out",
            ds_s,
            "--split",
            split,
        ]);
        assert_eq!(code, 0, "{err}");
        let s: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(s["split"], split);
        assert!(s["tokens"].as_u64().unwrap() > 0);
    }
    // The vocabulary may also be given as the location holding vocab.txt.
    let (code, _, err) = lightrnn(&[
        "shard",
        "--input",
        data.join("c.valid.txt").to_str().unwrap(),
        "--vocab",
        ds_s,
        "--out",
        ds_s,
        "--split",
        "valid",
    ]);
    assert_eq!(code, 0, "{err}");
    let run = tmp.path().join("run");
    let (code, out, err) = lightrnn(&[
        "train",
        "--preset",
        "tiny",
        "--set",
        "max_steps=5",
        "--data",
        ds_s,
        "--out",
        run.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let a: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let run2 = tmp.path().join("run2");
    let (code, out, err) = lightrnn(&[
        "train",
        "--preset",
        "tiny",
        "--set",
        "max_steps=5",
        "--data",
        data.to_str().unwrap(),
        "--out",
        run2.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let b: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(a["train_loss"], b["train_loss"], "same data, same run");
    // Missing inputs are a clear error, not a panic.
    let (code, _, err) = lightrnn(&[
        "vocab",
        "--input",
        tmp.path().join("nope").to_str().unwrap(),
        "--out",
        ds_s,
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("nope") && !err.contains("panicked"), "{err}");
}

/// The Python interpreter with numpy and safetensors (scripts/test.sh installs them).
fn python() -> String {
    std::env::var("LIGHTRNN_TEST_PYTHON").unwrap_or_else(|_| {
        panic!(
            "this test needs Python with numpy and safetensors: run scripts/test.sh (it \
             installs them), or set LIGHTRNN_TEST_PYTHON=/path/to/python"
        )
    })
}

/// `lightrnn export` writes what other tools read: the documented numpy scorer
/// (scripts/lightrnn_score.py, safetensors + numpy) gives the loss `lightrnn eval` gives,
/// and vectors.txt is word2vec text holding each word's row vector joined to its column
/// vector.
#[test]
fn export_round_trips_through_python_and_word2vec_text() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    corpus(&data);
    let run = tmp.path().join("run");
    let (code, _, err) = lightrnn(&[
        "train",
        "--preset",
        "tiny",
        "--set",
        "epochs=2",
        "--data",
        data.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let out = tmp.path().join("export");
    let (code, stdout, err) = lightrnn(&[
        "export",
        "--checkpoint",
        run.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--word-vectors",
    ]);
    assert_eq!(code, 0, "{err}");
    let rep: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(rep["files"].as_array().unwrap().len(), 5, "{rep}");
    // Sampling from the same run: top-1 is greedy, whatever the seed.
    let greedy = |seed: &str, json: bool| {
        let mut args = vec![
            "sample",
            "--checkpoint",
            run.to_str().unwrap(),
            "--prompt",
            "one two",
            "--words",
            "12",
            "--top-k",
            "1",
            "--seed",
            seed,
        ];
        if json {
            args.push("--json");
        }
        let (code, out, err) = lightrnn(&args);
        assert_eq!(code, 0, "{err}");
        if !json {
            // The streamed text, then the line break that ends every output.
            return out.strip_suffix('\n').unwrap().to_string();
        }
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        v["text"].as_str().unwrap().to_string()
    };
    let g = greedy("1", true);
    assert_eq!(g, greedy("2", true));
    assert_eq!(g, greedy("3", false), "the streamed text is the JSON's");
    assert!(g.split_whitespace().count() >= 6, "{g:?}");
    // Pictures of the same run: curves from its metrics, its allocation.
    let (curves, alloc) = (tmp.path().join("c.png"), tmp.path().join("a.png"));
    let (code, stdout, err) = lightrnn(&[
        "plot",
        "--metrics",
        run.to_str().unwrap(),
        "--out",
        curves.to_str().unwrap(),
        "--checkpoint",
        run.to_str().unwrap(),
        "--allocation-out",
        alloc.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let rep: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(rep["train_points"].as_u64().unwrap() > 0, "{rep}");
    for p in [&curves, &alloc] {
        let png = std::fs::read(p).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert!(png.len() > 2000, "{} bytes", png.len());
    }
    let (code, _, err) = lightrnn(&["plot", "--metrics", data.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("metrics.jsonl"), "{err}");
    let text = data.join("c.test.txt");
    let (code, stdout, err) = lightrnn(&[
        "eval",
        "--checkpoint",
        run.to_str().unwrap(),
        "--data",
        text.to_str().unwrap(),
        "--batch",
        "1",
    ]);
    assert_eq!(code, 0, "{err}");
    let ours: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/lightrnn_score.py");
    let py = Command::new(python())
        .arg(&script)
        .arg(&out)
        .arg(&text)
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    let theirs: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&py.stdout).trim()).unwrap();
    assert_eq!(ours["words"], theirs["words"]);
    let (a, b) = (
        ours["loss"].as_f64().unwrap(),
        theirs["loss"].as_f64().unwrap(),
    );
    assert!((a - b).abs() <= 1e-6 * a, "lightrnn {a} vs numpy {b}");

    // word2vec text: "V DIM", then one word and DIM numbers per line; the vector is the
    // word's row vector joined to its column vector (read back through Python here too).
    let vectors = std::fs::read_to_string(out.join("vectors.txt")).unwrap();
    let mut lines = vectors.lines();
    let head: Vec<usize> = lines
        .next()
        .unwrap()
        .split(' ')
        .map(|x| x.parse().unwrap())
        .collect();
    let vocab = std::fs::read_to_string(out.join("vocab.txt")).unwrap();
    assert_eq!(head[0], vocab.lines().count());
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), head[0]);
    for r in &rows {
        assert_eq!(r.split(' ').count(), head[1] + 1, "{r}");
    }
    let check = r#"
import sys, numpy as np
from safetensors.numpy import load_file
d = sys.argv[1]
t = load_file(d + "/model.safetensors")
lines = open(d + "/vectors.txt", encoding="utf-8").read().split("\n")[1:-1]
n = t["emb_r.weight"].shape[1]
for w, line in enumerate(lines):
    v = np.array([float(x) for x in line.split(" ")[1:]], dtype=np.float32)
    want = np.concatenate([t["emb_r.weight"][t["row"][w]], t["emb_c.weight"][t["col"][w]]])
    assert v.shape == (2 * n,) and np.array_equal(v, want), w
print(len(lines))
"#;
    let py = Command::new(python())
        .args(["-c", check])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&py.stdout).trim(),
        head[0].to_string()
    );
}
