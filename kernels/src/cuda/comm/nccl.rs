//! NCCL between GPU processes: the unique id a group forms from, a communicator of one
//! rank, and the [`Peers`] of the fixed-order all-reduce ([`super::allreduce`]) over it.
//!
//! Nothing here blocks without a deadline. The communicator is created non-blocking
//! (`ncclConfig_t::blocking = 0`); initialisation and every collective are polled
//! (`ncclCommGetAsyncError` for NCCL's own state, `cuStreamQuery` for the kernels on the
//! stream) until they finish, fail, pass their deadline or are cancelled through the
//! [`Cancel`] flag, in which case the communicator is aborted (`ncclCommAbort` stops
//! its kernels and proxy threads) and the caller gets a retryable
//! [`Error::Collective`]: a lost peer ends the generation through the one fault path
//! instead of hanging a GPU.
//!
//! The collectives run on the stream of the CUDA backend's device (every kernel, copy and
//! GEMM of the backend is issued to it), so they are ordered after the backward pass and
//! before the optimizer step without an event. A send or receive that fails inside a
//! group closes the group (`ncclGroupEnd`) before the communicator is aborted: the group
//! depth is per thread, and a group left open would swallow the next generation's
//! initialisation on this thread.

use std::ffi::c_void;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cudarc::driver::CudaContext;
use cudarc::driver::sys as drv;
use cudarc::nccl::sys;

use crate::backend::Peers;
use crate::{Error, Result};

/// Bytes of an NCCL unique id (`ncclUniqueId`).
pub const ID_BYTES: usize = 128;

/// Set from another thread to make the rank's pending NCCL call fail at once (the
/// coordinator ended the generation: a peer is gone).
pub type Cancel = Arc<AtomicBool>;

/// Whether `libnccl.so` loads here.
pub fn nccl_present() -> bool {
    // SAFETY: a dlopen probe.
    unsafe { sys::is_culib_present() }
}

fn missing() -> Error {
    Error::Backend(
        "no NCCL library (libnccl.so) on the library path: the PyPI wheel nvidia-nccl-cu13 \
         ships only libnccl.so.2, link libnccl.so to it"
            .into(),
    )
}

fn nccl(what: &str, r: sys::ncclResult_t) -> Error {
    // SAFETY: NCCL returns a static string for every result code.
    let text = unsafe { std::ffi::CStr::from_ptr(sys::ncclGetErrorString(r)) };
    Error::Collective(format!("NCCL {what}: {} ({r:?})", text.to_string_lossy()))
}

/// NCCL's version as (major, minor, patch).
pub fn version() -> Result<(u32, u32, u32)> {
    if !nccl_present() {
        return Err(missing());
    }
    let mut v = 0i32;
    // SAFETY: an out-parameter.
    let r = unsafe { sys::ncclGetVersion(&mut v) };
    if r != sys::ncclResult_t::ncclSuccess {
        return Err(nccl("version", r));
    }
    let v = v as u32;
    Ok((v / 10000, (v % 10000) / 100, v % 100))
}

/// A new unique id. The calling process hosts the group's bootstrap root (a thread
/// listening on an address NCCL picks: `NCCL_SOCKET_IFNAME` steers it) until every rank
/// has connected; no GPU is needed.
pub fn unique_id() -> Result<[u8; ID_BYTES]> {
    if !nccl_present() {
        return Err(missing());
    }
    let mut id = sys::ncclUniqueId {
        internal: [0; ID_BYTES],
    };
    // SAFETY: an out-parameter of the right type.
    let r = unsafe { sys::ncclGetUniqueId(&mut id) };
    if r != sys::ncclResult_t::ncclSuccess {
        return Err(nccl("creating a unique id", r));
    }
    Ok(id.internal.map(|c| c as u8))
}

/// One rank's NCCL communicator on GPU `ordinal`.
pub struct Nccl {
    comm: sys::ncclComm_t,
    ctx: Arc<CudaContext>,
    ordinal: usize,
    rank: usize,
    world: usize,
    timeout: Duration,
    cancel: Cancel,
    /// Set once aborted: every later call fails at once.
    dead: bool,
}

// SAFETY: the communicator is used by one thread at a time (`&mut self`), and NCCL
// allows a communicator to move between threads that bind the same device.
unsafe impl Send for Nccl {}

