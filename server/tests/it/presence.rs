//! Presence is order-independent: whatever order (and however often) a broker delivers the connect and
//! disconnect webhooks of a device's sessions, the stored state ends up equal to the true one. Property
//! tests over the real stores (SQLite and PostgreSQL), with EMQX-style and RMQTT-style session identity.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use iothub::adapters::sql::{OutboxHandOff, PgStore, SqliteStore};
use iothub::ids::{DeviceId, DeviceRef, ProductId};
use iothub::model::store::{IngestBatch, NewDevice, OutboxRecord, PresenceChange};
use iothub::ports::outbox::OutboxSink;
use iothub::ports::store::Store;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};

use crate::helpers::TestDatabase;

/// The outbox rows the store hands over as it commits them (the relay's place in a running hub).
#[derive(Default)]
struct Committed(std::sync::Mutex<Vec<OutboxRecord>>);

impl OutboxSink for Committed {
    fn committed(&self, records: Vec<OutboxRecord>) {
        self.0.lock().unwrap().extend(records);
    }
}

impl Committed {
    fn take(&self) -> Vec<OutboxRecord> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// One true session of a client.
#[derive(Debug, Clone)]
struct Session {
    client: usize,
    peer: String,
    connected_at: i64,
    /// `None`: still open at the end.
    disconnected_at: Option<i64>,
}

#[derive(Debug, Clone, Copy)]
enum Style {
    /// EMQX 5 / EMQX 4: both events carry `connected_at`, which identifies the session.
    Emqx,
    /// RMQTT: the disconnect has no `connected_at`; the peer address identifies the session.
    Rmqtt,
}

/// Sessions of up to two client ids; later sessions of a client may start before the previous one ended
/// (takeover) or after — and then sometimes from the same peer address (a device reconnecting from the
/// same port, which repeats RMQTT's session key); every session but a client's last is closed.
fn history() -> impl Strategy<Value = Vec<Session>> {
    let client = (1usize..=4).prop_flat_map(|n| {
        (
            prop::collection::vec((1i64..60, 1i64..120, any::<bool>()), n),
            any::<bool>(), // is the last session still open?
        )
    });
    prop::collection::vec(client, 1..=2).prop_map(|clients| {
        let base = iothub::clock::now_ms() - 60_000;
        let mut sessions = Vec::new();
        for (c, (spans, last_open)) in clients.into_iter().enumerate() {
            let mut at = base;
            let n = spans.len();
            let mut previous: Option<(String, i64)> = None;
            for (i, (gap, duration, same_port)) in spans.into_iter().enumerate() {
                at += gap;
                let open = i == n - 1 && last_open;
                let peer = match &previous {
                    // A port can only be reused once its previous connection is gone.
                    Some((peer, ended)) if same_port && *ended < at => peer.clone(),
                    _ => format!("10.0.0.{c}:{}", 20_000 + sessions.len()),
                };
                let disconnected_at = (!open).then_some(at + duration);
                previous = Some((peer.clone(), disconnected_at.unwrap_or(i64::MAX)));
                sessions.push(Session { client: c, peer, connected_at: at, disconnected_at });
            }
        }
        sessions
    })
}

fn session_key(s: &Session, style: Style) -> String {
    match style {
        Style::Emqx => format!("t{}", s.connected_at),
        Style::Rmqtt => format!("a{}", s.peer),
    }
}

fn changes(device: &DeviceRef, sessions: &[Session], style: Style) -> Vec<PresenceChange> {
    let mut out = Vec::new();
    for s in sessions {
        let key = session_key(s, style);
        out.push(PresenceChange::Connected {
            device: device.clone(),
            client_id: format!("c{}", s.client),
            session_key: key.clone(),
            connected_at: s.connected_at,
            ip_address: Some(s.peer.clone()),
            proto_ver: Some(5),
            keepalive: 60,
            clean_start: Some(true),
            node: None,
        });
        if let Some(d) = s.disconnected_at {
            out.push(PresenceChange::Disconnected {
                device: device.clone(),
                client_id: format!("c{}", s.client),
                session_key: key,
                connected_at: matches!(style, Style::Emqx).then_some(s.connected_at),
                disconnected_at: d,
                reason: "normal".into(),
                ip_address: None,
                node: None,
            });
        }
    }
    out
}

/// The history, its events shuffled with some duplicated, cut into batches.
fn scenario() -> impl Strategy<Value = (Vec<Session>, Vec<usize>, Vec<usize>)> {
    history().prop_flat_map(|sessions| {
        let events = sessions.len() + sessions.iter().filter(|s| s.disconnected_at.is_some()).count();
        let order = (0..events).collect::<Vec<_>>();
        (
            Just(sessions),
            prop::collection::vec(0..events, 0..=events).prop_flat_map(move |dups| {
                let mut all = order.clone();
                all.extend(dups);
                Just(all).prop_shuffle()
            }),
            prop::collection::vec(1usize..=4, 1..=8),
        )
    })
}

/// Applies the history's shuffled stream to two devices at once, their changes interleaved inside every
/// batch (a store may group a batch's changes by device: neither twin may see the other's), and returns
/// the `online` flag of each twin's last connection event.
async fn check_case(
    store: &Arc<dyn Store>,
    committed: &Committed,
    twins: [DeviceRef; 2],
    sessions: &[Session],
    order: &[usize],
    cuts: &[usize],
    style: Style,
) -> Result<(), TestCaseError> {
    let mut streams = Vec::new();
    for device in &twins {
        store
            .insert_devices(
                &device.product,
                &[NewDevice { device: device.device.clone(), secret: iothub::secrets::new_device_secret().1 }],
                0,
            )
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let all = changes(device, sessions, style);
        streams.push(order.iter().map(|&i| all[i].clone()).collect::<Vec<PresenceChange>>());
    }
    let mut last_event_online: [Option<bool>; 2] = [None, None];
    let mut cut = cuts.iter().cycle();
    while !streams[0].is_empty() {
        let n = (*cut.next().unwrap()).min(streams[0].len());
        let (a, b): (Vec<_>, Vec<_>) = (streams[0].drain(..n).collect(), streams[1].drain(..n).collect());
        let presence: Vec<_> = a.into_iter().zip(b).flat_map(|(x, y)| [x, y]).collect();
        let batch = IngestBatch { presence, ..Default::default() };
        store.ingest(&batch).await.map_err(|e| TestCaseError::fail(e.to_string()))?;
        for record in &committed.take() {
            let event: serde_json::Value = serde_json::from_slice(&record.event.body).unwrap();
            let twin = twins.iter().position(|d| event["device_id"] == d.device.as_str()).unwrap();
            last_event_online[twin] = event["online"].as_bool();
        }
    }
    for (device, event_online) in twins.iter().zip(last_event_online) {
        check_device(store, device, sessions, style, event_online).await?;
    }
    Ok(())
}

async fn check_device(
    store: &Arc<dyn Store>,
    device: &DeviceRef,
    sessions: &[Session],
    style: Style,
    last_event_online: Option<bool>,
) -> Result<(), TestCaseError> {
    let mut expected_online = false;
    for client in sessions.iter().map(|s| s.client).collect::<BTreeSet<_>>() {
        let last = sessions.iter().filter(|s| s.client == client).max_by_key(|s| s.connected_at).unwrap();
        expected_online |= last.disconnected_at.is_none();
    }
    let record = store.get_device(device).await.unwrap().unwrap();
    prop_assert_eq!(record.online, expected_online, "online flag");
    // The first delivery of every change is applied, so each device has events; the last one applied
    // reports the final state.
    prop_assert_eq!(last_event_online, Some(expected_online), "online in the last connection event");
    let stored: BTreeSet<(String, Option<i64>, Option<i64>)> = store
        .list_connections(device, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.client_id, c.connected_at, c.disconnected_at))
        .collect();
    // One row per session key: the newest session that had it.
    let mut newest: std::collections::HashMap<(usize, String), &Session> = std::collections::HashMap::new();
    for s in sessions {
        let slot = newest.entry((s.client, session_key(s, style))).or_insert(s);
        if s.connected_at > slot.connected_at {
            *slot = s;
        }
    }
    let truth: BTreeSet<(String, Option<i64>, Option<i64>)> =
        newest.values().map(|s| (format!("c{}", s.client), Some(s.connected_at), s.disconnected_at)).collect();
    prop_assert_eq!(stored, truth, "sessions");
    let last_seen = sessions.iter().map(|s| s.disconnected_at.unwrap_or(s.connected_at).max(s.connected_at)).max();
    prop_assert_eq!(record.last_seen_at, last_seen, "last seen = newest broker timestamp");
    Ok(())
}

