//! `iothub-sim`: a fleet of simulated devices in one process, built on the device SDK.
//!
//! It registers devices through iothub's REST API (or loads the triples a previous run saved), connects them
//! at a bounded rate, publishes data and status at a set interval, and behaves like firmware: answers
//! commands and RPCs, applies desired shadow state, walks OTA upgrades to 100 % and reports the new version.
//! Live counters go to stdout every second, with the process RSS per connected device, so the same binary
//! serves demos, load tests and the connection benchmark.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use iothub_device::{CommandKind, Device, DeviceConfig, Event};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(name = "iothub-sim", version, about = "Simulate a fleet of iothub devices")]
struct Args {
    /// iothub's REST API (used only to register devices).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    api: String,
    /// Business API key with `write` scope (e.g. the embedded profile's iothub-data/admin-api-key).
    #[arg(long, env = "IOTHUB_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Read the API key from this file instead.
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// MQTT broker host:port the devices connect to.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt: String,
    /// Product of the simulated devices (created when registering, if missing).
    #[arg(long, default_value = "sim")]
    product: String,
    /// Number of devices.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Register the devices first (ids `{prefix}{n:06}`); otherwise load them from --devices-file.
    #[arg(long)]
    register: bool,
    /// Device id prefix when registering.
    #[arg(long, default_value = "sim-")]
    prefix: String,
    /// Where the triples are saved after registering and loaded from otherwise (mode 0600: it holds secrets).
    #[arg(long, default_value = "sim-devices.json")]
    devices_file: PathBuf,
    /// New connections per second.
    #[arg(long, default_value_t = 500)]
    connect_rate: u32,
    /// Each device uploads a `telemetry` data point this often (0: never).
    #[arg(long, default_value_t = 5000)]
    data_interval_ms: u64,
    /// Each device updates its status this often (0: only once, at connect).
    #[arg(long, default_value_t = 60_000)]
    status_interval_ms: u64,
    /// MQTT keepalive of every device.
    #[arg(long, default_value_t = 60)]
    keep_alive_secs: u64,
    /// Stop after this long (0: run until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    duration_secs: u64,
    /// Print one final JSON summary line (for benchmarks) in addition to the live counters.
    #[arg(long)]
    json_summary: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Triple {
    product_id: String,
    device_id: String,
    secret: String,
}

struct Counters {
    total: u64,
    started: Instant,
    /// Milliseconds from start until every device was connected at once (0: not yet).
    all_connected_ms: AtomicU64,
    connected: AtomicU64,
    connects: AtomicU64,
    connect_failures: AtomicU64,
    disconnects: AtomicU64,
    data: AtomicU64,
    status: AtomicU64,
    commands: AtomicU64,
    rpcs: AtomicU64,
    messages: AtomicU64,
    shadow: AtomicU64,
    ota: AtomicU64,
    errors: AtomicU64,
}

impl Counters {
    fn new(total: u64) -> Self {
        let zero = || AtomicU64::new(0);
        Self {
            total,
            started: Instant::now(),
            all_connected_ms: zero(),
            connected: zero(),
            connects: zero(),
            connect_failures: zero(),
            disconnects: zero(),
            data: zero(),
            status: zero(),
            commands: zero(),
            rpcs: zero(),
            messages: zero(),
            shadow: zero(),
            ota: zero(),
            errors: zero(),
        }
    }

    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
    fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (host, port) = args.mqtt.rsplit_once(':').context("--mqtt must be host:port")?;
    let port: u16 = port.parse().context("--mqtt port")?;
    let triples = if args.register { register(&args).await? } else { load(&args)? };
    println!(
        "{} devices of product {}; connecting at {}/s to {}",
        triples.len(),
        args.product,
        args.connect_rate,
        args.mqtt
    );

