//! Every solver on random finite tables whose values span 1e-30..1e300 (f64) and
//! 1e-30..3e38 (f32): a complete allocation with a finite cost and bounds, or a clear
//! input error for tables too large to sum; never a panic.

use lightrnn_alloc::{AllocError, Problem, SolveOptions, Solver, solve};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Log-uniform in [10^lo, 10^hi], with a share of exact ties and zeros.
    fn value(&mut self, lo: f64, hi: f64) -> f64 {
        match self.below(10) {
            0 => 0.0,
            1 => 1.0,
            _ => 10f64.powf(lo + (hi - lo) * self.unit()),
        }
    }
}

fn check<T: lightrnn_alloc::Elem>(v: usize, r: usize, c: usize, lr: &[T], lc: &[T], what: &str) {
    let p = match Problem::new(v, r, c, lr, lc) {
        Ok(p) => p,
        Err(AllocError::Input(m)) if m.contains("overflow") => return,
        Err(e) => panic!("{what}: {e}"),
    };
    for solver in [Solver::Exact, Solver::Scalable, Solver::Greedy] {
        let opts = SolveOptions {
            threads: 1,
            candidates: 0,
        };
        let s = solve(&p, solver, &opts).unwrap_or_else(|e| panic!("{what} {solver:?}: {e}"));
        p.check(&s.cells).unwrap();
        assert!(
            s.cost.is_finite() && s.lower_bound.is_finite() && s.relaxation_bound.is_finite(),
            "{what} {solver:?}: cost {} lower bound {} relaxation {}",
            s.cost,
            s.lower_bound,
            s.relaxation_bound
        );
        assert!(
            s.cost >= s.lower_bound * (1.0 - 1e-9) - 1e-300,
            "{what} {solver:?}"
        );
    }
}

#[test]
fn random_tables_of_any_magnitude_are_solved_or_refused_never_a_panic() {
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let mut refused = 0;
    for case in 0..80 {
        let (r, c) = (1 + rng.below(9), 1 + rng.below(9));
        let v = 1 + rng.below(r * c);
        let (lo, hi) = match case % 4 {
            0 => (-30.0, 300.0),
            1 => (-30.0, 308.2),
            _ => (250.0, 300.0),
        };
        let lr: Vec<f64> = (0..v * r).map(|_| rng.value(lo, hi)).collect();
        let lc: Vec<f64> = (0..v * c).map(|_| rng.value(lo, hi)).collect();
        refused += usize::from(Problem::new(v, r, c, &lr, &lc).is_err());
        check(
            v,
            r,
            c,
            &lr,
            &lc,
            &format!("f64 case {case} ({v} in {r}x{c})"),
        );
        let lr32: Vec<f32> = (0..v * r).map(|_| rng.value(-30.0, 38.5) as f32).collect();
        let lc32: Vec<f32> = (0..v * c).map(|_| rng.value(-30.0, 38.5) as f32).collect();
        check(
            v,
            r,
            c,
            &lr32,
            &lc32,
            &format!("f32 case {case} ({v} in {r}x{c})"),
        );
    }
    // The cases up to 1e308 include refusals; the others are all solved.
    assert!((1..=20).contains(&refused), "{refused} refused");
}

#[test]
fn tables_whose_sums_overflow_are_refused_with_the_figure() {
    let (v, r, c) = (6, 3, 3);
    let lr = vec![1e308f64; v * r];
    let lc = vec![1.0f64; v * c];
    match Problem::new(v, r, c, &lr, &lc) {
        Err(AllocError::Input(m)) => {
            assert!(m.contains("1e308") && m.contains("overflow"), "{m}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}
