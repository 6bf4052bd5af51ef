//! The device side of the gradient all-reduce: [`Lent`], a CUDA backend's gradient buffer
//! lent to the job's collective (the [`DeviceGrads`] of the boundary), the fixed-order sum
//! it runs over a [`Peers`] transport (NCCL between GPU processes, [`super::nccl`]), its
//! reduce-scatter half in whole rows for the loss tables of a reallocation round
//! ([`reduce_scatter_units`]), and [`ThreadPeers`], ranks as threads of one process: the
//! stand-in the tests run on the emulated device.
//!
//! # The fixed-order all-reduce
//!
//! NCCL's own all-reduce sums in an order that depends on the world size, the topology
//! and the algorithm it picks, so the same run on 2 and on 4 GPUs would drift apart. Ours
//! is a reduce-scatter in fixed order followed by an all-gather, over a buffer of `n`
//! elements on `W` ranks cut into W chunks of `c = ceil(n / W)`:
//!
//! 1. all-to-all: rank p receives every rank's chunk p (`W` pieces of `c`);
//! 2. rank p adds its W pieces in the gradient groups' pairwise order, through the same
//!    [`crate::groups::PairwiseSum`] the groups use (W - 1 `add_assign` launches);
//! 3. all-gather: every rank receives every finished chunk.
//!
//! Each element is summed once, by one rank, in the same tree as one rank holding all the
//! groups would use: with `grad_groups = G`, ranks holding `G / W` groups each (a power of
//! two) give the same bits at every W. It moves what a ring all-reduce moves, 2 (W - 1) / W
//! of the buffer per rank, as two collectives instead of one (a second latency), plus two
//! device copies of the buffer and W - 1 additions over one chunk; see docs/benchmarks.md.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::backend::{DeviceGrads, Peers};
use crate::cuda::buffers::{Buf, add_assign};
use crate::cuda::layer::Device;
use crate::groups::PairwiseSum;
use crate::{Error, Result};

/// The fixed-order all-reduce's two [W * c] buffers, kept between steps (allocated on
/// the first all-reduce of a world size). Padding past `n` stays zero: it is summed and
/// gathered with the rest, never copied back.
#[derive(Default)]
pub struct Scratch {
    bufs: Option<(usize, Buf<f32>, Buf<f32>)>,
}

impl Scratch {
    fn get(
        &mut self,
        dev: &dyn Device,
        world: usize,
        chunk: usize,
    ) -> Result<(&Buf<f32>, &Buf<f32>)> {
        if self
            .bufs
            .as_ref()
            .is_none_or(|(w, s, _)| *w != world || s.len() != world * chunk)
        {
            self.bufs = None;
            let send = Buf::zeros(dev, world * chunk)?;
            let recv = Buf::zeros(dev, world * chunk)?;
            self.bufs = Some((world, send, recv));
        }
        let (_, s, r) = self
            .bufs
            .as_ref()
            .ok_or_else(|| Error::Backend("scratch".into()))?;
        Ok((s, r))
    }
}

/// A CUDA backend's gradient buffer (its first `n` elements) lent for one all-reduce.
pub(crate) struct Lent<'a> {
    pub(crate) dev: &'a dyn Device,
    pub(crate) grads: &'a mut Buf<f32>,
    pub(crate) n: usize,
    pub(crate) scratch: &'a mut Scratch,
}

impl DeviceGrads for Lent<'_> {
    fn len(&self) -> usize {
        self.n
    }

    fn stage(&mut self, reduce: &mut dyn FnMut(&mut [f32]) -> Result<()>) -> Result<()> {
        let mut host = self.grads.download(self.dev, 0, self.n)?;
        reduce(&mut host)?;
        self.grads.upload(self.dev, 0, &host)
    }

    fn all_reduce(&mut self, peers: &mut dyn Peers) -> Result<()> {
        let (w, n) = (peers.world(), self.n);
        // A world of one runs the same calls (NCCL at world size 1 is how a one-GPU
        // machine checks them); only an empty buffer has nothing to do.
        if n == 0 {
            return Ok(());
        }
        let dev = self.dev;
        check_peers(dev, peers)?;
        let c = n.div_ceil(w);
        let (send, recv) = self.scratch.get(dev, w, c)?;
        send.copy_from(dev, 0, self.grads, 0, n)?;
        let sum = sum_pieces(dev, peers, send, recv, c)?;
        ready(dev, peers)?;
        peers.all_gather(dev.stream(), recv.at(sum), send.at(0), c)?;
        self.grads.copy_from(dev, 0, send, 0, n)
    }
}

