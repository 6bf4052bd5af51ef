//! Command-line interface: argument types (clap derive) and the functions behind them.

use std::io::IsTerminal;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio::runtime::Handle;

use lightrnn_kernels::BackendKind;
use lightrnn_worker::bench::{BenchOptions, bench};
use lightrnn_worker::checkpoint;
use lightrnn_worker::config::TrainConfig;
use lightrnn_worker::eval::eval_file;
use lightrnn_worker::store::Location;
use lightrnn_worker::train::{RunOptions, train};

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
}

#[derive(Args, Debug, Clone)]
pub struct AllocateArgs {
    /// [V, R] row losses (.npy, f32 or f64).
    #[arg(long)]
    pub row_loss: String,
    /// [V, C] column losses (.npy, f32 or f64).
    #[arg(long)]
    pub col_loss: String,
    /// exact, scalable or greedy.
    #[arg(long, default_value = "scalable")]
    pub solver: String,
    /// Output: the cell (row * C + col) of every word, int64 .npy.
    #[arg(long)]
    pub out: String,
    /// Threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Candidate rows and columns per word (0 = the solver's default).
    #[arg(long, default_value_t = 0)]
    pub candidates: usize,
}

#[derive(Args, Debug, Clone)]
pub struct TablesArgs {
    /// A checkpoint, or a run directory (its newest checkpoint).
    #[arg(long)]
    pub checkpoint: String,
    /// The training data of the run (text directory or prepared dataset).
    #[arg(long)]
    pub data: String,
    /// Output directory: L_r.npy, L_c.npy, counts.npy, alloc.npy.
    #[arg(long)]
    pub out: String,
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

#[derive(Args, Debug, Clone)]
pub struct InspectArgs {
    /// A checkpoint, or a run directory (its newest checkpoint).
    #[arg(long)]
    pub checkpoint: String,
    /// Rows to show.
    #[arg(long, default_value_t = 20)]
    pub rows: usize,
    /// Words per row.
    #[arg(long, default_value_t = 12)]
    pub words: usize,
}

#[derive(Args, Debug, Clone)]
pub struct ConfigArgs {
    /// Built-in preset (see `lightrnn config --list`).
    #[arg(long, conflicts_with = "config")]
    pub preset: Option<String>,
    /// TOML configuration file.
    #[arg(long)]
    pub config: Option<String>,
    /// Override one key, e.g. --set max_steps=200 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// List the built-in presets.
    #[arg(long)]
    pub list: bool,
}

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Directory (or file://, memory:// URL) with *train*, *valid*, *test* text files, or a
    /// prepared dataset.
    #[arg(long)]
    pub data: String,
    /// Run directory: checkpoints, metrics.jsonl, summary.json.
    #[arg(long)]
    pub out: String,
    /// Continue from the newest checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    /// auto or cpu.
    #[arg(long, default_value = "auto")]
    pub backend: String,
}

#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// A checkpoint directory, or a run directory (its newest checkpoint).
    #[arg(long)]
    pub checkpoint: String,
    /// Text file to score.
    #[arg(long)]
    pub data: String,
    /// Streams (default: the checkpoint's eval_batch).
    #[arg(long)]
    pub batch: Option<usize>,
    /// CPU threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[arg(long, default_value = "auto")]
    pub backend: String,
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    #[arg(long)]
    pub vocab: usize,
    #[arg(long)]
    pub emb: usize,
    #[arg(long)]
    pub hidden: usize,
    #[arg(long, default_value_t = 1)]
    pub layers: usize,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[arg(long, default_value_t = 35)]
    pub bptt: usize,
    /// CPU threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 40)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    #[arg(long, default_value_t = 1111)]
    pub seed: u64,
    /// Zipf exponent of the synthetic corpus.
    #[arg(long, default_value_t = 1.0)]
    pub zipf: f64,
    #[arg(long, default_value = "sgd")]
    pub optimizer: String,
    /// Also measure this machine's f32 GEMM peak (adds ~1 s).
    #[arg(long)]
    pub gemm_peak: bool,
    #[arg(long, default_value = "auto")]
    pub backend: String,
}

