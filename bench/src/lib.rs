//! Helpers the benchmark binaries share: per-process CPU accounting from `/proc` (where a run's time
//! went on this shared machine) and RabbitMQ consumers that count what arrives (a run ends when the
//! consumer has every event, not when the producer stopped).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::ensure;
use futures::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;

/// CPU seconds (user+system) of every process whose command name matches one of `names`
/// (`*` = prefix; Linux truncates names to 15 characters).
pub fn cpu_seconds(names: &[&str]) -> f64 {
    let tick = 100.0; // USER_HZ on Linux
    let mut total = 0.0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        // Processes only: `/proc/self` would count the generator twice.
        if !entry.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let comm = &stat[open + 1..close];
        let matches = |n: &&str| match n.strip_suffix('*') {
            Some(prefix) => comm.starts_with(prefix),
            None => comm == *n,
        };
        if !names.iter().any(matches) {
            continue;
        }
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        let utime: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        let stime: f64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        total += (utime + stime) / tick;
    }
    total
}

/// Named groups of processes whose CPU a run reports, e.g. `("PostgreSQL", &["postgres*"])`.
pub type Components = &'static [(&'static str, &'static [&'static str])];

/// What the benchmarks report (`*` = prefix; Linux truncates names to 15 characters). "generator" is the
/// benchmark binary itself (`iothub-bench-events`, `iothub-bench-commands`).
pub const COMPONENTS: Components = &[
    ("iothub", &["iothub"]),
    ("PostgreSQL", &["postgres*"]),
    ("Redis", &["redis-server*"]),
    ("RabbitMQ", &["beam.smp", "erl_child_setup", "epmd"]),
    ("generator", &["iothub-bench-*"]),
];

pub fn cpu_snapshot(components: Components) -> Vec<f64> {
    components.iter().map(|(_, names)| cpu_seconds(names)).collect()
}

/// Each component's CPU between two snapshots, as a share of one core over `wall` seconds.
pub fn cpu_report(components: Components, before: &[f64], after: &[f64], wall: f64) -> String {
    components
        .iter()
        .zip(before.iter().zip(after))
        .map(|((name, _), (b, a))| format!("{name} {:.0}%", (a - b) / wall * 100.0))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Declares a durable queue bound to `exchange` with `routing_key`, purges it, and counts what arrives.
pub async fn counting_consumer(
    url: &str,
    exchange: &str,
    routing_key: &str,
    queue: &str,
) -> anyhow::Result<(Arc<AtomicU64>, lapin::Connection)> {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.exchange_declare(
        exchange.into(),
        lapin::ExchangeKind::Direct,
        ExchangeDeclareOptions { durable: true, ..Default::default() },
        FieldTable::default(),
    )
    .await?;
    ch.queue_declare(queue.into(), QueueDeclareOptions { durable: true, ..Default::default() }, FieldTable::default())
        .await?;
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        routing_key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    ch.queue_purge(queue.into(), QueuePurgeOptions::default()).await?;
    ch.basic_qos(2_000, BasicQosOptions::default()).await?;
    let mut consumer =
        ch.basic_consume(queue.into(), "bench".into(), BasicConsumeOptions::default(), FieldTable::default()).await?;
    let count = Arc::new(AtomicU64::new(0));
    let counter = count.clone();
    tokio::spawn(async move {
        let mut pending = 0;
        while let Some(Ok(delivery)) = consumer.next().await {
            let seen = counter.fetch_add(1, Ordering::Relaxed) + 1;
            pending += 1;
            // Ack in groups, but never leave the prefetch window full.
            if pending >= 200 || seen % 50 == 0 {
                let _ = delivery.acker.ack(BasicAckOptions { multiple: true }).await;
                pending = 0;
            }
        }
    });
    Ok((count, conn))
}

/// Deletes a phase's queue: a durable queue left bound would keep receiving (and persisting) every later
/// event, doubling RabbitMQ's work in the next phase.
pub async fn drop_queue(conn: lapin::Connection, queue: &str) -> anyhow::Result<()> {
    let ch = conn.create_channel().await?;
    ch.queue_delete(queue.into(), QueueDeleteOptions::default()).await?;
    // The consumer's channel is being cancelled by the delete; closing may race with it.
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

/// Waits until `count` reaches `target`, failing after `timeout`.
pub async fn wait_count(count: &AtomicU64, target: u64, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while count.load(Ordering::Relaxed) < target {
        ensure!(Instant::now() < deadline, "only {} of {target} arrived", count.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> anyhow::Result<i64> {
    Ok(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64)
}

/// CPU seconds of this process's threads whose names start with `prefix` (e.g. a runtime embedded in
/// the generator, named by its builder).
pub fn own_threads_cpu_seconds(prefix: &str) -> f64 {
    let mut total = 0.0;
    for entry in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        if !stat[open + 1..close].starts_with(prefix) {
            continue;
        }
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        let utime: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        let stime: f64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        total += (utime + stime) / 100.0;
    }
    total
}

/// CPU seconds the whole machine spent running something (user, nice, system, irq, softirq), from
/// `/proc/stat`. Steal (time the hypervisor gave to other guests) is not ours, so it is not counted.
pub fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<f64> =
        stat.lines().next().unwrap_or_default().split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let field = |i: usize| fields.get(i).copied().unwrap_or(0.0);
    (field(0) + field(1) + field(2) + field(5) + field(6)) / 100.0
}

/// CPUs `/proc/stat` accounts for (its `cpuN` lines), the denominator of [`machine_busy_seconds`].
pub fn machine_cpus() -> usize {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines().filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit)).count().max(1)
}
