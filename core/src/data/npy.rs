//! NumPy `.npy` files (format 1.0/2.0/3.0): 2-D float tables and 1-D integer vectors,
//! little-endian, C order — what `numpy.save` writes and `numpy.load` reads. Parsed as
//! hostile input: bounded header, declared shape checked against the data length.

use bytes::Bytes;

use crate::{Error, Result};

const MAGIC: &[u8] = b"\x93NUMPY";

/// Element types this module reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F64,
    I64,
    I32,
    U32,
}

impl Dtype {
    fn descr(self) -> &'static str {
        match self {
            Dtype::F32 => "<f4",
            Dtype::F64 => "<f8",
            Dtype::I64 => "<i8",
            Dtype::I32 => "<i4",
            Dtype::U32 => "<u4",
        }
    }
    fn size(self) -> usize {
        match self {
            Dtype::F32 | Dtype::I32 | Dtype::U32 => 4,
            Dtype::F64 | Dtype::I64 => 8,
        }
    }
}

/// An array read from a `.npy` file: dtype, shape and the raw little-endian data.
pub struct Array {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Bytes,
}

/// Serialise `data` (little-endian elements of `dtype`) with `shape`.
pub fn encode(dtype: Dtype, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let shape_s = match shape {
        [n] => format!("({n},)"),
        s => format!(
            "({})",
            s.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape_s}, }}",
        dtype.descr()
    );
    // Pad so that magic + version + length + header is a multiple of 64, ending in '\n'.
    let total = MAGIC.len() + 2 + 4 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(MAGIC.len() + 6 + header.len() + data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[2, 0]);
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

pub fn encode_f32(shape: &[usize], v: &[f32]) -> Vec<u8> {
    let mut data = Vec::with_capacity(v.len() * 4);
    for x in v {
        data.extend_from_slice(&x.to_le_bytes());
    }
    encode(Dtype::F32, shape, &data)
}

pub fn encode_i64(v: &[i64]) -> Vec<u8> {
    let mut data = Vec::with_capacity(v.len() * 8);
    for x in v {
        data.extend_from_slice(&x.to_le_bytes());
    }
    encode(Dtype::I64, &[v.len()], &data)
}

pub fn encode_i32(shape: &[usize], v: &[i32]) -> Vec<u8> {
    let data: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    encode(Dtype::I32, shape, &data)
}

pub fn encode_f64(v: &[f64]) -> Vec<u8> {
    let data: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    encode(Dtype::F64, &[v.len()], &data)
}

/// Parse a `.npy` file (`what` names it in errors).
pub fn decode(bytes: Bytes, what: &str) -> Result<Array> {
    let bad = |m: String| Error::Data(format!("{what}: {m}"));
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(bad("not a .npy file".into()));
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(bad("truncated header".into()));
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => return Err(bad(format!("unsupported .npy version {v}"))),
    };
    if hlen > 1 << 16 || start + hlen > bytes.len() {
        return Err(bad(format!(
            "header of {hlen} bytes is truncated or too long"
        )));
    }
    let header = std::str::from_utf8(&bytes[start..start + hlen])
        .map_err(|_| bad("header is not text".into()))?;
    let field = |key: &str| -> Option<&str> {
        let at = header.find(&format!("'{key}'"))? + key.len() + 2;
        let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
        Some(rest)
    };
    let descr = field("descr")
        .and_then(|r| r.strip_prefix('\'')?.split('\'').next())
        .ok_or_else(|| bad("no descr".into()))?;
    let dtype = match descr {
        "<f4" | "=f4" | "f4" => Dtype::F32,
        "<f8" | "=f8" | "f8" => Dtype::F64,
        "<i8" | "=i8" | "i8" => Dtype::I64,
        "<i4" | "=i4" | "i4" => Dtype::I32,
        "<u4" | "=u4" | "u4" => Dtype::U32,
        other => {
            return Err(bad(format!(
                "dtype {other:?} (expected <f4, <f8, <i8 or <u4)"
            )));
        }
    };
    if field("fortran_order").is_some_and(|r| r.starts_with("True")) {
        return Err(bad(
            "Fortran-order arrays are not supported (save with C order)".into(),
        ));
    }
    let shape_s = field("shape")
        .and_then(|r| r.strip_prefix('(')?.split(')').next())
        .ok_or_else(|| bad("no shape".into()))?;
    let shape: Vec<usize> = shape_s
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| bad(format!("bad shape ({shape_s})")))
        })
        .collect::<Result<_>>()?;
    let n = shape
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .ok_or_else(|| bad("shape overflows".into()))?;
    let data = bytes.slice(start + hlen..);
    if n.checked_mul(dtype.size()) != Some(data.len()) {
        return Err(bad(format!(
            "shape ({shape_s}) needs {} bytes of data, the file has {}",
            n * dtype.size(),
            data.len()
        )));
    }
    Ok(Array { dtype, shape, data })
}

