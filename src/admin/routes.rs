//! Route table and handlers.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::json;

use super::{validate, AdminState, ApiError};
use crate::audit::AdminEvent;
use crate::isolation::commands::{self, CommandRequest};
use crate::isolation::IsolationError;
use crate::sandbox::lifecycle::{CreateSandbox, SandboxInfo};
use crate::secret::{Location, SecretValue};
use crate::store::{SecretMeta, StoreError, StoreRecord};

type St = State<Arc<AdminState>>;

/// Largest request body the admin API reads (a 64 KiB secret value fits many times over, even
/// fully JSON-escaped); a larger body gets 413 `request_too_large`.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The admin router. `/healthz` is open; everything else needs the bearer token.
pub fn router(state: Arc<AdminState>) -> Router {
    let api = Router::new()
        .route("/v1/stores", post(create_store).get(list_stores))
        .route(
            "/v1/stores/{id}",
            get(get_store).patch(update_store).delete(delete_store),
        )
        .route("/v1/stores/{id}/secrets", get(list_secrets))
        .route(
            "/v1/stores/{id}/secrets/{name}",
            put(set_secret).delete(delete_secret),
        )
        .route("/v1/sandboxes", post(create_sandbox).get(list_sandboxes))
        .route(
            "/v1/sandboxes/{id}",
            get(get_sandbox).delete(delete_sandbox),
        )
        .route("/v1/sandboxes/{id}/commands", post(run_command))
        .route("/v1/admin/reload", post(reload))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .merge(api)
        .fallback(|| async { ApiError::no_such_route() })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(no_nul_in_path))
        .layer(middleware::map_response(json_errors))
        .with_state(state)
}

/// No id or name holds a NUL byte, so a path that decodes to one names nothing: 404, before
/// any backend sees it (PostgreSQL's `TEXT` cannot even compare one: it answered 500 and
/// logged an error; an outside review).
async fn no_nul_in_path(req: Request, next: Next) -> Response {
    if req.uri().path().contains("%00") {
        return ApiError::not_found("no such resource (the path holds a NUL byte)").into_response();
    }
    next.run(req).await
}

/// Every error leaves in the one JSON shape: an extractor's own rejection (a path segment that
/// is not UTF-8 once decoded, a query that does not parse) is plain text from axum, so it is
/// rewritten here, its text as the message.
async fn json_errors(resp: Response) -> Response {
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let status = resp.status();
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let bytes = axum::body::to_bytes(resp.into_body(), 4096)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        s if s.is_client_error() => "invalid_request",
        _ => "internal",
    };
    let message = if text.trim().is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text.trim().to_owned()
    };
    ApiError::new(status, code, message).into_response()
}

async fn require_token(State(st): St, req: Request, next: Next) -> Response {
    if !bearer_ok(&st, req.headers()) {
        return ApiError::unauthorized().into_response();
    }
    next.run(req).await
}

fn bearer_ok(st: &AdminState, headers: &header::HeaderMap) -> bool {
    st.admin_token.matches(headers)
}

fn actor(peer: SocketAddr) -> String {
    format!("admin-token@{peer}")
}

fn audit(
    st: &AdminState,
    action: &str,
    store: Option<&str>,
    secret: Option<&str>,
    sandbox: Option<&str>,
    peer: SocketAddr,
) {
    st.metrics.store_op(action);
    st.audit
        .admin(&event(action, (store, secret, sandbox), peer));
}

/// The audit event of an admin call made from `peer`.
fn event<'a>(
    action: &'a str,
    (store, secret, sandbox): (Option<&'a str>, Option<&'a str>, Option<&'a str>),
    peer: SocketAddr,
) -> AdminEvent<'a> {
    AdminEvent {
        action,
        store,
        store_name: None,
        secret,
        sandbox,
        actor: actor(peer),
        outcome: None,
    }
}

/// A change the store could not confirm (the database did not answer in time: it may have
/// committed) is audited with `"outcome":"unknown"`. Such a change had been left out of the
/// audit log while it took effect on every node (found from outside: a rotation, a secret and
/// a store deleted, an allowlist narrowed, each answered 503 and applied). Other errors
/// changed nothing and are not audited.
fn audit_unconfirmed(
    st: &AdminState,
    action: &str,
    (store, secret): (Option<&str>, Option<&str>),
    peer: SocketAddr,
    e: &StoreError,
) {
    audit_if_unconfirmed(st, event(action, (store, secret, None), peer), e);
}

/// [`audit_unconfirmed`] for an event the caller built.
fn audit_if_unconfirmed(st: &AdminState, ev: AdminEvent<'_>, e: &StoreError) {
    if matches!(e, StoreError::Unconfirmed(_)) {
        st.audit.admin(&AdminEvent {
            outcome: Some("unknown"),
            ..ev
        });
    }
}

/// Distinguishes an absent field (None) from an explicit `null` (Some(None)).
fn double_option<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateStore {
    name: String,
    #[serde(default)]
    egress_allowlist: Option<Vec<String>>,
}

