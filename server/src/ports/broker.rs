//! The broker management port: what iothub asks of the MQTT broker.
//!
//! Adapters speak EMQX 5's REST API (`/api/v5`) or the EMQX 4 shape that RMQTT's http-api also follows.
//! Client ids contain `/` (they default to the broker username), so adapters must percent-encode them.
//! Publishing is how every downstream message (commands, RPC, internal `$` replies) reaches devices.

use crate::error::Result;
use crate::model::broker::*;
use async_trait::async_trait;

#[async_trait]
pub trait BrokerApi: Send + Sync + 'static {
    fn kind(&self) -> &'static str;
    /// Health of the management API, for `/readyz`.
    async fn ping(&self) -> Result<()>;
    /// Client ids currently connected with this username.
    async fn clients_of(&self, username: &str) -> Result<Vec<String>>;
    /// Disconnects a client. `Ok(false)` when it was not connected.
    async fn kick(&self, client_id: &str) -> Result<bool>;
    /// The topic filters a connected client is subscribed to (empty when it is not connected).
    async fn subscriptions_of(&self, client_id: &str) -> Result<Vec<String>>;

    /// Publishes one message. `Err(Unavailable)` is worth retrying; `Err(Validation)` (topic or size
    /// refused by the broker) is not.
    async fn publish(&self, message: &OutboundMessage) -> Result<Published>;

    /// Whether any live connection of `username` is subscribed to `filter` (exactly that filter).
    async fn is_subscribed(&self, username: &str, filter: &str) -> Result<bool> {
        for client in self.clients_of(username).await? {
            if self.subscriptions_of(&client).await?.iter().any(|f| f == filter) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Kicks every live connection of a username; returns how many were kicked.
    async fn kick_username(&self, username: &str) -> Result<usize> {
        let mut kicked = 0;
        for client in self.clients_of(username).await? {
            if self.kick(&client).await? {
                kicked += 1;
            }
        }
        Ok(kicked)
    }
}
