//! The OpenAPI 3.1 document, generated from the handlers' own types.

use std::sync::OnceLock;

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::routes::{apis, keys, system, verify};

#[derive(OpenApi)]
#[openapi(
    info(title = "creditgate", description = "API keys with exact credit balances; Unkey v2 compatible key routes."),
    paths(
        apis::create_api, apis::get_api, apis::list_keys, apis::delete_api,
        keys::create_key, keys::get_key, keys::update_key, keys::update_credits,
        keys::delete_key, keys::whoami, verify::verify_key, system::liveness,
    ),
    modifiers(&RootKeyAuth)
)]
pub struct ApiDoc;

struct RootKeyAuth;

impl Modify for RootKeyAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "rootKey",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document as JSON, rendered once.
pub fn document_json() -> String {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        ApiDoc::openapi()
            .to_json()
            .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    })
    .clone()
}
