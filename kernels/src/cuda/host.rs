//! The host side of the CUDA backend's passes: a batch's words mapped to table ids,
//! targets and the table gradient's scatter lists in page-locked staging, the step's
//! device scalars staged, a training step's groups prepared as the [`TrainWork`] that runs
//! them (with the pairwise sum of their gradients as buffers and additions), the loss sums
//! read back, and the loss-table pass's word lists.

use super::CudaBackend;
use super::buffers::{THREADS, u32_arg};
use super::layer::Launch;
use super::work::{Adds, Cx, TrainWork};
use super::workspace::{BATCH_HEAD, Workspace};
use crate::backend::{Batch, LossSums};
use crate::groups::{PairwiseSum, Plan};
use crate::layout::row_of;
use crate::optim::Optimizer;
use crate::{Error, Result};

/// The pairwise sum of a step's group gradients over the sum's buffers: the buffer group
/// k writes (the depth of the sum's stack when it arrives: buffer 0 is the backend's
/// gradient, where the sum ends), the additions after each group, those that finish it.
struct SumPlan {
    slots: Vec<usize>,
    after: Vec<Adds>,
    finish: Adds,
}

impl CudaBackend {
    /// Write the batch's device scalars (dropout site base, gradient scale) to the staging.
    pub(super) fn stage_batch_knobs(&mut self, step: u64, scale: f32) -> Result<()> {
        let ws = self
            .ws
            .as_mut()
            .ok_or_else(|| Error::Backend("no batch".into()))?;
        let b = &mut ws.staging.batch;
        b.slice_mut::<u64>(0, 1)?[0] = step.wrapping_mul(64);
        b.slice_mut::<f32>(8, 1)?[0] = scale;
        b.slice_mut::<u32>(12, 1)?[0] = 0;
        Ok(())
    }

    /// Map `batch` to table ids, targets and the table gradient's scatter lists in input
    /// region `region` of the staging (the batch's word ids are kept for a loss-table pass).
    pub(super) fn stage_inputs(&mut self, batch: &Batch<'_>, region: usize) -> Result<()> {
        let d = self.layout.dims;
        let (tt, bb) = (batch.steps, batch.batch);
        let (sb, tb, cols) = (2 * tt * bb, tt * bb, d.cols as u32);
        let ws = self
            .ws
            .as_mut()
            .ok_or_else(|| Error::Backend("no batch".into()))?;
        let io = ws.layout;
        let base = BATCH_HEAD + 4 * region * io.region;
        let all = ws.staging.batch.slice_mut::<u32>(base, io.region)?;
        let h = &mut self.host;
        h.words.clear();
        h.words.extend_from_slice(batch.targets);
        {
            let (ids, rest) = all.split_at_mut(io.tgt_r);
            let (tgt_r, rest) = rest.split_at_mut(tb);
            let tgt_c = &mut rest[..tb];
            for t in 0..tt {
                for b in 0..bb {
                    let (cx, cy) = (
                        self.cells[batch.inputs[t * bb + b] as usize],
                        self.cells[batch.targets[t * bb + b] as usize],
                    );
                    ids[row_of(tt, bb, 2 * t, b)] = d.rows as u32 + cx % cols;
                    ids[row_of(tt, bb, 2 * t + 1, b)] = cy / cols;
                    tgt_r[t * bb + b] = cy / cols;
                    tgt_c[t * bb + b] = cy % cols;
                }
            }
        }
        // The table gradient's scatter lists: storage rows grouped by id (counting sort).
        let rows_n = d.input_rows();
        h.count.clear();
        h.count.resize(rows_n + 1, 0);
        for &id in &all[io.ids..io.ids + sb] {
            h.count[id as usize + 1] += 1;
        }
        for i in 0..rows_n {
            h.count[i + 1] += h.count[i];
        }
        h.fill.clear();
        h.fill.extend_from_slice(&h.count[..rows_n]);
        for r in 0..sb {
            let slot = &mut h.fill[all[io.ids + r] as usize];
            all[io.members + *slot as usize] = r as u32;
            *slot += 1;
        }
        let mut n_uniq = 0;
        for id in 0..rows_n {
            if h.count[id + 1] > h.count[id] {
                all[io.uniq + n_uniq] = id as u32;
                all[io.starts + n_uniq] = h.count[id];
                n_uniq += 1;
            }
        }
        all[io.starts + n_uniq] = sb as u32;
        all[io.n_uniq] = n_uniq as u32;
        Ok(())
    }

