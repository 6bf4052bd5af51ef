//! Faults between hosts: a coordinator and two workers, each in a network namespace of its
//! own (common::netns) at its own address, over TLS with a bearer token. Each case makes
//! one kind of fault (packet loss, a link down, partitions, a frozen worker, coordinator
//! and whole-job restarts) and must end with the figures and parameters of the same job
//! without faults, run once in the same harness and shared by the cases. The kernel here
//! has no netem: faults are links down, iptables drops (all packets, or a random share)
//! and signals; there is no delay. Every process's stderr goes to a file in the case's
//! directory (target/tmp/netns-PID/CASE/, kept until the next run) and `expect_log`
//! holds each fault to the lines that explain it. The cases run one at a time (a lock):
//! their timeouts are short and the machine's cores few.
//!
//! Needs root, `ip netns` and iptables: without them each case prints why and passes,
//! unless LIGHTRNN_REQUIRE_NETNS=1 (CI), where it fails.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

mod common;
use common::netns::{Fault, Host, Net, Proc, tail, usable};
use common::{corpus, json, pki};

/// Heartbeat interval: the coordinator loses a worker silent for 5 of them, a worker
/// gives up on a coordinator silent for 3.
const HEARTBEAT_MS: u64 = 1000;
/// Deadline of the workers' collective reads and writes.
const COLLECTIVE_S: u64 = 6;
const PORT: u16 = 29400;
/// The longest a case's job may take.
const CASE_LIMIT: Duration = Duration::from_secs(240);

/// What the cases share: the corpus, the PKI, the token, the fault-free run's summary.
struct Fixture {
    dir: PathBuf,
    clean: serde_json::Value,
}

static FIXTURE: OnceLock<Fixture> = OnceLock::new();
static SERIAL: Mutex<()> = Mutex::new(());

/// One case at a time; None (skip) where hosts cannot be made.
fn serial(test: &str) -> Option<MutexGuard<'static, ()>> {
    if !usable(test) {
        return None;
    }
    Some(SERIAL.lock().unwrap_or_else(|e| e.into_inner()))
}

/// The shared fixture, made by the first case that asks (under the lock).
fn fixture() -> &'static Fixture {
    FIXTURE.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
        remove_stale(root);
        let dir = root.join(format!("netns-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        corpus(&dir.join("text"), 6000);
        pki(&dir.join("pki"), "IP:10.36.0.1");
        std::fs::write(dir.join("token"), "netns-test-token-0123456789\n").unwrap();
        let mut fx = Fixture {
            dir,
            clean: serde_json::Value::Null,
        };
        let t0 = Instant::now();
        let mut j = Job::start(&fx, "clean");
        fx.clean = j.run_to_end();
        eprintln!("netns: the fault-free run: {:.1} s: {}", secs(t0), fx.clean);
        fx
    })
}

