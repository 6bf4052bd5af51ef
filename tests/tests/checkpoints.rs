//! Checkpoints as hostile input: torn checkpoints (manifest missing, object truncated,
//! checksum wrong) are skipped with a warning and the previous one is used; objects with
//! random and truncated bytes (their manifest entries fixed up so the bytes reach the
//! parsers) load as errors, never panics; manifests are committed create-only.

use clap::Parser;
use sha2::{Digest, Sha256};

use lightrnn_coordinator::cli::{Cli, run};
use lightrnn_core::checkpoint;
use lightrnn_core::data::store::Location;
use lightrnn_kernels::rng::{Philox, Purpose};
use lightrnn_tests::{runtime, write_corpus};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Rewrite `name` in checkpoint `dir` with `bytes`, and its manifest entry to match.
fn replace_object(dir: &std::path::Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).unwrap();
    let meta_path = dir.join("meta.json");
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    for f in meta["files"].as_array_mut().unwrap() {
        if f["name"] == name {
            f["bytes"] = bytes.len().into();
            f["sha256"] = hex(&Sha256::digest(bytes)).into();
        }
    }
    std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn torn_and_hostile_checkpoints_are_errors_or_skipped_never_panics() {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_corpus(&data, 5, 600);
    let run_dir = tmp.path().join("run");
    let args = [
        "lightrnn",
        "train",
        "--preset",
        "tiny",
        "--set",
        "max_steps=12",
        "--set",
        "checkpoint_every=6",
        "--set",
        "optimizer=adam",
        "--set",
        "lr=0.01",
        "--data",
        data.to_str().unwrap(),
        "--out",
        run_dir.to_str().unwrap(),
    ];
    let c = Cli::try_parse_from(args).unwrap();
    run(&c, rt.handle(), &Default::default()).unwrap();
    let ckdir = run_dir.join("checkpoints");
    let good = ckdir.join(checkpoint::dir_name(12));
    assert!(good.join("meta.json").exists());
    let run_loc = Location::parse(run_dir.to_str().unwrap()).unwrap();

    // Torn checkpoints newer than the good one: each is skipped, step 12 is used.
    type Tear = fn(&std::path::Path);
    let torn: [(&str, Tear); 3] = [
        ("manifest missing", |d| {
            std::fs::remove_file(d.join("meta.json")).unwrap()
        }),
        ("object truncated", |d| {
            let b = std::fs::read(d.join("model.safetensors")).unwrap();
            std::fs::write(d.join("model.safetensors"), &b[..b.len() / 2]).unwrap();
        }),
        ("checksum wrong", |d| {
            let mut b = std::fs::read(d.join("model.safetensors")).unwrap();
            let k = b.len() - 3;
            b[k] ^= 0x5a;
            std::fs::write(d.join("model.safetensors"), &b).unwrap();
        }),
    ];
    for (i, (what, tear)) in torn.iter().enumerate() {
        let d = ckdir.join(checkpoint::dir_name(100 + i as u64));
        copy_dir(&good, &d);
        tear(&d);
        let loc = Location::parse(d.to_str().unwrap()).unwrap();
        assert!(rt.block_on(checkpoint::load(&loc)).is_err(), "{what}");
    }
    let newest = rt.block_on(checkpoint::newest(&run_loc)).unwrap().unwrap();
    assert_eq!(newest.meta.step, 12);

    // Hostile bytes behind a manifest that vouches for them: truncations and random
    // flips of every object reach the parsers, which must return errors, not panic.
    let names = [
        "meta.json",
        "model.safetensors",
        "optimizer.safetensors",
        "state.safetensors",
        "vocab.txt",
    ];
    let mut rng = Philox::new(77, Purpose::Other).stream(0);
    let hostile = ckdir.join("hostile");
    let loc = Location::parse(hostile.to_str().unwrap()).unwrap();
    let mut refused = 0;
    for name in names {
        let orig = std::fs::read(good.join(name)).unwrap();
        for trial in 0..24 {
            let _ = std::fs::remove_dir_all(&hostile);
            copy_dir(&good, &hostile);
            let mut b = orig.clone();
            if trial % 2 == 0 {
                b.truncate(rng.below(b.len() as u64 + 1) as usize);
            } else {
                for _ in 0..1 + rng.below(8) {
                    let k = rng.below(b.len() as u64) as usize;
                    b[k] = rng.below(256) as u8;
                }
            }
            if name == "meta.json" {
                std::fs::write(hostile.join(name), &b).unwrap();
            } else {
                replace_object(&hostile, name, &b);
            }
            if rt.block_on(checkpoint::load(&loc)).is_err() {
                refused += 1;
            }
        }
    }
    // Most damage is detected (a flipped digit in a float may still parse).
    assert!(
        refused > 60,
        "only {refused} of 120 damaged checkpoints refused"
    );

    // Manifests are committed create-only: the same step's again is accepted (a replayed
    // step), another step's manifest over it is refused.
    let loc = Location::parse(good.to_str().unwrap()).unwrap();
    let ck = rt.block_on(checkpoint::load(&loc)).unwrap();
    rt.block_on(checkpoint::commit(&loc, &ck.meta, true))
        .unwrap();
    let mut other = ck.meta.clone();
    other.step = 13;
    assert!(rt.block_on(checkpoint::commit(&loc, &other, true)).is_err());
    let again = rt.block_on(checkpoint::load(&loc)).unwrap();
    assert_eq!(again.meta.step, 12);
}

