//! Hosts as Linux network namespaces, for tests of several machines on one: a `Net` is a
//! bridge in a namespace of its own with one veth pair per `Host` (10.36.0.k/24, private
//! to the net, so nets of tests that run at once never meet); `Fault`s are what the
//! kernel offers without netem (a switch port down, iptables drops of all packets
//! between two hosts or of a random share of those into one: no delay, no reordering);
//! `Proc` is a process started inside a host with `ip netns exec`, its stdout and stderr
//! appended to files, killed when dropped. Dropping the `Net` kills what still runs in
//! its namespaces and deletes them, on a panic too.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Why hosts cannot be made here (not root, no `ip netns`, no iptables), or None; asked
/// once per process.
pub fn unavailable() -> Option<String> {
    static WHY: OnceLock<Option<String>> = OnceLock::new();
    WHY.get_or_init(probe).clone()
}

fn probe() -> Option<String> {
    let uid = match Command::new("id").arg("-u").output() {
        Ok(o) => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        Err(e) => return Some(format!("no `id` command: {e}")),
    };
    if uid != "0" {
        return Some("not root (network namespaces need CAP_SYS_ADMIN and CAP_NET_ADMIN)".into());
    }
    // What a net needs, tried in a namespace of its own: a bridge, a veth pair, iptables
    // with the statistic match.
    let ns = format!("l36-probe-{}", std::process::id());
    let steps: [&[&str]; 4] = [
        &["ip", "netns", "add", &ns],
        &["ip", "-n", &ns, "link", "add", "br0", "type", "bridge"],
        &[
            "ip", "-n", &ns, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1",
        ],
        &[
            "ip",
            "netns",
            "exec",
            &ns,
            "iptables",
            "-A",
            "INPUT",
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            "0.5",
            "-j",
            "DROP",
        ],
    ];
    let mut why = None;
    for step in steps {
        match Command::new(step[0]).args(&step[1..]).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
                why = Some(format!("`{}` fails: {err}", step.join(" ")));
                break;
            }
            Err(e) => {
                why = Some(format!(
                    "no `{}` command (iproute2, iptables): {e}",
                    step[0]
                ));
                break;
            }
        }
    }
    let _ = Command::new("ip").args(["netns", "del", &ns]).output();
    why
}

/// Whether a test that needs hosts may run: true where they can be made; otherwise it
/// prints why and returns false (skip), or panics when LIGHTRNN_REQUIRE_NETNS=1 (CI).
pub fn usable(test: &str) -> bool {
    let Some(why) = unavailable() else {
        return true;
    };
    if std::env::var("LIGHTRNN_REQUIRE_NETNS").as_deref() == Ok("1") {
        panic!("{test}: LIGHTRNN_REQUIRE_NETNS=1 but hosts cannot be made: {why}");
    }
    eprintln!("{test}: skipped: {why}");
    false
}

