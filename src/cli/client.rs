//! A minimal admin API client (hyper over plain HTTP to the loopback admin listener).

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// Every byte of a path segment but ASCII letters, digits, `-`, `_` and `~` is encoded.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'~');

/// `value` (a secret name, a sandbox id: what the user typed) as one URL path segment: a `/`,
/// `?` or `#` cannot reach another route or become a query, and `.` is encoded too, so `..`
/// is a name (refused by the API), never a dot segment.
pub fn seg(value: &str) -> String {
    percent_encoding::utf8_percent_encode(value, SEGMENT).to_string()
}

/// Talks to one daemon. Cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct AdminClient {
    base: String,
    token: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

/// A failed call: the daemon's error code and message, or a transport problem. The messages
/// read like a CLI's: the daemon's own sentence, no HTTP status prefix.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon answered with an error. Displays the daemon's message (its code when the
    /// message is empty).
    #[error("{}", if message.is_empty() { format!("{code} (HTTP {status})") } else { message.clone() })]
    Api {
        /// HTTP status.
        status: u16,
        /// Error code.
        code: String,
        /// Message.
        message: String,
    },
    /// Could not reach the daemon (nothing listening, refused, DNS failure…).
    #[error("cannot reach the daemon at {0} — is `sealgate serve` running? ({1})")]
    Unreachable(String, String),
    /// The request could not be built, or the answer broke off.
    #[error("talking to the daemon at {0}: {1}")]
    Transport(String, String),
}

impl AdminClient {
    /// A client for `base` (e.g. `http://127.0.0.1:7070`).
    pub fn new(base: &str, token: String) -> Self {
        let http = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        AdminClient {
            base: base.trim_end_matches('/').to_owned(),
            token,
            http,
        }
    }

    /// POSTs `body` to `path` asking for `text/event-stream`; returns the response once its
    /// head arrived (the body streams), or the daemon's error.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn post_stream(
        &self,
        path: &str,
        body: &Value,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let url = format!("{}{path}", self.base);
        let req = Request::builder()
            .method(Method::POST)
            .uri(&url)
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .header("accept", "text/event-stream")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| ClientError::Transport(url.clone(), e.to_string()))?;
        let resp = self
            .http
            .request(req)
            .await
            .map_err(|e| ClientError::Transport(self.base.clone(), e.to_string()))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let json: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Err(self.api_error(status, &json))
    }

    /// Calls `method path` with an optional JSON body; returns the JSON answer (Null for 204).
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ClientError> {
        Ok(self.call_with_headers(method, path, body).await?.0)
    }

    /// [`AdminClient::call`], with the answer's headers.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn call_with_headers(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(Value, http::HeaderMap), ClientError> {
        let url = format!("{}{path}", self.base);
        let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(&url)
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .body(Full::new(bytes))
            .map_err(|e| ClientError::Transport(url.clone(), e.to_string()))?;
        let resp = self
            .http
            .request(req)
            .await
            .map_err(|e| self.send_error(&e))?;
        let status = resp.status();
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| ClientError::Transport(self.base.clone(), e.to_string()))?
            .to_bytes();
        let json: Value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).unwrap_or(Value::Null)
        };
        if status.is_success() {
            return Ok((json, parts.headers));
        }
        Err(self.api_error(status.as_u16(), &json))
    }

    /// The error of an answer with `status` and body `json`. The proxy's 407 means the URL
    /// is sealgate's proxy listener, not its admin API: said so, rather than the proxy's
    /// advice to sandboxes about their proxy URL (outside review: a first-hour mix-up).
    fn api_error(&self, status: u16, json: &Value) -> ClientError {
        let code = json["error"]["code"].as_str().unwrap_or("unknown");
        let message = match (status, code) {
            (407, "proxy_auth_required") => format!(
                "{} is sealgate's proxy listener, not its admin API (that one listens on \
                 [admin] listen, by default http://127.0.0.1:7070)",
                self.base
            ),
            _ => json["error"]["message"].as_str().unwrap_or("").to_owned(),
        };
        ClientError::Api {
            status,
            code: code.to_owned(),
            message,
        }
    }

    /// A connect failure means no daemon there; name the underlying cause briefly (hyper's
    /// own text, `client error (Connect)`, says nothing to a user).
    fn send_error(&self, e: &hyper_util::client::legacy::Error) -> ClientError {
        let mut cause: &dyn std::error::Error = e;
        while let Some(inner) = cause.source() {
            cause = inner;
        }
        let cause = cause.to_string();
        if e.is_connect() {
            return ClientError::Unreachable(self.base.clone(), cause);
        }
        ClientError::Transport(self.base.clone(), cause)
    }
}

#[cfg(test)]
mod tests {
    use super::seg;

    #[test]
    fn a_segment_cannot_leave_its_place_in_the_path() {
        assert_eq!(seg("OPENAI_API_KEY"), "OPENAI_API_KEY");
        assert_eq!(seg("sbx_0123abc"), "sbx_0123abc");
        assert_eq!(seg(".."), "%2E%2E");
        assert_eq!(seg("."), "%2E");
        assert_eq!(seg("a/../b"), "a%2F%2E%2E%2Fb");
        assert_eq!(seg("KEY?x#y"), "KEY%3Fx%23y");
        assert_eq!(seg("é x"), "%C3%A9%20x");
    }
}
