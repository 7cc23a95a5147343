//! The device's view of time: its local clock plus the offset learnt from iothub's `$ntp` answer.
//!
//! Command expiry (`expiresAt` in the topic) is iothub's clock, so a device whose clock is wrong by minutes
//! would run expired commands or drop fresh ones; the corrected clock fixes that (the reference SDK ignored
//! the offset).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// A clock source in Unix milliseconds; replaceable so tests (and simulations) can skew it.
pub type TimeSource = Arc<dyn Fn() -> i64 + Send + Sync>;

/// Local time plus the offset to iothub's time.
#[derive(Clone)]
pub struct Clock {
    source: TimeSource,
    offset_ms: Arc<AtomicI64>,
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clock").field("offset_ms", &self.offset_ms()).finish()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

impl Clock {
    /// The operating system's clock, not yet corrected.
    pub fn system() -> Self {
        Self::from_source(Arc::new(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or_default()
        }))
    }

    /// A clock reading `source` (Unix ms), e.g. a deliberately skewed one.
    pub fn from_source(source: TimeSource) -> Self {
        Self { source, offset_ms: Arc::new(AtomicI64::new(0)) }
    }

    /// The local clock, uncorrected (what goes into `$ntp` requests).
    pub fn local_ms(&self) -> i64 {
        (self.source)()
    }

    /// iothub's time as best known: local time plus the last measured offset.
    pub fn now_ms(&self) -> i64 {
        self.local_ms() + self.offset_ms()
    }

    /// The last measured offset (iothub − local), 0 before the first `sync_time`.
    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::Relaxed)
    }

    pub(crate) fn set_offset_ms(&self, offset: i64) {
        self.offset_ms.store(offset, Ordering::Relaxed);
    }

    /// Whether a command expiring at `expires_at` (Unix seconds, iothub's clock) has expired.
    pub fn is_expired(&self, expires_at: u64) -> bool {
        self.now_ms() > i64::try_from(expires_at).unwrap_or(i64::MAX).saturating_mul(1000)
    }
}

/// iothub's answer to `$ntp`, all in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub struct NtpAnswer {
    /// The device's local time when it sent the request (echoed).
    pub device_time: i64,
    /// iothub's (the broker's) time when the request arrived.
    pub iothub_recv: i64,
    /// iothub's time when it sent the answer.
    pub iothub_send: i64,
}

impl NtpAnswer {
    /// The classic NTP offset estimate, assuming symmetric network delay:
    /// `((iothub_recv − device_time) + (iothub_send − device_recv)) / 2`.
    pub fn offset_ms(&self, device_recv: i64) -> i64 {
        ((self.iothub_recv - self.device_time) + (self.iothub_send - device_recv)).div_euclid(2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_cancels_symmetric_delay() {
        // The device is 10 s behind; 40 ms each way; iothub takes 5 ms to answer.
        let device_time = 1_000_000;
        let answer = NtpAnswer { device_time, iothub_recv: 1_010_040, iothub_send: 1_010_045 };
        assert_eq!(answer.offset_ms(device_time + 85), 10_000);
    }

    #[test]
    fn expiry_uses_the_corrected_clock() {
        // Local clock 10 minutes fast: without correction a fresh command looks expired.
        let skewed = Clock::from_source(Arc::new(|| 1_700_000_600_000));
        let expires_at = 1_700_000_060; // one minute after iothub's now (1_700_000_000)
        assert!(skewed.is_expired(expires_at));
        skewed.set_offset_ms(-600_000);
        assert!(!skewed.is_expired(expires_at));
        assert!(skewed.is_expired(1_699_999_999));
        assert!(!skewed.is_expired(u64::MAX), "a far-future expiry is not in the past");
    }
}
