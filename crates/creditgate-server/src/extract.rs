//! `ApiJson<T>`: the JSON body extractor. Checks the content type and the size limit,
//! and turns serde errors into 400s that name the field (`body.credits.cost`).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header;
use serde::de::DeserializeOwned;

use creditgate_service::{IdemRequest, MAX_IDEMPOTENCY_KEY_LEN};

use crate::error::ApiError;
use crate::openapi;
use crate::state::AppState;
use crate::wire::BodyIdempotencyKey;

pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned + utoipa::ToSchema> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let body = json_body(req, state).await?;
        parse(&body, &T::name()).map(ApiJson)
    }
}

/// A body that is a JSON list of `T` (`ratelimit.multiLimit`): each item parsed as
/// [`ApiJson`] parses a body, a 400 naming `body[i].field`.
pub struct ApiJsonList<T>(pub Vec<T>);

impl<T: DeserializeOwned + utoipa::ToSchema> FromRequest<AppState> for ApiJsonList<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let body = json_body(req, state).await?;
        let items: Vec<serde_json::Value> = serde_json::from_slice(&body).map_err(|_| {
            ApiError::field(
                "body",
                "must be a JSON list of objects",
                "send the items as a JSON array of objects, as /openapi.json documents",
            )
        })?;
        items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                let bytes = Bytes::from(item.to_string());
                parse(&bytes, &T::name()).map_err(|e| within_item(e, i))
            })
            .collect::<Result<Vec<T>, _>>()
            .map(ApiJsonList)
    }
}

/// A 400 about a list's item `i`: `body.x` becomes `body[i].x`.
fn within_item(e: ApiError, i: usize) -> ApiError {
    match e {
        ApiError::BadRequest { errors, .. } => ApiError::invalid(
            errors
                .into_iter()
                .map(|mut f| {
                    if let Some(rest) = f.location.strip_prefix("body") {
                        f.location = format!("body[{i}]{rest}");
                    }
                    f
                })
                .collect(),
        ),
        e => e,
    }
}

/// The body of a route that takes an idempotency key (`Idempotency-Key` header, or
/// `idempotencyKey` in the body), and the key with the request's fingerprint.
pub struct IdemJson<T> {
    pub body: T,
    pub idem: Option<IdemRequest>,
}

const IDEMPOTENCY_HEADER: &str = "idempotency-key";

impl<T> FromRequest<AppState> for IdemJson<T>
where
    T: DeserializeOwned + utoipa::ToSchema + BodyIdempotencyKey,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let header = match req.headers().get(IDEMPOTENCY_HEADER) {
            Some(v) => Some(header_key(v)?),
            None => None,
        };
        let route = req.uri().path().to_owned();
        let raw = json_body(req, state).await?;
        let body: T = parse(&raw, &T::name())?;
        let key = match (header, body.idempotency_key()) {
            (Some(h), Some(b)) if h != b => return Err(ApiError::IdempotencyKeysDiffer),
            (Some(h), _) => Some(h),
            (None, Some(b)) => Some(checked_key(b, "body.idempotencyKey")?.to_owned()),
            (None, None) => None,
        };
        let idem = key.map(|key| IdemRequest::new(key, &route, &canonical_body(&raw)));
        Ok(IdemJson { body, idem })
    }
}

/// The `Idempotency-Key` header's value: a structured-field string (`"…"`), or the bare
/// token many clients send.
fn header_key(value: &axum::http::HeaderValue) -> Result<String, ApiError> {
    const AT: &str = "header.Idempotency-Key";
    let text = value.to_str().map_err(|_| {
        ApiError::field(
            AT,
            "must be printable ASCII",
            "send 1 to 255 printable ASCII characters, e.g. a UUID",
        )
    })?;
    let text = text.trim();
    let unquoted = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .filter(|t| !t.is_empty())
        .unwrap_or(text);
    Ok(checked_key(unquoted, AT)?.to_owned())
}

fn checked_key<'a>(key: &'a str, at: &str) -> Result<&'a str, ApiError> {
    let fix = "send 1 to 255 printable ASCII characters, e.g. a UUID";
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(ApiError::field(
            at,
            format!(
                "must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} characters long, got {}",
                key.chars().count()
            ),
            fix,
        ));
    }
    if !key.bytes().all(|b| (0x20..0x7f).contains(&b)) || key.starts_with(' ') || key.ends_with(' ')
    {
        return Err(ApiError::field(
            at,
            "must be printable ASCII, without leading or trailing spaces",
            fix,
        ));
    }
    Ok(key)
}

