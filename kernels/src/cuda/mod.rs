//! The CUDA side of the boundary, present in every build so that no call site needs a
//! `cfg`: [`device`] lists the devices and libraries (with the `cuda` feature, found at
//! run time, never linked), and [`CudaBackend`] is the backend type `--backend cuda`
//! opens.
//!
//! This version has no CUDA kernels: opening the backend says why it cannot run (built
//! without CUDA, no driver, no such device, no kernels yet), so the type has no values
//! yet and its trait implementation is empty matches.

pub mod device;

use std::convert::Infallible;

use crate::backend::{
    Backend, Batch, GradReduce, LossSums, ModelConfig, OptimizerState, Pass, Shard, State, Stream,
};
use crate::layout::ParamLayout;
use crate::optim::Optimizer;
use crate::tables::LossTables;
use crate::{Error, Result};

/// The LightRNN model on one CUDA device.
pub struct CudaBackend {
    never: Infallible,
}

impl CudaBackend {
    /// Open device `ordinal` for `cfg`, or say why that cannot be done.
    pub fn new(_cfg: &ModelConfig, ordinal: usize) -> Result<Self> {
        Err(Self::unavailable(ordinal))
    }

    /// Why device `ordinal` cannot run a model in this build: built without CUDA, no
    /// driver, no such device, or (this version) no CUDA kernels.
    pub fn unavailable(ordinal: usize) -> Error {
        let devices = match device::cuda_devices() {
            Ok(d) => d,
            Err(e) => return e,
        };
        match devices.get(ordinal) {
            None => Error::Backend(format!(
                "no CUDA device {ordinal}: this machine has {} (lightrnn devices lists them)",
                devices.len()
            )),
            Some(d) => Error::Backend(format!(
                "CUDA device {ordinal} ({}) is present, but this version of lightrnn has no CUDA kernels yet: use --backend cpu",
                d.name
            )),
        }
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> String {
        match self.never {}
    }
    fn layout(&self) -> &ParamLayout {
        match self.never {}
    }
    fn params(&self) -> Result<Vec<f32>> {
        match self.never {}
    }
    fn set_params(&mut self, _: &[f32]) -> Result<()> {
        match self.never {}
    }
    fn grads(&self) -> Result<Vec<f32>> {
        match self.never {}
    }
    fn allocation(&self) -> Result<Vec<u32>> {
        match self.never {}
    }
    fn set_allocation(&mut self, _: &[u32]) -> Result<()> {
        match self.never {}
    }
    fn state(&self, _: Stream) -> Result<Option<State<f32>>> {
        match self.never {}
    }
    fn set_state(&mut self, _: Stream, _: State<f32>) -> Result<()> {
        match self.never {}
    }
    fn reset_state(&mut self, _: Stream) {
        match self.never {}
    }
    fn set_shard(&mut self, _: Shard) -> Result<()> {
        match self.never {}
    }
    fn input_forward(&mut self, _: &Batch<'_>, _: Pass) -> Result<()> {
        match self.never {}
    }
    fn lstm_forward(&mut self, _: usize) -> Result<()> {
        match self.never {}
    }
    fn heads(&mut self, _: Option<f32>) -> Result<LossSums> {
        match self.never {}
    }
    fn lstm_backward(&mut self, _: usize) -> Result<()> {
        match self.never {}
    }
    fn train_step(&mut self, _: &Batch<'_>, _: u64, _: f32) -> Result<LossSums> {
        match self.never {}
    }
    fn all_reduce_grads(&mut self, _: &mut dyn GradReduce) -> Result<()> {
        match self.never {}
    }
    fn clip_and_step(&mut self, _: &Optimizer, _: f64, _: f64) -> Result<f64> {
        match self.never {}
    }
    fn optimizer_state(&self) -> Result<Option<OptimizerState>> {
        match self.never {}
    }
    fn set_optimizer_state(&mut self, _: OptimizerState) -> Result<()> {
        match self.never {}
    }
    fn begin_loss_tables(&mut self, _: u64) -> Result<()> {
        match self.never {}
    }
    fn accumulate_loss_tables(&mut self, _: &Batch<'_>) -> Result<LossSums> {
        match self.never {}
    }
    fn take_loss_tables(&mut self) -> Result<LossTables> {
        match self.never {}
    }
}
