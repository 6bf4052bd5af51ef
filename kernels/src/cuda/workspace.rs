//! The device memory of a CUDA backend: what the model needs (parameters, gradients,
//! optimizer buffers) and what a batch shape needs (activations), computed before anything
//! is allocated so that a model or batch too large for the device is refused with the
//! figures instead of failing half-way.

use super::buffers::Buf;
use super::layer::Device;
use crate::layout::ModelDims;
use crate::{Error, Result};

/// Bytes of the model's resident buffers: parameters and gradients, and up to two
/// optimizer buffers (Adam), each `total` f32s.
pub fn model_bytes(total: usize) -> u64 {
    4 * 4 * total as u64
}

/// Bytes of the activations of a batch of `steps` x `batch` streams (see [`Workspace`]).
pub fn activation_bytes(d: &ModelDims, steps: usize, batch: usize) -> u64 {
    let (sb, tb) = ((2 * steps * batch) as u64, (steps * batch) as u64);
    let (m, n, l) = (d.hidden as u64, d.emb as u64, d.layers as u64);
    let per_layer = sb * (4 * m + 4 * m) + sb * n.max(m); // g; c, tc, h, dh; x
    let f32s = l * per_layer
        + sb * m // hd
        + sb * n // dx
        + tb * (d.rows + d.cols) as u64 // zr, zc
        + 2 * l * batch as u64 * m // h0, c0
        + 2 * batch as u64 * m // dc, dh_rec
        + sb; // ones
    let u32s = sb * 3 + tb * 2 + 1 + (d.rows + d.cols) as u64; // ids, scatter, targets
    4 * f32s + 4 * u32s + 8 * 2 * tb
}

/// Refuse `bytes` more than the device has free, naming what they are for.
pub fn check_fits(dev: &dyn Device, bytes: u64, what: &str) -> Result<()> {
    let (free, total) = dev.memory()?;
    if bytes > free as u64 {
        return Err(Error::OutOfMemory(format!(
            "{what} needs {:.1} MiB of device memory; {} has {:.1} MiB free of {:.1} MiB (use a smaller batch or model)",
            bytes as f64 / 1048576.0,
            dev.name(),
            free as f64 / 1048576.0,
            total as f64 / 1048576.0
        )));
    }
    Ok(())
}

/// What the heads compute into the logit buffers besides the loss: gradients of
/// scale * NLL, nothing, or the full -log-softmax rows (loss tables).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum HeadMode {
    Grad(f32),
    Loss,
    Table,
}

/// One LSTM layer's activations, storage rows in the CPU backend's parity-major order
/// (step s = 2t + p of stream b at row (p T + t) B + b).
pub struct LayerBufs {
    /// [SB, 4m] gate pre-activations -> activations -> dG.
    pub g: Buf<f32>,
    /// [SB, m] cell state, tanh(cell state), output, and d loss / d output.
    pub c: Buf<f32>,
    pub tc: Buf<f32>,
    pub h: Buf<f32>,
    pub dh: Buf<f32>,
    /// [SB, in] the layer's input after dropout (layer 0: the gathered table rows).
    pub x: Buf<f32>,
}

/// The activations and index buffers of one batch shape, kept between batches.
pub struct Workspace {
    pub steps: usize,
    pub batch: usize,
    pub layers: Vec<LayerBufs>,
    /// [SB, m] the top output after dropout; [SB, n] the input rows' gradient.
    pub hd: Buf<f32>,
    pub dx: Buf<f32>,
    /// [TB, R], [TB, C] logits -> d loss / d logits, or -log-softmax (loss tables).
    pub zr: Buf<f32>,
    pub zc: Buf<f32>,
    /// [L, B, m] the batch's start state.
    pub h0: Buf<f32>,
    pub c0: Buf<f32>,
    /// [B, m] d loss / d c carried back through time, and the recurrent d loss / d h.
    pub dc: Buf<f32>,
    pub dh_rec: Buf<f32>,
    /// [SB] input-table row of every storage row; [TB] row and column targets.
    pub ids: Buf<u32>,
    pub tgt_r: Buf<u32>,
    pub tgt_c: Buf<u32>,
    /// The table gradient's scatter: distinct ids, their ranges in `members`, the storage
    /// rows of each (ascending).
    pub uniq: Buf<u32>,
    pub starts: Buf<u32>,
    pub members: Buf<u32>,
    /// [2 TB] per-row NLL of the row head then the column head.
    pub loss_rows: Buf<f64>,
    /// [SB] ones: bias gradients are column sums, taken as one GEMM each.
    pub ones: Buf<f32>,
}

impl Workspace {
    pub fn new(dev: &dyn Device, d: &ModelDims, steps: usize, batch: usize) -> Result<Self> {
        check_fits(
            dev,
            activation_bytes(d, steps, batch),
            &format!("a batch of {batch} streams x {steps} steps"),
        )?;
        let (sb, tb, m) = (2 * steps * batch, steps * batch, d.hidden);
        let f = |n: usize| Buf::<f32>::zeros(dev, n);
        let u = |n: usize| Buf::<u32>::zeros(dev, n);
        let layers = (0..d.layers)
            .map(|l| {
                Ok(LayerBufs {
                    g: f(sb * 4 * m)?,
                    c: f(sb * m)?,
                    tc: f(sb * m)?,
                    h: f(sb * m)?,
                    dh: f(sb * m)?,
                    x: f(sb * d.layer_input(l))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            steps,
            batch,
            layers,
            hd: f(sb * m)?,
            dx: f(sb * d.emb)?,
            zr: f(tb * d.rows)?,
            zc: f(tb * d.cols)?,
            h0: f(d.layers * batch * m)?,
            c0: f(d.layers * batch * m)?,
            dc: f(batch * m)?,
            dh_rec: f(batch * m)?,
            ids: u(sb)?,
            tgt_r: u(tb)?,
            tgt_c: u(tb)?,
            uniq: u(d.input_rows().min(sb))?,
            starts: u(d.input_rows().min(sb) + 1)?,
            members: u(sb)?,
            loss_rows: Buf::zeros(dev, 2 * tb)?,
            ones: Buf::from_host(dev, &vec![1.0; sb])?,
        })
    }
}
