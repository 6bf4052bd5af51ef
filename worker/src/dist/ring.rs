//! [`TcpRing`]: the collective of CPU workers, between processes over TCP.
//!
//! It is the bandwidth-optimal ring all-reduce: the buffer is cut into `world`
//! chunks; in `world - 1` reduce-scatter steps every rank sends one chunk to its right
//! neighbour and adds the chunk arriving from its left, after which each rank owns the
//! full sum of one chunk; `world - 1` all-gather steps circulate the finished chunks.
//! Every element of the result is computed once, by one rank, and copied to the others,
//! so all ranks end with bit-identical buffers (identical parameters after each step).
//! Every read and write is watched ([`super::watch`]): it blocks a short slice at a
//! time, a wait far longer than usual is logged while it lasts, nothing from a neighbour
//! for the collective deadline is an error that says so (naming the rank, the peer and
//! its address, the operation), never a hang, and every wait is counted
//! ([`Collective::waits`]).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use lightrnn_kernels::{GradReduce, GradsMut};

use super::collective::{Collective, reduce_host};
use super::watch::{Link, Watch};
use lightrnn_core::report::{LinkDirection, LinkWaits};
use lightrnn_core::{Error, Result};

/// Ring all-reduce over TCP: each rank holds a connection to its right neighbour (it
/// sends there) and one from its left neighbour (it receives from there).
pub struct TcpRing {
    rank: usize,
    world: usize,
    right: Option<Side>,
    left: Option<Side>,
    send_buf: Vec<u8>,
    recv_buf: Vec<u8>,
}

/// One of a rank's two connections and the watch on its waits.
struct Side {
    stream: TcpStream,
    watch: Watch,
}

/// Breaks a ring from another thread: its connections are shut down, so a rank blocked
/// in a collective with a stalled peer returns an error at once instead of at its
/// deadline (used when the coordinator ends the generation).
pub struct RingBreaker(Vec<TcpStream>);

