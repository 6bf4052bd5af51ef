//! Waiting on a peer, watched: how long waits usually take ([`Usual`]: a short window of
//! recent durations per operation, and the stall threshold it gives), and the waits of a
//! ring connection ([`Watch`], one per neighbour and direction) whose blocking reads and
//! writes last one slice ([`SLICE`]: the socket's timeout) at a time, so that
//!
//! - a wait past its stall threshold, max([`STALL_FLOOR`], [`STALL_FACTOR`] x the median
//!   of the operation's recent waits), logs one warning while it lasts (this rank, the
//!   peer and its address, the operation, the wait so far), and one line when the peer
//!   answers;
//! - a connection on which nothing moved for the collective deadline is an error that
//!   says it was the deadline and how long it is (other errors keep the system's text);
//! - every wait is counted in the connection's [`LinkWaits`] (seconds, a histogram,
//!   stalls), which travel with the rank's heartbeats to the job's metrics.
//!
//! Nothing here knows what the bytes mean: a [`Transfer`] is one message, read or written
//! in any number of whole buffers, so a framing around the ring's messages (an AEAD) goes
//! through the same watch.

use std::collections::{BTreeMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lightrnn_core::report::{LinkDirection, LinkWaits};
use lightrnn_core::{Error, Result};

/// The longest a blocking read or write of a watched connection lasts before the watch
/// looks at the clock (and the shortest a wait can be told from a stall or a deadline).
pub const SLICE: Duration = Duration::from_millis(250);
/// No wait is a stall below this.
pub const STALL_FLOOR: Duration = Duration::from_secs(2);
/// A wait is a stall past this many times the median of its operation's recent waits.
pub const STALL_FACTOR: u32 = 5;
/// How many recent waits of an operation the median is taken over.
const WINDOW: usize = 32;
/// A read or write bounded by one slice that returns this much later than the one
/// before means this process did not run meanwhile (frozen, descheduled): that time is
/// not the peer's, and counts toward neither its stall nor its deadline.
const FROZEN: Duration = Duration::from_secs(1);

/// Seconds as a person reads them: whole from 10 s, else to a tenth (a hundredth below
/// 0.1 s).
pub fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 10.0 {
        format!("{s:.0}")
    } else if s >= 0.1 {
        format!("{s:.1}")
    } else {
        format!("{s:.2}")
    }
}

