//! Tags: prints the stored tags, follows iothub's pushes and answers tag-wide commands.
//! Try: `curl -X PUT .../devices/{d}/tags -d '{"tags":["lab"]}'`, then `POST .../tags/lab/commands`.
#[path = "common/mod.rs"]
mod common;

use iothub_device::{Device, Event};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (device, mut events) = Device::connect(common::config_from_env()?).await?;
    let (tags, version) = device.tags();
    println!("stored tags {tags:?} (version {version})");
    while let Some(event) = events.next().await {
        match event {
            Event::TagsChanged { tags, version } => println!("tags now {tags:?} (version {version})"),
            Event::Command(command) if command.tag.is_some() => {
                println!("tag command {} for tag {:?}", command.name, command.tag);
                command.respond("done").await?;
            }
            _ => {}
        }
    }
    Ok(())
}
