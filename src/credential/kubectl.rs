//! `tokend credential kubectl ACCOUNT`: a client-go exec credential plugin (kubectl and
//! every client-go program run it for a user whose kubeconfig entry is `exec:`). It
//! prints an `ExecCredential` with the account's token and its expiry, in the API version
//! that `KUBERNETES_EXEC_INFO` names; client-go keeps the token until that expiry (within
//! one process; each kubectl command runs the plugin again).
//!
//! One socket round trip, no URL lookup: the account is named. A failure is a non-zero
//! exit and one line on stderr (client-go shows the plugin's stderr), which `main` does.

use std::path::Path;
use std::time::Duration;

use serde_json::json;

use super::{Daemon, Error, Issued};
use crate::config::Secret;
use crate::failure::Failure;

/// The ExecCredential API versions client-go speaks today (`v1alpha1` is gone since
/// Kubernetes 1.24).
const VERSIONS: [&str; 2] = [
    "client.authentication.k8s.io/v1",
    "client.authentication.k8s.io/v1beta1",
];

/// Why the plugin's input cannot be answered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExecInfoError {
    #[error("KUBERNETES_EXEC_INFO is no ExecCredential JSON: {0}")]
    Malformed(String),
    #[error("KUBERNETES_EXEC_INFO asks for apiVersion {0:?}; tokend answers client.authentication.k8s.io/v1 and v1beta1 (set apiVersion in the kubeconfig's exec entry)")]
    Unsupported(String),
}

/// The API version to answer in: the one `KUBERNETES_EXEC_INFO` names, else `v1`.
pub fn api_version(exec_info: Option<&str>) -> Result<&'static str, ExecInfoError> {
    let Some(text) = exec_info.filter(|t| !t.trim().is_empty()) else {
        return Ok(VERSIONS[0]);
    };
    let info: serde_json::Value =
        serde_json::from_str(text).map_err(|e| ExecInfoError::Malformed(e.to_string()))?;
    let Some(version) = info.get("apiVersion").and_then(|v| v.as_str()) else {
        return Err(ExecInfoError::Malformed("no apiVersion".into()));
    };
    VERSIONS
        .into_iter()
        .find(|v| *v == version)
        .ok_or_else(|| ExecInfoError::Unsupported(version.to_owned()))
}

/// The `ExecCredential` for `issued`, as client-go reads it: `status.token` and
/// `status.expirationTimestamp` (RFC 3339, UTC).
pub fn exec_credential(api_version: &str, issued: &Issued) -> String {
    json!({
        "apiVersion": api_version,
        "kind": "ExecCredential",
        "status": {
            "token": issued.token.expose(),
            "expirationTimestamp": crate::clock::rfc3339(issued.expires_at),
        },
    })
    .to_string()
}

/// Why `credential kubectl` printed nothing.
#[derive(Debug, thiserror::Error)]
pub enum KubectlError {
    #[error(transparent)]
    ExecInfo(#[from] ExecInfoError),
    #[error(transparent)]
    Daemon(#[from] Error),
}

/// The ExecCredential to print for `account`: `exec_info` is `KUBERNETES_EXEC_INFO`;
/// with `min_valid`, a token that stays valid that long.
pub async fn credential(
    daemon: &Daemon,
    account: &str,
    min_valid: Option<Duration>,
    exec_info: Option<&str>,
) -> Result<String, KubectlError> {
    let version = api_version(exec_info)?;
    let issued = daemon.token(account, min_valid).await?;
    Ok(exec_credential(version, &issued))
}

/// `tokend credential kubectl ACCOUNT`: the ExecCredential on stdout.
pub async fn run(
    socket: &Path,
    account: &str,
    min_valid: Option<Duration>,
    exec_info: Option<&str>,
) -> Result<(), Failure> {
    let text = credential(&Daemon::new(socket), account, min_valid, exec_info)
        .await
        .map_err(|e| Failure::Runtime(e.into()))?;
    super::print(Secret::new(text + "\n").expose())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_kubectl_asks_for_or_v1() {
        assert_eq!(api_version(None), Ok("client.authentication.k8s.io/v1"));
        assert_eq!(api_version(Some("")), Ok("client.authentication.k8s.io/v1"));
        let beta = r#"{"kind":"ExecCredential","apiVersion":"client.authentication.k8s.io/v1beta1","spec":{"interactive":false}}"#;
        assert_eq!(
            api_version(Some(beta)),
            Ok("client.authentication.k8s.io/v1beta1")
        );
        let alpha = beta.replace("v1beta1", "v1alpha1");
        assert!(matches!(
            api_version(Some(&alpha)),
            Err(ExecInfoError::Unsupported(v)) if v.ends_with("v1alpha1")
        ));
        assert!(matches!(
            api_version(Some("{")),
            Err(ExecInfoError::Malformed(_))
        ));
    }

    #[test]
    fn an_exec_credential_has_the_token_and_its_expiry() {
        let issued = Issued {
            token: Secret::new("tok"),
            expires_at: std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        };
        let v: serde_json::Value =
            serde_json::from_str(&exec_credential(VERSIONS[0], &issued)).unwrap();
        assert_eq!(
            v,
            json!({
                "apiVersion": "client.authentication.k8s.io/v1",
                "kind": "ExecCredential",
                "status": {"token": "tok", "expirationTimestamp": "2027-01-15T08:00:00Z"},
            })
        );
    }
}
