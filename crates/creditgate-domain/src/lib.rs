//! Pure domain of creditgate: identifiers, the `Credits`/`Cost` newtypes with checked
//! arithmetic, verification outcomes, key and API records, the refill calendar, root-key
//! permissions, the `Clock`, and the `KeyStore` port. No I/O lives here.

pub mod alerts;
pub mod clock;
pub mod credits;
pub mod ids;
pub mod outcome;
pub mod permission;
pub mod record;
pub mod refill;
pub mod store;
pub mod webhook;

pub use alerts::{refusal_crossing, spend_crossings, AlertKind, Crossing, MAX_ALERTS};
pub use clock::{Clock, ManualClock, SkewedClock, SystemClock};
pub use credits::{Cost, Credits, CreditsError};
pub use ids::{
    hash_secret, new_id, new_id_for_transfer, new_secret, secret_start, ApiId, IdentityId, KeyId,
    RootKeyId, WorkspaceId,
};
pub use outcome::Outcome;
pub use permission::{Action, Permission, PermissionSet};
pub use record::{
    ApiRecord, IdentityRecord, KeyRecord, NewKey, PoolRecord, PreviousSecret, RatelimitOverride,
    RatelimitRule, RootKeyRecord,
};
pub use refill::{Refill, RefillError, RefillInterval};
pub use store::{IdentityPage, IdentityPatch, KeyPatch, KeyStore, StoreError};
pub use webhook::{
    new_webhook_secret, WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookEvent,
};
