//! The one integration-test binary: every test starts the real server against real dependencies.

mod helpers;

mod broker_auth;
mod broker_queue;
mod cli;
mod commands;
mod device_boundary;
mod emqx_postgres;
mod events;
mod guarantees;
mod hook_contracts;
mod ota;
mod presence;
mod registry_api;
mod retention;
mod scale_out;
mod sdk;
mod shadows;
mod tags;
mod webhook_fixtures;

/// Runs an async test body once per storage backend, as two named tests.
#[macro_export]
macro_rules! both_backends {
    ($name:ident, $body:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$body($crate::helpers::Db::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$body($crate::helpers::Db::Postgres).await
            }
        }
    };
}
