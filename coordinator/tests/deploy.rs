//! The deployment templates in deploy/ stay runnable: the YAML parses (Python's yaml),
//! the shell scripts pass `bash -n`, the Dockerfile has its stages, a non-root user and
//! an init process, and every `lightrnn` subcommand and flag the templates use exists.
//! The Kubernetes templates validate against the API's schemas, and the preparation
//! Jobs' own command lines, run in order, make the dataset one process makes. Compose
//! validates with `docker compose config`. (coordinator/tests/slurm.rs runs the SLURM
//! templates on a real SLURM.)

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn python() -> String {
    std::env::var("LIGHTRNN_TEST_PYTHON").unwrap_or_else(|_| {
        panic!(
            "this test needs Python with PyYAML: run scripts/test.sh (it installs it), or set \
             LIGHTRNN_TEST_PYTHON=/path/to/python"
        )
    })
}

/// The command lines (token lists) of the YAML files: every list of strings.
fn yaml_commands(path: &Path) -> Vec<Vec<String>> {
    let script = r#"
import json, sys, yaml
out = []
def walk(x):
    if isinstance(x, dict):
        for v in x.values(): walk(v)
    elif isinstance(x, list):
        if x and all(isinstance(v, (str, int, float)) for v in x):
            out.append([str(v) for v in x])
        for v in x: walk(v)
docs = list(yaml.safe_load_all(open(sys.argv[1], encoding="utf-8")))
assert docs and all(d is not None for d in docs), "empty document"
for d in docs: walk(d)
print(json.dumps(out))
"#;
    serde_json::from_value(python_json(script, path, &[])).unwrap()
}

