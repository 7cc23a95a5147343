//! Data of the `replies` port (ports/replies.rs): a reply as announced between instances, and the
//! waiting room of this instance's RPC callers that both reply hubs deliver into.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reply {
    /// `{product}/{device}/{request_id}`: a reply only reaches the caller of that device's command.
    pub key: String,
    #[serde(with = "crate::model::replies::base64_bytes")]
    pub payload: Vec<u8>,
    pub replied_at: i64,
}

pub fn reply_key(product: &str, device: &str, request_id: &str) -> String {
    format!("{product}/{device}/{request_id}")
}

/// This instance's callers waiting for replies, by reply key.
#[derive(Default)]
pub struct Waiters {
    pending: Mutex<HashMap<String, oneshot::Sender<Reply>>>,
}

impl Waiters {
    pub fn register(self: &Arc<Self>, key: String) -> ReplyWaiter {
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("waiters lock").insert(key.clone(), tx);
        ReplyWaiter { rx, key, waiters: self.clone() }
    }

    /// Hands the reply to its waiter here, if any; `true` when one took it.
    pub fn deliver(&self, reply: Reply) -> bool {
        let waiter = self.pending.lock().expect("waiters lock").remove(&reply.key);
        waiter.is_some_and(|tx| tx.send(reply).is_ok())
    }

    pub fn len(&self) -> usize {
        self.pending.lock().expect("waiters lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A registered interest; dropping it (timeout, client gone) unregisters it.
pub struct ReplyWaiter {
    rx: oneshot::Receiver<Reply>,
    key: String,
    waiters: Arc<Waiters>,
}

impl ReplyWaiter {
    /// The reply, or `None` once `timeout` passed.
    pub async fn recv(mut self, timeout: std::time::Duration) -> Option<Reply> {
        tokio::time::timeout(timeout, &mut self.rx).await.ok().and_then(|r| r.ok())
    }
}

impl Drop for ReplyWaiter {
    fn drop(&mut self) {
        self.waiters.pending.lock().expect("waiters lock").remove(&self.key);
    }
}

pub(crate) mod base64_bytes {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_reply_reaches_only_its_waiter_and_dropped_waiters_unregister() {
        let waiters = Arc::new(Waiters::default());
        let w = waiters.register("p/d/r1".into());
        let other = waiters.register("p/d/r2".into());
        assert!(!waiters.deliver(Reply { key: "p/x/r1".into(), payload: vec![], replied_at: 1 }));
        assert!(waiters.deliver(Reply { key: "p/d/r1".into(), payload: b"ok".to_vec(), replied_at: 2 }));
        let got = w.recv(std::time::Duration::from_secs(1)).await.unwrap();
        assert_eq!(got.payload, b"ok");
        drop(other);
        assert!(waiters.is_empty());
        let json = serde_json::to_string(&got).unwrap();
        assert_eq!(serde_json::from_str::<Reply>(&json).unwrap(), got);
    }
}
