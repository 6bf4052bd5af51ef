use super::*;
use crate::data::dataset::{Dataset, Opened};
use crate::data::formats::tests::gzip;
use bytes::Bytes;

fn opts() -> PrepareOptions {
    opts_with(BLOCK_TOKENS)
}

fn opts_with(shard_tokens: u64) -> PrepareOptions {
    PrepareOptions {
        text: TextOptions::default(),
        vocab_size: 300,
        shard_tokens,
    }
}

/// A text directory: train in 7 files of several formats (~120k tokens, 8 shards of
/// 16,384), valid and test in one and two files.
async fn text_dir(at: &str) -> Location {
    let data = Location::parse(at).unwrap();
    let line =
        |k: usize, l: usize| format!("w{} w{} shared word{} x{}\n", k, l % 13, l % 7, l % 501);
    for k in 0..7 {
        let text: String = (0..2000 + 700 * k).map(|l| line(k, l)).collect();
        let (name, body) = match k % 3 {
            0 => (format!("c{k}.train.txt"), text.into_bytes()),
            1 => (format!("c{k}.train.txt.gz"), gzip(text.as_bytes())),
            _ => {
                let json: String = text
                    .lines()
                    .map(|l| format!("{{\"text\": \"{l}\"}}\n"))
                    .collect();
                (format!("c{k}.train.jsonl"), json.into_bytes())
            }
        };
        data.put(&name, Bytes::from(body)).await.unwrap();
    }
    let valid: String = (0..5000).map(|l| line(9, l)).collect();
    data.put("v.valid.txt", Bytes::from(valid)).await.unwrap();
    for k in 0..2 {
        let test: String = (0..300 + 4000 * k).map(|l| line(20 + k, l)).collect();
        data.put(&format!("t{k}.test.txt"), Bytes::from(test))
            .await
            .unwrap();
    }
    data
}

/// Every object below `loc`, names and bytes.
async fn objects(loc: &Location) -> Vec<(String, Bytes)> {
    let mut out = Vec::new();
    for (name, _) in loc.list_recursive().await.unwrap() {
        out.push((name.clone(), loc.get(&name).await.unwrap()));
    }
    out
}

/// Run `tasks` out of order (last first), the first of them twice, as workers that are
/// replaced or slow would; the results in task order.
async fn run_all(tasks: Vec<Task>) -> Vec<(Task, Done)> {
    let mut done: Vec<Option<Done>> = vec![None; tasks.len()];
    for (i, t) in tasks.iter().enumerate().rev() {
        done[i] = Some(t.run(2, false).await.unwrap());
    }
    if let Some(t) = tasks.first() {
        done[0] = Some(t.run(1, false).await.unwrap());
    }
    tasks.into_iter().zip(done.into_iter().flatten()).collect()
}

async fn plan(data: &Location, dataset: &str, parts: usize) -> Plan {
    plan_with(data, dataset, parts, opts()).await
}

async fn plan_with(data: &Location, dataset: &str, parts: usize, opts: PrepareOptions) -> Plan {
    let Opened::Text(splits) =
        Dataset::open_or_plan(data, &Location::parse(dataset).unwrap(), &opts)
            .await
            .unwrap()
    else {
        panic!("nothing to prepare")
    };
    Plan {
        dataset: Location::parse(dataset).unwrap(),
        opts,
        splits,
        parts,
    }
}

/// The three phases, in any order within each, write the dataset one process writes,
/// byte for byte, and leave no parts: shards of one block and of several (40,000 tokens,
/// not a whole number of blocks, round up to 3), by 1 to 9 parts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workers_tasks_write_the_one_process_dataset() {
    let data = text_dir("memory://cluster-tests/text").await;
    for shard_tokens in [BLOCK_TOKENS, 40_000] {
        let one = Location::parse(&format!("memory://cluster-tests/one-{shard_tokens}")).unwrap();
        Dataset::open_or_prepare(&data, &one, &opts_with(shard_tokens))
            .await
            .unwrap();
        let want = objects(&one).await;
        let shards = want.iter().filter(|(n, _)| n.starts_with("train-")).count();
        assert!(shards >= 3, "{shards} training shards of {shard_tokens}");
        for parts in [1, 2, 3, 5, 9] {
            let what = format!("{parts} parts, shards of {shard_tokens}");
            let at = format!("memory://cluster-tests/by-{parts}-{shard_tokens}");
            let p = plan_with(&data, &at, parts, opts_with(shard_tokens)).await;
            p.clear().await.unwrap();
            let counted = run_all(p.count_tasks()).await;
            let (vocab, figures) = p.vocab(&counted).await.unwrap();
            let sharded = run_all(p.shard_tasks(&counted)).await;
            let stitches = p.stitch_tasks(&sharded);
            if parts > 1 {
                assert!(!stitches.is_empty(), "{what}: no shard shared");
            }
            let stitched = run_all(stitches).await;
            p.commit(&vocab, &sharded, &stitched).await.unwrap();
            let got = objects(&p.dataset).await;
            let names =
                |v: &[(String, Bytes)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
            assert_eq!(names(&got), names(&want), "{what}");
            for ((name, a), (_, b)) in got.iter().zip(&want) {
                assert!(a == b, "{what}: {name} differs");
            }
            let ds = Dataset::open(&p.dataset).await.unwrap();
            assert_eq!(figures.train_tokens, ds.train.tokens());
            assert_eq!(
                figures.tokens,
                ds.train.tokens() + ds.valid.tokens() + ds.test.tokens()
            );
            assert_eq!(figures.vocab_size, vocab.len());
        }
    }
}

