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
use crate::model::broker::{OutboundMessage, Published};
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
        let rb = self.authed(rb);
        let retry = rb.try_clone();
        match rb.send().await {
            Ok(resp) => Ok(resp),
            // A pooled keep-alive connection the broker closed while idle fails the next request before
            // the broker read it; one retry on a fresh connection is what makes that race invisible. A
            // timeout is not retried (the broker may have acted on the request).
            Err(e) if !e.is_timeout() && retry.is_some() => {
                metrics::counter!("iothub_broker_api_retries_total").increment(1);
                tracing::debug!(error = %e, what, "broker API request failed on a reused connection; retrying once");
                retry.expect("checked").send().await.map_err(|e| Error::Unavailable(format!("broker API {what}: {e}")))
            }
            Err(e) => Err(Error::Unavailable(format!("broker API {what}: {e}"))),
        }
    }
}

fn unexpected(what: &str, status: StatusCode, body: &str) -> Error {
    Error::Unavailable(format!(
        "broker API {what}: unexpected {status}: {}",
        body.chars().take(200).collect::<String>()
    ))
}

/// The body each flavour's publish endpoint takes. Payloads always travel base64 so binary survives.
fn publish_body(flavour: Flavour, m: &OutboundMessage) -> Value {
    use base64::Engine as _;
    let payload = base64::engine::general_purpose::STANDARD.encode(&m.payload);
    let expiry = m.expiry_secs.map(|secs| secs.max(1));
    match flavour {
        Flavour::Emqx5 => serde_json::json!({
            "topic": m.topic, "payload": payload, "payload_encoding": "base64", "qos": m.qos, "retain": false,
            "properties": match expiry {
                Some(secs) => serde_json::json!({ "message_expiry_interval": secs }),
                None => serde_json::json!({}),
            },
        }),
        // EMQX 4 and RMQTT take the v4 shape; `clientid` only names the publisher in the broker's logs.
        Flavour::Emqx4 | Flavour::Rmqtt => {
            let mut body = serde_json::json!({
                "topic": m.topic, "payload": payload, "encoding": "base64", "qos": m.qos, "retain": false,
                "clientid": "iothub",
            });
            if let Some(secs) = expiry {
                // RMQTT deserialises the whole MQTT 5 property set: every member must be present.
                body["properties"] = serde_json::json!({
                    "message_expiry_interval": secs, "topic_alias": null, "correlation_data": null,
                    "content_type": null, "user_properties": [], "is_utf8_payload": false,
                    "response_topic": null, "subscription_ids": [],
                });
            }
            body
        }
    }
}

