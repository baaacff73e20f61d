//! The one error type of the operator.

/// Everything that can go wrong, each variant saying what the user can do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable cluster connection (kubeconfig missing, unreadable, or the cluster unreachable).
    #[error("cannot reach the Kubernetes API: {0}; set KUBECONFIG or run inside a cluster")]
    Connect(#[source] kube::Error),

    /// A call to the Kubernetes API failed.
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),

    /// A watch cache stopped (the operator is shutting down).
    #[error("a watch cache closed; the operator is shutting down")]
    StoreClosed,

    /// An object the API returned does not parse; `why` never quotes its content.
    #[error("{kind} {name} could not be read: {why}")]
    Unreadable {
        /// The kind, e.g. `Secret`.
        kind: &'static str,
        /// `namespace/name`.
        name: String,
        /// The parser's error class and position.
        why: String,
    },

    /// The runtime NetworkPolicy could not be read or written.
    #[error(transparent)]
    Network(#[from] crate::controller::network::NetworkError),

    /// A reconcile panicked (a defect); the object is retried with backoff.
    #[error("reconcile panicked: {0}")]
    Panicked(String),

    /// A namespaced object came without a namespace.
    #[error("object has no namespace")]
    NotNamespaced,

    /// The instance-type catalog is unusable.
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),

    /// Leader election failed.
    #[error("leader election: {0}")]
    Lease(String),

    /// The admin server could not bind or serve.
    #[error("admin server: {0}")]
    Admin(#[source] std::io::Error),

    /// A CRD this operator needs is not installed or not yet Established.
    #[error(
        "CustomResourceDefinition {name} {problem}; install the CRDs with `kubectl apply -f config/crd/` (or `make run`)"
    )]
    CrdNotReady {
        /// The CRD's name, e.g. `promptflowruntimes.promptflow.dev`.
        name: String,
        /// What is wrong with it.
        problem: String,
    },
}

/// Errors of the running controller.
impl Error {
    /// A short, stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Connect(_) => "connect",
            Error::Kube(_) => "kube",
            Error::CrdNotReady { .. } => "crd_not_ready",
            Error::StoreClosed => "store_closed",
            Error::NotNamespaced => "not_namespaced",
            Error::Unreadable { .. } => "unreadable",
            Error::Catalog(_) => "catalog",
            Error::Admin(_) => "admin",
            Error::Lease(_) => "lease",
            Error::Network(_) => "network_policy",
            Error::Panicked(_) => "panicked",
        }
    }
}

/// The operator's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
