//! `lightrnn plot`: a run's curves (and a checkpoint's allocation) as PNG pictures.

use clap::Args;
use tokio::runtime::Handle;

use lightrnn_core::checkpoint;
use lightrnn_core::data::store::{Location, split_object};

use crate::error::usage;
use crate::{Error, Result};

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

/// The text of a metrics file named directly or through its run directory, and where it
/// came from.
fn metrics_text(m: &str, handle: &Handle) -> Result<(String, String)> {
    let (bytes, origin) = handle.block_on(async {
        let (parent, name) = split_object(m)?;
        if name.ends_with(".jsonl") && parent.head(&name).await?.is_some() {
            return Ok::<_, lightrnn_core::Error>((parent.get(&name).await?, m.to_string()));
        }
        let run = Location::parse(m)?;
        let origin = run.url_of("metrics.jsonl");
        Ok((run.get("metrics.jsonl").await?, origin))
    })?;
    let text = String::from_utf8(bytes.to_vec())
        .map_err(|_| Error::Usage(format!("{origin} is not UTF-8")))?;
    Ok((text, origin))
}

pub fn run(a: &PlotArgs, handle: &Handle) -> Result<String> {
    if a.metrics.is_none() && a.checkpoint.is_none() {
        return usage("give --metrics (curves) and/or --checkpoint (the allocation)");
    }
    let mut written = serde_json::Map::new();
    if let Some(m) = &a.metrics {
        let (text, origin) = metrics_text(m, handle)?;
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
        let (w, h) = crate::plot::allocation_png(&ck, std::path::Path::new(&a.allocation_out))?;
        written.insert("allocation".into(), a.allocation_out.clone().into());
        written.insert("allocation_size".into(), serde_json::json!([w, h]));
    }
    Ok(serde_json::Value::Object(written).to_string())
}