/// Before a collective: a transport through host memory (ranks as threads, on the
/// emulated device) reads the buffers at once, so the device's queued work must be done;
/// NCCL is ordered on the device's stream instead.
fn ready(dev: &dyn Device, peers: &dyn Peers) -> Result<()> {
    if peers.ordinal().is_none() {
        dev.synchronize()?;
    }
    Ok(())
}

/// A transport that can move `dev`'s buffers, with this rank in its world.
fn check_peers(dev: &dyn Device, peers: &dyn Peers) -> Result<()> {
    let (w, rank) = (peers.world(), peers.rank());
    if rank >= w {
        return Err(Error::Config(format!("rank {rank} of a world of {w}")));
    }
    if peers.ordinal() != dev.ordinal() {
        let on = |o: Option<usize>| o.map_or("the emulated device".into(), |k| format!("GPU {k}"));
        return Err(Error::Config(format!(
            "a collective over {} cannot sum a buffer on {} ({})",
            on(peers.ordinal()),
            on(dev.ordinal()),
            dev.name()
        )));
    }
    Ok(())
}

/// Steps 1 and 2 of the fixed-order all-reduce: every rank's piece p of `send` ([W * c])
/// goes to rank p, which adds the W pieces it received in `recv` in the pairwise order.
/// Returns the offset in `recv` of this rank's finished piece.
fn sum_pieces(
    dev: &dyn Device,
    peers: &mut dyn Peers,
    send: &Buf<f32>,
    recv: &Buf<f32>,
    c: usize,
) -> Result<usize> {
    ready(dev, peers)?;
    peers.all_to_all(dev.stream(), send.at(0), recv.at(0), c)?;
    // The pieces are summed in place in `recv`, named by their offsets.
    let mut tree = PairwiseSum::default();
    let add = |a: &mut usize, b: &usize| add_assign(dev, recv.arg(*a), recv.arg(*b), c);
    for p in 0..peers.world() {
        tree.push(p * c, add)?;
    }
    tree.finish(add)
}

/// The reduce-scatter half of the fixed-order all-reduce, in whole units: the first
/// `units * unit` elements of `buf` (rows of a loss table) summed over the ranks of
/// `peers`, rank p owning units p * s .. (p + 1) * s of them, s = ceil(units / W) (the
/// last ranks fewer, or none). Returns this rank's units and their sums, in host memory.
/// Every rank calls it with the same `units` and `unit`. `buf` is sent as it lies when
/// the units divide evenly; otherwise a padded copy is sent. Either way the device holds
/// one receive buffer of that size beside it for the call.
pub(crate) fn reduce_scatter_units(
    dev: &dyn Device,
    peers: &mut dyn Peers,
    buf: &Buf<f32>,
    units: usize,
    unit: usize,
) -> Result<(std::ops::Range<usize>, Vec<f32>)> {
    check_peers(dev, peers)?;
    let (w, rank) = (peers.world(), peers.rank());
    let s = units.div_ceil(w);
    let own = (rank * s).min(units)..((rank + 1) * s).min(units);
    let (n, c) = (units * unit, s * unit);
    if n == 0 {
        return Ok((own, Vec::new()));
    }
    let padded;
    let send = if w * c == n {
        buf
    } else {
        padded = Buf::zeros(dev, w * c)?;
        padded.copy_from(dev, 0, buf, 0, n)?;
        &padded
    };
    let recv = Buf::zeros(dev, w * c)?;
    let sum = sum_pieces(dev, peers, send, &recv, c)?;
    let host = recv.download(dev, sum, own.len() * unit)?;
    Ok((own, host))
}