/// What a Python `script` run on `path` (and `more` arguments) prints, as JSON; its
/// error output if it fails.
fn python_json(script: &str, path: &Path, more: &[&str]) -> serde_json::Value {
    let o = Command::new(python())
        .args(["-c", script])
        .arg(path)
        .args(more)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}: {}",
        path.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The command lines of a shell script: lines joined at `\`, cut at `&`, `|`, `;`, `>`.
fn shell_commands(text: &str) -> Vec<Vec<String>> {
    let joined = text.replace("\\\n", " ");
    let mut out = Vec::new();
    for line in joined.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        for part in line.split(['&', '|', ';', '>']) {
            let toks: Vec<String> = part
                .split_whitespace()
                .map(|t| t.trim_matches(|c| c == '"' || c == '\'').to_string())
                .collect();
            if !toks.is_empty() {
                out.push(toks);
            }
        }
    }
    out
}

const SUBCOMMANDS: &[&str] = &[
    "train",
    "eval",
    "bench",
    "config",
    "allocate",
    "tables",
    "inspect",
    "export",
    "sample",
    "vocab",
    "shard",
    "coordinator",
    "worker",
    "devices",
];

/// (subcommand, flags) of every `lightrnn` invocation in the command lines: after the
/// word `lightrnn`, or a list that starts with a subcommand (a container's args).
fn invocations(cmds: &[Vec<String>]) -> Vec<(String, BTreeSet<String>)> {
    let mut out = Vec::new();
    for toks in cmds {
        let start = match toks
            .iter()
            .position(|t| t == "lightrnn" || t.ends_with("/lightrnn") || t == "$LIGHTRNN")
        {
            Some(i) => i + 1,
            None if toks
                .first()
                .is_some_and(|t| SUBCOMMANDS.contains(&t.as_str())) =>
            {
                0
            }
            None => continue,
        };
        let Some(sub) = toks
            .get(start)
            .filter(|t| SUBCOMMANDS.contains(&t.as_str()))
        else {
            continue;
        };
        // A flag given only when a variable is set: `${VAR:+--flag "$VAR"}`.
        let flags = toks[start + 1..]
            .iter()
            .map(|t| t.split_once(":+").map_or(t.as_str(), |(_, f)| f))
            .filter(|t| t.starts_with("--"))
            .map(|t| t.split('=').next().unwrap().to_string())
            .collect();
        out.push((sub.clone(), flags));
    }
    out
}

#[test]
fn deployment_templates_parse_and_use_only_flags_that_exist() {
    let mut all = Vec::new();
    files(&deploy_dir(), &mut all);
    let mut used: Vec<(String, BTreeSet<String>, PathBuf)> = Vec::new();
    let mut kinds = BTreeSet::new();
    for path in &all {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(path).unwrap();
        let cmds = if name.ends_with(".yaml") || name.ends_with(".yml") {
            kinds.insert("yaml");
            yaml_commands(path)
        } else if name.ends_with(".sbatch") || name.ends_with(".sh") {
            kinds.insert("shell");
            let o = Command::new("bash").arg("-n").arg(path).output().unwrap();
            assert!(
                o.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            shell_commands(&text)
        } else if name == "Dockerfile" {
            kinds.insert("dockerfile");
            let froms = text.lines().filter(|l| l.starts_with("FROM ")).count();
            assert!(froms >= 2, "{name}: a multi-stage build");
            assert!(text.contains("\nUSER "), "{name}: runs as a non-root user");
            assert!(
                text.contains("tini"),
                "{name}: an init process forwards signals"
            );
            let entry = text
                .lines()
                .find(|l| l.starts_with("ENTRYPOINT"))
                .expect("an ENTRYPOINT");
            let cmd: Vec<String> =
                serde_json::from_str(entry.trim_start_matches("ENTRYPOINT").trim())
                    .expect("ENTRYPOINT in exec form");
            assert!(cmd.iter().any(|t| t == "lightrnn"), "{entry}");
            continue;
        } else {
            continue;
        };
        for (sub, flags) in invocations(&cmds) {
            used.push((sub, flags, path.clone()));
        }
    }
    assert_eq!(
        kinds,
        ["dockerfile", "shell", "yaml"].into_iter().collect(),
        "deploy/ lost a kind of template"
    );
    let subs: BTreeSet<&str> = used.iter().map(|(s, _, _)| s.as_str()).collect();
    assert!(
        subs.contains("coordinator") && subs.contains("worker"),
        "the templates launch no job: {subs:?}"
    );
    for (sub, flags, path) in &used {
        let o = Command::new(env!("CARGO_BIN_EXE_lightrnn"))
            .args([sub.as_str(), "--help"])
            .output()
            .unwrap();
        assert!(o.status.success());
        let help = String::from_utf8_lossy(&o.stdout);
        for f in flags {
            assert!(
                help.contains(&format!("{f} ")) || help.contains(&format!("{f}\n")),
                "{}: `lightrnn {sub} {f}` is not a flag of this lightrnn",
                path.display()
            );
        }
    }
}

/// The grace rule every scheduler shares: a trainer (train, coordinator, worker) asked to
/// stop must give up before the scheduler's kill follows its SIGTERM (`kill_after_s`),
/// so a checkpoint in progress is never cut by a SIGKILL the process did not see coming.
fn check_grace(what: &str, args: &[String], kill_after_s: f64) {
    let Some(sub) = args
        .iter()
        .find(|a| ["train", "coordinator", "worker"].contains(&a.as_str()))
    else {
        return;
    };
    let grace: f64 = args
        .iter()
        .position(|a| a == "--grace-s")
        .map_or(25.0, |i| args[i + 1].parse().unwrap());
    assert!(
        grace < kill_after_s,
        "{what}: `lightrnn {sub}` has --grace-s {grace}, not below the {kill_after_s} s after \
         which the scheduler kills it"
    );
}

/// The Kubernetes versions the template is validated for: those the cloud providers
/// support in 2026 and the years around.
const KUBERNETES: &[&str] = &[
    "1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0", "1.35.0", "1.36.0", "1.37.0",
];

#[test]
fn kubernetes_template_is_valid_for_the_kubernetes_versions_users_run() {
    // kubernetes-validate (PyPI, offline: the API's JSON schemas ship with it), strict:
    // an unknown field is an error. A copy with a misspelt field must fail, so the
    // validator is known to look. Prints the pod templates' grace periods and containers.
    let script = r#"
import copy, json, sys, yaml, kubernetes_validate as kv
docs = list(yaml.safe_load_all(open(sys.argv[1], encoding="utf-8")))
for v in sys.argv[2:]:
    for d in docs:
        kv.validate(d, v, True)
bad = copy.deepcopy(next(d for d in docs if d["kind"] == "Job"))
bad["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 30
try:
    kv.validate(bad, sys.argv[2], True)
    sys.exit("the validator let a misspelt field through")
except kv.ValidationError:
    pass
pods = []
for d in docs:
    if d["kind"] == "Job":
        spec = d["spec"]["template"]["spec"]
        pods.append({"name": d["metadata"]["name"],
                     "grace": spec.get("terminationGracePeriodSeconds", 30),
                     "containers": [{"command": c.get("command"), "args": [str(a) for a in c.get("args", [])],
                                     "cpu": c.get("resources", {}).get("requests", {}).get("cpu")}
                                    for c in spec["containers"]]})
print(json.dumps(pods))
"#;
    let pods = python_json(script, &deploy_dir().join("k8s/lightrnn.yaml"), KUBERNETES);
    let mut roles = BTreeSet::new();
    for pod in pods.as_array().unwrap() {
        let name = pod["name"].as_str().unwrap();
        for c in pod["containers"].as_array().unwrap() {
            // The image's entrypoint (tini, PID 1) passes SIGTERM on to lightrnn: a
            // container that set `command` would replace it.
            assert!(
                c["command"].is_null(),
                "{name}: `command` replaces the image's init process; give `args`"
            );
            let args: Vec<String> = serde_json::from_value(c["args"].clone()).unwrap();
            check_grace(name, &args, pod["grace"].as_f64().unwrap());
            if args.first().is_some_and(|a| a == "worker") {
                // A worker uses the cores its pod asked for, not every core of the node.
                let i = args.iter().position(|a| a == "--threads");
                assert!(
                    i.is_some_and(|i| c["cpu"].as_str() == Some(args[i + 1].as_str())),
                    "{name}: --threads must match the pod's cpu request {}",
                    c["cpu"]
                );
            }
            roles.insert(args[0].clone());
        }
    }
    assert_eq!(
        roles,
        ["coordinator", "worker"].map(String::from).into(),
        "{pods}"
    );
}

/// A compose duration ("60s", "1m30s") in seconds.
fn compose_seconds(d: &str) -> f64 {
    let (mut total, mut num) = (0.0, String::new());
    for ch in d.chars() {
        if ch.is_ascii_digit() || ch == '.' {
            num.push(ch);
            continue;
        }
        let n: f64 = num.parse().unwrap();
        num.clear();
        total += n * match ch {
            's' => 1.0,
            'm' => 60.0,
            'h' => 3600.0,
            _ => panic!("{d}: not a compose duration"),
        };
    }
    total
}

#[test]
fn compose_file_is_valid_for_docker_compose() {
    let path = deploy_dir().join("compose.yaml");
    // `docker compose` (Docker's plugin) where Docker is, else Debian's docker-compose;
    // `config` validates the file against Compose's schema without a daemon.
    let tool = [vec!["docker", "compose"], vec!["docker-compose"]]
        .into_iter()
        .find(|t| {
            Command::new(t[0])
                .args(&t[1..])
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success())
        });
    let Some(tool) = tool else {
        assert!(
            std::env::var_os("LIGHTRNN_REQUIRE_COMPOSE").is_none(),
            "LIGHTRNN_REQUIRE_COMPOSE is set and neither `docker compose` nor `docker-compose` runs"
        );
        eprintln!(
            "compose_file_is_valid_for_docker_compose: skipped, neither `docker compose` nor \
             `docker-compose` is installed (apt-get install docker-compose)"
        );
        return;
    };
    let o = Command::new(tool[0])
        .args(&tool[1..])
        .arg("-f")
        .arg(&path)
        .args(["config", "-q"])
        .current_dir(deploy_dir())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{} config: {}",
        tool.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
    let script = r#"
import json, sys, yaml
doc = yaml.safe_load(open(sys.argv[1], encoding="utf-8"))
print(json.dumps({n: {"grace": s.get("stop_grace_period", "10s"), "command": [str(a) for a in s.get("command", [])]}
                  for n, s in doc["services"].items()}))
"#;
    let services = python_json(script, &path, &[]);
    let mut trainers = 0;
    for (name, s) in services.as_object().unwrap() {
        let args: Vec<String> = serde_json::from_value(s["command"].clone()).unwrap();
        trainers += usize::from(
            args.first()
                .is_some_and(|a| a == "coordinator" || a == "worker"),
        );
        check_grace(name, &args, compose_seconds(s["grace"].as_str().unwrap()));
    }
    assert_eq!(trainers, 2, "{services}");
}

#[test]
fn kubernetes_preparation_jobs_validate_and_their_commands_make_the_one_process_dataset() {
    // The Jobs in file order: name, phase, completions (0: not Indexed), args; validated
    // strictly for every version first.
    let script = r#"
import json, sys, yaml, kubernetes_validate as kv
docs = list(yaml.safe_load_all(open(sys.argv[1], encoding="utf-8")))
for v in sys.argv[2:]:
    for d in docs:
        kv.validate(d, v, True)
jobs = []
for d in docs:
    assert d["kind"] == "Job", d["kind"]
    spec = d["spec"]
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    assert "command" not in c, "give args: the image's init process stays PID 1"
    indexed = spec.get("completionMode") == "Indexed"
    if indexed:
        env = {e["name"]: e for e in c.get("env", [])}
        assert env["PART"]["valueFrom"]["fieldRef"]["fieldPath"] == \
            "metadata.annotations['batch.kubernetes.io/job-completion-index']", env
    jobs.append({"name": d["metadata"]["name"], "phase": d["metadata"]["labels"]["phase"],
                 "completions": spec["completions"] if indexed else 0,
                 "args": [str(a) for a in c["args"]]})
print(json.dumps(jobs))
"#;
    let jobs: Vec<serde_json::Value> = serde_json::from_value(python_json(
        script,
        &deploy_dir().join("k8s/prepare.yaml"),
        KUBERNETES,
    ))
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    common::jsonl_gz_corpus(&corpus.join("train"), "c4-train", 5, 7);
    common::jsonl_gz_corpus(&corpus.join("validation"), "c4-validation", 8, 8);
    let (k8s, one) = (tmp.path().join("k8s"), tmp.path().join("one"));
    // The template's locations, here.
    let local = |a: &str, out: &Path| {
        a.replace("s3://corpora/c4/en", corpus.to_str().unwrap())
            .replace("s3://datasets/c4-en", out.to_str().unwrap())
    };
    let run = |args: &[String]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, err) = common::lightrnn(&args);
        assert_eq!(code, 0, "lightrnn {}: {err}", args.join(" "));
    };
    for job in &jobs {
        let args: Vec<String> = serde_json::from_value(job["args"].clone()).unwrap();
        let n = job["completions"].as_u64().unwrap();
        if n == 0 {
            run(&args.iter().map(|a| local(a, &k8s)).collect::<Vec<_>>());
        } else {
            let part = args
                .iter()
                .position(|a| a == "--part")
                .expect("an Indexed Job's --part");
            assert_eq!(
                args[part + 1],
                format!("$(PART)/{n}"),
                "{}: N is the completions",
                job["name"]
            );
            // Every index, in any order, one of them twice (a failed pod run again).
            for i in (0..n).rev().chain([n / 2]) {
                let a: Vec<String> = args
                    .iter()
                    .map(|a| local(&a.replace("$(PART)", &i.to_string()), &k8s))
                    .collect();
                run(&a);
            }
        }
        // The same command in one process, for the same dataset.
        if job["phase"] == "vocab-parts" || job["phase"] == "train-parts" {
            continue;
        }
        let whole: Vec<String> = args
            .iter()
            .filter(|a| *a != "--merge")
            .map(|a| local(a, &one))
            .collect();
        run(&whole);
    }
    common::assert_same_dataset(&k8s, &one);
    // What the parts left: the vocabulary's counts, for another --size.
    let left: Vec<_> = std::fs::read_dir(k8s.join("parts"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| !n.starts_with("vocab.part-"))
        .collect();
    assert!(
        left.is_empty(),
        "the merged splits' parts are deleted: {left:?}"
    );
}