async fn create_store(
    State(st): St,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<Json<CreateStore>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<StoreRecord>), ApiError> {
    let Json(req) = body?;
    validate::store_name(&req.name)?;
    let allow = validate::patterns("egress_allowlist", req.egress_allowlist)?;
    // Named by its name too: an unconfirmed creation has no id to audit it by.
    let named = |store| AdminEvent {
        store_name: Some(&req.name),
        ..event("store.create", (store, None, None), peer)
    };
    let rec = st
        .store
        .create_store(&req.name, allow)
        .inspect_err(|e| audit_if_unconfirmed(&st, named(None), e))?;
    st.metrics.store_op("store.create");
    st.audit.admin(&named(Some(&rec.id)));
    Ok((StatusCode::CREATED, Json(rec)))
}

/// Header naming the stores left out of `GET /v1/stores` because their rows failed their checks.
pub const CORRUPT_STORES_HEADER: &str = "x-sealgate-corrupt-stores";

/// `GET /v1/stores`: the stores whose rows pass their checks. A row that fails them (tampered
/// or damaged) is left out, logged, and named by id in [`CORRUPT_STORES_HEADER`]: one bad row
/// neither hides the others nor shows up as if it were sound.
async fn list_stores(State(st): St) -> Result<Response, ApiError> {
    let listing = st.store.list_stores()?;
    let mut response = Json(listing.stores).into_response();
    if !listing.corrupt.is_empty() {
        // The log line names what the header names (bounded, as the ids are the database's:
        // eight huge ids wrote half a megabyte per listing; re-check), and how many there are.
        let named = corrupt_header(&listing.corrupt);
        tracing::error!(
            count = listing.corrupt.len(),
            stores = %named,
            "store rows failed their integrity checks and were left out of GET /v1/stores \
             (GET /v1/stores/{{id}} names the failing field; see docs/operations.md)"
        );
        let value =
            header::HeaderValue::from_str(&named).expect("percent-encoded ids are visible ASCII");
        response.headers_mut().insert(CORRUPT_STORES_HEADER, value);
    }
    Ok(response)
}

/// The most of [`CORRUPT_STORES_HEADER`]'s value: ids past it are counted (`+N`), not named.
/// Ids come from the database as written there: eight of 60,000 characters made a head no
/// client would read, and the listing failed for every client (outside re-check).
const CORRUPT_HEADER_MAX: usize = 4096;

