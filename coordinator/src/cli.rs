//! The command line: the program's arguments (clap derive) and the dispatch to the
//! subcommand that runs them ([`crate::commands`]).

use clap::{Parser, Subcommand, ValueEnum};
use tokio::runtime::Handle;

use crate::commands::allocate::AllocateArgs;
use crate::commands::bench::BenchArgs;
use crate::commands::coordinator::CoordinatorArgs;
use crate::commands::eval::EvalArgs;
use crate::commands::export::ExportArgs;
use crate::commands::inspect::InspectArgs;
use crate::commands::kernels::KernelsArgs;
use crate::commands::plot::PlotArgs;
use crate::commands::sample::SampleArgs;
use crate::commands::shard::ShardArgs;
use crate::commands::tables::TablesArgs;
use crate::commands::train::TrainArgs;
use crate::commands::vocab::VocabArgs;
use crate::commands::worker::WorkerArgs;
use crate::commands::{self, ConfigArgs};
use crate::signals::OnStop;
use crate::{Result, Stop};

#[derive(Parser, Debug)]
#[command(
    name = "lightrnn",
    version,
    about = "Train LightRNN language models (Li et al., NeurIPS 2016)"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Seconds a SIGTERM, SIGINT or SIGHUP leaves training to stop at a common step and
    /// write its checkpoint before the process gives up (exit status 1). SIGUSR1 (SLURM's
    /// warning before the time limit) stops at the next step with no deadline of its own.
    /// Keep it below the scheduler's kill delay (SLURM's KillWait, Kubernetes'
    /// terminationGracePeriodSeconds), past which the process is killed.
    #[arg(long, default_value_t = 25, global = true)]
    pub grace_s: u64,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a model on a corpus (text files or a prepared dataset).
    Train(TrainArgs),
    /// Perplexity of a checkpoint on a text file.
    Eval(EvalArgs),
    /// Training throughput on a synthetic Zipf corpus; prints one JSON line.
    Bench(BenchArgs),
    /// Print the effective configuration (TOML).
    Config(ConfigArgs),
    /// Solve a word allocation from loss tables (.npy) and write it (.npy).
    Allocate(AllocateArgs),
    /// Loss tables of a checkpoint over its training data, as .npy files.
    Tables(TablesArgs),
    /// Show which words share the rows of a checkpoint's table.
    Inspect(InspectArgs),
    /// Write a checkpoint as safetensors weights, vocabulary, config and model.json (and
    /// word vectors in the word2vec text format) for other tools.
    Export(ExportArgs),
    /// Generate text from a checkpoint (row first, then column given the row).
    Sample(SampleArgs),
    /// Draw a run's curves (and a checkpoint's allocation) as PNG pictures.
    Plot(PlotArgs),
    /// Count the words of many text files or objects in parallel and write vocab.txt.
    Vocab(VocabArgs),
    /// Tokenise many text files or objects in parallel into u32 shards and a manifest.
    Shard(ShardArgs),
    /// Serve one distributed training job to `--world-size` workers.
    Coordinator(CoordinatorArgs),
    /// Join a distributed job as one worker (rank).
    Worker(WorkerArgs),
    /// The CUDA devices and libraries this build can use (JSON), or why there are none.
    Devices,
    /// Compile the CUDA kernels ahead of time for a GPU architecture (NVRTC, no GPU).
    Kernels(KernelsArgs),
}

impl Command {
    /// What a stop signal does: the commands that train checkpoint first; the others
    /// have nothing to save and end at once.
    pub fn on_stop(&self) -> OnStop {
        match self {
            Self::Train(_) | Self::Coordinator(_) | Self::Worker(_) => OnStop::Checkpoint,
            _ => OnStop::Exit,
        }
    }
}

/// Run one parsed command; returns what goes to stdout.
pub fn run(cli: &Cli, handle: &Handle, stop: &Stop) -> Result<String> {
    match &cli.command {
        Command::Train(a) => commands::train::run(a, handle, stop),
        Command::Eval(a) => commands::eval::run(a, handle),
        Command::Bench(a) => commands::bench::run(a),
        Command::Config(a) => commands::config::run(a),
        Command::Allocate(a) => commands::allocate::run(a, handle),
        Command::Tables(a) => commands::tables::run(a, handle),
        Command::Inspect(a) => commands::inspect::run(a, handle),
        Command::Export(a) => commands::export::run(a, handle),
        Command::Sample(a) => commands::sample::run(a, handle),
        Command::Plot(a) => commands::plot::run(a, handle),
        Command::Vocab(a) => commands::vocab::run(a, handle),
        Command::Shard(a) => commands::shard::run(a, handle),
        Command::Coordinator(a) => commands::coordinator::run(a, handle, stop),
        Command::Worker(a) => commands::worker::run(a, handle, stop),
        Command::Devices => commands::devices::run(),
        Command::Kernels(a) => commands::kernels::run(a),
    }
}
