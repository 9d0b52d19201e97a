//! The closed-loop load generator: N clients, each on its own connection, each sending its
//! next operation as soon as the last one answered, for a fixed time. Latencies go into
//! per-client HDR histograms (microseconds), merged at the end.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::targets::{Conn, Op};

/// Key bytes: `key-` and 12 digits.
pub fn key(i: u64) -> String {
    format!("key-{i:012}")
}

/// A 100-byte value.
pub fn value(seed: u64) -> String {
    let mut v = format!("value-{seed:020}-");
    v.extend(std::iter::repeat_n('v', 100 - v.len()));
    v
}

/// What a workload sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    Put,
    Get,
    /// 90 % Get, 10 % Put.
    Mixed,
    Delete,
    /// The whole key space, streamed.
    List,
    /// The echo server's only call.
    Echo,
}

impl Workload {
    /// Whether it writes, so that replication has something to batch.
    pub fn writes(self) -> bool {
        matches!(self, Self::Put | Self::Mixed | Self::Delete)
    }

    fn next(self, rng: &mut StdRng, keys: u64) -> Op {
        let k = key(rng.random_range(0..keys));
        match self {
            Self::Put => Op::Put(k, value(rng.random())),
            Self::Get => Op::Get(k),
            Self::Mixed if rng.random_range(0..10) == 0 => Op::Put(k, value(rng.random())),
            Self::Mixed => Op::Get(k),
            Self::Delete => Op::Delete(k),
            Self::List => Op::List,
            Self::Echo => Op::Echo(k, value(0)),
        }
    }
}

/// One cell's figures.
#[derive(Clone, Debug, Serialize)]
pub struct Figures {
    pub ops_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub ops: u64,
    pub errors: u64,
    /// The first error seen, if any, to say why.
    pub first_error: Option<String>,
}

/// Runs `workload` on every connection for `duration`.
pub async fn run(conns: Vec<Conn>, workload: Workload, keys: u64, duration: Duration) -> Figures {
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut conn)| {
            tokio::spawn(async move {
                let mut hist =
                    Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("bounds");
                let mut rng = StdRng::seed_from_u64(i as u64 + 1);
                let (mut ops, mut errors, mut first_error) = (0u64, 0u64, None);
                while Instant::now() < deadline {
                    let op = workload.next(&mut rng, keys);
                    let t = Instant::now();
                    match conn.run(op).await {
                        Ok(()) => {
                            ops += 1;
                            let _ = hist.record(t.elapsed().as_micros().max(1) as u64);
                        }
                        Err(e) => {
                            errors += 1;
                            first_error
                                .get_or_insert_with(|| format!("{}: {}", e.code(), e.message()));
                        }
                    }
                }
                (hist, ops, errors, first_error)
            })
        })
        .collect();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("bounds");
    let (mut ops, mut errors, mut first_error) = (0, 0, None);
    for t in tasks {
        let (h, o, e, fe) = t.await.expect("load task panicked");
        hist.add(h).expect("same bounds");
        ops += o;
        errors += e;
        first_error = first_error.or(fe);
    }
    let elapsed = started.elapsed().as_secs_f64();
    Figures {
        ops_per_sec: ops as f64 / elapsed,
        p50_us: hist.value_at_quantile(0.50),
        p99_us: hist.value_at_quantile(0.99),
        p999_us: hist.value_at_quantile(0.999),
        ops,
        errors,
        first_error,
    }
}

/// Writes keys `0..keys` through `conns` (as fast as they go), before reads.
pub async fn preload(conns: Vec<Conn>, from: u64, keys: u64) -> anyhow::Result<()> {
    let n = conns.len() as u64;
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut conn)| {
            tokio::spawn(async move {
                let mut k = from + i as u64;
                while k < keys {
                    conn.run(Op::Put(key(k), value(k))).await?;
                    k += n;
                }
                Ok::<_, tonic::Status>(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(())
}
