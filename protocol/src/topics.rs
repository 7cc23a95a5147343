//! The MQTT topic grammar iothub speaks with devices, in one place.
//!
//! Devices built for the reference IotHub must keep working, so the topic shapes here are wire-compatible
//! with it (see `shared/reference/iothub-reference.md`). This module owns:
//! - the per-device ACL, as a short list of rule templates with `%p` (product) and `%d` (device)
//!   placeholders, so authorising a million devices costs no rows and no allocations;
//! - MQTT filter matching used by the authorisation decisions (publish: topic name against filter;
//!   subscribe: the requested filter must be covered by a granted filter).
//!
//! The PostgreSQL migration seeds `acl_rule_templates` with exactly [`DEVICE_ACL`]; a test keeps them equal.

/// What a client asks to do on a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Publish,
    Subscribe,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Publish => "publish",
            Action::Subscribe => "subscribe",
        }
    }
}

/// One grant of the device ACL. `topic` is an MQTT filter whose levels may be `%p` or `%d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AclRule {
    pub action: Action,
    pub topic: &'static str,
}

const fn publish(topic: &'static str) -> AclRule {
    AclRule { action: Action::Publish, topic }
}
const fn subscribe(topic: &'static str) -> AclRule {
    AclRule { action: Action::Subscribe, topic }
}

/// Everything a device may do; anything else is denied.
pub const DEVICE_ACL: &[AclRule] = &[
    publish("upload_data/%p/%d/+/+"),
    publish("update_status/%p/%d/+"),
    publish("update_ota_status/%p/%d/+"),
    publish("cmd_resp/%p/%d/+/+/+"),
    publish("rpc_resp/%p/%d/+/+/+"),
    publish("get/%p/%d/+/+"),
    // m2m/{product}/{target}/{sender}/{msgId}: a device may only send as itself, within its product.
    publish("m2m/%p/+/%d/+"),
    subscribe("cmd/%p/%d/+/+/+/#"),
    subscribe("rpc/%p/%d/+/+/+/#"),
    subscribe("m2m/%p/%d/+/+"),
    subscribe("tags/%p/+/cmd/+/+/+/#"),
];

/// Substitutes `%p`/`%d` levels of a rule template without allocating.
fn template_levels<'a>(template: &'a str, product: &'a str, device: &'a str) -> impl Iterator<Item = &'a str> {
    template.split('/').map(move |level| match level {
        "%p" => product,
        "%d" => device,
        other => other,
    })
}

/// Expands a template for one device (used for EMQX `acl` responses and documentation).
pub fn expand_template(template: &str, product: &str, device: &str) -> String {
    template_levels(template, product, device).collect::<Vec<_>>().join("/")
}

fn is_valid_topic_name(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// A filter is valid when `#` only stands alone as the last level and `+` only alone in its level.
pub fn is_valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, level)| match *level {
        "#" => i == levels.len() - 1,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

/// Does the MQTT filter (given as levels) match the topic name? `$`-topics never match a leading wildcard.
fn filter_levels_match_topic<'a>(mut filter: impl Iterator<Item = &'a str>, topic: &str) -> bool {
    let mut topic_levels = topic.split('/');
    let mut first = true;
    loop {
        match (filter.next(), topic_levels.next()) {
            (Some("#"), _) => return !(first && topic.starts_with('$')),
            (Some("+"), Some(t)) => {
                if first && t.starts_with('$') {
                    return false;
                }
            }
            (Some(f), Some(t)) if f == t => {}
            (None, None) => return true,
            _ => return false,
        }
        first = false;
    }
}

