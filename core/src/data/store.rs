//! Locations in object storage. Every byte the trainer reads or writes goes through
//! `object_store`: a local directory is a `LocalFileSystem` location, `memory://NAME/...`
//! a process-wide in-memory store (tests, scratch data), `s3://`, `gs://` and `az://`
//! the clouds' stores (and S3-compatible servers through AWS_ENDPOINT_URL).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::{Error, Result};

/// A store and a prefix inside it ("a directory").
#[derive(Clone)]
pub struct Location {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    /// What the user wrote (normalised), for messages.
    url: String,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

fn memory_store(bucket: &str) -> Arc<dyn ObjectStore> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();
    let map = STORES.get_or_init(Default::default);
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    map.entry(bucket.to_string())
        .or_insert_with(|| Arc::new(InMemory::new()))
        .clone()
}

/// One client per scheme and bucket, configured from the environment (the standard
/// variables of each cloud: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
/// AWS_REGION, AWS_ALLOW_HTTP ...; GOOGLE_SERVICE_ACCOUNT ...; AZURE_STORAGE_ACCOUNT_NAME,
/// AZURE_STORAGE_ACCOUNT_KEY ...), shared by every location in that bucket.
fn cloud_store(scheme: &str, bucket: &str) -> Result<Arc<dyn ObjectStore>> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<dyn ObjectStore>>>> = OnceLock::new();
    let map = STORES.get_or_init(Default::default);
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    let url = format!("{scheme}://{bucket}");
    if let Some(s) = map.get(&url) {
        return Ok(s.clone());
    }
    let err = |e: object_store::Error| {
        Error::Config(format!(
            "{url}: cannot configure the object store client: {e}"
        ))
    };
    let store: Arc<dyn ObjectStore> = match scheme {
        "s3" | "s3a" => Arc::new(
            object_store::aws::AmazonS3Builder::from_env()
                .with_url(url.clone())
                .build()
                .map_err(err)?,
        ),
        "gs" => Arc::new(
            object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_url(url.clone())
                .build()
                .map_err(err)?,
        ),
        _ => Arc::new(
            object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_url(url.clone())
                .build()
                .map_err(err)?,
        ),
    };
    map.insert(url, store.clone());
    Ok(store)
}

