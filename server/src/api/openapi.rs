//! The OpenAPI document, generated from the handlers' annotations. `iothub openapi` prints it and a test
//! keeps `api-spec/openapi.yaml` byte-identical to it, so the published contract cannot drift from code.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{api_keys, commands, devices, ota, products, shadows, tags, telemetry, tokens};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "iothub API",
        description = "Business API of iothub: products, devices, credentials, API keys, MQTT tokens, device \
            data history, status, the live event stream, and commands and RPC to devices. Every call needs `Authorization: Bearer <API key>`; \
            errors are RFC 9457 problem+json documents whose `field` names the invalid input. Northbound \
            RabbitMQ event schemas: docs/events.md.",
        license(name = "Apache-2.0")
    ),
    paths(
        products::create, products::list, products::get, products::delete,
        devices::register, devices::register_bulk, devices::list, devices::get, devices::delete,
        devices::suspend, devices::resume, devices::rotate_secret,
        api_keys::create, api_keys::list, api_keys::revoke,
        tokens::issue,
        telemetry::list_messages, telemetry::get_message, telemetry::get_status, telemetry::stream,
        commands::send, commands::rpc, commands::get, commands::list,
        tags::get_tags, tags::set_tags, tags::send_to_tag, tags::get_tag_command,
        shadows::get_shadow, shadows::update_shadow,
        ota::push_ota_device, ota::push_ota_tag, ota::get_rollout, ota::device_ota,
    ),
    components(schemas(crate::error::Problem)),
    modifiers(&ApiKeyAuth),
    tags(
        (name = "products"), (name = "devices"), (name = "api-keys"), (name = "tokens"), (name = "telemetry"),
        (name = "commands"), (name = "ota"),
    )
)]
pub struct ApiDoc;

struct ApiKeyAuth;

impl Modify for ApiKeyAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("ihk_{id}_{secret}").build(),
            ),
        );
    }
}

pub fn yaml() -> String {
    ApiDoc::openapi().to_yaml().expect("the OpenAPI document serialises")
}

#[cfg(test)]
mod tests {
    #[test]
    fn published_spec_is_generated_from_code() {
        let published = include_str!("../../../api-spec/openapi.yaml");
        assert!(
            published == super::yaml(),
            "api-spec/openapi.yaml is stale: regenerate with `cargo run -p iothub -- openapi > api-spec/openapi.yaml`"
        );
    }
}
