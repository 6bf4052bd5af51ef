//! deploy/slurm/lightrnn.sbatch on a real SLURM: Debian's slurm-wlm and munge, one node
//! from this machine, started by scripts/test-slurm.sh (scripts/slurm-local.sh), which
//! sets SLURM_CONF. Each test submits the template as a user would, with the tiny preset
//! on a small corpus and 2 workers on CPUs, and reads the job's log: a job runs to the
//! end; the time limit's warning preempts a job again and again and it ends bit-identical
//! to the uninterrupted run; so do `scontrol requeue`, `scancel` then a resubmission, a
//! SIGUSR1 to the steps and a worker killed mid-run; two jobs share the node; 20
//! submissions all start; the summary is printed at the end of every allocation and no
//! file is left behind. The preparation's array jobs (deploy/slurm/prepare.sh) make the
//! dataset one process makes. Without SLURM_CONF the tests say so and pass, unless
//! LIGHTRNN_REQUIRE_SLURM=1 (scripts/test-slurm.sh, in CI).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::corpus;

/// Whether a SLURM runs here; a line saying why not, or a failure when it must.
fn slurm() -> bool {
    let up = std::env::var_os("SLURM_CONF").is_some()
        && Command::new("sinfo")
            .args(["-h", "-o", "%T"])
            .output()
            .is_ok_and(|o| o.status.success() && !o.stdout.is_empty());
    if !up {
        assert!(
            std::env::var_os("LIGHTRNN_REQUIRE_SLURM").is_none(),
            "LIGHTRNN_REQUIRE_SLURM is set but no SLURM answers (SLURM_CONF={:?})",
            std::env::var("SLURM_CONF")
        );
        eprintln!("skipped: no SLURM here (scripts/test-slurm.sh starts one and runs these tests)");
    }
    up
}

/// The corpus, token and template every job uses.
struct Fixture {
    dir: tempfile::TempDir,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        // scripts/test-slurm.sh names a folder it removes (a static is never dropped).
        let dir = match std::env::var_os("LIGHTRNN_SLURM_TEST_DIR") {
            Some(d) => tempfile::tempdir_in(d),
            None => tempfile::tempdir(),
        }
        .unwrap();
        corpus(&dir.path().join("text"), 20_000);
        let token = dir.path().join("token");
        std::fs::write(&token, "slurm-test-token-0123456789abcdef").unwrap();
        Fixture { dir }
    })
}

/// A job's settings: the template's environment and sbatch's options.
struct Job<'a> {
    name: &'a str,
    epochs: u32,
    sbatch: &'a [&'a str],
    env: &'a [(&'a str, &'a str)],
}

