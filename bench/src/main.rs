//! `iothub-bench`: drives a running iothub over HTTP exactly as business systems and the broker do, and
//! reports throughput and latency percentiles. `scripts/bench.sh` starts the services and calls this.
//!
//! Scenarios (each prints one markdown table row):
//! - `register`: bulk registration of N devices, 10,000 per request, as a business system would;
//! - `authn-cold`: EMQX 5 authn decisions for random devices of the whole fleet (a reconnect storm: the
//!   in-memory cache rarely helps, the database answers);
//! - `authz-warm`: EMQX 5 authz decisions for a working set of connected devices (steady state: publishes);
//! - `mixed`: 1 authn per 10 authz over the whole fleet.
//!
//! Then it reads iothub's resident memory from /proc.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use clap::Parser;
use hdrhistogram::Histogram;
use rand::Rng;
use serde_json::{json, Value};

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    base_url: String,
    #[arg(long)]
    admin_key: String,
    #[arg(long)]
    hook_token: String,
    /// Devices in the fleet.
    #[arg(long, default_value_t = 1_000_000)]
    devices: usize,
    /// Concurrent in-flight requests per decision scenario (EMQX's HTTP pool has 8 connections per node,
    /// with pipelining; a 2-node cluster keeps ~16-64 decisions in flight).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Seconds per decision scenario.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Working set of "connected" devices for authz-warm.
    #[arg(long, default_value_t = 10_000)]
    working_set: usize,
    /// PID of iothub, for its RSS.
    #[arg(long)]
    pid: Option<u32>,
    /// Also write the working set as "username secret" lines here (input of the pipelined wrk runs).
    #[arg(long)]
    export: Option<std::path::PathBuf>,
}

struct Device {
    username: String,
    secret: String,
}

fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("no VmRSS")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb / 1024.0)
}