impl Nccl {
    /// Join the group of `world` ranks that `id` names as `rank`, on GPU `ordinal`; fails
    /// after `timeout` (a rank that never came) or when `cancel` is set.
    pub fn join(
        id: &[u8],
        rank: usize,
        world: usize,
        ordinal: usize,
        timeout: Duration,
        cancel: Cancel,
    ) -> Result<Self> {
        if !nccl_present() {
            return Err(missing());
        }
        let internal: [u8; ID_BYTES] = id.try_into().map_err(|_| {
            Error::Config(format!(
                "an NCCL unique id has {ID_BYTES} bytes, not {}",
                id.len()
            ))
        })?;
        if rank >= world {
            return Err(Error::Config(format!("rank {rank} of a world of {world}")));
        }
        let int = |x: usize, what: &str| {
            i32::try_from(x).map_err(|_| Error::Config(format!("{what} {x} exceeds NCCL's int")))
        };
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| Error::Cuda(format!("opening device {ordinal} for NCCL: {e:?}")))?;
        ctx.bind_to_thread()
            .map_err(|e| Error::Cuda(format!("binding device {ordinal}: {e:?}")))?;
        // NCCL_CONFIG_INITIALIZER: every field undefined but size, magic, version and
        // `blocking`. NCCL copies `size` bytes over its defaults, so a struct from an
        // older header is read correctly by a newer library.
        const UNDEF: i32 = i32::MIN;
        let mut config = sys::ncclConfig_t {
            size: size_of::<sys::ncclConfig_t>(),
            magic: 0xcafe_beef,
            version: 23000,
            blocking: 0,
            cgaClusterSize: UNDEF,
            minCTAs: UNDEF,
            maxCTAs: UNDEF,
            netName: std::ptr::null(),
            splitShare: UNDEF,
            trafficClass: UNDEF,
            commName: std::ptr::null(),
            collnetEnable: UNDEF,
            CTAPolicy: UNDEF,
            shrinkShare: UNDEF,
            nvlsCTAs: UNDEF,
            nChannelsPerNetPeer: UNDEF,
            nvlinkCentricSched: UNDEF,
            graphUsageMode: UNDEF,
            numRmaCtx: UNDEF,
            maxP2pPeers: UNDEF,
        };
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        let uid = sys::ncclUniqueId {
            internal: internal.map(|b| b as std::ffi::c_char),
        };
        // SAFETY: out-parameter and config outlive the call; the device is bound.
        let r = unsafe {
            sys::ncclCommInitRankConfig(
                &mut comm,
                int(world, "world")?,
                uid,
                int(rank, "rank")?,
                &mut config,
            )
        };
        let mut me = Self {
            comm,
            ctx,
            ordinal,
            rank,
            world,
            timeout,
            cancel,
            dead: comm.is_null(),
        };
        if r != sys::ncclResult_t::ncclSuccess && r != sys::ncclResult_t::ncclInProgress {
            me.abort();
            return Err(nccl(&format!("rank {rank} of {world} joining"), r));
        }
        me.settle(&format!("rank {rank} of {world} joining"), None)?;
        Ok(me)
    }

    /// Abort the communicator (idempotent): its kernels stop, later calls fail.
    fn abort(&mut self) {
        if !self.comm.is_null() && !self.dead {
            let _ = self.ctx.bind_to_thread();
            // SAFETY: a live communicator, aborted once.
            unsafe { sys::ncclCommAbort(self.comm) };
        }
        self.dead = true;
    }

    /// Wait until NCCL's pending work is issued (and, with `stream`, until the stream's
    /// kernels finished): an error, the deadline or a cancel aborts the communicator.
    fn settle(&mut self, what: &str, stream: Option<u64>) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        let mut issued = false;
        loop {
            if !issued {
                let mut state = sys::ncclResult_t::ncclSuccess;
                // SAFETY: a live communicator and an out-parameter.
                let r = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
                if r != sys::ncclResult_t::ncclSuccess {
                    self.abort();
                    return Err(nccl(what, r));
                }
                match state {
                    sys::ncclResult_t::ncclSuccess => issued = true,
                    sys::ncclResult_t::ncclInProgress => {}
                    e => {
                        self.abort();
                        return Err(nccl(what, e));
                    }
                }
            }
            if issued {
                let Some(stream) = stream else {
                    return Ok(());
                };
                // SAFETY: the device's stream, of the bound context.
                match unsafe { drv::cuStreamQuery(stream as drv::CUstream) } {
                    drv::CUresult::CUDA_SUCCESS => {
                        // A kernel that failed mid-way reports here, not in the stream.
                        let mut state = sys::ncclResult_t::ncclSuccess;
                        // SAFETY: as above.
                        unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
                        if state != sys::ncclResult_t::ncclSuccess {
                            self.abort();
                            return Err(nccl(what, state));
                        }
                        return Ok(());
                    }
                    drv::CUresult::CUDA_ERROR_NOT_READY => {}
                    e => {
                        self.abort();
                        return Err(Error::Cuda(format!("{what}: the stream failed: {e:?}")));
                    }
                }
            }
            if self.cancel.load(Ordering::Relaxed) {
                self.abort();
                return Err(Error::Collective(format!(
                    "NCCL {what}: cancelled (the generation ended)"
                )));
            }
            if Instant::now() >= deadline {
                self.abort();
                return Err(Error::Collective(format!(
                    "NCCL {what}: not finished within {:?} (a peer is lost or stalled)",
                    self.timeout
                )));
            }
            std::thread::yield_now();
        }
    }

    /// Check that the communicator can run `what`, and bind its device.
    fn ready(&self, what: &str) -> Result<()> {
        if self.dead {
            return Err(Error::Collective(format!(
                "NCCL {what}: the communicator was aborted"
            )));
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| Error::Cuda(format!("binding device {}: {e:?}", self.ordinal)))
    }

    fn check(&mut self, what: &str, r: sys::ncclResult_t) -> Result<()> {
        if !ok(r) {
            self.abort();
            return Err(nccl(what, r));
        }
        Ok(())
    }
}