    let counters = Arc::new(Counters::new(triples.len() as u64));
    let started = counters.started;
    let mut pacing = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(args.connect_rate.max(1))));
    let reporter = tokio::spawn(report(counters.clone(), triples.len() as u64, started));
    let mut devices = Vec::with_capacity(triples.len());
    for triple in triples {
        pacing.tick().await;
        let mut config = DeviceConfig::new(triple.product_id, triple.device_id, triple.secret, host, port);
        config.keep_alive = Duration::from_secs(args.keep_alive_secs);
        config.connect_timeout = Duration::from_secs(30);
        config.event_capacity = 16;
        devices.push(tokio::spawn(simulate(config, counters.clone(), args.data_interval_ms, args.status_interval_ms)));
    }
    let connect_done = started.elapsed();
    let stop = async {
        if args.duration_secs > 0 {
            tokio::time::sleep(Duration::from_secs(args.duration_secs).saturating_sub(started.elapsed())).await;
        } else {
            let _ = tokio::signal::ctrl_c().await;
        }
    };
    stop.await;
    reporter.abort();
    let elapsed = started.elapsed().as_secs_f64();
    let rss = rss_bytes().unwrap_or_default();
    let connected = Counters::get(&counters.connected);
    let summary = json!({
        "devices": devices.len(),
        "connected": connected,
        "connect_failures": Counters::get(&counters.connect_failures),
        "connect_spawn_secs": connect_done.as_secs_f64(),
        "all_connected_secs": Counters::get(&counters.all_connected_ms) as f64 / 1000.0,
        "elapsed_secs": elapsed,
        "data": Counters::get(&counters.data),
        "status": Counters::get(&counters.status),
        "commands": Counters::get(&counters.commands),
        "rpcs": Counters::get(&counters.rpcs),
        "errors": Counters::get(&counters.errors),
        "rss_bytes": rss,
        "rss_per_connected_device_bytes": rss.checked_div(connected).unwrap_or_default(),
    });
    if args.json_summary {
        println!("{summary}");
    }
    for d in devices {
        d.abort();
    }
    Ok(())
}

/// One device for its whole life: connect (the SDK retries by itself), then behave.
async fn simulate(config: DeviceConfig, counters: Arc<Counters>, data_ms: u64, status_ms: u64) {
    // A refusal is not always final: an overloaded hub times out the broker's auth call, which the broker
    // reports as "not authorized". Like a real device, try again later, with jitter so a fleet spreads out.
    let (device, mut events) = loop {
        match Device::connect(config.clone()).await {
            Ok(connected) => break connected,
            Err(e) => {
                Counters::inc(&counters.connect_failures);
                if Counters::get(&counters.connect_failures) <= 10 {
                    eprintln!("{}: {e} (retrying)", config.device_id);
                }
                tokio::time::sleep(Duration::from_millis(2_000 + rand_below(3_000))).await;
            }
        }
    };
    let mut data = interval(data_ms);
    let mut status = interval(status_ms);
    let mut seq = 0u64;
    let mut firmware = "1.0.0".to_string();
    loop {
        tokio::select! {
            event = events.next() => {
                let Some(event) = event else { break };
                if let Err(e) = on_event(&device, event, &counters, &mut firmware).await {
                    Counters::inc(&counters.errors);
                    eprintln!("{}: {e}", device.device_id());
                }
            }
            _ = tick(&mut data) => {
                seq += 1;
                let reading = json!({"seq": seq, "celsius": 20.0 + (seq % 50) as f64 / 10.0});
                match device.upload_data("telemetry", reading.to_string().into_bytes()).await {
                    Ok(_) => Counters::inc(&counters.data),
                    Err(_) => Counters::inc(&counters.errors),
                }
            }
            _ = tick(&mut status) => {
                match device.update_status(&json!({"firmware_version": firmware, "uptime_s": seq})).await {
                    Ok(_) => Counters::inc(&counters.status),
                    Err(_) => Counters::inc(&counters.errors),
                }
            }
        }
    }
}

async fn on_event(
    device: &Device,
    event: Event,
    counters: &Counters,
    firmware: &mut String,
) -> iothub_device::Result<()> {
    match event {
        Event::Connected { .. } => {
            Counters::inc(&counters.connects);
            let now_connected = counters.connected.fetch_add(1, Ordering::Relaxed) + 1;
            if now_connected == counters.total {
                let ms = counters.started.elapsed().as_millis() as u64;
                let _ = counters.all_connected_ms.compare_exchange(0, ms, Ordering::Relaxed, Ordering::Relaxed);
            }
            device.update_status(&json!({"firmware_version": firmware})).await?;
            Counters::inc(&counters.status);
        }
        Event::Disconnected { .. } => {
            Counters::inc(&counters.disconnects);
            counters.connected.fetch_sub(1, Ordering::Relaxed);
        }
        Event::Command(command) => {
            let reply = match command.kind {
                CommandKind::Rpc => {
                    Counters::inc(&counters.rpcs);
                    json!({"ok": true, "command": command.name, "celsius": 21.5}).to_string()
                }
                _ => {
                    Counters::inc(&counters.commands);
                    format!("done:{}", command.name)
                }
            };
            command.respond(reply).await?;
        }
        Event::Message(message) => {
            Counters::inc(&counters.messages);
            device.send_to_device(&message.sender, b"ack".to_vec()).await?;
        }
        Event::ShadowDesired(desired) => {
            Counters::inc(&counters.shadow);
            desired.applied().await?;
        }
        Event::OtaUpgrade(upgrade) => {
            Counters::inc(&counters.ota);
            let reporter = upgrade.reporter();
            for percent in [0, 50, 100] {
                reporter.progress(percent).await?;
            }
            *firmware = upgrade.version.clone();
            device.update_status(&upgrade.success_status()).await?;
        }
        _ => {}
    }
    Ok(())
}