/// [`CORRUPT_STORES_HEADER`]'s value: the ids ([`header_safe`]), comma-separated, each that
/// still fits in [`CORRUPT_HEADER_MAX`], then `+N` for the `N` left unnamed (`GET
/// /v1/stores/{id}` of a named one, or the database, tells the rest).
fn corrupt_header(ids: &[String]) -> String {
    let mut out = String::new();
    let mut unnamed = 0;
    for id in ids {
        let id = header_safe(id);
        if out.len() + id.len() + 1 > CORRUPT_HEADER_MAX {
            unnamed += 1;
            continue;
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(&id);
    }
    if unnamed > 0 {
        let sep = if out.is_empty() { "" } else { "," };
        out = format!("{out}{sep}+{unnamed}");
    }
    out
}

/// A store id as it may stand in [`CORRUPT_STORES_HEADER`]: percent-encoded but for ASCII
/// letters, digits, `-`, `_` and `.` (a UUID is unchanged). The ids of rows that failed their
/// checks come from the database as written there: one holding CR/LF made the whole header
/// invalid, and it was left out, hiding every tampered store (outside pass).
fn header_safe(id: &str) -> String {
    const KEEP: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.');
    percent_encoding::utf8_percent_encode(id, KEEP).to_string()
}

async fn get_store(State(st): St, Path(id): Path<String>) -> Result<Json<StoreRecord>, ApiError> {
    Ok(Json(st.store.get_store(&validate::store_id(id))?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateStore {
    /// Absent: unchanged. `null` is refused (a store always has a name).
    #[serde(default, deserialize_with = "double_option")]
    name: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    egress_allowlist: Option<Option<Vec<String>>>,
}

async fn update_store(
    State(st): St,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    body: Result<Json<UpdateStore>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<StoreAnswer>, ApiError> {
    let id = validate::store_id(id);
    let Json(req) = body?;
    let name = match req.name {
        None => None,
        Some(None) => {
            return Err(ApiError::bad_request(
                "name: null is not a store name (leave the field out to keep the name)",
            ))
        }
        Some(Some(n)) => Some(n),
    };
    if let Some(n) = &name {
        validate::store_name(n)?;
    }
    let allow = match req.egress_allowlist {
        None => None,
        Some(list) => Some(validate::patterns("egress_allowlist", list)?),
    };
    let allow_changed = allow.is_some();
    let opened = matches!(allow, Some(None));
    let rec = st
        .store
        .update_store(&id, name.as_deref(), allow)
        .inspect_err(|e| audit_unconfirmed(&st, "store.update", (Some(&id), None), peer, e))?;
    let mut warnings = Vec::new();
    if allow_changed {
        st.sandboxes.refresh_committed(&id);
        warnings = allowlist_warnings(&st, &rec);
    }
    if opened {
        // `null` is "any public host" here (DESIGN), where the opencomputer SDK's `None`
        // means "unchanged": a ported `update(id, name, None)` opened the store without a word
        // (outside pass).
        warnings.insert(
            0,
            format!(
                "store {}'s egress_allowlist is now null: its sandboxes may reach any public \
                 host on the default ports, 443 and 80 ([] allows none; leave the field out to \
                 keep the list)",
                rec.name
            ),
        );
    }
    audit(&st, "store.update", Some(&id), None, None, peer);
    Ok(Json(StoreAnswer { rec, warnings }))
}

/// `PATCH /v1/stores/{id}`: the store, and what its new allowlist did to its secrets. The
/// contract answers "the store": with nothing to say the answer is exactly the record that
/// `GET /v1/stores/{id}` gives (clients compare the two), so `warnings` is left out when empty.
#[derive(Serialize)]
struct StoreAnswer {
    #[serde(flatten)]
    rec: StoreRecord,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<String>,
}

/// Each secret of `store` that its (new) allowlist leaves never unsealed: an allowlist made
/// `null` leaves a secret without `allowed_hosts` nowhere to go (the secure default), one
/// narrowed may exclude every host a secret names. The change is made either way (the
/// operator asked for it); the answer says what it costs, as `PUT …/secrets/{name}` does.
/// A secret list that cannot be read (a tampered row) warns about nothing here: reading the
/// store's secrets names the failure.
fn allowlist_warnings(st: &AdminState, store: &StoreRecord) -> Vec<String> {
    let secrets = st.store.list_secrets(&store.id).unwrap_or_default();
    secrets
        .iter()
        .filter_map(|meta| never_unsealed(store, meta).or_else(|| dead_entries(store, meta)))
        .collect()
}

async fn delete_store(
    State(st): St,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = validate::store_id(id);
    st.store
        .delete_store(&id)
        .inspect_err(|e| audit_unconfirmed(&st, "store.delete", (Some(&id), None), peer, e))?;
    audit(&st, "store.delete", Some(&id), None, None, peer);
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetSecret {
    value: zeroize::Zeroizing<String>,
    #[serde(default)]
    allowed_hosts: Option<Vec<String>>,
    #[serde(default)]
    locations: Option<Vec<Location>>,
}

#[derive(Serialize)]
struct SecretAnswer {
    #[serde(flatten)]
    meta: SecretMeta,
    warnings: Vec<String>,
}

/// The complaint serde's message opens with, and what it names: up to the message's last
/// `` `, expected ``, since serde does not escape the name (a backtick inside it must not cut
/// it short: a cut name could pass as short and be echoed while the whole was not), and from
/// the *first* marker, since the name itself may hold the other marker's text.
fn named_in(text: &str) -> Option<(Complaint, &str)> {
    let (at, complaint, marker) = [
        (Complaint::Field, "unknown field `"),
        (Complaint::Variant, "unknown variant `"),
    ]
    .into_iter()
    .filter_map(|(c, m)| text.find(m).map(|at| (at, c, m)))
    .min_by_key(|found| found.0)?;
    let start = at + marker.len();
    let len = text[start..].rfind("`, expected")?;
    Some((complaint, &text[start..start + len]))
}

/// What a JSON body of a secret got wrong, as far as the answer says.
#[derive(Clone, Copy)]
enum Complaint {
    Field,
    Variant,
}

/// JSON errors on the secret route never echo input: serde quotes offending scalars.
fn sanitize(e: axum::extract::rejection::JsonRejection) -> ApiError {
    if matches!(
        e.status(),
        StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNSUPPORTED_MEDIA_TYPE
    ) {
        return ApiError::from_rejection(&e, String::new());
    }
    // An unknown field's name only if short: a caller's JSON could use the value as a key.
    // Likewise an unknown location (the only enum in the body).
    match named_in(&e.body_text()) {
        Some((Complaint::Field, field)) => ApiError::bad_request(format!(
            "invalid secret body: unknown field {} (the fields are value, allowed_hosts, \
             locations)",
            validate::quoted_if_short(field)
        )),
        Some((Complaint::Variant, variant)) => ApiError::bad_request(format!(
            "invalid secret body: unknown location {} (the locations are \"header\", \"query\" \
             and \"body\")",
            validate::quoted_if_short(variant)
        )),
        None => ApiError::bad_request("invalid secret body: expected {\"value\": string, \"allowed_hosts\"?: [string] | null, \"locations\"?: [\"header\"|\"query\"|\"body\"]}"),
    }
}

async fn set_secret(
    State(st): St,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((id, name)): Path<(String, String)>,
    body: Result<Json<SetSecret>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<SecretAnswer>, ApiError> {
    let id = validate::store_id(id);
    let Json(req) = body.map_err(sanitize)?;
    validate::secret_name(&name)?;
    validate::secret_value(&req.value)?;
    let hosts = validate::secret_patterns(req.allowed_hosts)?;
    let locations = validate::locations(req.locations)?;
    let store = st.store.get_store(&id)?;
    let before = st
        .store
        .list_secrets(&id)?
        .into_iter()
        .find(|m| m.name == name);
    let short = req.value.len() < SHORT_VALUE;
    let value = SecretValue::new(req.value.as_bytes().to_vec());
    let meta = st
        .store
        .put_secret(&id, &name, &value, hosts, locations)
        .inspect_err(|e| audit_unconfirmed(&st, "secret.set", (Some(&id), Some(&name)), peer, e))?;
    let mut warnings = secret_warnings(&store, &meta);
    if let Some(w) = before.and_then(|old| widening_warning(&store, &old, &meta)) {
        warnings.push(w);
    }
    if short {
        warnings.push(short_value_warning(&meta.name));
    }
    st.sandboxes.refresh_committed(&id);
    let lacking = st.sandboxes.lacking_secret(&id, &meta.name);
    if lacking > 0 {
        warnings.push(lacking_warning(&meta.name, &store.name, lacking));
    }
    audit(&st, "secret.set", Some(&id), Some(&name), None, peer);
    Ok(Json(SecretAnswer { meta, warnings }))
}

/// Values shorter than this get a warning: responses are scrubbed of every real value, so a
/// sandbox that reaches an echoing endpoint on an unsealing destination can test guesses of a
/// value (a right guess comes back as the token). Only a value too short or too guessable to
/// survive that is at risk; the scrubber matches whole values, never prefixes.
const SHORT_VALUE: usize = 16;

fn short_value_warning(name: &str) -> String {
    format!(
        "secret {name} is shorter than {SHORT_VALUE} bytes: responses are scrubbed of it, so a \
         sandbox that reaches a host echoing its requests can test guesses of it (a right guess \
         comes back as the token), every occurrence of those bytes in answers from its hosts \
         becomes the token too (corrupting answers that happen to contain them), and its \
         base64 forms (a stored Basic header) are not scrubbed; use a long random value"
    )
}

/// Sandboxes get their tokens at creation: a secret added (or deleted and set again) later does
/// not reach those already running (ARCHITECTURE.md, "Rotation reach").
fn lacking_warning(name: &str, store: &str, count: usize) -> String {
    let (n, hold) = if count == 1 {
        ("1 running sandbox".to_string(), "holds")
    } else {
        (format!("{count} running sandboxes"), "hold")
    };
    // "created without" was untrue for a secret deleted and set again: they had it, and its
    // old token stopped at the deletion (outside pass).
    format!(
        "{n} of store {store} on this node {hold} no token for secret {name} (created \
         without it, or it was deleted since) and will not get it; sandboxes created from now \
         on will"
    )
}

fn secret_warnings(store: &StoreRecord, meta: &SecretMeta) -> Vec<String> {
    let mut w = Vec::new();
    if validate::shadows_process_var(&meta.name) {
        w.push(format!(
            "secret {0} replaces the variable {0} with its token in every sandbox of store {1} \
             (in isolated sandboxes' commands too): programs that read {0} will not work; \
             choose another name unless that is what you want",
            meta.name, store.name
        ));
    }
    w.extend(never_unsealed(store, meta).or_else(|| dead_entries(store, meta)));
    if meta
        .allowed_hosts
        .as_ref()
        .is_some_and(|h| h.iter().any(|p| p == "*"))
    {
        w.push(format!(
            "secret {} may be unsealed for any allowed host (\"*\")",
            meta.name
        ));
    }
    if meta.locations.contains(&Location::Body) {
        w.push(format!(
            "secret {} is unsealed in request bodies; [\"header\"] is recommended for API keys",
            meta.name
        ));
    }
    w
}

/// A replace that lets the value out where the old secret could not go says so: a PUT sets the
/// whole secret, so a rotation that gives only the value resets `allowed_hosts` to none of its
/// own (every host of the store's allowlist) and `locations` to header and body, at once in
/// every running sandbox. Patterns are compared as stored (canonical); a pattern that only
/// narrows an old one still counts as added, which errs toward saying it.
fn widening_warning(store: &StoreRecord, old: &SecretMeta, new: &SecretMeta) -> Option<String> {
    // A secret that can never be unsealed is widened nowhere (its own warning says so).
    if never_unsealed(store, new).is_some() {
        return None;
    }
    let mut wider = Vec::new();
    match (&old.allowed_hosts, &new.allowed_hosts) {
        (Some(was), None) => wider.push(format!(
            "allowed_hosts were {}, now none of its own (every host of store {}'s \
             egress_allowlist)",
            listed(was),
            store.name
        )),
        (Some(was), Some(now)) => {
            let added: Vec<String> = now.iter().filter(|p| !was.contains(p)).cloned().collect();
            if !added.is_empty() {
                // "now [..] (new: ..)", not "now also": a replace drops what it does not
                // list (an outside check read "also" as kept).
                wider.push(format!(
                    "allowed_hosts were {}, now {} (new: {})",
                    listed(was),
                    listed(now),
                    listed(&added)
                ));
            }
        }
        (None, _) => {}
    }
    let added: Vec<String> = new
        .locations
        .iter()
        .filter(|l| !old.locations.contains(l))
        .map(|l| l.as_str().to_owned())
        .collect();
    if !added.is_empty() {
        let names =
            |ls: &[Location]| -> Vec<String> { ls.iter().map(|l| l.as_str().to_owned()).collect() };
        wider.push(format!(
            "locations were {}, now {} (new: {})",
            listed(&names(&old.locations)),
            listed(&names(&new.locations)),
            listed(&added)
        ));
    }
    if wider.is_empty() {
        return None;
    }
    Some(format!(
        "secret {} may now be unsealed where it could not before: {}; a set replaces the whole \
         secret, so give allowed_hosts and locations again with each new value to keep them",
        new.name,
        wider.join("; ")
    ))
}

/// `[a, b]` for a warning (patterns and location names, never values).
fn listed(items: &[String]) -> String {
    format!("[{}]", items.join(", "))
}

/// Why `meta` can never be unsealed under `store`, if it cannot.
fn never_unsealed(store: &StoreRecord, meta: &SecretMeta) -> Option<String> {
    let (name, store_name) = (&meta.name, &store.name);
    match (&store.egress_allowlist, &meta.allowed_hosts) {
        (None, None) => Some(format!(
            "secret {name} has no allowed_hosts and store {store_name} has no egress_allowlist: it will never be unsealed"
        )),
        (_, Some(hosts)) if hosts.is_empty() => Some(format!(
            "secret {name} can never be unsealed: its allowed_hosts is empty"
        )),
        (Some(allow), _) if allow.is_empty() => Some(format!(
            "secret {name} can never be unsealed: store {store_name}'s egress_allowlist is empty (no host)"
        )),
        (Some(allow), Some(hosts)) if !any_overlap(allow, hosts) => Some(format!(
            "secret {name} can never be unsealed: none of its allowed_hosts is reachable under store {store_name}'s egress_allowlist"
        )),
        // No allowlist is any public host on the default ports only: `*`.
        (None, Some(hosts)) if !any_overlap(&["*".to_owned()], hosts) => Some(format!(
            "secret {name} can never be unsealed: store {store_name} has no egress_allowlist, which allows the default ports only, and every one of its allowed_hosts names another port"
        )),
        _ => None,
    }
}

/// The entries of `meta`'s `allowed_hosts` that no destination of `store`'s allowlist can
/// match, when others can (when none can, [`never_unsealed`] says so): a port the allowlist
/// never allows (no allowlist allows 443 and 80 only, as `*`), a host outside it. The secret
/// is stored as given; the operator learns which entries do nothing (outside pass h45a: an
/// entry for `host:8443` under a store without an allowlist was accepted without a word).
fn dead_entries(store: &StoreRecord, meta: &SecretMeta) -> Option<String> {
    let hosts = meta.allowed_hosts.as_ref()?;
    let any = ["*".to_owned()];
    let allow = store.egress_allowlist.as_deref().unwrap_or(&any);
    let dead: Vec<String> = hosts
        .iter()
        .filter(|h| !any_overlap(allow, std::slice::from_ref(h)))
        .cloned()
        .collect();
    if dead.is_empty() || dead.len() == hosts.len() {
        return None;
    }
    let why = match &store.egress_allowlist {
        None => format!(
            "store {} has no egress_allowlist, which allows public hosts on the default ports, \
             and values are unsealed over HTTPS only: on port 443",
            store.name
        ),
        Some(_) => format!(
            "store {}'s egress_allowlist reaches none of them",
            store.name
        ),
    };
    Some(format!(
        "secret {}: allowed_hosts {} can never apply ({why}); it is unsealed only for the others",
        meta.name,
        listed(&dead)
    ))
}

/// True if some HTTPS destination passes both pattern lists (both hold canonical patterns the
/// API stored; one that no longer parses counts as overlapping, so no false warning).
fn any_overlap(allowlist: &[String], allowed_hosts: &[String]) -> bool {
    use crate::policy::HostPattern;
    let parse =
        |l: &[String]| -> Option<Vec<HostPattern>> { l.iter().map(|p| p.parse().ok()).collect() };
    let (Some(a), Some(h)) = (parse(allowlist), parse(allowed_hosts)) else {
        return true;
    };
    a.iter().any(|x| h.iter().any(|y| x.overlaps(y)))
}

async fn list_secrets(
    State(st): St,
    Path(id): Path<String>,
) -> Result<Json<Vec<SecretMeta>>, ApiError> {
    let id = validate::store_id(id);
    Ok(Json(st.store.list_secrets(&id)?))
}

async fn delete_secret(
    State(st): St,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((id, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let id = validate::store_id(id);
    st.store.delete_secret(&id, &name).inspect_err(|e| {
        audit_unconfirmed(&st, "secret.delete", (Some(&id), Some(&name)), peer, e)
    })?;
    st.sandboxes.refresh_committed(&id);
    audit(&st, "secret.delete", Some(&id), Some(&name), None, peer);
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/sandboxes`. The creation runs on a task of its own, to its end, whatever the
/// client does: the server drops a handler whose client has gone, and a creation dropped
/// half-way left an isolated sandbox's row and credentials without its namespace (found from
/// outside: 19 of 45 cut requests). A sandbox whose client went away before its answer was
/// ready is deleted again (nobody holds its credentials); one whose answer was lost after
/// that is listed like any other.
async fn create_sandbox(
    State(st): St,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<Json<CreateSandbox>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(mut req) = body?;
    req.secret_store = validate::store_id(req.secret_store);
    own_node_id(&st)?;
    let (answer, created) = tokio::sync::oneshot::channel();
    let task = st.clone();
    tokio::spawn(async move {
        let made = create_to_the_end(&task, req, peer).await;
        if let Err(Ok(info)) = answer.send(made) {
            abandon_created(&task, &info.id, peer).await;
        }
    });
    let info = created.await.map_err(|_| task_failed())??;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

/// Creates the sandbox and audits it (`/metrics` counts sandboxes when scraped).
async fn create_to_the_end(
    st: &AdminState,
    req: CreateSandbox,
    peer: SocketAddr,
) -> Result<SandboxInfo, ApiError> {
    let info = st.isolation.create(req).await?;
    audit(
        st,
        "sandbox.create",
        Some(&info.secret_store_id),
        None,
        Some(&info.id),
        peer,
    );
    Ok(info)
}

/// Ends a sandbox created for a client that went away before its answer, audited as a
/// deletion by that client.
async fn abandon_created(st: &AdminState, id: &str, peer: SocketAddr) {
    tracing::info!(sandbox = %id, "the client went away before the sandbox was created: deleting it");
    let deleted = st.isolation.delete(id).await;
    match deleted {
        Ok(()) => audit(st, "sandbox.delete", None, None, Some(id), peer),
        Err(e) => {
            tracing::warn!(sandbox = %id, error = %e, "deleting the abandoned sandbox failed; it ends at its expiry")
        }
    }
}

async fn list_sandboxes(State(st): St) -> Response {
    let mut all = st.sandboxes.list();
    all.iter_mut().for_each(|i| st.isolation.decorate(i));
    current_store_names(&st, &mut all);
    Json(all).into_response()
}

async fn get_sandbox(State(st): St, Path(id): Path<String>) -> Result<Response, ApiError> {
    let mut info = st.sandboxes.get(&id)?;
    st.isolation.decorate(&mut info);
    current_store_names(&st, std::slice::from_mut(&mut info));
    Ok(Json(info).into_response())
}

/// Each sandbox's `secret_store_name` as its store is named now: a rename reaches it as the
/// store's allowlist and secrets do (it showed the name at creation, which after a rename could
/// be another live store's; outside pass h47a). A store deleted, or not readable now, leaves
/// the name its sandbox's snapshot holds (the name when it was made). Not kept in the
/// snapshot: a snapshot replaced by a rename alone would refuse the requests in flight that
/// unsealed (`forward::checks::still_decided`).
fn current_store_names(st: &AdminState, infos: &mut [SandboxInfo]) {
    let names: std::collections::HashMap<String, String> = match infos {
        [] => return,
        [one] => st
            .store
            .get_store(&one.secret_store_id)
            .map(|s| (s.id, s.name))
            .into_iter()
            .collect(),
        _ => match st.store.list_stores() {
            Ok(listing) => listing.stores.into_iter().map(|s| (s.id, s.name)).collect(),
            Err(_) => return,
        },
    };
    for info in infos {
        if let Some(name) = names.get(&info.secret_store_id) {
            info.secret_store_name.clone_from(name);
        }
    }
}

/// `DELETE /v1/sandboxes/{id}`. Like a creation, the deletion runs to its end on a task of its
/// own: dropped with a request whose client left, it had stopped the sandbox but kept it in
/// `data_dir/isolated-sandboxes` (20 of 20 cut requests).
async fn delete_sandbox(
    State(st): St,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    own_node_id(&st)?;
    let task = st.clone();
    tokio::spawn(async move { delete_to_the_end(&task, &id, peer).await })
        .await
        .map_err(|_| task_failed())?
}

/// Fleet mode: sandboxes are created and deleted only by the daemon that holds this node's id.
/// While another daemon holds it (a twin that started while the database was restarting),
/// that one serves this node's sandboxes from the rows it loaded: a DELETE here had answered
/// 204 while the twin went on unsealing for the sandbox (found from outside). Now both answer
/// 503 `node_id_in_use`, changing nothing, until the id is this daemon's again.
fn own_node_id(st: &AdminState) -> Result<(), ApiError> {
    match st.follower.as_ref().and_then(|health| health.refusal()) {
        Some(why) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "node_id_in_use",
            format!(
                "{why}; sandboxes are created and deleted only by the daemon holding the id: \
                 stop the other one (or give it its own [node] id) and retry; nothing was changed"
            ),
        )),
        None => Ok(()),
    }
}

/// 500 for a creation or deletion whose task ended without an answer (it panicked).
fn task_failed() -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal sandbox error",
    )
}

/// Deletes the sandbox and audits it.
async fn delete_to_the_end(
    st: &AdminState,
    id: &str,
    peer: SocketAddr,
) -> Result<StatusCode, ApiError> {
    let deleted = st.isolation.delete(id).await;
    // Audited also when the deletion is not durable yet (503): the sandbox has stopped.
    let stopped = matches!(
        &deleted,
        Err(IsolationError::Sandbox(
            crate::sandbox::SandboxError::NotDurable { .. }
        ))
    );
    if deleted.is_ok() || stopped {
        audit(st, "sandbox.delete", None, None, Some(id), peer);
    }
    deleted?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/sandboxes/{id}/commands`; `Accept: text/event-stream` streams the output.
async fn run_command(
    State(st): St,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    body: Result<Json<CommandRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    if !st.isolation.config().commands {
        return Err(IsolationError::CommandsOff.into());
    }
    let Json(req) = body?;
    let stream = wants_event_stream(&headers);
    Ok(commands::handle(&st.isolation, st.audit.clone(), &id, stream, req).await?)
}

/// Whether `Accept` asks for `text/event-stream` over JSON (RFC 9110 §12.5.1): the stream
/// must be named (`*/*` gets JSON), media types compare case-insensitively, and a `q` below
/// JSON's (`text/event-stream;q=0.1, application/json`) or of 0 means JSON. A substring test
/// took both of those for the stream and missed `TEXT/EVENT-STREAM` (outside pass).
fn wants_event_stream(headers: &header::HeaderMap) -> bool {
    let ranges = accept_ranges(headers);
    let sse = quality(&ranges, &["text/event-stream"]);
    sse > 0.0 && sse >= quality(&ranges, &["application/json", "application/*", "*/*"])
}

/// Whether `Accept` asks for OpenMetrics over Prometheus text 0.0.4, by the same rule as
/// [`wants_event_stream`]: Prometheus itself names it first; `curl` (`*/*`) gets the text.
fn wants_openmetrics(headers: &header::HeaderMap) -> bool {
    let ranges = accept_ranges(headers);
    let open = quality(&ranges, &["application/openmetrics-text"]);
    open > 0.0 && open >= quality(&ranges, &["text/plain", "text/*", "*/*"])
}

/// Every `Accept` element of every `Accept` field.
fn accept_ranges(headers: &header::HeaderMap) -> Vec<(String, f32)> {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(media_range)
        .collect()
}

/// The quality of a media type: that of the most specific of `candidates` (most specific
/// first) that a range names; none named: 0.
fn quality(ranges: &[(String, f32)], candidates: &[&str]) -> f32 {
    candidates
        .iter()
        .find_map(|c| ranges.iter().find(|(r, _)| r == c).map(|(_, q)| *q))
        .unwrap_or(0.0)
}

/// One `Accept` element as (lower-case media range, q); a `q` that does not parse counts as 1.
fn media_range(element: &str) -> (String, f32) {
    let mut parts = element.split(';');
    let range = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    let q = parts
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
        .and_then(|(_, v)| v.trim().parse::<f32>().ok())
        .unwrap_or(1.0);
    (range, q)
}

/// `GET /metrics`: Prometheus text 0.0.4 (DESIGN §4), or OpenMetrics when `Accept` prefers it.
async fn metrics(State(st): St, headers: header::HeaderMap) -> Response {
    st.metrics
        .sandboxes
        .set(st.sandboxes.registry().len() as i64);
    let (content_type, body) = match wants_openmetrics(&headers) {
        true => (
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            st.metrics.render(),
        ),
        false => (
            "text/plain; version=0.0.4; charset=utf-8",
            st.metrics.render_prometheus_text(),
        ),
    };
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// `GET /readyz`, open to probes. Without the admin token a failure says only which check
/// failed (the store, or a quarantined store); the reason — database address or file, store
/// ids — is shown only with the token (outside review: an unauthenticated probe read where the
/// database lives).
async fn readyz(State(st): St, headers: header::HeaderMap) -> Response {
    let detailed = bearer_ok(&st, &headers);
    // The check may be a network round trip (PostgreSQL): never on a runtime worker, so that
    // unauthenticated probes cannot stall the proxy while the database is slow or down; one
    // at a time for all probes ([`super::ready`]).
    let store = st.ready.check(&st.store).await;
    // Every listener is bound before the admin API serves its first request (daemon::start
    // binds them all first), so a served /readyz never has unbound listeners to report.
    let quarantined = st.sandboxes.quarantined();
    let behind = follower_behind(&st);
    let message = match store {
        Ok(()) if quarantined.is_empty() && behind.is_none() => {
            return Json(json!({"status": "ready"})).into_response()
        }
        Ok(()) if quarantined.is_empty() && detailed => behind.unwrap_or_default(),
        Ok(()) if quarantined.is_empty() => {
            format!("this node is not current with the database{NO_DETAIL}")
        }
        Ok(()) if detailed => format!(
            "store(s) {} cannot be read (a row is corrupt or was tampered with): their \
             running sandboxes unseal nothing",
            quarantined.join(", ")
        ),
        Ok(()) => format!("a store cannot be read{NO_DETAIL}"),
        Err(e) if detailed => format!("store unusable: {e}"),
        Err(_) => format!("store unusable{NO_DETAIL}"),
    };
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", message).into_response()
}

/// How long the fleet follower may go without a check that answered before `/readyz` says
/// so (a reconnect takes a quarter second; a check answers every quarter second).
const FOLLOWER_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Fleet mode: why this node is not current with the shared database, if its follower has
/// had no check answer for longer than [`FOLLOWER_GRACE`] (a database that accepts the
/// store check but not the follower's, a row the follower cannot read, or a read of a changed
/// store that hangs while the connection looks fine).
fn follower_behind(st: &AdminState) -> Option<String> {
    let health = st.follower.as_ref()?;
    // Its id held by another daemon: it unseals nothing, however current it is.
    if let Some(why) = health.refusal() {
        return Some(why);
    }
    let lag = health.lag();
    (lag > FOLLOWER_GRACE).then(|| {
        // Connected, but a check or the read of a changed store still hangs: as behind.
        let why = health
            .problem()
            .unwrap_or_else(|| "a check of the database has not answered".into());
        format!(
            "changes made through other nodes are not reaching this node: {why} (last check \
             answered {} s ago)",
            lag.as_secs()
        )
    })
}

/// What an unauthenticated `/readyz` says in place of the reason.
const NO_DETAIL: &str = " (the reason is shown with the admin token)";

async fn reload(
    State(st): St,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Result<Response, ApiError> {
    let Some(tx) = &st.reload else {
        return Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "unsupported",
            "reload is not available",
        ));
    };
    let (done, rx) = tokio::sync::oneshot::channel();
    tx.send(done).map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "daemon is shutting down",
        )
    })?;
    let outcome = rx.await.map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "reload was dropped",
        )
    })?;
    // A refused reload is audited as one, not like a reload that took (outside pass).
    st.metrics.store_op("config.reload");
    st.audit.admin(&AdminEvent {
        outcome: outcome.is_err().then_some("refused"),
        ..event("config.reload", (None, None, None), peer)
    });
    match outcome {
        Ok(done) => {
            if done.token == super::TokenReload::Replaced {
                st.audit
                    .admin(&event("admin_token.replace", (None, None, None), peer));
            }
            Ok(Json(json!({
                "reloaded": true,
                "needs_restart": done.needs_restart,
                "admin_token": done.token.as_str(),
            }))
            .into_response())
        }
        Err(msg) => Err(ApiError::bad_request(msg)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_event_stream_is_chosen_by_name_case_and_quality() {
        let accept = |values: &[&str]| {
            let mut h = header::HeaderMap::new();
            for v in values {
                h.append(header::ACCEPT, v.parse().unwrap());
            }
            wants_event_stream(&h)
        };
        assert!(accept(&["text/event-stream"]));
        assert!(accept(&["TEXT/Event-Stream"]));
        assert!(accept(&["application/json;q=0.5, text/event-stream"]));
        assert!(accept(&["*/*", "text/event-stream"]));
        assert!(!accept(&[]));
        assert!(!accept(&["*/*"]));
        assert!(!accept(&["text/*"]));
        assert!(!accept(&["application/json"]));
        assert!(!accept(&["text/event-stream;q=0.1, application/json"]));
        assert!(!accept(&["text/event-stream;q=0"]));
        assert!(!accept(&["text/event-stream-not"]));
    }

    #[test]
    fn the_corrupt_stores_header_is_bounded_and_counts_the_rest() {
        let long = "x".repeat(60_000);
        let ids = vec!["a-1".to_owned(), long.clone(), long, "b\r\n".to_owned()];
        assert_eq!(
            corrupt_header(&ids),
            "a-1,b%0D%0A,+2",
            "a long id does not hide a short one"
        );
        assert_eq!(corrupt_header(&ids[3..]), "b%0D%0A");
        assert_eq!(corrupt_header(&ids[1..2]), "+1");
    }
}
