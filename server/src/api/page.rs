//! Paging, one way for every list: `limit` (1-1000, default 100), an opaque `cursor` from the previous page,
//! and `next_cursor` in the answer (absent on the last page). Lists fetch one row beyond `limit` to know
//! whether another page exists.

use base64::Engine;
use serde::Deserialize;
use utoipa::IntoParams;

use crate::error::{Error, Result};

const CURSOR: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// Opaque cursor from the previous page.
    pub cursor: Option<String>,
    /// Page size, 1-1000 (default 100).
    pub limit: Option<u32>,
}

/// Trims the look-ahead row fetched beyond `limit` and returns the cursor of the next page, if any.
pub fn next_page<T>(items: &mut Vec<T>, limit: u32, cursor_of: impl Fn(&T) -> String) -> Option<String> {
    if items.len() as u32 > limit {
        items.truncate(limit as usize);
        items.last().map(cursor_of)
    } else {
        None
    }
}

pub fn page_limit(limit: Option<u32>) -> Result<u32> {
    match limit.unwrap_or(100) {
        l @ 1..=1000 => Ok(l),
        _ => Err(Error::validation("limit", "must be between 1 and 1000")),
    }
}

/// An opaque cursor for lists ordered by `(time, id)`.
pub fn time_cursor(at: i64, id: &str) -> String {
    CURSOR.encode(format!("{at}:{id}"))
}

/// Reads a [`time_cursor`].
pub fn decode_cursor(raw: &str) -> Result<(i64, String)> {
    let bad = || Error::validation("cursor", "not a cursor from a previous page");
    let text = String::from_utf8(CURSOR.decode(raw).map_err(|_| bad())?).map_err(|_| bad())?;
    let (at, id) = text.split_once(':').ok_or_else(bad)?;
    Ok((at.parse().map_err(|_| bad())?, id.to_string()))
}

/// Which page of a tag command's or rollout's per-device list to return (counts always cover every device).
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct TargetPageQuery {
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Devices per page, 1-1000 (default 100).
    pub limit: Option<u32>,
}

/// One page of per-device items ordered by device id, and the cursor of the next one.
pub fn target_page<T>(
    mut items: Vec<T>,
    query: &TargetPageQuery,
    device_of: impl Fn(&T) -> &str,
) -> Result<(Vec<T>, Option<String>)> {
    let limit = page_limit(query.limit)?;
    if let Some(cursor) = &query.cursor {
        crate::ids::validate_id(cursor)
            .map_err(|_| Error::validation("cursor", "not a cursor from a previous page"))?;
    }
    items.sort_by(|a, b| device_of(a).cmp(device_of(b)));
    let mut page: Vec<T> = items
        .into_iter()
        .filter(|item| query.cursor.as_deref().is_none_or(|c| device_of(item) > c))
        .take(limit as usize + 1)
        .collect();
    let next = next_page(&mut page, limit, |item| device_of(item).to_string());
    Ok((page, next))
}

pub const FIRST_PAGE: TargetPageQuery = TargetPageQuery { cursor: None, limit: None };