/// A part that finds other tokens than its count (its input changed) fails, naming its
/// part; a stitch whose piece is damaged fails, naming the piece; nothing is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_off_its_count_or_a_damaged_piece_is_an_error() {
    let data = text_dir("memory://cluster-tests/bad-text").await;
    let p = plan(&data, "memory://cluster-tests/bad", 3).await;
    p.clear().await.unwrap();
    let counted = run_all(p.count_tasks()).await;
    p.vocab(&counted).await.unwrap();
    let mut tasks = p.shard_tasks(&counted);
    let Task::Shard { tokens, .. } = &mut tasks[1] else {
        panic!("a shard task")
    };
    *tokens -= 1;
    let e = tasks[1].run(2, false).await.unwrap_err().to_string();
    assert!(
        e.contains("train part 1/3") && e.contains("count found"),
        "{e}"
    );
    let Task::Shard { tokens, .. } = &mut tasks[1] else {
        unreachable!()
    };
    *tokens += 2;
    let e = tasks[1].run(2, false).await.unwrap_err().to_string();
    assert!(e.contains("count found"), "{e}");
    let sharded = run_all(p.shard_tasks(&counted)).await;
    let stitches = p.stitch_tasks(&sharded);
    let Task::Stitch { pieces, .. } = &stitches[0] else {
        panic!("a stitch task")
    };
    let parts = p.dataset.join(PARTS_DIR);
    let name = pieces[0].name.clone();
    let mut body = parts.get(&name).await.unwrap().to_vec();
    body[5] ^= 1;
    parts.put(&name, Bytes::from(body)).await.unwrap();
    let e = stitches[0].run(1, false).await.unwrap_err().to_string();
    assert!(e.contains(&name) && e.contains("CRC-32C"), "{e}");
    assert!(!Dataset::is_prepared(&p.dataset).await.unwrap());
}

/// A task or result too large for a control message travels as an object below
/// `parts/` and reads back whole; a stored result outside `parts/` is refused.
#[tokio::test]
async fn large_tasks_and_results_travel_as_objects() {
    let dataset = Location::parse("memory://cluster-tests/stored").unwrap();
    let inputs: Vec<InputRef> = (0..20_000)
        .map(|k| InputRef {
            loc: "s3://corpus/web".into(),
            name: format!("crawl/segment-{k:06}.warc.wet.gz"),
            size: 1 << 30,
            e_tag: Some(format!("\"{k:032x}\"")),
        })
        .collect();
    let task = Task::Count {
        split: "train".into(),
        part: Part { index: 0, of: 1 },
        inputs,
        inputs_sha256: "0".repeat(64),
        text: TextOptions::default(),
        dataset: dataset.url().to_string(),
        words: true,
    };
    let wire = inline_or_stored(task.clone(), &dataset, "tasks/task-1.json", |url| {
        Task::Stored { url }
    })
    .await
    .unwrap();
    let Task::Stored { url } = &wire else {
        panic!("a task of 20,000 inputs sent inline")
    };
    assert!(url.ends_with("parts/tasks/task-1.json"), "{url}");
    let back = wire.load().await.unwrap();
    assert_eq!(
        serde_json::to_string(&back).unwrap(),
        serde_json::to_string(&task).unwrap()
    );
    // Small ones stay inline.
    let small = Done::Stitched {
        shard: 3,
        info: shard_object("train-00003.u32".into(), &[1, 2, 3], BLOCK_TOKENS).1,
    };
    let same = inline_or_stored(small, &dataset, "results/x.json", |url| Done::Stored {
        url,
    })
    .await
    .unwrap();
    assert!(matches!(same, Done::Stitched { shard: 3, .. }));
    let outside = Done::Stored {
        url: dataset.url_of("vocab.txt"),
    };
    let e = outside.load(&dataset).await.unwrap_err().to_string();
    assert!(e.contains("not an object below"), "{e}");
}
