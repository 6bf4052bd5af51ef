//! [`NcclRing`]: the collective of GPU workers. The gradient buffer is summed on the
//! device by NCCL, in place and in a fixed order ([`lightrnn_kernels::cuda::comm::allreduce`]:
//! the same parameters at every GPU count); the small host values (loss sums, the stop
//! flag, the carried state of a checkpoint) go through the TCP ring beside it, which the
//! group forms anyway. A sparse reallocation round's loss tables are reduce-scattered on
//! the device the same way ([`Collective::device_peers`]): each rank downloads its share
//! of the words only.
//!
//! One communicator per generation, from the id the coordinator created for it: it is
//! aborted when the generation ends (the coordinator's abort reaches [`Cancel`] through
//! the heartbeat task, so a rank waiting on a lost peer returns at once), and a later
//! generation's id names a new group that no stale worker can join.

use std::time::Duration;

use lightrnn_kernels::cuda::comm::nccl::{Cancel, Nccl};
use lightrnn_kernels::{GradReduce, GradsMut, Peers};

use super::collective::{Collective, reduce_host};
use super::ring::TcpRing;
use lightrnn_core::Result;
use lightrnn_core::report::LinkWaits;

pub struct NcclRing {
    ring: TcpRing,
    nccl: Nccl,
}

impl NcclRing {
    /// Join generation `generation`'s communicator `id` as the ring's rank on GPU
    /// `ordinal`; every NCCL call fails after `timeout` or once `cancel` is set.
    pub fn join(
        ring: TcpRing,
        id: &[u8],
        ordinal: usize,
        generation: u64,
        timeout: Duration,
        cancel: Cancel,
    ) -> Result<Self> {
        let (rank, world) = (ring.rank(), ring.world());
        let t0 = std::time::Instant::now();
        let nccl = Nccl::join(id, rank, world, ordinal, timeout, cancel)?;
        tracing::info!(
            rank,
            world,
            generation,
            gpu = ordinal,
            seconds = t0.elapsed().as_secs_f64(),
            "NCCL communicator formed"
        );
        Ok(Self { ring, nccl })
    }
}

impl GradReduce for NcclRing {
    fn all_reduce_grads(&mut self, grads: GradsMut<'_>) -> lightrnn_kernels::Result<()> {
        match grads {
            GradsMut::Device(d) => d.all_reduce(&mut self.nccl),
            host => reduce_host(&mut self.ring, host),
        }
    }
}

impl Collective for NcclRing {
    fn rank(&self) -> usize {
        self.ring.rank()
    }
    fn world(&self) -> usize {
        self.ring.world()
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        self.ring.all_reduce_sum(buf)
    }
    fn reduce_scatter_sum(
        &mut self,
        buf: &mut [f32],
        unit: usize,
    ) -> Result<std::ops::Range<usize>> {
        self.ring.reduce_scatter_sum(buf, unit)
    }
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        self.ring.broadcast(buf, root)
    }
    fn device_peers(&mut self) -> Option<&mut dyn Peers> {
        Some(&mut self.nccl)
    }
    fn waits(&self) -> Vec<LinkWaits> {
        self.ring.waits()
    }
}
