//! The bundled broker's identity gate: an RMQTT `client_authenticate` hook that runs before every plugin
//! and refuses any CONNECT whose username or client id is not a well-formed identity
//! ([`crate::identity::check_identity`]).
//!
//! rmqtt-auth-http substitutes its request placeholders (`%u`, `%c`, `%A`, `%t`, …) one after another in the
//! same string, so an identity that itself holds a placeholder would reach iothub's hooks rewritten, and
//! differently at CONNECT and at ACL time. With this gate such an identity never reaches that plugin: the
//! bundled broker is immune by construction, whatever the plugin's templates say. iothub's own authn applies
//! the same check again for every dialect.

use async_trait::async_trait;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType};
use rmqtt::types::AuthResult;

/// Runs first: rmqtt-auth-http registers at priority 100 and RMQTT dispatches higher priorities first.
pub const GATE_PRIORITY: rmqtt::hook::Priority = 1_000;

pub struct IdentityGate;

#[async_trait]
impl Handler for IdentityGate {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        let Parameter::ClientAuthenticate(connect_info) = param else {
            return (true, acc);
        };
        let username = connect_info.username().map(|u| u.as_ref()).unwrap_or("");
        match crate::identity::check_identity(username, connect_info.client_id()) {
            Ok(_) => (true, acc),
            Err(e) => {
                metrics::counter!("iothub_broker_identity_refused_total", "reason" => e.as_str()).increment(1);
                tracing::info!(reason = e.as_str(), "embedded broker refused a CONNECT before authentication");
                // `false` ends the chain: no later handler (auth-http included) sees this identity.
                (false, Some(HookResult::AuthResult(AuthResult::NotAuthorized)))
            }
        }
    }
}
