//! The deployment templates in deploy/ stay runnable: the YAML parses (Python's yaml),
//! the shell scripts pass `bash -n`, the Dockerfile has its stages, a non-root user and
//! an init process, and every `lightrnn` subcommand and flag the templates use exists.

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
    let o = Command::new(python())
        .args(["-c", script])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{} does not parse: {}",
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
            .position(|t| t == "lightrnn" || t.ends_with("/lightrnn"))
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
        let flags = toks[start + 1..]
            .iter()
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
