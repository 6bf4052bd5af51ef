//! Zipf-distributed word ids without a table: rejection-inversion sampling (Hörmann &
//! Derflinger 1996, as in Apache Commons RNG), O(1) memory for any vocabulary size.
//! Rank k (1-based) has probability proportional to k^-s; ids are k - 1, so id 0 is the
//! most frequent word, as in a vocabulary sorted by count.

use lightrnn_kernels::rng::PhiloxStream;

pub struct Zipf {
    n: f64,
    s: f64,
    h_x1: f64,
    h_n: f64,
    cut: f64,
}

fn helper1(x: f64) -> f64 {
    // log1p(x) / x, continuous at 0.
    if x.abs() > 1e-8 {
        x.ln_1p() / x
    } else {
        1.0 - x * (0.5 - x / 3.0)
    }
}

fn helper2(x: f64) -> f64 {
    // expm1(x) / x, continuous at 0.
    if x.abs() > 1e-8 {
        x.exp_m1() / x
    } else {
        1.0 + x * 0.5 * (1.0 + x / 3.0)
    }
}

impl Zipf {
    /// Ranks 1..=n with exponent s > 0.
    pub fn new(n: u64, s: f64) -> Self {
        let mut z = Self {
            n: n as f64,
            s,
            h_x1: 0.0,
            h_n: 0.0,
            cut: 0.0,
        };
        z.h_x1 = z.h_integral(1.5) - 1.0;
        z.h_n = z.h_integral(n as f64 + 0.5);
        z.cut = 2.0 - z.h_integral_inv(z.h_integral(2.5) - z.h(2.0));
        z
    }

    fn h_integral(&self, x: f64) -> f64 {
        let lx = x.ln();
        helper2((1.0 - self.s) * lx) * lx
    }

    fn h(&self, x: f64) -> f64 {
        (-self.s * x.ln()).exp()
    }

    fn h_integral_inv(&self, x: f64) -> f64 {
        let t = (x * (1.0 - self.s)).max(-1.0);
        (helper1(t) * x).exp()
    }

    /// One id in 0..n.
    pub fn sample(&self, rng: &mut PhiloxStream) -> u32 {
        loop {
            let u = self.h_n + rng.next_f64() * (self.h_x1 - self.h_n);
            let x = self.h_integral_inv(u);
            let k = (x + 0.5).floor().clamp(1.0, self.n);
            if k - x <= self.cut || u >= self.h_integral(k + 0.5) - self.h(k) {
                return (k as u64 - 1) as u32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lightrnn_kernels::rng::{Philox, Purpose};

    #[test]
    fn frequencies_follow_the_power_law() {
        let z = Zipf::new(1000, 1.0);
        let mut rng = Philox::new(3, Purpose::Corpus).stream(0);
        let mut counts = vec![0u64; 1000];
        let n = 400_000;
        for _ in 0..n {
            counts[z.sample(&mut rng) as usize] += 1;
        }
        let hn: f64 = (1..=1000).map(|k| 1.0 / k as f64).sum();
        for k in [1usize, 2, 3, 10, 100] {
            let want = n as f64 / (k as f64 * hn);
            let got = counts[k - 1] as f64;
            assert!(
                (got - want).abs() < 5.0 * want.sqrt() + 0.02 * want,
                "rank {k}: {got} vs {want}"
            );
        }
        assert!(counts.iter().all(|&c| c > 0) || counts[999] == 0);
    }
}
