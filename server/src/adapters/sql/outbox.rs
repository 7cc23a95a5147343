//! The outbox: [`OutboxStore`] for both backends, and how every aggregate's transaction writes its events
//! (`commit_with_events`) and hands the committed rows to the relay ([`OutboxHandOff`]).

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::Row;

use super::{for_each_backend, PgStore, SqliteStore};
use crate::clock::now_ms;
use crate::error::Result;
use crate::model::commands::Durability;
use crate::model::event_bus::{BusEvent, EventKind};
use crate::model::store::OutboxRecord;
use crate::ports::outbox::{OutboxSink, OutboxStore};

/// Where a store's committed outbox rows go, and how long they stay leased to that place before any
/// instance's sweep may publish them instead.
#[derive(Clone)]
pub struct OutboxHandOff {
    sink: Option<Arc<dyn OutboxSink>>,
    lease_ms: i64,
}

impl OutboxHandOff {
    pub fn new(sink: Arc<dyn OutboxSink>, lease_ms: i64) -> Self {
        Self { sink: Some(sink), lease_ms }
    }

    /// No relay in this process (a CLI command, a test): rows are left for the next sweep, unleased.
    pub fn detached() -> Self {
        Self { sink: None, lease_ms: 0 }
    }

    fn leased_until(&self, now: i64) -> i64 {
        if self.sink.is_some() {
            now + self.lease_ms
        } else {
            0
        }
    }

    /// Called once the rows' transaction committed.
    pub(super) fn committed(&self, records: Vec<OutboxRecord>) {
        if let (Some(sink), false) = (&self.sink, records.is_empty()) {
            sink.committed(records);
        }
    }
}

const INSERT_ONE: &str = "INSERT INTO event_outbox (kind, routing_key, event_id, body, created_at, leased_until)
     VALUES ($1, $2, $3, $4, $5, $6) RETURNING id";
const COUNT: &str = "SELECT COUNT(*) FROM event_outbox";

impl PgStore {
    /// Writes `events` into the outbox inside `tx` (one statement), commits, and hands the rows over.
    pub(super) async fn commit_with_events(
        &self,
        mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
        events: Vec<BusEvent>,
    ) -> Result<()> {
        let records = self.enqueue(&mut tx, events).await?;
        tx.commit().await?;
        self.outbox.committed(records);
        Ok(())
    }

    pub(super) async fn enqueue(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        events: Vec<BusEvent>,
    ) -> std::result::Result<Vec<OutboxRecord>, sqlx::Error> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let ids: Vec<(i64, String)> = sqlx::query_as(
            "INSERT INTO event_outbox (kind, routing_key, event_id, body, created_at, leased_until)
             SELECT k, r, e, b, $5, $6 FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::BYTEA[]) AS u(k, r, e, b)
             RETURNING id, event_id",
        )
        .bind(events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.routing_key.as_str()).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.event_id.as_str()).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.body.as_slice()).collect::<Vec<_>>())
        .bind(now)
        .bind(self.outbox.leased_until(now))
        .fetch_all(&mut **tx)
        .await?;
        Ok(pair_outbox_ids(events, ids))
    }

    /// The lease the rows written now get (for statements that write the outbox themselves).
    pub(super) fn outbox_leased_until(&self, now: i64) -> i64 {
        self.outbox.leased_until(now)
    }
}

impl SqliteStore {
    /// Writes `events` into the outbox inside `tx`, commits, and hands the rows over.
    pub(super) async fn commit_with_events(
        &self,
        mut tx: sqlx::Transaction<'_, sqlx::Sqlite>,
        events: Vec<BusEvent>,
    ) -> Result<()> {
        let now = now_ms();
        let mut records = Vec::with_capacity(events.len());
        for event in events {
            let id: i64 = sqlx::query_scalar(INSERT_ONE)
                .bind(event.kind.as_str())
                .bind(&event.routing_key)
                .bind(&event.event_id)
                .bind(&event.body)
                .bind(now)
                .bind(self.outbox.leased_until(now))
                .fetch_one(&mut *tx)
                .await?;
            records.push(OutboxRecord { id, event });
        }
        tx.commit().await?;
        self.outbox.committed(records);
        Ok(())
    }
}

/// Matches returned outbox ids to events by event id (events with equal ids are the same fact).
pub(super) fn pair_outbox_ids(events: Vec<BusEvent>, ids: Vec<(i64, String)>) -> Vec<OutboxRecord> {
    let mut by_id: std::collections::HashMap<String, Vec<BusEvent>> = std::collections::HashMap::new();
    for e in events {
        by_id.entry(e.event_id.clone()).or_default().push(e);
    }
    let mut out: Vec<OutboxRecord> = ids
        .into_iter()
        .filter_map(|(id, event_id)| {
            by_id.get_mut(&event_id).and_then(Vec::pop).map(|event| OutboxRecord { id, event })
        })
        .collect();
    out.sort_by_key(|r| r.id);
    out
}

