//! Observe: read what a runtime points to. Service accounts, pods and quotas come from the watch
//! caches; pull secrets and the flow ConfigMap are read from the API one by one, so no cache ever
//! holds secret data. A settled runtime (its pod made, nothing asked of it) reads no secrets: what
//! its account's secrets came to when last read is remembered, without their contents, until the
//! account changes, a pod is to be made or a version check is due. What a reconcile is about to
//! read is recorded in the dependency index *before* it reads, so a change landing in between
//! still wakes the runtime. Secrets are not watched: a runtime blocked by one is looked at again
//! with backoff.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, ResourceQuota, Secret, ServiceAccount};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};

use super::Context;
use super::size;
use crate::api::{ComputeInstance, DEFAULT_SERVICE_ACCOUNT, PromptFlowRuntime};
use crate::build::instance as instance_pod;
use crate::build::pod;
use crate::controller::index::Dependency;
use crate::error::{Error, Result};
use crate::identity::{self, Logins};

/// What the reconcile read about the runtime's surroundings.
pub struct Observed {
    /// The service account the runtime pulls with.
    pub account_name: String,
    /// That account, when it exists.
    pub account: Option<Arc<ServiceAccount>>,
    /// The account's imagePullSecrets, read or remembered.
    pub pull: PullSecrets,
    /// The flow ConfigMap, when the runtime names one.
    pub flow: Option<FlowSource>,
    /// The runtime's pod, when it exists.
    pub pod: Option<Arc<Pod>>,
    /// The namespace's quotas; read only when a pod is being sized.
    pub quotas: Vec<ResourceQuota>,
    /// The compute instance `spec.compute.instance` names, and the pod the operator made for it.
    pub instance: Option<InstanceSeen>,
}

/// A runtime's pull secrets: read from the API, or, for a settled runtime (its pod made, nothing
/// asked of it), what they came to the last time its account's secrets were read ([`Logins`]),
/// while the account is unchanged. A reconcile that then needs them (a pod to make, a version
/// check due) reads them after all ([`Observed::read_pull_secrets`]).
pub enum PullSecrets {
    /// Each imagePullSecret the account names, `None` when it does not exist.
    Read(BTreeMap<String, Option<Secret>>),
    /// Not read: the account resolved at its current version, to these logins.
    Remembered(Arc<Logins>),
}

impl Observed {
    /// Whether the pull secrets were remembered rather than read.
    pub fn remembered(&self) -> bool {
        matches!(self.pull, PullSecrets::Remembered(_))
    }

    /// Reads the pull secrets a remembered observation skipped.
    pub async fn read_pull_secrets(&mut self, ctx: &Context, namespace: &str) -> Result<()> {
        if self.remembered() {
            let names = self
                .account
                .as_deref()
                .map(identity::pull_secret_names)
                .unwrap_or_default();
            self.pull = PullSecrets::Read(read_secrets(ctx, namespace, names).await?);
        }
        Ok(())
    }
}

/// A service account by namespace and name.
type AccountKey = (String, String);

/// What an account's pull secrets came to: at which resourceVersion of the account, and when.
struct Remembered {
    version: String,
    read: std::time::Instant,
    logins: Arc<Logins>,
}

#[derive(Default)]
struct Accounts {
    entries: std::collections::HashMap<AccountKey, Remembered>,
    /// Entries after the last pass that dropped gone accounts: the next pass comes when they
    /// have doubled, so remembering stays cheap however many accounts there are.
    after_pass: usize,
}

/// What service accounts' pull secrets came to when last read, by namespace and account, with the
/// account's resourceVersion then and when: a changed account is read again, and so is one read
/// longer ago than the caller's limit (a deleted or rotated secret is noticed by then, whatever
/// else keeps the registry's answers fresh). No secret contents (only
/// [`login_key`](identity::login_key)s); one entry per account, whatever its runtimes number.
#[derive(Default)]
pub struct RememberedLogins {
    accounts: std::sync::Mutex<Accounts>,
}

