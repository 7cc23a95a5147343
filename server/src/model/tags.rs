//! Data of the `tags` port (ports/tags.rs): plain types, no storage or transport.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTags {
    /// Sorted, without duplicates.
    pub tags: Vec<String>,
    pub version: i64,
    pub online: bool,
}
