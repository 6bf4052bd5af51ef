//! The device memory of a CUDA backend: what the model needs (parameters, gradients,
//! optimizer buffers) and what a batch shape needs (activations, the batch's inputs, the
//! page-locked staging the host fills), computed before anything is allocated so that a
//! model or batch too large for the device is refused with the figures instead of
//! failing half-way. Everything a step touches is allocated here, once per batch shape:
//! a step itself allocates nothing (a CUDA graph could not contain it, and each free
//! would wait for the device).

use std::cell::Cell;

use super::buffers::{Buf, pad4};
use super::layer::{Device, HostMem};
use crate::layout::ModelDims;
use crate::{Error, Result};

/// Bytes of the model's resident buffers: parameters and gradients, and up to two
/// optimizer buffers (Adam), each `total` f32s.
pub fn model_bytes(total: usize) -> u64 {
    4 * 4 * total as u64
}

/// Bytes of the activations and inputs of a batch of `steps` x `batch` streams in
/// `groups` gradient groups of `batch / groups` (see [`Workspace`]).
pub fn activation_bytes(d: &ModelDims, steps: usize, batch: usize) -> u64 {
    group_bytes(d, steps, batch, 1)
}

/// [`activation_bytes`] of `groups` groups of `gb` streams each.
fn group_bytes(d: &ModelDims, steps: usize, gb: usize, groups: usize) -> u64 {
    let (sb, tb) = ((2 * steps * gb) as u64, (steps * gb) as u64);
    let (m, n, l) = (d.hidden as u64, d.emb as u64, d.layers as u64);
    let per_layer = sb * (4 * m + 4 * m) + sb * n.max(m); // g; c, tc, h, dh; x
    let f32s = l * per_layer
        + sb * m // hd
        + sb * n // dx
        + tb * (pad4(d.rows) + pad4(d.cols)) as u64 // zr, zc
        + 2 * l * gb as u64 * m // h0, c0
        + 2 * gb as u64 * m // dc, dh_rec
        + pad4(sb as usize) as u64; // ones
    let inputs = groups as u64 * Inputs::new(d, steps, gb).region as u64;
    4 * f32s + 4 * inputs + 8 * (2 * tb + 3 + 2 * groups as u64)
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
/// scale * NLL (the scale read from device memory), nothing, or the full -log-softmax
/// rows (loss tables).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HeadMode {
    Grad,
    Loss,
    Table,
}

/// The device scalars of a step, 8-byte slots of [`super::CudaBackend`]'s `knobs`: what
/// changes between steps, read by the kernels through pointers so that a captured graph
/// replays unchanged. The host uploads the first two with a batch and the next four with
/// an update; the last three are written by the `clip_scale` kernel.
pub mod knob {
    /// u64: the step's dropout site base (step * 64).
    pub const SITE: usize = 0;
    /// f32: the scale of the loss gradient (1 / the job's words in the batch).
    pub const SCALE: usize = 1;
    /// f64: the learning rate, and the clipping norm.
    pub const LR: usize = 2;
    pub const MAX_NORM: usize = 3;
    /// f32: Adam's lr / (1 - beta1^t) and 1 / sqrt(1 - beta2^t).
    pub const ADAM_STEP: usize = 4;
    pub const ADAM_INV_BC2: usize = 5;
    /// f32 clipping coefficient, f32 -lr * coefficient (SGD), u32 whether to update.
    pub const GS: usize = 6;
    pub const SGD_K: usize = 7;
    pub const APPLY: usize = 8;
    /// Slots in all.
    pub const SLOTS: usize = 9;
    /// The slots a batch uploads, and those an update uploads.
    pub const BATCH: std::ops::Range<usize> = SITE..LR;
    pub const UPDATE: std::ops::Range<usize> = LR..GS;
}

/// Where each list of one group's inputs lies in its region of the input buffer (u32
/// offsets): what the host prepares per batch and uploads in one copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inputs {
    /// [SB] input-table row of every storage row; [TB] row and column targets.
    pub ids: usize,
    pub tgt_r: usize,
    pub tgt_c: usize,
    /// The table gradient's scatter: distinct ids, their ranges in `members`, the storage
    /// rows of each (ascending), and how many distinct ids there are.
    pub uniq: usize,
    pub starts: usize,
    pub members: usize,
    pub n_uniq: usize,
    /// At most this many distinct ids.
    pub uniq_cap: usize,
    /// u32s of a region (a multiple of 4: regions start at 16-byte boundaries).
    pub region: usize,
}

