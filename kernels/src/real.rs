//! The scalar types the CPU kernels run in: `f32` for training, `f64` for gradient checks
//! and parity tests. Every kernel is written once, generic over [`Real`].
//!
//! `f32::exp` calls libm one element at a time; the LSTM cell and the softmax need tens of
//! thousands of exponentials per step, so `f32` uses a branch-free Cephes-style polynomial
//! (max relative error ~2 ulp) that the compiler vectorises. `f64` keeps libm: it is the
//! reference precision.

use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

/// A floating-point element type of the CPU backend.
pub trait Real:
    Copy
    + Send
    + Sync
    + Debug
    + Default
    + PartialOrd
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
{
    const ZERO: Self;
    const ONE: Self;
    /// Name used in error messages and benchmark output.
    const NAME: &'static str;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn max(self, other: Self) -> Self;
    fn min(self, other: Self) -> Self;
    fn abs(self) -> Self;
    fn is_finite(self) -> bool;

    #[inline(always)]
    fn sigmoid(self) -> Self {
        Self::ONE / (Self::ONE + (-self).exp())
    }

    /// tanh through one exponential of a non-positive argument (no overflow):
    /// tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|).
    #[inline(always)]
    fn tanh(self) -> Self {
        let e = (Self::from_f64(-2.0) * self.abs()).exp();
        let t = (Self::ONE - e) / (Self::ONE + e);
        if self < Self::ZERO { -t } else { t }
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NAME: &'static str = "f64";
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f64::ln(self)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    #[inline(always)]
    fn max(self, o: Self) -> Self {
        f64::max(self, o)
    }
    #[inline(always)]
    fn min(self, o: Self) -> Self {
        f64::min(self, o)
    }
    #[inline(always)]
    fn abs(self) -> Self {
        f64::abs(self)
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        f64::is_finite(self)
    }
    #[inline(always)]
    fn tanh(self) -> Self {
        f64::tanh(self)
    }
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NAME: &'static str = "f32";
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn exp(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f32::ln(self)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn max(self, o: Self) -> Self {
        if self > o { self } else { o }
    }
    #[inline(always)]
    fn min(self, o: Self) -> Self {
        if self < o { self } else { o }
    }
    #[inline(always)]
    fn abs(self) -> Self {
        f32::abs(self)
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }
}

/// exp(x) for f32 without libm: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6
/// polynomial (Cephes `expf` coefficients), 2^n assembled in the exponent bits.
/// Inputs below -87.3 flush to 0, above 88.7 saturate at f32::MAX-ish (2^127 * e^0.35).
/// NaN propagates (the clamp keeps NaN because comparisons with NaN are false).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x_in = x;
    let x = if x > 88.37 { 88.37 } else { x };
    let x = if x < -87.33 { -87.33 } else { x };
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    let bits = (((n as i32) + 127) as u32) << 23;
    let y = e * f32::from_bits(bits);
    if x_in < -87.33 {
        0.0
    } else if x_in.is_nan() {
        x_in
    } else {
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_matches_libm() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(-100.0), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(100.0).is_finite());
    }

    #[test]
    fn tanh_and_sigmoid_f32_are_accurate() {
        let mut x = -20.0f32;
        while x < 20.0 {
            let t = Real::tanh(x) as f64;
            assert!((t - (x as f64).tanh()).abs() < 2e-7, "tanh({x}) = {t}");
            let s = Real::sigmoid(x) as f64;
            let want = 1.0 / (1.0 + (-(x as f64)).exp());
            assert!((s - want).abs() < 2e-7, "sigmoid({x}) = {s}");
            x += 0.0071;
        }
    }
}