/// The effective configuration of a command line.
pub fn resolve_config(a: &ConfigArgs) -> Result<TrainConfig> {
    let base = match (&a.preset, &a.config) {
        (Some(p), _) => TrainConfig::preset(p)?,
        (None, Some(f)) => {
            let text = std::fs::read_to_string(f).with_context(|| format!("reading {f}"))?;
            TrainConfig::from_toml(&text, f)?
        }
        (None, None) => TrainConfig::preset("ptb-small")?,
    };
    Ok(base.with_overrides(&a.set)?)
}

fn backend_kind(s: &str) -> Result<BackendKind> {
    Ok(s.parse()?)
}

/// Run one parsed command; returns what goes to stdout.
pub fn run(cli: &Cli, handle: &Handle) -> Result<String> {
    match &cli.command {
        Command::Config(a) => {
            if a.list {
                let names: Vec<&str> = lightrnn_worker::config::PRESETS
                    .iter()
                    .map(|(n, _)| *n)
                    .collect();
                return Ok(names.join("\n"));
            }
            Ok(resolve_config(a)?.to_toml())
        }
        Command::Train(a) => {
            let cfg = resolve_config(&a.config)?;
            let opts = RunOptions {
                data: Location::parse(&a.data)?,
                out: Location::parse(&a.out)?,
                resume: a.resume,
                backend: backend_kind(&a.backend)?,
                progress: std::io::stderr().is_terminal(),
                allocator: if cfg.realloc_every > 0 {
                    Some(crate::commands::allocator(
                        &cfg.realloc_solver,
                        cfg.threads,
                    )?)
                } else {
                    None
                },
            };
            let s = train(&cfg, &opts, handle)?;
            let line = serde_json::json!({
                "train_loss": s.train_loss, "train_ppl": s.train_ppl, "valid_ppl": s.valid_ppl,
                "test_ppl": s.test_ppl, "words_per_sec": s.words_per_sec, "params": s.params,
                "seconds": s.seconds, "steps": s.steps, "epochs_completed": s.epochs_completed,
                "stopped_by": s.stopped_by, "out": opts.out.url(),
            });
            Ok(line.to_string())
        }
        Command::Eval(a) => {
            let loc = Location::parse(&a.checkpoint)?;
            let ck = handle.block_on(checkpoint::resolve(&loc))?;
            if a.batch == Some(0) {
                bail!("--batch must be positive");
            }
            let r = eval_file(
                &ck,
                &a.data,
                a.batch,
                a.threads,
                backend_kind(&a.backend)?,
                handle,
            )?;
            Ok(serde_json::to_string(&r)?)
        }
        Command::Allocate(a) => {
            let opts = crate::alloc::SolveOptions {
                threads: a.threads,
                candidates: a.candidates,
            };
            let solver: crate::alloc::Solver = a.solver.parse()?;
            let r =
                crate::commands::allocate(&a.row_loss, &a.col_loss, solver, &a.out, &opts, handle)?;
            Ok(r.to_string())
        }
        Command::Tables(a) => {
            let ck = handle.block_on(checkpoint::resolve(&Location::parse(&a.checkpoint)?))?;
            Ok(crate::commands::tables(&ck, &a.data, &a.out, a.threads, handle)?.to_string())
        }
        Command::Inspect(a) => {
            let ck = handle.block_on(checkpoint::resolve(&Location::parse(&a.checkpoint)?))?;
            crate::commands::inspect(&ck, a.rows, a.words)
        }
        Command::Bench(a) => {
            let o = BenchOptions {
                vocab: a.vocab,
                emb: a.emb,
                hidden: a.hidden,
                layers: a.layers,
                batch: a.batch,
                bptt: a.bptt,
                threads: a.threads,
                steps: a.steps.max(1),
                warmup: a.warmup,
                seed: a.seed,
                dropout: a.dropout,
                zipf: a.zipf,
                optimizer: a.optimizer.clone(),
                lr: 1.0,
                clip: 0.25,
                gemm_peak: a.gemm_peak,
                backend: backend_kind(&a.backend)?,
            };
            if o.zipf.is_nan() || o.zipf <= 0.0 {
                bail!("--zipf must be positive");
            }
            Ok(serde_json::to_string(&bench(&o)?)?)
        }
    }
}
