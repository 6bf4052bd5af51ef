//! What a person watching a run sees: TensorBoard's event files, read by TensorBoard's own
//! reader (PyPI `tensorboard`, through scripts/check_tensorboard.py) against
//! `metrics.jsonl`, also after a resume; and the `--profile-steps` trace of a two-worker
//! job, checked as trace-event JSON (fields, nesting within each step, the phases adding
//! up to the step, every phase present).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use common::{corpus, json, lightrnn};
use serde_json::Value;

fn python() -> String {
    std::env::var("LIGHTRNN_TEST_PYTHON").unwrap_or_else(|_| {
        panic!(
            "this test needs Python with tensorboard: run scripts/test.sh (it installs it), or \
             set LIGHTRNN_TEST_PYTHON=/path/to/python"
        )
    })
}

/// scripts/check_tensorboard.py on `run`: its summary (it fails on any mismatch).
fn check_tensorboard(run: &Path) -> Value {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/check_tensorboard.py"
    );
    let o = Command::new(python())
        .arg(script)
        .arg(run)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{}: {out}\n{}",
        run.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    json(out.trim())
}

fn train(args: &[&str]) {
    let (code, _, err) = lightrnn(args);
    assert_eq!(code, 0, "{err}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &p);
        } else {
            std::fs::copy(e.path(), p).unwrap();
        }
    }
}

fn metrics(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(json)
        .collect()
}

/// A run with reallocation rounds writes events TensorBoard reads as its metrics.jsonl
/// says; the same run killed after a checkpoint (its later events already written) and
/// resumed shows every step once with the resumed values, its config, each round's
/// decision and allocation picture; `tensorboard = false` writes none.
#[test]
fn tensorboard_shows_the_metrics_also_after_a_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("text");
    corpus(&data, 3000);
    let clean = tmp.path().join("clean");
    let d = data.to_str().unwrap();
    let args = |out: &Path, more: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "train",
            "--preset",
            "tiny",
            "--set",
            "epochs=3",
            "--set",
            "threads=1",
            "--set",
            "log_every=5",
            "--set",
            "checkpoint_every=20",
            "--set",
            "keep_checkpoints=1000",
            "--set",
            "realloc_every=1",
            "--data",
            d,
            "--out",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.push(out.to_str().unwrap().into());
        a.extend(more.iter().map(|s| s.to_string()));
        a
    };
    let run = |a: Vec<String>| train(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    run(args(&clean, &[]));
    let c = check_tensorboard(&clean);
    assert_eq!(c["files"], 1, "{c}");
    assert_eq!(c["rounds"], 2, "{c}");
    assert_eq!(c["images"], 2, "{c}");
    assert!(c["scalars"].as_u64().unwrap() > 100, "{c}");

    // The run as it was when killed: every object written, but only the checkpoints up
    // to a step in its second epoch.
    let died = tmp.path().join("died");
    copy_dir(&clean, &died);
    let steps: Vec<u64> = std::fs::read_dir(died.join("checkpoints"))
        .unwrap()
        .map(|e| {
            e.unwrap().file_name().to_string_lossy()[5..]
                .parse()
                .unwrap()
        })
        .collect();
    let at = {
        let mut s = steps.clone();
        s.sort_unstable();
        s[s.len() / 2]
    };
    for s in steps.iter().filter(|&&s| s > at) {
        std::fs::remove_dir_all(died.join("checkpoints").join(format!("step-{s:012}"))).unwrap();
    }
    run(args(&died, &["--resume"]));
    let r = check_tensorboard(&died);
    assert_eq!(r["files"], 2, "{r}");
    assert_eq!(r["rounds"], 2, "{r}");
    // The resumed run's losses are the clean run's (what TensorBoard shows, checked
    // against each metrics.jsonl above).
    let losses = |run: &Path| -> Vec<(u64, f64)> {
        metrics(run)
            .iter()
            .filter(|v| v["kind"] == "train")
            .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
            .collect()
    };
    assert_eq!(losses(&died), losses(&clean));

    let off = tmp.path().join("off");
    run(args(
        &off,
        &["--set", "tensorboard=false", "--set", "profile=false"],
    ));
    assert!(!off.join("tb").exists());
    assert!(metrics(&off).iter().all(|v| v["kind"] != "profile"));
    assert!(metrics(&clean).iter().any(|v| v["kind"] == "profile"));
}

/// One span of a trace.
#[derive(Clone, Debug)]
struct Span {
    name: String,
    tid: u64,
    start: f64,
    end: f64,
    step: u64,
}

