//! The whole single-machine trainer, in process: text -> shards -> training ->
//! checkpoints -> resume -> evaluation, on local directories and memory:// stores.

use lightrnn_coordinator::cli::{Cli, run};
use lightrnn_core::data::store::Location;
use lightrnn_core::{checkpoint, config::TrainConfig};
use lightrnn_tests::{runtime, write_corpus};
use lightrnn_worker::train::{RunOptions, train};

use clap::Parser;
use serde_json::Value;

fn cli(args: &[&str], rt: &tokio::runtime::Runtime) -> Result<Value, String> {
    let mut all = vec!["lightrnn"];
    all.extend_from_slice(args);
    let c = Cli::try_parse_from(all).map_err(|e| e.to_string())?;
    let out = run(&c, rt.handle(), &Default::default()).map_err(|e| format!("{e:#}"))?;
    serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))
}

fn metrics(dir: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Perplexity of the validation text under the training text's unigram distribution
/// (add-one smoothing, <eos> per line counted as a word).
fn unigram_ppl(data: &std::path::Path) -> f64 {
    let words = |f: &str| -> Vec<String> {
        std::fs::read_to_string(data.join(f))
            .unwrap()
            .lines()
            .flat_map(|l| {
                l.split_whitespace()
                    .map(String::from)
                    .chain(["<eos>".to_string()])
            })
            .collect()
    };
    let mut counts = std::collections::HashMap::new();
    let train = words("x.train.txt");
    for w in &train {
        *counts.entry(w.clone()).or_insert(0f64) += 1.0;
    }
    let (n, v) = (train.len() as f64, counts.len() as f64 + 1.0);
    let valid = words("x.valid.txt");
    let nll: f64 = valid
        .iter()
        .map(|w| -((counts.get(w).copied().unwrap_or(0.0) + 1.0) / (n + v)).ln())
        .sum();
    (nll / valid.len() as f64).exp()
}

#[test]
fn trains_learns_checkpoints_and_evaluates() {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let (data, out) = (tmp.path().join("data"), tmp.path().join("run"));
    write_corpus(&data, 1, 3000);
    let (d, o) = (data.to_str().unwrap(), out.to_str().unwrap());
    let s = cli(
        &[
            "train",
            "--preset",
            "tiny",
            "--set",
            "epochs=2",
            "--set",
            "log_every=20",
            "--data",
            d,
            "--out",
            o,
        ],
        &rt,
    )
    .unwrap();
    for k in [
        "train_loss",
        "valid_ppl",
        "test_ppl",
        "words_per_sec",
        "params",
        "seconds",
    ] {
        assert!(
            s[k].as_f64().is_some_and(|v| v.is_finite() && v > 0.0),
            "{k} missing in {s}"
        );
    }
    let summary: Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["test_ppl"], s["test_ppl"]);
    assert_eq!(summary["history"].as_array().unwrap().len(), 2);
    // It learned: well below the unigram perplexity of the validation text.
    let uni = unigram_ppl(&data);
    let vp = s["valid_ppl"].as_f64().unwrap();
    assert!(vp < 0.7 * uni, "valid ppl {vp}, unigram {uni}");
    // Metrics: train lines carry the documented fields; one validation line per epoch.
    let m = metrics(&out);
    let train_lines: Vec<_> = m.iter().filter(|v| v["kind"] == "train").collect();
    assert!(!train_lines.is_empty());
    for k in ["step", "epoch", "loss", "ppl", "words_per_sec", "lr"] {
        assert!(train_lines[0].get(k).is_some(), "metrics line lacks {k}");
    }
    assert_eq!(m.iter().filter(|v| v["kind"] == "valid").count(), 2);
    // Checkpoints: the run directory resolves to its newest one; eval reproduces test ppl.
    let test_file = data.join("x.test.txt");
    let e = cli(
        &[
            "eval",
            "--checkpoint",
            o,
            "--data",
            test_file.to_str().unwrap(),
        ],
        &rt,
    )
    .unwrap();
    let best = out.join("best");
    let e_best = cli(
        &[
            "eval",
            "--checkpoint",
            best.to_str().unwrap(),
            "--data",
            test_file.to_str().unwrap(),
        ],
        &rt,
    )
    .unwrap();
    let rel = |a: &Value, b: &Value| (a.as_f64().unwrap() / b.as_f64().unwrap() - 1.0).abs();
    assert!(
        rel(&e_best["ppl"], &s["test_ppl"]) < 1e-9,
        "{e_best} vs {s}"
    );
    assert!(e["words"].as_u64().unwrap() > 0 && e["ppl"].as_f64().unwrap() > 1.0);
    // The same command again refuses to overwrite the run.
    let err = cli(&["train", "--preset", "tiny", "--data", d, "--out", o], &rt).unwrap_err();
    assert!(err.contains("--resume"), "{err}");
}

