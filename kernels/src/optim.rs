//! Optimizers and gradient clipping, applied elementwise to the flat parameter buffer.
//! Their math matches `torch.optim` (SGD without momentum, Adam, Adagrad) and
//! `torch.nn.utils.clip_grad_norm_`.

use serde::{Deserialize, Serialize};

/// Which update rule, with its hyper-parameters. The learning rate is passed per step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "lowercase")]
pub enum Optimizer {
    /// p -= lr * g
    Sgd,
    /// Kingma & Ba with bias correction (torch.optim.Adam, weight_decay 0).
    Adam { beta1: f64, beta2: f64, eps: f64 },
    /// Duchi et al. (torch.optim.Adagrad, lr_decay 0).
    Adagrad { eps: f64, initial_accumulator: f64 },
}

impl Optimizer {
    /// Names of the per-parameter state buffers the rule keeps.
    pub fn state_names(&self) -> &'static [&'static str] {
        match self {
            Optimizer::Sgd => &[],
            Optimizer::Adam { .. } => &["exp_avg", "exp_avg_sq"],
            Optimizer::Adagrad { .. } => &["sum"],
        }
    }

    /// Initial value of state buffer `k`.
    pub fn state_init(&self, k: usize) -> f64 {
        match self {
            Optimizer::Adagrad {
                initial_accumulator,
                ..
            } if k == 0 => *initial_accumulator,
            _ => 0.0,
        }
    }
}

/// torch's clipping coefficient: min(1, max_norm / (norm + 1e-6)); `max_norm <= 0` = off.
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm.is_finite() {
        (max_norm / (norm + 1e-6)).min(1.0)
    } else {
        1.0
    }
}

/// One update of `p` with gradient `g * gscale`; `state` holds the rule's buffers
/// (see [`Optimizer::state_names`]), `t` is the 1-based update count.
pub fn update<T: crate::Real>(
    opt: &Optimizer,
    lr: f64,
    gscale: f64,
    t: u64,
    p: &mut [T],
    g: &[T],
    state: &mut [&mut [T]],
) -> crate::Result<()> {
    let got = state.len();
    let wrong = |want: usize| {
        crate::Error::Backend(format!("{opt:?} needs {want} state buffers, got {got}"))
    };
    let gs = T::from_f64(gscale);
    match *opt {
        Optimizer::Sgd => {
            let k = T::from_f64(-lr * gscale);
            for (p, &g) in p.iter_mut().zip(g) {
                *p += k * g;
            }
        }
        Optimizer::Adam { beta1, beta2, eps } => {
            let [m, v] = state else { return Err(wrong(2)) };
            let bc1 = 1.0 - beta1.powi(t as i32);
            let bc2 = 1.0 - beta2.powi(t as i32);
            let step = T::from_f64(lr / bc1);
            let inv_bc2_sqrt = T::from_f64(1.0 / bc2.sqrt());
            let (b1, b2) = (T::from_f64(beta1), T::from_f64(beta2));
            let (c1, c2) = (T::from_f64(1.0 - beta1), T::from_f64(1.0 - beta2));
            let eps = T::from_f64(eps);
            for i in 0..p.len() {
                let gi = g[i] * gs;
                m[i] = b1 * m[i] + c1 * gi;
                v[i] = b2 * v[i] + c2 * gi * gi;
                p[i] -= step * m[i] / (v[i].sqrt() * inv_bc2_sqrt + eps);
            }
        }
        Optimizer::Adagrad { eps, .. } => {
            let [s] = state else { return Err(wrong(1)) };
            let lr = T::from_f64(lr);
            let eps = T::from_f64(eps);
            for i in 0..p.len() {
                let gi = g[i] * gs;
                s[i] += gi * gi;
                p[i] -= lr * gi / (s[i].sqrt() + eps);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adam_first_step_moves_by_lr() {
        // With bias correction, Adam's first step is lr * sign(g) (up to eps).
        let opt = Optimizer::Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        };
        let mut p = vec![1.0f64, -2.0];
        let g = vec![0.3, -4.0];
        let mut m = vec![0.0; 2];
        let mut v = vec![0.0; 2];
        update(&opt, 0.01, 1.0, 1, &mut p, &g, &mut [&mut m, &mut v]).unwrap();
        assert!((p[0] - 0.99).abs() < 1e-7 && (p[1] + 1.99).abs() < 1e-7);
    }

    #[test]
    fn adagrad_and_sgd_match_torch_formulas() {
        let opt = Optimizer::Adagrad {
            eps: 1e-10,
            initial_accumulator: 0.1,
        };
        let mut p = vec![1.0f64];
        let mut s = vec![0.1];
        update(&opt, 0.5, 2.0, 1, &mut p, &[0.25], &mut [&mut s]).unwrap();
        // g = 0.5 after scaling; sum = 0.1 + 0.25; p = 1 - 0.5 * 0.5 / sqrt(0.35)
        assert!((p[0] - (1.0 - 0.25 / 0.35f64.sqrt())).abs() < 1e-9);
        let mut q = vec![1.0f64];
        update(&Optimizer::Sgd, 20.0, 0.5, 1, &mut q, &[0.1], &mut []).unwrap();
        assert!((q[0] - 0.0).abs() < 1e-12);
        assert_eq!(clip_coefficient(0.5, 0.25), 0.25 / (0.5 + 1e-6));
        assert_eq!(clip_coefficient(0.1, 0.25), 1.0);
        assert_eq!(clip_coefficient(10.0, 0.0), 1.0);
    }
}
