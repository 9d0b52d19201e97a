//! Micro-benchmarks of the write path's pieces: version comparison, the store actor's apply
//! (one message, as a peer's batch arrives), and the log's append (encode, group commit, fsync
//! on a real file), a snapshot's encoding of the whole map, and filling a map as recovery does. `cargo bench -p kvstore-actors`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use kameo::actor::Spawn;
use kvstore_actors::entry::{Slot, map_with_capacity, new_map};
use kvstore_actors::storage::{record, snapshot};
use kvstore_actors::store::{Apply, Put};
use kvstore_actors::{
    Clock, Entry, NodeId, Storage, StorageConfig, StoreActor, SyncMode, Version, Write,
};

fn write(i: u64, node: &str) -> Write {
    Write {
        key: format!("key-{i:012}"),
        entry: Entry {
            value: Some("v".repeat(100).into()),
            version: Version {
                time: 1_000_000 + i,
                node: NodeId::new(node).unwrap(),
            },
        },
    }
}

fn versions(c: &mut Criterion) {
    let a = Version {
        time: 42,
        node: NodeId::new("node1").unwrap(),
    };
    let b = Version {
        time: 42,
        node: NodeId::new("node2").unwrap(),
    };
    c.bench_function("version/compare (tie on time)", |bench| {
        bench.iter(|| std::hint::black_box(&a) < std::hint::black_box(&b))
    });
    let clock = Clock::new(NodeId::new("node1").unwrap());
    c.bench_function("version/clock.now", |bench| bench.iter(|| clock.now()));
}

fn apply(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut group = c.benchmark_group("store");
    for batch in [1usize, 64] {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(format!("apply batch of {batch} (in memory)"), |bench| {
            let store = rt.block_on(async {
                StoreActor::spawn(StoreActor::new(Arc::new(Clock::new(
                    NodeId::new("n").unwrap(),
                ))))
            });
            let mut next = 0u64;
            bench.iter_batched(
                || {
                    next += batch as u64;
                    (0..batch as u64)
                        .map(|i| write(next + i, "peer"))
                        .collect::<Vec<_>>()
                },
                |writes| rt.block_on(async { store.ask(Apply(writes)).await.unwrap().changed }),
                BatchSize::SmallInput,
            )
        });
    }
    group.throughput(Throughput::Elements(1));
    group.bench_function("put (in memory)", |bench| {
        let store = rt.block_on(async {
            StoreActor::spawn(StoreActor::new(Arc::new(Clock::new(
                NodeId::new("n").unwrap(),
            ))))
        });
        let mut i = 0u64;
        bench.iter(|| {
            i += 1;
            rt.block_on(async {
                store
                    .ask(Put {
                        key: format!("key-{:012}", i % 10_000),
                        value: "v".repeat(100),
                    })
                    .await
                    .unwrap()
                    .write
            })
        })
    });
    group.finish();
}

fn log(c: &mut Criterion) {
    let mut group = c.benchmark_group("log");
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode a record", |bench| {
        let w = write(7, "node1");
        let mut buf = Vec::with_capacity(256);
        bench.iter(|| {
            buf.clear();
            record::encode_write(&w, &mut buf);
            buf.len()
        })
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (name, sync, concurrent) in [
        ("append+fsync, 1 writer", SyncMode::Always, 1usize),
        (
            "append+fsync, 64 writers (group commit)",
            SyncMode::Always,
            64,
        ),
        ("append, no fsync, 64 writers", SyncMode::Never, 64),
    ] {
        group.throughput(Throughput::Elements(concurrent as u64));
        group.bench_function(name, |bench| {
            let dir = tempfile::tempdir().unwrap();
            let config = StorageConfig {
                sync,
                compact_after_bytes: u64::MAX,
                repair: false,
                tombstone_grace: std::time::Duration::from_secs(3600),
                metrics: Default::default(),
            };
            let mut storage = Storage::open(dir.path(), &config).unwrap().storage;
            let mut i = 0u64;
            bench.iter(|| {
                let pending: Vec<_> = (0..concurrent)
                    .map(|_| {
                        i += 1;
                        storage.append([&write(i, "node1")])
                    })
                    .collect();
                rt.block_on(async {
                    for p in pending {
                        p.wait().await.unwrap();
                    }
                })
            })
        });
    }
    group.finish();
}

/// A snapshot's encoding of a node's whole map, and what it costs a writer meanwhile. The
/// encoding runs under the map's shard locks, one shard at a time, so a write to the shard being
/// encoded waits for it (see `entry::MAP_SHARDS`).
fn snapshot(c: &mut Criterion) {
    let mut group = c.benchmark_group("snapshot");
    group.sample_size(10);
    let keys = 1_000_000u64;
    let map = Arc::new(new_map());
    for i in 0..keys {
        let w = write(i, "node1");
        map.put(Slot::new(&w.key, &w.entry));
    }
    group.throughput(Throughput::Elements(keys));
    group.bench_function("encode 1M keys", |bench| {
        bench.iter(|| snapshot::encode(&map, None).bytes.len())
    });

    let stop = Arc::new(AtomicBool::new(false));
    let snapshots = std::thread::spawn({
        let (map, stop) = (map.clone(), stop.clone());
        move || {
            while !stop.load(Ordering::Relaxed) {
                snapshot::encode(&map, None);
            }
        }
    });
    group.throughput(Throughput::Elements(1));
    group.bench_function("insert while snapshots of 1M keys run", |bench| {
        let mut i = 0u64;
        bench.iter(|| {
            // Keys spread over the map (and so over its shards), as a workload's would be.
            i = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let w = write(i % keys, "node2");
            map.put(Slot::new(&w.key, &w.entry));
        })
    });
    stop.store(true, Ordering::Relaxed);
    snapshots.join().unwrap();
    group.finish();
}

/// Recovery's map building: 1M fresh slots put into a map that grows as it fills, and into one
/// sized for them first (as recovery does from a snapshot's header).
fn fill(c: &mut Criterion) {
    let mut group = c.benchmark_group("fill");
    group.sample_size(10);
    let keys = 1_000_000u64;
    group.throughput(Throughput::Elements(keys));
    let slots = || -> Vec<Slot> {
        (0..keys)
            .map(|i| {
                let w = write(i, "node1");
                Slot::new(&w.key, &w.entry)
            })
            .collect()
    };
    for (name, capacity) in [("1M keys, growing", 0), ("1M keys, sized", keys as usize)] {
        group.bench_function(name, |bench| {
            bench.iter_batched(
                slots,
                |slots| {
                    let map = map_with_capacity(capacity);
                    for slot in slots {
                        map.put(slot);
                    }
                    map
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, versions, apply, log, snapshot, fill);
criterion_main!(benches);