impl RememberedLogins {
    /// What `account` (at its current resourceVersion) came to, if read within `max_age`.
    pub fn get(&self, namespace: &str, account: &ServiceAccount, max_age: std::time::Duration) -> Option<Arc<Logins>> {
        let version = account.metadata.resource_version.as_deref()?;
        let accounts = self.accounts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let known = accounts.entries.get(&(namespace.to_owned(), account.name_any()))?;
        (known.version == version && known.read.elapsed() < max_age).then(|| known.logins.clone())
    }

    /// Remembers what `account` came to, read now; entries of accounts gone or changed since go
    /// from time to time (`current` gives an account's resourceVersion now).
    pub fn remember(
        &self,
        namespace: &str,
        account: &ServiceAccount,
        logins: Logins,
        current: impl Fn(&str, &str) -> Option<String>,
    ) {
        let Some(version) = account.metadata.resource_version.clone() else {
            return;
        };
        let key = (namespace.to_owned(), account.name_any());
        let mut accounts = self.accounts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(known) = accounts.entries.get_mut(&key)
            && known.version == version
            && *known.logins == logins
        {
            known.read = std::time::Instant::now();
            return;
        }
        if accounts.entries.len() >= (2 * accounts.after_pass).max(16) {
            accounts
                .entries
                .retain(|(ns, name), known| current(ns, name).as_ref() == Some(&known.version));
            accounts.after_pass = accounts.entries.len();
        }
        accounts.entries.insert(
            key,
            Remembered {
                version,
                read: std::time::Instant::now(),
                logins: Arc::new(logins),
            },
        );
    }

    /// Accounts remembered.
    pub fn len(&self) -> usize {
        self.accounts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entries
            .len()
    }
}

/// A compute instance a runtime asks for, as the caches hold it.
pub struct InstanceSeen {
    /// The instance, when it exists.
    pub object: Option<Arc<ComputeInstance>>,
    /// Its pod, when the operator made one for it.
    pub pod: Option<Arc<Pod>>,
}

/// The flow ConfigMap a runtime names, and what was found under that name.
pub struct FlowSource {
    /// `spec.flow.configMapName`.
    pub config_map: String,
    /// The ConfigMap, when it exists.
    pub found: Option<ConfigMap>,
}

/// Reads everything `runtime` points to; what it is about to read goes to `record` first.
/// A runtime on a compute instance has no pod of its own and is never sized. With `remember`,
/// a serverless runtime whose pod exists and which asks for nothing (no restart, check or update
/// pending) takes its account's remembered logins instead of reading its pull secrets.
pub async fn observe(
    runtime: &PromptFlowRuntime,
    ctx: &Context,
    namespace: &str,
    remember: bool,
    record: impl FnOnce(Vec<Dependency>),
) -> Result<Observed> {
    let account_name = runtime
        .spec
        .identity
        .as_ref()
        .and_then(|i| i.service_account_name.clone())
        .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.to_owned());
    let flow_name = runtime.spec.flow.as_ref().and_then(|f| f.config_map_name.clone());
    let serverless = runtime.spec.compute.serverless.is_some();
    let pod = ctx
        .own_pod(&pod::pod_name(&runtime.name_any()), namespace, runtime)
        .filter(|_| serverless);

    let mut dependencies = vec![Dependency::ServiceAccount(namespace.to_owned(), account_name.clone())];
    if let Some(cm) = &flow_name {
        dependencies.push(Dependency::ConfigMap(namespace.to_owned(), cm.clone()));
    }
    let sizing = serverless && size::needs_sizing(runtime, pod.as_deref());
    if sizing {
        dependencies.push(Dependency::Quotas(namespace.to_owned()));
    }
    // The instance asked for, and the one the status last named (a runtime moving away waits
    // for that one to let go).
    dependencies.extend(super::on_instance::instances_watched(runtime));
    record(dependencies);

    let account = ctx.accounts.get(&ObjectRef::new(&account_name).within(namespace));
    let remembered = account
        .as_deref()
        .filter(|_| remember && pod.is_some() && !super::versions::asked(runtime))
        .filter(|_| super::apply::pod::restart_requested(runtime).is_none())
        .and_then(|account| ctx.logins.get(namespace, account, ctx.versions.interval()));
    let pull = match remembered {
        Some(logins) => PullSecrets::Remembered(logins),
        None => {
            let names = account.as_deref().map(identity::pull_secret_names).unwrap_or_default();
            PullSecrets::Read(read_secrets(ctx, namespace, names).await?)
        }
    };
    let flow = match flow_name {
        Some(config_map) => {
            let found = Api::<ConfigMap>::namespaced(ctx.client.clone(), namespace)
                .get_opt(&config_map)
                .await?;
            Some(FlowSource { config_map, found })
        }
        None => None,
    };
    // Quotas matter only when a pod is sized; a runtime that keeps its pod never reads them.
    let quotas = if sizing {
        ctx.quotas
            .state_filter(|q| q.namespace().as_deref() == Some(namespace))
            .iter()
            .map(|q| (**q).clone())
            .collect()
    } else {
        Vec::new()
    };
    let instance = runtime.spec.compute.instance.as_ref().map(|asked| {
        let object = ctx.instances.get(&ObjectRef::new(&asked.name).within(namespace));
        let pod = object
            .as_ref()
            .and_then(|object| ctx.own_pod(&instance_pod::pod_name(&asked.name), namespace, &**object));
        InstanceSeen { object, pod }
    });
    Ok(Observed {
        account_name,
        account,
        pull,
        flow,
        pod,
        quotas,
        instance,
    })
}