/// The body in one form for the fingerprint: object keys sorted, `idempotencyKey`
/// left out (it names the request, it is not part of it).
fn canonical_body(raw: &[u8]) -> String {
    fn write(v: &serde_json::Value, out: &mut String) {
        match v {
            serde_json::Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::Value::String(k.clone()).to_string());
                    out.push(':');
                    write(&map[k], out);
                }
                out.push('}');
            }
            serde_json::Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(item, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    // The typed parse accepted it, so it is JSON.
    let mut value: serde_json::Value = serde_json::from_slice(raw).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.remove("idempotencyKey");
    }
    let mut out = String::with_capacity(raw.len());
    write(&value, &mut out);
    out
}

/// Checks the content type and reads the body up to the size limit.
async fn json_body(req: Request, state: &AppState) -> Result<Bytes, ApiError> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = content_type.split(';').next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::field(
            "header.Content-Type",
            format!("expected application/json, got '{content_type}'"),
            "send the body as JSON with Content-Type: application/json",
        ));
    }
    let limit = state.config.max_body_bytes;
    axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|_| ApiError::PayloadTooLarge { limit })
}

/// Parses a body into the request type whose OpenAPI schema is `schema`, naming the
/// offending field on error in the document's words (never serde's).
pub fn parse<T: DeserializeOwned>(body: &Bytes, schema: &str) -> Result<T, ApiError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some() && first != Some(&b'{') {
        // serde would take a JSON list as the struct's fields in order.
        return Err(ApiError::field(
            "body",
            "must be a JSON object",
            "send the fields as a JSON object, as /openapi.json documents",
        ));
    }
    // The fast path takes the bytes as they are; a body with a list, or one the typed
    // parse refuses, is first brought in line with the document (`openapi::conform`).
    // (Plain serde here: the path of an error is found again below, and tracking it
    // costs every request.)
    if !body.contains(&b'[') {
        if let Ok(value) = serde_json::from_slice(body) {
            return Ok(value);
        }
    }
    let mut value: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return Err(ApiError::field(
                "body",
                format!(
                    "is not well-formed JSON (at line {}, column {})",
                    e.line(),
                    e.column()
                ),
                "send a well-formed JSON object",
            ))
        }
    };
    if let Err(path) = openapi::conform(schema, &mut value) {
        let location = if path.is_empty() {
            "body".to_owned()
        } else {
            format!("body.{path}")
        };
        return Err(ApiError::field(
            &location,
            "must be a JSON object",
            "send the fields as a JSON object, as /openapi.json documents",
        ));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let inner = e.into_inner();
        // serde_path_to_error may or may not end the path with the named field.
        let container = |name: &str| -> String {
            if path == name {
                String::new()
            } else {
                path.strip_suffix(&format!(".{name}"))
                    .unwrap_or(&path)
                    .to_owned()
            }
        };
        let at = |name: &str| match container(name).as_str() {
            "" => format!("body.{name}"),
            p => format!("body.{p}.{name}"),
        };
        // A missing or unknown field: serde names it only in its message.
        let text = inner.to_string();
        let named = |marker: &str| {
            text.strip_prefix(marker)
                .and_then(|rest| rest.split('`').next())
                .map(str::to_owned)
        };
        if let Some(name) = named("missing field `") {
            let field_path = match container(&name).as_str() {
                "" => name.clone(),
                p => format!("{p}.{name}"),
            };
            let what = openapi::describe(schema, &field_path)
                .map(|d| format!("is required and {d}"))
                .unwrap_or_else(|| "is required".to_owned());
            return ApiError::field(&at(&name), what, "add the field (see /openapi.json)");
        }
        if let Some(name) = named("unknown field `") {
            let known = openapi::fields(schema, &container(&name)).join(", ");
            return ApiError::field(
                &at(&name),
                format!("is not a field of this request (its fields: {known})"),
                "remove it, or check its spelling against /openapi.json",
            );
        }
        let location = if path.is_empty() {
            "body".to_owned()
        } else {
            format!("body.{path}")
        };
        let what = openapi::describe(schema, &path)
            .unwrap_or_else(|| "has the wrong type or value".to_owned());
        ApiError::field(
            &location,
            what,
            "see /openapi.json for the field's type and range",
        )
    })
}
