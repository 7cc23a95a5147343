//! EMQX 5's built-in PostgreSQL authn/authz run the queries in emqx-config/ against iothub's tables.
//! This test runs exactly those queries (from emqx-config/queries.txt, checked against the HOCON file),
//! binding `${username}` the way EMQX does (a prepared-statement parameter), and verifies the password hash
//! with EMQX's algorithm, so the config, the migrations and the hashing cannot drift apart.

use reqwest::Method;
use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::{Connection, Row};

use crate::helpers::{Db, TestHub};

fn emqx_queries() -> (String, String) {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../emqx-config/");
    let queries = std::fs::read_to_string(format!("{root}queries.txt")).unwrap();
    let hocon = std::fs::read_to_string(format!("{root}emqx-postgresql.hocon")).unwrap();
    let get = |prefix: &str| {
        let q = queries.lines().find_map(|l| l.strip_prefix(prefix)).unwrap().trim().to_string();
        assert!(hocon.contains(&q), "emqx-postgresql.hocon must contain the query `{q}` verbatim");
        q
    };
    (get("authn: "), get("authz: "))
}

/// EMQX replaces each `${var}` with a positional parameter of a prepared statement.
fn as_prepared(q: &str) -> String {
    q.replace("${username}", "$1").replace("${clientid}", "$2")
}

/// EMQX's `emqx_topic:match/2` (apps/emqx/src/emqx_topic.erl, v5.8.9), as its authz sources use it with the
/// *requested* filter as the name: a granted `+` matches any requested level, `+` and `#` included, and a
/// granted `#` matches the rest (or nothing); a leading wildcard never matches a `$` level.
fn emqx_match(name: &str, filter: &str) -> bool {
    if name.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    fn words(n: &[&str], f: &[&str]) -> bool {
        match (n, f) {
            ([], []) => true,
            (_, ["#"]) => true,
            ([h1, t1 @ ..], [h2, t2 @ ..]) if h1 == h2 || *h2 == "+" => words(t1, t2),
            _ => false,
        }
    }
    words(&name.split('/').collect::<Vec<_>>(), &filter.split('/').collect::<Vec<_>>())
}

/// EMQX's rule evaluation over the rows of one authz query: first row whose action and topic match decides
/// (`eq ` = literal), none = `no_match` (deny in emqx-config).
fn emqx_authorizes(rows: &[(String, String, String)], action: &str, requested: &str) -> bool {
    rows.iter()
        .find(|(_, row_action, topic)| {
            (row_action == action || row_action == "all")
                && match topic.strip_prefix("eq ") {
                    Some(literal) => literal == requested,
                    None => emqx_match(requested, topic),
                }
        })
        .is_some_and(|(permission, _, _)| permission == "allow")
}

