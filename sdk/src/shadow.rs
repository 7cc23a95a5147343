//! The device side of the shadow protocol, as a state machine without I/O (so every race is unit-tested).
//!
//! iothub versions the shadow and applies a device's message only if it names the current version. The
//! reference SDK kept the version in memory only and dropped a report when the version did not match; here
//! the version is persisted (by the caller, through [`crate::store`]) and a report that lost the race is
//! sent again against the version iothub answered with. One shadow message is in flight at a time (iothub
//! may apply a device's messages in any order); later reports are merged into one waiting report.

use std::time::{Duration, Instant};

use iothub_protocol::topics::Internal;
use serde_json::{json, Map, Value};

/// After this long without `$shadow_reply` (it travels at QoS 0), the message in flight counts as lost.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Conflicts in a row after which a report is given up (each retry already uses iothub's newest version,
/// so this only trips when the shadow changes faster than the device can report).
pub const MAX_CONFLICTS: u32 = 5;

/// `upload_data/{p}/{d}/{data_type}/{id}` with this payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub data_type: &'static str,
    pub payload: Value,
}

#[derive(Debug, Clone, PartialEq)]
enum Op {
    /// `$shadow_reported`: merge these keys into `state.reported`.
    Report { reported: Map<String, Value>, conflicts: u32 },
    /// `$shadow_updated`: the desired state of `version` was applied.
    Applied { version: i64 },
}

#[derive(Debug, Default)]
pub struct ShadowTracker {
    in_flight: Option<(Op, Instant)>,
    waiting_report: Option<Map<String, Value>>,
    waiting_applied: Option<i64>,
}

/// What a `$shadow_reply` / `$update_shadow` means for the application.
#[derive(Debug, Default, PartialEq)]
pub struct Reaction {
    /// Send this now.
    pub send: Option<Outgoing>,
    /// A shadow document whose delta the application should apply (desired differs from reported).
    pub desired: Option<Value>,
    /// A report given up after [`MAX_CONFLICTS`].
    pub dropped_report: Option<Map<String, Value>>,
}

impl ShadowTracker {
    /// The application reports `reported`; returns what to send now, if anything.
    pub fn report(&mut self, reported: Map<String, Value>, version: i64, now: Instant) -> Option<Outgoing> {
        match &mut self.waiting_report {
            Some(waiting) => merge(waiting, reported),
            None => self.waiting_report = Some(reported),
        }
        self.send_next(version, now)
    }

    /// The application applied the desired state of `version`.
    pub fn applied(&mut self, applied_version: i64, version: i64, now: Instant) -> Option<Outgoing> {
        self.waiting_applied = Some(self.waiting_applied.map_or(applied_version, |v| v.max(applied_version)));
        self.send_next(version, now)
    }

    /// `$shadow_reply` arrived; `version` is the device's stored version, updated in place.
    pub fn on_reply(&mut self, reply: &Value, version: &mut i64, now: Instant) -> Reaction {
        let mut reaction = Reaction::default();
        let Some(replied_version) = reply.get("version").and_then(Value::as_i64) else { return reaction };
        let Some((op, _)) = self.in_flight.take() else {
            *version = (*version).max(replied_version);
            return reaction;
        };
        match reply.get("status").and_then(Value::as_str) {
            Some("success") => *version = (*version).max(replied_version),
            Some("version_conflict") => {
                *version = (*version).max(replied_version);
                match op {
                    Op::Report { reported, conflicts } if conflicts + 1 >= MAX_CONFLICTS => {
                        reaction.dropped_report = Some(reported);
                    }
                    // Sent again, against the version iothub has, ahead of anything merged since.
                    Op::Report { mut reported, conflicts } => {
                        if let Some(later) = self.waiting_report.take() {
                            merge(&mut reported, later);
                        }
                        self.in_flight = Some((Op::Report { reported, conflicts: conflicts + 1 }, now));
                        reaction.send = self.in_flight.as_ref().map(|(op, _)| outgoing(op, *version));
                        return reaction;
                    }
                    // The desired state changed after the one applied: the application gets the new one.
                    Op::Applied { .. } => {
                        if let Some(shadow) = reply.get("shadow") {
                            reaction.desired = has_delta(shadow).then(|| shadow.clone());
                        }
                    }
                }
            }
            _ => {
                self.in_flight = Some((op, now));
                return reaction;
            }
        }
        reaction.send = self.send_next(*version, now);
        reaction
    }

