//! Command-line interface: `serve` (default), `migrate`, `openapi`, `api-key`.

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
        Command::Openapi => unreachable!("handled above"),
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
