//! The data pipeline of a rank, from object storage to batches; nothing here knows the
//! model. In dependency order:
//!
//! - [`store`]: object-storage locations (local directories, `file://`, `memory://`,
//!   `s3://`, `gs://`, `az://`);
//! - [`options`]: how text is read;
//! - [`formats`]: compressed, archived and structured inputs decoded into text;
//! - [`text`]: hostile-input-safe line reading; [`vocab`]: the vocabulary and its file;
//! - [`shards`]: verified u32 token shards and their manifests;
//! - [`corpus`]: many inputs counted and sharded in parallel (`vocab`, `shard`);
//! - [`parts`]: the same in parts for array jobs (`--part I/N`, `--merge`);
//! - [`dataset`]: a training corpus (vocabulary + train/valid/test), prepared once;
//! - [`cluster`]: the same prepared by a distributed job's workers, as tasks;
//! - [`batches`]: the streaming truncated-BPTT batcher;
//! - [`npy`]: NumPy `.npy` tables; [`zipf`]: the synthetic corpus of the benchmark.

pub mod batches;
pub mod cluster;
pub mod corpus;
pub mod dataset;
pub mod formats;
pub mod npy;
pub mod options;
pub mod parts;
pub mod shards;
pub mod store;
pub mod text;
pub mod vocab;
pub mod zipf;
