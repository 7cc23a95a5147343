//! Tags on the device: which tag topics to subscribe to, and when iothub's `$set_tags` applies.
//!
//! Tag commands reach a device only through its own subscriptions to `tags/{p}/{tag}/cmd/...`, which a broker
//! forgets with the session. So the device keeps its tags (and version) in its state file, subscribes to all
//! of them on every connect, and on `$set_tags` subscribes and unsubscribes just the difference — only when
//! the pushed version is newer than its own (a late, reordered push must not roll tags back).

use std::collections::BTreeSet;

/// Subscriptions to change when the tags change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TagDiff {
    pub subscribe: Vec<String>,
    pub unsubscribe: Vec<String>,
}

/// What to subscribe and unsubscribe to go from `old` to `new` (sorted, without duplicates).
pub fn diff(old: &[String], new: &[String]) -> TagDiff {
    let old: BTreeSet<&String> = old.iter().collect();
    let new: BTreeSet<&String> = new.iter().collect();
    TagDiff {
        subscribe: new.difference(&old).map(|t| t.to_string()).collect(),
        unsubscribe: old.difference(&new).map(|t| t.to_string()).collect(),
    }
}

/// iothub's `$set_tags` body.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct SetTags {
    pub tags: Vec<String>,
    pub tags_version: i64,
}

impl SetTags {
    /// Whether this push should replace tags of `current_version`.
    pub fn is_newer_than(&self, current_version: i64) -> bool {
        self.tags_version > current_version
    }

    /// The pushed tags, keeping only valid ids (a tag that is not an id could not be a topic level).
    pub fn valid_tags(&self) -> Vec<String> {
        let set: BTreeSet<&String> =
            self.tags.iter().filter(|t| iothub_protocol::ids::validate_id(t).is_ok()).collect();
        set.into_iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v(tags: &[&str]) -> Vec<String> {
        tags.iter().map(|t| t.to_string()).collect()
    }

    #[test]
    fn only_the_difference_changes() {
        assert_eq!(
            diff(&v(&["a", "b", "c"]), &v(&["c", "d", "b", "d"])),
            TagDiff { subscribe: v(&["d"]), unsubscribe: v(&["a"]) }
        );
        assert_eq!(diff(&v(&["a"]), &v(&["a"])), TagDiff::default());
    }

    #[test]
    fn older_or_equal_pushes_are_ignored_and_bad_tags_dropped() {
        let push = SetTags { tags: v(&["lab", "a/b", "lab", "+"]), tags_version: 4 };
        assert!(push.is_newer_than(3));
        assert!(!push.is_newer_than(4));
        assert_eq!(push.valid_tags(), v(&["lab"]));
    }

    proptest! {
        /// Applying the diff to the old subscriptions gives exactly the new set.
        #[test]
        fn diff_is_exact(old in prop::collection::vec("[a-d]", 0..6), new in prop::collection::vec("[a-d]", 0..6)) {
            let d = diff(&old, &new);
            let mut subs: BTreeSet<String> = old.iter().cloned().collect();
            for t in &d.unsubscribe { prop_assert!(subs.remove(t)); }
            for t in &d.subscribe { prop_assert!(subs.insert(t.clone())); }
            prop_assert_eq!(subs, new.iter().cloned().collect::<BTreeSet<_>>());
        }
    }
}
