//! The broker-facing hook endpoints, driven with the request shapes each broker sends
//! (EMQX 5 JSON, EMQX 4 form params, RMQTT JSON) as documented in shared/reference/emqx-contracts.md.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{Db, TestHub};

async fn post_json(hub: &TestHub, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
    let r = hub.http.post(format!("{}{path}", hub.base)).bearer_auth(token).json(&body).send().await.unwrap();
    let s = r.status();
    (s, r.json().await.unwrap_or(Value::Null))
}

async fn post_form(hub: &TestHub, path: &str, token: &str, form: &[(&str, &str)]) -> StatusCode {
    hub.http.post(format!("{}{path}", hub.base)).bearer_auth(token).form(form).send().await.unwrap().status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_contracts() {
    let hub = TestHub::start(Db::Sqlite).await;
    hub.create_product("p1").await;
    let secret = hub.register("p1", "d1").await;
    let token = hub.state.hook_token.clone();

    // Without the hook token nothing is decided.
    for path in ["/broker/emqx5/authn", "/broker/emqx5/authz", "/broker/emqx4/auth", "/broker/rmqtt/auth"] {
        let r = hub.http.post(format!("{}{path}", hub.base)).json(&json!({})).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path}");
        let r =
            hub.http.post(format!("{}{path}", hub.base)).bearer_auth("wrong").json(&json!({})).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path}");
    }

    // RMQTT's web-hook can only send the token as URL userinfo, i.e. HTTP Basic with the token as password.
    use base64::Engine as _;
    let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("rmqtt:{token}")));
    let r = hub
        .http
        .post(format!("{}/broker/rmqtt/auth", hub.base))
        .header("authorization", basic)
        .json(&json!({"clientid": "p1/d1", "username": "p1/d1", "password": secret}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["result"], "allow");
    // The scheme is case-insensitive, as for API keys.
    let r = hub
        .http
        .post(format!("{}/broker/emqx5/authn", hub.base))
        .header("authorization", format!("bearer {token}"))
        .json(&json!({"clientid": "p1/d1", "username": "p1/d1", "password": secret}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["result"], "allow");
    // No GET hooks: credentials would travel in URIs (and land in request logs).
    let r = hub
        .http
        .get(format!("{}/broker/emqx4/auth?username=p1/d1", hub.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);

    // A token's ACL reaches the broker only as publish grants before the first deny; the rest stays here.
    let (_, b) = hub
        .call(
            reqwest::Method::POST,
            "/api/v1/tokens",
            Some(json!({"username": "svc.ops", "acl": [
                {"permission": "allow", "action": "all", "topic": "ops/#"},
                {"permission": "allow", "action": "subscribe", "topic": "upload_data/#"},
                {"permission": "deny", "action": "publish", "topic": "ops/secret"},
                {"permission": "allow", "action": "publish", "topic": "late/#"}
            ]})),
        )
        .await;
    let jwt = b["token"].as_str().unwrap().to_string();
    let (_, b) = post_json(
        &hub,
        "/broker/emqx5/authn",
        &token,
        json!({"clientid": "o1", "username": "svc.ops", "password": jwt}),
    )
    .await;
    assert_eq!(b["result"], "allow");
    assert_eq!(b["acl"], json!([{"permission": "allow", "action": "publish", "topic": "ops/#"}]), "{b}");
    let sys = json!({"clientid": "o1", "username": "svc.ops", "topic": "$SYS/#", "action": "subscribe"});
    let (_, b) = post_json(&hub, "/broker/emqx5/authz", &token, sys).await;
    assert_eq!(b["result"], "deny", "a granted `ops/#` or wildcard never reaches $SYS");

    // EMQX 5 authn (body template from emqx-config/emqx-http.hocon).
    let authn = |password: &str| json!({"clientid": "p1/d1", "username": "p1/d1", "password": password, "peerhost": "127.0.0.1"});
    let (s, b) = post_json(&hub, "/broker/emqx5/authn", &token, authn(&secret)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["result"], "allow");
    assert_eq!(b["is_superuser"], false);
    let acl = b["acl"].as_array().unwrap();
    assert!(acl.iter().any(|r| r["topic"] == "upload_data/p1/d1/+/+" && r["action"] == "publish"), "{b}");
    assert!(acl.iter().all(|r| r["permission"] == "allow"));
    let (_, b) = post_json(&hub, "/broker/emqx5/authn", &token, authn("wrong")).await;
    assert_eq!(b["result"], "deny");
    // Non-device usernames without a valid token are left to EMQX's next authenticator (its JWT one).
    let (_, b) =
        post_json(&hub, "/broker/emqx5/authn", &token, json!({"clientid": "c", "username": "svc", "password": "x"}))
            .await;
    assert_eq!(b["result"], "ignore");

    // EMQX 5 authz.
    let authz = |topic: &str, action: &str| json!({"clientid": "p1/d1", "username": "p1/d1", "topic": topic, "action": action, "qos": "1", "retain": "false"});
    for (topic, action, expect) in [
        ("upload_data/p1/d1/t/m1", "publish", "allow"),
        ("upload_data/p1/d2/t/m1", "publish", "deny"),
        ("cmd/p1/d1/+/+/+/#", "subscribe", "allow"),
        ("cmd/p1/+/+/+/+/#", "subscribe", "deny"),
        ("upload_data/p1/d1/t/m1", "delete", "deny"),
    ] {
        let (s, b) = post_json(&hub, "/broker/emqx5/authz", &token, authz(topic, action)).await;
        assert_eq!((s, b["result"].as_str()), (StatusCode::OK, Some(expect)), "{topic} {action}");
    }

    // EMQX 4: form params, status-code semantics, access 1 = subscribe, 2 = publish.
    let ok = [("clientid", "p1/d1"), ("username", "p1/d1"), ("password", secret.as_str())];
    assert_eq!(post_form(&hub, "/broker/emqx4/auth", &token, &ok).await, StatusCode::OK);
    let bad = [("clientid", "p1/d1"), ("username", "p1/d1"), ("password", "nope")];
    assert_eq!(post_form(&hub, "/broker/emqx4/auth", &token, &bad).await, StatusCode::UNAUTHORIZED);
    let acl = |access: &'static str, topic: &'static str| {
        [("access", access), ("username", "p1/d1"), ("clientid", "p1/d1"), ("ipaddr", "127.0.0.1"), ("topic", topic)]
    };
    assert_eq!(post_form(&hub, "/broker/emqx4/acl", &token, &acl("2", "update_status/p1/d1/m1")).await, StatusCode::OK);
    assert_eq!(
        post_form(&hub, "/broker/emqx4/acl", &token, &acl("1", "update_status/p1/d1/m1")).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        post_form(&hub, "/broker/emqx4/acl", &token, &acl("3", "update_status/p1/d1/m1")).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(post_form(&hub, "/broker/emqx4/superuser", &token, &ok).await, StatusCode::FORBIDDEN);

    // RMQTT: denials must be 2xx bodies (a non-2xx would mean "ignore" there).
    let (s, b) = post_json(
        &hub,
        "/broker/rmqtt/auth",
        &token,
        json!({"clientid": "p1/d1", "username": "p1/d1", "password": "nope"}),
    )
    .await;
    assert_eq!((s, b["result"].as_str()), (StatusCode::OK, Some("deny")));
    let (s, b) = post_json(
        &hub,
        "/broker/rmqtt/acl",
        &token,
        json!({"access": "2", "clientid": "p1/d1", "username": "p1/d1", "topic": "get/p1/d1/$ntp/m1"}),
    )
    .await;
    assert_eq!((s, b["result"].as_str()), (StatusCode::OK, Some("allow")));
    hub.stop().await;
}
