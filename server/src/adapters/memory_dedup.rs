//! In-process [`Deduplicator`] for the embedded profile (one iothub process, so one map is the truth).
//!
//! Entries expire by themselves (moka TTL per state), which bounds memory by the message rate times the
//! dedup window rather than by history.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use moka::future::Cache;

use crate::error::Result;
use crate::model::dedup::Claim;
use crate::ports::dedup::Deduplicator;

#[derive(Clone, Copy, Debug)]
enum State {
    InFlight(Instant),
    Done,
}

pub struct MemoryDedup {
    entries: Cache<String, State>,
    in_flight_ttl: Duration,
}

impl MemoryDedup {
    pub fn new(window: Duration, in_flight_ttl: Duration) -> Self {
        Self { entries: Cache::builder().time_to_live(window).build(), in_flight_ttl }
    }
}

#[async_trait]
impl Deduplicator for MemoryDedup {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }

    async fn claim(&self, keys: &[String]) -> Result<Vec<Claim>> {
        let mut claims = Vec::with_capacity(keys.len());
        for key in keys {
            let now = Instant::now();
            // `and_compute_with` runs atomically per key, like Redis' SET NX GET.
            let mut found = Claim::New;
            self.entries
                .entry_by_ref(key)
                .and_compute_with(|existing| {
                    use moka::ops::compute::Op;
                    match existing.map(|e| e.into_value()) {
                        Some(State::Done) => {
                            found = Claim::Done;
                            std::future::ready(Op::Nop)
                        }
                        Some(State::InFlight(since)) if now.duration_since(since) < self.in_flight_ttl => {
                            found = Claim::InFlight;
                            std::future::ready(Op::Nop)
                        }
                        _ => std::future::ready(Op::Put(State::InFlight(now))),
                    }
                })
                .await;
            claims.push(found);
        }
        Ok(claims)
    }

    async fn complete(&self, keys: &[String]) -> Result<()> {
        for key in keys {
            self.entries.insert(key.clone(), State::Done).await;
        }
        Ok(())
    }

    async fn release(&self, keys: &[String]) -> Result<()> {
        for key in keys {
            self.entries.invalidate(key).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn claim_complete_release() {
        let d = MemoryDedup::new(Duration::from_secs(60), Duration::from_secs(30));
        let k = vec!["a".to_string(), "a".to_string(), "b".to_string()];
        assert_eq!(d.claim(&k).await.unwrap(), vec![Claim::New, Claim::InFlight, Claim::New]);
        d.complete(&k[..1]).await.unwrap();
        d.release(&k[2..]).await.unwrap();
        assert_eq!(d.claim(&k).await.unwrap(), vec![Claim::Done, Claim::Done, Claim::New]);
    }

    #[tokio::test]
    async fn stale_in_flight_claim_is_taken_over() {
        let d = MemoryDedup::new(Duration::from_secs(60), Duration::from_millis(10));
        let k = vec!["a".to_string()];
        assert_eq!(d.claim(&k).await.unwrap(), vec![Claim::New]);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(d.claim(&k).await.unwrap(), vec![Claim::New]);
    }
}
