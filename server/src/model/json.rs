//! JSON as the stores keep it.

/// The payload as JSON text a JSON column accepts, or `None`. Parsed into a value (which refuses what
/// PostgreSQL's JSONB would: lone surrogate escapes, numbers out of range) and written back normalised
/// (exponents PostgreSQL's `numeric` cannot hold become plain floats), and without NUL escapes, which
/// JSONB rejects. One bad payload must never fail a whole group of other devices' events.
pub fn storable_json(bytes: &[u8]) -> Option<(serde_json::Value, String)> {
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let text = serde_json::to_string(&value).ok()?;
    if text.contains("\\u0000") {
        return None;
    }
    Some((value, text))
}
