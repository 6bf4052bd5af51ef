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

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use lightrnn_kernels::{GradReduce, GradsMut};

use super::admit::{accept_left, offer_right};
use super::collective::{Collective, reduce_host};
use super::secure::{self, Opener, RingSecret, Sealer, TAG_LEN};
use super::watch::{Link, Watch};
use lightrnn_core::report::{LinkDirection, LinkWaits};
use lightrnn_core::{Error, Result};

/// Ring all-reduce over TCP: each rank holds a connection to its right neighbour (it
/// sends there) and one from its left neighbour (it receives from there), each opened by
/// the generation's handshake and carrying sealed frames ([`super::secure`]).
pub struct TcpRing {
    rank: usize,
    world: usize,
    right: Option<Side<Sealer>>,
    left: Option<Side<Opener>>,
    send_buf: Vec<u8>,
    recv_buf: Vec<u8>,
    /// When the gradient all-reduce in progress (or the last) began.
    reduce_started: Option<std::time::Instant>,
}

/// One of a rank's two connections, the watch on its waits and its framing (a
/// [`Sealer`] to the right, an [`Opener`] from the left).
struct Side<F> {
    stream: TcpStream,
    watch: Watch,
    frames: F,
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

impl TcpRing {
    /// Bind the listening socket for a rank (port 0 picks one); its address goes to the
    /// other ranks through the rendezvous.
    pub fn bind(addr: SocketAddr) -> Result<TcpListener> {
        TcpListener::bind(addr)
            .map_err(|e| Error::Io(format!("ring: cannot listen on {addr}: {e}")))
    }

    /// Join the ring as `rank` of `addrs.len()` ranks, `listener` bound at
    /// `addrs[rank]`, in the generation `secret` was drawn for. Connects to the right
    /// neighbour (retrying until `timeout`) and accepts the left one: a connection is
    /// taken once its handshake proves it is that rank of this generation; any other is
    /// refused and logged with its address, and the rank keeps waiting.
    pub fn connect(
        rank: usize,
        addrs: &[SocketAddr],
        listener: TcpListener,
        timeout: Duration,
        secret: &RingSecret,
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
            reduce_started: None,
        };
        if world == 1 {
            return Ok(ring);
        }
        let right_rank = (rank + 1) % world;
        let left_rank = (rank + world - 1) % world;
        let deadline = Instant::now() + timeout;
        // Connect right in a thread while accepting from the left, so that a ring of
        // any size forms whatever the start order.
        let to = addrs[right_rank];
        let mine = secret.clone();
        let connector =
            std::thread::spawn(move || offer_right(rank, right_rank, to, &mine, deadline));
        let (left, opener) = accept_left(rank, left_rank, &listener, secret, deadline, timeout)?;
        let (right, sealer) = connector
            .join()
            .map_err(|_| Error::Io("ring: connector thread panicked".into()))??;
        // Every read and write blocks one slice at most: the watch keeps the deadline.
        let slice = Watch::slice(timeout);
        for s in [&left, &right] {
            s.set_read_timeout(Some(slice)).ok();
            s.set_write_timeout(Some(slice)).ok();
        }
        let watch = |peer: usize, direction| {
            Watch::new(
                Link {
                    rank,
                    world,
                    peer,
                    addr: addrs[peer],
                    direction,
                },
                timeout,
            )
        };
        ring.left = Some(Side {
            stream: left,
            watch: watch(left_rank, LinkDirection::Receive),
            frames: opener,
        });
        ring.right = Some(Side {
            stream: right,
            watch: watch(right_rank, LinkDirection::Send),
            frames: sealer,
        });
        Ok(ring)
    }

    /// A handle that shuts this ring's connections down from another thread.
    pub fn breaker(&self) -> Result<RingBreaker> {
        let streams = [
            self.left.as_ref().map(|s| &s.stream),
            self.right.as_ref().map(|s| &s.stream),
        ];
        let mut v = Vec::new();
        for s in streams.into_iter().flatten() {
            v.push(
                s.try_clone()
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

/// Values a ring transfer stages at a time (1 MiB of f32): one frame.
const PIECE: usize = 1 << 18;

/// Write `values` little-endian, [`PIECE`] at a time through `staging`, each piece a
/// sealed frame: one message of operation `what`.
fn send_pieces(
    to: &mut Side<Sealer>,
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
        to.frames.seal(staging);
        t.write(&mut to.stream, staging)?;
    }
    t.finish();
    Ok(())
}

/// Read `into.len()` little-endian values, [`PIECE`] at a time through `staging`, each
/// piece a frame folded into its place once it checks: one message of operation `what`.
/// A frame that fails its check is an error and never folded in; the pieces before it
/// are, so the caller's buffer is then partial: the error ends the generation, which
/// discards it.
fn recv_pieces(
    from: &mut Side<Opener>,
    into: &mut [f32],
    staging: &mut Vec<u8>,
    fold: impl Fn(&mut f32, f32),
    what: &'static str,
) -> Result<()> {
    let mut t = from.watch.begin(what);
    for piece in into.chunks_mut(PIECE) {
        staging.resize(piece.len() * 4 + TAG_LEN, 0);
        t.read(&mut from.stream, staging)?;
        from.frames.open(staging).map_err(|secure::BadFrame| {
            t.fail(
                ": a message failed its authentication check (altered or corrupted on the \
                 way): the frame is not used, and this generation ends (its buffers are \
                 discarded: the group resumes from the last checkpoint)",
            )
        })?;
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
        // Timed from the ring's first exchange (a device's gradients are staged first).
        self.reduce_started = None;
        if let Some(l) = &mut self.left {
            l.watch.take_first_byte();
        }
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
        self.reduce_started
            .get_or_insert_with(std::time::Instant::now);
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

    fn take_wait(&mut self) -> Option<(std::time::Instant, std::time::Instant)> {
        let started = self.reduce_started.take()?;
        let first = self.left.as_mut()?.watch.take_first_byte()?;
        Some((started, first.max(started)))
    }

    fn waits(&self) -> Vec<LinkWaits> {
        let left = self.left.as_ref().map(|s| s.watch.figures().clone());
        let right = self.right.as_ref().map(|s| s.watch.figures().clone());
        left.into_iter().chain(right).collect()
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
    let secret = RingSecret::random("test", 1);
    listeners
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let (addrs, secret) = (addrs.clone(), secret.clone());
            std::thread::spawn(move || TcpRing::connect(rank, &addrs, l, timeout, &secret))
        })
        .collect()
}

#[cfg(test)]
#[path = "ring_tests.rs"]
mod tests;