/// Stopping at max_steps and resuming gives exactly the per-step losses of one run, across
/// a word reallocation between the epochs.
#[test]
fn stop_and_resume_reproduces_the_uninterrupted_run() {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_corpus(&data, 2, 1500);
    let d = data.to_str().unwrap();
    let common = [
        "--preset",
        "tiny",
        "--set",
        "epochs=2",
        "--set",
        "log_every=1",
        "--set",
        "dropout=0.3",
        "--set",
        "optimizer=adam",
        "--set",
        "lr=0.01",
        "--set",
        "realloc_every=1",
        "--set",
        "realloc_solver=exact",
    ];
    let straight = tmp.path().join("straight");
    let mut args: Vec<&str> = vec!["train"];
    args.extend(common);
    args.extend(["--data", d, "--out", straight.to_str().unwrap()]);
    let s1 = cli(&args, &rt).unwrap();
    let steps = s1["steps"].as_u64().unwrap();
    // The interrupted run: stop inside epoch 1, resume, stop inside epoch 2, resume.
    let split = tmp.path().join("split");
    for (limit, resume) in [(steps / 3, false), (steps * 2 / 3, true), (0, true)] {
        let mut a: Vec<String> = vec!["train".into()];
        a.extend(common.iter().map(|s| s.to_string()));
        a.extend([
            "--set".into(),
            format!("max_steps={limit}"),
            "--data".into(),
            d.into(),
        ]);
        a.extend(["--out".into(), split.to_str().unwrap().into()]);
        if resume {
            a.push("--resume".into());
        }
        let refs: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
        cli(&refs, &rt).unwrap();
    }
    let loss_by_step = |dir: &std::path::Path| -> Vec<(u64, String)> {
        metrics(dir)
            .iter()
            .filter(|v| v["kind"] == "train")
            .map(|v| (v["step"].as_u64().unwrap(), v["loss"].to_string()))
            .collect()
    };
    let (a, b) = (loss_by_step(&straight), loss_by_step(&split));
    assert_eq!(a.len() as u64, steps);
    assert_eq!(a, b, "per-step losses differ after stop/resume");
    let realloc = |dir: &std::path::Path| -> Vec<Value> {
        metrics(dir)
            .into_iter()
            .filter(|v| v["kind"] == "realloc")
            .collect()
    };
    let (ra, rb) = (realloc(&straight), realloc(&split));
    assert_eq!(ra.len(), 1);
    assert_eq!(ra[0]["words_moved"], rb[0]["words_moved"]);
    assert_eq!(ra[0]["objective_after"], rb[0]["objective_after"]);
    let sa: Value =
        serde_json::from_slice(&std::fs::read(straight.join("summary.json")).unwrap()).unwrap();
    let sb: Value =
        serde_json::from_slice(&std::fs::read(split.join("summary.json")).unwrap()).unwrap();
    assert_eq!(sa["test_ppl"], sb["test_ppl"]);
    let without_time = |h: &Value| -> Vec<Value> {
        h.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let mut r = r.clone();
                r.as_object_mut().unwrap().remove("seconds");
                r
            })
            .collect()
    };
    assert_eq!(without_time(&sa["history"]), without_time(&sb["history"]));
}