/// The decision is `"result":"allow"` somewhere in the body (cheaper than parsing it in the load generator).
fn memchr_allow(body: &[u8]) -> bool {
    body.windows(16).any(|w| w == br#""result":"allow""#)
}

async fn register(args: &Args, http: &reqwest::Client) -> anyhow::Result<Vec<Device>> {
    let product = "bench";
    let r = http
        .post(format!("{}/api/v1/products", args.base_url))
        .bearer_auth(&args.admin_key)
        .json(&json!({"id": product}))
        .send()
        .await?;
    ensure!(r.status().is_success() || r.status() == 409, "create product: {}", r.status());
    let mut devices = Vec::with_capacity(args.devices);
    let start = Instant::now();
    let mut hist = Histogram::<u64>::new(3)?;
    while devices.len() < args.devices {
        let count = (args.devices - devices.len()).min(10_000);
        let t = Instant::now();
        let r = http
            .post(format!("{}/api/v1/products/{product}/devices/bulk", args.base_url))
            .bearer_auth(&args.admin_key)
            .json(&json!({"count": count}))
            .send()
            .await?;
        ensure!(r.status() == 201, "bulk register: {} {}", r.status(), r.text().await.unwrap_or_default());
        let body: Value = r.json().await?;
        hist.record(t.elapsed().as_micros() as u64)?;
        for d in body["items"].as_array().context("items")? {
            devices.push(Device {
                username: d["broker_username"].as_str().context("username")?.to_string(),
                secret: d["secret"].as_str().context("secret")?.to_string(),
            });
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "| register (bulk, 10k/request) | {} devices | {:.0} devices/s | p50 {:.0} ms / p99 {:.0} ms per request |",
        devices.len(),
        devices.len() as f64 / secs,
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0
    );
    Ok(devices)
}

#[derive(Clone, Copy, PartialEq)]
enum Scenario {
    AuthnCold,
    AuthzWarm,
    Mixed,
}

async fn decisions(
    args: &Args,
    http: &reqwest::Client,
    devices: Arc<Vec<Device>>,
    scenario: Scenario,
) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let authn_url = format!("{}/broker/emqx5/authn", args.base_url);
    let authz_url = format!("{}/broker/emqx5/authz", args.base_url);
    let mut tasks = Vec::new();
    let started = Instant::now();
    for _ in 0..args.concurrency {
        let (http, devices, stop) = (http.clone(), devices.clone(), stop.clone());
        let (authn_url, authz_url) = (authn_url.clone(), authz_url.clone());
        let auth = format!("Bearer {}", args.hook_token);
        let working_set = args.working_set.min(devices.len());
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).expect("histogram");
            let mut wrong = 0u64;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let (idx, authn) = {
                    let mut rng = rand::thread_rng();
                    match scenario {
                        Scenario::AuthnCold => (rng.gen_range(0..devices.len()), true),
                        Scenario::AuthzWarm => (rng.gen_range(0..working_set), false),
                        Scenario::Mixed => (rng.gen_range(0..devices.len()), rng.gen_ratio(1, 11)),
                    }
                };
                let d = &devices[idx];
                // Bodies are the EMQX 5 templates from emqx-config/ (ids and secrets need no JSON escaping).
                let (url, body) = if authn {
                    let u = &d.username;
                    (&authn_url, format!(r#"{{"clientid":"{u}","username":"{u}","password":"{}","peerhost":"10.0.0.1"}}"#, d.secret))
                } else {
                    let u = &d.username;
                    (&authz_url, format!(r#"{{"clientid":"{u}","username":"{u}","topic":"upload_data/{u}/temperature/{n}","action":"publish","qos":"1","retain":"false"}}"#))
                };
                let t = Instant::now();
                let resp = http.post(url).header("authorization", &auth).header("content-type", "application/json").body(body).send().await;
                let ok = match resp {
                    Ok(r) if r.status().is_success() => r.bytes().await.is_ok_and(|b| b.starts_with(br#"{"#) && memchr_allow(&b)),
                    _ => false,
                };
                hist.record(t.elapsed().as_micros() as u64).expect("record");
                if !ok {
                    wrong += 1;
                }
                n += 1;
            }
            (hist, wrong)
        }));
    }
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = Histogram::<u64>::new(3)?;
    let mut wrong = 0;
    for t in tasks {
        let (h, w) = t.await?;
        total.add(h)?;
        wrong += w;
    }
    let secs = started.elapsed().as_secs_f64();
    let name = match scenario {
        Scenario::AuthnCold => "authn, random device of the fleet (cold)",
        Scenario::AuthzWarm => "authz publish, connected working set (warm)",
        Scenario::Mixed => "mixed 1 authn : 10 authz, whole fleet",
    };
    println!(
        "| {name} | {} decisions | {:.0} decisions/s | p50 {:.2} ms / p99 {:.2} ms / max {:.1} ms |",
        total.len(),
        total.len() as f64 / secs,
        total.value_at_quantile(0.5) as f64 / 1000.0,
        total.value_at_quantile(0.99) as f64 / 1000.0,
        total.max() as f64 / 1000.0,
    );
    ensure!(wrong == 0, "{wrong} decisions were not `allow`: the benchmark measured failures");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .timeout(Duration::from_secs(120))
        .build()?;
    println!("| scenario | volume | throughput | latency |\n|---|---|---|---|");
    let devices = Arc::new(register(&args, &http).await?);
    if let Some(path) = &args.export {
        let lines: String =
            devices.iter().take(args.working_set).map(|d| format!("{} {}\n", d.username, d.secret)).collect();
        std::fs::write(path, lines)?;
    }
    if let Some(pid) = args.pid {
        println!("| iothub RSS after registration | {} devices | {:.0} MiB | |", devices.len(), rss_mib(pid)?);
    }
    for s in [Scenario::AuthnCold, Scenario::AuthzWarm, Scenario::Mixed] {
        decisions(&args, &http, devices.clone(), s).await?;
    }
    if let Some(pid) = args.pid {
        println!("| iothub RSS after decisions | {} devices | {:.0} MiB | |", devices.len(), rss_mib(pid)?);
    }
    Ok(())
}
