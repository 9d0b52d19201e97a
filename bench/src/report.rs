//! The benchmark's report: a markdown table with ratios, the targets and whether each is met,
//! and the raw figures as JSON.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::load::{Figures, Workload};
use super::{Cell, Results};

/// The median of `values` (the mean of the middle two for an even count). Not empty.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// The cell `w` on `target` at `c`. With several rounds, ops/s and each latency are the
/// median over the rounds (so p99 and ops/s may come from different rounds); `ops` and
/// `errors` are totals over them.
fn find(r: &Results, w: Workload, target: &str, c: usize) -> Option<Cell> {
    let runs: Vec<&Cell> = (r.cells.iter())
        .filter(|x| x.workload == w && x.target == target && x.concurrency == c)
        .collect();
    let first = runs.first()?;
    let of = |f: &dyn Fn(&Figures) -> f64| median(runs.iter().map(|x| f(&x.figures)).collect());
    let us = |f: fn(&Figures) -> u64| of(&|x| f(x) as f64).round() as u64;
    Some(Cell {
        figures: Figures {
            ops_per_sec: of(&|f| f.ops_per_sec),
            p50_us: us(|f| f.p50_us),
            p99_us: us(|f| f.p99_us),
            p999_us: us(|f| f.p999_us),
            ops: runs.iter().map(|x| x.figures.ops).sum(),
            errors: runs.iter().map(|x| x.figures.errors).sum(),
            first_error: runs.iter().find_map(|x| x.figures.first_error.clone()),
        },
        writes_per_batch: (runs.iter().map(|x| x.writes_per_batch))
            .collect::<Option<Vec<f64>>>()
            .map(median),
        peer_copies_per_write: (runs.iter().map(|x| x.peer_copies_per_write))
            .collect::<Option<Vec<f64>>>()
            .map(median),
        ..(*first).clone()
    })
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

/// The report as markdown.
pub fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# kvstore benchmark, {}\n", r.date);
    let _ = writeln!(
        s,
        "{} cores, {}; {} s per cell, {}; {} keys ({} for list), 16-byte keys, 100-byte \
         values; durable settings on every side (kvstore `--sync always`, etcd default fsync). \
         {}\n",
        r.cores,
        r.cpu,
        r.seconds_per_cell,
        match r.rounds {
            0 | 1 => "one round".to_string(),
            n => format!("{n} rounds with the targets taking turns, medians shown"),
        },
        r.keys,
        r.list_keys,
        r.etcd_version.as_deref().unwrap_or("etcd not run"),
    );
    for note in &r.notes {
        let _ = writeln!(s, "> {note}\n");
    }
    let _ = writeln!(
        s,
        "| workload | c | kvstore ops/s | p50 ms | p99 ms | p999 ms | err | etcd ops/s | etcd p50 | etcd p99 | etcd-ser ops/s | etcd-ser p99 | echo ops/s | ours/etcd ops | ours/etcd p99 | ours/etcd-ser ops | ours/echo ops |"
    );
    let _ = writeln!(s, "|{}", "---|".repeat(17));
    let workloads = [
        Workload::Put,
        Workload::Get,
        Workload::Mixed,
        Workload::Delete,
        Workload::List,
    ];
    let mut cs: Vec<usize> = r.cells.iter().map(|c| c.concurrency).collect();
    cs.sort_unstable();
    cs.dedup();
    for w in workloads {
        for &c in &cs {
            let Some(ours) = find(r, w, "kvstore", c) else {
                continue;
            };
            let etcd = find(r, w, "etcd", c);
            let ser = find(r, w, "etcd-serializable", c);
            let echo = find(r, w, "echo", c);
            let (etcd, ser, echo) = (etcd.as_ref(), ser.as_ref(), echo.as_ref());
            let o = &ours.figures;
            let _ = writeln!(
                s,
                "| {} | {c} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                format!("{w:?}").to_lowercase(),
                o.ops_per_sec,
                ms(o.p50_us),
                ms(o.p99_us),
                ms(o.p999_us),
                o.errors,
                etcd.map_or("-".into(), |e| format!("{:.0}", e.figures.ops_per_sec)),
                etcd.map_or("-".into(), |e| ms(e.figures.p50_us)),
                etcd.map_or("-".into(), |e| ms(e.figures.p99_us)),
                ser.map_or("-".into(), |e| format!("{:.0}", e.figures.ops_per_sec)),
                ser.map_or("-".into(), |e| ms(e.figures.p99_us)),
                echo.map_or("-".into(), |e| format!("{:.0}", e.figures.ops_per_sec)),
                ratio(Some(o.ops_per_sec), etcd.map(|e| e.figures.ops_per_sec)),
                ratio(Some(o.p99_us as f64), etcd.map(|e| e.figures.p99_us as f64)),
                ratio(Some(o.ops_per_sec), ser.map(|e| e.figures.ops_per_sec)),
                ratio(Some(o.ops_per_sec), echo.map(|e| e.figures.ops_per_sec)),
            );
        }
    }
    ab_section(r, &mut s);
    batching_section(r, &mut s);
    placement_section(r, &mut s);
    let _ = writeln!(s, "\n## Targets\n");
    let _ = writeln!(
        s,
        "Ratios are of the medians over the rounds; each round's own ratio (ours against the \
         cell it took turns with) shows how much the machine's noise moves them.\n"
    );
    let _ = writeln!(s, "| cell | target | measured | each round | met |");
    let _ = writeln!(s, "|---|---|---|---|---|");
    let div =
        |a: Option<f64>, b: Option<f64>| a.zip(b).filter(|(_, b)| *b > 0.0).map(|(a, b)| a / b);
    let mut target = |cell: &str,
                      goal: &str,
                      (value, rounds): (Option<f64>, Vec<f64>),
                      unit: &str,
                      met: fn(f64) -> bool| {
        let each = if rounds.len() > 1 {
            (rounds.iter().map(|v| format!("{v:.2}{unit}")))
                .collect::<Vec<_>>()
                .join(", ")
        } else {
            "-".into()
        };
        let verdict = match value {
            None => "-".to_string(),
            Some(v) => {
                let overall = if met(v) { "yes" } else { "no" };
                if rounds.len() > 1 {
                    let k = rounds.iter().filter(|&&v| met(v)).count();
                    format!("{overall} ({k} of {} rounds)", rounds.len())
                } else {
                    overall.to_string()
                }
            }
        };
        let _ = writeln!(
            s,
            "| {cell} | {goal} | {} | {each} | {verdict} |",
            value.map_or("not measured".into(), |v| format!("{v:.2}{unit}")),
        );
    };
    let ops_of: fn(&Figures) -> f64 = |f| f.ops_per_sec;
    let p99_of: fn(&Figures) -> f64 = |f| f.p99_us as f64;
    let p50_of: fn(&Figures) -> f64 = |f| f.p50_us as f64;
    // `f` of our cell over `f` of theirs: the medians', and each round's.
    let vs = |w: Workload, ours: &str, theirs: &str, c: usize, f: fn(&Figures) -> f64| {
        let of = |target: &str| find(r, w, target, c).map(|x| f(&x.figures));
        (
            div(of(ours), of(theirs)),
            round_ratios(r, w, ours, theirs, c, f),
        )
    };
    let (put, get, mixed) = (Workload::Put, Workload::Get, Workload::Mixed);
    target(
        "get c=64 ops/s",
        ">= 0.9x echo",
        vs(get, "kvstore", "echo", 64, ops_of),
        "x",
        |v| v >= 0.9,
    );
    target(
        "mixed c=64 ops/s",
        ">= 0.7x echo",
        vs(mixed, "kvstore", "echo", 64, ops_of),
        "x",
        |v| v >= 0.7,
    );
    target(
        "put c=64 ops/s",
        ">= 0.5x echo",
        vs(put, "kvstore", "echo", 64, ops_of),
        "x",
        |v| v >= 0.5,
    );
    target(
        "put c=64 p99",
        "<= 0.3x etcd",
        vs(put, "kvstore", "etcd", 64, p99_of),
        "x",
        |v| v <= 0.3,
    );
    target(
        "put c=1 p50, --ack-after all",
        "<= 0.6x etcd",
        vs(put, "kvstore", "etcd", 1, p50_of),
        "x",
        |v| v <= 0.6,
    );
    // Measured when cluster B of an A/B run acks after the quorum (`--b-node-args
    // "--ack-after quorum"`).
    let quorum_b = (r.b_node_args.as_deref()).is_some_and(|a| a.contains("--ack-after quorum"));
    let quorum = if quorum_b { "kvstore-b" } else { "-" };
    target(
        "put c=1 p50, --ack-after quorum",
        "<= 0.5x etcd",
        vs(put, quorum, "etcd", 1, p50_of),
        "x",
        |v| v <= 0.5,
    );
    target(
        "list of 100k keys, ops/s",
        ">= 3x etcd",
        vs(Workload::List, "kvstore", "etcd", 1, ops_of),
        "x",
        |v| v >= 3.0,
    );
    let alone = |value: Option<f64>| (value, Vec::new());
    target(
        "memory at 1M keys",
        "<= 200 bytes/key",
        alone(r.memory_bytes_per_key),
        " B",
        |v| v <= 200.0,
    );
    target(
        "restart with 1M keys",
        "serving in <= 0.5 s",
        alone(r.restart_seconds),
        " s",
        |v| v <= 0.5,
    );
    target(
        "catch-up of 100k missed writes",
        "<= 5 s",
        alone(r.catchup_seconds),
        " s",
        |v| v <= 5.0,
    );
    s
}