    /// Prepare one pass of `batch` (a group, an evaluation or a loss-table batch) in input
    /// region `region`: its workspace and state exist, its inputs are staged.
    pub(super) fn prepare_host(
        &mut self,
        batch: &Batch<'_>,
        region: usize,
        groups: usize,
    ) -> Result<()> {
        batch.check(self.layout.dims.vocab)?;
        self.ensure_workspace(batch.steps, batch.batch, groups)?;
        self.ensure_state(batch.stream, batch.batch)?;
        self.stage_inputs(batch, region)
    }

    /// The pairwise sum of `groups` gradients as buffers and additions (see [`SumPlan`]).
    fn sum_plan(groups: usize) -> Result<SumPlan> {
        let mut tree = PairwiseSum::<usize>::default();
        let (mut slots, mut after) = (Vec::new(), Vec::new());
        for _ in 0..groups {
            let slot = tree.depth();
            let mut adds = Vec::new();
            tree.push(slot, |a, b| {
                adds.push((*a, *b));
                Ok(())
            })?;
            slots.push(slot);
            after.push(adds);
        }
        let mut finish = Vec::new();
        let last = tree.finish(|a, b| {
            finish.push((*a, *b));
            Ok(())
        })?;
        debug_assert_eq!(last, 0);
        Ok(SumPlan {
            slots,
            after,
            finish,
        })
    }

    /// Write the update's device scalars for update number `t` to the staging.
    pub(super) fn stage_update_knobs(
        &mut self,
        rule: &Optimizer,
        lr: f64,
        max_norm: f64,
        t: u64,
    ) -> Result<()> {
        let ws = self
            .ws
            .as_mut()
            .ok_or_else(|| Error::Backend("no batch".into()))?;
        let u = &mut ws.staging.update;
        u.slice_mut::<f64>(0, 2)?.copy_from_slice(&[lr, max_norm]);
        let (step, inv) = match *rule {
            Optimizer::Adam { beta1, beta2, .. } => {
                let (bc1, bc2) = (1.0 - beta1.powi(t as i32), 1.0 - beta2.powi(t as i32));
                ((lr / bc1) as f32, (1.0 / bc2.sqrt()) as f32)
            }
            _ => (0.0, 0.0),
        };
        u.slice_mut::<u64>(16, 2)?.copy_from_slice(&[0, 0]);
        u.slice_mut::<f32>(16, 1)?[0] = step;
        u.slice_mut::<f32>(24, 1)?[0] = inv;
        Ok(())
    }

    /// The two loss sums at `at` of the results staging (after a wait).
    pub(super) fn staged_loss(&self, at: usize) -> Result<(f64, f64)> {
        let r = self.ws()?.staging.results.slice::<f64>(8 * at, 2)?;
        Ok((r[0], r[1]))
    }

    /// The summed losses of the last training step from the results staging, group by
    /// group (after a wait that followed the download).
    pub(super) fn step_losses_staged(&self) -> Result<LossSums> {
        let ws = self.ws()?;
        let mut total = LossSums::default();
        for g in 0..self.last_groups {
            let (row, col) = self.staged_loss(Workspace::loss_at(g))?;
            total.add(&LossSums {
                row,
                col,
                words: (ws.steps * ws.batch) as u64,
            });
        }
        Ok(total)
    }

    /// Download `n` results from `at` to the staging and wait for them.
    pub(super) fn read_results(&self, at: usize, n: usize) -> Result<()> {
        let ws = self.ws()?;
        self.dev
            .download_async(ws.results.at(at), &ws.staging.results, 8 * at, 8 * n)?;
        self.wait()
    }

    /// The loss sums of pass `cx` (one host wait).
    pub(super) fn pass_loss(&self, cx: &Cx) -> Result<LossSums> {
        self.read_results(cx.loss_at, 2)?;
        let (row, col) = self.staged_loss(cx.loss_at)?;
        let ws = self.ws()?;
        Ok(LossSums {
            row,
            col,
            words: (ws.steps * ws.batch) as u64,
        })
    }