/// Runs a command to success, or panics with its stderr.
pub fn sh(args: &[&str]) {
    let o = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A machine: a network namespace with one interface, eth0, at `addr`.
#[derive(Clone, Debug)]
pub struct Host {
    pub name: String,
    pub ns: String,
    pub addr: Ipv4Addr,
    /// The bridge's end of this host's cable.
    port: String,
}

/// What can go wrong between hosts.
#[derive(Clone, Copy, Debug)]
pub enum Fault<'a> {
    /// The host's switch port is down: its interface loses carrier, packets to and from
    /// it vanish (no error reaches its sockets).
    LinkDown(&'a Host),
    /// Every packet between the two hosts is dropped (both directions), the rest of the
    /// net unchanged.
    Cut(&'a Host, &'a Host),
    /// Each packet that arrives at the host is dropped with probability `share`.
    Loss { into: &'a Host, share: f64 },
}

/// A bridge and the hosts on it; deleted with everything in it when dropped.
pub struct Net {
    prefix: String,
    bridge: String,
    hosts: Vec<Host>,
}

static NETS: AtomicUsize = AtomicUsize::new(0);

impl Net {
    /// A bridge in a namespace of its own, named after this process and `tag`.
    pub fn new(tag: &str) -> Net {
        let n = NETS.fetch_add(1, Ordering::Relaxed);
        let tag: String = tag
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(12)
            .collect();
        let prefix = format!("l36-{}-{n}-{tag}", std::process::id());
        let bridge = format!("{prefix}-br");
        sh(&["ip", "netns", "add", &bridge]);
        let net = Net {
            prefix,
            bridge,
            hosts: Vec::new(),
        };
        net.ip(&net.bridge, &["link", "add", "br0", "type", "bridge"]);
        net.ip(&net.bridge, &["link", "set", "br0", "up"]);
        net
    }

    fn ip(&self, ns: &str, args: &[&str]) {
        let mut a = vec!["ip", "-n", ns];
        a.extend_from_slice(args);
        sh(&a);
    }

    /// A new host on the bridge, at 10.36.0.k for the k-th host.
    pub fn host(&mut self, name: &str) -> Host {
        let k = self.hosts.len() + 1;
        assert!(k < 255, "at most 254 hosts on a net");
        let h = Host {
            name: name.to_string(),
            ns: format!("{}-{name}", self.prefix),
            addr: Ipv4Addr::new(10, 36, 0, k as u8),
            port: format!("p{k}"),
        };
        sh(&["ip", "netns", "add", &h.ns]);
        self.hosts.push(h.clone());
        sh(&[
            "ip",
            "link",
            "add",
            "eth0",
            "netns",
            &h.ns,
            "type",
            "veth",
            "peer",
            "name",
            &h.port,
            "netns",
            &self.bridge,
        ]);
        self.ip(&self.bridge, &["link", "set", &h.port, "master", "br0"]);
        self.ip(&self.bridge, &["link", "set", &h.port, "up"]);
        let cidr = format!("{}/24", h.addr);
        self.ip(&h.ns, &["addr", "add", &cidr, "dev", "eth0"]);
        self.ip(&h.ns, &["link", "set", "eth0", "up"]);
        self.ip(&h.ns, &["link", "set", "lo", "up"]);
        h
    }

    /// The iptables rules of a fault: (namespace, rule after the chain's operation).
    fn rules(f: &Fault) -> Vec<(String, Vec<String>)> {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        match *f {
            Fault::LinkDown(_) => Vec::new(),
            Fault::Cut(a, b) => {
                let b = b.addr.to_string();
                vec![
                    (a.ns.clone(), s(&["INPUT", "-s", &b, "-j", "DROP"])),
                    (a.ns.clone(), s(&["OUTPUT", "-d", &b, "-j", "DROP"])),
                ]
            }
            Fault::Loss { into, share } => {
                let p = format!("{share}");
                let r = [
                    "INPUT",
                    "-i",
                    "eth0",
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    &p,
                    "-j",
                    "DROP",
                ];
                vec![(into.ns.clone(), s(&r))]
            }
        }
    }

    /// Make the fault happen (until `heal`).
    pub fn apply(&self, f: &Fault) {
        self.switch(f, true);
    }

    /// End the fault.
    pub fn heal(&self, f: &Fault) {
        self.switch(f, false);
    }

    fn switch(&self, f: &Fault, on: bool) {
        if let Fault::LinkDown(h) = f {
            self.ip(
                &self.bridge,
                &["link", "set", &h.port, if on { "down" } else { "up" }],
            );
        }
        for (ns, rule) in Self::rules(f) {
            let mut a = vec![
                "ip",
                "netns",
                "exec",
                &ns,
                "iptables",
                if on { "-I" } else { "-D" },
            ];
            a.extend(rule.iter().map(String::as_str));
            sh(&a);
        }
    }

    /// The fault for `d`, then healed.
    pub fn during(&self, f: &Fault, d: Duration) {
        self.apply(f);
        std::thread::sleep(d);
        self.heal(f);
    }

    /// Start `program args` in `host`, its stdout appended to `log_base.out` and its stderr
    /// to `log_base.log` (a line marks each start).
    pub fn spawn(&self, host: &Host, program: &str, args: &[String], log_base: &Path) -> Proc {
        let path = |ext: &str| log_base.with_extension(ext);
        let (out, log) = (path("out"), path("log"));
        let open = |p: &Path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        };
        let mut err = open(&log);
        writeln!(
            err,
            "=== started in {} ({}): {args:?}",
            host.name, host.addr
        )
        .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &host.ns, program])
            .args(args)
            .env("HOSTNAME", &host.name)
            .stdin(Stdio::null())
            .stdout(open(&out))
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("ip netns exec {}: {e}", host.ns));
        Proc {
            child,
            what: format!("{} in {}", log_base.display(), host.name),
            out,
            log,
            done: None,
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let mut all: Vec<String> = self.hosts.iter().map(|h| h.ns.clone()).collect();
        all.push(self.bridge.clone());
        for ns in &all {
            // Our processes still in the namespace, by id (Procs kill their own; this is
            // for anything else a test started there).
            if let Ok(o) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A process in a host; killed (SIGKILL) when dropped while it runs.
pub struct Proc {
    child: Child,
    pub what: String,
    pub out: PathBuf,
    pub log: PathBuf,
    done: Option<ExitStatus>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send a signal by name (KILL, STOP, CONT, TERM).
    pub fn signal(&self, sig: &str) {
        if self.done.is_none() {
            sh(&["kill", &format!("-{sig}"), &self.pid().to_string()]);
        }
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            self.done = Some(self.child.wait().unwrap());
        }
    }

    /// Its exit status once it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.done.is_none() {
            self.done = self.child.try_wait().unwrap();
        }
        self.done
    }

    /// Wait until it exits, at most `limit` (then panic: the Drop kills it).
    pub fn wait_within(&mut self, limit: Duration) -> ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.exited() {
                return s;
            }
            assert!(
                t0.elapsed() < limit,
                "{} still runs after {limit:?}; its log:\n{}",
                self.what,
                tail(&self.log, 40)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last line it printed on stdout.
    pub fn last_line(&self) -> String {
        let s = std::fs::read_to_string(&self.out).unwrap_or_default();
        s.lines().last().unwrap_or_default().to_string()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
