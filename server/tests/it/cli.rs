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

/// The compose file's PostgreSQL gives iothub a plain role that owns its database, not a superuser
/// (deploy/postgres/init-iothub-role.sh). That script, run against the suite's PostgreSQL as the image runs
/// it, creates a role with which `iothub migrate` applies every migration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_run_as_the_compose_files_plain_database_role() {
    use sqlx::{Connection, Executor, Row};
    let admin_url = crate::helpers::admin_database_url();
    let url = url::Url::parse(&admin_url).unwrap();
    let (host, port) = (url.host_str().unwrap().to_string(), url.port().unwrap_or(5432).to_string());
    let mut admin = sqlx::PgConnection::connect(&admin_url).await.unwrap();
    // The script creates the names the compose file uses; a run cut short earlier may have left them.
    admin.execute("DROP DATABASE IF EXISTS iothub WITH (FORCE)").await.unwrap();
    admin.execute("DROP ROLE IF EXISTS iothub").await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let password = uuid::Uuid::new_v4().simple().to_string();
    let password_file = dir.path().join("iothub_db_password");
    std::fs::write(&password_file, format!("{password}\n")).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/postgres/init-iothub-role.sh");
    let out = Command::new("bash")
        .arg(script)
        .env("PGHOST", &host)
        .env("PGPORT", &port)
        .env("IOTHUB_DB_PASSWORD_FILE", &password_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "init-iothub-role.sh: {}", String::from_utf8_lossy(&out.stderr));

    let role = sqlx::query("SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = 'iothub'")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    let flags: (bool, bool, bool) = (role.get(0), role.get(1), role.get(2));
    assert_eq!(flags, (false, false, false), "iothub's role has no superuser, CREATEDB or CREATEROLE");
    let database_url = format!("postgres://iothub:{password}@{host}:{port}/iothub");
    iothub(&[("IOTHUB_DATABASE__URL", &database_url)], &["migrate"]);
    let mut as_iothub = sqlx::PgConnection::connect(&database_url).await.unwrap();
    let views: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.views WHERE table_name IN ('mqtt_user', 'mqtt_acl')",
    )
    .fetch_one(&mut as_iothub)
    .await
    .unwrap();
    assert_eq!(views, 2);
    drop(as_iothub);
    admin.execute("DROP DATABASE iothub WITH (FORCE)").await.unwrap();
    admin.execute("DROP ROLE iothub").await.unwrap();
}
