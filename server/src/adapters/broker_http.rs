//! Broker management over HTTP: EMQX 5 (`/api/v5`), EMQX 4 (`/api/v4`) and RMQTT's http-api (`/api/v1`).
//!
//! The three differ in paths, auth and envelopes; this adapter hides that behind [`BrokerApi`]. Client ids
//! are percent-encoded as one path segment because iothub's client ids usually contain `/`.

use std::time::Duration;

use async_trait::async_trait;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::{RequestBuilder, StatusCode};
use serde_json::Value;

use crate::config::BrokerKind;
use crate::error::{Error, Result};
use crate::ports::broker::BrokerApi;

/// Everything but unreserved characters is encoded, so `/` can never split the path.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

pub fn encode_segment(raw: &str) -> String {
    utf8_percent_encode(raw, SEGMENT).to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavour {
    Emqx5,
    Emqx4,
    Rmqtt,
}

pub struct HttpBroker {
    http: reqwest::Client,
    base: String,
    flavour: Flavour,
    key: String,
    secret: String,
}

impl HttpBroker {
    pub fn new(
        kind: BrokerKind,
        api_url: &str,
        prefix: &str,
        key: &str,
        secret: &str,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let flavour = match kind {
            BrokerKind::Emqx5 => Flavour::Emqx5,
            BrokerKind::Emqx4 => Flavour::Emqx4,
            BrokerKind::Rmqtt | BrokerKind::Embedded => Flavour::Rmqtt,
        };
        let http = reqwest::Client::builder().timeout(timeout).build()?;
        Ok(Self {
            http,
            base: format!("{}{}", api_url.trim_end_matches('/'), prefix),
            flavour,
            key: key.to_string(),
            secret: secret.to_string(),
        })
    }

    fn authed(&self, rb: RequestBuilder) -> RequestBuilder {
        match (self.flavour, self.key.is_empty()) {
            (_, true) => rb,
            (Flavour::Rmqtt, false) => rb.bearer_auth(&self.key),
            (_, false) => rb.basic_auth(&self.key, Some(&self.secret)),
        }
    }

    async fn send(&self, rb: RequestBuilder, what: &str) -> Result<reqwest::Response> {
        self.authed(rb).send().await.map_err(|e| Error::Unavailable(format!("broker API {what}: {e}")))
    }
}

fn unexpected(what: &str, status: StatusCode, body: &str) -> Error {
    Error::Unavailable(format!(
        "broker API {what}: unexpected {status}: {}",
        body.chars().take(200).collect::<String>()
    ))
}

fn client_ids(items: &[Value]) -> Vec<String> {
    items.iter().filter_map(|c| c.get("clientid").and_then(Value::as_str)).map(str::to_string).collect()
}

#[async_trait]
impl BrokerApi for HttpBroker {
    fn kind(&self) -> &'static str {
        match self.flavour {
            Flavour::Emqx5 => "emqx5",
            Flavour::Emqx4 => "emqx4",
            Flavour::Rmqtt => "rmqtt",
        }
    }

    #[tracing::instrument(skip(self), name = "broker.ping")]
    async fn ping(&self) -> Result<()> {
        let path = match self.flavour {
            Flavour::Emqx5 => "/status",
            Flavour::Emqx4 => "/brokers",
            Flavour::Rmqtt => "/health/check",
        };
        let resp = self.send(self.http.get(format!("{}{path}", self.base)), "ping").await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            let status = resp.status();
            Err(unexpected("ping", status, &resp.text().await.unwrap_or_default()))
        }
    }

    #[tracing::instrument(skip(self), name = "broker.clients_of")]
    async fn clients_of(&self, username: &str) -> Result<Vec<String>> {
        let rb = match self.flavour {
            Flavour::Emqx5 => self.http.get(format!("{}/clients", self.base)).query(&[
                ("username", username),
                ("conn_state", "connected"),
                ("limit", "1000"),
            ]),
            Flavour::Emqx4 => self.http.get(format!("{}/clients/username/{}", self.base, encode_segment(username))),
            Flavour::Rmqtt => self.http.get(format!("{}/clients", self.base)).query(&[
                ("username", username),
                ("connected", "true"),
                ("_limit", "1000"),
            ]),
        };
        let resp = self.send(rb, "list clients").await?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(unexpected("list clients", status, &body));
        }
        let json: Value = serde_json::from_str(&body).map_err(|_| unexpected("list clients", status, &body))?;
        let ids = match (&json, self.flavour) {
            (Value::Array(items), Flavour::Rmqtt) => client_ids(items),
            (Value::Object(o), Flavour::Emqx5 | Flavour::Emqx4) => match o.get("data") {
                Some(Value::Array(items)) => client_ids(items),
                _ => return Err(unexpected("list clients", status, &body)),
            },
            _ => return Err(unexpected("list clients", status, &body)),
        };
        Ok(ids)
    }

    #[tracing::instrument(skip(self), name = "broker.kick")]
    async fn kick(&self, client_id: &str) -> Result<bool> {
        let url = format!("{}/clients/{}", self.base, encode_segment(client_id));
        let resp = self.send(self.http.delete(url), "kick").await?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        match (self.flavour, status) {
            (_, StatusCode::NOT_FOUND) => Ok(false),
            (Flavour::Emqx4, s) if s.is_success() => {
                // EMQX 4 always answers 200; the envelope's code says what happened (112 = not found).
                let code =
                    serde_json::from_str::<Value>(&body).ok().and_then(|v| v.get("code").and_then(Value::as_i64));
                match code {
                    Some(0) => Ok(true),
                    Some(112) => Ok(false),
                    _ => Err(unexpected("kick", status, &body)),
                }
            }
            (_, s) if s.is_success() => Ok(true),
            _ => Err(unexpected("kick", status, &body)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_are_one_segment() {
        assert_eq!(encode_segment("p1/d1"), "p1%2Fd1");
        assert_eq!(encode_segment("a b#?%"), "a%20b%23%3F%25");
        assert_eq!(encode_segment("ok-_.~"), "ok-_.~");
    }
}
