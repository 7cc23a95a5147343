//! `iothub-bench-commands`: device control out, measured through the real broker. `scripts/bench-commands.sh`
//! starts PostgreSQL (fsync on), Redis, RabbitMQ and a release iothub (production profile, bundled RMQTT as
//! the broker), then calls this.
//!
//! - **commands**: `--concurrency` HTTP callers POST commands to online devices. Each accepted command is
//!   logged (PostgreSQL, with its `queued` event), published through the broker's REST API and recorded
//!   `sent` (with its event) before the 201. Measured until the devices (rumqttc) received every one.
//! - **broker round trip**: device A sends an M2M message to device B, which answers A the same way: two
//!   publishes through the broker, the MQTT part of an RPC (iothub → device → iothub).
//! - **rpc**: one caller at a time POSTs `/rpc`; the device answers `rpc_resp` at once. Latency is
//!   HTTP request → device reply through webhook, command log and reply hub → HTTP response. "Added" is the
//!   RPC latency minus the broker round trip at the same percentile. Run twice: back to back (each RPC's
//!   trailing work overlaps the next) and paced (`--rpc-pace-ms` between RPCs, ~90 RPC/s by default).
//! - **floor** (with `--database-url` and `--amqp-url`): the work every accepted command needs, done the
//!   cheapest correct way without iothub, on the same services: a second RMQTT composed exactly as iothub
//!   bundles it (REST publish API, web-hook, auth-http) whose hooks a trivial sink answers; batched `UNNEST`
//!   inserts of the commands into a copy of `device_commands` (durable commit); one REST publish per command;
//!   set-based `sent` and `delivered` updates; the `queued`, `sent` and `delivered` events published
//!   persistent with publisher confirms to a consumer. It leaves out the business API request, the device
//!   and idempotency checks and the outbox, so it is an upper bound for any implementation on this machine.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use clap::Parser;
use hdrhistogram::Histogram;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};

use iothub_bench::{
    counting_consumer, cpu_report, cpu_snapshot, drop_queue, machine_busy_seconds, machine_cpus, now_ms,
    own_threads_cpu_seconds, wait_count, COMPONENTS,
};

#[derive(Debug, Clone, Parser)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    base_url: String,
    #[arg(long)]
    admin_key: String,
    /// The broker's MQTT listener.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt: String,
    #[arg(long, default_value_t = 50)]
    devices: usize,
    #[arg(long, default_value_t = 20_000)]
    commands: usize,
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long, default_value_t = 2_000)]
    rpcs: usize,
    #[arg(long, default_value_t = 2_000)]
    pings: usize,
    /// Pause before each RPC of the paced run.
    #[arg(long, default_value_t = 10)]
    rpc_pace_ms: u64,
    /// PostgreSQL and RabbitMQ of the floor run (both or neither).
    #[arg(long)]
    database_url: Option<String>,
    #[arg(long)]
    amqp_url: Option<String>,
    /// iothub's `rabbitmq.exchange_prefix`.
    #[arg(long, default_value = "iothub.events")]
    exchange_prefix: String,
    /// Floor: commands per batch (one insert, its publishes, one `sent` update) and concurrent batches.
    #[arg(long, default_value_t = 64)]
    floor_batch: usize,
    #[arg(long, default_value_t = 4)]
    floor_workers: usize,
    /// Only the floor (to tune its batch size and workers).
    #[arg(long)]
    floor_only: bool,
}

const PRODUCT: &str = "benchcmd";

