//! `iothub-bench-events`: throughput of broker events in, end to end, next to a floor measured in the
//! same run on the same services. `scripts/bench-events.sh` starts PostgreSQL (fsync on), Redis, RabbitMQ
//! and a release iothub, then calls this.
//!
//! - **pipeline**: EMQX 5 `message.publish` webhooks (one event per request, the shape EMQX's HTTP action
//!   sends) with `--concurrency` in flight → iothub (parse, dedup in Redis, one PostgreSQL transaction with
//!   outbox rows per group of webhooks, 204) → relay → RabbitMQ with publisher confirms. Measured until a
//!   consumer bound to `upload_data` has received every event.
//! - **floor**: the same events written the cheapest correct way without iothub: batched `UNNEST` inserts
//!   into a copy of `device_messages` plus confirmed publishes of the same bodies, by the same number of
//!   workers iothub uses.
//! - **presence**: `client.connected` / `client.disconnected` webhooks for many devices.
//!
//! CPU seconds per process (iothub, PostgreSQL, Redis, RabbitMQ, this generator) say where the time went.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use base64::Engine;
use clap::Parser;
use hdrhistogram::Histogram;
use iothub_bench::{counting_consumer, cpu_report, cpu_snapshot, drop_queue, now_ms, wait_count, COMPONENTS};
use lapin::options::*;
use serde_json::{json, Value};
use sqlx::Executor;

#[derive(Debug, Clone, Parser)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    base_url: String,
    #[arg(long)]
    admin_key: String,
    #[arg(long)]
    hook_token: String,
    #[arg(long)]
    database_url: String,
    #[arg(long)]
    amqp_url: String,
    /// iothub's `rabbitmq.exchange_prefix`.
    #[arg(long, default_value = "iothub.events")]
    exchange_prefix: String,
    #[arg(long, default_value_t = 1_000)]
    devices: usize,
    /// upload_data events in the pipeline and floor runs.
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Connect+disconnect pairs in the presence run.
    #[arg(long, default_value_t = 25_000)]
    presence_pairs: usize,
    /// HTTP connections (EMQX's connector `pool_size` x nodes; emqx-config sets 64 per node).
    #[arg(long, default_value_t = 128)]
    connections: usize,
    /// Requests in flight per connection (EMQX `enable_pipelining`). iothub answers a webhook only after
    /// its group committed, and HTTP/1.1 answers pipelined requests in order, so pipelining adds no
    /// concurrency: connections do.
    #[arg(long, default_value_t = 1)]
    pipeline: usize,
    /// Events per webhook body (1 = what EMQX 5 and RMQTT send; >1 exercises array bodies).
    #[arg(long, default_value_t = 1)]
    events_per_request: usize,
    /// Floor: rows per insert/publish batch and concurrent workers (iothub's events.batch_max/workers).
    #[arg(long, default_value_t = 1_000)]
    floor_batch: usize,
    #[arg(long, default_value_t = 2)]
    floor_workers: usize,
    #[arg(long)]
    iothub_pid: Option<u32>,
}

const PRODUCT: &str = "bench";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn payload(i: usize) -> String {
    format!(
        r#"{{"temperature":{}.{},"humidity":{},"battery":{},"seq":{i}}}"#,
        15 + i % 20,
        i % 10,
        30 + i % 50,
        100 - i % 100
    )
}

async fn register(args: &Args, http: &reqwest::Client) -> anyhow::Result<Vec<String>> {
    let auth = format!("Bearer {}", args.admin_key);
    let resp = http
        .post(format!("{}/api/v1/products", args.base_url))
        .header("authorization", &auth)
        .json(&json!({"id": PRODUCT, "name": "bench"}))
        .send()
        .await?;
    ensure!(resp.status().is_success() || resp.status().as_u16() == 409, "create product: {}", resp.status());
    let ids: Vec<Value> = (0..args.devices).map(|i| json!({"device_id": format!("d{i:07}")})).collect();
    for chunk in ids.chunks(10_000) {
        let resp = http
            .post(format!("{}/api/v1/products/{PRODUCT}/devices/bulk", args.base_url))
            .header("authorization", &auth)
            .json(&json!({"devices": chunk}))
            .send()
            .await?;
        ensure!(resp.status().is_success(), "register: {} {}", resp.status(), resp.text().await?);
    }
    Ok((0..args.devices).map(|i| format!("d{i:07}")).collect())
}