/// The same model is the same bytes: two identical runs write byte-identical checkpoint
/// objects (a rank that rewrites a committed step, or a replayed step, cannot make its
/// manifest's checksums wrong).
#[test]
fn identical_runs_write_byte_identical_checkpoints() {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_corpus(&data, 6, 300);
    let mut dirs = Vec::new();
    for k in 0..2 {
        let run_dir = tmp.path().join(format!("run{k}"));
        let args = [
            "lightrnn",
            "train",
            "--preset",
            "tiny",
            "--set",
            "max_steps=8",
            "--set",
            "optimizer=adam",
            "--set",
            "lr=0.01",
            "--data",
            data.to_str().unwrap(),
            "--out",
            run_dir.to_str().unwrap(),
        ];
        let c = Cli::try_parse_from(args).unwrap();
        run(&c, rt.handle(), &Default::default()).unwrap();
        dirs.push(run_dir.join("checkpoints").join(checkpoint::dir_name(8)));
    }
    for name in [
        "model.safetensors",
        "optimizer.safetensors",
        "state.safetensors",
        "vocab.txt",
    ] {
        let (a, b) = (
            std::fs::read(dirs[0].join(name)).unwrap(),
            std::fs::read(dirs[1].join(name)).unwrap(),
        );
        assert!(a == b, "{name} differs between identical runs");
    }
}

/// A manifest that lies about its numbers (step, epoch, cursor, vocabulary size, counts)
/// is refused on `--resume` with the file and the field named; the honest one resumes.
#[test]
fn a_manifest_that_lies_is_refused_on_resume_naming_the_field() {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_corpus(&data, 6, 600);
    let run_dir = tmp.path().join("run");
    let args = |steps: &str, resume: bool| {
        let mut a: Vec<String> = [
            "lightrnn",
            "train",
            "--preset",
            "tiny",
            "--set",
            steps,
            "--set",
            "checkpoint_every=6",
            "--data",
            data.to_str().unwrap(),
            "--out",
            run_dir.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if resume {
            a.push("--resume".into());
        }
        a
    };
    let c = Cli::try_parse_from(args("max_steps=6", false)).unwrap();
    run(&c, rt.handle(), &Default::default()).unwrap();
    let good = run_dir.join("checkpoints").join(checkpoint::dir_name(6));
    let meta_path = good.join("meta.json");
    let honest = std::fs::read(&meta_path).unwrap();
    let lies: [(&str, serde_json::Value); 7] = [
        ("step", u64::MAX.into()),
        ("step", 7.into()),
        ("cursor", (1u64 << 40).into()),
        ("epoch", 1_000_000.into()),
        ("vocab_size", 3.into()),
        ("optimizer_updates", 1_000.into()),
        ("lr", (-1.0).into()),
    ];
    for (field, value) in lies {
        let mut meta: serde_json::Value = serde_json::from_slice(&honest).unwrap();
        meta[field] = value.clone();
        std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
        let c = Cli::try_parse_from(args("max_steps=12", true)).unwrap();
        let e = run(&c, rt.handle(), &Default::default())
            .err()
            .unwrap_or_else(|| panic!("{field} = {value} was believed"))
            .to_string();
        assert!(
            e.contains("meta.json") && e.contains(field) && e.contains("step-000000000006"),
            "{field} = {value}: {e}"
        );
    }
    std::fs::write(&meta_path, &honest).unwrap();
    let c = Cli::try_parse_from(args("max_steps=12", true)).unwrap();
    let out = run(&c, rt.handle(), &Default::default()).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["steps"], 12, "{out}");
}