/// Round by round, `f` of kvstore's cell over `f` of `other`'s cell of the same round (the
/// n-th run of each: the targets take turns within a round, so the two ran minutes apart at
/// most). Empty unless both ran the same number of rounds.
fn round_ratios(
    r: &Results,
    w: Workload,
    ours: &str,
    other: &str,
    c: usize,
    f: fn(&Figures) -> f64,
) -> Vec<f64> {
    let runs = |target: &str| -> Vec<f64> {
        (r.cells.iter())
            .filter(|x| x.workload == w && x.target == target && x.concurrency == c)
            .map(|x| f(&x.figures))
            .collect()
    };
    let (ours, theirs) = (runs(ours), runs(other));
    if ours.len() != theirs.len() || theirs.iter().any(|&t| t <= 0.0) {
        return Vec::new();
    }
    ours.iter().zip(&theirs).map(|(o, t)| o / t).collect()
}

/// How many writes went in each replication batch, per kvstore cell that writes.
fn batching_section(r: &Results, s: &mut String) {
    let batches = medians(r, |cell| cell.writes_per_batch);
    if batches.is_empty() {
        return;
    }
    let _ = writeln!(s, "\n## Replication batching\n");
    let _ = writeln!(
        s,
        "Writes per replication batch during each cell, over every node and peer (median of the rounds).\n"
    );
    let _ = writeln!(s, "| target | workload | c | writes per batch |");
    let _ = writeln!(s, "|---|---|---|---|");
    for (target, workload, c, per) in batches {
        let _ = writeln!(s, "| {target} | {workload} | {c} | {per:.1} |");
    }
}