impl Array {
    /// The data as f32 without a copy, when it is f32, aligned and the host little-endian.
    pub fn as_f32(&self) -> Option<&[f32]> {
        if self.dtype != Dtype::F32
            || cfg!(target_endian = "big")
            || !(self.data.as_ptr() as usize).is_multiple_of(4)
        {
            return None;
        }
        // SAFETY: the pointer is 4-aligned (checked), the length is a multiple of 4 (checked
        // by `decode` against the shape), every bit pattern is a valid f32, and the bytes
        // live as long as `self`.
        Some(unsafe {
            std::slice::from_raw_parts(self.data.as_ptr() as *const f32, self.data.len() / 4)
        })
    }

    /// The data as f64 without a copy, when it is f64, aligned and the host little-endian.
    pub fn as_f64(&self) -> Option<&[f64]> {
        if self.dtype != Dtype::F64
            || cfg!(target_endian = "big")
            || !(self.data.as_ptr() as usize).is_multiple_of(8)
        {
            return None;
        }
        // SAFETY: as in `as_f32`, with 8-byte elements.
        Some(unsafe {
            std::slice::from_raw_parts(self.data.as_ptr() as *const f64, self.data.len() / 8)
        })
    }

    pub fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            Dtype::F32 => self
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F64 => self
                .data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
            Dtype::I64 => self
                .data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
            Dtype::I32 => self
                .data
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)
                .collect(),
            Dtype::U32 => self
                .data
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)
                .collect(),
        }
    }
    pub fn to_f64(&self) -> Vec<f64> {
        match self.dtype {
            Dtype::F64 => self
                .data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
            _ => self.to_f32().into_iter().map(f64::from).collect(),
        }
    }
    pub fn to_i64(&self) -> Result<Vec<i64>> {
        match self.dtype {
            Dtype::I64 => Ok(self
                .data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect()),
            Dtype::I32 => Ok(self
                .data
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect()),
            Dtype::U32 => Ok(self
                .data
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect()),
            d => Err(Error::Data(format!("expected an integer array, got {d:?}"))),
        }
    }
    /// An integer array as u32 indices, converted element by element (no wider copy);
    /// a negative or out-of-range value is an error naming it.
    pub fn to_u32(&self) -> Result<Vec<u32>> {
        let bad = |x: i64| Error::Data(format!("index {x} is negative or above u32"));
        match self.dtype {
            Dtype::U32 => Ok(self
                .data
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()),
            Dtype::I32 => self
                .data
                .chunks_exact(4)
                .map(|c| {
                    let x = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    u32::try_from(x).map_err(|_| bad(x.into()))
                })
                .collect(),
            Dtype::I64 => self
                .data
                .chunks_exact(8)
                .map(|c| {
                    let x = i64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
                    u32::try_from(x).map_err(|_| bad(x))
                })
                .collect(),
            d => Err(Error::Data(format!("expected an integer array, got {d:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let v: Vec<f32> = (0..12).map(|i| i as f32 * 0.5).collect();
        let bytes = encode_f32(&[3, 4], &v);
        assert_eq!((bytes.len() - 48) % 64, 0, "header padded to 64 bytes");
        let a = decode(Bytes::from(bytes.clone()), "t").unwrap();
        assert_eq!(a.shape, vec![3, 4]);
        assert_eq!(a.to_f32(), v);
        let i = decode(Bytes::from(encode_i64(&[5, -1, 7])), "i").unwrap();
        assert_eq!(i.shape, vec![3]);
        assert_eq!(i.to_i64().unwrap(), vec![5, -1, 7]);
        let j = decode(Bytes::from(encode_i32(&[1, 3], &[5, -1, 7])), "j").unwrap();
        assert_eq!((j.dtype, &j.shape[..]), (Dtype::I32, &[1usize, 3][..]));
        assert_eq!(j.to_i64().unwrap(), vec![5, -1, 7]);
        let e = j.to_u32().unwrap_err().to_string();
        assert!(e.contains("index -1"), "{e}");
        let u = decode(Bytes::from(encode_i64(&[5, 4_000_000_000, 7])), "u").unwrap();
        assert_eq!(u.to_u32().unwrap(), vec![5, 4_000_000_000, 7]);
        assert!(
            decode(Bytes::from(encode_i64(&[1 << 32])), "h")
                .unwrap()
                .to_u32()
                .is_err()
        );
        let d = decode(Bytes::from(encode_f64(&[0.25, -3.0])), "d").unwrap();
        assert_eq!(d.as_f64().unwrap(), &[0.25, -3.0]);
        // Truncated data, wrong magic, random bytes.
        assert!(decode(Bytes::from(bytes[..bytes.len() - 4].to_vec()), "t").is_err());
        assert!(decode(Bytes::from_static(b"hello world, not npy"), "t").is_err());
        let mut s =
            lightrnn_kernels::rng::Philox::new(1, lightrnn_kernels::rng::Purpose::Other).stream(0);
        for len in [0usize, 5, 11, 64, 200] {
            let mut junk: Vec<u8> = (0..len).map(|_| s.next_u32() as u8).collect();
            if len >= 6 {
                junk[..6].copy_from_slice(MAGIC);
            }
            let _ = decode(Bytes::from(junk), "junk"); // must not panic
        }
        for cut in 0..bytes.len() {
            let _ = decode(Bytes::from(bytes[..cut].to_vec()), "cut");
        }
    }
}
