//! Commands and RPC: answers every command with `done`, every RPC with a reading.
//! Try: `curl -X POST .../devices/{d}/rpc -d '{"name":"getTemp"}'` while it runs.
#[path = "common/mod.rs"]
mod common;

use iothub_device::{CommandKind, Device, Event};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (_device, mut events) = Device::connect(common::config_from_env()?).await?;
    println!("waiting for commands (Ctrl-C to stop)");
    while let Some(event) = events.next().await {
        if let Event::Command(command) = event {
            println!(
                "{:?} {} ({} bytes, expires {:?})",
                command.kind,
                command.name,
                command.payload.len(),
                command.expires_at
            );
            let reply = match command.kind {
                CommandKind::Rpc => r#"{"celsius": 21.5}"#.to_string(),
                _ => "done".to_string(),
            };
            command.respond(reply).await?;
        }
    }
    Ok(())
}