async fn run_property(store: Arc<dyn Store>, committed: Arc<Committed>, cases: u32) {
    let product = ProductId::parse("prop").unwrap();
    store.create_product(&product, "prop", "", 0).await.unwrap();
    let counter = AtomicUsize::new(0);
    let handle = tokio::runtime::Handle::current();
    for style in [Style::Emqx, Style::Rmqtt] {
        let mut runner =
            TestRunner::new(ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() });
        let result = tokio::task::block_in_place(|| {
            runner.run(&scenario(), |(sessions, order, cuts)| {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let twin = |t: &str| DeviceRef::new(product.clone(), DeviceId::parse(format!("d{n}{t}")).unwrap());
                handle.block_on(check_case(&store, &committed, [twin("a"), twin("b")], &sessions, &order, &cuts, style))
            })
        });
        if let Err(e) = result {
            panic!("{style:?}: {e}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_order_independent_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::connect(&format!("sqlite://{}", dir.path().join("p.db").display()), 4).await.unwrap();
    store.migrate().await.unwrap();
    let committed = Arc::new(Committed::default());
    run_property(Arc::new(store.with_outbox(OutboxHandOff::new(committed.clone(), 30_000))), committed, 128).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_order_independent_postgres() {
    let db = TestDatabase::create().await;
    let store = PgStore::connect(&db.url, 4).await.unwrap();
    store.migrate().await.unwrap();
    let committed = Arc::new(Committed::default());
    run_property(Arc::new(store.with_outbox(OutboxHandOff::new(committed.clone(), 30_000))), committed, 64).await;
}
