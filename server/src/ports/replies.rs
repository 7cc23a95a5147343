//! The RPC reply port: how a caller waiting on one instance learns of a reply that arrived on another.
//!
//! A synchronous command's HTTP request waits on the instance that took it, but the device's `rpc_resp`
//! reaches whichever instance the broker's webhook hit. After the reply is committed to the command log,
//! that instance *announces* it; every instance hands it to its local waiter, if it has one. Production
//! announces over Redis pub/sub (no polling); the embedded profile has a single process. An announcement
//! that gets lost costs only latency: the caller reads the command log once more before giving up.

use async_trait::async_trait;

use crate::error::Result;
use crate::model::replies::{Reply, ReplyWaiter};

#[async_trait]
pub trait ReplyHub: Send + Sync + 'static {
    fn kind(&self) -> &'static str;
    /// Registers interest in a reply; call before the command goes out so no reply can slip past.
    fn wait(&self, key: String) -> ReplyWaiter;
    /// Tells every instance about a committed reply.
    async fn announce(&self, reply: Reply) -> Result<()>;
}
