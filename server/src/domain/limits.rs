//! Per-device limits on the work a device can make iothub do, so one device cannot starve the others.
//!
//! Every `$ntp`, `$tags`, `$shadow*` request costs database reads and writes and broker publishes, from the
//! same database pool that every CONNECT's authentication needs; every stored message costs a row and an
//! event. Without limits one device publishing at full speed made iothub answer ~2,300 internal requests a
//! second for it alone, and on PostgreSQL could exhaust the pool that authn draws from. So:
//! - each device has two token buckets (`limits.device_*`): one for what it stores or announces (data,
//!   reports, data requests), one for internal requests; what exceeds them is dropped and counted
//!   (`iothub_device_rate_limited_total{kind}`): the webhook is still answered, a broker retry would only
//!   repeat the excess;
//! - internal requests run on at most `limits.internal_concurrency` tasks at once; a request arriving when
//!   all are busy is shed (`iothub_internal_requests_shed_total`), never queued, so device-generated work can
//!   never hold more than that many database connections and connects/authz never wait behind it.
//!
//! The buckets live in each instance's memory: with N instances behind a round-robin balancer a device gets up
//! to N times the rate, which still bounds it.

use std::num::NonZeroU32;
use std::sync::Arc;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::LimitsConfig;
use crate::ids::DeviceRef;

pub struct DeviceLimits {
    messages: Option<DefaultKeyedRateLimiter<String>>,
    requests: Option<DefaultKeyedRateLimiter<String>>,
    internal_slots: Arc<Semaphore>,
}

fn limiter(per_sec: u32, burst: u32) -> Option<DefaultKeyedRateLimiter<String>> {
    let rate = NonZeroU32::new(per_sec)?;
    let burst = NonZeroU32::new(burst.max(per_sec)).unwrap_or(rate);
    Some(RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)))
}

fn admit(limiter: &Option<DefaultKeyedRateLimiter<String>>, device: &DeviceRef, kind: &'static str) -> bool {
    let Some(limiter) = limiter else { return true };
    let allowed = limiter.check_key(&device.broker_username()).is_ok();
    if !allowed {
        metrics::counter!("iothub_device_rate_limited_total", "kind" => kind).increment(1);
    }
    allowed
}

impl DeviceLimits {
    pub fn new(config: &LimitsConfig) -> Self {
        Self {
            messages: limiter(config.device_messages_per_sec, config.device_messages_burst),
            requests: limiter(config.device_requests_per_sec, config.device_requests_burst),
            internal_slots: Arc::new(Semaphore::new(config.internal_concurrency as usize)),
        }
    }

    /// Data, reports and data requests: may this device store or announce one more now?
    pub fn admit_message(&self, device: &DeviceRef) -> bool {
        admit(&self.messages, device, "message")
    }

    /// Internal `$` requests: may this device have one more answered now?
    pub fn admit_request(&self, device: &DeviceRef) -> bool {
        admit(&self.requests, device, "internal")
    }

    /// A slot to answer an internal request in, or `None` when all are busy (the request is then shed).
    pub fn internal_slot(&self) -> Option<OwnedSemaphorePermit> {
        let slot = self.internal_slots.clone().try_acquire_owned().ok();
        if slot.is_none() {
            metrics::counter!("iothub_internal_requests_shed_total").increment(1);
        }
        slot
    }

    /// Forgets buckets of devices that have been quiet long enough to be full again (bounded memory).
    pub fn forget_idle(&self) {
        for limiter in [&self.messages, &self.requests].into_iter().flatten() {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(d: &str) -> DeviceRef {
        DeviceRef::from_broker_username(&format!("p/{d}")).unwrap()
    }

    #[test]
    fn a_device_gets_its_burst_then_is_limited_alone() {
        let limits = DeviceLimits::new(&LimitsConfig {
            device_messages_per_sec: 5,
            device_messages_burst: 10,
            device_requests_per_sec: 0,
            device_requests_burst: 0,
            internal_concurrency: 2,
        });
        let admitted = (0..100).filter(|_| limits.admit_message(&device("a"))).count();
        assert!((10..=11).contains(&admitted), "{admitted}");
        assert!(limits.admit_message(&device("b")), "another device has its own bucket");
        assert!((0..1000).all(|_| limits.admit_request(&device("a"))), "0 means unlimited");
        let (one, two) = (limits.internal_slot(), limits.internal_slot());
        assert!(one.is_some() && two.is_some() && limits.internal_slot().is_none());
        drop(one);
        assert!(limits.internal_slot().is_some());
    }
}
