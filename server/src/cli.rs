//! Command-line interface: `serve` (default), `migrate`, `openapi`, `api-key`, `healthcheck`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::domain::api_keys::{ApiKeyService, Scope};
use crate::startup::{open_store, shutdown_signal, Application};
use crate::telemetry;

#[derive(Debug, Parser)]
#[command(name = "iothub", version, about = "IoT device hub beside an MQTT broker")]
pub struct Cli {
    /// TOML config file (layered over built-in defaults, under IOTHUB_* env vars).
    #[arg(long, short, global = true, env = "IOTHUB_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the hub (the default when no command is given).
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Print the OpenAPI document (YAML).
    Openapi,
    /// Manage business API keys.
    #[command(subcommand)]
    ApiKey(ApiKeyCommand),
    /// Ask the local instance whether it is alive (`/healthz`) or ready (`/readyz`); exit 0 when it answers 200.
    /// Made for container health checks, where images carry no curl.
    Healthcheck {
        /// Check readiness (every dependency reachable) instead of liveness.
        #[arg(long)]
        ready: bool,
        /// Base URL of the instance; default: `http.listen` on loopback.
        #[arg(long)]
        url: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// Create a key and print it once.
    Create {
        #[arg(long)]
        name: String,
        /// Comma-separated: read, write, admin.
        #[arg(long, value_delimiter = ',', default_value = "read")]
        scopes: Vec<String>,
    },
    /// List keys (never their secrets).
    List,
    /// Revoke a key by id.
    Revoke { id: String },
}

pub async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Openapi) = cli.command {
        print!("{}", crate::api::openapi::yaml());
        return Ok(());
    }
    let config = Config::load(cli.config.as_deref())?;
    if let Some(Command::Healthcheck { ready, url }) = &cli.command {
        return healthcheck(&config, *ready, url.as_deref()).await;
    }
    telemetry::init_tracing(&config.log);
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let listener = tokio::net::TcpListener::bind(config.http.listen).await?;
            let app = Application::build(config, listener).await?;
            app.serve(shutdown_signal()).await
        }
        Command::Migrate => {
            open_store(&config, true).await?;
            println!("migrations applied to {}", redact_url(&config.database_url()));
            Ok(())
        }
        Command::Openapi | Command::Healthcheck { .. } => unreachable!("handled above"),
        Command::ApiKey(cmd) => {
            let keys = ApiKeyService::new(open_store(&config, true).await?);
            match cmd {
                ApiKeyCommand::Create { name, scopes } => {
                    let scopes = scopes
                        .iter()
                        .map(|s| {
                            Scope::parse(s.trim())
                                .ok_or_else(|| anyhow::anyhow!("unknown scope `{s}` (read, write, admin)"))
                        })
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    let (record, key) = keys.create(&name, &scopes).await?;
                    println!("id:     {}\nscopes: {}\nkey:    {}", record.id, record.scopes.join(","), key.expose());
                    eprintln!("the key is shown only now; store it safely");
                }
                ApiKeyCommand::List => {
                    for k in keys.list().await? {
                        let state = if k.revoked_at.is_some() { "revoked" } else { "active" };
                        println!("{}\t{}\t{}\t{}", k.id, k.name, k.scopes.join(","), state);
                    }
                }
                ApiKeyCommand::Revoke { id } => {
                    keys.revoke(&id).await?;
                    println!("revoked {id}");
                }
            }
            Ok(())
        }
    }
}

async fn healthcheck(config: &Config, ready: bool, url: Option<&str>) -> anyhow::Result<()> {
    let base = match url {
        Some(url) => url.trim_end_matches('/').to_string(),
        None => {
            let mut addr = config.http.listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(if addr.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                });
            }
            format!("http://{addr}")
        }
    };
    let url = format!("{base}/{}", if ready { "readyz" } else { "healthz" });
    let response = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .build()?
        .get(&url)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    anyhow::ensure!(status.is_success(), "{url}: {status} {body}");
    println!("{url}: {status}");
    Ok(())
}

/// Hides the password of a database URL for display.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..s + 3], user, &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn database_passwords_are_not_printed() {
        assert_eq!(
            super::redact_url("postgres://iothub:s3cret@db:5432/iothub"),
            "postgres://iothub:***@db:5432/iothub"
        );
        assert_eq!(super::redact_url("sqlite://data/iothub.db"), "sqlite://data/iothub.db");
    }
}