/// Rank `rank`'s one trace file in `run`/profile.
fn trace_file(run: &Path, rank: usize) -> std::path::PathBuf {
    let mut files: Vec<_> = std::fs::read_dir(run.join("profile"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(&format!(".rank{rank}.json")))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files.pop().unwrap()
}

/// The device's track in a trace.
const DEVICE: u64 = 1000;

/// What a trace holds: the names of the training thread's spans, the count of the CPU
/// backend's threads' spans, the names of the device's spans.
struct Trace {
    names: BTreeSet<String>,
    threads: usize,
    device: BTreeSet<String>,
}

/// Check a trace-event document: every event's fields; on the training thread, spans
/// nested (each inside the one it starts in), each inside the step of its own `step`
/// argument, each step's direct children adding up to it within 5 %; the backend
/// threads' spans inside a training-thread span of their name; the device's spans inside
/// the step they belong to.
fn check_trace(path: &Path) -> Trace {
    let doc: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let events = doc["traceEvents"].as_array().unwrap();
    let mut spans = Vec::new();
    for e in events {
        for f in ["name", "ph"] {
            assert!(e[f].is_string(), "{f} in {e}");
        }
        for f in ["pid", "tid"] {
            assert!(e[f].is_u64(), "{f} in {e}");
        }
        match e["ph"].as_str().unwrap() {
            "M" => assert!(e["args"]["name"].is_string(), "{e}"),
            "X" => {
                let (ts, dur) = (e["ts"].as_f64().unwrap(), e["dur"].as_f64().unwrap());
                assert!(ts >= 0.0 && dur >= 0.0, "{e}");
                spans.push(Span {
                    name: e["name"].as_str().unwrap().into(),
                    tid: e["tid"].as_u64().unwrap(),
                    start: ts,
                    end: ts + dur,
                    step: e["args"]["step"].as_u64().unwrap(),
                });
            }
            other => panic!("unexpected phase {other} in {e}"),
        }
    }
    const EPS: f64 = 1e-3;
    let mut main: Vec<Span> = spans.iter().filter(|s| s.tid == 0).cloned().collect();
    main.sort_by(|a, b| a.start.total_cmp(&b.start).then(b.end.total_cmp(&a.end)));
    // Parent of each span: the innermost open one when it starts.
    let mut parent: Vec<Option<usize>> = vec![None; main.len()];
    let mut stack: Vec<usize> = Vec::new();
    for i in 0..main.len() {
        while let Some(&top) = stack.last() {
            if main[top].end <= main[i].start + EPS {
                stack.pop();
            } else {
                break;
            }
        }
        if let Some(&top) = stack.last() {
            assert!(
                main[i].end <= main[top].end + EPS,
                "{:?} overlaps {:?} without nesting",
                main[i],
                main[top]
            );
            parent[i] = Some(top);
        }
        stack.push(i);
    }
    let mut children: BTreeMap<usize, f64> = BTreeMap::new();
    for (i, p) in parent.iter().enumerate() {
        if let Some(p) = p {
            *children.entry(*p).or_default() += main[i].end - main[i].start;
        }
        // Its step, where it lies in one.
        let mut up = *p;
        while let Some(u) = up {
            if main[u].name == "step" {
                assert_eq!(main[i].step, main[u].step, "{:?} in {:?}", main[i], main[u]);
                break;
            }
            up = parent[u];
        }
        if main[i].name == "step" {
            assert!(p.is_none(), "a step inside {:?}", main[p.unwrap()]);
        }
    }
    // The phases cover the steps: what lies between them is the loop's own few
    // instructions, plus, on a loaded machine, any preemption that lands there. One such
    // gap can be a large share of a 1 ms step, so the cover is judged over all the steps
    // (nesting already bounds each step's phases by the step).
    let (mut steps, mut dur, mut sum) = (0, 0.0, 0.0);
    for (i, s) in main.iter().enumerate().filter(|(_, s)| s.name == "step") {
        steps += 1;
        dur += s.end - s.start;
        sum += children.get(&i).copied().unwrap_or(0.0);
    }
    assert!(steps > 0, "no steps in {}", path.display());
    assert!(
        (dur - sum).abs() <= 0.05 * dur,
        "{steps} steps: phases add up to {sum} us of {dur} us"
    );
    let threads: Vec<&Span> = spans
        .iter()
        .filter(|s| s.tid != 0 && s.tid != DEVICE)
        .collect();
    for t in &threads {
        assert!(
            main.iter()
                .any(|m| m.name == t.name && m.start <= t.start + EPS && t.end <= m.end + EPS),
            "backend thread span {t:?} outside its phase"
        );
    }
    let device: Vec<&Span> = spans.iter().filter(|s| s.tid == DEVICE).collect();
    for d in &device {
        assert!(
            main.iter().any(|m| m.name == "step"
                && m.step == d.step
                && m.start <= d.start + EPS
                && d.end <= m.end + EPS),
            "device span {d:?} outside its step"
        );
    }
    Trace {
        names: main.iter().map(|s| s.name.clone()).collect(),
        threads: threads.len(),
        device: device.iter().map(|s| s.name.clone()).collect(),
    }
}

/// A two-worker job traced from its first step to its end: each rank's trace is valid and
/// holds every phase, the all-reduce's wait and transfer among them, and the CPU
/// backend's threads; the metrics' profile lines hold the leader's phases.
#[test]
fn a_traced_two_worker_job_shows_every_phase_of_its_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("text");
    corpus(&data, 2000);
    let out = tmp.path().join("run");
    train(&[
        "train",
        "--workers",
        "2",
        "--preset",
        "tiny",
        "--set",
        "epochs=2",
        "--set",
        "threads=2",
        "--set",
        "grad_groups=4",
        "--set",
        "log_every=5",
        "--set",
        "checkpoint_every=30",
        "--set",
        "realloc_every=1",
        "--profile-steps",
        "1:100000",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let want: BTreeSet<String> = [
        "step",
        "data",
        "forward_backward",
        "input",
        "forward/layer0",
        "heads",
        "backward/layer0",
        "grad_sum",
        "all_reduce",
        "all_reduce/wait",
        "all_reduce/transfer",
        "update",
        "clip",
        "optimizer",
        "control",
        "log",
        "checkpoint",
        "eval",
        "loss_tables",
        "realloc",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for rank in 0..2 {
        let t = check_trace(&trace_file(&out, rank));
        let missing: Vec<_> = want.difference(&t.names).collect();
        assert!(
            missing.is_empty(),
            "rank {rank}: no {missing:?} in {:?}",
            t.names
        );
        assert!(t.threads > 0, "rank {rank}: no backend thread spans");
        assert!(t.device.is_empty(), "rank {rank}: device spans on the CPU");
    }
    let profiles: Vec<Value> = metrics(&out)
        .into_iter()
        .filter(|v| v["kind"] == "profile")
        .collect();
    assert!(!profiles.is_empty());
    // As in the trace, the top-level phases cover the steps over the whole run.
    let (mut step, mut top) = (0.0, 0.0);
    for p in &profiles {
        let n = p["steps"].as_f64().unwrap();
        let phases = p["seconds_per_step"].as_object().unwrap();
        step += n * phases["step"].as_f64().unwrap();
        top += n * [
            "data",
            "forward_backward",
            "all_reduce",
            "update",
            "control",
        ]
        .iter()
        .map(|k| phases[*k].as_f64().unwrap())
        .sum::<f64>();
    }
    assert!(
        (step - top).abs() <= 0.05 * step,
        "profile lines: phases add up to {top} s of {step} s"
    );
    let train_lines: Vec<Value> = metrics(&out)
        .into_iter()
        .filter(|v| v["kind"] == "train")
        .collect();
    assert!(train_lines.iter().all(|v| {
        v["rank_words_per_sec"]
            .as_array()
            .is_some_and(|r| r.len() == 2 && r.iter().all(|w| w.as_f64().unwrap() > 0.0))
    }));
}

/// A run on the emulated CUDA device (`LIGHTRNN_CUDA_EMULATOR=1`) traced for three steps:
/// beside the host's spans, the device's own, from timing marks on its stream, one per
/// phase of each step and inside it.
#[cfg(feature = "cuda")]
#[test]
fn a_traced_emulated_cuda_run_carries_the_device_spans() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("text");
    corpus(&data, 600);
    let out = tmp.path().join("run");
    let o = Command::new(env!("CARGO_BIN_EXE_lightrnn"))
        .env("LIGHTRNN_CUDA_EMULATOR", "1")
        .args(["train", "--backend", "cuda", "--preset", "tiny"])
        .args(["--set", "max_steps=6", "--set", "grad_groups=2"])
        .args(["--profile-steps", "2:4", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let file = trace_file(&out, 0);
    assert!(
        file.ends_with("profile/trace.steps2-4.rank0.json"),
        "{file:?}"
    );
    let t = check_trace(&file);
    for want in ["step", "data", "forward_backward", "update", "control"] {
        assert!(t.names.contains(want), "no {want} in {:?}", t.names);
    }
    let device: BTreeSet<String> = [
        "input",
        "forward/layer0",
        "heads",
        "backward/layer0",
        "grad_sum",
        "clip",
        "optimizer",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(t.device, device);
    let doc: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let steps: BTreeSet<u64> = doc["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["tid"] == DEVICE && e["ph"] == "X")
        .map(|e| e["args"]["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [2, 3, 4].into_iter().collect());
}