/// A round on sparse tables with every entry a candidate, built in many passes over
/// ranges of words, is the dense round: the same allocation, so the same run after it.
/// With few candidates the round still runs, and reports the interval of its cost.
#[test]
fn sparse_reallocation_with_every_entry_a_candidate_is_the_dense_one() {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_corpus(&data, 2, 1500);
    let d = data.to_str().unwrap();
    let run = |name: &str, extra: &[&str]| -> (Value, Vec<Value>) {
        let out = tmp.path().join(name);
        let mut a = vec![
            "train",
            "--preset",
            "tiny",
            "--set",
            "epochs=2",
            "--set",
            "log_every=1",
            "--set",
            "realloc_every=1",
            "--set",
            "realloc_move_cost=0.002",
            "--data",
            d,
            "--out",
            out.to_str().unwrap(),
        ];
        for e in extra {
            a.extend(["--set", e]);
        }
        let s = cli(&a, &rt).unwrap();
        (s, metrics(&out))
    };
    let (dense, md) = run("dense", &[]);
    // k = 45 keeps every entry of tables up to 45 x 45; 6e-7 GiB is a few words per pass.
    let (sparse, ms) = run(
        "sparse",
        &["realloc_sparse=45", "realloc_max_table_gib=0.0000006"],
    );
    let of = |m: &[Value], kind: &str| -> Vec<Value> {
        m.iter().filter(|v| v["kind"] == kind).cloned().collect()
    };
    let (rd, rs) = (of(&md, "realloc"), of(&ms, "realloc"));
    assert_eq!((rd.len(), rs.len()), (1, 1));
    assert!(rd[0]["words_moved"].as_u64().unwrap() > 0, "{}", rd[0]);
    assert_eq!(rd[0]["words_moved"], rs[0]["words_moved"]);
    assert_eq!(rd[0]["kept_current"], rs[0]["kept_current"]);
    for k in [
        "objective_before",
        "objective_after",
        "lower_bound",
        "train_loss_before",
    ] {
        let (a, b) = (rd[0][k].as_f64().unwrap(), rs[0][k].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-9 * a.abs(), "{k}: {a} vs {b}");
    }
    let losses = |m: &[Value]| -> Vec<String> {
        of(m, "train")
            .iter()
            .map(|v| v["loss"].to_string())
            .collect()
    };
    assert_eq!(losses(&md), losses(&ms));
    assert_eq!(dense["test_ppl"], sparse["test_ppl"]);
    // Three candidates: the round runs; its cost is an estimate within its interval.
    let (few, mf) = run("few", &["realloc_sparse=3", "realloc_max_table_gib=0.0001"]);
    let r = &of(&mf, "realloc")[0];
    let (lo, hi, after) = (
        r["stats"]["objective_after_min"].as_f64().unwrap(),
        r["stats"]["objective_after_max"].as_f64().unwrap(),
        r["objective_after"].as_f64().unwrap(),
    );
    assert!(lo <= after && after <= hi, "{r}");
    assert!(r["lower_bound"].as_f64().unwrap() <= lo, "{r}");
    // The figures of the current allocation are exact on sparse tables too.
    let (a, b) = (
        r["objective_before"].as_f64().unwrap(),
        rd[0]["objective_before"].as_f64().unwrap(),
    );
    assert!((a - b).abs() <= 1e-9 * b, "{a} vs {b}");
    assert!(few["test_ppl"].as_f64().unwrap().is_finite());
}