fn outbox_row<R: Row>(r: &R) -> Result<OutboxRecord>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
{
    let kind: String = r.try_get("kind")?;
    Ok(OutboxRecord {
        id: r.try_get("id")?,
        event: BusEvent {
            kind: super::stored("event kind", kind, EventKind::parse)?,
            routing_key: r.try_get("routing_key")?,
            event_id: r.try_get("event_id")?,
            body: r.try_get("body")?,
        },
    })
}

/// Leases up to `$3` rows whose lease expired at `$2` until `$1`, oldest first; `$lock`: the backend's
/// row-lock clause.
macro_rules! lease_outbox {
    ($lock:literal) => {
        concat!(
            "UPDATE event_outbox SET leased_until = $1 WHERE id IN (
                 SELECT id FROM event_outbox WHERE leased_until < $2 ORDER BY id LIMIT $3",
            $lock,
            ") RETURNING id, kind, routing_key, event_id, body"
        )
    };
}

// The outbox is a queue: between vacuums its file swings from one page to thousands of dead rows. A plan
// cached while it was small scans the whole file for every statement (seen: 5 ms to delete 20 rows, a third
// of PostgreSQL's time in the command benchmark), so outbox statements are unnamed and planned against the
// table's current size each time. Acks go in one statement over an array on PostgreSQL, row by row on
// SQLite's single writer.
/// What happens to rows the relay is done with.
#[derive(Clone, Copy)]
enum Settle {
    /// Published and confirmed: deleted.
    Ack,
    /// Publishing failed: available to the next lease at once.
    Release,
}

impl PgStore {
    const LEASE_OUTBOX: &'static str = lease_outbox!(" FOR UPDATE SKIP LOCKED");

    async fn settle(&self, how: Settle, ids: &[i64]) -> Result<()> {
        let (statement, pool) = match how {
            // An ack lost in a database crash only publishes those events again (consumers drop duplicates
            // by event id), so it need not wait for fsync.
            Settle::Ack => ("DELETE FROM event_outbox WHERE id = ANY($1)", self.pool_for(Durability::Relaxed)),
            Settle::Release => ("UPDATE event_outbox SET leased_until = 0 WHERE id = ANY($1)", self.write()),
        };
        sqlx::query(statement).persistent(false).bind(ids).execute(pool).await?;
        Ok(())
    }
}
impl SqliteStore {
    const LEASE_OUTBOX: &'static str = lease_outbox!("");

    async fn settle(&self, how: Settle, ids: &[i64]) -> Result<()> {
        let statement = match how {
            Settle::Ack => "DELETE FROM event_outbox WHERE id = $1",
            Settle::Release => "UPDATE event_outbox SET leased_until = 0 WHERE id = $1",
        };
        let mut tx = self.write().begin().await?;
        for id in ids {
            sqlx::query(statement).bind(id).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

for_each_backend! {
    #[async_trait]
    impl OutboxStore for Store {
        #[tracing::instrument(skip(self), name = "sql.outbox_lease")]
        async fn outbox_lease(&self, limit: u32, now: i64, lease_ms: i64) -> Result<Vec<OutboxRecord>> {
            let rows = sqlx::query(Store::LEASE_OUTBOX)
                .persistent(false)
                .bind(now + lease_ms)
                .bind(now)
                .bind(i64::from(limit))
                .fetch_all(self.write())
                .await?;
            let mut records = rows.iter().map(outbox_row).collect::<Result<Vec<_>>>()?;
            records.sort_by_key(|r| r.id);
            Ok(records)
        }

        #[tracing::instrument(skip_all, fields(count = ids.len()), name = "sql.outbox_ack")]
        async fn outbox_ack(&self, ids: &[i64]) -> Result<()> {
            self.settle(Settle::Ack, ids).await
        }

        #[tracing::instrument(skip_all, fields(count = ids.len()), name = "sql.outbox_release")]
        async fn outbox_release(&self, ids: &[i64]) -> Result<()> {
            self.settle(Settle::Release, ids).await
        }

        #[tracing::instrument(skip(self), name = "sql.outbox_len")]
        async fn outbox_len(&self) -> Result<i64> {
            Ok(sqlx::query_scalar(COUNT).fetch_one(self.read()).await?)
        }
    }
}
