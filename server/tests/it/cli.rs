//! The `iothub` binary's admin subcommands, run as a user would run them.

use std::process::Command;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{eventually, Db, TestDatabase, TestHub};

fn iothub(envs: &[(&str, &str)], args: &[&str]) -> String {
    let out =
        Command::new(env!("CARGO_BIN_EXE_iothub")).args(args).envs(envs.iter().copied()).output().expect("run iothub");
    assert!(out.status.success(), "iothub {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8 output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_from_the_cli_work_against_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite://{}", dir.path().join("cli.db").display());
    let data_dir = dir.path().display().to_string();
    let env = [("IOTHUB_DATABASE__URL", db_url.as_str()), ("IOTHUB_DATA_DIR", data_dir.as_str())];
    let out = iothub(&env, &["api-key", "create", "--name", "ci", "--scopes", "write"]);
    let key = out.lines().find_map(|l| l.strip_prefix("key:")).expect("key line").trim().to_string();
    let id = out.lines().find_map(|l| l.strip_prefix("id:")).expect("id line").trim().to_string();
    assert!(iothub(&env, &["api-key", "list"]).contains(&id));

    let url = db_url.clone();
    let hub = TestHub::start_with(Db::Sqlite, move |c| {
        c.database.url = url;
        c.auth.bootstrap_admin_key = false;
    })
    .await;
    let create = |key: String| {
        hub.http.post(format!("{}/api/v1/products", hub.base)).bearer_auth(key).json(&json!({"id": "cli"})).send()
    };
    assert_eq!(create(key.clone()).await.unwrap().status(), StatusCode::CREATED);
    iothub(&env, &["api-key", "revoke", &id]);
    // Revoked by another process: the server's key cache (`cache.api_key_ttl_ms`, 1 s) lets it go within it.
    eventually(Duration::from_secs(5), "revoked key refused", || async {
        (create(key.clone()).await.unwrap().status() == StatusCode::UNAUTHORIZED).then_some(())
    })
    .await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_and_openapi_subcommands() {
    let db = TestDatabase::create().await;
    let out = iothub(&[("IOTHUB_DATABASE__URL", db.url.as_str())], &["migrate"]);
    assert!(out.contains("migrations applied"), "{out}");
    let spec = iothub(&[], &["openapi"]);
    assert_eq!(
        spec,
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../api-spec/openapi.yaml")).unwrap()
    );
}