#[test]
fn memory_store_run_and_bad_text() {
    let rt = runtime();
    let data = Location::parse("memory://train-tests/data").unwrap();
    let lines = lightrnn_tests::corpus_lines(3, 600, 8, 10);
    lightrnn_tests::put_corpus(&rt, &data, "a", &lines);
    let text = lines.join("\n") + "\n";
    let cfg = TrainConfig::preset("tiny")
        .unwrap()
        .with_overrides(&[
            "max_steps=30".into(),
            "optimizer=adagrad".into(),
            "lr=0.1".into(),
        ])
        .unwrap();
    let out = Location::parse("memory://train-tests/run").unwrap();
    let opts = RunOptions {
        data: data.clone(),
        out: out.clone(),
        resume: false,
        checkpoint: None,
        backend: lightrnn_kernels::BackendKind::Cpu,
        progress: false,
        stop: None,
        report: None,
        open: None,
    };
    let handle = rt.handle().clone();
    let s = std::thread::spawn(move || train(&cfg, &opts, &handle))
        .join()
        .unwrap()
        .unwrap();
    assert_eq!(s.steps, 30);
    assert_eq!(s.stopped_by, lightrnn_core::report::StoppedBy::MaxSteps);
    assert!(s.train_loss.is_finite() && s.valid_ppl.is_finite());
    let ck = rt.block_on(checkpoint::resolve(&out)).unwrap();
    assert_eq!(ck.meta.step, 30);
    let opt = ck.optimizer.expect("Adagrad state is checkpointed");
    assert_eq!(opt.updates, 30);
    assert_eq!(opt.buffers[0].0, "sum");
    // Invalid UTF-8 in the validation text: the error names the object and the line.
    let bad = Location::parse("memory://train-tests/bad").unwrap();
    rt.block_on(async {
        bad.put("a.train.txt", bytes::Bytes::from(text.clone()))
            .await
            .unwrap();
        bad.put(
            "a.valid.txt",
            bytes::Bytes::from_static(b"ok line\nbad \xc3\x28 line\n"),
        )
        .await
        .unwrap();
        bad.put("a.test.txt", bytes::Bytes::from(text.clone()))
            .await
            .unwrap();
    });
    let e = cli(
        &[
            "train",
            "--preset",
            "tiny",
            "--data",
            "memory://train-tests/bad",
            "--out",
            "memory://train-tests/badrun",
        ],
        &rt,
    )
    .unwrap_err();
    assert!(
        e.contains("a.valid.txt line 2") && e.contains("UTF-8"),
        "{e}"
    );
}

#[test]
fn bench_and_config_commands() {
    let rt = runtime();
    let b = cli(
        &[
            "bench",
            "--vocab",
            "5000",
            "--emb",
            "16",
            "--hidden",
            "16",
            "--batch",
            "4",
            "--bptt",
            "5",
            "--steps",
            "3",
            "--threads",
            "1",
        ],
        &rt,
    )
    .unwrap();
    assert!(b["words_per_sec"].as_f64().unwrap() > 0.0);
    assert!(b["peak_rss_mib"].as_f64().unwrap() > 0.0);
    assert!(b["loss_last"].as_f64().unwrap().is_finite());
    let mut all = vec![
        "lightrnn",
        "config",
        "--preset",
        "ptb-small",
        "--set",
        "epochs=9",
    ];
    let c = Cli::try_parse_from(all.drain(..)).unwrap();
    let text = run(&c, rt.handle(), &Default::default()).unwrap();
    let cfg = TrainConfig::from_toml(&text, "printed").unwrap();
    assert_eq!((cfg.epochs, cfg.hidden), (9, 200));
    assert!(
        cli(
            &["train", "--preset", "nope", "--data", "x", "--out", "y"],
            &rt
        )
        .unwrap_err()
        .contains("ptb-small")
    );
}