impl Inputs {
    pub fn new(d: &ModelDims, steps: usize, batch: usize) -> Self {
        let (sb, tb) = (2 * steps * batch, steps * batch);
        let uniq_cap = d.input_rows().min(sb);
        let ids = 0;
        let tgt_r = ids + sb;
        let tgt_c = tgt_r + tb;
        let uniq = tgt_c + tb;
        let starts = uniq + uniq_cap;
        let members = starts + uniq_cap + 1;
        let n_uniq = members + sb;
        Self {
            ids,
            tgt_r,
            tgt_c,
            uniq,
            starts,
            members,
            n_uniq,
            uniq_cap,
            region: pad4(n_uniq + 1),
        }
    }
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

/// Page-locked host memory a batch and an update go through: written by the host, read
/// by asynchronous copies (and the step's results, written by one). Each buffer is
/// marked busy from the copy issued from or into it until the host next waits.
pub struct Staging {
    /// The batch's device scalars (16 bytes), then one region of inputs per group.
    pub batch: HostMem,
    /// The update's device scalars.
    pub update: HostMem,
    /// The step's results: the squared gradient norm, two loss sums per group, and the
    /// loss sums of an evaluation or loss-table batch.
    pub results: HostMem,
    pub batch_busy: Cell<bool>,
    pub update_busy: Cell<bool>,
}

/// Bytes before the first input region of [`Staging::batch`].
pub const BATCH_HEAD: usize = 16;

/// The activations, inputs and staging of one batch shape (steps, streams per group,
/// groups), kept between batches.
pub struct Workspace {
    pub steps: usize,
    /// Streams per gradient group, and groups.
    pub batch: usize,
    pub groups: usize,
    pub layers: Vec<LayerBufs>,
    /// [SB, m] the top output after dropout; [SB, n] the input rows' gradient.
    pub hd: Buf<f32>,
    pub dx: Buf<f32>,
    /// [TB, ldr] and [TB, ldc] logits -> d loss / d logits, or -log-softmax (loss tables):
    /// R and C columns, rows padded to multiples of 4 (aligned GEMM operands).
    pub zr: Buf<f32>,
    pub zc: Buf<f32>,
    pub ldr: usize,
    pub ldc: usize,
    /// [L, B, m] the batch's start state.
    pub h0: Buf<f32>,
    pub c0: Buf<f32>,
    /// [B, m] d loss / d c carried back through time, and the recurrent d loss / d h.
    pub dc: Buf<f32>,
    pub dh_rec: Buf<f32>,
    /// One [`Inputs`] region per group; a loss-table batch's word lists: distinct target
    /// words, their ranges in the positions, the positions grouped by word ([TB] each).
    pub inputs: Buf<u32>,
    pub layout: Inputs,
    pub tab_words: Buf<u32>,
    pub tab_starts: Buf<u32>,
    pub tab_pos: Buf<u32>,
    /// [2 TB] per-row NLL of the row head then the column head.
    pub loss_rows: Buf<f64>,
    /// [pad4(SB)] ones: bias gradients are column sums, taken as one GEMM each.
    pub ones: Buf<f32>,
    /// The squared gradient norm, two loss sums per group, two of an evaluation batch.
    pub results: Buf<f64>,
    pub staging: Staging,
}

impl Workspace {
    /// Index in `results` of group g's loss sums, and of an evaluation batch's.
    pub fn loss_at(g: usize) -> usize {
        1 + 2 * g
    }
    pub fn eval_loss_at(&self) -> usize {
        1 + 2 * self.groups
    }

    pub fn new(
        dev: &dyn Device,
        d: &ModelDims,
        steps: usize,
        batch: usize,
        groups: usize,
    ) -> Result<Self> {
        check_fits(
            dev,
            group_bytes(d, steps, batch, groups),
            &format!("a batch of {} streams x {steps} steps", batch * groups),
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
        let layout = Inputs::new(d, steps, batch);
        let (ldr, ldc) = (pad4(d.rows), pad4(d.cols));
        let n_results = 3 + 2 * groups;
        Ok(Self {
            steps,
            batch,
            groups,
            layers,
            hd: f(sb * m)?,
            dx: f(sb * d.emb)?,
            zr: f(tb * ldr)?,
            zc: f(tb * ldc)?,
            ldr,
            ldc,
            h0: f(d.layers * batch * m)?,
            c0: f(d.layers * batch * m)?,
            dc: f(batch * m)?,
            dh_rec: f(batch * m)?,
            inputs: u(groups * layout.region)?,
            layout,
            tab_words: u(tb)?,
            tab_starts: u(tb + 1)?,
            tab_pos: u(tb)?,
            loss_rows: Buf::zeros(dev, 2 * tb)?,
            ones: Buf::from_host(dev, &vec![1.0; pad4(sb)])?,
            results: Buf::zeros(dev, n_results)?,
            staging: Staging {
                batch: dev.alloc_host(BATCH_HEAD + 4 * groups * layout.region)?,
                update: dev.alloc_host(8 * knob::UPDATE.len())?,
                results: dev.alloc_host(8 * n_results)?,
                batch_busy: Cell::new(false),
                update_busy: Cell::new(false),
            },
        })
    }
}
