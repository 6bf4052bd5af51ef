//! Typed device buffers and the launch helpers the CUDA backend's orchestration uses.

use std::marker::PhantomData;

use super::layer::{Arg, Device, Mem};
use crate::{Error, Result};

/// Element types that live in device buffers.
pub trait Elem: Copy + Default + 'static {}
impl Elem for f32 {}
impl Elem for f64 {}
impl Elem for u32 {}
impl Elem for u64 {}

/// `len` elements of `T` on a device.
pub struct Buf<T: Elem> {
    mem: Mem,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Elem> Buf<T> {
    /// `len` zeroed elements.
    pub fn zeros(dev: &dyn Device, len: usize) -> Result<Self> {
        let bytes = len
            .checked_mul(size_of::<T>())
            .ok_or_else(|| Error::OutOfMemory(format!("{len} elements")))?;
        Ok(Self {
            mem: dev.alloc(bytes)?,
            len,
            _t: PhantomData,
        })
    }

    /// A buffer holding `host`.
    pub fn from_host(dev: &dyn Device, host: &[T]) -> Result<Self> {
        let b = Self::zeros(dev, host.len())?;
        b.upload(dev, 0, host)?;
        Ok(b)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// The device address of element `i` (`i <= len`).
    pub fn at(&self, i: usize) -> u64 {
        debug_assert!(i <= self.len, "element {i} of a buffer of {}", self.len);
        self.mem.addr() + (i * size_of::<T>()) as u64
    }

    /// The address of element `i` as a kernel argument.
    pub fn arg(&self, i: usize) -> Arg {
        Arg::Ptr(self.at(i))
    }

    fn check(&self, offset: usize, n: usize, what: &str) -> Result<()> {
        if offset.checked_add(n).is_none_or(|end| end > self.len) {
            return Err(Error::Shape(format!(
                "{what} of {n} elements at {offset} in a buffer of {}",
                self.len
            )));
        }
        Ok(())
    }

    pub fn upload(&self, dev: &dyn Device, offset: usize, host: &[T]) -> Result<()> {
        self.check(offset, host.len(), "upload")?;
        // SAFETY: plain-old-data elements viewed as bytes.
        let bytes =
            unsafe { std::slice::from_raw_parts(host.as_ptr() as *const u8, size_of_val(host)) };
        dev.upload(self.at(offset), bytes)
    }

    pub fn download_into(&self, dev: &dyn Device, offset: usize, host: &mut [T]) -> Result<()> {
        self.check(offset, host.len(), "download")?;
        // SAFETY: plain-old-data elements viewed as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(host.as_mut_ptr() as *mut u8, size_of_val(host))
        };
        dev.download(self.at(offset), bytes)
    }

    pub fn download(&self, dev: &dyn Device, offset: usize, n: usize) -> Result<Vec<T>> {
        let mut v = vec![T::default(); n];
        self.download_into(dev, offset, &mut v)?;
        Ok(v)
    }

    /// Copy `n` elements from `src[src_off..]` to `self[off..]`.
    pub fn copy_from(
        &self,
        dev: &dyn Device,
        off: usize,
        src: &Buf<T>,
        src_off: usize,
        n: usize,
    ) -> Result<()> {
        self.check(off, n, "copy")?;
        src.check(src_off, n, "copy")?;
        dev.copy(self.at(off), src.at(src_off), n * size_of::<T>())
    }

    pub fn zero(&self, dev: &dyn Device, off: usize, n: usize) -> Result<()> {
        self.check(off, n, "memset")?;
        dev.zero(self.at(off), n * size_of::<T>())
    }
}

/// `x` rounded up to a multiple of 4 (f32s or u32s: 16 bytes).
pub fn pad4(x: usize) -> usize {
    x.div_ceil(4) * 4
}

/// Threads per block of the element-wise kernels.
pub const THREADS: u32 = 256;

/// A 1-D grid for `n` elements of a grid-strided kernel (at most 4096 blocks: enough to
/// fill an H100 several times over; the kernels loop over the rest).
pub fn grid_for(n: usize) -> [u32; 3] {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 4096);
    [blocks as u32, 1, 1]
}

/// x[i] += y[i] for i < n (`add_assign`): the pairwise sums of the gradient groups and of
/// the ranks' pieces in the device all-reduce.
pub fn add_assign(dev: &dyn Device, x: Arg, y: Arg, n: usize) -> Result<()> {
    dev.launch(&super::layer::Launch {
        kernel: "add_assign",
        grid: grid_for(n),
        block: [THREADS, 1, 1],
        args: &[x, y, Arg::U64(n as u64)],
    })
}

/// `x` as a kernel's `unsigned` argument, or why it does not fit.
pub fn u32_arg(x: usize, what: &str) -> Result<Arg> {
    u32::try_from(x)
        .map(Arg::U32)
        .map_err(|_| Error::Config(format!("{what} = {x} exceeds the kernels' 32-bit sizes")))
}
