//! Data of the `kicks` port (ports/kicks.rs): plain types, no storage or transport.

/// One intent as a sweeper claims it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingKick {
    pub username: String,
    /// When the change asking for it was made (Unix ms); a newer request replaces the row.
    pub requested_at: i64,
    /// Attempts so far, this claim included.
    pub attempts: i32,
}
