//! Helpers of the crate's tests: structured loss tables and the optimum by brute force.

/// Tables with structure: a few popular rows/columns (congestion), word frequencies
/// spread over two orders of magnitude, noise.
pub fn tables(v: usize, r: usize, c: usize, seed: u64) -> (Vec<f64>, Vec<f64>) {
    let mut s =
        lightrnn_kernels::rng::Philox::new(seed, lightrnn_kernels::rng::Purpose::Other).stream(0);
    let pop_r: Vec<f64> = (0..r).map(|i| 1.0 + 3.0 * (i as f64 / r as f64)).collect();
    let pop_c: Vec<f64> = (0..c)
        .map(|j| 1.0 + 3.0 * (((j * 7) % c) as f64 / c as f64))
        .collect();
    let mut lr = Vec::with_capacity(v * r);
    let mut lc = Vec::with_capacity(v * c);
    for w in 0..v {
        let count = 1.0 + 100.0 / (1.0 + w as f64);
        for p in &pop_r {
            lr.push(count * (p + s.next_f64()));
        }
        for p in &pop_c {
            lc.push(count * (p + s.next_f64()));
        }
    }
    (lr, lc)
}

/// The optimum by the dense Hungarian method (O(n^3), small n only).
pub fn brute_force(p: &crate::Problem<'_, f64>) -> f64 {
    let (n, m) = (p.vocab, p.cells());
    let inf = f64::INFINITY;
    let (mut u, mut v) = (vec![0.0; n + 1], vec![0.0; m + 1]);
    let (mut pm, mut way) = (vec![0usize; m + 1], vec![0usize; m + 1]);
    for i in 1..=n {
        pm[0] = i;
        let mut j0 = 0;
        let mut minv = vec![inf; m + 1];
        let mut used = vec![false; m + 1];
        loop {
            used[j0] = true;
            let (i0, mut delta, mut j1) = (pm[j0], inf, 0);
            for j in 1..=m {
                if !used[j] {
                    let cur = p.cost(i0 - 1, j - 1) - u[i0] - v[j];
                    if cur < minv[j] {
                        minv[j] = cur;
                        way[j] = j0;
                    }
                    if minv[j] < delta {
                        delta = minv[j];
                        j1 = j;
                    }
                }
            }
            for j in 0..=m {
                if used[j] {
                    u[pm[j]] += delta;
                    v[j] -= delta;
                } else {
                    minv[j] -= delta;
                }
            }
            j0 = j1;
            if pm[j0] == 0 {
                break;
            }
        }
        loop {
            let j1 = way[j0];
            pm[j0] = pm[j1];
            j0 = j1;
            if j0 == 0 {
                break;
            }
        }
    }
    (1..=m)
        .filter(|&j| pm[j] != 0)
        .map(|j| p.cost(pm[j] - 1, j - 1))
        .sum()
}