/// Each cell's figure `of` (median of the rounds), once per cell that has it, in the order
/// the cells ran: (target, workload, clients, figure).
fn medians(r: &Results, of: fn(&Cell) -> Option<f64>) -> Vec<(&str, String, usize, f64)> {
    let mut seen = std::collections::HashSet::new();
    (r.cells.iter())
        .filter(|cell| of(cell).is_some())
        .filter(|cell| seen.insert((cell.workload, cell.concurrency, cell.target.as_str())))
        .filter_map(|cell| {
            let (w, c, target) = (cell.workload, cell.concurrency, cell.target.as_str());
            let figure = find(r, w, target, c).as_ref().and_then(of)?;
            Some((target, format!("{w:?}").to_lowercase(), c, figure))
        })
        .collect()
}

/// Bytes one replicated copy of a bench write takes on the wire, about: a 16-byte key, a
/// 100-byte value, a version (8 bytes of time, a node id like "127.0.0.1:40001") and the
/// protobuf framing, in a batch.
const COPY_BYTES: f64 = 150.0;

/// Where the keys are: each node's share, and what replication sends between nodes per write.
fn placement_section(r: &Results, s: &mut String) {
    if r.keys_per_node.is_empty() {
        return;
    }
    let _ = writeln!(s, "\n## Keys per node, and copies sent between nodes\n");
    let _ = writeln!(
        s,
        "Each node's live keys (its Status) after the last workload, and the copies per key \
         they add up to.\n"
    );
    let _ = writeln!(s, "| target | keys per node | copies per key |");
    let _ = writeln!(s, "|---|---|---|");
    for held in &r.keys_per_node {
        let total: u64 = held.keys.iter().sum();
        let each: Vec<String> = held.keys.iter().map(u64::to_string).collect();
        let copies = total as f64 / held.distinct.max(1) as f64;
        let _ = writeln!(s, "| {} | {} | {copies:.2} |", held.target, each.join(", "));
    }
    let copies = medians(r, |cell| cell.peer_copies_per_write);
    if copies.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nCopies the nodes sent each other per client write (writes their peers confirmed, \
         median of the rounds), and about {COPY_BYTES:.0} bytes each on the wire.\n"
    );
    let _ = writeln!(
        s,
        "| target | workload | c | copies per write | bytes per write, about |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    for (target, workload, c, per) in copies {
        let bytes = per * COPY_BYTES;
        let _ = writeln!(s, "| {target} | {workload} | {c} | {per:.2} | {bytes:.0} |");
    }
}

