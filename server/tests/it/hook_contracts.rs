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
        json!({"clientid": "svc.ops", "username": "svc.ops", "password": jwt}),
    )
    .await;
    assert_eq!(b["result"], "allow");
    assert_eq!(b["acl"], json!([{"permission": "allow", "action": "publish", "topic": "ops/#"}]), "{b}");
    // RMQTT gets the whole grant (it decides in the broker) ending in a deny; its acl hook grants tokens nothing,
    // since an external RMQTT may present it a rewritten username.
    let (_, b) = post_json(
        &hub,
        "/broker/rmqtt/auth",
        &token,
        json!({"clientid": "svc.ops", "username": "svc.ops", "password": jwt}),
    )
    .await;
    let rules = b["acl"].as_array().unwrap();
    assert_eq!(rules.len(), 5, "{b}");
    assert_eq!(rules[2], json!({"permission": "deny", "action": "publish", "topic": "ops/secret"}));
    assert_eq!(rules[4], json!({"permission": "deny", "action": "all", "topic": "#"}));
    let (_, b) = post_json(
        &hub,
        "/broker/rmqtt/acl",
        &token,
        json!({"access": "1", "clientid": "svc.ops", "username": "svc.ops", "topic": "ops/x"}),
    )
    .await;
    assert_eq!(b["result"], "deny");
    let sys = json!({"clientid": "svc.ops", "username": "svc.ops", "topic": "$SYS/#", "action": "subscribe"});
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
    // Token identities whose token iothub cannot verify are left to EMQX's next authenticator (its JWT one);
    // malformed identities and client ids bound to someone else are refused outright.
    let (_, b) = post_json(
        &hub,
        "/broker/emqx5/authn",
        &token,
        json!({"clientid": "svc.x", "username": "svc.x", "password": "x"}),
    )
    .await;
    assert_eq!(b["result"], "ignore");
    for (clientid, username) in [("svc", "svc"), ("p1/d1", "svc.ops"), ("svc.ops/%A", "svc.ops")] {
        let (_, b) = post_json(
            &hub,
            "/broker/emqx5/authn",
            &token,
            json!({"clientid": clientid, "username": username, "password": jwt}),
        )
        .await;
        assert_eq!(b["result"], "deny", "{clientid} {username}");
    }

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