impl Location {
    /// Parse a local path (absolute or relative to the working directory), a `file://` URL,
    /// a `memory://BUCKET/PREFIX` URL, or a cloud URL: `s3://BUCKET/PREFIX`, `gs://...`,
    /// `az://CONTAINER/PREFIX` (clients configured from the environment).
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |m: String| Error::Config(m);
        if let Some((scheme, rest)) = s.split_once("://") {
            match scheme {
                "file" => {
                    let url = url::Url::parse(s).map_err(|e| bad(format!("{s}: {e}")))?;
                    let p = url
                        .to_file_path()
                        .map_err(|_| bad(format!("{s}: not a local file URL")))?;
                    Self::local(&p)
                }
                "memory" => {
                    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                    let prefix = Path::parse(prefix.trim_end_matches('/'))
                        .map_err(|e| bad(format!("{s}: {e}")))?;
                    Ok(Self {
                        store: memory_store(bucket),
                        prefix,
                        url: s.trim_end_matches('/').to_string(),
                    })
                }
                "s3" | "s3a" | "gs" | "az" | "abfs" | "abfss" => {
                    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                    if bucket.is_empty() {
                        return Err(bad(format!("{s}: no bucket or container")));
                    }
                    let prefix = Path::parse(prefix.trim_end_matches('/'))
                        .map_err(|e| bad(format!("{s}: {e}")))?;
                    Ok(Self {
                        store: cloud_store(scheme, bucket)?,
                        prefix,
                        url: s.trim_end_matches('/').to_string(),
                    })
                }
                other => Err(bad(format!("{s}: unknown storage scheme {other:?}"))),
            }
        } else {
            Self::local(std::path::Path::new(s))
        }
    }

    fn local(p: &std::path::Path) -> Result<Self> {
        let abs = if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir()
                .map_err(|e| Error::Config(format!("cannot resolve {}: {e}", p.display())))?
                .join(p)
        };
        // Normalise "." and ".." without touching the filesystem (the directory may not exist yet).
        let mut norm = std::path::PathBuf::new();
        for c in abs.components() {
            match c {
                std::path::Component::ParentDir => {
                    norm.pop();
                }
                std::path::Component::CurDir => {}
                other => norm.push(other),
            }
        }
        let prefix = Path::from_absolute_path(&norm)
            .map_err(|e| Error::Config(format!("{}: {e}", norm.display())))?;
        Ok(Self {
            store: Arc::new(LocalFileSystem::new()),
            prefix,
            url: norm.display().to_string(),
        })
    }

    /// The location `name` below this one.
    pub fn join(&self, name: &str) -> Location {
        let mut prefix = self.prefix.clone();
        for part in name.split('/').filter(|p| !p.is_empty()) {
            prefix = prefix.clone().join(part);
        }
        Location {
            store: self.store.clone(),
            prefix,
            url: format!("{}/{}", self.url, name.trim_matches('/')),
        }
    }

    /// The last path segment ("directory name").
    pub fn name(&self) -> String {
        self.prefix.filename().unwrap_or("").to_string()
    }

    /// The parent location, if any.
    pub fn parent(&self) -> Option<Location> {
        let parts: Vec<_> = self.prefix.parts().collect();
        if parts.is_empty() {
            return None;
        }
        let prefix = Path::from_iter(parts[..parts.len() - 1].iter().cloned());
        let url = self
            .url
            .rsplit_once('/')
            .map(|(a, _)| a.to_string())
            .unwrap_or_default();
        Some(Location {
            store: self.store.clone(),
            prefix,
            url,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The local directory this location names, when it is on the local filesystem.
    pub fn local_path(&self) -> Option<std::path::PathBuf> {
        self.url.starts_with('/').then(|| self.url.clone().into())
    }

    /// URL of object `name` here, for messages.
    pub fn url_of(&self, name: &str) -> String {
        format!("{}/{}", self.url, name)
    }

    fn path(&self, name: &str) -> Path {
        self.join(name).prefix
    }

    fn err(&self, action: &'static str, name: &str, e: object_store::Error) -> Error {
        match e {
            object_store::Error::NotFound { .. } => Error::NotFound(self.url_of(name)),
            source => Error::Store {
                action,
                url: self.url_of(name),
                source,
            },
        }
    }

    /// The whole object `name`.
    pub async fn get(&self, name: &str) -> Result<Bytes> {
        let r = self
            .store
            .get(&self.path(name))
            .await
            .map_err(|e| self.err("reading", name, e))?;
        r.bytes().await.map_err(|e| self.err("reading", name, e))
    }

    /// Bytes `range` of object `name`.
    pub async fn get_range(&self, name: &str, range: Range<u64>) -> Result<Bytes> {
        self.store
            .get_range(&self.path(name), range)
            .await
            .map_err(|e| self.err("reading", name, e))
    }

    /// Object `name` as a stream of chunks (never buffered whole).
    pub async fn stream(&self, name: &str) -> Result<BoxStream<'static, Result<Bytes>>> {
        self.stream_version(name, None).await
    }

    /// Object `name` as a stream of chunks, only if its version is still `e_tag` (when
    /// given): an object replaced since it was listed is refused, not read half old, half
    /// new.
    pub async fn stream_version(
        &self,
        name: &str,
        e_tag: Option<&str>,
    ) -> Result<BoxStream<'static, Result<Bytes>>> {
        let opts = object_store::GetOptions {
            if_match: e_tag.map(str::to_string),
            ..Default::default()
        };
        let r = self.get_version(name, e_tag, opts).await?;
        let url = self.url_of(name);
        if let object_store::GetResultPayload::File(file, _) = r.payload {
            return Ok(file_chunks(file, r.range, url));
        }
        Ok(r.into_stream()
            .map(move |c| {
                c.map_err(|source| Error::Store {
                    action: "reading",
                    url: url.clone(),
                    source,
                })
            })
            .boxed())
    }

    /// Bytes `range` of object `name`, only if its version is still `e_tag` (when given).
    pub async fn get_range_version(
        &self,
        name: &str,
        range: Range<u64>,
        e_tag: Option<&str>,
    ) -> Result<Bytes> {
        let opts = object_store::GetOptions {
            if_match: e_tag.map(str::to_string),
            range: Some(object_store::GetRange::Bounded(range)),
            ..Default::default()
        };
        let r = self.get_version(name, e_tag, opts).await?;
        r.bytes().await.map_err(|e| self.err("reading", name, e))
    }

    async fn get_version(
        &self,
        name: &str,
        e_tag: Option<&str>,
        opts: object_store::GetOptions,
    ) -> Result<object_store::GetResult> {
        match self.store.get_opts(&self.path(name), opts).await {
            Ok(r) => Ok(r),
            Err(object_store::Error::Precondition { .. }) => Err(Error::Data(format!(
                "{} changed after it was listed (version {} is gone): the input must not change while a job reads it",
                self.url_of(name),
                e_tag.unwrap_or("?")
            ))),
            Err(e) => Err(self.err("reading", name, e)),
        }
    }

    /// Size and version of object `name`, or None when it does not exist.
    pub async fn head(&self, name: &str) -> Result<Option<ObjectMeta>> {
        match self.store.head(&self.path(name)).await {
            Ok(m) => Ok(Some(m)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("inspecting", name, e)),
        }
    }

    /// Write object `name` atomically (replacing any old one).
    pub async fn put(&self, name: &str, data: Bytes) -> Result<()> {
        self.store
            .put(&self.path(name), PutPayload::from(data))
            .await
            .map_err(|e| self.err("writing", name, e))?;
        Ok(())
    }

    /// Write object `name` only if it does not exist yet; Ok(false) when it does.
    pub async fn put_new(&self, name: &str, data: Bytes) -> Result<bool> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&self.path(name), PutPayload::from(data), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.err("writing", name, e)),
        }
    }

    pub async fn delete(&self, name: &str) -> Result<()> {
        match self.store.delete(&self.path(name)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("deleting", name, e)),
        }
    }

    /// Delete every object below `name`; in a local directory, its folders too where
    /// they are left empty.
    pub async fn delete_all(&self, name: &str) -> Result<()> {
        let sub = self.join(name);
        let items = sub.list_recursive().await?;
        for (rel, _) in items {
            sub.delete(&rel).await?;
        }
        if let Some(path) = sub.local_path() {
            remove_empty_dirs(&path);
        }
        Ok(())
    }

    /// The objects directly inside this location (names relative to it) and the
    /// sub-directories, sorted.
    pub async fn list(&self) -> Result<(Vec<(String, ObjectMeta)>, Vec<String>)> {
        let res = self
            .store
            .list_with_delimiter(Some(&self.prefix))
            .await
            .map_err(|e| self.err("listing", "", e))?;
        let rel = |p: &Path| p.filename().unwrap_or("").to_string();
        let mut objects: Vec<_> = res
            .objects
            .into_iter()
            .map(|m| (rel(&m.location), m))
            .collect();
        objects.sort_by(|a, b| a.0.cmp(&b.0));
        let mut dirs: Vec<_> = res.common_prefixes.iter().map(rel).collect();
        dirs.sort();
        Ok((objects, dirs))
    }

    /// Every object below this location, with paths relative to it.
    pub async fn list_recursive(&self) -> Result<Vec<(String, ObjectMeta)>> {
        let mut s = self.store.list(Some(&self.prefix));
        let mut out = Vec::new();
        let skip = self.prefix.parts().count();
        while let Some(m) = s.next().await {
            let m = m.map_err(|e| self.err("listing", "", e))?;
            let rel: Vec<String> = m
                .location
                .parts()
                .skip(skip)
                .map(|p| p.as_ref().to_string())
                .collect();
            out.push((rel.join("/"), m));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

/// Bytes read from a local file per chunk. object_store's own file stream reads 8 KiB
/// per blocking task, which caps a text pass near 150 MB/s; 1 MiB chunks lift the cap.
const FILE_CHUNK: u64 = 1 << 20;

/// The bytes `range` of an open local file as a stream of chunks, each read on the
/// blocking pool. A file that ends early (cut short while being read) is an error, not a
/// silent end.
fn file_chunks(
    file: std::fs::File,
    range: Range<u64>,
    url: String,
) -> BoxStream<'static, Result<Bytes>> {
    use std::io::{Read, Seek, SeekFrom};
    let file = Arc::new(Mutex::new(file));
    futures::stream::try_unfold(range.start, move |at| {
        let (file, url, end) = (file.clone(), url.clone(), range.end);
        async move {
            if at >= end {
                return Ok(None);
            }
            let want = (end - at).min(FILE_CHUNK) as usize;
            let read = tokio::task::spawn_blocking(move || {
                let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
                f.seek(SeekFrom::Start(at))?;
                let mut buf = vec![0u8; want];
                let mut got = 0;
                while got < want {
                    match f.read(&mut buf[got..])? {
                        0 => break,
                        n => got += n,
                    }
                }
                buf.truncate(got);
                Ok::<_, std::io::Error>(buf)
            })
            .await
            .map_err(|e| Error::Task(format!("reading {url}: {e}")))?
            .map_err(|e| Error::Io(format!("reading {url}: {e}")))?;
            if read.is_empty() {
                return Err(Error::Data(format!(
                    "{url} changed while it was read: it ends at byte {at}, {end} were listed"
                )));
            }
            let next = at + read.len() as u64;
            Ok(Some((Bytes::from(read), next)))
        }
    })
    .boxed()
}

/// Split "dir/name" (a path or URL) into its location and object name.
pub fn split_object(s: &str) -> Result<(Location, String)> {
    let (dir, name) = s.rsplit_once('/').unwrap_or((".", s));
    if name.is_empty() {
        return Err(Error::Config(format!("{s}: names a directory, not a file")));
    }
    let dir = if dir.is_empty() { "/" } else { dir };
    Ok((Location::parse(dir)?, name.to_string()))
}

/// Remove `path` and the folders below it, bottom up, where they are empty; whatever
/// holds a file stays (best effort: a folder another process writes into is kept).
fn remove_empty_dirs(path: &std::path::Path) {
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_dirs(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(path);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_locations_are_shared_by_name() {
        let a = Location::parse("memory://store-test/run").unwrap();
        a.put("x/y.txt", Bytes::from_static(b"hi")).await.unwrap();
        let b = Location::parse("memory://store-test/run/x").unwrap();
        assert_eq!(&b.get("y.txt").await.unwrap()[..], b"hi");
        assert!(matches!(b.get("nope").await, Err(Error::NotFound(_))));
        assert!(
            !b.put_new("y.txt", Bytes::from_static(b"again"))
                .await
                .unwrap()
        );
        let (objs, dirs) = a.list().await.unwrap();
        assert!(objs.is_empty());
        assert_eq!(dirs, vec!["x".to_string()]);
        a.delete_all("x").await.unwrap();
        assert!(b.head("y.txt").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn local_paths_and_file_urls() {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::parse(dir.path().to_str().unwrap()).unwrap();
        loc.put("a/b.bin", Bytes::from_static(b"0123456789"))
            .await
            .unwrap();
        let url = format!("file://{}/a", dir.path().display());
        let sub = Location::parse(&url).unwrap();
        assert_eq!(&sub.get_range("b.bin", 2..5).await.unwrap()[..], b"234");
        assert_eq!(sub.head("b.bin").await.unwrap().unwrap().size, 10);
        assert_eq!(sub.parent().unwrap().url(), loc.url());
        assert!(Location::parse("s3:///x").is_err());
        assert!(Location::parse("ftp://x/y").is_err());
        // Deleting all below a folder takes its emptied folders too, not its parent.
        loc.put("a/c/d.bin", Bytes::from_static(b"x"))
            .await
            .unwrap();
        loc.delete_all("a").await.unwrap();
        assert!(!dir.path().join("a").exists());
        assert!(dir.path().exists());
    }
}
