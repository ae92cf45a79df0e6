//! What goes wrong talking to the API server, in the words an operator acts on: RBAC
//! (the Role to apply), the namespace, the service account token; and which of these
//! need an operator rather than patience. The mapping of HTTP statuses to these errors
//! stays with the calls in `client`; nothing here talks to the API server.

/// What went wrong talking to the API server. Errors a member's operator must act on
/// say what to do; none of them quotes a token.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("the Kubernetes API server is out of reach: {0}")]
    Unreachable(String),
    #[error("forbidden: this member's service account may not {verb} {resource} in namespace {namespace:?}; apply the Role of packaging/kubernetes/ (verbs get, list, watch, create, update on leases.coordination.k8s.io and secrets) and bind it to the service account (or set cluster.namespace to the namespace the Role is in)")]
    Forbidden {
        verb: &'static str,
        resource: &'static str,
        namespace: String,
    },
    #[error("the API server refused this member's service account token (401 Unauthorized: expired, revoked, or of another cluster)")]
    Unauthorized,
    #[error("namespace {0:?} does not exist on the API server (cluster.namespace)")]
    NoNamespace(String),
    #[error("failed to read the service account token {path}: {reason}")]
    NoToken { path: String, reason: String },
    #[error("failed to read the API server's answer: {0}")]
    Malformed(String),
    #[error("the API server answered {status} to {verb} {resource}: {message}")]
    Status {
        status: u16,
        verb: &'static str,
        resource: &'static str,
        message: String,
    },
}

impl KubeError {
    /// Whether an operator must act (RBAC, token, namespace), as opposed to a server out
    /// of reach for now.
    pub fn needs_operator(&self) -> bool {
        !matches!(self, KubeError::Unreachable(_) | KubeError::Malformed(_))
    }
}