/// Sends `bodies` as EMQX's HTTP connector does: `--connections` keep-alive connections, each with up to
/// `--pipeline` requests in flight (EMQX `enable_pipelining`). Raw HTTP/1.1 on a TCP socket: a client
/// library would cost more CPU than the server under test on this shared machine. Returns the latency
/// of each pipelined round (send `pipeline` requests, read their answers).
async fn send_webhooks(args: &Args, bodies: Vec<String>) -> anyhow::Result<Histogram<u64>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = args.base_url.trim_start_matches("http://").trim_end_matches('/').to_string();
    let host = addr.clone();
    let auth = format!("Bearer {}", args.hook_token);
    let bodies = Arc::new(bodies);
    let next = Arc::new(AtomicU64::new(0));
    let depth = args.pipeline.max(1);
    let mut tasks = Vec::new();
    for _ in 0..args.connections {
        let (addr, host, auth, bodies, next) = (addr.clone(), host.clone(), auth.clone(), bodies.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).expect("histogram");
            let mut socket = tokio::net::TcpStream::connect(&addr).await?;
            socket.set_nodelay(true)?;
            let mut out = Vec::with_capacity(depth * 1024);
            let mut buf = Vec::with_capacity(64 * 1024);
            loop {
                let first = next.fetch_add(depth as u64, Ordering::Relaxed) as usize;
                if first >= bodies.len() {
                    break;
                }
                let round = &bodies[first..(first + depth).min(bodies.len())];
                out.clear();
                for body in round {
                    out.extend_from_slice(
                        format!(
                            "POST /broker/emqx5/events HTTP/1.1\r\nhost: {host}\r\nauthorization: {auth}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                            body.len()
                        )
                        .as_bytes(),
                    );
                    out.extend_from_slice(body.as_bytes());
                }
                let t = Instant::now();
                socket.write_all(&out).await?;
                let mut answered = 0;
                while answered < round.len() {
                    // Parse as many complete responses as the buffer holds.
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = std::str::from_utf8(&buf[..end])?.to_ascii_lowercase();
                        let status = head.get(9..12).unwrap_or("");
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(Ok(0), |v| v.trim().parse())?;
                        if buf.len() < end + 4 + length {
                            break;
                        }
                        ensure!(
                            status == "204",
                            "webhook answered {status}: {}",
                            String::from_utf8_lossy(&buf[end + 4..end + 4 + length])
                        );
                        buf.drain(..end + 4 + length);
                        answered += 1;
                    }
                    if answered < round.len() {
                        let mut chunk = [0u8; 16 * 1024];
                        let n = socket.read(&mut chunk).await?;
                        ensure!(n > 0, "iothub closed the connection");
                        buf.extend_from_slice(&chunk[..n]);
                    }
                }
                hist.record(t.elapsed().as_micros() as u64)?;
            }
            anyhow::Ok(hist)
        }));
    }
    let mut total = Histogram::<u64>::new(3)?;
    for t in tasks {
        total.add(t.await??)?;
    }
    Ok(total)
}

fn publish_event(user: &str, message_id: &str, payload: &str, ts: i64) -> Value {
    json!({
        "event": "message.publish", "id": message_id, "clientid": user, "username": user,
        "topic": format!("upload_data/{user}/telemetry/{message_id}"),
        "payload": B64.encode(payload), "qos": 1, "flags": {"retain": false, "dup": false},
        "peername": "10.0.0.1:40000", "publish_received_at": ts, "timestamp": ts, "node": "bench@127.0.0.1"
    })
}

fn bodies(events: Vec<Value>, per_request: usize) -> Vec<String> {
    if per_request <= 1 {
        events.into_iter().map(|e| e.to_string()).collect()
    } else {
        events.chunks(per_request).map(|c| Value::Array(c.to_vec()).to_string()).collect()
    }
}

