//! One module per subcommand of `lightrnn`, each with its arguments (clap derive) and a
//! `run` that validates them into the libraries' types and returns what goes to stdout;
//! and the argument types several commands share.

pub mod allocate;
pub mod bench;
pub mod config;
pub mod coordinator;
pub mod devices;
pub mod eval;
pub mod export;
pub mod inspect;
pub mod kernels;
pub mod plot;
pub mod sample;
pub mod shard;
pub mod tables;
pub mod train;
pub mod vocab;
pub mod worker;

use clap::Args;

use lightrnn_core::config::TrainConfig;
use lightrnn_kernels::BackendKind;

use crate::Result;
use crate::error::{IoContext, usage};

/// Which configuration a command uses: a preset or a TOML file, with overrides.
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
    /// Write a Chrome trace-event file (Perfetto opens it) of steps A to B per rank,
    /// in the run directory's profile/ (the config's `profile_steps`).
    #[arg(long, value_name = "A:B")]
    pub profile_steps: Option<String>,
}

/// The effective configuration of a command line.
pub fn resolve_config(a: &ConfigArgs) -> Result<TrainConfig> {
    let base = match (&a.preset, &a.config) {
        (Some(p), _) => TrainConfig::preset(p)?,
        (None, Some(f)) => {
            let text = std::fs::read_to_string(f).doing(|| format!("reading {f}"))?;
            TrainConfig::from_toml(&text, f)?
        }
        (None, None) => TrainConfig::preset("ptb-small")?,
    };
    let mut cfg = base.with_overrides(&a.set)?;
    if let Some(steps) = &a.profile_steps {
        lightrnn_core::config::profile_steps(steps)?;
        cfg.profile_steps = steps.clone();
    }
    Ok(cfg)
}

/// What a training run is: its config, data, run directory and backend (`train` and
/// `coordinator`).
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Directory or object-store URL with *train*, *valid*, *test* text files, or a
    /// prepared dataset. Text is tokenised into OUT/data once (in a distributed job, by
    /// its workers before the group forms) and reused while it is unchanged.
    #[arg(long)]
    pub data: String,
    /// Run directory (path or object-store URL): checkpoints, metrics.jsonl, summary.json.
    #[arg(long)]
    pub out: String,
    /// Continue from the newest checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    /// auto, cpu, cuda or cuda:N (auto: CUDA device 0 where one can run, else the CPU).
    #[arg(long, default_value = "auto")]
    pub backend: String,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9400).
    #[arg(long)]
    pub metrics_addr: Option<String>,
}

pub fn backend_kind(s: &str) -> Result<BackendKind> {
    Ok(s.parse()?)
}

/// How text is read, for `vocab` and `shard` (the same options must be given to both).
#[derive(Args, Debug, Clone)]
pub struct TextArgs {
    /// Lowercase every line before splitting.
    #[arg(long)]
    pub lowercase: bool,
    /// Longest accepted line in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_line_bytes: usize,
    /// Lines that are not UTF-8, hold control bytes or exceed the limit: "error" stops,
    /// "skip" leaves them out and counts them.
    #[arg(long, default_value = "error", value_parser = ["error", "skip"])]
    pub bad_lines: String,
    /// Inputs read at once (0 = the number of cores).
    #[arg(long, default_value_t = 0)]
    pub parallel: usize,
    /// Every input's format, instead of each object's name saying it: text, jsonl,
    /// parquet, wet or tar, with .gz, .zst, .xz or .bz2 for compression (e.g. jsonl.zst,
    /// tar.gz).
    #[arg(long)]
    pub format: Option<String>,
    /// The text of a JSON line (a dotted path for nested fields: meta.body) or a Parquet
    /// file's text column.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Of tar archives, only the files whose names start with this (e.g.
    /// training-monolingual.tokenized.shuffled/).
    #[arg(long)]
    pub members: Option<String>,
}

impl TextArgs {
    pub fn options(&self) -> lightrnn_core::data::text::TextOptions {
        lightrnn_core::data::text::TextOptions {
            lowercase: self.lowercase,
            max_line_bytes: self.max_line_bytes,
            bad_lines: self.bad_lines.parse().unwrap_or_default(),
            format: self.format.clone(),
            text_field: self.text_field.clone(),
            members: self.members.clone(),
        }
    }

    pub fn parallel(&self) -> usize {
        if self.parallel > 0 {
            self.parallel
        } else {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        }
    }
}

/// The bearer token from a file (trimmed) or the LIGHTRNN_TOKEN variable.
pub fn bearer_token(file: &Option<String>) -> Result<Option<String>> {
    let t = match file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .doing(|| format!("reading the token file {f}"))?
                .trim()
                .to_string(),
        ),
        None => std::env::var("LIGHTRNN_TOKEN").ok(),
    };
    match t {
        Some(t) if t.len() < 16 => usage("the bearer token must have at least 16 characters"),
        t => Ok(t),
    }
}