/// Is every topic matched by `requested` also matched by `granted`? (Subscription authorisation.)
/// As in MQTT, a leading wildcard never reaches `$`-topics (`$SYS/...`).
fn filter_levels_cover<'a>(mut granted: impl Iterator<Item = &'a str>, requested: &str) -> bool {
    let mut requested_levels = requested.split('/');
    let mut first = true;
    loop {
        let (g, r) = (granted.next(), requested_levels.next());
        if first && matches!(g, Some("+" | "#")) && r.is_some_and(|r| r.starts_with('$')) {
            return false;
        }
        first = false;
        match (g, r) {
            (Some("#"), _) => return true,
            (Some("+"), Some(r)) if r != "#" => {}
            (Some(g), Some(r)) if g == r && g != "+" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The authorisation decision for a device, computed from [`DEVICE_ACL`] alone.
pub fn device_may(product: &str, device: &str, action: Action, topic: &str) -> bool {
    match action {
        Action::Publish => {
            is_valid_topic_name(topic)
                && DEVICE_ACL
                    .iter()
                    .filter(|r| r.action == action)
                    .any(|r| filter_levels_match_topic(template_levels(r.topic, product, device), topic))
        }
        Action::Subscribe => {
            is_valid_filter(topic)
                && !topic.starts_with("$share/")
                && !topic.starts_with("$queue/")
                && DEVICE_ACL
                    .iter()
                    .filter(|r| r.action == action)
                    .any(|r| filter_levels_cover(template_levels(r.topic, product, device), topic))
        }
    }
}

/// The real filter of a shared subscription (`$share/{group}/{filter}` or `$queue/{filter}`), which is what
/// EMQX authorizes (it strips the prefix before asking); `None` for anything else, including a malformed
/// share with an empty or wildcard group.
pub fn shared_subscription_filter(topic: &str) -> Option<&str> {
    if let Some(rest) = topic.strip_prefix("$share/") {
        let (group, filter) = rest.split_once('/')?;
        return (!group.is_empty() && !group.contains(['+', '#']) && !filter.is_empty()).then_some(filter);
    }
    topic.strip_prefix("$queue/").filter(|f| !f.is_empty())
}

/// Matches a literal MQTT filter (no placeholders) against a topic (publish) or filter (subscribe).
pub fn filter_permits(filter: &str, action: Action, topic: &str) -> bool {
    match action {
        Action::Publish => is_valid_topic_name(topic) && filter_levels_match_topic(filter.split('/'), topic),
        Action::Subscribe => is_valid_filter(topic) && filter_levels_cover(filter.split('/'), topic),
    }
}

/// A topic a device publishes to iothub, parsed strictly: exact level count, ids by the id alphabet,
/// names and message ids by [`is_name`] / [`is_message_id`]. Anything else is not ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream<'a> {
    /// `upload_data/{p}/{d}/{dataType}/{messageId}`; data types starting with `$` are internal.
    UploadData { product: &'a str, device: &'a str, data_type: &'a str, message_id: &'a str },
    /// `update_status/{p}/{d}/{messageId}`
    UpdateStatus { product: &'a str, device: &'a str, message_id: &'a str },
    /// `update_ota_status/{p}/{d}/{messageId}`
    UpdateOtaStatus { product: &'a str, device: &'a str, message_id: &'a str },
    /// `cmd_resp/{p}/{d}/{command}/{requestId}/{messageId}`
    CmdResp { product: &'a str, device: &'a str, command: &'a str, request_id: &'a str, message_id: &'a str },
    /// `rpc_resp/{p}/{d}/{command}/{requestId}/{messageId}`
    RpcResp { product: &'a str, device: &'a str, command: &'a str, request_id: &'a str, message_id: &'a str },
    /// `get/{p}/{d}/{resource}/{messageId}`; resources starting with `$` are internal (`$ntp`, `$tags`, ...).
    DataRequest { product: &'a str, device: &'a str, resource: &'a str, message_id: &'a str },
    /// `m2m/{p}/{target}/{sender}/{messageId}`
    M2m { product: &'a str, target: &'a str, sender: &'a str, message_id: &'a str },
}

/// Why a published topic is not an upstream topic of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("not an upstream topic")]
    UnknownKind,
    #[error("wrong number of topic levels")]
    Levels,
    #[error("invalid product or device id level")]
    Id,
    #[error("invalid name level")]
    Name,
    #[error("invalid message or request id level")]
    MessageId,
}

impl UpstreamError {
    /// Stable label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamError::UnknownKind => "unknown_kind",
            UpstreamError::Levels => "levels",
            UpstreamError::Id => "id",
            UpstreamError::Name => "name",
            UpstreamError::MessageId => "message_id",
        }
    }
}

/// Longest message/request id accepted; ObjectIds (24), UUIDs (36) and ULIDs (26) fit with room.
pub const MAX_MESSAGE_ID_LEN: usize = 128;

/// Message and request ids: `[A-Za-z0-9_.:-]{1,128}`.
pub fn is_message_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_MESSAGE_ID_LEN
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

/// Data types, resources and command names: an optional leading `$` (internal) then `[A-Za-z0-9_.-]{1,64}`.
pub fn is_name(s: &str) -> bool {
    let body = s.strip_prefix('$').unwrap_or(s);
    !body.is_empty()
        && body.len() <= crate::ids::MAX_ID_LEN
        && body.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Whether a data type, resource or command name is reserved for iothub's own protocol.
pub fn is_internal_name(s: &str) -> bool {
    s.starts_with('$')
}

/// iothub's own messages, named with a `$` (never a business command, data type or resource): what a
/// device asks on `get` or reports on `upload_data`, and what iothub sends it as a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Internal {
    /// `get`: the device asks for the time (answered by [`Internal::SetNtp`]).
    Ntp,
    /// Command: the times a device needs to compute its clock offset.
    SetNtp,
    /// `get`: the device asks for its tags if its version is stale (answered by [`Internal::SetTags`]).
    Tags,
    /// Command: the device's tags and their version.
    SetTags,
    /// `get`: the device asks for its shadow (answered by [`Internal::ShadowReply`]).
    Shadow,
    /// `upload_data`: the device reports its state against a shadow version.
    ShadowReported,
    /// `upload_data`: the device changed its own desired state.
    ShadowUpdated,
    /// Command: the shadow's desired state changed.
    UpdateShadow,
    /// Command: the shadow, as the device asked for it.
    ShadowReply,
    /// Command: install a firmware or software package.
    OtaUpgrade,
}

impl Internal {
    pub const ALL: [Internal; 10] = [
        Internal::Ntp,
        Internal::SetNtp,
        Internal::Tags,
        Internal::SetTags,
        Internal::Shadow,
        Internal::ShadowReported,
        Internal::ShadowUpdated,
        Internal::UpdateShadow,
        Internal::ShadowReply,
        Internal::OtaUpgrade,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Internal::Ntp => "$ntp",
            Internal::SetNtp => "$set_ntp",
            Internal::Tags => "$tags",
            Internal::SetTags => "$set_tags",
            Internal::Shadow => "$shadow",
            Internal::ShadowReported => "$shadow_reported",
            Internal::ShadowUpdated => "$shadow_updated",
            Internal::UpdateShadow => "$update_shadow",
            Internal::ShadowReply => "$shadow_reply",
            Internal::OtaUpgrade => "$ota_upgrade",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|i| i.as_str() == s)
    }
}

fn id(s: &str) -> Result<&str, UpstreamError> {
    crate::ids::validate_id(s).map(|_| s).map_err(|_| UpstreamError::Id)
}
fn name(s: &str) -> Result<&str, UpstreamError> {
    if is_name(s) {
        Ok(s)
    } else {
        Err(UpstreamError::Name)
    }
}
fn message_id(s: &str) -> Result<&str, UpstreamError> {
    if is_message_id(s) {
        Ok(s)
    } else {
        Err(UpstreamError::MessageId)
    }
}

/// Parses a topic published by a device.
pub fn parse_upstream(topic: &str) -> Result<Upstream<'_>, UpstreamError> {
    let mut levels = topic.split('/');
    let kind = levels.next().unwrap_or_default();
    let rest: Vec<&str> = levels.collect();
    let expect = |n: usize| if rest.len() == n { Ok(()) } else { Err(UpstreamError::Levels) };
    match kind {
        "upload_data" => {
            expect(4)?;
            Ok(Upstream::UploadData {
                product: id(rest[0])?,
                device: id(rest[1])?,
                data_type: name(rest[2])?,
                message_id: message_id(rest[3])?,
            })
        }
        "update_status" | "update_ota_status" => {
            expect(3)?;
            let (product, device, message_id) = (id(rest[0])?, id(rest[1])?, message_id(rest[2])?);
            Ok(if kind == "update_status" {
                Upstream::UpdateStatus { product, device, message_id }
            } else {
                Upstream::UpdateOtaStatus { product, device, message_id }
            })
        }
        "cmd_resp" | "rpc_resp" => {
            expect(5)?;
            let (product, device, command) = (id(rest[0])?, id(rest[1])?, name(rest[2])?);
            let (request_id, message_id) = (message_id(rest[3])?, message_id(rest[4])?);
            Ok(if kind == "cmd_resp" {
                Upstream::CmdResp { product, device, command, request_id, message_id }
            } else {
                Upstream::RpcResp { product, device, command, request_id, message_id }
            })
        }
        "get" => {
            expect(4)?;
            Ok(Upstream::DataRequest {
                product: id(rest[0])?,
                device: id(rest[1])?,
                resource: name(rest[2])?,
                message_id: message_id(rest[3])?,
            })
        }
        "m2m" => {
            expect(4)?;
            Ok(Upstream::M2m {
                product: id(rest[0])?,
                target: id(rest[1])?,
                sender: id(rest[2])?,
                message_id: message_id(rest[3])?,
            })
        }
        _ => Err(UpstreamError::UnknownKind),
    }
}

impl<'a> Upstream<'a> {
    /// The device the topic says is speaking: it must be the publishing client's own identity.
    pub fn speaker(&self) -> (&'a str, &'a str) {
        match *self {
            Upstream::UploadData { product, device, .. }
            | Upstream::UpdateStatus { product, device, .. }
            | Upstream::UpdateOtaStatus { product, device, .. }
            | Upstream::CmdResp { product, device, .. }
            | Upstream::RpcResp { product, device, .. }
            | Upstream::DataRequest { product, device, .. } => (product, device),
            Upstream::M2m { product, sender, .. } => (product, sender),
        }
    }

    /// Stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Upstream::UploadData { .. } => "upload_data",
            Upstream::UpdateStatus { .. } => "update_status",
            Upstream::UpdateOtaStatus { .. } => "update_ota_status",
            Upstream::CmdResp { .. } => "cmd_resp",
            Upstream::RpcResp { .. } => "rpc_resp",
            Upstream::DataRequest { .. } => "get",
            Upstream::M2m { .. } => "m2m",
        }
    }
}

