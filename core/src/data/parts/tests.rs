use super::*;
use crate::data::corpus::{build_vocab, expand_inputs};

fn input(name: &str, size: u64) -> Input {
    Input {
        loc: Location::parse("memory://parts-tests/x").unwrap(),
        name: name.into(),
        size,
        e_tag: None,
    }
}

#[test]
fn shares_are_contiguous_balanced_by_bytes_and_cover_every_input() {
    let sizes = [5u64, 100, 3, 3, 50, 50, 1, 0, 200, 7];
    let inputs: Vec<Input> = sizes
        .iter()
        .enumerate()
        .map(|(i, &s)| input(&format!("{i}"), s))
        .collect();
    for of in 1..=12 {
        let mut next = 0;
        let mut biggest = 0u64;
        for index in 0..of {
            let r = Part { index, of }.share(&inputs);
            assert_eq!(r.start, next, "{index}/{of}: contiguous");
            next = r.end;
            biggest = biggest.max(inputs[r].iter().map(|i| i.size).sum());
        }
        assert_eq!(next, inputs.len(), "/{of}: every input");
        // No share is more than an even share plus one input.
        let total: u64 = sizes.iter().sum();
        assert!(biggest <= total / of as u64 + 200, "/{of}: {biggest}");
    }
    assert_eq!("3/8".parse::<Part>().unwrap(), Part { index: 3, of: 8 });
    for bad in ["8/8", "1", "a/2", "0/0"] {
        assert!(bad.parse::<Part>().is_err(), "{bad}");
    }
}

async fn corpus(src: &Location) -> Vec<Input> {
    for k in 0..9 {
        let text: String = (0..400 + 300 * k)
            .map(|l| format!("w{} w{} shared word{}\n", k, l % 11, l % 3))
            .collect();
        let name = format!("part-{k}.txt{}", if k % 2 == 1 { ".gz" } else { "" });
        let body = if k % 2 == 1 {
            crate::data::formats::tests::gzip(text.as_bytes())
        } else {
            text.into_bytes()
        };
        src.put(&name, Bytes::from(body)).await.unwrap();
    }
    expand_inputs(&[src.to_string()]).await.unwrap()
}

/// Every object below `loc` (names and bytes), parts aside.
async fn objects(loc: &Location) -> Vec<(String, Bytes)> {
    let mut out = Vec::new();
    for (name, _) in loc.list_recursive().await.unwrap() {
        if !name.starts_with("parts/") {
            out.push((name.clone(), loc.get(&name).await.unwrap()));
        }
    }
    out
}

/// Split "train" of `out`, shards as small as they go.
fn split(out: &Location) -> SplitOut<'_> {
    SplitOut {
        out,
        split: "train",
        shard_tokens: 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_merged_are_the_one_process_dataset() {
    let src = Location::parse("memory://parts-tests/src").unwrap();
    let inputs = corpus(&src).await;
    let opts = TextOptions::default();
    let options = serde_json::json!({"shard_tokens": 1024});
    let one = Location::parse("memory://parts-tests/one").unwrap();
    let (vocab, counted) = build_vocab(&inputs, &one, &opts, 20, 2, false)
        .await
        .unwrap();
    write_shards(
        &inputs,
        Arc::new(vocab),
        split(&one),
        &opts,
        options.clone(),
        2,
        false,
    )
    .await
    .unwrap();
    let expect = objects(&one).await;
    for of in [1, 2, 4, 13] {
        let out = Location::parse(&format!("memory://parts-tests/of-{of}")).unwrap();
        // Parts in any order; one of them run twice (a retried array task).
        for index in (0..of).rev().chain([0]) {
            count_part(&inputs, Part { index, of }, &out, &opts, 2, false)
                .await
                .unwrap();
        }
        // Too early: the shard merge has no parts yet.
        let (vocab, merged) = merge_counts(&inputs, &out, &opts, 20).await.unwrap();
        assert_eq!(
            (merged.tokens, merged.lines, merged.inputs, merged.types),
            (counted.tokens, counted.lines, counted.inputs, counted.types)
        );
        assert_eq!(merged.curve, counted.curve);
        let vocab = Arc::new(vocab);
        let e = merge_shards(&inputs, vocab.clone(), split(&out), options.clone(), false)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("no train.part-I-of-N.manifest.json"), "{e}");
        for index in 0..of {
            let part = Part { index, of };
            shard_part(
                &inputs,
                part,
                vocab.clone(),
                split(&out),
                &opts,
                options.clone(),
                2,
                false,
            )
            .await
            .unwrap();
        }
        let (m, st) = merge_shards(&inputs, vocab.clone(), split(&out), options.clone(), false)
            .await
            .unwrap();
        assert_eq!(st.tokens, counted.tokens);
        assert_eq!(m.sources.len(), inputs.len());
        assert!(m.shards.len() >= 5, "{} shards", m.shards.len());
        assert_eq!(objects(&out).await, expect, "{of} parts");
        // The merged split's parts are gone; the counts stay for another vocabulary.
        let left = out.join(PARTS_DIR).list_recursive().await.unwrap();
        assert!(
            left.iter()
                .all(|(n, _)| n.starts_with("vocab.") || n == "vocab.txt"),
            "{left:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_refuses_missing_parts_and_other_inputs() {
    let src = Location::parse("memory://parts-tests/src2").unwrap();
    let inputs = corpus(&src).await;
    let opts = TextOptions::default();
    let out = Location::parse("memory://parts-tests/refuse").unwrap();
    for index in [0, 2] {
        count_part(&inputs, Part { index, of: 4 }, &out, &opts, 2, false)
            .await
            .unwrap();
    }
    let e = merge_counts(&inputs, &out, &opts, 0)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("parts 1, 3 of 4 are missing"), "{e}");
    for index in [1, 3] {
        count_part(&inputs, Part { index, of: 4 }, &out, &opts, 2, false)
            .await
            .unwrap();
    }
    // Other inputs (one left out), other text options: refused.
    let e = merge_counts(&inputs[1..], &out, &opts, 0)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("other inputs or text options"), "{e}");
    let lower = TextOptions {
        lowercase: true,
        ..Default::default()
    };
    let e = merge_counts(&inputs, &out, &lower, 0)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("other inputs or text options"), "{e}");
    // A stale run of another part count beside them.
    count_part(&inputs, Part { index: 0, of: 3 }, &out, &opts, 2, false)
        .await
        .unwrap();
    let e = merge_counts(&inputs, &out, &opts, 0)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("delete the stale ones"), "{e}");
}
