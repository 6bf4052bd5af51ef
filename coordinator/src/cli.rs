//! Command-line interface: argument types (clap derive) and the functions behind them.

use std::io::IsTerminal;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio::runtime::Handle;

use lightrnn_kernels::BackendKind;
use lightrnn_worker::checkpoint;
use lightrnn_worker::config::TrainConfig;
use lightrnn_worker::data::store::Location;
use lightrnn_worker::train::bench::{BenchOptions, bench};
use lightrnn_worker::train::eval::eval_file;
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
    /// Seconds a SIGTERM/SIGINT leaves training to stop at a common step and write its
    /// checkpoint before the process gives up (exit status 1).
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
    Coordinator(crate::launch::CoordinatorArgs),
    /// Join a distributed job as one worker (rank).
    Worker(crate::launch::WorkerArgs),
    /// The CUDA devices and libraries this build can use (JSON), or why there are none.
    Devices,
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
}

impl TextArgs {
    fn options(&self) -> lightrnn_worker::data::text::TextOptions {
        lightrnn_worker::data::text::TextOptions {
            lowercase: self.lowercase,
            max_line_bytes: self.max_line_bytes,
            bad_lines: self.bad_lines.parse().unwrap_or_default(),
        }
    }

    fn parallel(&self) -> usize {
        if self.parallel > 0 {
            self.parallel
        } else {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct VocabArgs {
    /// Text objects or prefixes (every object below; *.json skipped): paths, file://,
    /// memory:// URLs. Repeatable.
    #[arg(long, required = true)]
    pub input: Vec<String>,
    /// Output location; vocab.txt is written there.
    #[arg(long)]
    pub out: String,
    /// Words kept, most frequent first (0 = all), plus <unk>.
    #[arg(long, default_value_t = 0)]
    pub size: usize,
    #[command(flatten)]
    pub text: TextArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ShardArgs {
    /// Text objects or prefixes, concatenated in the order given (prefixes in name order).
    #[arg(long, required = true)]
    pub input: Vec<String>,
    /// The vocabulary: a vocab.txt object, or a location holding one.
    #[arg(long)]
    pub vocab: String,
    /// Output location: SPLIT-NNNNN.u32 shards, SPLIT.manifest.json and vocab.txt.
    #[arg(long)]
    pub out: String,
    /// Split name (train, valid, test, ...).
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Tokens per shard.
    #[arg(long, default_value_t = lightrnn_worker::data::shards::SHARD_TOKENS)]
    pub shard_tokens: u64,
    #[command(flatten)]
    pub text: TextArgs,
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
pub struct PlotArgs {
    /// A run's metrics.jsonl (path or object-store URL), or its run directory.
    #[arg(long)]
    pub metrics: Option<String>,
    /// PNG file for the curves.
    #[arg(long, default_value = "curves.png")]
    pub out: String,
    /// Also draw this checkpoint's allocation (a checkpoint, or a run directory: its
    /// newest checkpoint).
    #[arg(long)]
    pub checkpoint: Option<String>,
    /// PNG file for the allocation.
    #[arg(long, default_value = "allocation.png")]
    pub allocation_out: String,
}

#[derive(Args, Debug, Clone)]
pub struct SampleArgs {
    /// A checkpoint, or a run directory (its best model when it has one, else its newest
    /// checkpoint).
    #[arg(long)]
    pub checkpoint: String,
    /// Words to continue (words outside the vocabulary read as <unk>).
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// Words to generate (<eos> ends a line).
    #[arg(long, default_value_t = 50)]
    pub words: usize,
    /// Softmax temperature of both factors (below 1: safer, above 1: wilder).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Draw among the k most probable words only (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

#[derive(Args, Debug, Clone)]
pub struct ExportArgs {
    /// A checkpoint, or a run directory (its newest checkpoint).
    #[arg(long)]
    pub checkpoint: String,
    /// Directory or object-store URL to write into.
    #[arg(long)]
    pub out: String,
    /// Also write vectors.txt: each word's row vector joined to its column vector, in
    /// the word2vec text format (gensim's KeyedVectors.load_word2vec_format reads it).
    #[arg(long)]
    pub word_vectors: bool,
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

/// What a training run is: its config, data, run directory and backend (`train` and
/// `coordinator`).
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Directory or object-store URL with *train*, *valid*, *test* text files, or a
    /// prepared dataset.
    #[arg(long)]
    pub data: String,
    /// Run directory (path or object-store URL): checkpoints, metrics.jsonl, summary.json.
    #[arg(long)]
    pub out: String,
    /// Continue from the newest checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    /// auto, cpu, cuda or cuda:N (auto: the CPU in this version).
    #[arg(long, default_value = "auto")]
    pub backend: String,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9400).
    #[arg(long)]
    pub metrics_addr: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Train data-parallel in N worker processes on this machine, through a coordinator
    /// in this process (the config's batch is the global batch, split evenly).
    #[arg(long)]
    pub workers: Option<usize>,
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

/// Set when the process is asked to stop (SIGTERM, SIGINT).
pub type Stop = std::sync::Arc<std::sync::atomic::AtomicBool>;

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
/// A vocabulary from a vocab.txt object or a location holding one.
async fn load_vocab(url: &str) -> lightrnn_worker::Result<lightrnn_worker::data::vocab::Vocab> {
    use lightrnn_worker::data::vocab::VOCAB_FILE;
    let loc = Location::parse(url)?;
    let (loc, name) = match loc.parent() {
        Some(parent) if parent.head(&loc.name()).await?.is_some() => (parent, loc.name()),
        _ => (loc, VOCAB_FILE.to_string()),
    };
    let bytes = loc.get(&name).await?;
    let full = loc.url_of(&name);
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| lightrnn_worker::Error::Data(format!("{full}: not UTF-8")))?;
    lightrnn_worker::data::vocab::Vocab::parse(text, &full)
}

pub fn run(cli: &Cli, handle: &Handle, stop: &Stop) -> Result<String> {
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
        Command::Devices => {
            use lightrnn_kernels::cuda::device::{cuda_devices, cuda_libraries};
            let libs: serde_json::Map<String, serde_json::Value> = cuda_libraries()
                .into_iter()
                .map(|(n, ok)| (n.to_string(), ok.into()))
                .collect();
            let (devices, reason) = match cuda_devices() {
                Ok(d) => (serde_json::to_value(d)?, serde_json::Value::Null),
                Err(e) => (serde_json::json!([]), e.to_string().into()),
            };
            Ok(serde_json::json!({
                "cuda_build": cfg!(feature = "cuda"), "cuda_libraries": libs,
                "cuda_devices": devices, "reason": reason,
            })
            .to_string())
        }
        Command::Coordinator(a) => crate::launch::coordinator(a, handle, stop),
        Command::Worker(a) => crate::launch::worker(a, handle, stop),
        Command::Train(a) if a.workers.is_some() => crate::launch::train_workers(a, handle, stop),
        Command::Train(t) => {
            let a = &t.run;
            let cfg = resolve_config(&a.config)?;
            let opts = RunOptions {
                data: Location::parse(&a.data)?,
                out: Location::parse(&a.out)?,
                resume: a.resume,
                checkpoint: None,
                backend: backend_kind(&a.backend)?,
                progress: std::io::stderr().is_terminal(),
                stop: Some(stop.clone()),
                report: None,
            };
            let mut opts = opts;
            let server = match &a.metrics_addr {
                Some(addr) => {
                    let sink: lightrnn_worker::report::ReportSink = Default::default();
                    opts.report = Some(sink.clone());
                    let listener = handle.block_on(crate::metrics::bind(addr))?;
                    Some(handle.spawn(crate::metrics::serve(
                        listener,
                        std::sync::Arc::new(move || crate::metrics::single_process(&sink)),
                    )))
                }
                None => None,
            };
            let s = train(&cfg, &opts, handle);
            if let Some(h) = server {
                h.abort();
            }
            let s = s?;
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
            let opts = lightrnn_alloc::SolveOptions {
                threads: a.threads,
                candidates: a.candidates,
            };
            let solver: lightrnn_alloc::Solver = a.solver.parse()?;
            let r =
                crate::commands::allocate(&a.row_loss, &a.col_loss, solver, &a.out, &opts, handle)?;
            Ok(r.to_string())
        }
        Command::Tables(a) => {
            let ck = handle.block_on(checkpoint::resolve(&Location::parse(&a.checkpoint)?))?;
            Ok(crate::commands::tables(&ck, &a.data, &a.out, a.threads, handle)?.to_string())
        }
        Command::Vocab(a) => {
            let bar = std::io::stderr().is_terminal();
            let (vocab, counted) = handle.block_on(async {
                let inputs = lightrnn_worker::data::corpus::expand_inputs(&a.input).await?;
                let out = Location::parse(&a.out)?;
                lightrnn_worker::data::corpus::build_vocab(
                    &inputs,
                    &out,
                    &a.text.options(),
                    a.size,
                    a.text.parallel(),
                    bar,
                )
                .await
            })?;
            let mut j = serde_json::to_value(&counted)?;
            j["vocab_size"] = vocab.len().into();
            j["vocab_sha256"] = vocab.sha256().into();
            j["out"] = Location::parse(&a.out)?
                .url_of(lightrnn_worker::data::vocab::VOCAB_FILE)
                .into();
            Ok(j.to_string())
        }
        Command::Shard(a) => {
            let bar = std::io::stderr().is_terminal();
            let (m, st) = handle.block_on(async {
                let inputs = lightrnn_worker::data::corpus::expand_inputs(&a.input).await?;
                let vocab = load_vocab(&a.vocab).await?;
                let out = Location::parse(&a.out)?;
                lightrnn_worker::data::corpus::write_shards(
                    &inputs,
                    std::sync::Arc::new(vocab),
                    &out,
                    &a.split,
                    a.shard_tokens,
                    &a.text.options(),
                    serde_json::json!({
                        "text": a.text.options(),
                        "shard_tokens": a.shard_tokens,
                    }),
                    a.text.parallel(),
                    bar,
                )
                .await
            })?;
            let mut j = serde_json::to_value(&st)?;
            j["manifest"] = Location::parse(&a.out)?
                .url_of(&lightrnn_worker::data::shards::Manifest::object_name(
                    &m.split,
                ))
                .into();
            Ok(j.to_string())
        }
        Command::Export(a) => {
            let ck = handle.block_on(checkpoint::resolve(&Location::parse(&a.checkpoint)?))?;
            crate::commands::export(&ck, &Location::parse(&a.out)?, a.word_vectors, handle)
        }
        Command::Plot(a) => {
            if a.metrics.is_none() && a.checkpoint.is_none() {
                bail!("give --metrics (curves) and/or --checkpoint (the allocation)");
            }
            let mut written = serde_json::Map::new();
            if let Some(m) = &a.metrics {
                let (text, origin) = handle.block_on(async {
                    // The file itself, or a run directory holding metrics.jsonl.
                    let (parent, name) = lightrnn_worker::data::store::split_object(m)?;
                    if name.ends_with(".jsonl") && parent.head(&name).await?.is_some() {
                        return Ok::<_, anyhow::Error>((parent.get(&name).await?, m.clone()));
                    }
                    let run = Location::parse(m)?;
                    let origin = run.url_of("metrics.jsonl");
                    Ok((run.get("metrics.jsonl").await?, origin))
                })?;
                let text = String::from_utf8(text.to_vec())
                    .with_context(|| format!("{origin} is not UTF-8"))?;
                let curves = crate::plot::read_curves(&text, &origin)?;
                let title = std::path::Path::new(m.trim_end_matches('/'))
                    .file_name()
                    .map_or_else(|| m.clone(), |n| n.to_string_lossy().into_owned());
                crate::plot::curves_png(&curves, &title, std::path::Path::new(&a.out))?;
                written.insert("curves".into(), a.out.clone().into());
                written.insert("train_points".into(), curves.train.len().into());
                written.insert("reallocations".into(), curves.reallocs.len().into());
            }
            if let Some(c) = &a.checkpoint {
                let ck = handle.block_on(checkpoint::resolve(&Location::parse(c)?))?;
                let (w, h) =
                    crate::plot::allocation_png(&ck, std::path::Path::new(&a.allocation_out))?;
                written.insert("allocation".into(), a.allocation_out.clone().into());
                written.insert("allocation_size".into(), serde_json::json!([w, h]));
            }
            Ok(serde_json::Value::Object(written).to_string())
        }
        Command::Sample(a) => {
            let loc = Location::parse(&a.checkpoint)?;
            // A run directory: its best model (what its test perplexity measured).
            let best = loc.join("best");
            let from = if handle.block_on(best.head("meta.json"))?.is_some() {
                best
            } else {
                loc
            };
            let ck = handle.block_on(checkpoint::resolve(&from))?;
            let opts = lightrnn_worker::sample::SampleOptions {
                temperature: a.temperature,
                top_k: a.top_k,
                seed: a.seed,
            };
            let t0 = std::time::Instant::now();
            let text = lightrnn_worker::sample::sample(&ck, &a.prompt, a.words, opts)?;
            Ok(serde_json::to_string(&serde_json::json!({
                "prompt": a.prompt, "text": text, "words": a.words, "temperature": a.temperature,
                "top_k": a.top_k, "seed": a.seed, "checkpoint": ck.url,
                "seconds": t0.elapsed().as_secs_f64(),
            }))?)
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