    /// Prepare a training step on the host: every group's inputs staged, the work that
    /// runs it described (left pending).
    pub(super) fn prepare_step(
        &mut self,
        batch: &Batch<'_>,
        step: u64,
        scale: f32,
    ) -> Result<TrainWork> {
        let plan = Plan::new(self.shard, batch)?;
        let groups = plan.groups();
        let SumPlan {
            slots,
            mut after,
            finish,
        } = Self::sum_plan(groups)?;
        self.ensure_group_grads(slots.iter().copied().max().unwrap_or(0))?;
        let mut tokens = std::mem::take(&mut self.host.tokens);
        let mut work = TrainWork {
            steps: batch.steps,
            batch: batch.batch / groups,
            groups: Vec::with_capacity(groups),
            finish,
        };
        let r = plan.for_each_group(batch, &mut tokens, |g, group, keyed| {
            self.prepare_host(group, g, groups)?;
            let cx = Cx {
                region: g,
                stream: group.stream,
                keyed,
                slot: slots[g],
                loss_at: Workspace::loss_at(g),
                train: self.dropout > 0.0,
            };
            if let Some(st) = self.states.get_mut(&group.stream) {
                st.live = true;
            }
            work.groups.push((cx, std::mem::take(&mut after[g])));
            Ok(())
        });
        self.host.tokens = tokens;
        r?;
        self.stage_batch_knobs(step, scale)?;
        self.last_groups = groups;
        Ok(work)
    }

    /// The loss-table batch just run: the positions whose target is in the tables' range,
    /// grouped by target word (ascending), go up as (table entry, start) lists through
    /// the workspace's table buffers (no allocation), and each word's rows are added.
    pub(super) fn accumulate_tables(&mut self) -> Result<()> {
        let range = self.tables.as_ref().map_or(0..0, |t| t.words.clone());
        let h = &mut self.host;
        let words = &h.words;
        h.order.clear();
        h.order.extend(
            (0..words.len() as u32).filter(|&p| range.contains(&(words[p as usize] as usize))),
        );
        h.order.sort_unstable_by_key(|&p| (words[p as usize], p));
        h.tab_words.clear();
        h.tab_starts.clear();
        for (i, &p) in h.order.iter().enumerate() {
            let w = words[p as usize] - range.start as u32;
            if h.tab_words.last() != Some(&w) {
                h.tab_words.push(w);
                h.tab_starts.push(i as u32);
            }
        }
        h.tab_starts.push(h.order.len() as u32);
        if h.tab_words.is_empty() {
            return Ok(());
        }
        let (ws, tables) = match (&self.ws, &mut self.tables) {
            (Some(w), Some(t)) => (w, t),
            _ => return Err(Error::Backend("no batch or tables".into())),
        };
        let dev = self.dev.as_ref();
        ws.tab_words.upload(dev, 0, &h.tab_words)?;
        ws.tab_starts.upload(dev, 0, &h.tab_starts)?;
        ws.tab_pos.upload(dev, 0, &h.order)?;
        let d = self.layout.dims;
        for (table, z, ld, width) in [
            (&tables.lr, &ws.zr, ws.ldr, d.rows),
            (&tables.lc, &ws.zc, ws.ldc, d.cols),
        ] {
            dev.launch(&Launch {
                kernel: "table_accumulate",
                grid: [
                    u32_arg(h.tab_words.len(), "words")?.slot() as u32,
                    width.div_ceil(THREADS as usize) as u32,
                    1,
                ],
                block: [THREADS, 1, 1],
                args: &[
                    table.arg(0),
                    z.arg(0),
                    ws.tab_words.arg(0),
                    ws.tab_starts.arg(0),
                    ws.tab_pos.arg(0),
                    u32_arg(width, "table side")?,
                    u32_arg(ld, "logit row")?,
                ],
            })?;
        }
        for (k, &w) in h.tab_words.iter().enumerate() {
            tables.counts[w as usize] += (h.tab_starts[k + 1] - h.tab_starts[k]) as u64;
        }
        Ok(())
    }
}
