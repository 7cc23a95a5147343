//! What an MQTT identity (username + client id) may look like, decided before anything interprets it.
//!
//! Brokers hand the username and client id to plugins that treat some characters as syntax: RMQTT's
//! auth-http substitutes `%u`, `%c`, `%A`, `%t`, … one after another in the same string, so a username
//! `P/d4%A` is `P/d4` at CONNECT and `P/d41` when a subscription is checked; EMQX reads `${…}` templates and an
//! `eq ` prefix in ACL topics. And brokers key sessions by client id alone, so whoever may pick any client
//! id may take over (or kick) another client's session. This module is the one place that says which
//! identities exist; iothub's authn (every dialect), the bundled broker's own pre-authentication hook and the
//! device SDK all use it.
//!
//! - **Usernames** are device-shaped, `{ProductId}/{DeviceId}` in the id alphabet, or token-shaped: 1–128
//!   printable ASCII characters with a `.`, `:` or `@` (which ids never contain, so a token can never be a
//!   device or a product) and none of `/ + # $ % { }`, whitespace or control characters.
//! - **Client ids are derived from the username**: the username itself, or `{username}/{suffix}` with a
//!   suffix in the id alphabet (the reference IotHub SDK's `{p}/{d}` and `{p}/{d}/{suffix}`). A client id
//!   therefore names exactly one identity: no device can take over, kick or inherit another device's (or a
//!   token client's) session, whichever broker or instance answers, without any state.

use crate::ids::{validate_id, DeviceRef};

/// Longest username accepted: a device's is at most 129 characters (two ids and a `/`).
pub const MAX_USERNAME_LEN: usize = 129;
/// Longest token username (the `username` claim of a minted token).
pub const MAX_TOKEN_USERNAME_LEN: usize = 128;
/// Longest client id: the longest username, `/`, and a suffix of at most 64 characters. Below the 23 bytes
/// MQTT 3.1 guarantees only in spirit; every broker iothub supports accepts 65535.
pub const MAX_CLIENT_ID_LEN: usize = MAX_USERNAME_LEN + 1 + crate::ids::MAX_ID_LEN;

/// Who a well-formed username says the client is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Device(DeviceRef),
    /// A client holding a token from `POST /api/v1/tokens`; the string is its username.
    Token(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("username is neither a device ({{product}}/{{device}}) nor a token username")]
    MalformedUsername,
    #[error("client id must be the username or {{username}}/{{suffix}} with a suffix of [A-Za-z0-9_-]{{1,64}}")]
    ClientIdNotBound,
}

impl IdentityError {
    /// A short, stable reason for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityError::MalformedUsername => "malformed username",
            IdentityError::ClientIdNotBound => "client id not bound to the username",
        }
    }
}

/// Is `name` acceptable as a token client's username? (Also checked when a token is minted.)
pub fn is_token_username(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TOKEN_USERNAME_LEN
        && name.bytes().all(|b| b.is_ascii_graphic() && !b"/+#$%{}\\\"'".contains(&b))
        && name.contains(['.', ':', '@'])
}

/// Classifies a username; anything that is neither device- nor token-shaped is refused.
pub fn parse_username(username: &str) -> Result<Principal, IdentityError> {
    if username.len() > MAX_USERNAME_LEN {
        return Err(IdentityError::MalformedUsername);
    }
    if let Some(device) = DeviceRef::from_broker_username(username) {
        return Ok(Principal::Device(device));
    }
    if is_token_username(username) {
        return Ok(Principal::Token(username.to_string()));
    }
    Err(IdentityError::MalformedUsername)
}

/// Is `client_id` one of the client ids `username` may use (`{username}` or `{username}/{suffix}`)?
pub fn client_id_is_bound(username: &str, client_id: &str) -> bool {
    if client_id.len() > MAX_CLIENT_ID_LEN {
        return false;
    }
    match client_id.strip_prefix(username) {
        Some("") => true,
        Some(rest) => rest.strip_prefix('/').is_some_and(|suffix| validate_id(suffix).is_ok()),
        None => false,
    }
}