/// The recent durations of each operation (by name), and the threshold past which one
/// more of them is a stall.
#[derive(Debug, Default)]
pub struct Usual(BTreeMap<&'static str, VecDeque<Duration>>);

impl Usual {
    /// The median of `op`'s recent waits (zero before the first).
    pub fn median(&self, op: &str) -> Duration {
        let Some(recent) = self.0.get(op).filter(|r| !r.is_empty()) else {
            return Duration::ZERO;
        };
        let mut v: Vec<Duration> = recent.iter().copied().collect();
        v.sort_unstable();
        v[v.len() / 2]
    }

    /// How long a wait of `op` may last before it is a stall.
    pub fn threshold(&self, op: &str) -> Duration {
        STALL_FLOOR.max(self.median(op) * STALL_FACTOR)
    }

    /// One more wait of `op` that took `d`.
    pub fn record(&mut self, op: &'static str, d: Duration) {
        let recent = self.0.entry(op).or_default();
        if recent.len() == WINDOW {
            recent.pop_front();
        }
        recent.push_back(d);
    }
}

/// One side of a rank's ring connection: who waits on whom, in which direction.
#[derive(Clone, Debug)]
pub struct Link {
    pub rank: usize,
    pub world: usize,
    pub peer: usize,
    /// The peer's address (the one the group knows it by).
    pub addr: SocketAddr,
    pub direction: LinkDirection,
}

impl Link {
    /// "rank 0 of 2, all-reduce: receiving from rank 1 (10.0.0.3:4567)".
    pub fn describe(&self, op: &str) -> String {
        let (rank, world, peer, addr) = (self.rank, self.world, self.peer, self.addr);
        let dir = match self.direction {
            LinkDirection::Receive => "receiving from",
            LinkDirection::Send => "sending to",
        };
        format!("rank {rank} of {world}, {op}: {dir} rank {peer} ({addr})")
    }
}

/// The waits of one ring connection in one direction: its deadline, what its waits
/// usually take, what they took.
#[derive(Debug)]
pub struct Watch {
    link: Link,
    /// Nothing moved for this long: the wait fails.
    deadline: Duration,
    usual: Usual,
    figures: LinkWaits,
    /// When a byte first moved since [`Watch::take_first_byte`].
    first_byte: Option<Instant>,
}

impl Watch {
    /// The watch of `link`, whose socket's timeout is [`SLICE`] (or the deadline, when
    /// shorter), failing a wait after `deadline` without a byte.
    pub fn new(link: Link, deadline: Duration) -> Self {
        let figures = LinkWaits {
            peer: link.peer,
            direction: link.direction,
            ..Default::default()
        };
        Self {
            link,
            deadline,
            usual: Usual::default(),
            figures,
            first_byte: None,
        }
    }

    /// The socket timeout a watched connection needs: one slice, at most the deadline.
    pub fn slice(deadline: Duration) -> Duration {
        SLICE.min(deadline).max(Duration::from_millis(1))
    }

    /// When a byte first moved since the last call (and none since).
    pub fn take_first_byte(&mut self) -> Option<Instant> {
        self.first_byte.take()
    }

    /// What this connection's waits took so far.
    pub fn figures(&self) -> &LinkWaits {
        &self.figures
    }

    /// One message of operation `op` (all-reduce, broadcast, reduce-scatter) begins; it
    /// is counted when the [`Transfer`] is finished or dropped.
    pub fn begin(&mut self, op: &'static str) -> Transfer<'_> {
        let now = Instant::now();
        Transfer {
            threshold: self.usual.threshold(op),
            watch: self,
            op,
            started: now,
            moved_at: now,
            polled: now,
            bytes: 0,
            stalled: false,
            answered: false,
        }
    }
}

/// One message through a [`Watch`]: reads or writes until every byte moved, a slice at
/// a time.
pub struct Transfer<'w> {
    watch: &'w mut Watch,
    op: &'static str,
    started: Instant,
    /// When a byte last moved (the deadline counts from here).
    moved_at: Instant,
    /// When the last read or write returned.
    polled: Instant,
    bytes: u64,
    threshold: Duration,
    stalled: bool,
    answered: bool,
}

impl Transfer<'_> {
    /// Fill `buf` from `from`.
    pub fn read(&mut self, from: &mut impl Read, buf: &mut [u8]) -> Result<()> {
        let mut at = 0;
        while at < buf.len() {
            let r = from.read(&mut buf[at..]);
            at += self.step(r)?;
        }
        Ok(())
    }

    /// Write all of `buf` to `to`.
    pub fn write(&mut self, to: &mut impl Write, buf: &[u8]) -> Result<()> {
        let mut at = 0;
        while at < buf.len() {
            let r = to.write(&buf[at..]);
            at += self.step(r)?;
        }
        Ok(())
    }

    /// Every byte moved: the wait is over.
    pub fn finish(mut self) {
        self.answered = true;
    }

    /// The error of this transfer, for `why` (what a framing found wrong in a message
    /// too): "ring: rank 0 of 2, all-reduce: receiving from rank 1 (ADDR){why}".
    pub fn fail(&self, why: impl std::fmt::Display) -> Error {
        Error::Io(format!("ring: {}{why}", self.watch.link.describe(self.op)))
    }

    /// One read or write's outcome: the bytes it moved (none after a slice without any),
    /// or the transfer's error.
    fn step(&mut self, r: std::io::Result<usize>) -> Result<usize> {
        let now = Instant::now();
        let gap = now - self.polled;
        self.polled = now;
        if gap > FROZEN {
            // This process was frozen: the wait starts again as it wakes.
            self.started += gap;
            self.moved_at += gap;
        }
        let n = match r {
            Ok(0) => return Err(self.fail(": the connection was closed")),
            Ok(n) => {
                self.watch.first_byte.get_or_insert(now);
                self.moved_at = now;
                self.bytes += n as u64;
                n
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => 0,
            Err(e) if e.kind() == ErrorKind::Interrupted => 0,
            Err(e) => return Err(self.fail(format_args!(" failed: {e}"))),
        };
        self.look();
        let idle = self.moved_at.elapsed();
        if n == 0 && idle >= self.watch.deadline {
            return Err(self.fail(format_args!(
                ": nothing for {} s, the collective deadline (--collective-timeout-s)",
                secs(self.watch.deadline)
            )));
        }
        Ok(n)
    }

    /// A wait past its threshold is a stall: counted and warned about once, while it
    /// lasts.
    fn look(&mut self) {
        let waited = self.started.elapsed();
        if self.stalled || waited <= self.threshold {
            return;
        }
        self.stalled = true;
        self.watch.figures.stalls += 1;
        let l = &self.watch.link;
        tracing::warn!(
            rank = l.rank,
            peer = l.peer,
            addr = %l.addr,
            op = self.op,
            direction = l.direction.name(),
            waited_s = waited.as_secs_f64(),
            bytes = self.bytes,
            "ring: {}: waiting for {} s so far (usually {} s; a stall past {} s), {} bytes moved",
            l.describe(self.op),
            secs(waited),
            secs(self.watch.usual.median(self.op)),
            secs(self.threshold),
            self.bytes,
        );
    }
}

impl Drop for Transfer<'_> {
    fn drop(&mut self) {
        let d = self.started.elapsed();
        self.watch.figures.observe(d.as_secs_f64());
        self.watch.usual.record(self.op, d);
        if self.stalled && self.answered {
            let l = &self.watch.link;
            tracing::info!(
                rank = l.rank,
                peer = l.peer,
                addr = %l.addr,
                op = self.op,
                waited_s = d.as_secs_f64(),
                "ring: {}: rank {} answered after {} s",
                l.describe(self.op),
                l.peer,
                secs(d),
            );
        }
    }
}