/// The A/B table (when the run had a cluster B): medians over the rounds, and B/A.
fn ab_section(r: &Results, s: &mut String) {
    if !r.cells.iter().any(|c| c.target == "kvstore-b") {
        return;
    }
    let median = |w: Workload, target: &str, c: usize, f: fn(&Figures) -> f64| {
        find(r, w, target, c).map(|cell| f(&cell.figures))
    };
    let _ = writeln!(s, "\n## A/B\n");
    let _ = writeln!(
        s,
        "| workload | c | A ops/s | B ops/s | B/A ops | A p50 ms | B p50 ms | A p99 ms | B p99 ms | B/A p99 |"
    );
    let _ = writeln!(s, "|{}", "---|".repeat(10));
    let mut keys: Vec<(Workload, usize)> = (r.cells.iter())
        .filter(|c| c.target == "kvstore")
        .map(|c| (c.workload, c.concurrency))
        .collect();
    keys.dedup();
    for (w, c) in keys {
        let ops = |t| median(w, t, c, |f| f.ops_per_sec);
        let p50 = |t| median(w, t, c, |f| f.p50_us as f64);
        let p99 = |t| median(w, t, c, |f| f.p99_us as f64);
        let msf = |v: Option<f64>| v.map_or("-".into(), |v| ms(v as u64));
        let _ = writeln!(
            s,
            "| {} | {c} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} |",
            format!("{w:?}").to_lowercase(),
            ops("kvstore").unwrap_or(0.0),
            ops("kvstore-b").unwrap_or(0.0),
            ratio(ops("kvstore-b"), ops("kvstore")),
            msf(p50("kvstore")),
            msf(p50("kvstore-b")),
            msf(p99("kvstore")),
            msf(p99("kvstore-b")),
            ratio(p99("kvstore-b"), p99("kvstore")),
        );
    }
}

