//! Adapters: concrete implementations of the ports, chosen by configuration in `startup`.
//!
//! - `sql`: every storage port on PostgreSQL (production) and SQLite (embedded), by aggregate (registry,
//!   telemetry, outbox, commands, tags, shadows, OTA, kicks, retention), each file holding both backends.
//! - `broker_http`: the [`BrokerApi`](crate::ports::broker::BrokerApi) over EMQX 5 or EMQX 4 / RMQTT REST.
//! - `embedded_broker`: RMQTT running inside this process, wired to this instance's hooks; `rmqtt_dollar`
//!   makes it route and report iothub's inner-`$` topics as MQTT (and EMQX) do.
//! - `redis_dedup` / `memory_dedup`: the [`Deduplicator`](crate::ports::dedup::Deduplicator).
//! - `rabbitmq` / `memory_bus`: the [`EventBus`](crate::ports::event_bus::EventBus).
//! - `redis_replies` / `memory_replies`: the [`ReplyHub`](crate::ports::replies::ReplyHub) RPC callers wait on.

pub mod broker_http;
pub mod broker_tls;
pub mod embedded_broker;
pub mod memory_bus;
pub mod memory_dedup;
pub mod memory_replies;
pub mod rabbitmq;
pub mod redis_dedup;
pub mod redis_replies;
pub mod rmqtt_dollar;
pub mod rmqtt_identity;
pub mod sql;
