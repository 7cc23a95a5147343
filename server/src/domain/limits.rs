//! Per-device limits on the work a device can make iothub do, so one device cannot starve the others.
//!
//! Every `$ntp`, `$tags`, `$shadow*` request costs database reads and writes and broker publishes, from the
//! same database pool that every CONNECT's authentication needs; every stored message costs a row and an
//! event. Without limits one device publishing at full speed made iothub answer ~2,300 internal requests a
//! second for it alone, and on PostgreSQL could exhaust the pool that authn draws from. So:
//! - each device has two rate limits (`limits.device_*`): one for what it stores or announces (data,
//!   reports, data requests), one for internal requests; what exceeds them is dropped and counted
//!   (`iothub_device_rate_limited_total{kind}`): the webhook is still answered, a broker retry would only
//!   repeat the excess;
//! - the data limit runs on the broker's clock (when the broker received each message), not on iothub's:
//!   events that waited out an iothub or database outage (in EMQX's webhook buffer or the broker-event
//!   queue) arrive all at once afterwards, and were sent at a rate the device was allowed. Judged on arrival
//!   they would be shed as a flood and lost. The internal-request bucket stays on iothub's clock: a request
//!   that waited out an outage is answered late or not at all, and the device asks again;
//! - internal requests run on at most `limits.internal_concurrency` tasks at once; a request arriving when
//!   all are busy is shed (`iothub_internal_requests_shed_total`), never queued, so device-generated work can
//!   never hold more than that many database connections and connects/authz never wait behind it.
//!
//! The limits live in each instance's memory: with N instances behind a round-robin balancer a device gets up
//! to N times the rate, which still bounds it.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::LimitsConfig;
use crate::ids::DeviceRef;

pub struct DeviceLimits {
    messages: Option<BrokerTimeLimiter>,
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

/// Keyed counters over fixed windows of the broker's time, at two scales: no window of one second admits
/// more than `burst + per_sec`, none of ten seconds more than `burst + 10 × per_sec` — the most a token
/// bucket of that rate and burst admits in such a span, so what a token bucket allows passes, and the
/// sustained rate stays near `per_sec`.
/// Each event counts in the windows of its own timestamp, so the verdict does not depend on arrival order:
/// after an outage, deliveries retried concurrently commit in any order, and a token bucket (governor's
/// GCRA) takes an older event arriving after a newer one for a burst. governor's limiters also read one
/// clock at check time, which is exactly what this must not do.
struct BrokerTimeLimiter {
    /// (window length in ms, events admitted per window), shortest first.
    scales: [(i64, u32); 2],
    counts: Mutex<HashMap<(String, usize, i64), u32>>,
}

impl BrokerTimeLimiter {
    fn new(per_sec: u32, burst: u32) -> Option<Self> {
        let per_sec = NonZeroU32::new(per_sec)?.get();
        let burst = burst.max(per_sec);
        let span = |secs: u32| burst.saturating_add(per_sec.saturating_mul(secs));
        Some(Self { scales: [(1_000, span(1)), (10_000, span(10))], counts: Mutex::default() })
    }

    /// The windows of an event the broker received at `at_ms`; a time ahead of `now_ms` (a skewed broker
    /// clock) counts as now, so it cannot reserve a device's future windows.
    fn windows(&self, key: &str, at_ms: i64, now_ms: i64) -> [(String, usize, i64); 2] {
        let at = at_ms.min(now_ms);
        [0, 1].map(|scale| (key.to_string(), scale, at.div_euclid(self.scales[scale].0)))
    }

    fn check(&self, key: &str, at_ms: i64, now_ms: i64) -> bool {
        let windows = self.windows(key, at_ms, now_ms);
        let mut counts = self.counts.lock().expect("limiter lock");
        let full = windows
            .iter()
            .zip(self.scales)
            .any(|(window, (_, limit))| counts.get(window).copied().unwrap_or(0) >= limit);
        if full {
            return false;
        }
        for window in windows {
            *counts.entry(window).or_insert(0) += 1;
        }
        true
    }

    /// Gives back what an admitted but unstored batch drew (its retry draws again).
    fn refund(&self, drawn: impl Iterator<Item = (String, i64)>, now_ms: i64) {
        let mut counts = self.counts.lock().expect("limiter lock");
        for (key, at_ms) in drawn {
            for window in self.windows(&key, at_ms, now_ms) {
                if let Some(count) = counts.get_mut(&window) {
                    *count = count.saturating_sub(1);
                }
            }
        }
    }

    /// Forgets windows that ended more than two minutes before `now_ms` (bounded memory). A late event of a
    /// forgotten window starts it afresh: lenient, never lossy.
    fn forget_idle(&self, now_ms: i64) {
        let scales = self.scales;
        let mut counts = self.counts.lock().expect("limiter lock");
        counts.retain(|(_, scale, window), _| *window >= (now_ms - 120_000).div_euclid(scales[*scale].0));
        counts.shrink_to_fit();
    }
}

impl DeviceLimits {
    pub fn new(config: &LimitsConfig) -> Self {
        Self {
            messages: BrokerTimeLimiter::new(config.device_messages_per_sec, config.device_messages_burst),
            requests: limiter(config.device_requests_per_sec, config.device_requests_burst),
            internal_slots: Arc::new(Semaphore::new(config.internal_concurrency as usize)),
        }
    }

