//! Collectives between the ranks of a data-parallel job: the [`Collective`] trait the
//! training loop sums its gradients (through the backend's [`GradReduce`] side), loss
//! sums and checkpoint states through, and [`Single`] for a job of one rank (how a
//! batch's streams are split over the ranks is `lightrnn_core::util::share`). The TCP ring between processes is in
//! [`super::ring`].

use lightrnn_kernels::{GradReduce, GradsMut, Peers};

use lightrnn_core::Result;
use lightrnn_core::report::LinkWaits;
use lightrnn_core::util::share;

/// What data-parallel training needs from its ranks. A backend reduces its gradient
/// buffer through the [`GradReduce`] side, wherever that buffer lies.
pub trait Collective: GradReduce + Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Element-wise sum over the ranks, in place; every rank gets the same bits.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()>;
    /// Sum over the ranks, scattered: `buf` is units of `unit` elements (a word's row of
    /// a loss table); afterwards this rank holds the full sum of the units it returns
    /// (the ranks' ranges cover every unit once), the rest of `buf` is unspecified. This
    /// default is an all-reduce, and each rank keeps its share; the ring sends half.
    fn reduce_scatter_sum(
        &mut self,
        buf: &mut [f32],
        unit: usize,
    ) -> Result<std::ops::Range<usize>> {
        self.all_reduce_sum(buf)?;
        Ok(share(buf.len() / unit.max(1), self.world(), self.rank()))
    }
    /// Rank `root`'s buffer, copied to every rank.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()>;
    /// The transport between the ranks' devices, where the group has one (NCCL between
    /// GPU workers): a backend whose buffers lie on a device sums them there.
    fn device_peers(&mut self) -> Option<&mut dyn Peers> {
        None
    }
    /// This rank's waits on its peers in collectives so far, per peer and direction (for
    /// its report; none where the collective does not count them).
    fn waits(&self) -> Vec<LinkWaits> {
        Vec::new()
    }
    /// When the last gradient all-reduce began and when its first bytes came from a peer
    /// (the peers' arrival: before it, a wait; after it, the transfer), where the
    /// collective knows.
    fn take_wait(&mut self) -> Option<(std::time::Instant, std::time::Instant)> {
        None
    }
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<()> {
        let mut x = [0.0f32];
        self.all_reduce_sum(&mut x)
    }
    /// Element-wise f64 sum (loss sums, word counts): every rank's values are broadcast
    /// bit-exactly and summed in rank order, so all ranks get the same bits. Meant for
    /// short vectors (one broadcast per rank).
    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> Result<()> {
        if self.world() == 1 {
            return Ok(());
        }
        let mut total = vec![0f64; buf.len()];
        let mut bits = vec![0f32; 2 * buf.len()];
        for root in 0..self.world() {
            if root == self.rank() {
                for (k, x) in buf.iter().enumerate() {
                    let u = x.to_bits();
                    bits[2 * k] = f32::from_bits(u as u32);
                    bits[2 * k + 1] = f32::from_bits((u >> 32) as u32);
                }
            }
            self.broadcast(&mut bits, root)?;
            for (k, t) in total.iter_mut().enumerate() {
                let u = bits[2 * k].to_bits() as u64 | ((bits[2 * k + 1].to_bits() as u64) << 32);
                *t += f64::from_bits(u);
            }
        }
        buf.copy_from_slice(&total);
        Ok(())
    }
}

/// The gradient all-reduce of a collective that sums host memory: a device buffer is
/// staged through the host (the CUDA backend on workers without NCCL, and the emulated
/// device in tests; NCCL sums it on the device instead: `super::nccl`).
pub(super) fn reduce_host(
    coll: &mut dyn Collective,
    grads: GradsMut<'_>,
) -> lightrnn_kernels::Result<()> {
    let alone = coll.world() == 1;
    let mut sum = |buf: &mut [f32]| {
        coll.all_reduce_sum(buf)
            .map_err(|e| lightrnn_kernels::Error::Collective(e.to_string()))
    };
    match grads {
        GradsMut::Host(buf) => sum(buf),
        // One rank has nothing to sum: the buffer stays where it is.
        GradsMut::Device(_) if alone => Ok(()),
        GradsMut::Device(d) => d.stage(&mut sum),
    }
}

/// A job of one rank: every collective is the identity.
pub struct Single;

impl GradReduce for Single {
    fn all_reduce_grads(&mut self, grads: GradsMut<'_>) -> lightrnn_kernels::Result<()> {
        reduce_host(self, grads)
    }
}

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&mut self, _buf: &mut [f32], _root: usize) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_every_item_once() {
        for (n, w) in [(20, 2), (10, 3), (5, 5), (7, 4)] {
            let mut next = 0;
            for r in 0..w {
                let s = share(n, w, r);
                assert_eq!(s.start, next);
                assert!(s.len() == n / w || s.len() == n / w + 1);
                next = s.end;
            }
            assert_eq!(next, n);
        }
    }
}
