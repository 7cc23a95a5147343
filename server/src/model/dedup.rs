//! Data of the `dedup` port (ports/dedup.rs): plain types, no storage or transport.

/// What a claim found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Never seen (or its earlier claim expired): process it.
    New,
    /// Another worker claimed it and has not finished. Processing again is safe (stores are idempotent)
    /// and is what keeps the message if that worker died.
    InFlight,
    /// Handled within the dedup window: skip it.
    Done,
}