/// EMQX's `sha256` with `salt_position = prefix`.
fn emqx_check(password: &str, salt: &str, hash: &str) -> bool {
    hex::encode(Sha256::digest([salt.as_bytes(), password.as_bytes()].concat())) == hash
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emqx_postgres_queries_match_schema() {
    let hub = TestHub::start(Db::Postgres).await;
    hub.create_product("p1").await;
    let secret = hub.register("p1", "d1").await;
    hub.register("p1", "d2").await;
    let (authn, authz) = emqx_queries();
    assert_eq!(hub.state.store.backend(), "postgres");
    let mut conn = sqlx::PgConnection::connect(&test_db_url(&hub)).await.unwrap();

    let row = sqlx::query(&as_prepared(&authn)).bind("p1/d1").bind("p1/d1").fetch_one(&mut conn).await.unwrap();
    let (hash, salt, superuser): (String, String, bool) =
        (row.get("password_hash"), row.get("salt"), row.get("is_superuser"));
    assert!(!superuser);
    assert!(emqx_check(&secret, &salt, &hash), "EMQX would accept the issued secret");
    assert!(!emqx_check("wrong", &salt, &hash));
    // The client id rule holds on this path too: no row (EMQX: ignore, then refused) for a client id bound to
    // another identity, so no device takes over another's session.
    for (clientid, found) in [
        ("p1/d1/backup", true),
        ("p1/d2", false),
        ("p1/d1-b", false),
        ("p1/d1/", false),
        ("p1/d1/a/b", false),
        ("p1/d1/%A", false),
        ("x", false),
    ] {
        let row = sqlx::query(&as_prepared(&authn)).bind("p1/d1").bind(clientid).fetch_optional(&mut conn).await;
        assert_eq!(row.unwrap().is_some(), found, "client id {clientid}");
    }

    // Authz: EMQX evaluates the rows itself, with its own wildcard matching. Whatever it would allow, iothub's
    // HTTP authz (exact filter coverage) must allow too: the PostgreSQL variant is never wider.
    let (s, _) =
        hub.call(Method::PUT, "/api/v1/products/p1/devices/d1/tags", Some(json!({"tags": ["t1", "floor-2"]}))).await;
    assert!(s.is_success());
    let rows = sqlx::query(&as_prepared(&authz)).bind("p1/d1").fetch_all(&mut conn).await.unwrap();
    let rules: Vec<(String, String, String)> =
        rows.iter().map(|r| (r.get("permission"), r.get("action"), r.get("topic"))).collect();
    for r in &rows {
        assert!(r.get::<Option<i32>, _>("qos").is_none() && r.get::<Option<i32>, _>("retain").is_none());
    }
    let may = |action: iothub::topics::Action, topic: &str| iothub::topics::device_may("p1", "d1", action, topic);
    let mut requested: Vec<String> = [
        // Filters a broker's `+`-matches-`#` rule would widen.
        "m2m/p1/d1/+/#",
        "m2m/p1/d1/d2/#",
        "m2m/p1/d1/#",
        "cmd/p1/d1/#",
        "cmd/p1/d1/+/+/#",
        "cmd/p1/d1/+/+/+/+",
        "tags/p1/t1/cmd/a/b/#",
        "tags/p1/t1/cmd/+/+/#",
        "tags/p1/#",
        "tags/p1/+/cmd/+/+/+/#",
    ]
    .map(String::from)
    .to_vec();
    // And a deterministic sample of every filter shape over the levels that matter.
    let vocabulary = ["cmd", "rpc", "m2m", "tags", "p1", "p2", "d1", "d2", "t1", "floor-2", "+", "#", "x"];
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..30_000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let len = 1 + (seed % 8) as usize;
        let levels: Vec<&str> = (0..len).map(|i| vocabulary[((seed >> (8 + 5 * i)) % 13) as usize]).collect();
        let filter = levels.join("/");
        if iothub::topics::is_valid_filter(&filter) {
            requested.push(filter);
        }
    }
    let mut widened = Vec::new();
    for filter in &requested {
        if emqx_authorizes(&rules, "subscribe", filter) && !may(iothub::topics::Action::Subscribe, filter) {
            widened.push(filter.clone());
        }
    }
    assert!(widened.is_empty(), "EMQX's PostgreSQL authz allows what iothub's does not: {widened:?}");
    // What devices actually subscribe to stays allowed (the broker's auto-subscriptions skip authz anyway).
    for filter in ["cmd/p1/d1/+/+/+/#", "rpc/p1/d1/+/+/+/#", "m2m/p1/d1/+/+", "tags/p1/t1/cmd/+/+/+/#"] {
        assert!(emqx_authorizes(&rules, "subscribe", filter), "{filter}");
    }
    assert!(!emqx_authorizes(&rules, "subscribe", "tags/p1/t9/cmd/+/+/+/#"), "a tag the device does not have");
    // Publishes: EMQX's matching of a topic name against the rows equals iothub's, both ways.
    for topic in [
        "upload_data/p1/d1/temp/m1",
        "upload_data/p1/d2/temp/m1",
        "get/p1/d1/$ntp/m1",
        "m2m/p1/d2/d1/m1",
        "m2m/p1/d2/d3/m1",
        "update_status/p1/d1/m1",
        "update_status/p1/d1/m1/x",
        "cmd/p1/d1/reboot/plain/r1",
    ] {
        assert_eq!(emqx_authorizes(&rules, "publish", topic), may(iothub::topics::Action::Publish, topic), "{topic}");
    }

    // Rotation: EMQX reads one row, the newest secret.
    let (_, b) = hub
        .call(Method::POST, "/api/v1/products/p1/devices/d1/rotate-secret", Some(json!({"overlap_seconds": 60})))
        .await;
    let newest = b["secret"].as_str().unwrap();
    let row = sqlx::query(&as_prepared(&authn)).bind("p1/d1").bind("p1/d1").fetch_one(&mut conn).await.unwrap();
    assert!(emqx_check(newest, row.get("salt"), row.get("password_hash")));

    // Suspended or unknown devices have no rows at all (EMQX: ignore -> chain exhausted -> refused).
    hub.call(Method::POST, "/api/v1/products/p1/devices/d1/suspend", None).await;
    assert!(sqlx::query(&as_prepared(&authn))
        .bind("p1/d1")
        .bind("p1/d1")
        .fetch_optional(&mut conn)
        .await
        .unwrap()
        .is_none());
    assert!(sqlx::query(&as_prepared(&authz)).bind("p1/d1").fetch_all(&mut conn).await.unwrap().is_empty());
    assert!(sqlx::query(&as_prepared(&authn))
        .bind("p1/ghost")
        .bind("p1/ghost")
        .fetch_optional(&mut conn)
        .await
        .unwrap()
        .is_none());

    // The seeded templates are exactly the code's ACL.
    let seeded: Vec<(String, String)> = sqlx::query("SELECT action, topic FROM acl_rule_templates ORDER BY position")
        .fetch_all(&mut conn)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get("action"), r.get("topic")))
        .collect();
    let code: Vec<(String, String)> =
        iothub::topics::DEVICE_ACL.iter().map(|r| (r.action.as_str().to_string(), r.topic.to_string())).collect();
    assert_eq!(seeded, code);
    drop(conn);
    hub.stop().await;
}

fn test_db_url(hub: &TestHub) -> String {
    hub.pg_url().expect("postgres hub").to_string()
}
