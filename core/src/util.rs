//! Small utilities both sides of a job use: a rank's share of n items, what this
//! machine's memory allows (what is available, what the process holds), the allocation
//! pictures' colours.

use crate::{Error, Result};

/// Rank `rank`'s share of `n` items (streams of a batch) split over `world` ranks as
/// evenly as possible: the first `n % world` ranks take one more.
pub fn share(n: usize, world: usize, rank: usize) -> std::ops::Range<usize> {
    let (base, extra) = (n / world.max(1), n % world.max(1));
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// Memory this machine can still give (Linux: MemAvailable), in bytes.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Refuse work that needs `need` bytes where this machine has less available.
pub fn check_fits(what: &str, need: u64) -> Result<()> {
    fits(what, need, available_memory())
}

/// [`check_fits`] against `available` bytes (None: unknown, allowed).
fn fits(what: &str, need: u64, available: Option<u64>) -> Result<()> {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    match available {
        Some(avail) if need > avail => Err(Error::Config(format!(
            "{what} needs about {:.2} GiB of memory and {:.2} GiB are available; the \
             epoch's checkpoint is committed: resume (--resume) where more memory is free, \
             or train without reallocation (realloc_every = 0)",
            gib(need),
            gib(avail)
        ))),
        _ => Ok(()),
    }
}

/// Peak and current resident set size in MiB (Linux /proc; None elsewhere).
pub fn rss_mib() -> (Option<f64>, Option<f64>) {
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else {
        return (None, None);
    };
    let field = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// A viridis-like colour for t in [0, 1] (dark blue to yellow): the allocation pictures'
/// (`lightrnn plot`, TensorBoard's).
pub fn viridis(t: f64) -> [u8; 3] {
    const STOPS: [(f64, f64, f64); 5] = [
        (68.0, 1.0, 84.0),
        (59.0, 82.0, 139.0),
        (33.0, 145.0, 140.0),
        (94.0, 201.0, 98.0),
        (253.0, 231.0, 37.0),
    ];
    let x = t.clamp(0.0, 1.0) * (STOPS.len() - 1) as f64;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let f = x - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let mix = |p: f64, q: f64| (p + (q - p) * f).round() as u8;
    [mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_that_cannot_fit_is_refused_with_both_figures() {
        let gib = 1u64 << 30;
        let e = fits("reallocation round 2", 5 * gib, Some(3 * gib))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("reallocation round 2") && e.contains("5.00 GiB") && e.contains("3.00 GiB"),
            "{e}"
        );
        assert!(e.contains("--resume"), "{e}");
        fits("r", 2 * gib, Some(3 * gib)).unwrap();
        fits("r", u64::MAX, None).unwrap();
        // This machine reports what it has.
        assert!(available_memory().is_some_and(|b| b > 0));
    }
}