/// Filters for the broker's publish event rules: exactly the upstream kinds iothub consumes.
pub const UPSTREAM_FILTERS: &[&str] =
    &["upload_data/#", "update_status/#", "update_ota_status/#", "cmd_resp/#", "rpc_resp/#", "get/#"];

/// Filters for the broker's delivery event rules (`message.delivered` / `message.acked`): the topics
/// iothub publishes commands on.
pub const DOWNSTREAM_FILTERS: &[&str] = &["cmd/#", "rpc/#"];

/// Server-side subscriptions every device gets on connect (EMQX `auto_subscribe`, RMQTT
/// auto-subscription), with the broker's `${username}` placeholder (`{product}/{device}`). As with the
/// reference IotHub, devices receive commands, RPCs and M2M messages without subscribing themselves.
pub const AUTO_SUBSCRIPTIONS: &[&str] = &["cmd/${username}/+/+/+/#", "rpc/${username}/+/+/+/#", "m2m/${username}/+/+"];

/// The topic a command goes out on: `{mode}/{p}/{d}/{name}/{encoding}/{requestId}[/{expiresAt}]`, where
/// `mode` is `cmd` or `rpc` and `expiresAt` is in Unix seconds (what devices of the reference IotHub
/// compare against their clock).
pub fn command_topic(
    kind: CommandKind,
    product: &str,
    device: &str,
    name: &str,
    encoding: Encoding,
    request_id: &str,
    expires_at_ms: Option<i64>,
) -> String {
    let (kind, encoding) = (kind.as_str(), encoding.as_str());
    let mut topic = format!("{kind}/{product}/{device}/{name}/{encoding}/{request_id}");
    if let Some(ms) = expires_at_ms {
        // Rounded up: a device must never drop a command before its TTL.
        topic.push_str(&format!("/{}", (ms + 999).div_euclid(1000)));
    }
    topic
}