/// A call that succeeded or, on a non-blocking communicator, is under way.
fn ok(r: sys::ncclResult_t) -> bool {
    r == sys::ncclResult_t::ncclSuccess || r == sys::ncclResult_t::ncclInProgress
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // Abort rather than destroy: destroying waits for peers that may be gone.
        self.abort();
    }
}

impl Peers for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn ordinal(&self) -> Option<usize> {
        Some(self.ordinal)
    }

    fn all_to_all(&mut self, stream: u64, send: u64, recv: u64, count: usize) -> Result<()> {
        let what = format!("all-to-all, rank {} of {}", self.rank, self.world);
        self.ready(&what)?;
        let cu = stream as sys::cudaStream_t;
        let f32s = sys::ncclDataType_t::ncclFloat32;
        // SAFETY: group calls have no arguments.
        let r = unsafe { sys::ncclGroupStart() };
        self.check(&what, r)?;
        let mut failed = None;
        for p in 0..self.world {
            let off = (p * count * 4) as u64;
            // SAFETY: `send` and `recv` hold world * count f32 on this communicator's
            // device (the buffers of `allreduce::Lent` or `allreduce::reduce_scatter_units`).
            let (s, q) = unsafe {
                (
                    sys::ncclSend(
                        (send + off) as *const c_void,
                        count,
                        f32s,
                        p as i32,
                        self.comm,
                        cu,
                    ),
                    sys::ncclRecv(
                        (recv + off) as *mut c_void,
                        count,
                        f32s,
                        p as i32,
                        self.comm,
                        cu,
                    ),
                )
            };
            failed = [s, q].into_iter().find(|r| !ok(*r));
            if failed.is_some() {
                break;
            }
        }
        // SAFETY: closes the group opened above, also after a failed call inside it.
        let r = unsafe { sys::ncclGroupEnd() };
        self.check(&what, failed.unwrap_or(r))?;
        self.settle(&what, Some(stream))
    }

    fn all_gather(&mut self, stream: u64, send: u64, recv: u64, count: usize) -> Result<()> {
        let what = format!("all-gather, rank {} of {}", self.rank, self.world);
        self.ready(&what)?;
        // SAFETY: `send` holds count f32 and `recv` world * count on this device.
        let r = unsafe {
            sys::ncclAllGather(
                send as *const c_void,
                recv as *mut c_void,
                count,
                sys::ncclDataType_t::ncclFloat32,
                self.comm,
                stream as sys::cudaStream_t,
            )
        };
        self.check(&what, r)?;
        self.settle(&what, Some(stream))
    }
}
