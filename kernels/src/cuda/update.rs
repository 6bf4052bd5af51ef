//! The update's device work: its scalars uploaded, the gradient norm in two fixed-order
//! passes, the clipping coefficient (`clip_scale`, on the device), the optimizer kernel of
//! the rule, and the step's results downloaded to the staging for the host's one wait.

use super::CudaBackend;
use super::buffers::{THREADS, grid_for, u32_arg};
use super::layer::Arg;
use super::work::{NORM_BLOCKS, UpdateWork};
use super::workspace::knob;
use crate::{Error, Result};

impl CudaBackend {
    /// clipping coefficient, the optimizer, and the step's results downloaded to the
    /// staging (the host reads them after its one wait).
    pub(super) fn update_body(&self, w: &UpdateWork) -> Result<()> {
        let ws = self.ws()?;
        let dev = self.dev();
        self.mark(|| "clip".into())?;
        let n = knob::UPDATE.len();
        dev.upload_async(
            self.knobs.at(knob::UPDATE.start),
            &ws.staging.update,
            0,
            8 * n,
        )?;
        ws.staging.update_busy.set(true);
        let total = self.dl.total;
        let blocks = total.div_ceil(THREADS as usize).clamp(1, NORM_BLOCKS);
        self.launch(
            "sum_sq_partial",
            [blocks as u32, 1, 1],
            THREADS,
            &[
                self.partials.arg(0),
                self.grads.arg(0),
                Arg::U64(total as u64),
            ],
        )?;
        self.launch(
            "sum_f64",
            [1, 1, 1],
            THREADS,
            &[
                ws.results.arg(0),
                self.partials.arg(0),
                u32_arg(blocks, "blocks")?,
            ],
        )?;
        let k = |slot: usize| self.knobs.arg(slot);
        self.launch(
            "clip_scale",
            [1, 1, 1],
            1,
            &[
                ws.results.arg(0),
                k(knob::LR),
                k(knob::MAX_NORM),
                k(knob::GS),
                k(knob::SGD_K),
                k(knob::APPLY),
            ],
        )?;
        self.mark(|| "optimizer".into())?;
        self.optimizer_launch(w)?;
        let n_results = ws.results.len();
        dev.download_async(ws.results.at(0), &ws.staging.results, 0, 8 * n_results)?;
        self.mark(|| "end".into())
    }

    fn optimizer_launch(&self, w: &UpdateWork) -> Result<()> {
        let st = self
            .opt
            .as_ref()
            .ok_or_else(|| Error::Backend("no optimizer state".into()))?;
        let (p, g, n) = (
            self.params.arg(0),
            self.grads.arg(0),
            Arg::U64(self.dl.total as u64),
        );
        let k = |slot: usize| self.knobs.arg(slot);
        let f = |bits: u64| Arg::F32(f64::from_bits(bits) as f32);
        let (kernel, args): (&'static str, Vec<Arg>) = match w.rule {
            (0, _) => ("sgd_step", vec![p, g, n, k(knob::SGD_K), k(knob::APPLY)]),
            (1, [b1, b2, eps]) => {
                let (beta1, beta2) = (f64::from_bits(b1), f64::from_bits(b2));
                (
                    "adam_step",
                    vec![
                        p,
                        g,
                        st.bufs[0].arg(0),
                        st.bufs[1].arg(0),
                        n,
                        k(knob::GS),
                        f(b1),
                        f(b2),
                        Arg::F32((1.0 - beta1) as f32),
                        Arg::F32((1.0 - beta2) as f32),
                        k(knob::ADAM_STEP),
                        k(knob::ADAM_INV_BC2),
                        f(eps),
                        k(knob::APPLY),
                    ],
                )
            }
            (_, [eps, _, _]) => (
                "adagrad_step",
                vec![
                    p,
                    g,
                    st.bufs[0].arg(0),
                    n,
                    k(knob::GS),
                    k(knob::LR),
                    f(eps),
                    k(knob::APPLY),
                ],
            ),
        };
        self.launch(kernel, grid_for(self.dl.total), THREADS, &args)
    }
}
