//! Shards and their manifests are hostile input: truncated and bit-flipped bytes of the
//! manifest or of a shard are refused at open or at read, never a panic, and whatever
//! is read is exactly what was written.

use std::collections::HashMap;

use bytes::Bytes;
use lightrnn_core::data::shards::{Manifest, ShardWriter, SplitReader};
use lightrnn_core::data::store::Location;
use lightrnn_core::data::vocab::Vocab;
use lightrnn_kernels::rng::{Philox, Purpose};

fn vocab(n: usize) -> Vocab {
    let mut c: HashMap<String, u64> = (0..n - 2)
        .map(|i| (format!("w{i}"), 10 + i as u64))
        .collect();
    c.insert("<eos>".into(), 1);
    Vocab::build(c, 0).unwrap()
}

#[tokio::test]
async fn hostile_shard_bytes_are_refused_and_never_misread() {
    let good = Location::parse("memory://hostile-shards/good").unwrap();
    let v = vocab(300);
    let ids: Vec<u32> = (0..70_000u32).map(|i| (i * 31 + i / 7) % 300).collect();
    let mut w = ShardWriter::new(&good, "train", &v, 32_768);
    w.extend(&ids).await.unwrap();
    let m = w.finish(vec![], serde_json::json!({})).await.unwrap();
    assert_eq!(m.shards.len(), 3);
    let mut names = vec![Manifest::object_name("train")];
    names.extend(m.shards.iter().map(|s| s.name.clone()));
    let originals: Vec<Bytes> = {
        let mut o = Vec::new();
        for n in &names {
            o.push(good.get(n).await.unwrap());
        }
        o
    };

    let mut rng = Philox::new(91, Purpose::Other).stream(0);
    let (mut refused, mut read_back) = (0, 0);
    for trial in 0..240u64 {
        let loc = Location::parse(&format!("memory://hostile-shards/t{trial}")).unwrap();
        for (n, b) in names.iter().zip(&originals) {
            loc.put(n, b.clone()).await.unwrap();
        }
        let k = (trial % names.len() as u64) as usize;
        let mut b = originals[k].to_vec();
        match trial / names.len() as u64 % 3 {
            0 => b.truncate(rng.below(b.len() as u64 + 1) as usize),
            1 => {
                for _ in 0..1 + rng.below(6) {
                    let at = rng.below(b.len() as u64) as usize;
                    b[at] = rng.below(256) as u8;
                }
            }
            _ => {
                // Same length, random contents (a shard overwritten by something else).
                for x in b.iter_mut() {
                    *x = rng.below(256) as u8;
                }
            }
        }
        loc.put(&names[k], Bytes::from(b)).await.unwrap();
        let outcome = match SplitReader::open(&loc, "train", &v).await {
            Err(_) => None,
            Ok(r) => {
                let (a, z) = (rng.below(ids.len() as u64), ids.len() as u64);
                match r.read(a, z).await {
                    Err(_) => None,
                    Ok(got) => Some((a, got)),
                }
            }
        };
        match outcome {
            None => refused += 1,
            Some((a, got)) => {
                assert_eq!(
                    got,
                    &ids[a as usize..],
                    "trial {trial}: damaged bytes were read"
                );
                read_back += 1;
            }
        }
    }
    // Damage to the tokens is always caught; a flipped byte in the manifest may land in a
    // field that does not change what is read (a source URL) and then the read is exact.
    assert!(
        refused >= 200,
        "only {refused} of 240 damaged splits refused"
    );
    assert!(refused + read_back == 240);
}
