//! Helpers the binary-level tests share: run `lightrnn`, a structured corpus (also as
//! gzipped JSON lines), a dataset's objects, a JSON line, a test PKI made with openssl;
//! hosts as network namespaces (`netns`).
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

pub mod netns;

/// Run the binary; (exit code, stdout, stderr).
pub fn lightrnn(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lightrnn"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A small corpus with structure (fixed word cycles), split three ways.
pub fn corpus(dir: &Path, lines: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let words: Vec<String> = (0..40).map(|i| format!("w{i}")).collect();
    let mut x = 12345u64;
    let all: Vec<String> = (0..lines)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let start = (x >> 33) as usize % words.len();
            let len = 3 + (x >> 45) as usize % 8;
            (0..len)
                .map(|k| words[(start + 3 * k) % words.len()].as_str())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let (a, b) = (lines * 8 / 10, lines * 9 / 10);
    for (name, part) in [
        ("d.train.txt", &all[..a]),
        ("d.valid.txt", &all[a..b]),
        ("d.test.txt", &all[b..]),
    ] {
        std::fs::write(dir.join(name), part.join("\n") + "\n").unwrap();
    }
}

/// `files` gzipped JSON-lines documents (C4's layout: `{"text", "timestamp", "url"}`, a
/// document of several lines per record) in `dir`, named `prefix.NNNNN-of-MMMMM.json.gz`,
/// of different sizes; gzip is Debian's, as a corpus's publisher would run it.
pub fn jsonl_gz_corpus(dir: &Path, prefix: &str, files: usize, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let mut x = seed;
    for f in 0..files {
        let mut body = String::new();
        for d in 0..20 + 35 * f {
            let lines: Vec<String> = (0..1 + d % 3)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (0..3 + (x >> 60) as usize)
                        .map(|k| format!("w{}", ((x >> 33) as usize + 7 * k) % 50))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect();
            let rec = serde_json::json!({
                "text": lines.join("\n"),
                "timestamp": "2019-04-25T12:57:54Z",
                "url": format!("https://example.com/{f}/{d}"),
            });
            body.push_str(&rec.to_string());
            body.push('\n');
        }
        let path = dir.join(format!("{prefix}.{f:05}-of-{files:05}.json"));
        std::fs::write(&path, body).unwrap();
        gzip_file(&path);
    }
}

/// `path` gzipped in place (to `path.gz`) by Debian's gzip, as a publisher would.
pub fn gzip_file(path: &Path) {
    let o = Command::new("gzip").arg("-nf").arg(path).output().unwrap();
    assert!(
        o.status.success(),
        "gzip: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Two dataset folders hold the same objects, byte for byte (`parts/` aside), with all
/// three splits.
pub fn assert_same_dataset(got: &Path, want: &Path) {
    let (got, want) = (dataset_files(got), dataset_files(want));
    for split in ["train", "valid", "test"] {
        assert!(
            want.contains_key(&format!("{split}.manifest.json")),
            "no {split} split"
        );
    }
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (name, bytes) in &want {
        assert!(
            got[name] == *bytes,
            "{name} differs from the one-process dataset's"
        );
    }
}

/// Every object of a dataset folder (relative names, bytes), its `parts/` aside.
fn dataset_files(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut std::collections::BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().to_string();
            if p.is_dir() {
                if rel != "parts" {
                    walk(root, &p, out);
                }
            } else {
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

pub fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Runs openssl (the CLI) in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let o = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command line tool (to make test certificates)");
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A CA, a server certificate for the subject alternative names `san` (e.g.
/// "DNS:localhost,IP:127.0.0.1") and a client certificate signed by it, and a rogue client
/// certificate signed by another CA.
pub fn pki(dir: &Path, san: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for ca in ["ca", "rogue-ca"] {
        let mut a = vec!["req", "-x509"];
        a.extend_from_slice(&ec);
        let (key, pem, subj) = (
            format!("{ca}.key"),
            format!("{ca}.pem"),
            format!("/CN={ca}"),
        );
        a.extend_from_slice(&["-keyout", &key, "-out", &pem, "-days", "2", "-subj", &subj]);
        openssl(dir, &a);
    }
    std::fs::write(
        dir.join("server.ext"),
        format!("subjectAltName={san}\nextendedKeyUsage=serverAuth\n"),
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, ca, ext) in [
        ("server", "ca", "server.ext"),
        ("client", "ca", "client.ext"),
        ("rogue", "rogue-ca", "client.ext"),
    ] {
        let (key, csr, pem) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        let subj = format!("/CN={name}");
        let mut a = vec!["req"];
        a.extend_from_slice(&ec);
        a.extend_from_slice(&["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(dir, &a);
        let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_pem,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                ext,
            ],
        );
    }
}