/// A test's tracing events as text: one global subscriber (set once) writes each event
/// to the sink its thread attached, so tests running beside each other keep theirs
/// apart and a test reads the events of every thread it attached.
#[cfg(test)]
pub(crate) mod logs {
    use std::cell::RefCell;
    use std::sync::{Arc, Mutex, Once};

    thread_local! {
        static SINK: RefCell<Option<Sink>> = const { RefCell::new(None) };
    }

    #[derive(Clone, Default)]
    pub(crate) struct Sink(Arc<Mutex<Vec<u8>>>);

    /// Where the subscriber writes: the sink of the thread that logs, if any.
    struct ToThread;

    impl std::io::Write for ToThread {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            SINK.with(|s| {
                if let Some(s) = &*s.borrow() {
                    s.0.lock().unwrap().extend_from_slice(b);
                }
            });
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// This thread's events go to the sink until it drops.
    pub(crate) struct Attached(Option<Sink>);

    impl Drop for Attached {
        fn drop(&mut self) {
            let old = self.0.take();
            SINK.with(|s| *s.borrow_mut() = old);
        }
    }

    impl Sink {
        pub(crate) fn attach(&self) -> Attached {
            static INIT: Once = Once::new();
            INIT.call_once(|| {
                let sub = tracing_subscriber::fmt()
                    .with_ansi(false)
                    .with_max_level(tracing::Level::INFO)
                    .with_writer(|| ToThread)
                    .finish();
                tracing::subscriber::set_global_default(sub).expect("one subscriber");
            });
            Attached(SINK.with(|s| s.replace(Some(self.clone()))))
        }