/// Ranks as threads of one process, exchanging the emulated device's buffers through host
/// memory: what NCCL does between GPU processes, for tests. Every collective waits at
/// most `timeout` for the other ranks.
pub struct ThreadPeers {
    rank: usize,
    shared: Arc<Exchange>,
}

struct Exchange {
    world: usize,
    timeout: Duration,
    slots: Mutex<Vec<Vec<f32>>>,
    /// (ranks arrived, barriers completed).
    gate: Mutex<(usize, u64)>,
    cv: Condvar,
}

impl ThreadPeers {
    /// The `world` ranks of one group, rank r at index r.
    pub fn group(world: usize, timeout: Duration) -> Vec<ThreadPeers> {
        let shared = Arc::new(Exchange {
            world,
            timeout,
            slots: Mutex::new(vec![Vec::new(); world]),
            gate: Mutex::new((0, 0)),
            cv: Condvar::new(),
        });
        (0..world)
            .map(|rank| ThreadPeers {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    fn poisoned() -> Error {
        Error::Collective("a rank thread panicked inside a collective".into())
    }

    /// Returns once every rank has called it, or fails after the timeout.
    fn barrier(&self, what: &str) -> Result<()> {
        let x = &self.shared;
        let mut g = x.gate.lock().map_err(|_| Self::poisoned())?;
        let round = g.1;
        g.0 += 1;
        if g.0 == x.world {
            *g = (0, round + 1);
            x.cv.notify_all();
            return Ok(());
        }
        let deadline = Instant::now() + x.timeout;
        while g.1 == round {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Collective(format!(
                    "rank {} of {}, {what}: the other ranks did not arrive within {:?}",
                    self.rank, x.world, x.timeout
                )));
            }
            g = x.cv.wait_timeout(g, left).map_err(|_| Self::poisoned())?.0;
        }
        Ok(())
    }

    /// Post this rank's `post`, wait for all, build the result from every rank's post.
    fn exchange(
        &self,
        post: Vec<f32>,
        what: &str,
        take: impl FnOnce(&[Vec<f32>]) -> Vec<f32>,
    ) -> Result<Vec<f32>> {
        self.shared.slots.lock().map_err(|_| Self::poisoned())?[self.rank] = post;
        self.barrier(what)?;
        let out = take(&self.shared.slots.lock().map_err(|_| Self::poisoned())?);
        // Nobody overwrites a slot before every rank has read them all.
        self.barrier(what)?;
        Ok(out)
    }
}

/// `n` f32 at `addr` of the emulated device.
fn read(addr: u64, n: usize) -> Vec<f32> {
    // SAFETY: `ThreadPeers` serves only the emulated device (`Lent::all_reduce` checks
    // the ordinals), whose addresses are host memory; `addr` and `n` come from the
    // scratch buffers `Lent` allocated for this call.
    unsafe { std::slice::from_raw_parts(addr as *const f32, n) }.to_vec()
}

/// `v` written at `addr` of the emulated device.
fn write(addr: u64, v: &[f32]) {
    // SAFETY: as `read`; no other reference to the scratch buffer is alive.
    unsafe { std::slice::from_raw_parts_mut(addr as *mut f32, v.len()) }.copy_from_slice(v)
}

impl Peers for ThreadPeers {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.shared.world
    }
    fn ordinal(&self) -> Option<usize> {
        None
    }

    fn all_to_all(&mut self, _stream: u64, send: u64, recv: u64, count: usize) -> Result<()> {
        let (w, r) = (self.shared.world, self.rank);
        let got = self.exchange(read(send, w * count), "all-to-all", |slots| {
            slots
                .iter()
                .flat_map(|s| s[r * count..(r + 1) * count].iter().copied())
                .collect()
        })?;
        write(recv, &got);
        Ok(())
    }

    fn all_gather(&mut self, _stream: u64, send: u64, recv: u64, count: usize) -> Result<()> {
        let got = self.exchange(read(send, count), "all-gather", |slots| slots.concat())?;
        write(recv, &got);
        Ok(())
    }
}