impl RingBreaker {
    pub fn break_ring(&self) {
        for s in &self.0 {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// First bytes of every connection: the protocol and the sender's rank.
const HELLO: &[u8; 8] = b"LRNRING1";

impl TcpRing {
    /// Bind the listening socket for a rank (port 0 picks one); its address goes to the
    /// other ranks through the rendezvous.
    pub fn bind(addr: SocketAddr) -> Result<TcpListener> {
        TcpListener::bind(addr)
            .map_err(|e| Error::Io(format!("ring: cannot listen on {addr}: {e}")))
    }

    /// Join the ring as `rank` of `addrs.len()` ranks, `listener` bound at
    /// `addrs[rank]`. Connects to the right neighbour (retrying until `timeout`) and
    /// accepts the left one.
    pub fn connect(
        rank: usize,
        addrs: &[SocketAddr],
        listener: TcpListener,
        timeout: Duration,
    ) -> Result<Self> {
        let world = addrs.len();
        if rank >= world {
            return Err(Error::Config(format!(
                "ring: rank {rank} of a world of {world}"
            )));
        }
        let mut ring = Self {
            rank,
            world,
            right: None,
            left: None,
            send_buf: Vec::new(),
            recv_buf: Vec::new(),
        };
        if world == 1 {
            return Ok(ring);
        }
        let right_rank = (rank + 1) % world;
        let deadline = std::time::Instant::now() + timeout;
        // Connect right in a thread while accepting from the left, so that a ring of
        // any size forms whatever the start order.
        let to = addrs[right_rank];
        let connector = std::thread::spawn(move || -> Result<TcpStream> {
            loop {
                match TcpStream::connect_timeout(&to, Duration::from_millis(500)) {
                    Ok(mut s) => {
                        s.set_nodelay(true).ok();
                        let mut hello = HELLO.to_vec();
                        hello.extend_from_slice(&(rank as u64).to_le_bytes());
                        s.write_all(&hello).map_err(|e| {
                            Error::Io(format!("ring: rank {rank} greeting rank {right_rank}: {e}"))
                        })?;
                        return Ok(s);
                    }
                    Err(e) if std::time::Instant::now() >= deadline => {
                        return Err(Error::Io(format!(
                            "ring: rank {rank} cannot reach rank {right_rank} at {to}: {e}"
                        )));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        });
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::Io(format!("ring: {e}")))?;
        let left_rank = (rank + world - 1) % world;
        let left = loop {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).ok();
                    s.set_nodelay(true).ok();
                    s.set_read_timeout(Some(timeout)).ok();
                    let mut hello = [0u8; 16];
                    let ok = s.read_exact(&mut hello).is_ok()
                        && &hello[..8] == HELLO
                        && u64::from_le_bytes(hello[8..].try_into().unwrap()) == left_rank as u64;
                    if ok {
                        break s;
                    }
                    // Not our left neighbour (a stray or stale connection): drop it.
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if std::time::Instant::now() >= deadline {
                        return Err(Error::Io(format!(
                            "ring: rank {rank}: rank {left_rank} did not connect within {timeout:?}"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(Error::Io(format!("ring: rank {rank} accepting: {e}"))),
            }
        };
        let right = connector
            .join()
            .map_err(|_| Error::Io("ring: connector thread panicked".into()))??;
        // Every read and write blocks one slice at most: the watch keeps the deadline.
        let slice = Watch::slice(timeout);
        for s in [&left, &right] {
            s.set_read_timeout(Some(slice)).ok();
            s.set_write_timeout(Some(slice)).ok();
        }
        let side = |stream, peer: usize, direction| Side {
            stream,
            watch: Watch::new(
                Link {
                    rank,
                    world,
                    peer,
                    addr: addrs[peer],
                    direction,
                },
                timeout,
            ),
        };
        ring.left = Some(side(left, left_rank, LinkDirection::Receive));
        ring.right = Some(side(right, right_rank, LinkDirection::Send));
        Ok(ring)
    }

    /// A handle that shuts this ring's connections down from another thread.
    pub fn breaker(&self) -> Result<RingBreaker> {
        let mut v = Vec::new();
        for s in [&self.left, &self.right].into_iter().flatten() {
            v.push(
                s.stream
                    .try_clone()
                    .map_err(|e| Error::Io(format!("ring: cloning a connection: {e}")))?,
            );
        }
        Ok(RingBreaker(v))
    }

    /// Chunk `c` of a buffer of `n` elements cut into `world` parts (of whole units of
    /// `unit` elements).
    fn chunk(&self, n: usize, unit: usize, c: usize) -> std::ops::Range<usize> {
        let units = lightrnn_core::util::share(n / unit, self.world, c);
        units.start * unit..units.end * unit
    }

    /// The reduce-scatter half of the all-reduce: at step s rank r sends chunk (r - s)
    /// and adds into (r - s - 1); rank r ends with the full sum of chunk (r + 1).
    fn scatter(&mut self, buf: &mut [f32], unit: usize, what: &'static str) -> Result<()> {
        let (w, r, n) = (self.world, self.rank, buf.len());
        for s in 0..w - 1 {
            let send = self.chunk(n, unit, (r + w - s) % w);
            let recv = self.chunk(n, unit, (r + 2 * w - s - 1) % w);
            let (out, inn) = disjoint(buf, send, recv);
            self.exchange(out, inn, |x, y| *x += y, what)?;
        }
        Ok(())
    }

    /// Send `out` right while receiving `inn.len()` values from the left, concurrently (a
    /// full ring of blocking sends would deadlock once the socket buffers fill), each
    /// value received folded into `inn` by `fold`. Both directions go [`PIECE`] values at
    /// a time: a ring's memory does not grow with the buffers it reduces.
    fn exchange(
        &mut self,
        out: &[f32],
        inn: &mut [f32],
        fold: impl Fn(&mut f32, f32),
        what: &'static str,
    ) -> Result<()> {
        let right = self.right.as_mut().expect("ring of more than one rank");
        let left = self.left.as_mut().expect("ring of more than one rank");
        let (send_buf, recv_buf) = (&mut self.send_buf, &mut self.recv_buf);
        std::thread::scope(|s| {
            let sender = s.spawn(move || send_pieces(right, out, send_buf, what));
            let r = recv_pieces(left, inn, recv_buf, fold, what);
            let w = sender
                .join()
                .unwrap_or_else(|_| Err(Error::Io("ring: sender thread panicked".into())));
            w.and(r)
        })
    }
}

/// Values a ring transfer stages at a time (1 MiB of f32).
const PIECE: usize = 1 << 18;

/// Write `values` little-endian, [`PIECE`] at a time through `staging`: one message of
/// operation `what`.
fn send_pieces(
    to: &mut Side,
    values: &[f32],
    staging: &mut Vec<u8>,
    what: &'static str,
) -> Result<()> {
    let mut t = to.watch.begin(what);
    for piece in values.chunks(PIECE) {
        staging.clear();
        for x in piece {
            staging.extend_from_slice(&x.to_le_bytes());
        }
        t.write(&mut to.stream, staging)?;
    }
    t.finish();
    Ok(())
}

/// Read `into.len()` little-endian values, [`PIECE`] at a time through `staging`,
/// folding each into its place: one message of operation `what`.
fn recv_pieces(
    from: &mut Side,
    into: &mut [f32],
    staging: &mut Vec<u8>,
    fold: impl Fn(&mut f32, f32),
    what: &'static str,
) -> Result<()> {
    let mut t = from.watch.begin(what);
    for piece in into.chunks_mut(PIECE) {
        staging.resize(piece.len() * 4, 0);
        t.read(&mut from.stream, staging)?;
        for (x, b) in piece.iter_mut().zip(staging.chunks_exact(4)) {
            fold(x, f32::from_le_bytes(b.try_into().unwrap()));
        }
    }
    t.finish();
    Ok(())
}

/// Two disjoint ranges of one buffer, the first to read, the second to write.
fn disjoint(
    buf: &mut [f32],
    a: std::ops::Range<usize>,
    b: std::ops::Range<usize>,
) -> (&[f32], &mut [f32]) {
    if a.is_empty() {
        return (&[], &mut buf[b]);
    }
    if a.start >= b.end {
        let (lo, hi) = buf.split_at_mut(a.start);
        (&hi[..a.len()], &mut lo[b])
    } else {
        assert!(a.end <= b.start, "overlapping ring chunks {a:?} and {b:?}");
        let (lo, hi) = buf.split_at_mut(b.start);
        (&lo[a], &mut hi[..b.len()])
    }
}

impl GradReduce for TcpRing {
    fn all_reduce_grads(&mut self, grads: GradsMut<'_>) -> lightrnn_kernels::Result<()> {
        reduce_host(self, grads)
    }
}

impl Collective for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        let (w, r, n) = (self.world, self.rank, buf.len());
        if w == 1 {
            return Ok(());
        }
        self.scatter(buf, 1, "all-reduce")?;
        // All-gather: rank r now owns chunk (r + 1); pass the finished chunks around.
        for s in 0..w - 1 {
            let send = self.chunk(n, 1, (r + 1 + w - s) % w);
            let recv = self.chunk(n, 1, (r + w - s) % w);
            let (out, inn) = disjoint(buf, send, recv);
            self.exchange(out, inn, |x, y| *x = y, "all-reduce")?;
        }
        Ok(())
    }

    fn reduce_scatter_sum(
        &mut self,
        buf: &mut [f32],
        unit: usize,
    ) -> Result<std::ops::Range<usize>> {
        let (w, units) = (self.world, buf.len() / unit.max(1));
        if unit == 0 || units * unit != buf.len() {
            return Err(Error::Config(format!(
                "ring: a reduce-scatter of {} elements in units of {unit}",
                buf.len()
            )));
        }
        if w == 1 {
            return Ok(0..units);
        }
        self.scatter(buf, unit, "reduce-scatter")?;
        Ok(lightrnn_core::util::share(units, w, (self.rank + 1) % w))
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        let w = self.world;
        if w == 1 {
            return Ok(());
        }
        if root >= w {
            return Err(Error::Config(format!("broadcast from rank {root} of {w}")));
        }
        // Along the ring from the root: w - 1 hops, each rank forwarding once.
        let pos = (self.rank + w - root) % w;
        if pos > 0 {
            let left = self.left.as_mut().expect("ring of more than one rank");
            recv_pieces(left, buf, &mut self.recv_buf, |x, y| *x = y, "broadcast")?;
        }
        if pos < w - 1 {
            let right = self.right.as_mut().expect("ring of more than one rank");
            send_pieces(right, buf, &mut self.send_buf, "broadcast")?;
        }
        Ok(())
    }

    fn waits(&self) -> Vec<LinkWaits> {
        [&self.left, &self.right]
            .into_iter()
            .flatten()
            .map(|s| s.watch.figures().clone())
            .collect()
    }
}

/// The `world` ranks of a ring on this host's loopback, each connecting on its own thread
/// (tests).
#[cfg(test)]
pub(crate) fn rings(
    world: usize,
    timeout: Duration,
) -> Vec<std::thread::JoinHandle<Result<TcpRing>>> {
    let listeners: Vec<TcpListener> = (0..world)
        .map(|_| TcpRing::bind("127.0.0.1:0".parse().unwrap()).unwrap())
        .collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    listeners
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let addrs = addrs.clone();
            std::thread::spawn(move || TcpRing::connect(rank, &addrs, l, timeout))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::watch::logs::logged;
    use lightrnn_core::report::WAIT_BUCKETS;

    #[test]
    fn all_reduce_and_broadcast_agree_bit_for_bit() {
        // 600,001 values: more than two of the ring's pieces per chunk.
        for (world, n) in [
            (2usize, 10usize),
            (3, 1),
            (3, 100_003),
            (4, 7),
            (2, 600_001),
        ] {
            let handles = rings(world, Duration::from_secs(20));
            let rings: Vec<TcpRing> = handles
                .into_iter()
                .map(|h| h.join().unwrap().unwrap())
                .collect();
            let data = |r: usize| -> Vec<f32> {
                (0..n)
                    .map(|i| ((i * 7 + r * 13) % 17) as f32 * 0.37 - r as f32)
                    .collect()
            };
            let results: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
                let hs: Vec<_> = rings
                    .into_iter()
                    .enumerate()
                    .map(|(r, mut ring)| {
                        s.spawn(move || {
                            let mut buf = data(r);
                            ring.all_reduce_sum(&mut buf).unwrap();
                            let mut b = if r == world - 1 {
                                data(99)
                            } else {
                                vec![0.0; n]
                            };
                            ring.broadcast(&mut b, world - 1).unwrap();
                            ring.barrier().unwrap();
                            // f64 sums are exact for these values and identical everywhere.
                            let mut f = [r as f64 + 0.25, 1e300, -(r as f64)];
                            ring.all_reduce_sum_f64(&mut f).unwrap();
                            let w = world as f64;
                            assert_eq!(
                                f,
                                [
                                    w * (w - 1.0) / 2.0 + 0.25 * w,
                                    1e300 * w,
                                    -w * (w - 1.0) / 2.0
                                ]
                            );
                            (buf, b)
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let inputs: Vec<Vec<f32>> = (0..world).map(data).collect();
            for i in 0..n {
                let exact: f64 = inputs.iter().map(|d| d[i] as f64).sum();
                assert!((results[0].0[i] as f64 - exact).abs() <= 1e-5 * (1.0 + exact.abs()));
            }
            for (sum, b) in &results {
                assert_eq!(
                    sum.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    results[0].0.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    "world {world}: ranks differ"
                );
                assert_eq!(b, &data(99));
            }
        }
    }

    #[test]
    fn a_reduce_scatter_gives_each_rank_whole_units_of_the_all_reduce() {
        for (world, units, unit) in [
            (2usize, 9usize, 5usize),
            (3, 2, 4),
            (3, 1000, 3),
            (4, 7, 1),
            (2, 200_001, 3),
        ] {
            let n = units * unit;
            let data = |r: usize| -> Vec<f32> {
                (0..n)
                    .map(|i| ((i * 5 + r * 11) % 13) as f32 * 0.29 - r as f32)
                    .collect()
            };
            let rings: Vec<TcpRing> = rings(world, Duration::from_secs(20))
                .into_iter()
                .map(|h| h.join().unwrap().unwrap())
                .collect();
            let got: Vec<(Vec<f32>, Vec<f32>, std::ops::Range<usize>)> = std::thread::scope(|s| {
                let hs: Vec<_> = rings
                    .into_iter()
                    .enumerate()
                    .map(|(r, mut ring)| {
                        s.spawn(move || {
                            let mut all = data(r);
                            ring.all_reduce_sum(&mut all).unwrap();
                            let mut part = data(r);
                            if unit > 1 {
                                // Not whole units: refused on every rank, before any exchange.
                                assert!(ring.reduce_scatter_sum(&mut part[1..], unit).is_err());
                            }
                            let own = ring.reduce_scatter_sum(&mut part, unit).unwrap();
                            (all, part, own)
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            // The owned ranges cover every unit once.
            let mut owned: Vec<_> = got.iter().map(|g| g.2.clone()).collect();
            owned.sort_by_key(|r| r.start);
            assert_eq!(owned.first().unwrap().start, 0);
            assert_eq!(owned.last().unwrap().end, units);
            assert!(
                owned.windows(2).all(|w| w[0].end == w[1].start),
                "{owned:?}"
            );
            // In them, the sum over the ranks (in the ring's order, as the all-reduce's).
            let inputs: Vec<Vec<f32>> = (0..world).map(data).collect();
            for (all, part, own) in &got {
                for i in own.start * unit..own.end * unit {
                    let exact: f64 = inputs.iter().map(|d| d[i] as f64).sum();
                    assert!(
                        (part[i] as f64 - exact).abs() <= 1e-5 * (1.0 + exact.abs()),
                        "world {world}, element {i}: {} vs {exact}",
                        part[i]
                    );
                    assert!((all[i] as f64 - exact).abs() <= 1e-5 * (1.0 + exact.abs()));
                }
            }
        }
    }

    #[test]
    fn a_neighbour_stalled_for_seconds_is_warned_about_once_counted_and_the_sum_is_exact() {
        let mut rings = rings(2, Duration::from_secs(20))
            .into_iter()
            .map(|h| h.join().unwrap().unwrap());
        let (mut r0, mut r1) = (rings.next().unwrap(), rings.next().unwrap());
        let stall = Duration::from_millis(2600);
        let late = std::thread::spawn(move || {
            for _ in 0..3 {
                r1.all_reduce_sum(&mut [2.0; 5]).unwrap();
            }
            std::thread::sleep(stall);
            let mut b = [0.5, -1.0, 3.0];
            r1.all_reduce_sum(&mut b).unwrap();
            (b, r1.waits())
        });
        let ((b, waits), log) = logged(|| {
            for _ in 0..3 {
                let mut b = [1.0; 5];
                r0.all_reduce_sum(&mut b).unwrap();
                assert_eq!(b, [3.0; 5]);
            }
            let mut b = [0.25, 1.0, -2.0];
            let t = std::time::Instant::now();
            r0.all_reduce_sum(&mut b).unwrap();
            assert!(t.elapsed() >= stall - Duration::from_millis(100));
            (b, r0.waits())
        });
        let (b1, waits1) = late.join().unwrap();
        assert_eq!(b, [0.75, 0.0, 1.0]);
        assert_eq!(b1, b);
        // Rank 0 waited for rank 1's bytes once past the threshold; its sends and rank 1's
        // waits did not.
        let get = |w: &[LinkWaits], d: LinkDirection| {
            w.iter().find(|l| l.direction == d).cloned().unwrap()
        };
        let recv = get(&waits, LinkDirection::Receive);
        assert_eq!((recv.peer, recv.count, recv.stalls), (1, 8, 1));
        assert_eq!(recv.buckets[WAIT_BUCKETS.len() - 2], 1, "{recv:?}");
        assert!(recv.seconds >= 2.4, "{recv:?}");
        assert_eq!(get(&waits, LinkDirection::Send).stalls, 0);
        assert!(
            waits1.iter().all(|l| l.stalls == 0 && l.count == 8),
            "{waits1:?}"
        );
        // One warning while it lasted, one line when rank 1 answered.
        let warned: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
        assert_eq!(warned.len(), 1, "{log}");
        assert!(
            warned[0].contains("ring: rank 0 of 2, all-reduce: receiving from rank 1 (127.0.0.1:")
                && warned[0].contains("waiting for 2."),
            "{log}"
        );
        assert!(
            log.contains("rank 1 answered after 2.6 s")
                || log.contains("rank 1 answered after 2.7 s"),
            "{log}"
        );
    }

    #[test]
    fn a_silent_neighbour_is_an_error_not_a_hang() {
        let handles = rings(2, Duration::from_millis(300));
        let mut rings: Vec<TcpRing> = handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect();
        let _quiet = rings.pop().unwrap(); // rank 1 never takes part
        let mut r0 = rings.pop().unwrap();
        let t = std::time::Instant::now();
        let e = r0.all_reduce_sum(&mut [1.0; 8]).unwrap_err().to_string();
        // What passed, how long it is, and who did not answer from where.
        assert!(
            e.starts_with("ring: rank 0 of 2, all-reduce: receiving from rank 1 (127.0.0.1:")
                && e.ends_with(
                    "): nothing for 0.3 s, the collective deadline (--collective-timeout-s)"
                ),
            "{e}"
        );
        assert!(t.elapsed() >= Duration::from_millis(300));
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!(r0.waits()[0].count, 1);
        // A rank nobody connects to gives up at its deadline.
        let l = TcpRing::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let me = l.local_addr().unwrap();
        let ghost = TcpRing::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addrs = vec![me, ghost.local_addr().unwrap()];
        let e = TcpRing::connect(0, &addrs, l, Duration::from_millis(300))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("rank 1"), "{e}");
    }
}