/// Fixture directories of earlier test processes that have exited.
fn remove_stale(root: &Path) {
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("netns-")
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn secs(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64()
}

/// A job on three hosts: `c` serves it, `w[0]` and `w[1]` train (ranks 0 and 1).
struct Job {
    // Fields drop in order: the processes before the net they run in.
    coord: Proc,
    workers: Vec<Proc>,
    /// Workers the test started again because they had exited during the run.
    pub restarted: Vec<String>,
    t0: Instant,
    case: PathBuf,
    fx: PathBuf,
    c: Host,
    w: Vec<Host>,
    net: Net,
}

impl Job {
    /// The hosts, the coordinator and both workers of case `name`.
    fn start(fx: &Fixture, name: &str) -> Job {
        let case = fx.dir.join(name);
        std::fs::create_dir_all(&case).unwrap();
        let mut net = Net::new(name);
        let c = net.host("c");
        // The PKI's server certificate names 10.36.0.1: the net's first host.
        assert_eq!(c.addr.to_string(), "10.36.0.1");
        let w = vec![net.host("w0"), net.host("w1")];
        let coord = spawn_coordinator(&net, &c, &fx.dir, &case, false);
        let workers = (0..2)
            .map(|r| spawn_worker(&net, &w[r], &fx.dir, &case, r))
            .collect();
        Job {
            coord,
            workers,
            restarted: Vec::new(),
            t0: Instant::now(),
            case,
            fx: fx.dir.clone(),
            c,
            w,
            net,
        }
    }

    fn log(&self, host: &str) -> PathBuf {
        self.case.join(format!("{host}.log"))
    }

    /// A process's whole log.
    fn text(&self, host: &str) -> String {
        std::fs::read_to_string(self.log(host)).unwrap_or_default()
    }

    /// Wait until `done`, at most `limit`, starting again any worker that exits with an
    /// error meanwhile (see `supervise`).
    fn wait_for(&mut self, what: &str, limit: Duration, done: impl Fn(&mut Job) -> bool) {
        let t0 = Instant::now();
        while !done(self) {
            self.supervise();
            assert!(
                t0.elapsed() < limit,
                "{what}: not within {limit:?}; coordinator:\n{}",
                tail(&self.log("c"), 40)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Start again a worker that exited with an error while the coordinator runs (today
    /// a worker exits when its join finds no coordinator); recorded in `restarted`.
    fn supervise(&mut self) {
        if self.coord.exited().is_some() {
            return;
        }
        for r in 0..2 {
            if let Some(s) = self.workers[r].exited()
                && !s.success()
            {
                let at = secs(self.t0);
                self.restarted.push(format!("w{r} ({s}) at {at:.1} s"));
                self.start_worker(r);
            }
        }
    }

    /// The step of the newest committed checkpoint (its manifest written), 0 if none.
    fn newest_checkpoint(&self) -> u64 {
        let Ok(rd) = std::fs::read_dir(self.case.join("run/checkpoints")) else {
            return 0;
        };
        rd.flatten()
            .filter(|e| e.path().join("meta.json").exists())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_prefix("step-")?.parse::<u64>().ok()
            })
            .max()
            .unwrap_or(0)
    }

    /// Wait until a checkpoint is committed: the group trains.
    fn wait_training(&mut self) {
        self.wait_for("the first checkpoint", Duration::from_secs(90), |j| {
            j.newest_checkpoint() > 0
        });
    }

    /// SIGKILL the coordinator (and reap it) while the job runs.
    fn kill_coordinator(&mut self) {
        assert!(
            self.coord.exited().is_none(),
            "the job ended before the coordinator was killed"
        );
        self.coord.kill();
    }

    /// The coordinator again, with the same flags and `--resume`.
    fn restart_coordinator(&mut self) {
        assert!(self.coord.exited().is_some(), "the coordinator still runs");
        self.coord = spawn_coordinator(&self.net, &self.c, &self.fx, &self.case, true);
    }

    /// SIGKILL worker `r` while it runs.
    fn kill_worker(&mut self, r: usize) {
        assert!(
            self.workers[r].exited().is_none(),
            "w{r} ended before the kill"
        );
        self.workers[r].kill();
    }

    fn start_worker(&mut self, r: usize) {
        self.workers[r] = spawn_worker(&self.net, &self.w[r], &self.fx, &self.case, r);
    }

    /// Wait for the coordinator to end the job, starting again any worker that exits
    /// with an error before then (recorded in `restarted`); then every process must have
    /// succeeded. The coordinator's summary.
    fn run_to_end(&mut self) -> serde_json::Value {
        self.wait_for("the end of the job", CASE_LIMIT, |j| {
            j.coord.exited().is_some()
        });
        let status = self.coord.exited().unwrap();
        assert!(
            status.success(),
            "the coordinator failed ({status}):\n{}",
            tail(&self.log("c"), 40)
        );
        for w in &mut self.workers {
            let s = w.wait_within(Duration::from_secs(30));
            assert!(
                s.success(),
                "{} failed ({s}):\n{}",
                w.what,
                tail(&w.log, 40)
            );
        }
        json(&self.coord.last_line())
    }
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn spawn_coordinator(net: &Net, c: &Host, fx: &Path, case: &Path, resume: bool) -> Proc {
    let p = |n: &str| fx.join(n).to_str().unwrap().to_string();
    let mut a = s(&[
        "coordinator",
        "--preset",
        "tiny",
        "--set",
        "grad_groups=2",
        "--set",
        "threads=1",
        "--set",
        "epochs=6",
        "--set",
        "checkpoint_every=100",
        "--world-size",
        "2",
        "--join-timeout-s",
        "120",
        "--max-restarts",
        "50",
    ]);
    a.extend([
        "--data".into(),
        p("text"),
        "--out".into(),
        case.join("run").to_str().unwrap().into(),
        "--listen".into(),
        format!("{}:{PORT}", c.addr),
        "--heartbeat-ms".into(),
        HEARTBEAT_MS.to_string(),
        "--collective-timeout-s".into(),
        COLLECTIVE_S.to_string(),
        "--token-file".into(),
        p("token"),
        "--tls-cert".into(),
        p("pki/server.pem"),
        "--tls-key".into(),
        p("pki/server.key"),
    ]);
    if resume {
        a.push("--resume".into());
    }
    net.spawn(c, env!("CARGO_BIN_EXE_lightrnn"), &a, &case.join("c"))
}

fn spawn_worker(net: &Net, w: &Host, fx: &Path, case: &Path, rank: usize) -> Proc {
    let p = |n: &str| fx.join(n).to_str().unwrap().to_string();
    let a = vec![
        "worker".into(),
        "--coordinator".into(),
        format!("https://10.36.0.1:{PORT}"),
        "--tls-ca".into(),
        p("pki/ca.pem"),
        "--token-file".into(),
        p("token"),
        "--threads".into(),
        "1".into(),
        "--rank".into(),
        rank.to_string(),
        "--connect-timeout-s".into(),
        "60".into(),
    ];
    net.spawn(w, env!("CARGO_BIN_EXE_lightrnn"), &a, &case.join(&w.name))
}

/// The coordinator's cause of a lost worker says where the worker was when last heard
/// (the step of its last heartbeat: 0 when it was lost within a heartbeat of starting,
/// as these fast runs can be).
fn expect_last_step(log: &Path) {
    expect_log(log, "last heard at step");
}

/// The log holds a line with `needle` (what explains a fault); its first such line.
fn expect_log(log: &Path, needle: &str) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    match text.lines().find(|l| l.contains(needle)) {
        Some(l) => l.to_string(),
        None => panic!(
            "{}: no line with {needle:?}; its end:\n{}",
            log.display(),
            tail(log, 40)
        ),
    }
}

/// The run ended where the fault-free one did: figures, steps and parameters (and, with
/// `tokens`, every epoch's tokens counted once).
fn ends_as(s: &serde_json::Value, clean: &serde_json::Value, what: &str, tokens: bool) {
    let mut keys = vec![
        "valid_ppl",
        "test_ppl",
        "train_loss",
        "steps",
        "params_sha256",
    ];
    if tokens {
        keys.push("tokens_accounted");
    }
    for k in keys {
        assert_eq!(s[k], clean[k], "{what}: {k}: {s} vs {clean}");
    }
}

/// The warnings and errors of each process's log, and its last words when it failed
/// (printed with the case, for the record of what each fault says).
fn warnings(case: &Path) -> String {
    let mut out = String::new();
    for h in ["c", "w0", "w1"] {
        let text = std::fs::read_to_string(case.join(format!("{h}.log"))).unwrap_or_default();
        for l in text.lines().filter(|l| {
            l.contains(" WARN ")
                || l.contains(" ERROR ")
                || l.starts_with("error:")
                || l.starts_with("===")
        }) {
            // A start's line without its arguments.
            let l = l.split(": [").next().unwrap_or(l);
            out.push_str(&format!("  {h}: {l}\n"));
        }
    }
    out
}

/// Run case `name`: start the job, let `fault` act on it, run it to the end; it must end
/// as the fault-free run (`tokens`: with the same token accounting). Prints the case's
/// wall time, the workers the test restarted and the logs' warnings; returns the job
/// (its logs) and its summary.
fn case(
    name: &str,
    tokens: bool,
    fault: impl FnOnce(&mut Job),
) -> Option<(Job, serde_json::Value)> {
    let _serial = serial(name)?;
    let fx = fixture();
    let t0 = Instant::now();
    let mut job = Job::start(fx, name);
    fault(&mut job);
    let s = job.run_to_end();
    eprintln!(
        "netns case {name}: {:.1} s, generation {}, restarts {}, workers restarted by the test: {:?}\n{}",
        secs(t0),
        s["generation"],
        s["restarts"],
        job.restarted,
        warnings(&job.case)
    );
    ends_as(&s, &fx.clean, name, tokens);
    Some((job, s))
}

/// (1) 1 % of the packets into every host dropped for the whole run (iptables statistic;
/// no delay: the kernel has no netem).
#[test]
fn netns_one_percent_loss_on_every_link() {
    case("loss1", true, |j| {
        for h in [&j.c, &j.w[0], &j.w[1]] {
            j.net.apply(&Fault::Loss {
                into: h,
                share: 0.01,
            });
        }
        j.wait_training();
    });
}

/// (2) A worker's link down for less than the heartbeat timeout (TCP carries the job
/// over it: no re-form), and for more (the coordinator loses the worker, the group
/// re-forms from the last checkpoint).
#[test]
fn netns_a_worker_s_link_down_briefly_and_beyond_the_heartbeat_timeout() {
    let short = Duration::from_millis(HEARTBEAT_MS);
    if let Some((_, s)) = case("linkshort", true, |j| {
        j.wait_training();
        j.net.during(&Fault::LinkDown(&j.w[1]), short);
    }) {
        assert_eq!(s["generation"], 1, "{s}");
    }
    let long = Duration::from_millis(HEARTBEAT_MS * 8);
    if let Some((j, _)) = case("linklong", true, |j| {
        j.wait_training();
        j.net.during(&Fault::LinkDown(&j.w[1]), long);
    }) {
        expect_log(&j.log("c"), "generation ended: the group re-forms");
        expect_log(&j.log("c"), "rank 1 (10.36.0.3:");
        expect_log(&j.log("c"), "sent no heartbeat for");
        expect_last_step(&j.log("c"));
        expect_log(&j.log("w1"), "the coordinator has not answered heartbeats");
        expect_log(&j.log("w1"), "the group broke: joining again");
    }
}

/// (3) The workers cut off from each other (the coordinator reaches both) for less than
/// the collective deadline (no re-form), and for more (the ring's reads time out).
#[test]
fn netns_the_workers_cut_off_from_each_other_within_and_beyond_the_collective_deadline() {
    if let Some((j, s)) = case("cutshort", true, |j| {
        j.wait_training();
        j.net.during(
            &Fault::Cut(&j.w[0], &j.w[1]),
            Duration::from_secs(COLLECTIVE_S / 3),
        );
    }) {
        assert_eq!(s["generation"], 1, "{s}");
        // Survived, and seen: a stall warned about while it lasted, and its end.
        let both = format!("{}{}", j.text("w0"), j.text("w1"));
        assert!(
            both.contains("waiting for") && both.contains("a stall past"),
            "{both}"
        );
        assert!(both.contains("answered after"), "{both}");
    }
    if let Some((j, _)) = case("cutlong", true, |j| {
        j.wait_training();
        j.net.during(
            &Fault::Cut(&j.w[0], &j.w[1]),
            Duration::from_secs(COLLECTIVE_S * 3 / 2),
        );
    }) {
        expect_log(&j.log("c"), "generation ended: the group re-forms");
        for w in ["w0", "w1"] {
            expect_log(&j.log(w), "the group broke: joining again");
        }
        // The deadline says it was the deadline, after the stall warnings.
        let both = format!("{}{}", j.text("w0"), j.text("w1"));
        assert!(
            both.contains("the collective deadline (--collective-timeout-s)"),
            "{both}"
        );
        assert!(both.contains("a stall past"), "{both}");
        assert!(!both.contains("Resource temporarily unavailable"), "{both}");
    }
}

/// (4) A worker cut off from the coordinator, not from the other worker, beyond the
/// heartbeat timeout.
#[test]
fn netns_a_worker_partitioned_from_the_coordinator_only() {
    if let Some((j, _)) = case("partition", true, |j| {
        j.wait_training();
        j.net.during(
            &Fault::Cut(&j.w[1], &j.c),
            Duration::from_millis(HEARTBEAT_MS * 8),
        );
    }) {
        expect_log(&j.log("c"), "generation ended: the group re-forms");
        expect_log(&j.log("c"), "sent no heartbeat for");
        expect_last_step(&j.log("c"));
        for w in ["w0", "w1"] {
            expect_log(&j.log(w), "the group broke: joining again");
        }
        // The cut-off worker hears no heartbeat answer either, and says so.
        expect_log(&j.log("w1"), "the coordinator has not answered heartbeats");
    }
}

/// (5) A worker frozen (SIGSTOP) beyond the heartbeat timeout, then thawed (SIGCONT).
#[test]
fn netns_a_worker_frozen_beyond_the_heartbeat_timeout_then_thawed() {
    if let Some((j, _)) = case("sigstop", true, |j| {
        j.wait_training();
        j.workers[1].signal("STOP");
        std::thread::sleep(Duration::from_millis(HEARTBEAT_MS * 8));
        j.workers[1].signal("CONT");
    }) {
        expect_log(&j.log("c"), "generation ended: the group re-forms");
        expect_log(&j.log("c"), "sent no heartbeat for");
        expect_last_step(&j.log("c"));
        expect_log(&j.log("w1"), "the group broke: joining again");
        // The frozen worker says it did not run, and blames neither the coordinator nor
        // its peer's deadline for its own freeze.
        expect_log(&j.log("w1"), "did not run for");
        let w1 = j.text("w1");
        assert!(!w1.contains("has not answered heartbeats"), "{w1}");
        assert!(!w1.contains("the collective deadline"), "{w1}");
    }
}

/// (6) 30 % of the packets into one worker dropped for a few seconds.
#[test]
fn netns_thirty_percent_loss_into_one_worker_for_seconds() {
    case("loss30", true, |j| {
        j.wait_training();
        let f = Fault::Loss {
            into: &j.w[1],
            share: 0.3,
        };
        j.net.during(&f, Duration::from_secs(6));
    });
}

/// What a resumed job's workers say: they lost their group, and resumed a checkpoint.
fn expect_resumed(j: &Job) {
    for w in ["w0", "w1"] {
        expect_log(&j.log(w), "resuming checkpoint=");
    }
}

/// What a restarted coordinator's job says: its workers stayed (the test restarted
/// none), the coordinator continued the run, and the counters cover the whole run.
fn expect_continued(j: &Job, s: &serde_json::Value, restarts: u64) {
    assert!(
        j.restarted.is_empty(),
        "workers restarted: {:?}",
        j.restarted
    );
    expect_log(&j.log("c"), "a coordinator of this run ran before");
    assert_eq!(s["coordinator_restarts"], restarts, "{s}");
    assert_eq!(
        s["checkpoints_committed"],
        fixture().clean["checkpoints_committed"],
        "{s}"
    );
    assert_eq!(
        s["restarts"],
        serde_json::json!({}),
        "no ghost failure: {s}"
    );
}

/// (7) The coordinator SIGKILLed and started again with `--resume` (same flags, same
/// out directory) after 2 s, and at once: the workers wait for it and rejoin.
#[test]
fn netns_the_coordinator_killed_and_resumed_after_a_pause_and_at_once() {
    for (name, pause) in [("coordpause", 2000), ("coordnow", 0)] {
        if let Some((j, s)) = case(name, true, |j| {
            j.wait_training();
            j.kill_coordinator();
            std::thread::sleep(Duration::from_millis(pause));
            j.restart_coordinator();
        }) {
            for w in ["w0", "w1"] {
                expect_log(&j.log(w), "the group broke: joining again");
                if pause > 0 {
                    expect_log(&j.log(w), "nothing listens at");
                    assert!(!j.text(w).contains("TLS handshake"), "{}", j.text(w));
                }
            }
            expect_resumed(&j);
            expect_continued(&j, &s, 1);
        }
    }
}

/// (8) The coordinator killed and resumed twice in one run.
#[test]
fn netns_the_coordinator_restarted_twice_in_one_run() {
    if let Some((j, s)) = case("coordtwice", true, |j| {
        j.wait_training();
        j.kill_coordinator();
        j.restart_coordinator();
        let first = j.newest_checkpoint();
        j.wait_for(
            "a checkpoint after the first restart",
            Duration::from_secs(90),
            |j| j.newest_checkpoint() > first,
        );
        j.kill_coordinator();
        std::thread::sleep(Duration::from_secs(1));
        j.restart_coordinator();
    }) {
        expect_resumed(&j);
        expect_continued(&j, &s, 2);
    }
}

/// (9) Every process killed, then all started again (the coordinator with --resume).
#[test]
fn netns_every_process_killed_and_all_resumed() {
    if let Some((j, s)) = case("killall", true, |j| {
        j.wait_training();
        j.kill_coordinator();
        j.kill_worker(0);
        j.kill_worker(1);
        std::thread::sleep(Duration::from_secs(1));
        j.restart_coordinator();
        j.start_worker(0);
        j.start_worker(1);
    }) {
        expect_resumed(&j);
        assert_eq!(s["coordinator_restarts"], 1, "{s}");
    }
}