/// Writes `<date>.md` and `<date>.json` into `dir`.
pub fn write(r: &Results, dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let stem = r.date.replace(':', "-");
    let md = dir.join(format!("{stem}.md"));
    let json = dir.join(format!("{stem}.json"));
    std::fs::write(&md, markdown(r))?;
    std::fs::write(&json, serde_json::to_string_pretty(r)?)?;
    Ok((md, json))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KeysHeld;

    fn cell(target: &str, ops_per_sec: f64, p99_us: u64, errors: u64) -> Cell {
        Cell {
            workload: Workload::Put,
            target: target.into(),
            concurrency: 64,
            figures: Figures {
                ops_per_sec,
                p50_us: p99_us / 2,
                p99_us,
                p999_us: p99_us * 2,
                ops: 10,
                errors,
                first_error: (errors > 0).then(|| "boom".into()),
            },
            writes_per_batch: Some(ops_per_sec / 100.0),
            peer_copies_per_write: Some(ops_per_sec / 40.0),
        }
    }

    #[test]
    fn rounds_are_reported_as_medians_per_figure() {
        let r = Results {
            cells: vec![
                cell("kvstore", 100.0, 900, 0),
                cell("etcd", 50.0, 100, 0),
                cell("kvstore", 300.0, 100, 1),
                cell("kvstore", 200.0, 500, 0),
            ],
            ..Results::default()
        };
        let c = find(&r, Workload::Put, "kvstore", 64).unwrap();
        assert_eq!(c.figures.ops_per_sec, 200.0);
        assert_eq!(c.figures.p99_us, 500);
        assert_eq!(c.figures.p50_us, 250);
        assert_eq!((c.figures.ops, c.figures.errors), (30, 1));
        assert_eq!(c.figures.first_error.as_deref(), Some("boom"));
        assert_eq!(c.writes_per_batch, Some(2.0));
        assert_eq!(c.peer_copies_per_write, Some(5.0));
        assert_eq!(
            find(&r, Workload::Put, "etcd", 64).unwrap().figures.p99_us,
            100
        );
        assert!(find(&r, Workload::Get, "kvstore", 64).is_none());
        assert_eq!(median(vec![4.0, 1.0]), 2.5);
        // And the table's ratio uses them: 200 / 50.
        assert!(markdown(&r).contains("| 4.00x |"), "{}", markdown(&r));
    }

    #[test]
    fn keys_per_node_add_up_to_the_copies_per_key() {
        let r = Results {
            cells: vec![cell("kvstore", 100.0, 900, 0)],
            keys_per_node: vec![KeysHeld {
                target: "kvstore".into(),
                distinct: 10,
                keys: vec![6, 4, 5, 5, 6, 4],
            }],
            ..Results::default()
        };
        let md = markdown(&r);
        assert!(md.contains("| kvstore | 6, 4, 5, 5, 6, 4 | 3.00 |"), "{md}");
        // 100 ops/s / 40 = 2.5 copies a write, 150 bytes each.
        assert!(md.contains("| kvstore | put | 64 | 2.50 | 375 |"), "{md}");
    }

    #[test]
    fn targets_show_each_rounds_ratio_and_how_many_rounds_met_it() {
        let r = Results {
            cells: vec![
                cell("kvstore", 500.0, 900, 0),
                cell("etcd", 100.0, 1000, 0),
                cell("echo", 1000.0, 100, 0),
                cell("kvstore", 300.0, 200, 0),
                cell("etcd", 100.0, 1000, 0),
                cell("echo", 1000.0, 100, 0),
                cell("kvstore", 520.0, 450, 0),
                cell("etcd", 100.0, 1000, 0),
                cell("echo", 1000.0, 100, 0),
            ],
            ..Results::default()
        };
        assert_eq!(
            round_ratios(&r, Workload::Put, "kvstore", "etcd", 64, |f| f.ops_per_sec),
            [5.0, 3.0, 5.2]
        );
        let md = markdown(&r);
        assert!(
            md.contains("| put c=64 ops/s | >= 0.5x echo | 0.50x | 0.50x, 0.30x, 0.52x | yes (2 of 3 rounds) |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| put c=64 p99 | <= 0.3x etcd | 0.45x | 0.90x, 0.20x, 0.45x | no (1 of 3 rounds) |"
            ),
            "{md}"
        );
        // A target with a missing side is not measured, and says nothing about rounds.
        assert!(
            md.contains("| put c=1 p50, --ack-after all | <= 0.6x etcd | not measured | - | - |"),
            "{md}"
        );
        // Nor is the early ack's without a cluster B that acks after the quorum.
        assert!(
            md.contains(
                "| put c=1 p50, --ack-after quorum | <= 0.5x etcd | not measured | - | - |"
            ),
            "{md}"
        );
        // Unequal round counts cannot be paired.
        let mut r = r;
        r.cells.remove(7);
        assert!(
            round_ratios(&r, Workload::Put, "kvstore", "etcd", 64, |f| f.ops_per_sec).is_empty()
        );
    }
}