impl Job<'_> {
    fn new(name: &str, epochs: u32) -> Job<'_> {
        Job {
            name,
            epochs,
            sbatch: &[],
            env: &[],
        }
    }

    /// The job's folder: its run directory `out`, its TMPDIR `tmp` and its logs.
    fn dir(&self) -> PathBuf {
        fixture().dir.path().join(self.name)
    }

    /// Submit it; the job id.
    fn submit(&self) -> String {
        let f = fixture();
        let dir = self.dir();
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let template =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/slurm/lightrnn.sbatch");
        let o = Command::new("sbatch")
            .args([
                "--parsable",
                "--export=ALL",
                "--nodes=1",
                "--ntasks=2",
                "--ntasks-per-node=2",
                "--gpus-per-task=0",
                "--cpus-per-task=1",
                "--mem=1G",
                &format!("--job-name={}", self.name),
            ])
            .arg(format!("--output={}/job-%j.log", dir.display()))
            .arg(format!("--chdir={}", dir.display()))
            .args(self.sbatch)
            .arg(&template)
            .env("DATA", f.dir.path().join("text"))
            .env("OUT", dir.join("out"))
            .env("PRESET", "tiny")
            .env(
                "ARGS",
                format!("--set epochs={} --set log_every=500", self.epochs),
            )
            .env("TOKEN_FILE", f.dir.path().join("token"))
            .env("LIGHTRNN", env!("CARGO_BIN_EXE_lightrnn"))
            .env("TMPDIR", dir.join("tmp"))
            .envs(self.env.iter().copied())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "sbatch: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    /// The job's log (every allocation's, appended).
    fn log(&self, id: &str) -> String {
        std::fs::read_to_string(self.dir().join(format!("job-{id}.log"))).unwrap_or_default()
    }

    /// The coordinator's summary lines in the log, one per allocation that trained.
    fn summaries(&self, id: &str) -> Vec<serde_json::Value> {
        self.log(id)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.get("run_id").is_some())
            .collect()
    }

    /// Nothing left in its TMPDIR, and no pruned checkpoint left an empty folder.
    fn assert_clean(&self) {
        let left: Vec<_> = std::fs::read_dir(self.dir().join("tmp"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(left.is_empty(), "{}: left behind {left:?}", self.name);
        let checkpoints = std::fs::read_dir(self.dir().join("out/checkpoints"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert!(
            checkpoints <= 3,
            "{}: {checkpoints} checkpoint folders",
            self.name
        );
    }
}

/// `scontrol show job ID`'s fields.
fn job_fields(id: &str) -> std::collections::BTreeMap<String, String> {
    let o = Command::new("scontrol")
        .args(["show", "job", "-o", id])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn state(id: &str) -> String {
    job_fields(id).get("JobState").cloned().unwrap_or_default()
}

/// Whether the job's processes are still ending (its batch script printing the summary).
fn completing(id: &str) -> bool {
    Command::new("squeue")
        .args(["-h", "-t", "CG", "-j", id])
        .output()
        .is_ok_and(|o| !o.stdout.is_empty())
}

/// Wait for the job to end for good (not requeued); its state and restarts.
fn wait_end(job: &Job, id: &str, limit: Duration) -> (String, u64) {
    let t0 = Instant::now();
    loop {
        let f = job_fields(id);
        let s = f.get("JobState").cloned().unwrap_or_default();
        if [
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
        ]
        .contains(&s.as_str())
            && !completing(id)
        {
            let restarts = f.get("Restarts").and_then(|r| r.parse().ok()).unwrap_or(0);
            return (s, restarts);
        }
        assert!(
            t0.elapsed() < limit,
            "{}: job {id} still {s} after {limit:?}; its log:\n{}",
            job.name,
            job.log(id)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Wait until the job has trained past a checkpoint in this allocation.
fn wait_checkpoint(job: &Job, id: &str, after: usize) {
    let t0 = Instant::now();
    while checkpoints_committed(job) <= after {
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "{}: no checkpoint; its log:\n{}",
            job.name,
            job.log(id)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Checkpoints in the run directory's metrics (one `valid` line per epoch's).
fn checkpoints_committed(job: &Job) -> usize {
    std::fs::read_to_string(job.dir().join("out/metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"kind\":\"valid\""))
        .count()
}

/// The figures two runs that trained the same model agree on.
const SAME: &[&str] = &[
    "params_sha256",
    "steps",
    "epochs_completed",
    "train_loss",
    "valid_ppl",
    "test_ppl",
    "tokens_accounted",
];

fn assert_same(name: &str, got: &serde_json::Value, want: &serde_json::Value) {
    for k in SAME {
        assert_eq!(
            got[k], want[k],
            "{name}: {k}: {got} vs the uninterrupted {want}"
        );
    }
}

/// The uninterrupted run of `epochs` epochs through the template (each length once).
fn reference(epochs: u32) -> &'static serde_json::Value {
    static SHORT: OnceLock<serde_json::Value> = OnceLock::new();
    static LONG: OnceLock<serde_json::Value> = OnceLock::new();
    let cell = if epochs == SHORT_EPOCHS {
        &SHORT
    } else {
        &LONG
    };
    cell.get_or_init(|| {
        let name = format!("reference-{epochs}");
        let job = Job::new(&name, epochs);
        let id = job.submit();
        let (state, restarts) = wait_end(&job, &id, Duration::from_secs(400));
        assert_eq!(
            (state.as_str(), restarts),
            ("COMPLETED", 0),
            "{}",
            job.log(&id)
        );
        let s = job.summaries(&id);
        assert_eq!(s.len(), 1, "{}", job.log(&id));
        assert_eq!(s[0]["stopped_by"], "epochs");
        job.assert_clean();
        s[0].clone()
    })
}

/// Most tests' job: ~15 s of training on a quiet machine.
const SHORT_EPOCHS: u32 = 12;
/// The time-limit test's job: more training (~75 s on a quiet machine) than two
/// allocations can hold (the warning comes within 30 s of each start).
const LONG_EPOCHS: u32 = 75;

#[test]
fn slurm_a_job_runs_to_the_end_and_prints_its_summary() {
    if !slurm() {
        return;
    }
    let r = reference(SHORT_EPOCHS);
    assert_eq!(r["epochs_completed"], SHORT_EPOCHS);
    assert_eq!(r["coordinator_restarts"], 0);
    assert!(r["train_seconds"].as_f64().unwrap() > 0.0, "{r}");
}

#[test]
fn slurm_the_time_limit_preempts_a_job_twice_and_it_ends_as_without_preemption() {
    if !slurm() {
        return;
    }
    // A 1-minute limit, the warning (SIGUSR1 to the batch script) 30 s before it: SLURM
    // sends a warning once the time left is within it and its 30 s check period, so at
    // its first check, 0 to 30 s after the start: each allocation trains at most ~30 s
    // of the run's ~75 s, and the script requeues the job after every stop.
    let job = Job {
        sbatch: &["--time=1", "--signal=B:USR1@30"],
        ..Job::new("time-limit", LONG_EPOCHS)
    };
    let id = job.submit();
    let want = reference(LONG_EPOCHS);
    let (state, restarts) = wait_end(&job, &id, Duration::from_secs(540));
    let log = job.log(&id);
    assert_eq!(state, "COMPLETED", "{log}");
    assert!(restarts >= 2, "preempted {restarts} times: {log}");
    eprintln!("time-limit: preempted and requeued {restarts} times");
    let s = job.summaries(&id);
    let last = s.last().unwrap();
    assert_same("time-limit", last, want);
    assert_eq!(last["stopped_by"], "epochs");
    // Every allocation that formed its group printed its summary, and each allocation
    // stopped by the warning was requeued by the script.
    assert!(
        s[..s.len() - 1].iter().all(|x| x["stopped_by"] == "signal"),
        "{log}"
    );
    assert_eq!(
        log.matches("requeueing: the job continues").count() as u64,
        restarts,
        "{log}"
    );
    // (An allocation warned before its group formed trained nothing and counts no
    // restart of the run's coordinator.)
    let coordinator_restarts = last["coordinator_restarts"].as_u64().unwrap();
    assert!((1..=restarts).contains(&coordinator_restarts), "{last}");
    // The figures count the whole run: tokens and training time over all allocations.
    assert!(
        last["train_seconds"].as_f64().unwrap() > last["seconds"].as_f64().unwrap(),
        "{last}"
    );
    job.assert_clean();
}

#[test]
fn slurm_scontrol_requeue_and_a_usr1_to_the_steps_resume_and_end_as_without_them() {
    if !slurm() {
        return;
    }
    let job = Job::new("requeue", SHORT_EPOCHS);
    let id = job.submit();
    // SLURM's own requeue: SIGTERM to every step, the ranks checkpoint, SLURM requeues.
    wait_checkpoint(&job, &id, 0);
    let ok = Command::new("scontrol")
        .args(["requeue", &id])
        .status()
        .unwrap();
    assert!(ok.success());
    // SIGUSR1 to the steps only (as --signal=USR1@N sends it): the coordinator stops
    // the job and the script requeues it.
    let t0 = Instant::now();
    while state(&id) != "RUNNING" || job.summaries(&id).is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(120), "{}", job.log(&id));
        std::thread::sleep(Duration::from_millis(200));
    }
    let before = checkpoints_committed(&job);
    wait_checkpoint(&job, &id, before);
    let ok = Command::new("scancel")
        .args(["--signal=USR1", &id])
        .status()
        .unwrap();
    assert!(ok.success());
    let (state, restarts) = wait_end(&job, &id, Duration::from_secs(300));
    let log = job.log(&id);
    assert_eq!((state.as_str(), restarts), ("COMPLETED", 2), "{log}");
    let s = job.summaries(&id);
    assert_eq!(s.len(), 3, "{log}");
    assert!(s[..2].iter().all(|x| x["stopped_by"] == "signal"), "{log}");
    assert_eq!(
        log.matches("requeueing: the job continues").count(),
        1,
        "{log}"
    );
    assert_same("requeue", &s[2], reference(SHORT_EPOCHS));
    job.assert_clean();
}

#[test]
fn slurm_scancel_and_a_sigterm_to_the_steps_stop_with_a_checkpoint_and_are_not_requeued() {
    if !slurm() {
        return;
    }
    let job = Job::new("scancel", SHORT_EPOCHS);
    // A SIGTERM to the steps alone (what preemption with a GraceTime sends): the ranks
    // checkpoint, the summary names SIGTERM, and the script does not requeue (SLURM
    // requeues a job it preempts, or ends it, as it was configured).
    let id = job.submit();
    wait_checkpoint(&job, &id, 0);
    let ok = Command::new("scancel")
        .args(["--signal=TERM", &id])
        .status()
        .unwrap();
    assert!(ok.success());
    let (state, restarts) = wait_end(&job, &id, Duration::from_secs(120));
    let log = job.log(&id);
    assert_eq!((state.as_str(), restarts), ("COMPLETED", 0), "{log}");
    let s = job.summaries(&id);
    assert_eq!(s.len(), 1, "{log}");
    assert_eq!(
        (&s[0]["stopped_by"], &s[0]["stop_signal"]),
        (&"signal".into(), &"SIGTERM".into()),
        "{log}"
    );
    assert!(!log.contains("requeueing"), "{log}");
    job.assert_clean();
    // scancel: the batch script, cancelled too, prints the summary of the stop and does
    // not requeue a job its user cancelled.
    let id = job.submit();
    let before = checkpoints_committed(&job);
    wait_checkpoint(&job, &id, before);
    assert!(Command::new("scancel").arg(&id).status().unwrap().success());
    let (state, restarts) = wait_end(&job, &id, Duration::from_secs(120));
    let log = job.log(&id);
    assert_eq!((state.as_str(), restarts), ("CANCELLED", 0), "{log}");
    let s = job.summaries(&id);
    assert_eq!(s.len(), 1, "{log}");
    assert_eq!(s[0]["stopped_by"], "signal", "{log}");
    assert!(!log.contains("requeueing"), "{log}");
    job.assert_clean();
    // The same submission again continues from the checkpoint.
    let id = job.submit();
    let (state, _) = wait_end(&job, &id, Duration::from_secs(300));
    assert_eq!(state, "COMPLETED", "{}", job.log(&id));
    let s = job.summaries(&id);
    assert_same("scancel", s.last().unwrap(), reference(SHORT_EPOCHS));
    assert_eq!(s.last().unwrap()["coordinator_restarts"], 2);
    job.assert_clean();
}

#[test]
fn slurm_a_killed_worker_step_is_started_again_and_the_run_ends_as_without_it() {
    if !slurm() {
        return;
    }
    let job = Job::new("dead-worker", SHORT_EPOCHS);
    let id = job.submit();
    wait_checkpoint(&job, &id, 0);
    // SIGKILL rank 1's process: its step fails, the script starts it again, the group
    // re-forms from the last checkpoint.
    let bin = env!("CARGO_BIN_EXE_lightrnn");
    let o = Command::new("pgrep")
        .args(["-f", &format!("{bin} worker .* --rank 1 ")])
        .output()
        .unwrap();
    let pids = String::from_utf8_lossy(&o.stdout).to_string();
    let port = 20000 + 2 * (id.parse::<u64>().unwrap() % 6000);
    // The worker itself, not the srun that launched it (its arguments hold the same).
    let pid = pids
        .lines()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.split('\0').next() == Some(bin) && c.contains(&format!(":{port}")))
        })
        .unwrap_or_else(|| panic!("no rank 1 of job {id} among {pids:?}"));
    assert!(
        Command::new("kill")
            .args(["-KILL", pid])
            .status()
            .unwrap()
            .success()
    );
    let (state, restarts) = wait_end(&job, &id, Duration::from_secs(300));
    let log = job.log(&id);
    assert_eq!((state.as_str(), restarts), ("COMPLETED", 0), "{log}");
    assert!(log.contains("rank 1's step ended with status"), "{log}");
    let s = job.summaries(&id);
    assert_eq!(s.len(), 1, "{log}");
    assert_same("dead-worker", &s[0], reference(SHORT_EPOCHS));
    assert_eq!(s[0]["generation"], 2, "{}", s[0]);
    job.assert_clean();
}

#[test]
fn slurm_two_jobs_share_the_node_and_twenty_submissions_all_start() {
    if !slurm() {
        return;
    }
    let want = reference(SHORT_EPOCHS);
    // Two whole jobs at once on the one node: each its own ports.
    let (a, b) = (
        Job::new("pair-a", SHORT_EPOCHS),
        Job::new("pair-b", SHORT_EPOCHS),
    );
    let (ia, ib) = (a.submit(), b.submit());
    let t0 = Instant::now();
    while !(state(&ia) == "RUNNING" && state(&ib) == "RUNNING") {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the two jobs never ran together"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for (job, id) in [(&a, &ia), (&b, &ib)] {
        let (state, _) = wait_end(job, id, Duration::from_secs(300));
        assert_eq!(state, "COMPLETED", "{}", job.log(id));
        assert_same(job.name, job.summaries(id).last().unwrap(), want);
        job.assert_clean();
    }
    // 20 submissions of a short job: every one starts its steps and ends (the
    // coordinator's and the workers' steps never take each other's memory).
    let names: Vec<String> = (0..20).map(|i| format!("burst-{i:02}")).collect();
    let jobs: Vec<Job> = names
        .iter()
        .map(|n| Job {
            env: &[("ARGS", "--set max_steps=200")],
            ..Job::new(n, 1)
        })
        .collect();
    let ids: Vec<String> = jobs.iter().map(|j| j.submit()).collect();
    for (job, id) in jobs.iter().zip(&ids) {
        let (state, _) = wait_end(job, id, Duration::from_secs(400));
        let log = job.log(id);
        assert_eq!(state, "COMPLETED", "{log}");
        assert!(!log.contains("srun: error"), "{log}");
        assert_eq!(job.summaries(id).len(), 1, "{log}");
        job.assert_clean();
    }
}

#[test]
fn slurm_a_failing_coordinator_is_reported_and_a_grace_past_killwait_is_refused() {
    if !slurm() {
        return;
    }
    // Data that does not exist: the coordinator fails, the script says it wrote no
    // summary, leaves nothing behind and the job ends FAILED (not requeued).
    let job = Job {
        env: &[("DATA", "/nonexistent/corpus")],
        ..Job::new("bad-data", 1)
    };
    let id = job.submit();
    let (state, restarts) = wait_end(&job, &id, Duration::from_secs(120));
    let log = job.log(&id);
    assert_eq!((state.as_str(), restarts), ("FAILED", 0), "{log}");
    assert!(
        log.contains("the coordinator wrote no summary (status 1)"),
        "{log}"
    );
    assert!(log.contains("/nonexistent/corpus"), "{log}");
    job.assert_clean();
    // A grace the scheduler's SIGKILL would cut short.
    let job = Job {
        env: &[("GRACE_S", "45")],
        ..Job::new("long-grace", 1)
    };
    let id = job.submit();
    let (state, _) = wait_end(&job, &id, Duration::from_secs(60));
    let log = job.log(&id);
    assert_eq!(state, "FAILED", "{log}");
    assert!(
        log.contains("GRACE_S=45 is not below the cluster's KillWait (30 s)"),
        "{log}"
    );
}

/// Wait for a job that is not an array to complete; its log if it fails or can never
/// start (a part it depends on failed).
fn wait_completed(id: &str, dir: &Path, limit: Duration) {
    let t0 = Instant::now();
    loop {
        let f = job_fields(id);
        let (s, reason) = (
            f.get("JobState").cloned().unwrap_or_default(),
            f.get("Reason").cloned().unwrap_or_default(),
        );
        if s == "COMPLETED" && !completing(id) {
            return;
        }
        let logs = || {
            let mut all = String::new();
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.extension().is_some_and(|x| x == "log") {
                    all += &format!(
                        "== {}\n{}",
                        p.display(),
                        std::fs::read_to_string(&p).unwrap()
                    );
                }
            }
            all
        };
        assert!(
            !["FAILED", "CANCELLED", "TIMEOUT"].contains(&s.as_str())
                && reason != "DependencyNeverSatisfied",
            "job {id}: {s} ({reason}); the logs:\n{}",
            logs()
        );
        assert!(
            t0.elapsed() < limit,
            "job {id} still {s} after {limit:?}:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn slurm_array_jobs_prepare_the_one_process_dataset() {
    if !slurm() {
        return;
    }
    // C4-like gzipped JSON lines for train, one file each for valid and test; 3 parts.
    let dir = fixture().dir.path().join("prepare");
    let corpus = dir.join("corpus");
    common::jsonl_gz_corpus(&corpus.join("train"), "c4-train", 7, 3);
    common::jsonl_gz_corpus(&corpus.join("validation"), "c4-validation", 2, 4);
    let valid = corpus.join("validation/c4-validation.00000-of-00002.json.gz");
    let test = corpus.join("validation/c4-validation.00001-of-00002.json.gz");
    let (out, one) = (dir.join("slurm"), dir.join("one"));
    let o = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/slurm/prepare.sh"))
        .args(["--cpus-per-task=1", "--mem-per-cpu=256M"])
        .arg(format!("--output={}/%x-%A_%a.log", dir.display()))
        .arg(format!("--chdir={}", dir.display()))
        .env("PARTS", "3")
        .env("OUT", &out)
        .env("INPUT_train", corpus.join("train"))
        .env("INPUT_valid", &valid)
        .env("INPUT_test", &test)
        .env("ARGS", "--lowercase")
        .env("SIZE", "30")
        .env("LIGHTRNN", env!("CARGO_BIN_EXE_lightrnn"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "prepare.sh: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let ids = common::json(&String::from_utf8_lossy(&o.stdout));
    for split in ["train", "valid", "test"] {
        let id = ids[format!("{split}_merge")].as_str().unwrap();
        wait_completed(id, &dir, Duration::from_secs(240));
    }
    // The same dataset, one process per command.
    let train = corpus.join("train");
    let run = |args: &[&str]| {
        let (code, _, err) = common::lightrnn(args);
        assert_eq!(code, 0, "{err}");
    };
    let one_s = one.to_str().unwrap();
    run(&[
        "vocab",
        "--input",
        train.to_str().unwrap(),
        "--out",
        one_s,
        "--size",
        "30",
        "--lowercase",
    ]);
    for (split, input) in [("train", &train), ("valid", &valid), ("test", &test)] {
        run(&[
            "shard",
            "--input",
            input.to_str().unwrap(),
            "--vocab",
            one_s,
            "--out",
            one_s,
            "--split",
            split,
            "--lowercase",
        ]);
    }
    common::assert_same_dataset(&out, &one);
    // One part run again alone, as a lost task is (PARTS=3 sbatch --array=1 ...): it
    // replaces its own counts, and the merge gives the same vocabulary.
    let counts = out.join("parts/vocab.part-00001-of-00003.tsv");
    let before = std::fs::metadata(&counts).unwrap().modified().unwrap();
    let o = Command::new("sbatch")
        .args([
            "--parsable",
            "--export=ALL",
            "--array=1",
            "--cpus-per-task=1",
            "--mem-per-cpu=256M",
        ])
        .arg(format!("--output={}/%x-%A_%a.log", dir.display()))
        .arg(format!("--chdir={}", dir.display()))
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/slurm/prepare.sbatch"))
        .arg("vocab-part")
        .env("PARTS", "3")
        .env("OUT", &out)
        .env("INPUT_train", corpus.join("train"))
        .env("ARGS", "--lowercase")
        .env("LIGHTRNN", env!("CARGO_BIN_EXE_lightrnn"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "sbatch: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    wait_completed(&id, &dir, Duration::from_secs(120));
    assert!(std::fs::metadata(&counts).unwrap().modified().unwrap() > before);
    let parts: Vec<String> = std::fs::read_dir(out.join("parts"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        parts.iter().all(|p| p.ends_with("-of-00003.tsv")),
        "{parts:?}"
    );
    let vocab = std::fs::read(out.join("vocab.txt")).unwrap();
    let (code, _, err) = common::lightrnn(&[
        "vocab",
        "--input",
        train.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--merge",
        "--size",
        "30",
        "--lowercase",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(std::fs::read(out.join("vocab.txt")).unwrap() == vocab);
}