async fn register(args: &Args, http: &reqwest::Client) -> anyhow::Result<Vec<(String, String)>> {
    let auth = format!("Bearer {}", args.admin_key);
    let resp = http
        .post(format!("{}/api/v1/products", args.base_url))
        .header("authorization", &auth)
        .json(&json!({"id": PRODUCT, "name": "bench"}))
        .send()
        .await?;
    ensure!(resp.status().is_success() || resp.status().as_u16() == 409, "create product: {}", resp.status());
    let resp = http
        .post(format!("{}/api/v1/products/{PRODUCT}/devices/bulk", args.base_url))
        .header("authorization", &auth)
        .json(&json!({"count": args.devices}))
        .send()
        .await?;
    ensure!(resp.status().is_success(), "register: {} {}", resp.status(), resp.text().await?);
    let body: Value = resp.json().await?;
    Ok(body["items"]
        .as_array()
        .context("items")?
        .iter()
        .map(|d| (d["device_id"].as_str().unwrap().to_string(), d["secret"].as_str().unwrap().to_string()))
        .collect())
}

/// A device that counts commands, answers RPCs at once and bounces M2M pings back to their sender.
async fn device(
    addr: &str,
    id: &str,
    secret: &str,
    received: Arc<AtomicU64>,
    pongs: tokio::sync::mpsc::UnboundedSender<Instant>,
) -> anyhow::Result<AsyncClient> {
    let (host, port) = addr.rsplit_once(':').context("mqtt address")?;
    let mut opts = MqttOptions::new(format!("{PRODUCT}/{id}"), host, port.parse()?);
    opts.set_credentials(format!("{PRODUCT}/{id}"), secret);
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_inflight(200);
    let (client, mut eventloop) = AsyncClient::new(opts, 1_000);
    // A device answering at once writes its PUBACK and its reply back to back; with Nagle on, the reply
    // waits for the broker's delayed ACK (~40 ms). Device SDKs should disable it (ours does).
    eventloop.network_options.set_tcp_nodelay(true);
    loop {
        match eventloop.poll().await? {
            Event::Incoming(Packet::ConnAck(_)) => break,
            _ => continue,
        }
    }
    let me = client.clone();
    let id = id.to_string();
    tokio::spawn(async move {
        let mut n = 0u64;
        while let Ok(event) = eventloop.poll().await {
            let Event::Incoming(Packet::Publish(p)) = event else { continue };
            let levels: Vec<&str> = p.topic.split('/').collect();
            match levels[..] {
                ["cmd", ..] => {
                    received.fetch_add(1, Ordering::Relaxed);
                }
                ["rpc", product, _, name, _, request_id, ..] => {
                    n += 1;
                    let topic = format!("rpc_resp/{product}/{id}/{name}/{request_id}/r{n}");
                    let _ = me.try_publish(topic, QoS::AtLeastOnce, false, r#"{"ok":true}"#);
                }
                // m2m/{p}/{me}/{sender}/{msgId}: "ping" goes back to the sender as "pong".
                ["m2m", product, _, sender, msg] if &p.payload[..] == b"ping" => {
                    let _ =
                        me.try_publish(format!("m2m/{product}/{sender}/{id}/{msg}"), QoS::AtMostOnce, false, "pong");
                }
                ["m2m", ..] => {
                    let _ = pongs.send(Instant::now());
                }
                _ => {}
            }
        }
    });
    Ok(client)
}

fn line(name: &str, h: &Histogram<u64>) -> String {
    format!(
        "{name}: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.9) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let http = reqwest::Client::builder().pool_max_idle_per_host(args.concurrency * 2).tcp_nodelay(true).build()?;
    let devices = register(&args, &http).await?;
    let hub_rate = if args.floor_only { None } else { Some(hub_runs(&args, &http, &devices).await?) };
    if let (Some(database_url), Some(amqp_url)) = (&args.database_url, &args.amqp_url) {
        let floor_rate = floor(&args, &devices, database_url, amqp_url).await.context("floor")?;
        if let Some(hub_rate) = hub_rate {
            println!("commands: iothub / floor = {:.2}", hub_rate / floor_rate);
        }
    }
    Ok(())
}

/// The runs through iothub: the command burst, the broker round trip and RPC latency. Returns the
/// burst's commands accepted+published per second.
async fn hub_runs(args: &Args, http: &reqwest::Client, devices: &[(String, String)]) -> anyhow::Result<f64> {
    let received = Arc::new(AtomicU64::new(0));
    let (pong_tx, mut pong_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut clients = Vec::new();
    for (id, secret) in devices {
        clients.push(device(&args.mqtt, id, secret, received.clone(), pong_tx.clone()).await?);
    }
    // Wait until iothub sees every device online (commands to offline devices would only be queued).
    let auth = format!("Bearer {}", args.admin_key);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let product: Value = http
            .get(format!("{}/api/v1/products/{PRODUCT}", args.base_url))
            .header("authorization", &auth)
            .send()
            .await?
            .json()
            .await?;
        if product["online_count"].as_u64() == Some(args.devices as u64) {
            break;
        }
        ensure!(Instant::now() < deadline, "devices did not all come online: {product}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let Some(database_url) = &args.database_url {
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(database_url).await?;
        seed_history(&pool, "device_commands", devices, args.commands).await?;
        pool.close().await;
    }
    println!(
        "{} devices online; {} commands by {} callers{}",
        args.devices,
        args.commands,
        args.concurrency,
        if args.database_url.is_some() {
            format!(" (command log seeded with {} finished ones)", args.commands)
        } else {
            String::new()
        }
    );

    // Commands: accepted (logged + published + recorded) and delivered.
    let next = Arc::new(AtomicU64::new(0));
    let latency = Arc::new(std::sync::Mutex::new(Histogram::<u64>::new(3)?));
    // Consumers bind queues in production: the state events are persisted and delivered, as in the floor.
    let consumer = match &args.amqp_url {
        Some(url) => {
            let exchange = format!("{}.command_state", args.exchange_prefix);
            Some(counting_consumer(url, &exchange, PRODUCT, "bench.hub.commands").await?)
        }
        None => None,
    };
    let before = cpu_snapshot(COMPONENTS);
    let busy_before = machine_busy_seconds();
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency {
        let (http, auth, next, latency, devices) =
            (http.clone(), auth.clone(), next.clone(), latency.clone(), devices.to_vec());
        let (base, total) = (args.base_url.clone(), args.commands as u64);
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return anyhow::Ok(());
                }
                let device = &devices[i as usize % devices.len()].0;
                let t = Instant::now();
                let resp = http
                    .post(format!("{base}/api/v1/products/{PRODUCT}/devices/{device}/commands"))
                    .header("authorization", &auth)
                    .json(&json!({"name": "set", "payload": {"seq": i}, "qos": 1}))
                    .send()
                    .await?;
                ensure!(resp.status().as_u16() == 201, "command: {} {}", resp.status(), resp.text().await?);
                latency.lock().unwrap().record(t.elapsed().as_micros() as u64)?;
            }
        }));
    }
    for w in workers {
        w.await??;
    }
    let accepted = started.elapsed();
    while received.load(Ordering::Relaxed) < args.commands as u64 {
        ensure!(
            started.elapsed() < Duration::from_secs(300),
            "devices got {} of {}",
            received.load(Ordering::Relaxed),
            args.commands
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let delivered = started.elapsed();
    println!(
        "commands: {:.0}/s accepted+published ({} in {:.2} s), all delivered to devices after {:.2} s ({:.0}/s)",
        args.commands as f64 / accepted.as_secs_f64(),
        args.commands,
        accepted.as_secs_f64(),
        delivered.as_secs_f64(),
        args.commands as f64 / delivered.as_secs_f64()
    );
    println!("{}", line("command request latency", &latency.lock().unwrap()));
    // End to end, as the floor is timed: every command delivered and its queued, sent and delivered
    // events with the consumer.
    let complete = match consumer {
        Some((events, conn)) => {
            wait_count(&events, 3 * args.commands as u64, Duration::from_secs(300)).await.context("state events")?;
            let complete = started.elapsed();
            drop_queue(conn, "bench.hub.commands").await?;
            println!(
                "commands end to end: {:.0}/s (delivered, and the {} queued/sent/delivered events consumed, after {:.2} s)",
                args.commands as f64 / complete.as_secs_f64(),
                3 * args.commands,
                complete.as_secs_f64()
            );
            complete
        }
        None => delivered,
    };
    let after = cpu_snapshot(COMPONENTS);
    println!(
        "CPU until then (share of one core): {}; machine busy {}",
        cpu_report(COMPONENTS, &before, &after, complete.as_secs_f64()),
        busy_report(busy_before, complete.as_secs_f64())
    );
    // Every command raises a delivery webhook; the RPC phase must not queue behind them.
    let drain = Instant::now();
    loop {
        let resp = http
            .post(format!("{}/api/v1/products/{PRODUCT}/devices/{}/rpc", args.base_url, devices[0].0))
            .header("authorization", &auth)
            .json(&json!({"name": "probe", "timeout_ms": 2000}))
            .send()
            .await?;
        if resp.status().is_success() {
            break;
        }
        ensure!(drain.elapsed() < Duration::from_secs(300), "webhook backlog not drained");
    }
    println!("delivery-report webhooks drained {:.1} s after the last command", drain.elapsed().as_secs_f64());
    // The latency runs start on a quiet hub: the events of the burst (three or four per command) are
    // published to RabbitMQ first.
    let relay = Instant::now();
    loop {
        let text = http.get(format!("{}/metrics", args.base_url)).send().await?.text().await?;
        let queued = text
            .lines()
            .find_map(|l| l.strip_prefix("iothub_relay_queued_events "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if queued < 1.0 {
            break;
        }
        ensure!(relay.elapsed() < Duration::from_secs(300), "relay backlog not drained: {queued}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("event relay drained {:.1} s later", relay.elapsed().as_secs_f64());

    // Broker round trip: device 0 pings device 1 over M2M, device 1 answers.
    ensure!(devices.len() >= 2, "need two devices");
    let (a, b) = (&devices[0].0, &devices[1].0);
    let mut rtt = Histogram::<u64>::new(3)?;
    for i in 0..args.pings {
        let t = Instant::now();
        clients[0].publish(format!("m2m/{PRODUCT}/{b}/{a}/p{i}"), QoS::AtMostOnce, false, "ping").await?;
        let at = tokio::time::timeout(Duration::from_secs(5), pong_rx.recv()).await?.context("pong")?;
        rtt.record(at.duration_since(t).as_micros() as u64)?;
    }
    println!("{}", line("broker round trip (M2M ping-pong)", &rtt));

    // RPC, one at a time: back to back (each RPC's trailing work — its `sent` record, delivery reports,
    // events — overlaps the next one), then paced (the hub is idle when each one starts).
    for (label, pace) in [("rpc", None), ("rpc paced", Some(Duration::from_millis(args.rpc_pace_ms)))] {
        let mut rpc = Histogram::<u64>::new(3)?;
        for i in 0..args.rpcs {
            if let Some(pace) = pace {
                tokio::time::sleep(pace).await;
            }
            let device = &devices[i % devices.len()].0;
            let t = Instant::now();
            let resp = http
                .post(format!("{}/api/v1/products/{PRODUCT}/devices/{device}/rpc", args.base_url))
                .header("authorization", &auth)
                .json(&json!({"name": "read", "payload": "x", "timeout_ms": 5000}))
                .send()
                .await?;
            ensure!(resp.status().is_success(), "rpc: {} {}", resp.status(), resp.text().await?);
            rpc.record(t.elapsed().as_micros() as u64)?;
        }
        let what = match pace {
            None => format!("{label} latency (back to back)"),
            Some(p) => format!("{label} latency (one every {} ms)", p.as_millis()),
        };
        println!("{}", line(&what, &rpc));
        for q in [0.5, 0.99] {
            println!(
                "{label}: added over the broker round trip at p{}: {:.2} ms",
                (q * 100.0) as u32,
                (rpc.value_at_quantile(q) as f64 - rtt.value_at_quantile(q) as f64) / 1000.0
            );
        }
    }
    for c in clients {
        let _ = c.disconnect().await;
    }
    Ok(args.commands as f64 / complete.as_secs_f64())
}

/// The share of all the machine's CPUs busy over `wall` seconds since `before` (1.0 = saturated).
fn busy_share(before: f64, wall: f64) -> f64 {
    (machine_busy_seconds() - before) / wall / machine_cpus() as f64
}

/// The machine's busy time over `wall` seconds since `before`, e.g. "190% of 200%".
fn busy_report(before: f64, wall: f64) -> String {
    format!("{:.0}% of {}%", busy_share(before, wall) * machine_cpus() as f64 * 100.0, machine_cpus() * 100)
}

/// The floor's broker calls its hooks here: every client may connect and subscribe, and each delivery of
/// a command (`message_delivered`) hands `(device, request id)` to the floor's delivery recorder.
async fn hook_sink(delivered: tokio::sync::mpsc::UnboundedSender<(String, String)>) -> anyhow::Result<String> {
    use axum::routing::post;
    let app = axum::Router::new()
        .route("/broker/rmqtt/auth", post(|| async { axum::Json(json!({"result": "allow", "superuser": false})) }))
        .route("/broker/rmqtt/acl", post(|| async { axum::Json(json!({"result": "allow"})) }))
        .route(
            "/broker/rmqtt/webhook",
            post(move |body: axum::body::Bytes| {
                let delivered = delivered.clone();
                async move {
                    let Ok(event) = serde_json::from_slice::<Value>(&body) else {
                        return axum::http::StatusCode::BAD_REQUEST;
                    };
                    if event["action"] == "message_delivered" {
                        // cmd/{product}/{device}/{name}/{encoding}/{requestId}
                        let levels: Vec<&str> = event["topic"].as_str().unwrap_or_default().split('/').collect();
                        if let (Some(device), Some(request)) = (levels.get(2), levels.get(5)) {
                            let _ = delivered.send((device.to_string(), request.to_string()));
                        }
                    }
                    axum::http::StatusCode::OK
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

/// A `command_state` event as consumers would get it.
fn state_event(device: &str, request: &str, state: &str, at: i64) -> Vec<u8> {
    json!({"event_id": uuid::Uuid::new_v4().to_string(), "product_id": PRODUCT, "device_id": device,
        "request_id": request, "mode": "cmd", "name": "set", "state": state, "at": at})
    .to_string()
    .into_bytes()
}

/// Publishes `bodies` persistent and waits for every publisher confirm.
async fn publish_confirmed(ch: &lapin::Channel, exchange: &str, bodies: Vec<Vec<u8>>) -> anyhow::Result<()> {
    let mut confirms = Vec::with_capacity(bodies.len());
    for body in bodies {
        let props = lapin::BasicProperties::default().with_delivery_mode(2);
        confirms.push(
            ch.basic_publish(
                exchange.into(),
                PRODUCT.into(),
                lapin::options::BasicPublishOptions::default(),
                &body,
                props,
            )
            .await?,
        );
    }
    for c in confirms {
        ensure!(c.await?.is_ack(), "nack");
    }
    Ok(())
}

async fn confirm_channel(url: &str) -> anyhow::Result<(lapin::Connection, lapin::Channel)> {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default()).await?;
    Ok((conn, ch))
}

const FLOOR_SENT: &str = "UPDATE bench_cmd_floor AS c
     SET state = CASE WHEN c.state = 'queued' THEN 'sent' ELSE c.state END, sent_at = $3, attempts = c.attempts + 1
     FROM UNNEST($1::TEXT[], $2::TEXT[]) AS u(d, r)
     WHERE c.product_id = 'benchcmd' AND c.device_id = u.d AND c.request_id = u.r";
const FLOOR_DELIVERED: &str = "UPDATE bench_cmd_floor AS c
     SET state = 'delivered', delivered_at = $3
     FROM UNNEST($1::TEXT[], $2::TEXT[]) AS u(d, r)
     WHERE c.product_id = 'benchcmd' AND c.device_id = u.d AND c.request_id = u.r AND c.state IN ('queued', 'sent')";

/// Makes `table` look like a command log in service: `count` finished commands of the same devices, a day
/// old, and fresh statistics. On a young table without statistics the planner takes the
/// `(product, device, created_at, request_id)` index for key lookups (the estimates tie), which reads
/// every command of the device per lookup until autovacuum first analyzes the table; the floor measured
/// 835 commands/s that way and 2,600 with statistics.
async fn seed_history(
    pool: &sqlx::PgPool,
    table: &str,
    devices: &[(String, String)],
    count: usize,
) -> anyhow::Result<()> {
    use sqlx::Executor as _;
    sqlx::query(&format!(
        "INSERT INTO {table}
             (product_id, device_id, request_id, mode, name, payload_format, payload, qos, state, created_at)
         SELECT '{PRODUCT}', d[1 + i % cardinality(d)], 'h' || lpad(i::TEXT, 8, '0'), 'cmd', 'set', 'json', '{{}}',
                1, 'replied', $2 - 86400000 + i
         FROM generate_series(0, $3 - 1) AS i, (SELECT $1::TEXT[] AS d) AS ds
         ON CONFLICT DO NOTHING"
    ))
    .bind(devices.iter().map(|d| d.0.as_str()).collect::<Vec<_>>())
    .bind(now_ms()?)
    .bind(count as i64)
    .execute(pool)
    .await?;
    // Vacuumed (hint bits, visibility map, no autovacuum due during the run) and checkpointed, so the
    // seeding's own work does not land in the timed run.
    pool.execute(format!("VACUUM (ANALYZE) {table}").as_str()).await?;
    pool.execute("CHECKPOINT").await?;
    Ok(())
}

/// Runs a set-based update whose `UNNEST` input is sorted by key, so concurrent updates lock rows in one
/// order (the nested loop follows the array); a deadlock the planner still causes is retried a few times
/// (the statement rolled back as a whole, so a retry applies it once).
async fn update_in_key_order(
    pool: &sqlx::PgPool,
    statement: &'static str,
    devices: &[String],
    requests: &[String],
    at: i64,
) -> anyhow::Result<()> {
    let mut deadlocks = 0;
    loop {
        match sqlx::query(statement).bind(devices).bind(requests).bind(at).execute(pool).await {
            Ok(_) => return Ok(()),
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("40P01") && deadlocks < 5 => deadlocks += 1,
            Err(e) => return Err(e.into()),
        }
    }
}

async fn floor(args: &Args, devices: &[(String, String)], database_url: &str, amqp_url: &str) -> anyhow::Result<f64> {
    use iothub::adapters::embedded_broker::{EmbeddedBroker, EmbeddedBrokerSettings};
    use sqlx::Executor as _;
    let n = args.commands;
    let durable =
        sqlx::postgres::PgPoolOptions::new().max_connections(args.floor_workers as u32).connect(database_url).await?;
    // Like iothub's relaxed pool: losing a `sent`/`delivered` mark in a crash only repeats a report. The
    // updates are primary-key lookups: for a few hundred keys PostgreSQL would otherwise consider a hash
    // join over the whole table. (These hints only make the floor cheaper, never dearer.)
    let relaxed_options: sqlx::postgres::PgConnectOptions =
        database_url.parse::<sqlx::postgres::PgConnectOptions>()?.options([
            ("synchronous_commit", "off"),
            ("enable_seqscan", "off"),
            ("enable_hashjoin", "off"),
            ("enable_mergejoin", "off"),
        ]);
    let relaxed = sqlx::postgres::PgPoolOptions::new()
        .max_connections(args.floor_workers as u32 + 1)
        .connect_with(relaxed_options)
        .await?;
    durable
        .execute(
            "DROP TABLE IF EXISTS bench_cmd_floor; CREATE TABLE bench_cmd_floor (LIKE device_commands INCLUDING ALL)",
        )
        .await?;
    seed_history(&durable, "bench_cmd_floor", devices, n).await?;

    let (delivered_tx, mut delivered_rx) = tokio::sync::mpsc::unbounded_channel();
    let sink = hook_sink(delivered_tx).await?;
    let api_listen = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let api_token = uuid::Uuid::new_v4().to_string();
    let broker = EmbeddedBroker::start(EmbeddedBrokerSettings {
        mqtt_listen: "127.0.0.1:0".parse()?,
        tls: None,
        api_listen,
        hooks_base_url: sink,
        hook_token: uuid::Uuid::new_v4().to_string(),
        api_token: api_token.clone(),
        auto_subscribe_delay: None,
        identity_gate: true,
    })
    .await?;
    let received = Arc::new(AtomicU64::new(0));
    let (pong_tx, _pongs) = tokio::sync::mpsc::unbounded_channel();
    let mut clients = Vec::new();
    for (id, secret) in devices {
        clients.push(device(&broker.mqtt_addr().to_string(), id, secret, received.clone(), pong_tx.clone()).await?);
    }
    // Auto-subscriptions are made right after CONNACK; give them a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let exchange = "bench.floor.command_state";
    let (events, consumer) = counting_consumer(amqp_url, exchange, PRODUCT, "bench.floor.commands").await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.floor_batch * args.floor_workers)
        .tcp_nodelay(true)
        .build()?;
    let publish_url = format!("http://{api_listen}/api/v1/mqtt/publish");
    let devices: Arc<Vec<String>> = Arc::new(devices.iter().map(|d| d.0.clone()).collect());

    // One confirm channel per worker and one for the delivery recorder, opened before the clock starts.
    let mut channels = Vec::new();
    for _ in 0..=args.floor_workers {
        channels.push(confirm_channel(amqp_url).await?);
    }
    let before = cpu_snapshot(COMPONENTS);
    let broker_before = own_threads_cpu_seconds("rmqtt");
    let busy_before = machine_busy_seconds();
    let started = Instant::now();
    // Delivery reports: gathered while the previous update runs, applied set-based, then their events.
    let recorder = {
        let relaxed = relaxed.clone();
        let (conn, ch) = channels.pop().context("channel")?;
        tokio::spawn(async move {
            let _conn = conn;
            let mut applied = 0usize;
            let mut batch = Vec::new();
            while applied < n {
                let first =
                    tokio::time::timeout(Duration::from_secs(60), delivered_rx.recv()).await?.context("sink")?;
                batch.push(first);
                while batch.len() < 1_000 {
                    match delivered_rx.try_recv() {
                        Ok(d) => batch.push(d),
                        Err(_) => break,
                    }
                }
                let at = now_ms()?;
                batch.sort_unstable();
                let (d, r): (Vec<String>, Vec<String>) = batch.drain(..).unzip();
                update_in_key_order(&relaxed, FLOOR_DELIVERED, &d, &r, at).await?;
                let bodies = d.iter().zip(&r).map(|(d, r)| state_event(d, r, "delivered", at)).collect();
                publish_confirmed(&ch, exchange, bodies).await?;
                applied += d.len();
            }
            anyhow::Ok(())
        })
    };
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..args.floor_workers {
        let (durable, relaxed, http, next, devices) =
            (durable.clone(), relaxed.clone(), http.clone(), next.clone(), devices.clone());
        let (publish_url, auth, batch) = (publish_url.clone(), format!("Bearer {api_token}"), args.floor_batch);
        let (conn, ch) = channels.pop().context("channel")?;
        workers.push(tokio::spawn(async move {
            let _conn = conn;
            loop {
                let start = next.fetch_add(batch as u64, Ordering::Relaxed) as usize;
                if start >= n {
                    return anyhow::Ok(());
                }
                let range = start..(start + batch).min(n);
                let d: Vec<String> = range.clone().map(|i| devices[i % devices.len()].clone()).collect();
                let r: Vec<String> = range.clone().map(|i| format!("f{i:08}")).collect();
                let payloads: Vec<Vec<u8>> = range.map(|i| json!({"seq": i}).to_string().into_bytes()).collect();
                let at = now_ms()?;
                sqlx::query(
                    "INSERT INTO bench_cmd_floor
                         (product_id, device_id, request_id, mode, name, payload_format, payload, qos, state, created_at)
                     SELECT 'benchcmd', d, r, 'cmd', 'set', 'json', p, 1, 'queued', $4
                     FROM UNNEST($1::TEXT[], $2::TEXT[], $3::BYTEA[]) AS u(d, r, p)",
                )
                .bind(&d)
                .bind(&r)
                .bind(&payloads)
                .bind(at)
                .execute(&durable)
                .await?;
                let queued = d.iter().zip(&r).map(|(d, r)| state_event(d, r, "queued", at)).collect();
                let publishes = d.iter().zip(&r).zip(&payloads).map(|((d, r), p)| {
                    use base64::Engine as _;
                    let body = json!({"topic": format!("cmd/{PRODUCT}/{d}/set/json/{r}"),
                        "payload": base64::engine::general_purpose::STANDARD.encode(p), "encoding": "base64",
                        "qos": 1, "retain": false, "clientid": "floor"});
                    let request = http.post(&publish_url).header("authorization", &auth).json(&body).send();
                    async move {
                        let resp = request.await?;
                        ensure!(resp.status().is_success(), "publish: {} {}", resp.status(), resp.text().await?);
                        anyhow::Ok(())
                    }
                });
                let (queued, published) =
                    tokio::join!(publish_confirmed(&ch, exchange, queued), futures::future::try_join_all(publishes));
                queued?;
                published?;
                let at = now_ms()?;
                let mut keys: Vec<(String, String)> = d.iter().cloned().zip(r.iter().cloned()).collect();
                keys.sort_unstable();
                let (sorted_d, sorted_r): (Vec<String>, Vec<String>) = keys.into_iter().unzip();
                update_in_key_order(&relaxed, FLOOR_SENT, &sorted_d, &sorted_r, at).await?;
                let sent = d.iter().zip(&r).map(|(d, r)| state_event(d, r, "sent", at)).collect();
                publish_confirmed(&ch, exchange, sent).await?;
            }
        }));
    }
    for w in workers {
        w.await??;
    }
    recorder.await??;
    wait_count(&received, n as u64, Duration::from_secs(300)).await.context("devices")?;
    wait_count(&events, 3 * n as u64, Duration::from_secs(300)).await.context("events")?;
    let done = started.elapsed().as_secs_f64();
    let after = cpu_snapshot(COMPONENTS);
    let broker_cpu = (own_threads_cpu_seconds("rmqtt") - broker_before) / done * 100.0;
    let busy = busy_report(busy_before, done);
    let rate = n as f64 / done;
    println!(
        "commands floor: {rate:.0}/s ({n} in {done:.2} s: durable insert, REST publish, device, delivery report, \
         `sent` and `delivered` updates, 3 confirmed events each; batches of {}, {} workers)",
        args.floor_batch, args.floor_workers
    );
    println!(
        "floor CPU (share of one core): {}; of the generator's, the floor's RMQTT threads {broker_cpu:.0}%; \
         machine busy {busy}",
        cpu_report(COMPONENTS, &before, &after, done),
    );
    if busy_share(busy_before, done) < 0.9 {
        println!("warning: the machine was not saturated during the floor; it is not an upper bound at these settings");
    }
    for c in clients {
        let _ = c.disconnect().await;
    }
    drop_queue(consumer, "bench.floor.commands").await?;
    broker.stop().await;
    durable.execute("DROP TABLE bench_cmd_floor").await?;
    Ok(rate)
}
