//! In-process [`ReplyHub`] for the embedded profile: one process, so announcing is delivering.

use std::sync::Arc;

use async_trait::async_trait;

use crate::error::Result;
use crate::model::replies::{Reply, ReplyWaiter, Waiters};
use crate::ports::replies::ReplyHub;

#[derive(Default)]
pub struct MemoryReplies {
    waiters: Arc<Waiters>,
}

#[async_trait]
impl ReplyHub for MemoryReplies {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn wait(&self, key: String) -> ReplyWaiter {
        self.waiters.register(key)
    }

    async fn announce(&self, reply: Reply) -> Result<()> {
        self.waiters.deliver(reply);
        Ok(())
    }
}