/// The topic a command to every device of a tag goes out on (devices subscribe to it for each of their
/// tags): `tags/{p}/{tag}/cmd/{name}/{encoding}/{requestId}[/{expiresAt}]`.
pub fn tag_command_topic(
    product: &str,
    tag: &str,
    name: &str,
    encoding: Encoding,
    request_id: &str,
    expires_at_ms: Option<i64>,
) -> String {
    let encoding = encoding.as_str();
    let mut topic = format!("tags/{product}/{tag}/cmd/{name}/{encoding}/{request_id}");
    if let Some(ms) = expires_at_ms {
        topic.push_str(&format!("/{}", (ms + 999).div_euclid(1000)));
    }
    topic
}

/// A command topic as the broker reports its delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Downstream<'a> {
    pub kind: CommandKind,
    pub product: &'a str,
    pub device: &'a str,
    pub name: &'a str,
    pub request_id: &'a str,
}

/// Parses a command topic to one device (see [`command_topic`]); `None` for anything else. The same
/// parser as the device's ([`parse_inbound`]): there is one reading of the downlink grammar.
pub fn parse_downstream(topic: &str) -> Option<Downstream<'_>> {
    match parse_inbound(topic)? {
        Inbound::Command { kind, product, device, tag: None, name, request_id, .. } => {
            Some(Downstream { kind, product, device, name, request_id })
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------------
// The device's side of the same grammar: the topics a device publishes, and how it reads what it receives.
// Builders are the exact inverse of `parse_upstream`; `parse_inbound` accepts exactly what iothub (and other
// devices, for M2M) send. The device SDK uses only these.
// ---------------------------------------------------------------------------------------------------

/// Whether a command is fire-and-forget (`cmd`, answered on `cmd_resp`) or synchronous (`rpc`, `rpc_resp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum CommandKind {
    /// Fire and forget; the reply (if any) arrives on `cmd_resp`.
    Cmd,
    /// The caller waits for `rpc_resp`.
    Rpc,
}

impl CommandKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CommandKind::Cmd => "cmd",
            CommandKind::Rpc => "rpc",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cmd" => Some(CommandKind::Cmd),
            "rpc" => Some(CommandKind::Rpc),
            _ => None,
        }
    }

    /// The upstream kind a reply to this command travels on.
    pub fn reply_kind(self) -> &'static str {
        match self {
            CommandKind::Cmd => "cmd_resp",
            CommandKind::Rpc => "rpc_resp",
        }
    }
}

/// How a command's payload is carried: as is (`plain`) or base64 text the device decodes (`base64`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    Plain,
    Base64,
}

impl Encoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Plain => "plain",
            Encoding::Base64 => "base64",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "plain" => Some(Encoding::Plain),
            "base64" => Some(Encoding::Base64),
            _ => None,
        }
    }
}

/// `upload_data/{p}/{d}/{dataType}/{messageId}`
pub fn upload_data_topic(product: &str, device: &str, data_type: &str, message_id: &str) -> String {
    format!("upload_data/{product}/{device}/{data_type}/{message_id}")
}

/// `update_status/{p}/{d}/{messageId}`
pub fn update_status_topic(product: &str, device: &str, message_id: &str) -> String {
    format!("update_status/{product}/{device}/{message_id}")
}

/// `update_ota_status/{p}/{d}/{messageId}`
pub fn update_ota_status_topic(product: &str, device: &str, message_id: &str) -> String {
    format!("update_ota_status/{product}/{device}/{message_id}")
}

/// `cmd_resp|rpc_resp/{p}/{d}/{command}/{requestId}/{messageId}`
pub fn reply_topic(
    kind: CommandKind,
    product: &str,
    device: &str,
    command: &str,
    request_id: &str,
    message_id: &str,
) -> String {
    format!("{}/{product}/{device}/{command}/{request_id}/{message_id}", kind.reply_kind())
}

/// `get/{p}/{d}/{resource}/{messageId}`
pub fn data_request_topic(product: &str, device: &str, resource: &str, message_id: &str) -> String {
    format!("get/{product}/{device}/{resource}/{message_id}")
}

/// `m2m/{p}/{target}/{sender}/{messageId}`
pub fn m2m_topic(product: &str, target: &str, sender: &str, message_id: &str) -> String {
    format!("m2m/{product}/{target}/{sender}/{message_id}")
}

/// The filter a device subscribes to for each of its tags (the ACL grants `tags/{p}/+/cmd/+/+/+/#`).
pub fn tag_filter(product: &str, tag: &str) -> String {
    format!("tags/{product}/{tag}/cmd/+/+/+/#")
}