/// The whole CONNECT-time identity check: a well-formed username and a client id bound to it.
pub fn check_identity(username: &str, client_id: &str) -> Result<Principal, IdentityError> {
    let principal = parse_username(username)?;
    if !client_id_is_bound(username, client_id) {
        return Err(IdentityError::ClientIdNotBound);
    }
    Ok(principal)
}

/// The client id a device connects with: `{p}/{d}`, or `{p}/{d}/{suffix}` for a further connection.
pub fn device_client_id(device: &DeviceRef, suffix: Option<&str>) -> String {
    match suffix {
        Some(s) => format!("{}/{s}", device.broker_username()),
        None => device.broker_username(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn placeholder_usernames_are_refused() {
        for placeholder in ["%u", "%c", "%A", "%a", "%p", "%P", "%r", "%C", "%d", "%t", "${username}", "${clientid}"] {
            let username = format!("p/d4{placeholder}");
            assert_eq!(parse_username(&username), Err(IdentityError::MalformedUsername), "{username}");
            assert_eq!(parse_username(&format!("svc.x{placeholder}")), Err(IdentityError::MalformedUsername));
            assert_eq!(check_identity("p/d4", &username), Err(IdentityError::ClientIdNotBound), "{username}");
        }
        for bad in ["", "p", "p/", "/d", "p/d/x", "p d/x", "svc", "svc.a/b", "svc.a b", "svc.\u{7f}", "é.x", "a.\n"] {
            assert_eq!(parse_username(bad), Err(IdentityError::MalformedUsername), "{bad:?}");
        }
    }

    #[test]
    fn client_ids_are_derived_from_the_username() {
        assert_eq!(
            check_identity("p1/d1", "p1/d1"),
            Ok(Principal::Device(DeviceRef::from_broker_username("p1/d1").unwrap()))
        );
        assert!(check_identity("p1/d1", "p1/d1/backup-2").is_ok());
        assert!(check_identity("svc.billing", "svc.billing").is_ok());
        assert!(check_identity("svc.billing", "svc.billing/worker_3").is_ok());
        for (username, client_id) in [
            ("p1/d1", "p1/d2"),     // another device's session
            ("p1/d1", "p1/d1-b"),   // device d1-b's session
            ("p1/d1", "p2/d1"),     // another product's device
            ("p1/d1", "p1/d1/"),    // empty suffix
            ("p1/d1", "p1/d1/a/b"), // nested suffix
            ("p1/d1", "p1/d1/%A"),  // placeholder in the suffix
            ("p1/d1", "p1.d1"),     // the old SDK's id
            ("p1/d1", "x"),
            ("p1/d1", ""),
            ("svc.a", "p1/d1"), // a token taking a device's session
            ("svc.a", "svc.ab"),
        ] {
            assert_eq!(
                check_identity(username, client_id),
                Err(IdentityError::ClientIdNotBound),
                "{username} {client_id}"
            );
        }
        let long = format!("p1/d1/{}", "a".repeat(65));
        assert!(check_identity("p1/d1", &long).is_err());
    }

    /// Usernames that are often well formed: device or token shapes whose parts may carry anything.
    fn username() -> impl Strategy<Value = String> {
        let part = prop_oneof!["[a-z0-9_-]{1,4}", "\\PC{1,4}", Just("%A".to_string()), Just("${x}".to_string())];
        prop_oneof![
            (part.clone(), part.clone()).prop_map(|(p, d)| format!("{p}/{d}")),
            (part.clone(), prop_oneof![Just('.'), Just(':'), Just('@')], part)
                .prop_map(|(a, sep, b)| format!("{a}{sep}{b}")),
        ]
    }

    /// Client ids built from a username, as a client (honest or not) would pick them.
    fn client_id_for(username: String) -> impl Strategy<Value = String> {
        let suffix = prop_oneof!["[a-z0-9_-]{1,4}", "\\PC{0,4}", Just("%t".to_string()), Just("a/b".to_string())];
        proptest::option::of(suffix).prop_map(move |s| match s {
            Some(s) => format!("{username}/{s}"),
            None => username.clone(),
        })
    }

    proptest! {
        /// No two distinct usernames can share a client id: the client id decides the username.
        #[test]
        fn a_client_id_belongs_to_one_username(
            (u1, c) in username().prop_flat_map(|u| (Just(u.clone()), client_id_for(u))),
            u2 in username(),
        ) {
            if check_identity(&u1, &c).is_ok() && check_identity(&u2, &c).is_ok() {
                prop_assert_eq!(u1, u2);
            }
        }

        /// An accepted device identity is granted nothing outside its own topics, whatever it asks (shared
        /// subscriptions decided on their real filter, as EMQX does). The fuzz target `identity_acl` checks
        /// the same on arbitrary bytes.
        #[test]
        fn accepted_devices_reach_only_their_own_topics(
            p in "[a-z0-9]{1,3}", d in "[a-z0-9]{1,3}", other in "[a-z0-9]{1,3}",
            suffix in proptest::option::of("[a-z0-9]{1,3}"),
            choices in proptest::collection::vec((0usize..11, "[a-z0-9]{1,3}"), 1..8),
            subscribe in proptest::bool::ANY,
        ) {
            use crate::topics::{device_may, shared_subscription_filter, Action};
            let username = format!("{p}/{d}");
            let client_id = match &suffix { Some(s) => format!("{username}/{s}"), None => username.clone() };
            let Ok(Principal::Device(device)) = check_identity(&username, &client_id) else {
                return Err(TestCaseError::fail("a well-formed device identity was refused"));
            };
            // Levels drawn so that the device's own product and id, another id, and the topic keywords come
            // up often: grants are then actually reached.
            let vocabulary = |i: usize, free: &str| -> String {
                match i {
                    0 => p.clone(),
                    1 => d.clone(),
                    2 => other.clone(),
                    3 => "+".into(),
                    4 => "#".into(),
                    5 => "$share".into(),
                    6 => "cmd".into(),
                    7 => "m2m".into(),
                    8 => "tags".into(),
                    9 => "upload_data".into(),
                    _ => free.to_string(),
                }
            };
            let topic = choices.iter().map(|(i, free)| vocabulary(*i, free)).collect::<Vec<_>>().join("/");
            let action = if subscribe { Action::Subscribe } else { Action::Publish };
            let decided = if subscribe { shared_subscription_filter(&topic).unwrap_or(&topic) } else { &topic };
            if device_may(device.product.as_str(), device.device.as_str(), action, decided) {
                let parts: Vec<&str> = decided.split('/').collect();
                prop_assert_eq!(parts[1], p.as_str(), "another product: {}", decided);
                match (parts[0], action) {
                    ("tags", Action::Subscribe) => prop_assert_eq!(parts.get(3).copied(), Some("cmd")),
                    ("m2m", Action::Publish) => prop_assert_eq!(parts[3], d.as_str(), "sending as another: {}", decided),
                    _ => prop_assert_eq!(parts[2], d.as_str(), "another device: {}", decided),
                }
            }
        }

        /// Whatever passes carries nothing a broker's request template could reinterpret.
        #[test]
        fn accepted_identities_hold_no_template_syntax(
            (u, c) in username().prop_flat_map(|u| (Just(u.clone()), client_id_for(u))),
        ) {
            if check_identity(&u, &c).is_ok() {
                for s in [&u, &c] {
                    let template_syntax = ['%', '$', '{', '}', '+', '#'];
                    prop_assert!(!s.contains(template_syntax), "{:?}", s);
                    prop_assert!(s.bytes().all(|b| b.is_ascii_graphic()));
                }
            }
        }
    }
}