        pub(crate) fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// What `f` logs on this thread.
    pub(crate) fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
        let sink = Sink::default();
        let attached = sink.attach();
        let r = f();
        drop(attached);
        (r, sink.text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_stall_threshold_is_five_medians_of_the_recent_waits_and_at_least_two_seconds() {
        let mut u = Usual::default();
        assert_eq!(u.threshold("all-reduce"), STALL_FLOOR);
        for ms in [10, 700, 20, 900, 800] {
            u.record("all-reduce", ms * MS);
        }
        // Median 700 ms: five of them.
        assert_eq!(u.median("all-reduce"), 700 * MS);
        assert_eq!(u.threshold("all-reduce"), 3500 * MS);
        // Each operation has its own.
        assert_eq!(u.threshold("broadcast"), STALL_FLOOR);
        // Only the recent ones count: a window of quick waits brings it down to the floor.
        for _ in 0..WINDOW {
            u.record("all-reduce", MS);
        }
        assert_eq!(u.median("all-reduce"), MS);
        assert_eq!(u.threshold("all-reduce"), STALL_FLOOR);
    }

    #[test]
    fn seconds_read_as_a_person_writes_them() {
        assert_eq!(secs(Duration::from_secs(120)), "120");
        assert_eq!(secs(Duration::from_millis(2340)), "2.3");
        assert_eq!(secs(Duration::from_millis(12)), "0.01");
    }

    /// A reader that times out `slices` times, then gives its bytes a few at a time.
    struct Trickle {
        slices: usize,
        data: Vec<u8>,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.slices > 0 {
                self.slices -= 1;
                std::thread::sleep(MS);
                return Err(ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(3).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data.drain(..n);
            Ok(n)
        }
    }

    fn watch(deadline: Duration) -> Watch {
        let link = Link {
            rank: 0,
            world: 2,
            peer: 1,
            addr: "10.0.0.3:4567".parse().unwrap(),
            direction: LinkDirection::Receive,
        };
        Watch::new(link, deadline)
    }

    #[test]
    fn timed_out_slices_lose_no_byte_and_every_wait_is_counted() {
        let mut w = watch(Duration::from_secs(60));
        let data: Vec<u8> = (0..20).collect();
        let mut got = [0u8; 20];
        let mut t = w.begin("all-reduce");
        let mut from = Trickle {
            slices: 3,
            data: data.clone(),
        };
        t.read(&mut from, &mut got[..8]).unwrap();
        t.read(&mut from, &mut got[8..]).unwrap();
        t.finish();
        assert_eq!(got.to_vec(), data);
        let f = w.figures();
        assert_eq!((f.peer, f.count, f.stalls), (1, 1, 0));
        assert_eq!(f.buckets.iter().sum::<u64>(), 1);
        assert!(f.seconds > 0.0);
    }

    /// A reader whose first call returns only after this process "did not run" for a
    /// while (a frozen process sees its blocking call return late), then gives its bytes.
    struct Frozen(Option<Duration>, Vec<u8>);

    impl Read for Frozen {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if let Some(d) = self.0.take() {
                std::thread::sleep(d);
                return Err(ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.1.len());
            buf[..n].copy_from_slice(&self.1[..n]);
            self.1.drain(..n);
            Ok(n)
        }
    }

    #[test]
    fn the_time_this_process_was_frozen_is_not_the_peer_s() {
        // Frozen 1.3 s inside one call, with a deadline of 1.2 s: no deadline passed
        // for the peer, and no stall is counted on it.
        let mut w = watch(1200 * MS);
        let mut t = w.begin("all-reduce");
        let mut from = Frozen(Some(1300 * MS), vec![7; 4]);
        let mut got = [0u8; 4];
        t.read(&mut from, &mut got).unwrap();
        t.finish();
        assert_eq!(got, [7; 4]);
        assert_eq!(w.figures().stalls, 0);
        assert!(w.figures().seconds < 0.5, "{:?}", w.figures());
    }

    #[test]
    fn nothing_for_the_deadline_is_an_error_that_names_it() {
        let mut w = watch(30 * MS);
        let mut t = w.begin("broadcast");
        let mut from = Trickle {
            slices: usize::MAX,
            data: Vec::new(),
        };
        let e = t.read(&mut from, &mut [0u8; 4]).unwrap_err().to_string();
        assert_eq!(
            e,
            "ring: rank 0 of 2, broadcast: receiving from rank 1 (10.0.0.3:4567): nothing for \
             0.03 s, the collective deadline (--collective-timeout-s)"
        );
        drop(t);
        // A closed connection and the system's errors say so.
        let mut t = w.begin("broadcast");
        let e = t
            .read(&mut &[0u8; 0][..], &mut [0u8; 4])
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with("(10.0.0.3:4567): the connection was closed"),
            "{e}"
        );
        let e = t
            .step(Err(std::io::Error::from_raw_os_error(104)))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("(10.0.0.3:4567) failed: ") && e.contains("os error 104"),
            "{e}"
        );
        drop(t);
        assert_eq!(w.figures().count, 2);
    }
}