async fn pipeline(args: &Args, devices: &[String], run: &str) -> anyhow::Result<f64> {
    let exchange = format!("{}.upload_data", args.exchange_prefix);
    let (count, conn) = counting_consumer(&args.amqp_url, &exchange, PRODUCT, &format!("bench.pipeline.{run}")).await?;
    let ts = now_ms()?;
    let events: Vec<Value> = (0..args.events)
        .map(|i| {
            let user = format!("{PRODUCT}/{}", devices[i % devices.len()]);
            publish_event(&user, &format!("{run}-{i:08}"), &payload(i), ts + i as i64)
        })
        .collect();
    let bodies = bodies(events, args.events_per_request);
    let before = cpu_snapshot(COMPONENTS);
    let started = Instant::now();
    let hist = send_webhooks(args, bodies).await?;
    let acked = started.elapsed().as_secs_f64();
    wait_count(&count, args.events as u64, Duration::from_secs(600)).await?;
    let done = started.elapsed().as_secs_f64();
    let after = cpu_snapshot(COMPONENTS);
    drop_queue(conn, &format!("bench.pipeline.{run}")).await?;
    let rate = args.events as f64 / done;
    println!(
        "| pipeline ({run}): webhook → Redis dedup → PostgreSQL (+outbox) → RabbitMQ confirmed → consumer | {} events, {} per request, {} connections x {} pipelined | **{rate:.0} events/s** end to end ({:.0}/s acknowledged) | pipelined round p50 {:.1} ms / p99 {:.1} ms; CPU: {} |",
        args.events,
        args.events_per_request,
        args.connections,
        args.pipeline,
        args.events as f64 / acked,
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        cpu_report(COMPONENTS, &before, &after, done),
    );
    Ok(rate)
}

type FloorRow = (String, String, Vec<u8>, Vec<u8>);