/// Something a device receives, parsed strictly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound<'a> {
    /// `cmd|rpc/{p}/{d}/{name}/{encoding}/{requestId}[/{expiresAt}]`, or, with `tag` set,
    /// `tags/{p}/{tag}/cmd/{name}/{encoding}/{requestId}[/{expiresAt}]` (then `device` is empty).
    Command {
        kind: CommandKind,
        product: &'a str,
        device: &'a str,
        tag: Option<&'a str>,
        name: &'a str,
        encoding: Encoding,
        request_id: &'a str,
        /// Unix seconds after which the command must not be executed.
        expires_at: Option<u64>,
    },
    /// `m2m/{p}/{target}/{sender}/{messageId}`
    M2m { product: &'a str, target: &'a str, sender: &'a str, message_id: &'a str },
}

/// Parses a topic a device received; `None` for anything that is not iothub's grammar.
pub fn parse_inbound(topic: &str) -> Option<Inbound<'_>> {
    let levels: Vec<&str> = topic.split('/').collect();
    let valid_id = |s: &str| crate::ids::validate_id(s).is_ok();
    let expiry = |rest: &[&str]| -> Option<Option<u64>> {
        match rest {
            [] => Some(None),
            [s] if !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()) => s.parse().ok().map(Some),
            _ => None,
        }
    };
    match levels[..] {
        [kind @ ("cmd" | "rpc"), product, device, name, encoding, request_id, ref rest @ ..] => {
            let kind = if kind == "cmd" { CommandKind::Cmd } else { CommandKind::Rpc };
            let ok = valid_id(product) && valid_id(device) && is_name(name) && is_message_id(request_id);
            if !ok {
                return None;
            }
            Some(Inbound::Command {
                kind,
                product,
                device,
                tag: None,
                name,
                encoding: Encoding::parse(encoding)?,
                request_id,
                expires_at: expiry(rest)?,
            })
        }
        ["tags", product, tag, "cmd", name, encoding, request_id, ref rest @ ..] => {
            let ok = valid_id(product) && valid_id(tag) && is_name(name) && is_message_id(request_id);
            if !ok {
                return None;
            }
            Some(Inbound::Command {
                kind: CommandKind::Cmd,
                product,
                device: "",
                tag: Some(tag),
                name,
                encoding: Encoding::parse(encoding)?,
                request_id,
                expires_at: expiry(rest)?,
            })
        }
        ["m2m", product, target, sender, message_id] => {
            let ok = valid_id(product) && valid_id(target) && valid_id(sender) && is_message_id(message_id);
            ok.then_some(Inbound::M2m { product, target, sender, message_id })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn internal_names_are_dollar_names_and_parse_back() {
        for name in Internal::ALL {
            assert!(is_internal_name(name.as_str()), "{name:?}");
            assert_eq!(Internal::parse(name.as_str()), Some(name));
        }
        assert_eq!(Internal::parse("$unknown"), None);
    }

    #[test]
    fn command_topics_round_trip_and_reach_the_device() {
        let t = command_topic(CommandKind::Cmd, "p", "d", "reboot", Encoding::Plain, "r1", Some(1_700_000_000_001));
        assert_eq!(t, "cmd/p/d/reboot/plain/r1/1700000001");
        assert_eq!(
            parse_downstream(&t),
            Some(Downstream { kind: CommandKind::Cmd, product: "p", device: "d", name: "reboot", request_id: "r1" })
        );
        let rpc = command_topic(CommandKind::Rpc, "p", "d", "$set_ntp", Encoding::Plain, "r2", None);
        assert_eq!(rpc, "rpc/p/d/$set_ntp/plain/r2");
        assert_eq!(parse_downstream(&rpc).unwrap().kind, CommandKind::Rpc);
        for bad in [
            "cmd/p/d/x/hex/r1",
            "cmd/p/d/x/plain",
            "cmd/p/d/x/plain/r1/soon",
            "up/p/d/x/plain/r1",
            "cmd/p/d/x/plain/r1/",
        ] {
            assert_eq!(parse_downstream(bad), None, "{bad}");
        }
        let tagged = tag_command_topic("p", "floor-3", "reboot", Encoding::Plain, "r3", Some(1_000));
        assert_eq!(tagged, "tags/p/floor-3/cmd/reboot/plain/r3/1");
        assert!(device_may("p", "d", Action::Subscribe, "tags/p/floor-3/cmd/+/+/+/#"));
        assert!(filter_permits("tags/p/floor-3/cmd/+/+/+/#", Action::Publish, &tagged));
        // Every command topic is covered by the device's subscription grant and its auto-subscription.
        for topic in [&t, &rpc] {
            let auto = AUTO_SUBSCRIPTIONS.iter().map(|f| f.replace("${username}", "p/d")).collect::<Vec<_>>();
            assert!(auto.iter().any(|f| filter_permits(f, Action::Publish, topic)), "{topic}");
            assert!(auto.iter().all(|f| device_may("p", "d", Action::Subscribe, f)), "{auto:?}");
        }
    }

    #[test]
    fn upstream_topics_parse_strictly() {
        assert_eq!(
            parse_upstream("upload_data/p/d/temp/m1"),
            Ok(Upstream::UploadData { product: "p", device: "d", data_type: "temp", message_id: "m1" })
        );
        assert_eq!(
            parse_upstream("update_status/p/d/5f1d7a"),
            Ok(Upstream::UpdateStatus { product: "p", device: "d", message_id: "5f1d7a" })
        );
        assert_eq!(
            parse_upstream("get/p/d/$ntp/m1"),
            Ok(Upstream::DataRequest { product: "p", device: "d", resource: "$ntp", message_id: "m1" })
        );
        assert_eq!(parse_upstream("m2m/p/t/s/m1").unwrap().speaker(), ("p", "s"));
        assert_eq!(
            parse_upstream("rpc_resp/p/d/reboot/r-1/m1"),
            Ok(Upstream::RpcResp { product: "p", device: "d", command: "reboot", request_id: "r-1", message_id: "m1" })
        );
        let bad = [
            ("upload_data/p/d/temp", UpstreamError::Levels),
            ("upload_data/p/d/temp/m1/x", UpstreamError::Levels),
            ("upload_data/p/d/temp/", UpstreamError::MessageId),
            ("upload_data/p/d/te mp/m1", UpstreamError::Name),
            ("upload_data/p/d/$/m1", UpstreamError::Name),
            ("upload_data/p/d/$$x/m1", UpstreamError::Name),
            ("upload_data/p+/d/t/m1", UpstreamError::Id),
            ("upload_data//d/t/m1", UpstreamError::Id),
            ("update_status/p/d/m#", UpstreamError::MessageId),
            ("cmd/p/d/x/plain/r1", UpstreamError::UnknownKind),
            ("", UpstreamError::UnknownKind),
        ];
        for (topic, err) in bad {
            assert_eq!(parse_upstream(topic), Err(err), "{topic}");
        }
    }

    /// The broker configs forward exactly the upstream topics iothub consumes.
    #[test]
    fn broker_configs_forward_the_upstream_topics() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../emqx-config/");
        for file in ["emqx-http.hocon", "emqx-postgresql.hocon", "rmqtt-web-hook.toml"] {
            let text = std::fs::read_to_string(format!("{dir}{file}")).unwrap();
            let line = text
                .lines()
                .find(|l| l.contains("\"upload_data/#\"") || l.contains("\\\"upload_data/#\\\""))
                .unwrap_or_else(|| panic!("{file}: no upstream rule"));
            let topics: Vec<&str> = line.split(['"', '\\']).filter(|t| t.ends_with("/#") && !t.contains(' ')).collect();
            assert_eq!(topics, UPSTREAM_FILTERS, "{file}");
        }
    }

    /// The broker configs report deliveries of exactly the command topics, and subscribe devices to
    /// exactly the auto-subscriptions.
    #[test]
    fn broker_configs_track_commands_and_auto_subscribe() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../emqx-config/");
        for file in ["emqx-http.hocon", "emqx-postgresql.hocon"] {
            let text = std::fs::read_to_string(format!("{dir}{file}")).unwrap();
            // The enabled rule `iothub_delivery_events` selects deliveries of exactly the command topics.
            let rule = text.split("iothub_delivery_events {").nth(1).and_then(|r| r.split('}').next()).unwrap();
            assert!(rule.contains("enable = true"), "{file}");
            let line = rule.lines().find(|l| l.contains("sql =")).unwrap();
            assert!(line.contains("$events/message_delivered"), "{file}");
            assert!(
                !text.contains("$events/message_acked"),
                "{file}: acked comes after delivered; one report is enough"
            );
            let filters: Vec<&str> = line.split('\'').filter(|t| t.ends_with("/#")).collect();
            assert_eq!(filters, DOWNSTREAM_FILTERS, "{file}");
            let auto: Vec<&str> =
                text.lines().filter(|l| l.contains("{ topic = \"")).map(|l| l.split('"').nth(1).unwrap()).collect();
            assert_eq!(auto, AUTO_SUBSCRIPTIONS, "{file}");
        }
        let rmqtt = std::fs::read_to_string(format!("{dir}rmqtt-web-hook.toml")).unwrap();
        let line = rmqtt.lines().find(|l| l.starts_with("rule.message_delivered")).unwrap();
        let filters: Vec<&str> = line.split('"').filter(|t| t.ends_with("/#")).collect();
        assert_eq!(filters, DOWNSTREAM_FILTERS);
        // RMQTT's `message_acked` (QoS 1/2) only comes after `message_delivered`, which already made the command
        // `delivered`: forwarding it would be a second webhook per command for nothing.
        assert!(!rmqtt.lines().any(|l| l.starts_with("rule.message_acked")));
    }

    proptest! {
        /// Whatever a device publishes, parsing never panics, and an accepted topic is one the device's
        /// own ACL allows (for the device it names) — the grammar and the ACL agree.
        #[test]
        fn upstream_parse_agrees_with_acl(topic in "[a-z_$/+#pdm1.:-]{0,40}") {
            if let Ok(up) = parse_upstream(&topic) {
                let (p, d) = up.speaker();
                prop_assert!(device_may(p, d, Action::Publish, &topic), "{topic}");
            }
        }

        #[test]
        fn well_formed_upstream_roundtrips(p in "[A-Za-z0-9_-]{1,64}", d in "[A-Za-z0-9_-]{1,64}",
                                           t in "\\$?[A-Za-z0-9_.-]{1,64}", m in "[A-Za-z0-9_.:-]{1,128}") {
            let topic = format!("upload_data/{p}/{d}/{t}/{m}");
            let parsed = parse_upstream(&topic);
            prop_assert_eq!(parsed, Ok(Upstream::UploadData { product: &p, device: &d, data_type: &t, message_id: &m }));
            prop_assert!(device_may(&p, &d, Action::Publish, &topic));
        }
    }

    #[test]
    fn inbound_topics_are_parsed_strictly() {
        assert_eq!(
            parse_inbound("rpc/p/d/getTemp/base64/r1/1700000001"),
            Some(Inbound::Command {
                kind: CommandKind::Rpc,
                product: "p",
                device: "d",
                tag: None,
                name: "getTemp",
                encoding: Encoding::Base64,
                request_id: "r1",
                expires_at: Some(1_700_000_001),
            })
        );
        assert!(matches!(
            parse_inbound("tags/p/lab/cmd/reboot/plain/r2"),
            Some(Inbound::Command { tag: Some("lab"), kind: CommandKind::Cmd, expires_at: None, .. })
        ));
        assert_eq!(
            parse_inbound("m2m/p/d/other/m9"),
            Some(Inbound::M2m { product: "p", target: "d", sender: "other", message_id: "m9" })
        );
        for bad in [
            "cmd/p/d/x/hex/r1",
            "cmd/p/d/x/plain",
            "cmd/p/d/x/plain/r1/soon",
            "cmd/p/d/x/plain/r1/",
            "cmd/p/d/x/plain/r1/1/2",
            "cmd/p/d/x/plain/r1/99999999999999999999999",
            "tags/p/lab/rpc/x/plain/r1",
            "m2m/p/d/other",
            "m2m/p/d/o+ther/m1",
            "",
        ] {
            assert_eq!(parse_inbound(bad), None, "{bad:?}");
        }
    }

    proptest! {
        /// What the device SDK builds is exactly what the server parses, and what the server sends is exactly
        /// what the SDK parses.
        #[test]
        fn device_and_server_agree_on_the_grammar(
            p in "[A-Za-z0-9_-]{1,64}", d in "[A-Za-z0-9_-]{1,64}", t in "[A-Za-z0-9_-]{1,64}",
            n in "\\$?[A-Za-z0-9_.-]{1,64}", r in "[A-Za-z0-9_.:-]{1,128}", m in "[A-Za-z0-9_.:-]{1,128}",
            rpc in any::<bool>(), expires_ms in proptest::option::of(0i64..=4_102_444_800_000),
        ) {
            let kind = if rpc { CommandKind::Rpc } else { CommandKind::Cmd };
            let (up, st, ota, get, m2m) = (
                upload_data_topic(&p, &d, &n, &m),
                update_status_topic(&p, &d, &m),
                update_ota_status_topic(&p, &d, &m),
                data_request_topic(&p, &d, &n, &m),
                m2m_topic(&p, &t, &d, &m),
            );
            prop_assert_eq!(parse_upstream(&up),
                Ok(Upstream::UploadData { product: &p, device: &d, data_type: &n, message_id: &m }));
            prop_assert_eq!(parse_upstream(&st), Ok(Upstream::UpdateStatus { product: &p, device: &d, message_id: &m }));
            prop_assert_eq!(parse_upstream(&ota),
                Ok(Upstream::UpdateOtaStatus { product: &p, device: &d, message_id: &m }));
            prop_assert_eq!(parse_upstream(&get),
                Ok(Upstream::DataRequest { product: &p, device: &d, resource: &n, message_id: &m }));
            prop_assert_eq!(parse_upstream(&m2m), Ok(Upstream::M2m { product: &p, target: &t, sender: &d, message_id: &m }));
            let reply = reply_topic(kind, &p, &d, &n, &r, &m);
            let parsed = parse_upstream(&reply).unwrap();
            prop_assert_eq!(parsed, if rpc {
                Upstream::RpcResp { product: &p, device: &d, command: &n, request_id: &r, message_id: &m }
            } else {
                Upstream::CmdResp { product: &p, device: &d, command: &n, request_id: &r, message_id: &m }
            });
            prop_assert!(device_may(&p, &d, Action::Publish, &reply));

            let expires_at = expires_ms.map(|ms| ((ms + 999) / 1000) as u64);
            let sent = command_topic(kind, &p, &d, &n, Encoding::Base64, &r, expires_ms);
            prop_assert_eq!(parse_inbound(&sent), Some(Inbound::Command {
                kind, product: &p, device: &d, tag: None, name: &n, encoding: Encoding::Base64, request_id: &r, expires_at,
            }));
            let tagged = tag_command_topic(&p, &t, &n, Encoding::Plain, &r, expires_ms);
            prop_assert_eq!(parse_inbound(&tagged), Some(Inbound::Command {
                kind: CommandKind::Cmd, product: &p, device: "", tag: Some(&t), name: &n, encoding: Encoding::Plain,
                request_id: &r, expires_at,
            }));
            // The tag filter delivers the tag command (filter_permits with Publish = topic name matches filter).
            prop_assert!(filter_permits(&tag_filter(&p, &t), Action::Publish, &tagged));
            prop_assert!(device_may(&p, &d, Action::Subscribe, &tag_filter(&p, &t)));
        }

        /// Whatever arrives, parsing never panics.
        #[test]
        fn inbound_parse_never_panics(topic in "[a-z_$/+#pdm1.:-]{0,60}") {
            let _ = parse_inbound(&topic);
        }
    }

    #[test]
    fn device_grants() {
        let ok_pub = [
            "upload_data/p/d/temp/m1",
            "update_status/p/d/m1",
            "update_ota_status/p/d/m1",
            "cmd_resp/p/d/reboot/r1/m1",
            "rpc_resp/p/d/reboot/r1/m1",
            "get/p/d/$ntp/m1",
            "m2m/p/other/d/m1",
        ];
        for t in ok_pub {
            assert!(device_may("p", "d", Action::Publish, t), "{t}");
        }
        let bad_pub = [
            "upload_data/p/other/temp/m1",
            "upload_data/q/d/temp/m1",
            "upload_data/p/d/temp",
            "upload_data/p/d/temp/m1/extra",
            "upload_data/p/d/+/m1",
            "m2m/p/d/other/m1",
            "m2m/q/other/d/m1",
            "cmd/p/d/x/plain/r1",
            "$SYS/brokers",
            "",
        ];
        for t in bad_pub {
            assert!(!device_may("p", "d", Action::Publish, t), "{t}");
        }
        let ok_sub = [
            "cmd/p/d/+/+/+/#",
            "cmd/p/d/reboot/+/+",
            "rpc/p/d/+/+/+/#",
            "m2m/p/d/+/+",
            "tags/p/+/cmd/+/+/+/#",
            "tags/p/t1/cmd/+/+/+",
        ];
        for t in ok_sub {
            assert!(device_may("p", "d", Action::Subscribe, t), "{t}");
        }
        let bad_sub = [
            "cmd/p/+/+/+/+/#",
            "cmd/p/other/+/+/+/#",
            "cmd/#",
            "#",
            "+/p/d/+/+/+",
            "m2m/p/+/+/+",
            "tags/q/+/cmd/+/+/+/#",
            "upload_data/p/d/+/+",
            "$share/g/cmd/p/d/+/+/+/#",
            "cmd/p/d/#/x",
        ];
        for t in bad_sub {
            assert!(!device_may("p", "d", Action::Subscribe, t), "{t}");
        }
    }

    #[test]
    fn literal_filters() {
        assert!(filter_permits("a/+/c", Action::Publish, "a/b/c"));
        assert!(!filter_permits("a/+/c", Action::Publish, "a/b/c/d"));
        assert!(filter_permits("a/#", Action::Publish, "a"));
        assert!(!filter_permits("#", Action::Publish, "$SYS/x"));
        assert!(filter_permits("a/#", Action::Subscribe, "a/+/x"));
        assert!(!filter_permits("a/+", Action::Subscribe, "a/#"));
        assert!(!filter_permits("#", Action::Subscribe, "$SYS/#"));
        assert!(!filter_permits("+/#", Action::Subscribe, "$SYS/brokers"));
        assert!(filter_permits("$SYS/#", Action::Subscribe, "$SYS/brokers/+"));
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-c]{1,2}",
            Just("+".to_string()),
            Just("#".to_string()),
            Just("p".to_string()),
            Just("$SYS".to_string())
        ]
    }

    /// A concrete topic the requested filter may deliver: wildcards become ordinary or `$` levels, and `#`
    /// expands to zero, one or two levels.
    fn concrete(levels: &[String], pick: &[u8]) -> String {
        let mut out: Vec<String> = Vec::new();
        for (i, l) in levels.iter().enumerate() {
            let choice = pick.get(i).copied().unwrap_or(0);
            match l.as_str() {
                "+" => out.push(if choice % 3 == 0 { "$x".into() } else { "x".into() }),
                "#" => {
                    out.extend(
                        (0..choice % 3).map(|k| if k == 0 && choice % 2 == 0 { "$y".into() } else { "y".into() }),
                    )
                }
                other => out.push(other.to_string()),
            }
        }
        if out.is_empty() {
            out.push("z".into());
        }
        out.join("/")
    }

    proptest! {
        // If a granted filter covers a requested filter, every topic the requested filter delivers must also
        // be matched by the granted one: coverage may never grant more than the rule says.
        #[test]
        fn coverage_is_sound(
            g in prop::collection::vec(level(), 1..6),
            r in prop::collection::vec(level(), 1..6),
            pick in prop::collection::vec(any::<u8>(), 6),
        ) {
            let granted = g.join("/");
            let requested = r.join("/");
            if is_valid_filter(&granted) && is_valid_filter(&requested) && filter_permits(&granted, Action::Subscribe, &requested) {
                let topic = concrete(&r, &pick);
                if filter_permits(&requested, Action::Publish, &topic) {
                    prop_assert!(filter_permits(&granted, Action::Publish, &topic), "{} covers {} but not {}", granted, requested, topic);
                }
            }
        }

        #[test]
        fn decisions_never_panic(t in "\\PC{0,120}", sub in any::<bool>()) {
            let a = if sub { Action::Subscribe } else { Action::Publish };
            let _ = device_may("p", "d", a, &t);
        }
    }
}