    /// Data, reports and data requests: may this device store or announce one more that the broker received
    /// at `sent_at` (Unix ms)?
    pub fn admit_message(&self, device: &DeviceRef, sent_at: i64) -> bool {
        let Some(limiter) = &self.messages else { return true };
        let allowed = limiter.check(&device.broker_username(), sent_at, crate::clock::now_ms());
        if !allowed {
            metrics::counter!("iothub_device_rate_limited_total", "kind" => "message").increment(1);
        }
        allowed
    }

    /// Returns what [`Self::admit_message`] drew for these (device, sent_at) pairs when what was
    /// admitted could not be stored: the retry must not be charged twice, or a backlog that waits out a
    /// database outage would be shed by its own retries.
    pub fn refund_messages(&self, drawn: &[(DeviceRef, i64)]) {
        if let Some(limiter) = &self.messages {
            let drawn = drawn.iter().map(|(device, at)| (device.broker_username(), *at));
            limiter.refund(drawn, crate::clock::now_ms());
        }
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
        if let Some(limiter) = &self.requests {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        if let Some(limiter) = &self.messages {
            limiter.forget_idle(crate::clock::now_ms());
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
        let now = crate::clock::now_ms();
        let admitted = (0..100).filter(|_| limits.admit_message(&device("a"), now)).count();
        assert_eq!(admitted, 15, "burst + one second's rate");
        assert!(limits.admit_message(&device("b"), now), "another device has its own bucket");
        assert!((0..1000).all(|_| limits.admit_request(&device("a"))), "0 means unlimited");
        let (one, two) = (limits.internal_slot(), limits.internal_slot());
        assert!(one.is_some() && two.is_some() && limits.internal_slot().is_none());
        drop(one);
        assert!(limits.internal_slot().is_some());
    }

    fn data_limits(per_sec: u32, burst: u32) -> DeviceLimits {
        DeviceLimits::new(&LimitsConfig {
            device_messages_per_sec: per_sec,
            device_messages_burst: burst,
            device_requests_per_sec: 0,
            device_requests_burst: 0,
            internal_concurrency: 1,
        })
    }

    #[test]
    fn a_backlog_sent_within_the_rate_is_admitted_whenever_it_arrives() {
        let limits = data_limits(10, 20);
        let start = crate::clock::now_ms() - 600_000;
        // Ten minutes of a device sending 10/s, delivered in one go after an outage.
        let admitted = (0..6_000).filter(|i| limits.admit_message(&device("a"), start + i * 100)).count();
        assert_eq!(admitted, 6_000);
        // The same count sent within one second is a flood: burst, then the rate.
        let now = crate::clock::now_ms();
        let flood = (0..6_000).filter(|i| limits.admit_message(&device("b"), now - 1_000 + i / 6)).count();
        assert!((30..=60).contains(&flood), "{flood}");
        // A burst, and a few more a moment later (as after a reconnect): a token bucket would allow it.
        let t = (now - 20_000).div_euclid(10_000) * 10_000;
        let burst = (0..33).filter(|i| limits.admit_message(&device("c"), t + 500 + i)).count();
        let after = (0..3).filter(|i| limits.admit_message(&device("c"), t + 1_600 + i)).count();
        assert_eq!((burst, after), (30, 3));
    }

    #[test]
    fn a_refunded_batch_is_admitted_again() {
        let limits = data_limits(1, 3);
        let now = crate::clock::now_ms();
        let batch = [(device("a"), now), (device("a"), now), (device("a"), now), (device("a"), now)];
        for _ in 0..10 {
            assert!(batch.iter().all(|(d, at)| limits.admit_message(d, *at)), "a retried batch is never shed");
            limits.refund_messages(&batch);
        }
        assert!(batch.iter().all(|(d, at)| limits.admit_message(d, *at)));
        assert!(!limits.admit_message(&device("a"), now), "the window still holds only burst + rate");
    }

    #[test]
    fn a_broker_clock_ahead_cannot_lock_a_device_out() {
        let limiter = BrokerTimeLimiter::new(1, 1).unwrap();
        let now = 1_700_000_000_000;
        assert!(limiter.check("p/a", now + 3_600_000, now));
        assert!(limiter.check("p/a", now, now));
        assert!(!limiter.check("p/a", now, now), "the first counted as now");
        assert!(limiter.check("p/a", now + 1_000, now + 1_000), "admitted again a second later, not an hour");
    }

    #[test]
    fn arrival_order_does_not_matter() {
        let limits = data_limits(10, 20);
        let start = crate::clock::now_ms() - 600_000;
        // A backlog at 10/s committed newest-first (retries finish in any order).
        let admitted = (0..6_000).rev().filter(|i| limits.admit_message(&device("a"), start + i * 100)).count();
        assert_eq!(admitted, 6_000);
    }

    proptest::proptest! {
        /// Over any stretch of broker time, a device gets at most what the ten-second windows it touches
        /// allow, whatever the arrival order.
        #[test]
        fn admitted_never_exceeds_burst_plus_rate(
            per_sec in 1u32..50, burst in 1u32..100, offsets in proptest::collection::vec(0i64..10_000, 1..400)
        ) {
            let limits = data_limits(per_sec, burst);
            let base = crate::clock::now_ms() - 20_000;
            let span_ms = offsets.iter().max().unwrap() - offsets.iter().min().unwrap();
            let admitted = offsets.iter().filter(|o| limits.admit_message(&device("p"), base + **o)).count() as i64;
            let per_ten_secs = i64::from(burst.max(per_sec)) + 10 * i64::from(per_sec);
            let bound = per_ten_secs * (span_ms / 10_000 + 2);
            proptest::prop_assert!(admitted <= bound, "{admitted} > {bound}");
        }
    }
}
