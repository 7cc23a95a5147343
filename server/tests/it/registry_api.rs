//! The business API for products, devices, secrets and API keys, on both storage backends.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::both_backends;
use crate::helpers::{Db, TestHub};

both_backends!(product_lifecycle, product_lifecycle);
async fn product_lifecycle(db: Db) {
    let hub = TestHub::start(db).await;
    let (s, b) = hub.call(Method::POST, "/api/v1/products", Some(json!({"id": "meter", "name": "Smart meter"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(b["name"], "Smart meter");
    assert_eq!(b["device_count"], 0);

    let (s, b) = hub.call(Method::POST, "/api/v1/products", Some(json!({"id": "meter"}))).await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");

    for bad in ["a/b", "a+b", "#", "$sys", "é", "", "x".repeat(65).as_str()] {
        let resp = hub.request(Method::POST, "/api/v1/products").json(&json!({"id": bad})).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY, "{bad:?}");
        assert_eq!(resp.headers()["content-type"], "application/problem+json");
        let problem: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(problem["field"], "id", "{problem}");
    }
    let (s, b) = hub.call(Method::POST, "/api/v1/products", Some(json!({"id": 5}))).await;
    assert_eq!((s, b["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("id")), "{b}");
    let (s, b) = hub.call(Method::POST, "/api/v1/products", Some(json!({"nme": "x"}))).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");

    hub.create_product("other").await;
    let (s, b) = hub.call(Method::GET, "/api/v1/products?limit=1", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["items"][0]["id"], "meter");
    let cursor = b["next_cursor"].as_str().unwrap().to_string();
    let (_, b) = hub.call(Method::GET, &format!("/api/v1/products?limit=1&cursor={cursor}"), None).await;
    assert_eq!(b["items"][0]["id"], "other");
    assert!(b.get("next_cursor").is_none(), "a full last page carries no cursor: {b}");
    let (s, b) = hub.call(Method::GET, "/api/v1/products?limit=abc", None).await;
    assert_eq!((s, b["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("limit")), "{b}");
    let (s, b) = hub.call(Method::GET, "/api/v1/products?page=2", None).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    let resp = hub.request(Method::PUT, "/api/v1/products").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");

    hub.register("meter", "m1").await;
    let (s, b) = hub.call(Method::DELETE, "/api/v1/products/meter", None).await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    let (s, _) = hub.call(Method::DELETE, "/api/v1/products/meter?force=true", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = hub.call(Method::GET, "/api/v1/products/meter", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = hub.call(Method::GET, "/api/v1/products/meter/devices/m1", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    hub.stop().await;
}

both_backends!(device_registration, device_registration);
async fn device_registration(db: Db) {
    let hub = TestHub::start(db).await;
    hub.create_product("p1").await;

    let (s, b) = hub.call(Method::POST, "/api/v1/products/p1/devices", Some(json!({"device_id": "d1"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(b["broker_username"], "p1/d1");
    let secret = b["secret"].as_str().unwrap();
    assert!(secret.len() >= 32, "secret carries at least 128 bits");

    // The secret is never readable again, nor any hash of it.
    let (s, b) = hub.call(Method::GET, "/api/v1/products/p1/devices/d1", None).await;
    assert_eq!(s, StatusCode::OK);
    let text = b.to_string();
    assert!(!text.contains(secret), "{text}");
    assert!(!text.contains("hash") && !text.contains("salt"), "{text}");
    assert_eq!(b["status"], "active");
    assert_eq!(b["credentials"].as_array().unwrap().len(), 1);

    let (s, _) = hub.call(Method::POST, "/api/v1/products/p1/devices", Some(json!({"device_id": "d1"}))).await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, b) = hub.call(Method::POST, "/api/v1/products/p1/devices", Some(json!({"device_id": "d/1"}))).await;
    assert_eq!((s, b["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("device_id")), "{b}");
    let (s, _) = hub.call(Method::POST, "/api/v1/products/nope/devices", Some(json!({}))).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Generated id, with or without an (all-optional) body.
    let (s, b) = hub.call(Method::POST, "/api/v1/products/p1/devices", Some(json!({}))).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(b["device_id"].as_str().unwrap().len(), 32);
    let (s, _) = hub.call(Method::POST, "/api/v1/products/p1/devices", None).await;
    assert_eq!(s, StatusCode::CREATED);

    // Bulk: explicit ids are all-or-nothing.
    let (s, b) = hub
        .call(
            Method::POST,
            "/api/v1/products/p1/devices/bulk",
            Some(json!({"devices": [{"device_id": "b1"}, {"device_id": "b2"}, {"device_id": "d1"}]})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    let (s, _) = hub.call(Method::GET, "/api/v1/products/p1/devices/b1", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "a failed bulk registration writes nothing");
    let (s, b) = hub
        .call(
            Method::POST,
            "/api/v1/products/p1/devices/bulk",
            Some(json!({"devices": [{"device_id": "ok"}, {"device_id": "bad+"}]})),
        )
        .await;
    assert_eq!((s, b["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("devices[1].device_id")), "{b}");

    let (s, b) = hub
        .call(
            Method::POST,
            "/api/v1/products/p1/devices/bulk",
            Some(json!({"devices": [{"device_id": "x1"}, {"device_id": "x1"}]})),
        )
        .await;
    assert_eq!((s, b["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("devices[1].device_id")), "{b}");

    let (s, b) = hub.call(Method::POST, "/api/v1/products/p1/devices/bulk", Some(json!({"count": 2500}))).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(b["items"].as_array().unwrap().len(), 2500);
    let (s, b) = hub.call(Method::POST, "/api/v1/products/p1/devices/bulk", Some(json!({"count": 10001}))).await;
    assert_eq!((s, b["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("count")));

    // Cursor pagination visits every device exactly once.
    let mut seen = std::collections::HashSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/products/p1/devices?limit=1000&cursor={c}"),
            None => "/api/v1/products/p1/devices?limit=1000".to_string(),
        };
        let (s, b) = hub.call(Method::GET, &path, None).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        for d in b["items"].as_array().unwrap() {
            assert!(seen.insert(d["device_id"].as_str().unwrap().to_string()));
        }
        match b["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 2503);

    // Status filter.
    let (s, _) = hub.call(Method::POST, "/api/v1/products/p1/devices/d1/suspend", None).await;
    assert_eq!(s, StatusCode::OK);
    let (_, b) = hub.call(Method::GET, "/api/v1/products/p1/devices?status=suspended", None).await;
    let items = b["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["device_id"], "d1");
    let (s, b) = hub.call(Method::GET, "/api/v1/products/p1/devices?status=sleeping", None).await;
    assert_eq!((s, b["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("status")));

    let (s, _) = hub.call(Method::DELETE, "/api/v1/products/p1/devices/d1", None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = hub.call(Method::GET, "/api/v1/products/p1/devices/d1", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    hub.stop().await;
}

both_backends!(api_keys_and_scopes, api_keys_and_scopes);
async fn api_keys_and_scopes(db: Db) {
    let hub = TestHub::start(db).await;
    let anon = hub.http.get(format!("{}/api/v1/products", hub.base)).send().await.unwrap();
    assert_eq!(anon.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(anon.headers()["content-type"], "application/problem+json");
    let forged = hub.http.get(format!("{}/api/v1/products", hub.base)).bearer_auth("ihk_abc_def").send().await.unwrap();
    assert_eq!(forged.status(), StatusCode::UNAUTHORIZED);

    let (s, b) =
        hub.call(Method::POST, "/api/v1/api-keys", Some(json!({"name": "dashboard", "scopes": ["read"]}))).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let read_key = b["key"].as_str().unwrap().to_string();
    let read_id = b["id"].as_str().unwrap().to_string();
    let (s, b) = hub.call(Method::POST, "/api/v1/api-keys", Some(json!({"name": "x", "scopes": ["root"]}))).await;
    assert_eq!((s, b["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("scopes[0]")), "{b}");

    let get = |key: &str| hub.http.get(format!("{}/api/v1/products", hub.base)).bearer_auth(key.to_string()).send();
    assert_eq!(get(&read_key).await.unwrap().status(), StatusCode::OK);
    let lowercase =
        hub.http.get(format!("{}/api/v1/products", hub.base)).header("authorization", format!("bearer {read_key}"));
    assert_eq!(lowercase.send().await.unwrap().status(), StatusCode::OK, "auth scheme is case-insensitive");
    let write = hub
        .http
        .post(format!("{}/api/v1/products", hub.base))
        .bearer_auth(&read_key)
        .json(&json!({"id": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(write.status(), StatusCode::FORBIDDEN);

    // Listing never shows key material.
    let (_, b) = hub.call(Method::GET, "/api/v1/api-keys", None).await;
    assert!(!b.to_string().contains(&read_key[20..]));

    let (s, _) = hub.call(Method::DELETE, &format!("/api/v1/api-keys/{read_id}"), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(get(&read_key).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics() {
    let hub = TestHub::start(Db::Sqlite).await;
    let r = hub.http.get(format!("{}/healthz", hub.base)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = hub.http.get(format!("{}/readyz", hub.base)).send().await.unwrap();
    let status = r.status();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    let names: Vec<&str> = body["checks"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["database", "broker", "dedup", "events"]);
    hub.call(Method::GET, "/api/v1/products", None).await;
    let text = hub.http.get(format!("{}/metrics", hub.base)).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("iothub_http_requests_total"), "{text}");
    assert!(text.contains("route=\"/api/v1/products\""), "{text}");
    hub.stop().await;
}

/// The broker's management API being down makes the instance `degraded`, not unready: the broker's auth
/// hooks and the event webhooks still need it in the load balancer (commands wait in the log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_keeps_an_instance_whose_broker_api_is_down() {
    let dead = crate::helpers::free_port();
    let hub = TestHub::start_with(Db::Sqlite, move |c| {
        c.broker.kind = iothub::config::BrokerKind::Emqx5;
        c.broker.api_url = format!("http://127.0.0.1:{dead}");
        c.broker.api_key = "k".into();
        c.broker.api_secret = "s".into();
        c.broker.api_timeout_ms = 1_000;
        c.broker.hook_token = "t".repeat(32);
        c.auth.jwt_secret = "x".repeat(32);
    })
    .await;
    let body = hub.assert_degraded_by("broker").await;
    // Which dependency failed, never why: the public side of a load balancer learns no hosts or errors.
    let text = body.to_string();
    assert!(!text.contains("error") && !text.contains("127.0.0.1") && !text.contains(&dead.to_string()), "{text}");
    // The hooks still answer: a device of this hub is authenticated while the API is down.
    hub.create_product("p").await;
    let secret = hub.register("p", "d").await;
    let r = hub
        .http
        .post(format!("{}/broker/emqx5/authn", hub.base))
        .bearer_auth("t".repeat(32))
        .json(&serde_json::json!({"clientid": "p/d", "username": "p/d", "password": secret}))
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["result"], "allow", "{body}");
    hub.stop().await;
}

/// PostgreSQL dropping the hub's connections (a restart, a failover, an idle-connection reaper) costs no
/// request an error: a connection that sat idle is checked before it is handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_database_connections_cost_no_request() {
    use sqlx::Connection;
    let hub = TestHub::start(Db::Postgres).await;
    hub.create_product("p").await;
    // Several connections in the pool.
    let h = &hub;
    let warm = futures::future::join_all((0..8).map(|n| async move { h.register("p", &format!("d{n}")).await })).await;
    assert_eq!(warm.len(), 8);
    let mut admin = sqlx::PgConnection::connect(&hub.config.database.url).await.unwrap();
    let killed: Vec<(bool,)> = sqlx::query_as(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert!(killed.len() >= 2, "the hub held connections: {killed:?}");
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    let answers = futures::future::join_all((0..16).map(|n| {
        let path = if n % 2 == 0 {
            "/api/v1/products/p/devices".to_string()
        } else {
            format!("/api/v1/products/p/devices/d{}", n % 8)
        };
        async move { h.call(Method::GET, &path, None).await }
    }))
    .await;
    for (status, body) in &answers {
        assert_eq!(*status, StatusCode::OK, "{body}");
    }
    hub.stop().await;
}