    /// `$update_shadow` arrived (a change of desired, or the answer to `$shadow`).
    pub fn on_update(&mut self, document: &Value, version: &mut i64) -> Reaction {
        let mut reaction = Reaction::default();
        let Some(doc_version) = document.get("version").and_then(Value::as_i64) else { return reaction };
        if doc_version < *version {
            return reaction; // an older document overtaken by a newer one (QoS 0, any order)
        }
        *version = doc_version;
        if has_delta(document) {
            reaction.desired = Some(document.clone());
        }
        reaction
    }

    /// After a reconnect, or when the reply is overdue: the message in flight is sent again.
    pub fn resend(&mut self, version: i64, now: Instant) -> Option<Outgoing> {
        let (op, _) = self.in_flight.take()?;
        self.in_flight = Some((op, now));
        self.in_flight.as_ref().map(|(op, _)| outgoing(op, version))
    }

    fn send_next(&mut self, version: i64, now: Instant) -> Option<Outgoing> {
        if let Some((_, sent)) = &self.in_flight {
            if now.duration_since(*sent) < REPLY_TIMEOUT {
                return None;
            }
            // The reply was lost: what was in flight is sent again, merged with what waits.
            match self.in_flight.take() {
                Some((Op::Report { reported, .. }, _)) => match &mut self.waiting_report {
                    Some(waiting) => {
                        let mut merged = reported;
                        merge(&mut merged, std::mem::take(waiting));
                        *waiting = merged;
                    }
                    None => self.waiting_report = Some(reported),
                },
                Some((Op::Applied { version: v }, _)) => {
                    self.waiting_applied = Some(self.waiting_applied.map_or(v, |w| w.max(v)));
                }
                None => {}
            }
        }
        let op = if let Some(applied) = self.waiting_applied.take() {
            Op::Applied { version: applied }
        } else {
            Op::Report { reported: self.waiting_report.take()?, conflicts: 0 }
        };
        let out = outgoing(&op, version);
        self.in_flight = Some((op, now));
        Some(out)
    }
}

fn outgoing(op: &Op, version: i64) -> Outgoing {
    match op {
        Op::Report { reported, .. } => Outgoing {
            data_type: Internal::ShadowReported.as_str(),
            payload: json!({ "state": { "reported": reported }, "version": version }),
        },
        Op::Applied { version: applied } => Outgoing {
            data_type: Internal::ShadowUpdated.as_str(),
            payload: json!({ "state": { "desired": null }, "version": applied }),
        },
    }
}

fn has_delta(document: &Value) -> bool {
    document.get("delta").and_then(Value::as_object).is_some_and(|d| !d.is_empty())
}

