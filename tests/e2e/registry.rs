//! The local registry (TLS from the cluster CA, htpasswd), as `make cluster-up` started it: its
//! facts, pushing tagged images with skopeo, and a pull identity for a namespace.

use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::api::PostParams;
use serde_json::json;

use crate::harness::{self, TestNamespace};

/// The local registry's facts, from `.cluster/registry.env`.
pub struct LocalRegistry {
    pub host: String,
    pub username: String,
    pub password: String,
    pub ca_file: String,
    pub repository: String,
}

impl LocalRegistry {
    pub fn read() -> Self {
        let vars = harness::cluster_env("registry.env");
        Self {
            host: vars["REGISTRY_HOST"].to_owned(),
            username: vars["REGISTRY_USERNAME"].to_owned(),
            password: vars["REGISTRY_PASSWORD"].to_owned(),
            ca_file: vars["REGISTRY_CA_FILE"].to_owned(),
            repository: vars["RUNTIME_REPOSITORY"].to_owned(),
        }
    }

    /// The manifest digest of `tag`, asked with skopeo.
    pub async fn digest(&self, tag: &str) -> String {
        let output = tokio::process::Command::new("skopeo")
            .args(["inspect", "--format", "{{.Digest}}"])
            .args(["--creds", &format!("{}:{}", self.username, self.password)])
            .args(["--cert-dir", &self.cert_dir()])
            .arg(format!("docker://{}:{tag}", self.repository))
            .output()
            .await
            .expect("skopeo");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    }

    /// Pushes a new image under `tag` (its own digest).
    pub async fn push(&self, repository: &str, tag: &str) {
        let layout = std::env::temp_dir().join(format!("pf-layout-{tag}-{:08x}", rand::random::<u32>()));
        let script = harness::repo_root().join("hack/oci-layout.sh");
        let made = tokio::process::Command::new("bash")
            .arg(script)
            .arg(&layout)
            .arg(tag)
            .status()
            .await
            .unwrap();
        assert!(made.success());
        let pushed = tokio::process::Command::new("skopeo")
            .args(["copy", "--quiet"])
            .args(["--dest-creds", &format!("{}:{}", self.username, self.password)])
            .args(["--dest-cert-dir", &self.cert_dir()])
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{repository}:{tag}"))
            .output()
            .await
            .unwrap();
        std::fs::remove_dir_all(&layout).ok();
        assert!(pushed.status.success(), "{}", String::from_utf8_lossy(&pushed.stderr));
    }

    fn cert_dir(&self) -> String {
        harness::cluster_dir().join("registry/certs.d").display().to_string()
    }

    /// A dockerconfigjson Secret and a service account `puller` naming it.
    pub async fn identity(&self, ns: &TestNamespace, password: &str) {
        self.identity_of_type(ns, password, "kubernetes.io/dockerconfigjson")
            .await;
    }

    /// The service account `puller` with a pull secret `regcred` of `kind`:
    /// `kubernetes.io/dockerconfigjson`, or the legacy `kubernetes.io/dockercfg`.
    pub async fn identity_of_type(&self, ns: &TestNamespace, password: &str, kind: &str) {
        let auth = base64_encode(&format!("{}:{password}", self.username));
        let entries = json!({self.host.clone(): {"auth": auth}});
        let data = if kind == "kubernetes.io/dockercfg" {
            json!({".dockercfg": entries.to_string()})
        } else {
            json!({".dockerconfigjson": json!({"auths": entries}).to_string()})
        };
        let secret: Secret =
            serde_json::from_value(json!({"metadata": {"name": "regcred"}, "type": kind, "stringData": data})).unwrap();
        ns.api::<Secret>()
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
        let account: ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": "puller"}, "imagePullSecrets": [{"name": "regcred"}]}))
                .unwrap();
        ns.api::<ServiceAccount>()
            .create(&PostParams::default(), &account)
            .await
            .unwrap();
    }
}

pub fn base64_encode(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}