/// The identity rules (protocol/src/identity.rs) in every dialect's authn and authz: usernames or client ids
/// carrying placeholders a broker plugin would expand, and client ids bound to another identity, are refused
/// however the credential looks; the reference SDK's `{p}/{d}` and `{p}/{d}/{suffix}` are accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_rules_hold_in_every_dialect() {
    let hub = TestHub::start(Db::Sqlite).await;
    hub.create_product("p1").await;
    hub.create_product("p2").await;
    let secret = hub.register("p1", "d1").await;
    hub.register("p1", "d2").await;
    hub.register("p2", "d1").await;
    let token = hub.state.hook_token.clone();

    let mut cases: Vec<(String, String, bool)> =
        vec![("p1/d1".into(), "p1/d1".into(), true), ("p1/d1/backup-2".into(), "p1/d1".into(), true)];
    for foreign in ["p1/d2", "p2/d1", "p1/d1-b", "p1.d1", "x", "p1/d1/", "p1/d1/a/b"] {
        cases.push((foreign.into(), "p1/d1".into(), false));
    }
    for placeholder in ["%u", "%c", "%A", "%a", "%p", "%P", "%r", "%C", "%d", "%t", "${username}", "${clientid}"] {
        let username = format!("p1/d1{placeholder}");
        cases.push((username.clone(), username, false));
        cases.push((format!("p1/d1/{placeholder}"), "p1/d1".into(), false));
    }
    for (clientid, username, allowed) in &cases {
        let what = format!("clientid {clientid:?} username {username:?}");
        let creds = json!({"clientid": clientid, "username": username, "password": secret});
        let (_, b) = post_json(&hub, "/broker/emqx5/authn", &token, creds.clone()).await;
        assert_eq!(b["result"], if *allowed { "allow" } else { "deny" }, "EMQX 5 authn, {what}");
        let (_, b) = post_json(&hub, "/broker/rmqtt/auth", &token, creds).await;
        assert_eq!(b["result"], if *allowed { "allow" } else { "deny" }, "RMQTT authn, {what}");
        let form = [("clientid", clientid.as_str()), ("username", username.as_str()), ("password", secret.as_str())];
        let status = post_form(&hub, "/broker/emqx4/auth", &token, &form).await;
        assert_eq!(status, if *allowed { StatusCode::OK } else { StatusCode::UNAUTHORIZED }, "EMQX 4 auth, {what}");

        // Authz decides on its own too: a broker that rewrote the identity after CONNECT reaches nothing.
        let topic = "cmd/p1/d1/+/+/+/#";
        let (_, b) = post_json(
            &hub,
            "/broker/emqx5/authz",
            &token,
            json!({"clientid": clientid, "username": username, "topic": topic, "action": "subscribe"}),
        )
        .await;
        assert_eq!(b["result"], if *allowed { "allow" } else { "deny" }, "EMQX 5 authz, {what}");
        let acl = [("access", "1"), ("clientid", clientid.as_str()), ("username", username.as_str()), ("topic", topic)];
        let status = post_form(&hub, "/broker/emqx4/acl", &token, &acl).await;
        assert_eq!(status, if *allowed { StatusCode::OK } else { StatusCode::FORBIDDEN }, "EMQX 4 acl, {what}");
        // RMQTT asks its acl hook about a device only for internal `$` publishes (see below).
        let (_, b) = post_json(
            &hub,
            "/broker/rmqtt/acl",
            &token,
            json!({"access": "2", "clientid": clientid, "username": username, "topic": "get/p1/d1/$ntp/m1"}),
        )
        .await;
        assert_eq!(b["result"], if *allowed { "allow" } else { "deny" }, "RMQTT acl, {what}");
    }

    // RMQTT: a device's subscriptions and plain publishes are decided in the broker from its authn answer
    // (ending in a deny of every other subscription), so the acl hook, whose request placeholders an external
    // RMQTT fills one after another, only grants a device internal `$` publishes of its own.
    let (_, b) = post_json(
        &hub,
        "/broker/rmqtt/auth",
        &token,
        json!({"clientid": "p1/d1", "username": "p1/d1", "password": secret}),
    )
    .await;
    let rules = b["acl"].as_array().unwrap();
    assert_eq!(rules.last().unwrap(), &json!({"permission": "deny", "action": "subscribe", "topic": "#"}), "{b}");
    assert!(rules.contains(&json!({"permission": "allow", "action": "subscribe", "topic": "eq cmd/p1/d1/+/+/+/#"})));
    assert!(rules.iter().all(|r| !r["topic"].as_str().unwrap().contains('%')));
    for (access, topic, expect) in [
        ("1", "cmd/p1/d1/+/+/+/#", "deny"),
        ("1", "$share/g/cmd/p1/d1/+/+/+/#", "deny"),
        ("2", "upload_data/p1/d1/t/m1", "deny"),
        ("2", "upload_data/p1/d1/$shadow_reported/m1", "allow"),
        ("2", "get/p1/d2/$ntp/m1", "deny"),
    ] {
        let (_, b) = post_json(
            &hub,
            "/broker/rmqtt/acl",
            &token,
            json!({"access": access, "clientid": "p1/d1", "username": "p1/d1", "topic": topic}),
        )
        .await;
        assert_eq!(b["result"], expect, "RMQTT acl hook, device p1/d1, {access} {topic}");
    }

    // Shared subscriptions: EMQX 5 authorizes the real filter (it strips `$share/{group}/` before asking);
    // iothub strips it too when a broker sends it whole, so both decide the same.
    for (real, expect) in [
        ("tags/p1/t1/cmd/+/+/+/#", "allow"),
        ("m2m/p1/d1/+/+", "allow"),
        ("cmd/p1/d2/+/+/+/#", "deny"),
        ("tags/p2/t1/cmd/+/+/+/#", "deny"),
        ("#", "deny"),
    ] {
        let (_, emqx) = post_json(
            &hub,
            "/broker/emqx5/authz",
            &token,
            json!({"clientid": "p1/d1", "username": "p1/d1", "topic": real, "action": "subscribe"}),
        )
        .await;
        assert_eq!(emqx["result"], expect, "EMQX 5 on the real filter {real}");
        for shared in [format!("$share/g1/{real}"), format!("$queue/{real}")] {
            let (_, whole) = post_json(
                &hub,
                "/broker/emqx5/authz",
                &token,
                json!({"clientid": "p1/d1", "username": "p1/d1", "topic": shared, "action": "subscribe"}),
            )
            .await;
            assert_eq!(whole["result"], expect, "the whole {shared} decides like EMQX's real filter");
        }
    }
    hub.stop().await;
}
