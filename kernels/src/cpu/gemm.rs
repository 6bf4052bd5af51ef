//! Matrix products through the `gemm` crate (AVX-512/AVX2 micro-kernels chosen at run
//! time). Called single-threaded from inside a [`super::team::Team`] region: the callers
//! split the work so each thread's product is large and the threads never wait on a pool.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::Real;

/// Floating-point operations executed by [`gemm`] in this process (2*m*n*k per call), for
/// benchmarks that report the share of the machine's peak the training reaches.
static FLOPS: AtomicU64 = AtomicU64::new(0);

/// GEMM FLOPs executed so far by all CPU engines of this process.
pub fn flops_executed() -> u64 {
    FLOPS.load(Ordering::Relaxed)
}

/// A strided matrix view: element (i, j) at `ptr + i*rs + j*cs`.
#[derive(Clone, Copy, Debug)]
pub struct Mat<T> {
    pub ptr: *const T,
    pub rs: isize,
    pub cs: isize,
}

impl<T> Mat<T> {
    /// A row-major matrix with leading dimension `ld`.
    pub fn rows(s: &[T], ld: usize) -> Self {
        Self {
            ptr: s.as_ptr(),
            rs: ld as isize,
            cs: 1,
        }
    }
    /// A row-major matrix starting at `ptr`.
    pub fn rows_ptr(ptr: *const T, ld: usize) -> Self {
        Self {
            ptr,
            rs: ld as isize,
            cs: 1,
        }
    }
    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Self {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
    /// The view starting at element (i, j).
    pub fn at(self, i: usize, j: usize) -> Self {
        // wrapping_offset: forming the pointer is safe; it is dereferenced only in bounds.
        Self {
            ptr: self
                .ptr
                .wrapping_offset(i as isize * self.rs + j as isize * self.cs),
            ..self
        }
    }
}

/// A row-major destination matrix: element (i, j) at `ptr + i*ld + j`.
#[derive(Clone, Copy, Debug)]
pub struct Dst<T> {
    pub ptr: *mut T,
    pub ld: usize,
}

impl<T> Dst<T> {
    /// A row-major destination starting at `ptr` with leading dimension `ld`.
    pub fn rows(ptr: *mut T, ld: usize) -> Self {
        Self { ptr, ld }
    }
}

/// dst[m, n] = (accumulate ? dst : 0) + lhs[m, k] · rhs[k, n]; `dst` row-major with
/// leading dimension `dst.ld`.
///
/// # Safety
/// All three views must be valid for the given sizes, `dst` must not overlap the inputs,
/// and no other thread may touch the written part of `dst` during the call.
pub unsafe fn gemm<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: Dst<T>,
    accumulate: bool,
    lhs: Mat<T>,
    rhs: Mat<T>,
) {
    let Dst { ptr: dst, ld } = dst;
    if m == 0 || n == 0 {
        return;
    }
    FLOPS.fetch_add(2 * (m * n * k) as u64, Ordering::Relaxed);
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                // SAFETY: row i of dst is valid for n elements (caller contract).
                unsafe { std::slice::from_raw_parts_mut(dst.add(i * ld), n) }.fill(T::ZERO);
            }
        }
        return;
    }
    // SAFETY: forwarded caller contract; gemm reads lhs/rhs and writes dst within sizes.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            ld as isize,
            accumulate,
            lhs.ptr,
            lhs.cs,
            lhs.rs,
            rhs.ptr,
            rhs.cs,
            rhs.rs,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}
