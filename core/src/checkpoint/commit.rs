//! Committing checkpoints and finding them: the manifest written last (create-only
//! where the coordinator commits), the checkpoints of a run newest first, the newest one
//! that verifies, pruning.

use bytes::Bytes;

use super::Checkpoint;
use super::format::{load, st_err};
use super::manifest::{META, Meta};
use crate::data::store::Location;
use crate::{Error, Result};

/// Make the checkpoint in `dir` exist: check that every object the manifest lists is
/// there with its size, then write `meta.json` — with `create_only`, by a conditional
/// put that never replaces another step's manifest. The same step's (a step replayed
/// after a restart, or the epoch-end work of a run stopped at its epoch's last batch)
/// is replaced: its objects have just been rewritten, so only the new manifest
/// describes them.
pub async fn commit(dir: &Location, meta: &Meta, create_only: bool) -> Result<()> {
    let url = dir.url().to_string();
    for f in &meta.files {
        match dir.head(&f.name).await? {
            Some(m) if m.size == f.bytes => {}
            Some(m) => {
                return Err(st_err(
                    &url,
                    format!(
                        "{} holds {} bytes, the manifest says {}",
                        f.name, m.size, f.bytes
                    ),
                ));
            }
            None => return Err(st_err(&url, format!("{} is missing", f.name))),
        }
    }
    let json = serde_json::to_vec_pretty(meta).map_err(|e| st_err(&url, e))?;
    if !create_only {
        return dir.put(META, Bytes::from(json)).await;
    }
    if dir.put_new(META, Bytes::from(json)).await? {
        return Ok(());
    }
    let existing: Option<Meta> = dir
        .get(META)
        .await
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    match existing {
        Some(e) if e.step == meta.step => {
            tracing::warn!(checkpoint = %url, step = meta.step, "replacing the manifest of a replayed step");
            let json = serde_json::to_vec_pretty(meta).map_err(|e| st_err(&url, e))?;
            dir.put(META, Bytes::from(json)).await
        }
        Some(e) => Err(st_err(
            &url,
            format!("a checkpoint of step {} is committed here already", e.step),
        )),
        None => Err(st_err(
            &url,
            "a manifest that does not parse is committed here already",
        )),
    }
}

/// Name of the checkpoint directory of `step`.
pub fn dir_name(step: u64) -> String {
    format!("step-{step:012}")
}

/// Checkpoint directories of a run, newest first.
pub async fn list(run: &Location) -> Result<Vec<(u64, Location)>> {
    let base = run.join("checkpoints");
    let (_, dirs) = base.list().await?;
    let mut out: Vec<(u64, Location)> = dirs
        .iter()
        .filter_map(|d| {
            d.strip_prefix("step-")
                .and_then(|s| s.parse().ok())
                .map(|s: u64| (s, base.join(d)))
        })
        .collect();
    out.sort_by_key(|x| std::cmp::Reverse(x.0));
    Ok(out)
}

/// The newest checkpoint of a run that verifies; broken ones are skipped with a warning.
pub async fn newest(run: &Location) -> Result<Option<Checkpoint>> {
    for (_, dir) in list(run).await? {
        match load(&dir).await {
            Ok(c) => return Ok(Some(c)),
            Err(e) => {
                tracing::warn!(checkpoint = %dir, error = %e, "skipping a checkpoint that does not verify")
            }
        }
    }
    Ok(None)
}

/// `PATH` as a checkpoint directory, or a run directory's newest checkpoint.
pub async fn resolve(path: &Location) -> Result<Checkpoint> {
    if path.head(META).await?.is_some() {
        return load(path).await;
    }
    match newest(path).await? {
        Some(c) => Ok(c),
        None => Err(Error::Checkpoint {
            url: path.url().to_string(),
            msg: "neither a checkpoint (no meta.json) nor a run directory with a valid checkpoint"
                .into(),
        }),
    }
}

/// Delete all but the newest `keep` checkpoints, and those whose step is a multiple of
/// `keep_every` (0: none kept that way).
pub async fn prune(run: &Location, keep: usize, keep_every: u64) -> Result<()> {
    for (step, dir) in list(run).await?.into_iter().skip(keep) {
        if keep_every > 0 && step.is_multiple_of(keep_every) {
            continue;
        }
        // meta.json first: a half-deleted checkpoint must not look valid.
        dir.delete(META).await?;
        // Its local folders go with it where they are left empty.
        if let Some(p) = dir.parent() {
            p.delete_all(&dir.name()).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pruning_a_local_run_leaves_no_empty_folders() {
        let tmp = tempfile::tempdir().unwrap();
        let run = Location::parse(tmp.path().to_str().unwrap()).unwrap();
        for step in [100u64, 200, 300, 400, 500] {
            let dir = run.join("checkpoints").join(&dir_name(step));
            dir.put(META, Bytes::from_static(b"{}")).await.unwrap();
            dir.put("sub/model.bin", Bytes::from_static(b"x"))
                .await
                .unwrap();
        }
        // Keep the newest two and every multiple of 200.
        prune(&run, 2, 200).await.unwrap();
        let mut left: Vec<String> = std::fs::read_dir(tmp.path().join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [dir_name(200), dir_name(400), dir_name(500)]);
        let kept = tmp.path().join("checkpoints").join(dir_name(200));
        assert!(kept.join("sub/model.bin").is_file());
    }
}