/// Every object of a run directory but the tokenised-data cache, with its bytes.
fn run_files(dir: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            if rel.starts_with("data") {
                continue;
            }
            if p.is_dir() {
                todo.push(p);
            } else {
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// Re-running a finished run with `--resume` (what the deploy templates do) trains
/// nothing: it prints the run's summary and leaves every object as it was, whether the
/// run ended at max_steps inside an epoch or after its last epoch (through the coordinator:
/// coordinator/tests/distributed.rs).
#[test]
fn resuming_a_finished_run_reports_it_without_training() {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_corpus(&data, 4, 600);
    let d = data.to_str().unwrap();
    for (name, limit) in [("steps", "max_steps=30"), ("epochs", "epochs=1")] {
        let out = tmp.path().join(name);
        let o = out.to_str().unwrap();
        let mut args = vec![
            "train",
            "--preset",
            "tiny",
            "--set",
            limit,
            "--set",
            "log_every=10",
            "--data",
            d,
            "--out",
            o,
        ];
        let first = cli(&args, &rt).unwrap();
        let before = run_files(&out);
        args.push("--resume");
        let again = cli(&args, &rt).unwrap();
        for k in [
            "steps",
            "test_ppl",
            "valid_ppl",
            "train_loss",
            "stopped_by",
            "epochs_completed",
        ] {
            assert_eq!(again[k], first[k], "{name}: {k}: {again} vs {first}");
        }
        let after = run_files(&out);
        assert_eq!(
            before.keys().collect::<Vec<_>>(),
            after.keys().collect::<Vec<_>>(),
            "{name}: objects added or removed"
        );
        for (k, v) in &before {
            assert!(after[k] == *v, "{name}: {k} changed");
        }
    }
}

/// The epoch-end checkpoint is committed before the epoch's reallocation round, marked
/// as having the round pending: a run that dies in the round (out of memory, a solver
/// error, a lost rank) resumes from it, runs the round first and ends exactly where the
/// run without the failure did, with the round recorded once.
#[test]
fn a_run_that_dies_in_its_reallocation_round_resumes_from_the_epoch_and_redoes_it() {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_corpus(&data, 8, 600);
    let sets = ["epochs=3", "realloc_every=1", "realloc_rounds=1"];
    let d = die_in_round_and_resume(&rt, tmp.path(), &data, &sets, 1);
    assert_eq!(d.pending_meta["reallocations"], 0);
    let rounds = |d: &std::path::Path| metrics(d).iter().filter(|v| v["kind"] == "realloc").count();
    assert_eq!(rounds(&d.clean_dir), 1);
    assert_eq!(rounds(&d.died), 1, "the round is recorded once");
}

/// `realloc_every = "auto"`: a round is considered after every epoch but the last, each
/// `realloc` line says what the rule decided and from which figures (the first round
/// moves freely; later ones price their words with the measured disruption), the summary
/// holds the same decisions, and a run that dies in its second round resumes with the
/// rule's state from the checkpoint and ends as the run that did not die.
#[test]
fn automatic_reallocation_records_its_decisions_and_resumes_as_one_run() {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_corpus(&data, 8, 600);
    // The rule counts a move's gain at the schedule's lower rates.
    let sets = [
        "epochs=5",
        "lr_schedule=[10, 10, 10, 2.5, 2.5]",
        "realloc_every=auto",
    ];
    let d = die_in_round_and_resume(&rt, tmp.path(), &data, &sets, 2);
    let lines: Vec<Value> = metrics(&d.clean_dir)
        .into_iter()
        .filter(|v| v["kind"] == "realloc")
        .collect();
    assert_eq!(lines.len(), 4, "epochs 1-4 (none after the last)");
    for (e, l) in lines.iter().enumerate() {
        let a = &l["auto"];
        assert_eq!(a["epoch"], e as u64 + 1, "{l}");
        let verdict = a["decision"].as_str().unwrap();
        assert!(["move", "keep", "undo", "skip"].contains(&verdict), "{l}");
        assert!(!a["why"].as_str().unwrap().is_empty(), "{l}");
        if verdict == "move" {
            assert!(l["words_moved"].as_u64().unwrap() > 0, "{l}");
        }
        if verdict != "skip" {
            // A round measured both sides of the rule.
            assert!(
                a["predicted_gain"].is_f64() && a["disruption"].is_f64(),
                "{l}"
            );
            assert!(l["train_loss_after"].is_f64(), "{l}");
        }
    }
    let first = &lines[0]["auto"];
    assert_ne!(first["decision"], "skip", "the first round runs: {first}");
    assert_eq!(first["move_cost"], 0.0, "the first round's moves are free");
    let summary: Value =
        serde_json::from_slice(&std::fs::read(d.clean_dir.join("summary.json")).unwrap()).unwrap();
    let decisions = summary["auto_realloc"]["decisions"].as_array().unwrap();
    let verdicts = |v: Vec<&Value>| v.iter().map(|x| x["decision"].clone()).collect::<Vec<_>>();
    assert_eq!(
        verdicts(decisions.iter().collect()),
        verdicts(lines.iter().map(|l| &l["auto"]).collect())
    );
    // The checkpoint the second round was pending in carries the first round's decision.
    let pending = &d.pending_meta["auto_realloc"]["decisions"];
    assert_eq!(pending.as_array().unwrap().len(), 1, "{}", d.pending_meta);
    assert_eq!(pending[0], decisions[0]);
    let resumed: Vec<Value> = metrics(&d.died)
        .into_iter()
        .filter(|v| v["kind"] == "realloc")
        .collect();
    // The same decisions from the same figures (the lines' timings aside).
    let figures = |l: &Value| {
        (
            l["auto"].clone(),
            l["words_moved"].clone(),
            l["objective_after"].clone(),
        )
    };
    assert_eq!(
        resumed.iter().map(figures).collect::<Vec<_>>(),
        lines.iter().map(figures).collect::<Vec<_>>(),
        "the resumed run decides as the one that did not die"
    );
}

/// The guard: a move kept after epoch 3 whose validation loss cannot recover (the
/// schedule all but stops training after it) is undone after epoch 5, twice the
/// expected recovery; the model and the allocation go back to epoch 3's, no round runs
/// after it, and a run that died in the move's round decides the same after resuming.
#[test]
fn the_guard_undoes_a_move_that_does_not_recover_and_resumes_as_one_run() {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_corpus(&data, 8, 600);
    // Rounds from epoch 3, when the model fits its allocation (a move costs more than
    // it gains at once); then the rate falls 10^5-fold: the moved model hardly trains,
    // yet the schedule's lower rates ahead are where a move's gain would show.
    let sets = [
        "epochs=7",
        "lr_schedule=[10, 10, 10, 1e-4, 1e-5, 1e-5, 1e-5]",
        "realloc_every=auto",
        "realloc_start=3",
        "realloc_carry=none",
    ];
    let d = die_in_round_and_resume(&rt, tmp.path(), &data, &sets, 3);
    let lines: Vec<Value> = metrics(&d.clean_dir)
        .into_iter()
        .filter(|v| v["kind"] == "realloc")
        .collect();
    let seen: Vec<(u64, String)> = lines
        .iter()
        .map(|l| {
            let a = &l["auto"];
            (
                a["epoch"].as_u64().unwrap(),
                a["decision"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: Vec<(u64, String)> = [
        (3, "move"),
        (4, "skip"),
        (5, "revert"),
        (5, "skip"),
        (6, "skip"),
    ]
    .iter()
    .map(|&(e, v)| (e, v.to_string()))
    .collect();
    assert_eq!(seen, want, "{lines:?}");
    let (moved, revert) = (&lines[0], &lines[2]);
    let n = moved["words_moved"].as_u64().unwrap();
    assert!(n > 0, "{moved}");
    assert_eq!(
        revert["words_moved"].as_u64(),
        Some(n),
        "every moved word goes back: {revert}"
    );
    let why = revert["auto"]["why"].as_str().unwrap();
    assert!(why.contains("epoch 3's"), "{why}");
    // What the rule learnt: moves realise less than nothing.
    let r = revert["auto"]["realized"].as_f64().unwrap();
    assert!(r < 0.0, "{revert}");
    assert_eq!(
        lines[4]["auto"]["realized"].as_f64(),
        Some(r),
        "{}",
        lines[4]
    );
    // Epoch 3's checkpoint (before the round) holds the allocation the run ends with.
    let summary: Value =
        serde_json::from_slice(&std::fs::read(d.clean_dir.join("summary.json")).unwrap()).unwrap();
    let ck = |step: u64| {
        let dir = d
            .clean_dir
            .join("checkpoints")
            .join(checkpoint::dir_name(step));
        rt.block_on(checkpoint::load(
            &Location::parse(dir.to_str().unwrap()).unwrap(),
        ))
        .unwrap()
    };
    let first = ck(summary["history"][2]["step"].as_u64().unwrap());
    let moved_ck = ck(summary["history"][3]["step"].as_u64().unwrap());
    let last = ck(summary["steps"].as_u64().unwrap());
    assert_ne!(
        moved_ck.cells, first.cells,
        "epoch 4 trained on the moved allocation"
    );
    assert_eq!(
        last.cells, first.cells,
        "the run ends on epoch 3's allocation"
    );
    let decisions = summary["auto_realloc"]["decisions"].as_array().unwrap();
    assert_eq!(decisions[2]["decision"], "revert", "{decisions:?}");
}

/// `realloc_every = "auto"` is the default. Where the plateau rule sets the rate (no
/// `lr_schedule`: no lower rate is known ahead, so no move can pay) every round is a skip
/// decided before any table pass, and the run is the run without reallocation to the
/// byte: every checkpoint's model and training state. With a schedule that drops the
/// rate the same default decides to move, as `realloc_every = "auto"` set by hand does.
#[test]
fn the_default_decides_each_round_and_costs_nothing_where_no_move_can_pay() {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_corpus(&data, 8, 600);
    let train = |name: &str, sets: &[&str]| {
        let out = tmp.path().join(name);
        let mut a = vec!["train", "--preset", "tiny", "--set", "epochs=4"];
        for s in sets {
            a.extend(["--set", s]);
        }
        a.extend([
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        let summary = cli(&a, &rt).unwrap();
        (out, summary)
    };
    let (default_dir, default) = train("default", &[]);
    let (never_dir, never) = train("never", &["realloc_every=0"]);
    let config = std::fs::read_to_string(default_dir.join("config.toml")).unwrap();
    assert!(config.contains("realloc_every = \"auto\""), "{config}");
    let rounds: Vec<Value> = metrics(&default_dir)
        .into_iter()
        .filter(|v| v["kind"] == "realloc")
        .collect();
    let seen: Vec<(u64, &str, u64)> = rounds
        .iter()
        .map(|l| {
            let a = &l["auto"];
            (
                a["epoch"].as_u64().unwrap(),
                a["decision"].as_str().unwrap(),
                l["words_moved"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [(1, "skip", 0), (2, "skip", 0), (3, "skip", 0)],
        "a round after every epoch but the last: {rounds:?}"
    );
    let why = rounds[0]["auto"]["why"].as_str().unwrap();
    assert!(why.contains("no learning-rate schedule"), "{why}");
    for l in &rounds {
        assert!(l["seconds_tables"].is_null(), "no table pass: {l}");
    }
    assert!(metrics(&never_dir).iter().all(|v| v["kind"] != "realloc"));
    for k in ["steps", "train_loss", "valid_ppl", "test_ppl"] {
        assert_eq!(default[k], never[k], "{k}: {default} vs {never}");
    }
    let files = |d: &std::path::Path| -> Vec<(String, Vec<u8>)> {
        run_files(d)
            .into_iter()
            .filter(|(rel, _)| rel.ends_with(".safetensors"))
            .collect()
    };
    let (a, b) = (files(&default_dir), files(&never_dir));
    assert_eq!(a.len(), b.len());
    assert!(
        a.len() >= 7,
        "the kept checkpoints and out/best: {}",
        a.len()
    );
    for ((ra, xa), (rb, xb)) in a.iter().zip(&b) {
        assert_eq!(ra, rb);
        assert!(xa == xb, "{ra} differs from the run without reallocation");
    }
    // A schedule that lowers the rate: the default moves after epoch 1 (a first move
    // is free; its gain shows at the lower rate ahead).
    let (sched_dir, _) = train("scheduled", &["lr_schedule=[10, 10, 2.5, 2.5]"]);
    let first = metrics(&sched_dir)
        .into_iter()
        .find(|v| v["kind"] == "realloc")
        .unwrap();
    assert_eq!(first["auto"]["decision"], "move", "{first}");
    assert!(first["words_moved"].as_u64().unwrap() > 0, "{first}");
}

/// A clean run, and the same run as one that died in the reallocation round after epoch
/// `epoch` and was resumed: same figures and final model.
struct Died {
    clean_dir: std::path::PathBuf,
    died: std::path::PathBuf,
    /// meta.json of the checkpoint that had the round pending.
    pending_meta: Value,
}

fn die_in_round_and_resume(
    rt: &tokio::runtime::Runtime,
    tmp: &std::path::Path,
    data: &std::path::Path,
    sets: &[&str],
    epoch: usize,
) -> Died {
    let args = |out: &std::path::Path, resume: bool| {
        let mut a = vec!["train".to_string(), "--preset".into(), "tiny".into()];
        for s in sets.iter().chain(&["keep_checkpoints=10"]) {
            a.extend(["--set".to_string(), s.to_string()]);
        }
        a.extend([
            "--data".into(),
            data.to_str().unwrap().into(),
            "--out".into(),
            out.to_str().unwrap().into(),
        ]);
        if resume {
            a.push("--resume".into());
        }
        a
    };
    let run = |a: Vec<String>| cli(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>(), rt).unwrap();
    let clean_dir = tmp.join("clean");
    let clean = run(args(&clean_dir, false));
    // The checkpoint of the epoch has the round pending; a run that died in the round
    // left only it (and what came before).
    let summary: Value =
        serde_json::from_slice(&std::fs::read(clean_dir.join("summary.json")).unwrap()).unwrap();
    let at = summary["history"][epoch - 1]["step"].as_u64().unwrap();
    let ck = clean_dir.join("checkpoints").join(checkpoint::dir_name(at));
    let pending_meta: Value =
        serde_json::from_slice(&std::fs::read(ck.join("meta.json")).unwrap()).unwrap();
    assert_eq!(pending_meta["realloc_pending"], true, "{pending_meta}");
    let died = tmp.join("died");
    for (rel, bytes) in run_files(&clean_dir) {
        let keep = match rel.strip_prefix("checkpoints/step-") {
            Some(r) => r[..12].parse::<u64>().unwrap() <= at,
            None => rel == "metrics.jsonl" || rel == "config.toml",
        };
        if keep {
            let p = died.join(&rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, bytes).unwrap();
        }
    }
    copy_data(&clean_dir, &died);
    // out/best as the dying run left it: the best model up to that epoch, saved before
    // the round (the epoch with the lowest validation loss so far).
    let best_epoch = (0..epoch)
        .min_by(|&a, &b| {
            let v = |e: usize| summary["history"][e]["valid_loss"].as_f64().unwrap();
            v(a).total_cmp(&v(b))
        })
        .unwrap();
    let best_ck = clean_dir.join("checkpoints").join(checkpoint::dir_name(
        summary["history"][best_epoch]["step"].as_u64().unwrap(),
    ));
    let best = died.join("best");
    std::fs::create_dir_all(&best).unwrap();
    for e in std::fs::read_dir(&best_ck).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, best.join(p.file_name().unwrap())).unwrap();
    }
    let resumed = run(args(&died, true));
    for k in ["steps", "valid_ppl", "test_ppl", "train_loss"] {
        assert_eq!(resumed[k], clean[k], "{k}: {resumed} vs {clean}");
    }
    let last = checkpoint::dir_name(clean["steps"].as_u64().unwrap());
    let model = |d: &std::path::Path| {
        std::fs::read(d.join("checkpoints").join(&last).join("model.safetensors")).unwrap()
    };
    assert!(model(&died) == model(&clean_dir), "the final models differ");
    Died {
        clean_dir,
        died,
        pending_meta,
    }
}

/// The prepared dataset of a run directory, copied.
fn copy_data(from: &std::path::Path, to: &std::path::Path) {
    let mut todo = vec![from.join("data")];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let q = to.join(p.strip_prefix(from).unwrap());
            if p.is_dir() {
                todo.push(p);
            } else {
                std::fs::create_dir_all(q.parent().unwrap()).unwrap();
                std::fs::copy(&p, q).unwrap();
            }
        }
    }
}