/// Later keys win; nested objects merge; `null` is kept (it tells iothub to delete the key).
fn merge(target: &mut Map<String, Value>, later: Map<String, Value>) {
    for (key, value) in later {
        match (target.get_mut(&key), value) {
            (Some(Value::Object(existing)), Value::Object(patch)) => merge(existing, patch),
            (_, value) => {
                target.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn a_report_that_loses_the_race_is_sent_again_against_the_new_version() {
        let (mut t, mut version, now) = (ShadowTracker::default(), 3, Instant::now());
        let sent = t.report(map(json!({"temp": 20})), version, now).unwrap();
        assert_eq!(sent.payload, json!({"state": {"reported": {"temp": 20}}, "version": 3}));
        // The business changed desired meanwhile (version 4): iothub refuses version 3.
        let r = t.on_reply(&json!({"status": "version_conflict", "version": 4, "shadow": {}}), &mut version, now);
        assert_eq!(version, 4);
        assert_eq!(r.send.unwrap().payload, json!({"state": {"reported": {"temp": 20}}, "version": 4}));
        let r = t.on_reply(&json!({"status": "success", "version": 5}), &mut version, now);
        assert_eq!((version, r.send), (5, None));
    }

    #[test]
    fn reports_made_while_one_is_in_flight_are_merged_into_one() {
        let (mut t, mut version, now) = (ShadowTracker::default(), 1, Instant::now());
        assert!(t.report(map(json!({"a": 1, "cfg": {"x": 1}})), version, now).is_some());
        assert_eq!(t.report(map(json!({"b": 2, "cfg": {"y": 2}})), version, now), None);
        assert_eq!(t.report(map(json!({"b": 3, "gone": null})), version, now), None);
        let r = t.on_reply(&json!({"status": "success", "version": 2}), &mut version, now);
        assert_eq!(
            r.send.unwrap().payload,
            json!({"state": {"reported": {"b": 3, "cfg": {"y": 2}, "gone": null}}, "version": 2})
        );
    }

    #[test]
    fn a_conflicting_retry_carries_what_was_reported_since() {
        let (mut t, mut version, now) = (ShadowTracker::default(), 1, Instant::now());
        t.report(map(json!({"a": 1})), version, now);
        t.report(map(json!({"b": 2})), version, now);
        let r = t.on_reply(&json!({"status": "version_conflict", "version": 7}), &mut version, now);
        assert_eq!(r.send.unwrap().payload, json!({"state": {"reported": {"a": 1, "b": 2}}, "version": 7}));
    }

    #[test]
    fn a_report_is_given_up_after_repeated_conflicts() {
        let (mut t, mut version, now) = (ShadowTracker::default(), 1, Instant::now());
        t.report(map(json!({"a": 1})), version, now);
        for v in 2..(1 + MAX_CONFLICTS as i64) {
            let r = t.on_reply(&json!({"status": "version_conflict", "version": v}), &mut version, now);
            assert!(r.send.is_some());
        }
        let r = t.on_reply(&json!({"status": "version_conflict", "version": 99}), &mut version, now);
        assert_eq!((r.send, r.dropped_report), (None, Some(map(json!({"a": 1})))));
    }

    #[test]
    fn stale_or_duplicate_documents_change_nothing() {
        let (mut t, mut version) = (ShadowTracker::default(), 5);
        let doc = |v: i64, delta: Value| json!({"version": v, "delta": delta, "state": {"desired": delta}});
        assert_eq!(t.on_update(&doc(4, json!({"led": "on"})), &mut version), Reaction::default());
        assert_eq!(version, 5);
        let r = t.on_update(&doc(6, json!({"led": "on"})), &mut version);
        assert_eq!((version, r.desired.is_some()), (6, true));
        let r = t.on_update(&doc(6, json!({})), &mut version);
        assert_eq!(r.desired, None, "nothing to apply");
    }

    #[test]
    fn applying_a_superseded_desired_state_hands_over_the_new_one() {
        let (mut t, mut version, now) = (ShadowTracker::default(), 6, Instant::now());
        let sent = t.applied(6, version, now).unwrap();
        assert_eq!(sent.payload, json!({"state": {"desired": null}, "version": 6}));
        let newer = json!({"version": 7, "delta": {"led": "off"}, "state": {"desired": {"led": "off"}}});
        let r = t.on_reply(&json!({"status": "version_conflict", "version": 7, "shadow": newer}), &mut version, now);
        assert_eq!((version, r.desired, r.send), (7, Some(newer), None));
    }

    #[test]
    fn a_lost_reply_does_not_block_the_shadow_forever() {
        let (mut t, version, start) = (ShadowTracker::default(), 1, Instant::now());
        t.report(map(json!({"a": 1})), version, start);
        assert_eq!(t.report(map(json!({"b": 2})), version, start + Duration::from_secs(1)), None);
        let later = start + REPLY_TIMEOUT + Duration::from_secs(1);
        let sent = t.report(map(json!({"c": 3})), version, later).unwrap();
        assert_eq!(sent.payload, json!({"state": {"reported": {"a": 1, "b": 2, "c": 3}}, "version": 1}));
        assert_eq!(t.resend(version, later).unwrap(), sent, "a reconnect resends what is in flight");
    }
}