async fn floor(args: &Args, devices: &[String]) -> anyhow::Result<f64> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(args.floor_workers as u32)
        .connect(&args.database_url)
        .await?;
    pool.execute("DROP TABLE IF EXISTS bench_floor; CREATE TABLE bench_floor (LIKE device_messages INCLUDING ALL)")
        .await?;
    let exchange = "bench.floor.upload_data";
    let (count, conn) = counting_consumer(&args.amqp_url, exchange, PRODUCT, "bench.floor").await?;
    let ts = now_ms()?;
    let rows: Arc<Vec<FloorRow>> = Arc::new(
        (0..args.events)
            .map(|i| {
                let device = devices[i % devices.len()].clone();
                let id = format!("floor-{i:08}");
                let p = payload(i);
                let body = json!({"event_id": uuid::Uuid::new_v4().to_string(), "product_id": PRODUCT,
                    "device_id": device, "message_id": id, "data_type": "telemetry", "payload": B64.encode(&p),
                    "encoding": "base64", "sent_at": ts, "received_at": ts})
                .to_string();
                (device, id, p.into_bytes(), body.into_bytes())
            })
            .collect(),
    );
    let before = cpu_snapshot(COMPONENTS);
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..args.floor_workers {
        let (pool, rows, next, url) = (pool.clone(), rows.clone(), next.clone(), args.amqp_url.clone());
        let batch = args.floor_batch;
        tasks.push(tokio::spawn(async move {
            let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await?;
            let ch = conn.create_channel().await?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            loop {
                let start = next.fetch_add(batch as u64, Ordering::Relaxed) as usize;
                if start >= rows.len() {
                    break;
                }
                let chunk = &rows[start..(start + batch).min(rows.len())];
                let json: Vec<Option<&str>> = chunk.iter().map(|r| std::str::from_utf8(&r.2).ok()).collect();
                sqlx::query(
                    "INSERT INTO bench_floor
                         (product_id, device_id, message_id, data_type, payload, payload_json, sent_at, stored_at)
                     SELECT 'bench', d, m, 'telemetry', b, j::JSONB, $5, $5
                     FROM UNNEST($1::TEXT[], $2::TEXT[], $3::BYTEA[], $4::TEXT[]) AS u(d, m, b, j)",
                )
                .bind(chunk.iter().map(|r| r.0.as_str()).collect::<Vec<_>>())
                .bind(chunk.iter().map(|r| r.1.as_str()).collect::<Vec<_>>())
                .bind(chunk.iter().map(|r| r.2.as_slice()).collect::<Vec<_>>())
                .bind(json)
                .bind(ts)
                .execute(&pool)
                .await?;
                let mut confirms = Vec::with_capacity(chunk.len());
                for r in chunk {
                    let props = lapin::BasicProperties::default().with_delivery_mode(2);
                    confirms.push(
                        ch.basic_publish(exchange.into(), PRODUCT.into(), BasicPublishOptions::default(), &r.3, props)
                            .await?,
                    );
                }
                for c in confirms {
                    ensure!(c.await?.is_ack(), "nack");
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    wait_count(&count, args.events as u64, Duration::from_secs(600)).await?;
    let done = started.elapsed().as_secs_f64();
    let after = cpu_snapshot(COMPONENTS);
    drop_queue(conn, "bench.floor").await?;
    let rate = args.events as f64 / done;
    println!(
        "| floor: batched UNNEST insert ({} rows) + confirmed publish, {} workers → consumer | {} events | **{rate:.0} events/s** | CPU: {} |",
        args.floor_batch,
        args.floor_workers,
        args.events,
        cpu_report(COMPONENTS, &before, &after, done)
    );
    pool.execute("DROP TABLE bench_floor").await?;
    Ok(rate)
}

async fn presence(args: &Args, devices: &[String]) -> anyhow::Result<()> {
    let exchange = format!("{}.device_connection", args.exchange_prefix);
    let (count, conn) = counting_consumer(&args.amqp_url, &exchange, PRODUCT, "bench.presence").await?;
    let ts = now_ms()?;
    let mut events = Vec::with_capacity(args.presence_pairs * 2);
    for i in 0..args.presence_pairs {
        let user = format!("{PRODUCT}/{}", devices[i % devices.len()]);
        let connected_at = ts + i as i64;
        let peer = format!("10.0.{}.{}:{}", i / 65_000 % 250, i / 250 % 250, 1024 + i % 60_000);
        events.push(json!({"event": "client.connected", "clientid": user, "username": user, "peername": peer,
            "proto_ver": 5, "keepalive": 60, "clean_start": true, "connected_at": connected_at,
            "timestamp": connected_at, "node": "bench@127.0.0.1"}));
        events.push(json!({"event": "client.disconnected", "clientid": user, "username": user, "peername": peer,
            "reason": "normal", "connected_at": connected_at, "disconnected_at": connected_at + 500,
            "timestamp": connected_at + 500, "node": "bench@127.0.0.1"}));
    }
    let n = events.len();
    let bodies = bodies(events, args.events_per_request);
    let before = cpu_snapshot(COMPONENTS);
    let started = Instant::now();
    let hist = send_webhooks(args, bodies).await?;
    wait_count(&count, n as u64, Duration::from_secs(600)).await?;
    let done = started.elapsed().as_secs_f64();
    let after = cpu_snapshot(COMPONENTS);
    drop_queue(conn, "bench.presence").await?;
    println!(
        "| presence: client.connected/disconnected webhooks → sessions + online flag + outbox → RabbitMQ | {n} events over {} devices | **{:.0} events/s** end to end | pipelined round p50 {:.1} ms / p99 {:.1} ms; CPU: {} |",
        devices.len(),
        n as f64 / done,
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        cpu_report(COMPONENTS, &before, &after, done)
    );
    Ok(())
}

/// Averages of iothub's own histograms (from /metrics): events per transaction and time per batch.
async fn internals(args: &Args, http: &reqwest::Client) -> anyhow::Result<()> {
    let text = http.get(format!("{}/metrics", args.base_url)).send().await?.text().await?;
    let mut sums: HashMap<String, f64> = HashMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        if let Some((name, value)) = line.rsplit_once(' ') {
            if name.ends_with("_sum") || name.ends_with("_count") {
                sums.insert(name.to_string(), value.parse().unwrap_or(0.0));
            }
        }
    }
    let get = |name: &str| sums.get(name).copied().unwrap_or(0.0);
    let avg = |base: &str| {
        let (s, c) = (get(&format!("{base}_sum")), get(&format!("{base}_count")));
        if c > 0.0 {
            s / c
        } else {
            0.0
        }
    };
    println!(
        "| iothub internals (whole run) | {:.0} ingest batches | avg {:.0} events per transaction, {:.1} ms per batch (dedup + transaction) | relay: {:.1} ms per confirmed publish round |",
        get("iothub_ingest_batch_seconds_count"),
        avg("iothub_ingest_batch_events"),
        avg("iothub_ingest_batch_seconds") * 1000.0,
        avg("iothub_events_publish_seconds") * 1000.0,
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build()?;
    let devices = register(&args, &http).await.context("registering the fleet")?;
    println!("| run | volume | throughput | notes |\n|---|---|---|---|");
    // Warm-up (connections, caches, query plans).
    let warm = Args { events: 5_000.min(args.events), ..args.clone() };
    pipeline(&warm, &devices, "warm-up").await.context("warm-up")?;
    let floor_rate = floor(&args, &devices).await.context("floor")?;
    let rate = pipeline(&args, &devices, "measured").await.context("pipeline")?;
    println!("| pipeline / floor | | **{:.2}** | |", rate / floor_rate);
    presence(&args, &devices).await.context("presence")?;
    internals(&args, &http).await?;
    if let Some(pid) = args.iothub_pid {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kb: f64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        println!("| iothub RSS after the run | | {:.0} MiB | |", kb / 1024.0);
    }
    Ok(())
}
