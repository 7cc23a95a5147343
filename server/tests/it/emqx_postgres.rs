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
    q.replace("${username}", "$1")
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

    let row = sqlx::query(&as_prepared(&authn)).bind("p1/d1").fetch_one(&mut conn).await.unwrap();
    let (hash, salt, superuser): (String, String, bool) =
        (row.get("password_hash"), row.get("salt"), row.get("is_superuser"));
    assert!(!superuser);
    assert!(emqx_check(&secret, &salt, &hash), "EMQX would accept the issued secret");
    assert!(!emqx_check("wrong", &salt, &hash));

    let rows = sqlx::query(&as_prepared(&authz)).bind("p1/d1").fetch_all(&mut conn).await.unwrap();
    let rules: Vec<(String, String, String)> =
        rows.iter().map(|r| (r.get("permission"), r.get("action"), r.get("topic"))).collect();
    let expected: Vec<(String, String, String)> = iothub::topics::DEVICE_ACL
        .iter()
        .map(|r| ("allow".into(), r.action.as_str().into(), iothub::topics::expand_template(r.topic, "p1", "d1")))
        .collect();
    let mut sorted = rules.clone();
    sorted.sort();
    let mut expected_sorted = expected.clone();
    expected_sorted.sort();
    assert_eq!(sorted, expected_sorted, "the SQL ACL equals the HTTP ACL");
    for r in &rows {
        assert!(r.get::<Option<i32>, _>("qos").is_none() && r.get::<Option<i32>, _>("retain").is_none());
    }

    // Rotation: EMQX reads one row, the newest secret.
    let (_, b) = hub
        .call(Method::POST, "/api/v1/products/p1/devices/d1/rotate-secret", Some(json!({"overlap_seconds": 60})))
        .await;
    let newest = b["secret"].as_str().unwrap();
    let row = sqlx::query(&as_prepared(&authn)).bind("p1/d1").fetch_one(&mut conn).await.unwrap();
    assert!(emqx_check(newest, row.get("salt"), row.get("password_hash")));

    // Suspended or unknown devices have no rows at all (EMQX: ignore -> chain exhausted -> refused).
    hub.call(Method::POST, "/api/v1/products/p1/devices/d1/suspend", None).await;
    assert!(sqlx::query(&as_prepared(&authn)).bind("p1/d1").fetch_optional(&mut conn).await.unwrap().is_none());
    assert!(sqlx::query(&as_prepared(&authz)).bind("p1/d1").fetch_all(&mut conn).await.unwrap().is_empty());
    assert!(sqlx::query(&as_prepared(&authn)).bind("p1/ghost").fetch_optional(&mut conn).await.unwrap().is_none());

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
