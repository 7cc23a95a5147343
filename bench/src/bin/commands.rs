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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use clap::Parser;
use hdrhistogram::Histogram;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};

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
    let mut opts = MqttOptions::new(id, host, port.parse()?);
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
    let received = Arc::new(AtomicU64::new(0));
    let (pong_tx, mut pong_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut clients = Vec::new();
    for (id, secret) in &devices {
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
    println!("{} devices online; {} commands by {} callers", args.devices, args.commands, args.concurrency);

    // Commands: accepted (logged + published + recorded) and delivered.
    let next = Arc::new(AtomicU64::new(0));
    let latency = Arc::new(std::sync::Mutex::new(Histogram::<u64>::new(3)?));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency {
        let (http, auth, next, latency, devices) =
            (http.clone(), auth.clone(), next.clone(), latency.clone(), devices.clone());
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
    // Every command raises delivery webhooks (delivered, acked); the RPC phase must not queue behind them.
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
    Ok(())
}