fn interval(ms: u64) -> Option<tokio::time::Interval> {
    (ms > 0).then(|| {
        // Spread devices over the period so a fleet does not publish in bursts.
        let jitter = Duration::from_millis(rand_below(ms));
        let mut i = tokio::time::interval_at(tokio::time::Instant::now() + jitter, Duration::from_millis(ms));
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    })
}

async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// A random delay in `0..n` ms, spreading a fleet's timers and retries.
fn rand_below(n: u64) -> u64 {
    use rand::Rng;
    rand::thread_rng().gen_range(0..n.max(1))
}

async fn report(counters: Arc<Counters>, total: u64, started: Instant) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    let (mut last_data, mut last_t) = (0u64, Instant::now());
    loop {
        every.tick().await;
        let c = &counters;
        let data = Counters::get(&c.data);
        let rate = (data - last_data) as f64 / last_t.elapsed().as_secs_f64().max(0.001);
        (last_data, last_t) = (data, Instant::now());
        let connected = Counters::get(&c.connected);
        let rss = rss_bytes().unwrap_or_default();
        println!(
            "t={:>5.1}s connected={connected}/{total} failures={} drops={} data={data} ({rate:.0}/s) status={} \
             cmds={} rpc={} m2m={} shadow={} ota={} errors={} rss={:.1}MiB ({:.1}KiB/device)",
            started.elapsed().as_secs_f64(),
            Counters::get(&c.connect_failures),
            Counters::get(&c.disconnects),
            Counters::get(&c.status),
            Counters::get(&c.commands),
            Counters::get(&c.rpcs),
            Counters::get(&c.messages),
            Counters::get(&c.shadow),
            Counters::get(&c.ota),
            Counters::get(&c.errors),
            rss as f64 / 1048576.0,
            if connected > 0 { rss as f64 / 1024.0 / connected as f64 } else { 0.0 },
        );
    }
}

fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

fn api_key(args: &Args) -> anyhow::Result<String> {
    match (&args.api_key, &args.api_key_file) {
        (Some(key), _) => Ok(key.clone()),
        (None, Some(file)) => {
            Ok(std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?.trim().to_string())
        }
        (None, None) => bail!("--register needs --api-key, IOTHUB_API_KEY or --api-key-file"),
    }
}

/// Creates the product if missing and registers the devices in chunks; saves the triples.
async fn register(args: &Args) -> anyhow::Result<Vec<Triple>> {
    let key = api_key(args)?;
    let http = reqwest::Client::new();
    let api = args.api.trim_end_matches('/');
    let resp =
        http.post(format!("{api}/api/v1/products")).bearer_auth(&key).json(&json!({"id": args.product})).send().await?;
    if !(resp.status().is_success() || resp.status() == reqwest::StatusCode::CONFLICT) {
        bail!("create product {}: {} {}", args.product, resp.status(), resp.text().await.unwrap_or_default());
    }
    let mut triples = Vec::with_capacity(args.devices);
    let ids: Vec<String> = (0..args.devices).map(|n| format!("{}{n:06}", args.prefix)).collect();
    for chunk in ids.chunks(5_000) {
        let body = json!({"devices": chunk.iter().map(|id| json!({"device_id": id})).collect::<Vec<_>>()});
        let resp = http
            .post(format!("{api}/api/v1/products/{}/devices/bulk", args.product))
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("register devices: {} {}", resp.status(), resp.text().await.unwrap_or_default());
        }
        #[derive(Deserialize)]
        struct Registered {
            items: Vec<Triple>,
        }
        triples.extend(resp.json::<Registered>().await?.items);
    }
    save(&args.devices_file, &triples)?;
    println!("registered {} devices; triples saved to {}", triples.len(), args.devices_file.display());
    Ok(triples)
}

fn save(path: &PathBuf, triples: &[Triple]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).with_context(|| format!("write {}", path.display()))?;
    file.write_all(&serde_json::to_vec_pretty(triples)?)?;
    Ok(())
}

fn load(args: &Args) -> anyhow::Result<Vec<Triple>> {
    let bytes = std::fs::read(&args.devices_file)
        .with_context(|| format!("read {} (register first with --register)", args.devices_file.display()))?;
    let mut triples: Vec<Triple> = serde_json::from_slice(&bytes)?;
    triples.truncate(args.devices);
    Ok(triples)
}