/// Reads a publish answer. EMQX 5 speaks in statuses and MQTT reason codes; EMQX 4 always answers 200
/// with a `code` envelope; RMQTT answers 200 `ok`.
fn publish_outcome(flavour: Flavour, status: StatusCode, body: &str) -> Result<Published> {
    let json = serde_json::from_str::<Value>(body).ok();
    let reason = || json.as_ref().and_then(|v| v.get("reason_code")).and_then(Value::as_i64);
    let refused = |what: &str| {
        Error::validation(
            "topic",
            format!("broker refused the publish ({what}): {}", body.chars().take(200).collect::<String>()),
        )
    };
    match flavour {
        Flavour::Emqx5 => match status.as_u16() {
            200 => Ok(Published::Delivered),
            202 if reason() == Some(16) => Ok(Published::NoSubscribers),
            // Other 202s (e.g. a `$delayed/` topic) were stored by the broker for later delivery.
            202 => Ok(Published::Accepted),
            400 => Err(refused(&format!("reason code {}", reason().unwrap_or_default()))),
            _ => Err(unexpected("publish", status, body)),
        },
        Flavour::Emqx4 => {
            match (status.is_success(), json.as_ref().and_then(|v| v.get("code")).and_then(Value::as_i64)) {
                (true, Some(0)) => Ok(Published::Accepted),
                (true, Some(115)) => Err(refused("bad topic")),
                _ => Err(unexpected("publish", status, body)),
            }
        }
        Flavour::Rmqtt => match status.as_u16() {
            200..=299 => Ok(Published::Accepted),
            400 => Err(refused("bad request")),
            _ => Err(unexpected("publish", status, body)),
        },
    }
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

    /// EMQX 5: `GET /subscriptions?clientid=` (`{"data": [{"topic"}]}`); EMQX 4: `GET /subscriptions/{clientid}`
    /// (`{"code": 0, "data": [...]}`); RMQTT: `GET /subscriptions/{clientid}` (a bare array, 404 when the
    /// client is not connected).
    #[tracing::instrument(skip(self), name = "broker.subscriptions_of")]
    async fn subscriptions_of(&self, client_id: &str) -> Result<Vec<String>> {
        let rb = match self.flavour {
            Flavour::Emqx5 => self
                .http
                .get(format!("{}/subscriptions", self.base))
                .query(&[("clientid", client_id), ("limit", "1000")]),
            Flavour::Emqx4 | Flavour::Rmqtt => {
                self.http.get(format!("{}/subscriptions/{}", self.base, encode_segment(client_id)))
            }
        };
        let resp = self.send(rb, "list subscriptions").await?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        if status == StatusCode::NOT_FOUND {
            return Ok(Vec::new());
        }
        if !status.is_success() {
            return Err(unexpected("list subscriptions", status, &body));
        }
        let json: Value = serde_json::from_str(&body).map_err(|_| unexpected("list subscriptions", status, &body))?;
        let items = match &json {
            Value::Array(items) => items,
            Value::Object(o) => match o.get("data") {
                Some(Value::Array(items)) => items,
                _ => return Err(unexpected("list subscriptions", status, &body)),
            },
            _ => return Err(unexpected("list subscriptions", status, &body)),
        };
        Ok(items.iter().filter_map(|s| s.get("topic").and_then(Value::as_str)).map(str::to_string).collect())
    }

    #[tracing::instrument(skip_all, fields(topic = %message.topic, qos = message.qos), name = "broker.publish")]
    async fn publish(&self, message: &OutboundMessage) -> Result<Published> {
        let url = format!("{}/{}", self.base, if self.flavour == Flavour::Emqx5 { "publish" } else { "mqtt/publish" });
        let resp = self.send(self.http.post(url).json(&publish_body(self.flavour, message)), "publish").await?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        let outcome = publish_outcome(self.flavour, status, &body);
        let label = match &outcome {
            Ok(Published::Delivered) => "delivered",
            Ok(Published::NoSubscribers) => "no_subscribers",
            Ok(Published::Accepted) => "accepted",
            Err(Error::Validation { .. }) => "refused",
            Err(_) => "failed",
        };
        metrics::counter!("iothub_broker_publish_total", "outcome" => label).increment(1);
        outcome
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

    /// Answers exactly as `shared/reference/emqx-contracts.md` records them (EMQX v5.8.9 / v4.4.19).
    #[test]
    fn publish_answers_of_each_broker_are_understood() {
        let ok = |f, s: u16, b: &str| publish_outcome(f, StatusCode::from_u16(s).unwrap(), b);
        assert_eq!(
            ok(Flavour::Emqx5, 200, r#"{"id":"0006171D5A7B8D5C0B8A000011D10001"}"#).unwrap(),
            Published::Delivered
        );
        assert_eq!(
            ok(Flavour::Emqx5, 202, r#"{"reason_code":16,"message":"no_matching_subscribers"}"#).unwrap(),
            Published::NoSubscribers
        );
        let bad = ok(Flavour::Emqx5, 400, r#"{"reason_code":144,"message":"topic_name_invalid"}"#).unwrap_err();
        assert!(matches!(&bad, Error::Validation { field, message } if field == "topic" && message.contains("144")));
        let big = ok(Flavour::Emqx5, 400, r#"{"reason_code":151,"message":"packet_too_large"}"#).unwrap_err();
        assert!(matches!(big, Error::Validation { .. }));
        let busy = ok(Flavour::Emqx5, 503, r#"{"reason_code":131,"message":"failed_to_dispatch"}"#).unwrap_err();
        assert!(matches!(busy, Error::Unavailable(_)));
        let auth = ok(Flavour::Emqx5, 401, r#"{"code":"BAD_API_KEY_OR_SECRET","message":"Check api_key/api_secret"}"#);
        assert!(matches!(auth, Err(Error::Unavailable(_))));

        assert_eq!(
            ok(Flavour::Emqx4, 200, r#"{"code":0,"data":{"msgid":"5B6F2E1D0C9A"}}"#).unwrap(),
            Published::Accepted
        );
        assert_eq!(ok(Flavour::Emqx4, 200, r#"{"code":0}"#).unwrap(), Published::Accepted);
        assert!(matches!(
            ok(Flavour::Emqx4, 200, r#"{"code":115,"message":"bad_topic"}"#),
            Err(Error::Validation { .. })
        ));
        // An envelope we do not know is not success, whatever the status says.
        assert!(matches!(ok(Flavour::Emqx4, 200, r#"{"code":102}"#), Err(Error::Unavailable(_))));
        assert!(matches!(ok(Flavour::Emqx4, 200, "<html>"), Err(Error::Unavailable(_))));

        assert_eq!(ok(Flavour::Rmqtt, 200, "ok").unwrap(), Published::Accepted);
        assert!(matches!(ok(Flavour::Rmqtt, 503, ""), Err(Error::Unavailable(_))));
    }

    #[test]
    fn publish_bodies_carry_binary_as_base64() {
        let m = OutboundMessage {
            topic: "cmd/p/d/x/plain/r1".into(),
            payload: vec![0, 255],
            qos: 1,
            expiry_secs: Some(30),
        };
        let v5 = publish_body(Flavour::Emqx5, &m);
        assert_eq!(v5["payload"], "AP8=");
        assert_eq!(v5["payload_encoding"], "base64");
        assert_eq!(v5["properties"]["message_expiry_interval"], 30);
        let v4 = publish_body(Flavour::Emqx4, &m);
        assert_eq!(v4["encoding"], "base64");
        assert_eq!(v4["qos"], 1);
        assert!(v4.get("payload_encoding").is_none());
    }
}
