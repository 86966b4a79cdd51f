//! A GET against an instance's HTTP endpoint, for `alarm-digest inspect` and the tests, through
//! hyper's client (already in the tree with axum).

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[derive(Debug, thiserror::Error)]
pub enum GetError {
    /// Nothing listens at the address.
    #[error("connection refused by {0}")]
    Refused(String),
    #[error("GET http://{addr}{path}: {message}")]
    Failed {
        addr: String,
        path: String,
        message: String,
    },
}

/// GETs `http://{addr}{path}` and returns the status code and the body (lossy UTF-8).
/// `path` must already be percent-encoded.
pub async fn get(addr: &str, path: &str) -> Result<(u16, String), GetError> {
    let failed = |message: String| GetError::Failed {
        addr: addr.to_string(),
        path: path.to_string(),
        message,
    };
    let uri: axum::http::Uri = format!("http://{addr}{path}")
        .parse()
        .map_err(|e: axum::http::uri::InvalidUri| failed(e.to_string()))?;
    // One request per connection, as a CLI call is: no idle connection outlives the call.
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http::<Empty<Bytes>>();
    let response = client.get(uri).await.map_err(|error| {
        if is_refused(&error) {
            GetError::Refused(addr.to_string())
        } else {
            failed(format!("{error:#}"))
        }
    })?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| failed(e.to_string()))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn is_refused(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(current) = source {
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        source = current.source();
    }
    false
}

/// Percent-encodes a query value: unreserved characters stay, every other byte is escaped.
pub fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn percent_encoding_keeps_unreserved_and_escapes_the_rest() {
        assert_eq!(super::percent_encode("a-b_c.d~e"), "a-b_c.d~e");
        assert_eq!(super::percent_encode("a b/&=é"), "a%20b%2F%26%3D%C3%A9");
    }
}