async fn read_secrets(ctx: &Context, namespace: &str, names: Vec<String>) -> Result<BTreeMap<String, Option<Secret>>> {
    let mut secrets = BTreeMap::new();
    for name in names {
        let found = read_secret(&ctx.client, namespace, &name).await?;
        secrets.insert(name, found);
    }
    Ok(secrets)
}

/// Reads one Secret. Parsed here rather than by the client library, which logs the whole response
/// body at warn when it cannot parse it; this never puts the body, or a parser message quoting
/// it, anywhere. Served from the API server's watch cache (`resourceVersion=0`), not a quorum read
/// from etcd: a reconcile reads its pull secrets every time, and at thousands of runtimes those
/// reads would load etcd for no gain (a secret that changes a moment later is read again at the
/// runtime's next retry).
pub(crate) async fn read_secret(client: &kube::Client, namespace: &str, name: &str) -> Result<Option<Secret>> {
    let request = kube::core::Request::new(format!("/api/v1/namespaces/{namespace}/secrets"))
        .get(name, &kube::api::GetParams::any())
        .map_err(|e| Error::Kube(kube::Error::BuildRequest(e)))?;
    let text = match client.request_text(request).await {
        Ok(text) => text,
        Err(kube::Error::Api(status)) if status.code == 404 => return Ok(None),
        Err(err) => return Err(err.into()),
    };
    serde_json::from_str(&text).map(Some).map_err(|e| Error::Unreadable {
        kind: "Secret",
        name: format!("{namespace}/{name}"),
        why: format!("{:?} error at line {} column {}", e.classify(), e.line(), e.column()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(name: &str, version: &str) -> ServiceAccount {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "a", "resourceVersion": version}
        }))
        .unwrap()
    }

    #[test]
    fn remembered_logins_hold_while_the_account_is_unchanged_and_the_read_is_recent() {
        let memory = RememberedLogins::default();
        let hour = std::time::Duration::from_secs(3600);
        let (v1, v2) = (account("puller", "1"), account("puller", "2"));
        assert!(memory.get("a", &v1, hour).is_none());
        memory.remember("a", &v1, Logins::default(), |_, _| Some("1".into()));
        assert!(memory.get("a", &v1, hour).is_some());
        assert!(
            memory.get("a", &v1, std::time::Duration::ZERO).is_none(),
            "read too long ago"
        );
        assert!(memory.get("a", &v2, hour).is_none(), "a changed account is read again");
        assert!(memory.get("b", &v1, hour).is_none(), "by namespace");
        // Gone and changed accounts are dropped once the entries have doubled since the last pass.
        for i in 0..16 {
            memory.remember(
                "a",
                &account(&format!("other-{i}"), "5"),
                Logins::default(),
                |_, name| name.starts_with("other-").then(|| "5".into()),
            );
        }
        assert!(memory.get("a", &v1, hour).is_none());
        assert_eq!(memory.len(), 16);
    }
}
